"""``AutoGaze-v0`` as a Gymnasium ``VectorEnv``: ``B`` episodes stepped as one batch by the core.

``gymnasium.make_vec("AutoGaze-v0", num_envs=B)`` returns :class:`AutoGazeVectorEnv` (the
registered ``vector_entry_point``). There is no Python loop over the envs: one ``core.step`` moves
every episode, and resetting some envs replaces only their rows of the batched ``GazeState``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from gaze_env import core
from gaze_env.builder import build
from gaze_env.graph import StepRunner, resolve_step_mode
from gaze_env.gym_env import observation_space, to_numpy
from gaze_env.render import side_by_side

RESET_OPTIONS = ("reset_mask", "video", "clip_index", "budgets")


class AutoGazeVectorEnv(VectorEnv):
    """``num_envs`` AutoGaze episodes as one Gymnasium vector environment.

    The MDP, the spaces of one env, the rewards and the keyword arguments are those of
    ``gaze_env.gym_env.AutoGazeEnv`` (see its docstring); this class only batches them.

    ## Spaces
    ``single_observation_space`` / ``single_action_space`` are ``AutoGazeEnv``'s;
    ``observation_space`` / ``action_space`` are their ``batch_space``: a ``Dict`` of arrays with
    a leading ``num_envs`` dimension (``frame_index`` and ``gazes_left`` become ``MultiDiscrete``)
    and ``MultiDiscrete([N + 1] * num_envs)``. ``observation["action_mask"]`` is (B, N + 1) bool.

    ## Autoreset
    ``autoreset_mode`` (``metadata["autoreset_mode"]``) follows Gymnasium 1.x:
    - ``NEXT_STEP`` (default): the step after an env terminated resets it with a new clip; its
      action is ignored, its reward is 0 and it returns the first observation of the new episode.
    - ``SAME_STEP``: an env that terminates is reset in the same step; the returned observation
      is the new episode's, and ``info["final_obs"]`` / ``info["final_info"]`` (masked by
      ``info["_final_obs"]`` / ``info["_final_info"]``) hold the last ones of the old episode.
    - ``DISABLED``: ended envs stay ended (a step raises while any is) until ``reset(options=
      {"reset_mask": mask})`` restarts them.

    ## Infos
    Gymnasium's vector convention: ``info[key]`` has a leading ``num_envs`` dimension and
    ``info["_" + key]`` (B,) bool says which envs it holds (all of them after a step, the reset
    ones after a partial reset). Keys: ``loss``, ``gazes_this_frame``, ``gazing_ratio`` and
    ``frame_loss`` (B, T) (NaN for frames not ended yet).

    ## Reset options
    - ``reset_mask`` (B,) bool: reset only these envs (the others keep their episode).
    - ``video``: uint8 clips (B or M, T, 3, H, W), one per env or per reset env (M = reset envs).
    - ``clip_index``: indices into ``videos``, (B,) or (M,).
    - ``budgets``: per-frame budgets (T,), or (B or M, T) per env.
    Without ``video`` / ``clip_index`` clips are drawn uniformly from ``videos``.

    ## Seeding
    ``reset(seed=s)`` seeds ``np_random`` and, from it, the ``torch.Generator`` that draws clips
    (and the scored frames when ``reward_frame_rate < 1``); with the same seed, options and actions
    two vector envs produce identical episodes. Only an int (or None) seed is accepted.

    ## Arguments (beyond ``AutoGazeEnv``'s)
    - ``num_envs``: ``B``, the number of parallel episodes.
    - ``device``: torch device of the batched state (``"cpu"``, ``"cuda"``, ...).
    - ``return_tensors`` (False): return observations, rewards, terminations and infos as torch
      tensors on ``device`` instead of numpy arrays (no device-to-host copy). Actions may be
      numpy arrays, sequences or tensors either way. **The returned tensors may be buffers that
      the next ``step()`` / ``reset()`` overwrites in place** (as in other GPU-batched envs): copy
      (``.clone()``) what you keep, and do not write into them. The numpy arrays are always fresh.
    - ``step_mode`` (``"auto"``): ``"eager"`` steps with ``core.step``; ``"graph"`` replays the
      fixed-shape ``core.StaticStep`` as CUDA graphs (one host sync and a handful of launches per
      step, observations kept in persistent buffers updated only where they change); ``"static"``
      runs that step op by op (any device); ``"auto"`` picks ``"graph"`` on CUDA when the reward's
      loss is per-pixel (l1, mse, psnr) and the reconstructor the paste canvas, else ``"eager"``.
      All modes give identical episodes (see ``gaze_env.graph``).
    - ``step_kernel`` (``"auto"``): in the static and graph modes, the step's bookkeeping (counters,
      masks, observation flags) in a few CuPy kernels on CUDA where they run (``"auto"``,
      ``"cupy"``) or in torch ops (``"torch"``); identical results (``core.StaticStep``).
    - ``autoreset_mode``: an ``AutoresetMode`` or its value (``"NextStep"``, ...).
    - ``validate`` (True): raise ``ValueError`` naming the env for an invalid action (ended envs
      accept any in-range action); False skips the check (invalid actions have undefined effects).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4, "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int = 1,
        preset: str = "tiny",
        videos: Any = None,
        *,
        render_mode: str | None = None,
        device: str | torch.device = "cpu",
        return_tensors: bool = False,
        autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP,
        validate: bool = True,
        step_mode: str = "auto",
        step_kernel: str = "auto",
        **kwargs: Any,
    ) -> None:
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.built = build(preset, videos, **kwargs)
        self.params = self.built.params
        self.config = self.built.config
        self.reward_fn = self.built.reward
        self.source = self.built.source
        self.num_envs = int(num_envs)
        self.device = torch.device(device)
        self.return_tensors = bool(return_tensors)
        self.validate = bool(validate)
        self.autoreset_mode = AutoresetMode(autoreset_mode)
        self.metadata = {**type(self).metadata, "autoreset_mode": self.autoreset_mode}
        self.render_mode = render_mode

        self.single_observation_space = observation_space(self.config)
        self.single_action_space = spaces.Discrete(self.config.grid.num_actions)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

        self.step_mode = resolve_step_mode(step_mode, self.params, self.device)
        self.step_kernel = core.check_step_kernel(step_kernel)

        self.state = None
        self._runner: StepRunner | None = None  # static / graph modes: built at the first step
        self._torch_gen = torch.Generator()
        self._seeded = False
        self._autoreset = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)  # (B,) restart next step
        self._truncated = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)  # (B,) never written
        self._restart_pending = False  # some env may be marked in _autoreset (known without a sync)
        self._present = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)  # info's "_<key>" masks

    # ---- Gymnasium API ---------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is not None and not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int or None (one generator drives the whole batch), got {seed!r}")
        super().reset(seed=None if seed is None else int(seed))
        if seed is not None or not self._seeded:
            self._torch_gen.manual_seed(int(self.np_random.integers(2**62)))
            self._seeded = True
        options = dict(options or {})
        unknown = sorted(set(options) - set(RESET_OPTIONS))
        if unknown:
            raise ValueError(f"unknown reset options {unknown}; known: {', '.join(RESET_OPTIONS)}")
        mask = options.pop("reset_mask", None)
        if mask is None:
            rows = torch.arange(self.num_envs, device=self.device)
        else:
            mask = torch.as_tensor(mask, device=self.device)
            if mask.dtype != torch.bool or tuple(mask.shape) != (self.num_envs,):
                raise ValueError(
                    f"options['reset_mask'] must be bool ({self.num_envs},), got {mask.dtype} {tuple(mask.shape)}"
                )
            if self.state is None:
                raise ValueError("the first reset() starts every env: call it without options['reset_mask']")
            rows = mask.nonzero()[:, 0]
            if rows.numel() == 0:
                raise ValueError("options['reset_mask'] must mark at least one env to reset")
        self._start(rows, **options)
        reset = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        reset[rows] = True
        return self._obs(), self._info(reset)

    def step(self, actions):
        if self.state is None:
            raise RuntimeError("call reset() before step()")
        action = self._actions(actions)  # (B,)
        # NEXT_STEP: envs that ended last step restart now; their action is ignored
        restart = self._autoreset if self.autoreset_mode == AutoresetMode.NEXT_STEP else None
        if self.autoreset_mode == AutoresetMode.DISABLED and bool(self.state.done.any()):
            i = int(self.state.done.nonzero()[0, 0])
            raise ValueError(
                f"env {i} has ended and autoreset_mode is DISABLED: restart it with "
                "reset(options={'reset_mask': mask}) before the next step"
            )
        # ended envs (restarting under NEXT_STEP) accept and ignore any in-range action
        if self.step_mode == "eager":
            tr = core.step(self.params, self.state, action, validate=self.validate)
            reward = self.reward_fn(tr).float()  # (B,)
            terminated = tr.terminated.clone()  # (B,)
            ended_any = None  # known only through a sync
            runner = None
        else:
            runner = self._stepper()
            tr = runner.step(action)
            reward = runner.reward if runner.reward is not None else self.reward_fn(tr).float()
            terminated = tr.terminated  # (B,) reused buffer
            ended_any = runner.num_terminated > 0
        truncated = self._truncated  # the episode length is bounded: never truncated
        info: dict[str, Any] = {}
        if restart is not None:
            if self._restart_pending:
                rows = restart.nonzero()[:, 0]
                if rows.numel():
                    reward = torch.where(restart, torch.zeros_like(reward), reward)
                    self._start(rows)
            # every marked env restarted, so _autoreset is all False here: mark the ones that ended
            if ended_any is None or ended_any:
                self._autoreset.copy_(terminated)
            self._restart_pending = bool(self._autoreset.any()) if ended_any is None else ended_any
        elif self.autoreset_mode == AutoresetMode.SAME_STEP:
            if bool(terminated.any()) if ended_any is None else ended_any:
                ended = terminated.clone()  # (B,) a fresh mask: terminated may be a reused buffer
                info = self._final(ended)
                self._start(ended.nonzero()[:, 0])
        live = runner if runner is not None and self._runner is runner else None  # the runner that stepped
        info.update(self._info(self._present, live))
        if self.return_tensors:
            return self._obs(live), reward, terminated, truncated, info
        # numpy results are fresh arrays (``.numpy()`` of a CPU tensor would share a reused buffer)
        terminated_np, truncated_np = terminated.cpu().numpy().copy(), np.zeros(self.num_envs, dtype=bool)
        return self._obs(live), reward.double().cpu().numpy(), terminated_np, truncated_np, info

    def render(self) -> tuple[np.ndarray, ...] | None:
        if self.render_mode != "rgb_array" or self.state is None:
            return None
        s, grid = self.state, self.config.grid
        frame, gazed, canvas = s.frame, s.gazed, s.canvas
        return tuple(side_by_side(frame[i], gazed[i], canvas[i], grid).cpu().numpy() for i in range(self.num_envs))

    def close_extras(self, **kwargs: Any) -> None:
        self.state = None
        self._runner = None

    # ---- helpers ---------------------------------------------------------------------------
    def _start(self, rows: torch.Tensor, video=None, clip_index=None, budgets=None) -> None:
        """Start new episodes in rows ``rows`` (int64 (M,)), replacing only those rows (in place, so
        that the step graphs stay valid; a chunk of rows at a time, see ``core.reset_rows``)."""
        M = rows.numel()
        if video is not None and clip_index is not None:
            raise ValueError("give options['video'] or options['clip_index'], not both")
        if video is not None:
            given = self._per_row(torch.as_tensor(video), rows, "video")

            def clips(lo: int, hi: int) -> torch.Tensor:
                return given[lo:hi]
        else:
            if clip_index is None:
                index = torch.randint(len(self.source), (M,), generator=self._torch_gen)
            else:
                index = self._per_row(torch.as_tensor(clip_index), rows, "clip_index")

            def clips(lo: int, hi: int) -> torch.Tensor:
                return self.source.clips(index[lo:hi].tolist())

        if budgets is not None:
            budgets = torch.as_tensor(budgets, dtype=torch.int64)
            if budgets.ndim == 2:
                budgets = self._per_row(budgets, rows, "budgets")
        if self.state is None:
            batch = clips(0, M).to(self.device)
            self.state = core.reset(self.params, batch, generator=self._torch_gen, budgets=budgets)
            self._runner = None
        else:
            core.reset_rows(self.params, self.state, rows, clips, generator=self._torch_gen, budgets=budgets)
            if self._runner is not None:
                self._runner.refresh(rows)
        self._autoreset[rows] = False

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

    def _live_runner(self) -> StepRunner | None:
        """The runner, when it holds the current observation (it steps the current state)."""
        r = self._runner
        return r if r is not None and r.matches(self.state, self.validate) else None

    def _per_row(self, value: torch.Tensor, rows: torch.Tensor, name: str) -> torch.Tensor:
        """An option given per env (B, ...) or per reset env (M, ...) -> its M reset rows."""
        if value.ndim and value.shape[0] == self.num_envs:
            return value[rows.to(value.device)]
        if value.ndim and value.shape[0] == rows.numel():
            return value
        raise ValueError(
            f"options[{name!r}] needs one entry per env ({self.num_envs}) or per reset env ({rows.numel()}), "
            f"got shape {tuple(value.shape)}"
        )

    def _actions(self, actions) -> torch.Tensor:
        action = torch.as_tensor(actions, device=self.device)
        if tuple(action.shape) != (self.num_envs,):
            raise ValueError(f"expected one action per env, shape ({self.num_envs},), got {tuple(action.shape)}")
        if action.dtype.is_floating_point or action.dtype == torch.bool or action.is_complex():
            N = self.config.grid.num_patches
            raise ValueError(f"actions must be integers in [0, {N}], got dtype {action.dtype}")
        return action.to(torch.int64)

    def _convert(self, batch: dict[str, torch.Tensor], reused: bool = False) -> dict[str, Any]:
        """Tensors as they are (``return_tensors``) or fresh numpy arrays; ``reused``: the tensors
        are the runner's buffers, which ``.numpy()`` of a CPU tensor would share."""
        if self.return_tensors:
            return batch
        if reused and self.device.type == "cpu":
            batch = {k: v.clone() for k, v in batch.items()}
        return to_numpy(batch)

    def _obs(self, runner: StepRunner | None = None) -> dict[str, Any]:
        """The observation; ``runner``: the live runner when the caller knows it (skips the check)."""
        runner = runner or self._live_runner()
        if runner is not None:
            return self._convert(dict(runner.obs), reused=True)
        return self._convert(core.observe(self.params, self.state))

    def _info(self, present: torch.Tensor, runner: StepRunner | None = None) -> dict[str, Any]:
        runner = runner or self._live_runner()
        info = dict(runner.info) if runner is not None else core.info(self.params, self.state)
        info.update({f"_{k}": present for k in list(info)})
        return self._convert(info, reused=runner is not None)

    def _final(self, ended: torch.Tensor) -> dict[str, Any]:
        """``final_obs`` / ``final_info`` of the envs in ``ended`` (B,) bool, before they reset."""
        obs = core.observe(self.params, self.state)
        info = core.info(self.params, self.state)
        if self.return_tensors:
            return {"final_obs": obs, "_final_obs": ended, "final_info": info, "_final_info": ended}
        ended_np = ended.cpu().numpy()
        final_obs = np.full(self.num_envs, None, dtype=object)
        for i in np.flatnonzero(ended_np):
            final_obs[i] = to_numpy(obs, int(i))
        final_info = to_numpy(info)
        final_info.update({f"_{k}": ended_np for k in info})
        return {"final_obs": final_obs, "_final_obs": ended_np, "final_info": final_info, "_final_info": ended_np}
