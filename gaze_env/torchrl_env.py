"""The TorchRL front-end: ``AutoGazeTorchEnv``, an ``EnvBase`` with ``batch_size=[B]`` on any device.

Like the Gymnasium front-ends it is a thin layer over ``gaze_env.core``: one ``core.step`` moves all
``B`` episodes, a partial reset (``"_reset"`` mask) replaces only the reset rows of the batched
``GazeState``, and the specs are derived once from the ``PatchGrid``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Binary, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from gaze_env import core
from gaze_env.builder import build
from gaze_env.graph import StepRunner, resolve_step_mode


class PixelSpec(Categorical):
    """uint8 pixels in [0, 255]: ``Categorical(256)`` with ``is_in`` checking shape and dtype only.

    ``Bounded(0, 255)`` would hold, clone and compare bound tensors of the full (B, 3, H, W) shape
    (0.6 GB each per image key at paper size, B = 4096, and minutes of CPU time to build);
    ``Categorical`` holds none, but its ``is_in`` compares ``val < 256`` in the value's dtype, which
    wraps for uint8. Every uint8 value is a valid pixel."""

    def is_in(self, val: torch.Tensor) -> bool:
        try:
            shape = torch.broadcast_shapes(self._safe_shape, val.shape)
        except RuntimeError:  # shapes that do not broadcast
            return False
        return val.dtype == self.dtype and val.shape == shape


class AutoGazeTorchEnv(EnvBase):
    """``B`` AutoGaze episodes as a batched TorchRL environment.

    The MDP, rewards and keyword arguments are those of ``gaze_env.gym_env.AutoGazeEnv`` (see
    its docstring: ``preset``, ``videos``, ``gazing_ratio``, ``frame_budgets``, ``reward``,
    ``reward_kwargs``, ``gaze_cost``, ``loss_threshold``, ``reconstructor``, ...).

    Specs (``N`` patches, ``T`` frames, ``H`` frame side, all with leading batch dim ``B``):
    - observation: ``frame`` / ``canvas`` (B, 3, H, H) uint8 (``PixelSpec``, a ``Categorical(256)``:
      no per-element bound tensors), ``gazed`` (B, N) bool,
      ``frame_index`` (B,) int64 in [0, T), ``gazes_left`` (B,) int64 in [0, N],
      ``action_mask`` (B, N + 1) bool, and diagnostics under ``info``: ``loss`` (B,),
      ``gazes_this_frame`` (B,), ``gazing_ratio`` (B,), ``frame_loss`` (B, T) (NaN until a frame ends);
    - action: ``Categorical(N + 1)`` (B,) int64, ``N`` = STOP; use ``action_mask`` (e.g. with
      ``MaskedCategorical``) to stay valid, an invalid action raises ``ValueError``;
    - reward (B, 1) float32; ``done`` = ``terminated`` (B, 1) bool, the episode has ended (collectors
      then reset the row); ``truncated`` always False (episodes are at most ``sum(budgets) + T`` long).

    Reset: ``env.reset()`` starts every row; a ``"_reset"`` (B, 1) bool entry (TorchRL's partial
    reset, as collectors send it) restarts only those rows. The reset tensordict may also carry,
    for the rows being reset, ``"video"`` (B, T, 3, H, H) uint8 clips, ``"clip_index"`` (B,) int64
    indices into ``videos``, and ``"budgets"`` (B, T) int64 per-frame gaze budgets; otherwise clips
    are drawn uniformly with the env's ``torch.Generator`` (seeded by ``set_seed``).

    ``rand_action`` samples uniformly among the valid actions of ``action_mask``.

    Args:
        batch_size: ``B`` as an int or a one-element sequence.
        device: torch device of the state and of every tensor the env returns.
        validate: check actions against the mask (a device sync each step); False skips it.
        step_mode: ``"auto"`` (CUDA graphs of the fixed-shape step on CUDA when the reward's loss
            is per-pixel, else eager), ``"eager"``, ``"static"`` or ``"graph"``: see
            ``gaze_env.graph``. Every mode gives the same episodes; the tensordicts returned are
            fresh tensors in every mode.
        step_kernel: ``"auto"``, ``"cupy"`` or ``"torch"``: the static and graph modes' bookkeeping
            in CuPy kernels (CUDA) or torch ops, see ``core.StaticStep``; identical results.
        **kwargs: the shared keyword arguments, resolved by ``gaze_env.builder.build``.
    """

    def __init__(
        self,
        batch_size: int | Sequence[int] = 1,
        preset: str = "tiny",
        videos: Any = None,
        *,
        device: str | torch.device = "cpu",
        validate: bool = True,
        step_mode: str = "auto",
        step_kernel: str = "auto",
        **kwargs: Any,
    ) -> None:
        size = torch.Size([batch_size] if isinstance(batch_size, int) else batch_size)
        if len(size) != 1 or size[0] < 1:
            raise ValueError(f"batch_size must be one positive int B (or [B]), got {list(size)}")
        super().__init__(device=device, batch_size=size)
        self.built = build(preset, videos, **kwargs)
        self.params = self.built.params
        self.config = self.built.config
        self.reward_fn = self.built.reward
        self.source = self.built.source
        self.num_envs = size[0]
        self.validate = bool(validate)
        self.step_mode = resolve_step_mode(step_mode, self.params, self.device)
        self.step_kernel = core.check_step_kernel(step_kernel)
        self.state = None
        self._runner: StepRunner | None = None  # static / graph modes: built at the first step
        self._gen = torch.Generator()
        self._gen.seed()
        self._make_specs()

    def _make_specs(self) -> None:
        B, dev = self.num_envs, self.device
        grid, T = self.config.grid, self.config.num_frames
        N, H = grid.num_patches, grid.frame_size

        def image() -> PixelSpec:
            return PixelSpec(256, shape=(B, 3, H, H), dtype=torch.uint8, device=dev)

        def real(*shape: int) -> Unbounded:
            return Unbounded(shape=(B, *shape), dtype=torch.float32, device=dev)

        self.observation_spec = Composite(
            frame=image(),
            canvas=image(),
            gazed=Binary(n=N, shape=(B, N), dtype=torch.bool, device=dev),
            frame_index=Categorical(T, shape=(B,), dtype=torch.int64, device=dev),
            gazes_left=Categorical(N + 1, shape=(B,), dtype=torch.int64, device=dev),
            action_mask=Binary(n=N + 1, shape=(B, N + 1), dtype=torch.bool, device=dev),
            info=Composite(
                loss=real(),
                gazes_this_frame=Categorical(N + 1, shape=(B,), dtype=torch.int64, device=dev),
                gazing_ratio=real(),
                frame_loss=real(T),
                shape=(B,),
                device=dev,
            ),
            shape=(B,),
            device=dev,
        )
        self.action_spec = Categorical(N + 1, shape=(B,), dtype=torch.int64, device=dev)
        self.reward_spec = Unbounded(shape=(B, 1), dtype=torch.float32, device=dev)
        flag = Categorical(2, shape=(B, 1), dtype=torch.bool, device=dev)
        self.full_done_spec = Composite(
            done=flag, terminated=flag.clone(), truncated=flag.clone(), shape=(B,), device=dev
        )

    # ---- EnvBase hooks ---------------------------------------------------------------------
    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        B = self.num_envs
        mask = tensordict.get("_reset", None) if tensordict is not None else None
        if mask is None or self.state is None:
            rows = torch.arange(B, device=self.device)
        else:
            rows = mask.reshape(B).nonzero()[:, 0]

        def given(key: str) -> torch.Tensor | None:
            value = tensordict.get(key, None) if tensordict is not None else None
            return None if value is None else value[rows.to(value.device)]

        video, index, budgets = given("video"), given("clip_index"), given("budgets")
        if rows.numel():
            if video is None and index is None:
                index = torch.randint(len(self.source), (rows.numel(),), generator=self._gen)

            def clips(lo: int, hi: int) -> torch.Tensor:
                return video[lo:hi] if video is not None else self.source.clips(index[lo:hi].tolist())

            if self.state is None:
                batch = clips(0, B).to(self.device)
                self.state = core.reset(self.params, batch, generator=self._gen, budgets=budgets)
                self._runner = None
            else:  # in place (the step graphs stay valid), a chunk of rows at a time
                core.reset_rows(self.params, self.state, rows, clips, generator=self._gen, budgets=budgets)
                if self._runner is not None:
                    self._runner.refresh(rows)
        out = self._observation()
        done = self.state.done[:, None]  # (B, 1): False on every reset row
        out.update({"done": done, "terminated": done.clone(), "truncated": torch.zeros_like(done)})
        return out

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        if self.state is None:
            raise RuntimeError("call reset() before step()")
        action = tensordict.get("action").reshape(self.num_envs)
        if self.step_mode == "eager":
            tr = core.step(self.params, self.state, action, validate=self.validate)
            reward = self.reward_fn(tr).float()[:, None]  # (B, 1)
        else:
            runner = self._stepper()
            tr = runner.step(action)
            reward = (runner.reward if runner.reward is not None else self.reward_fn(tr).float())[:, None].clone()
        terminated = self.state.done[:, None].clone()  # (B, 1): ended now or earlier (not reset since)
        out = self._observation()
        out.update({"reward": reward, "done": terminated, "terminated": terminated.clone()})
        out.set("truncated", torch.zeros_like(terminated))
        return out

    def _set_seed(self, seed: int | None) -> None:
        if seed is None:
            self._gen.seed()
        else:
            self._gen.manual_seed(int(seed))

    def rand_action(self, tensordict: TensorDictBase | None = None) -> TensorDictBase:
        """A uniformly random valid action per row, from ``tensordict["action_mask"]`` (or the
        current state's mask). Rows with no valid action (ended episodes) get STOP."""
        if tensordict is None:
            tensordict = TensorDict(batch_size=self.batch_size, device=self.device)
        mask = tensordict.get("action_mask", None)
        if mask is None:
            mask = core.action_mask(self.params, self.state)
        weights = mask.float()
        weights[..., -1] += (~mask.any(-1)).float()
        tensordict.set(self.action_key, torch.multinomial(weights, 1)[:, 0])
        return tensordict

    # ---- helpers ---------------------------------------------------------------------------
    def _stepper(self) -> StepRunner:
        """The static / graph runner of the current state (built, and captured, when missing)."""
        if self._runner is None or not self._runner.matches(self.state, self.validate):
            self._runner = None  # free the old graphs before capturing new ones
            self._runner = StepRunner(
                self.params,
                self.state,
                self.reward_fn,
                validate=self.validate,
                capture=self.step_mode == "graph",
                kernel=self.step_kernel,
            )
        return self._runner

    def _observation(self) -> TensorDictBase:
        r = self._runner
        if r is not None and r.matches(self.state, self.validate):
            # fresh copies of the runner's buffers: tensordicts are kept by rollouts and collectors
            obs = {k: v.clone() for k, v in r.obs.items()}
            info = {k: v.clone() for k, v in r.info.items()}
        else:
            obs, info = core.observe(self.params, self.state), core.info(self.params, self.state)
        obs["info"] = TensorDict(info, batch_size=self.batch_size, device=self.device)
        return TensorDict(obs, batch_size=self.batch_size, device=self.device)
