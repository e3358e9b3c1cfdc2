"""Stepping a batch with ``core.StaticStep``, replayed as CUDA graphs: what the batched front-ends
(``AutoGazeVectorEnv``, ``AutoGazeTorchEnv``) run on CUDA.

Step modes (the front-ends' ``step_mode`` argument):

- ``"eager"``: ``core.step``, the reference. Its shapes follow the data (the rows that gazed at
  each scale, the rows whose frame ended), so every step pays host syncs and a few hundred
  kernel launches.
- ``"static"``: ``core.StaticStep`` run op by op, on any device: the same transitions with fixed
  shapes. For tests (it runs on CPU) and for debugging the graph mode.
- ``"graph"``: ``core.StaticStep`` captured once as CUDA graphs (the step, and the frame-end work
  of a fixed number of rows for each pass size) and replayed every step. CUDA only.
- ``"auto"`` (default): ``"graph"`` on CUDA when the configuration allows the static step (the
  paste reconstructor and a per-pixel loss: l1, mse or psnr, see
  ``core.static_step_unsupported``), else ``"eager"``.

A step of ``StepRunner`` copies the actions in, replays the step graph (the step and the frame-end
work of the first ``capacity`` rows that moved to a new frame), reads back three counters (the one
host sync: were all actions valid, how many rows moved, how many episodes ended) and, when more
than ``capacity`` rows moved, replays frame-end graphs of fixed sizes (``core.pass_sizes``) until
they covered them (``core.plan_passes``). On CUDA the step's bookkeeping and the observation are
a few CuPy kernels (``kernel``, see ``core.StaticStep``): the step graph holds about 25 kernels
instead of 100, and in a graph each kernel costs microseconds however little it does.
Observations, infos and the built-in rewards are written by the graphs into tensors the runner
owns and reuses every step (``obs``, ``info``, ``reward``): the ``frame`` buffer changes only in
the rows that moved to a new frame, the ``canvas`` buffer only where a gaze pasted. The
front-ends hand these buffers out as they are where their API allows it (the vector env with
``return_tensors``: copy what you keep) and copy them where it does not (numpy observations,
TorchRL tensordicts).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

from gaze_env import core
from gaze_env.core import CoreParams
from gaze_env.types import GazeState, Transition
from rewards.base import DenseReward, FrameReward, RewardFn

STEP_MODES = ("auto", "eager", "static", "graph")


def resolve_step_mode(step_mode: str, params: CoreParams, device: torch.device) -> str:
    """The step mode a front-end runs: ``step_mode`` with ``"auto"`` resolved (see the module
    docstring); raises ``ValueError`` for a mode this configuration or device cannot run."""
    if step_mode not in STEP_MODES:
        raise ValueError(f"step_mode must be one of {STEP_MODES}, got {step_mode!r}")
    reason = core.static_step_unsupported(params)
    if step_mode == "auto":
        return "graph" if device.type == "cuda" and reason is None else "eager"
    if step_mode in ("static", "graph") and reason is not None:
        raise ValueError(f"step_mode={step_mode!r} needs the static step, which cannot run here: {reason}")
    if step_mode == "graph" and device.type != "cuda":
        raise ValueError(f"step_mode='graph' captures CUDA graphs and needs a CUDA device, got {device}")
    return step_mode


def _graph_reward(reward_fn: RewardFn) -> bool:
    """Built-in rewards are element-wise tensor ops on the transition: safe inside a graph. Other
    rewards (a user's callable may read values back to the host) run eagerly after the replay."""
    return type(reward_fn) in (FrameReward, DenseReward)


def _pointers(state: GazeState) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in state._tensors().values())


class StepRunner:
    """Steps one ``GazeState`` with ``core.StaticStep``, captured as CUDA graphs or run op by op.

    Attributes (tensors written in place every step; copy what you keep):
        obs: ``frame`` / ``canvas`` (B, 3, H, W) uint8, ``gazed`` (B, N) bool, ``frame_index`` and
            ``gazes_left`` (B,) int64, ``action_mask`` (B, N + 1) bool, as ``core.observe``.
        info: ``loss`` (B,), ``gazes_this_frame`` (B,), ``frame_loss`` (B, T), ``gazing_ratio``
            (B,), as ``core.info``.
        reward: (B,) float32 for the built-in rewards (``frame``, ``dense``), None otherwise (the
            caller then scores the transition eagerly).
        num_terminated: episodes that ended in the last step (read back with the step's flags).

    Args:
        state: the batch; its tensors must keep their storage (``core.reset_rows`` does) or the
            runner no longer ``matches`` it and a new one must be built.
        reward_fn: the env's reward.
        validate: a batch with an invalid action raises ``ValueError`` and changes nothing.
        capture: capture CUDA graphs (``state`` on CUDA); False runs the same code op by op.
        capacity: rows of the frame-end pass inside every step (default ``core.frame_end_capacity``);
            more moved rows take more passes (``core.pass_sizes``).
        kernel: ``core.StaticStep``'s: its bookkeeping and the observation in the CuPy step kernels
            (``"auto"``, where they run; ``"cupy"``) or in torch ops (``"torch"``).
    """

    def __init__(
        self,
        params: CoreParams,
        state: GazeState,
        reward_fn: RewardFn,
        *,
        validate: bool = True,
        capture: bool = False,
        capacity: int | None = None,
        kernel: str = "auto",
    ) -> None:
        if capture and state.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA state, got one on {state.device}")
        self.params, self.state, self.reward_fn, self.validate = params, state, reward_fn, bool(validate)
        B, device = state.batch_size, state.device
        N, T = params.config.grid.num_patches, params.config.num_frames
        image = lambda: torch.empty_like(state.canvas)  # noqa: E731
        self.obs = {
            "frame": image(),
            "canvas": image(),
            "gazed": torch.zeros(B, N, dtype=torch.bool, device=device),
            "frame_index": torch.zeros(B, dtype=torch.int64, device=device),
            "gazes_left": torch.zeros(B, dtype=torch.int64, device=device),
            "action_mask": torch.zeros(B, N + 1, dtype=torch.bool, device=device),
        }
        self.info = {
            "loss": torch.zeros(B, device=device),
            "gazes_this_frame": torch.zeros(B, dtype=torch.int64, device=device),
            "frame_loss": torch.zeros(B, T, device=device),
            "gazing_ratio": torch.zeros(B, device=device),
        }
        self.reward = torch.zeros(B, device=device) if _graph_reward(reward_fn) else None
        self.num_terminated = 0
        self.static = core.StaticStep(
            params,
            state,
            validate=validate,
            capacity=capacity,
            frame_out=self.obs["frame"],
            canvas_out=self.obs["canvas"],
            kernel=kernel,
        )
        self._pointers = _pointers(state)
        self._graphs: dict[int | str, torch.cuda.CUDAGraph] | None = None  # "step" and one per pass size
        self.refresh()
        if capture:
            self._capture()

    @property
    def captured(self) -> bool:
        """True when the steps replay CUDA graphs (False: op by op)."""
        return self._graphs is not None

    @property
    def capacity(self) -> int:
        return self.static.capacity

    def matches(self, state: GazeState, validate: bool) -> bool:
        """Whether this runner still steps ``state`` (same tensors, same storage) with ``validate``."""
        return state is self.state and self.validate == bool(validate) and _pointers(state) == self._pointers

    # ---- stepping --------------------------------------------------------------------------
    def step(self, action: torch.Tensor) -> Transition:
        """Apply ``action`` (B,) int64 to every row; returns the (reused) transition. Raises
        ``ValueError`` naming the first invalid action (with ``validate``; nothing changed then)."""
        static = self.static
        static.action.copy_(action)
        if self._graphs is not None:
            self._graphs["step"].replay()
        else:
            self._step_fn()
        ok, moved, terminated = static.flags.tolist()  # the step's one host sync
        if not ok:
            message = core.invalid_action_message(self.params, self.state, static.action)
            raise ValueError(message or "invalid action")
        if moved > static.capacity:  # the step itself did the first pass (see _step_fn)
            self._more_frame_ends(moved)
        self.num_terminated = terminated
        return static.transition

    def _more_frame_ends(self, moved: int) -> None:
        """The frame-end passes of the moved rows past the first ``capacity`` (``moved`` in all)."""
        static, offset = self.static, self.static.capacity
        for size in core.plan_passes(moved - offset, static.sizes):
            static.offset.fill_(offset)
            if self._graphs is not None:
                self._graphs[size].replay()
            else:
                self._frame_end_fn(size)
            offset += size

    def refresh(self, rows: torch.Tensor | None = None) -> None:
        """Rebuild the observation and info buffers from the state after it changed outside a step
        (rows ``rows`` (int64 (M,)) restarted, or all rows when None)."""
        s = self.state
        if rows is None:
            self.obs["frame"].copy_(s.frame)
            self.obs["canvas"].copy_(s.canvas)
        elif rows.numel():
            self.obs["frame"][rows] = s.video[rows, s.frame_t[rows]]
            self.obs["canvas"][rows] = s.canvas[rows]
        self._observe()

    # ---- what the graphs hold --------------------------------------------------------------
    def _observe(self) -> None:
        if self.static.kernels:
            from rewards import cuda

            cuda.observe_rows(self.state, self.obs, self.info, self.params.config.min_gazes_per_frame)
        else:
            core.observe_flags(self.params, self.state, out=self.obs)
            core.info(self.params, self.state, out=self.info)

    def _step_fn(self) -> None:
        """The step and its first frame-end pass (the first ``capacity`` moved rows, usually all of
        them): one graph, so the GPU does not wait for the host between the two."""
        self.static.run()
        if self.reward is not None:
            self.reward.copy_(self.reward_fn(self.static.transition).float())
        self.static.frame_ends()
        self._observe()

    def _frame_end_fn(self, size: int) -> None:
        self.static.frame_ends(size)
        self.info["loss"].copy_(self.state.loss)  # the moved rows were rescored

    def _capture(self) -> None:
        """Capture ``_step_fn`` and ``_frame_end_fn`` (one graph per pass size) as CUDA graphs. A
        warm-up on a copy of two rows first compiles and loads the CuPy kernels, checks them and
        caches the device tables and streams (capture records kernels; it must not compile, create
        streams or copy from the host); the real state is not touched until the first replay. Falls
        back to op-by-op steps, with a warning, if the capture fails."""
        device = self.state.device
        scratch_rows = min(2, self.state.batch_size)
        scratch = StepRunner(
            self.params,
            self.state[:scratch_rows].clone(),
            self.reward_fn,
            validate=self.validate,
            capture=False,
            capacity=1,
            kernel="cupy" if self.static.kernels else "torch",
        )
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            scratch._step_fn()
            scratch._frame_end_fn(1)
        torch.cuda.current_stream(device).wait_stream(side)
        del scratch
        functions: dict[int | str, Callable[[], None]] = {"step": self._step_fn}
        functions.update({size: functools.partial(self._frame_end_fn, size) for size in self.static.sizes})
        try:
            graphs = {}
            for key, fn in functions.items():
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                graphs[key] = graph
        except RuntimeError as e:
            warnings.warn(f"CUDA graph capture failed, stepping op by op instead: {e}", stacklevel=3)
            return
        self._graphs = graphs
