"""The batched gazing MDP: all dynamics, written once over ``GazeState``.

Pure-ish torch functions, batch-first and device-agnostic: ``reset`` builds the state of ``B``
episodes, ``step`` applies ``B`` actions in place and returns the ``Transition``, ``action_mask``
and ``observe`` read the state. The Gymnasium, vector and TorchRL environments are thin
front-ends over these functions; nothing here loops over the batch in Python.

``step`` is the reference: its shapes follow the data (the rows that gazed at each scale, the rows
whose frame ended), which costs host syncs. ``StaticStep`` is the same transition with fixed shapes
and no host sync, so that it can be captured as a CUDA graph (``gaze_env.graph``); tests prove the
two equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gaze_env.config import GazeEnvConfig
from gaze_env.types import GazeState, Transition
from rewards.losses import LossFn, summed_pixel_error
from rewards.reconstruct import PasteReconstructor, Reconstructor


@dataclass(frozen=True)
class CoreParams:
    """Everything fixed for the life of an environment: the MDP config, the reconstructor and the
    per-frame loss the state tracks (the reward function's ``loss``)."""

    config: GazeEnvConfig
    reconstructor: Reconstructor
    loss: LossFn

    @classmethod
    def build(cls, config: GazeEnvConfig, loss: LossFn, reconstructor: Reconstructor | None = None) -> CoreParams:
        return cls(config, reconstructor if reconstructor is not None else PasteReconstructor(config.grid), loss)


# ---- scoring ---------------------------------------------------------------------------------
def _pixel_scores(params: CoreParams, target: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, 3, H, W) uint8 frames and reconstructions -> summed pixel error (M,) float64 and loss
    (M,) float32 of a pixel loss (one with ``pixel_error`` and ``reduce``)."""
    err = summed_pixel_error(params.loss.pixel_error, target, recon)  # (M,) float64
    return err, params.loss.reduce(err / target[0].numel()).float()


def _score_rows(params: CoreParams, state: GazeState, rows: torch.Tensor) -> None:
    """Recompute ``loss`` (and ``err_sum``) of rows ``rows`` (int64 (M,)) from scratch."""
    if rows.numel() == 0:
        return
    target = state.video[rows, state.frame_t[rows]]  # (M, 3, H, W) uint8
    if getattr(params.loss, "pixel_error", None) is not None:
        state.err_sum[rows], state.loss[rows] = _pixel_scores(params, target, state.canvas[rows])
    else:
        state.loss[rows] = params.loss(target.float().div_(255), state.canvas[rows].float().div_(255)).float()


def _all_rows(state: GazeState) -> torch.Tensor:
    return torch.arange(state.batch_size, device=state.device)


# ---- reset -----------------------------------------------------------------------------------
def reset(
    params: CoreParams,
    video: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    budgets: torch.Tensor | None = None,
) -> GazeState:
    """Start ``B`` episodes.

    Args:
        video: (B, T, 3, H, W) uint8 clips, ``T`` and ``H = W`` as the config says.
        generator: draws the frames the ``frame`` reward scores (when ``reward_frame_rate < 1``).
        budgets: (B, T) int64 per-frame gaze budgets overriding the config's.
    """
    cfg = params.config
    N, H, T = cfg.grid.num_patches, cfg.frame_size, cfg.num_frames
    if video.dtype != torch.uint8 or video.ndim != 5 or tuple(video.shape[1:]) != (T, 3, H, H):
        raise ValueError(
            f"video must be uint8 (B, {T}, 3, {H}, {H}) for this config, got {video.dtype} {tuple(video.shape)}"
        )
    B, device = video.shape[0], video.device
    if budgets is None:
        budgets = torch.tensor(cfg.budgets, device=device).expand(B, T).clone()
    else:
        budgets = torch.as_tensor(budgets, dtype=torch.int64, device=device).expand(B, T).clone()
        lo = max(1, cfg.min_gazes_per_frame)
        if bool(((budgets < lo) | (budgets > N)).any()):
            raise ValueError(f"budgets must lie in [{lo}, {N}], got {budgets.min().item()}..{budgets.max().item()}")
    if cfg.reward_frame_rate >= 1.0:
        reward_frames = torch.ones(B, T, dtype=torch.bool, device=device)
    else:
        m = max(1, round(cfg.reward_frame_rate * T))
        gen_device = generator.device if generator is not None else device
        order = torch.rand(B, T, generator=generator, device=gen_device).argsort(dim=1)[:, :m].to(device)  # (B, m)
        reward_frames = torch.zeros(B, T, dtype=torch.bool, device=device).scatter_(1, order, True)
    nan = torch.full((B, T), float("nan"), device=device)
    state = GazeState(
        video=video,
        t=torch.zeros(B, dtype=torch.int64, device=device),
        history=torch.zeros(B, T, N, dtype=torch.bool, device=device),
        counts=torch.zeros(B, T, dtype=torch.int64, device=device),
        budgets=budgets,
        reward_frames=reward_frames,
        canvas=torch.empty(B, 3, H, H, dtype=torch.uint8, device=device),
        loss=torch.zeros(B, device=device),
        err_sum=torch.zeros(B, dtype=torch.float64, device=device),
        frame_start_loss=nan,
        frame_loss=nan.clone(),
        steps=torch.zeros(B, dtype=torch.int64, device=device),
        done=torch.zeros(B, dtype=torch.bool, device=device),
        aux={},
    )
    params.reconstructor.init(state)
    _score_rows(params, state, _all_rows(state))
    state.frame_start_loss[:, 0] = state.loss
    return state


RESET_CHUNK_ROWS = 256
"""Rows ``reset_rows`` starts at a time: bounds the memory of the new rows' temporary state."""


def reset_rows(
    params: CoreParams,
    state: GazeState,
    rows: torch.Tensor,
    clips: Callable[[int, int], torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    budgets: torch.Tensor | None = None,
    chunk_rows: int = RESET_CHUNK_ROWS,
) -> None:
    """Start new episodes in rows ``rows`` (int64 (M,)) of ``state``, in place: the other rows and
    every tensor's storage stay (a CUDA graph captured on ``state`` stays valid).

    Rows are started ``chunk_rows`` at a time, so that resetting all of a large batch needs the
    memory of one chunk, not of a second state.

    Args:
        clips: ``clips(lo, hi)`` -> the uint8 clips (hi - lo, T, 3, H, W) of ``rows[lo:hi]``.
        generator, budgets: as for ``reset``; ``budgets`` (T,) for every row or (M, T) per row.
    """
    M = rows.numel()
    for lo in range(0, M, chunk_rows):
        hi = min(M, lo + chunk_rows)
        part = budgets[lo:hi] if budgets is not None and budgets.ndim == 2 else budgets
        new = reset(params, clips(lo, hi).to(state.device), generator=generator, budgets=part)
        state.assign(rows[lo:hi], new)


# ---- masks and validation --------------------------------------------------------------------
def _at_frame(x: torch.Tensor, t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's entry of its frame ``t``: ``x`` (B, T, ...) and ``t`` (B,) int64 in [0, T) ->
    (B, ...), one gather (into ``out`` (B, ...) when given)."""
    index = t.view(-1, *([1] * (x.ndim - 1))).expand(x.shape[0], 1, *x.shape[2:])  # (B, 1, ...)
    return torch.gather(x, 1, index, out=None if out is None else out.unsqueeze(1)).squeeze(1)


def _mask(
    gazed: torch.Tensor, num_gazed: torch.Tensor, live: torch.Tensor, min_gazes: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``action_mask`` from ``gazed`` (B, N) bool, ``num_gazed`` (B,) int64 and ``live`` (B,) bool
    (episode not ended), into ``out`` (B, N + 1) bool when given."""
    B, N = gazed.shape
    mask = torch.empty(B, N + 1, dtype=torch.bool, device=gazed.device) if out is None else out
    torch.gt(live[:, None], gazed, out=mask[:, :N])  # live and not gazed, in one op
    torch.bitwise_and(num_gazed >= min_gazes, live, out=mask[:, N])
    return mask


def action_mask(params: CoreParams, state: GazeState) -> torch.Tensor:
    """(B, N + 1) bool: valid actions (ungazed patches of the current frame; STOP once the frame
    has ``min_gazes_per_frame`` gazes). All False after the episode ended."""
    t = state.frame_t
    gazed, num_gazed = _at_frame(state.history, t), _at_frame(state.counts, t)
    return _mask(gazed, num_gazed, ~state.done, params.config.min_gazes_per_frame)


def valid_actions(params: CoreParams, state: GazeState, action: torch.Tensor) -> torch.Tensor:
    """(B,) bool: each row's action is valid. Episodes that ended accept (and ignore) any in-range
    action, so ragged batches can run on."""
    N = params.config.grid.num_patches
    in_range = (action >= 0) & (action <= N)
    ok = action_mask(params, state).gather(1, action.clamp(0, N)[:, None])[:, 0]
    return (ok | state.done) & in_range


def invalid_action_message(params: CoreParams, state: GazeState, action: torch.Tensor) -> str | None:
    """Why the first invalid action of the batch is invalid, or None when all are valid.
    Episodes that ended accept (and ignore) any in-range action, so ragged batches can run on."""
    N = params.config.grid.num_patches
    bad_range = (action < 0) | (action > N)
    ok = valid_actions(params, state, action)
    if bool(ok.all()):
        return None
    i = int((~ok).nonzero()[0, 0])
    a, where = int(action[i]), f"env {i}" if state.batch_size > 1 else "the env"
    if bool(bad_range[i]):
        return f"action {a} in {where} is out of range: actions are 0..{N - 1} (patches) and {N} (STOP)"
    t, n = int(state.t[i]), int(state.num_gazed[i])
    if a == N:
        return (
            f"STOP in {where} after {n} gaze(s) in frame {t}: at least "
            f"min_gazes_per_frame={params.config.min_gazes_per_frame} are needed first"
        )
    return f"patch {a} in {where} was already gazed in frame {t}: a patch may be gazed once per frame"


# ---- step ------------------------------------------------------------------------------------
def step(params: CoreParams, state: GazeState, action: torch.Tensor, *, validate: bool = True) -> Transition:
    """Apply one action per episode, in place.

    A patch action gazes it in the current frame and updates the reconstruction and loss. The
    frame ends on STOP or when its budget is used up; the next frame then starts from the carried
    reconstruction, and after the last frame the episode terminates. Ended episodes ignore their
    action. With ``validate`` an invalid action raises ``ValueError`` (no state change).
    """
    cfg = params.config
    N, T = cfg.grid.num_patches, cfg.num_frames
    action = torch.as_tensor(action, dtype=torch.int64, device=state.device).reshape(-1)
    if action.shape[0] != state.batch_size:
        raise ValueError(f"expected {state.batch_size} actions, got {action.shape[0]}")
    if validate:
        msg = invalid_action_message(params, state, action)
        if msg is not None:
            raise ValueError(msg)
    B = state.batch_size
    b = _all_rows(state)
    active = ~state.done  # (B,)
    is_gaze = active & (action < N)  # (B,)
    t = state.frame_t  # (B,)
    loss_before = state.loss.clone()

    patch = action.clamp(0, N - 1)
    state.history[b, t, patch] |= is_gaze
    state.counts[b, t] += is_gaze
    pixel_error = getattr(params.loss, "pixel_error", None)
    delta = params.reconstructor.gaze(state, action, is_gaze, pixel_error)
    if delta is not None:
        state.err_sum += delta
        numel = state.canvas[0].numel()
        state.loss = torch.where(is_gaze, params.loss.reduce(state.err_sum / numel).float(), state.loss)
    else:
        _score_rows(params, state, is_gaze.nonzero()[:, 0])
    frame_end = active & ((action == N) | (state.counts[b, t] >= state.budgets[b, t]))  # (B,)
    # optional hook: a reconstructor too costly to run per gaze (the learned MAE) scores frame ends
    end_frame = getattr(params.reconstructor, "end_frame", None)
    if end_frame is not None and bool(frame_end.any()):
        ending = frame_end.nonzero()[:, 0]
        state.loss[ending] = end_frame(state, ending, params.loss).to(state.loss.dtype)
    loss_after = state.loss.clone()
    state.steps += active

    state.frame_loss[b, t] = torch.where(frame_end, loss_after, state.frame_loss[b, t])
    scored = frame_end & state.reward_frames[b, t]
    state.t += frame_end
    terminated = frame_end & (state.t >= T)
    state.done |= terminated
    next_start = torch.full((B,), float("nan"), device=state.device)
    moved = (frame_end & ~terminated).nonzero()[:, 0]  # (M,)
    if moved.numel():
        params.reconstructor.begin_frame(state, moved)
        _score_rows(params, state, moved)
        state.frame_start_loss[moved, state.t[moved]] = state.loss[moved]
        next_start[moved] = state.loss[moved]
    return Transition(
        action=action,
        is_gaze=is_gaze,
        frame_index=t,
        loss_before=loss_before,
        loss_after=loss_after,
        frame_end=frame_end,
        scored=scored,
        next_start_loss=next_start,
        terminated=terminated,
        state=state,
    )


# ---- the static step: fixed shapes, no host syncs --------------------------------------------
def static_step_unsupported(params: CoreParams) -> str | None:
    """Why ``StaticStep`` cannot run with these parameters, or None when it can."""
    recon = params.reconstructor
    if getattr(recon, "end_frame", None) is not None:
        return f"the reconstructor {type(recon).__name__} scores frame ends itself (end_frame)"
    for method in ("gaze_static", "begin_frame_static"):
        if not callable(getattr(recon, method, None)):
            return f"the reconstructor {type(recon).__name__} has no {method}() (PasteReconstructor has)"
    if getattr(params.loss, "pixel_error", None) is None or getattr(params.loss, "reduce", None) is None:
        name = getattr(params.loss, "name", getattr(params.loss, "__name__", type(params.loss).__name__))
        return (
            f"the loss {name!r} is not a per-pixel loss (pixel_error / reduce, as l1, mse, psnr): "
            "it would be recomputed over every frame at every gaze"
        )
    return None


def frame_end_capacity(config: GazeEnvConfig, batch_size: int) -> int:
    """Default pass of ``StaticStep.frame_ends`` that every step runs (``gaze_env.graph``): twice the
    rows expected to end a frame per step once episodes drift apart (``B / budget``), at least 8, at
    most ``B``. More rows than that (episodes ending frames in lockstep) take more passes."""
    return max(1, min(batch_size, max(8, math.ceil(2 * batch_size / min(config.budgets)))))


def pass_sizes(capacity: int, batch_size: int | None = None) -> tuple[int, ...]:
    """The pass sizes of ``StaticStep.frame_ends``, descending: ``capacity`` times 4, 16, ... up to
    ``batch_size`` (for frames ending in lockstep, e.g. episodes started together), ``capacity``,
    then a quarter of it, and so on down to 1 (a pass costs its size whatever number of its rows
    moved)."""
    larger = []
    if batch_size is not None:
        while (larger[-1] if larger else capacity) < batch_size:
            larger.append(min(batch_size, 4 * (larger[-1] if larger else capacity)))
    sizes = [capacity]
    while sizes[-1] > 1:
        sizes.append(math.ceil(sizes[-1] / 4))
    return tuple(reversed(larger)) + tuple(sizes)


def plan_passes(moved: int, sizes: tuple[int, ...]) -> list[int]:
    """Pass sizes (from ``sizes``, descending) that cover ``moved`` rows, wasting at most half of
    each pass: the smallest size holding the rest when that is at most twice the rest, else the
    largest size under it."""
    plan, left = [], moved
    while left > 0:
        holding = [s for s in sizes if s >= left]
        if holding and holding[-1] <= 2 * left:
            take = holding[-1]
        else:
            take = next((s for s in sizes if s <= left), sizes[-1])
        plan.append(take)
        left -= take
    return plan


class StaticStep:
    """``step`` with fixed shapes and no host sync, over persistent tensors: CUDA-graph capturable.

    The same transitions and states as ``step`` (the tests compare them on every field), computed
    without reading anything back to the host, so that ``run`` and ``frame_ends`` can each be
    captured once as a CUDA graph and replayed every step (``gaze_env.graph``):

    - ``run()`` reads the actions from ``action`` (B,) int64, updates ``state`` in place and writes
      the transition into the persistent tensors of ``transition``. The paste and the incremental
      loss use the reconstructor's ``gaze_static`` (every row, masked).
    - Validation cannot raise inside a graph. With ``validate``, a batch holding an invalid action
      changes nothing (every row acts as ended) and ``flags[0]`` is 0: the caller then raises with
      ``invalid_action_message`` on the untouched state.
    - The frame-end work (the new frame's scale views, rescoring the carried canvas) is for the rows
      that moved to a new frame, a data-dependent set: ``run()`` orders those rows first in ``order``
      and counts them in ``flags[1]``; ``frame_ends()`` does the work for the first ``capacity`` of
      them, ``frame_ends(size)`` for the ``size`` moved rows from ``offset`` on (the other rows of
      its fixed-size slice write back what they read), ``size`` one of ``sizes``. The caller runs
      ``frame_ends()`` and then, when more rows moved, the passes ``plan_passes(flags[1] - capacity,
      sizes)``, advancing ``offset`` (from ``capacity``) by each pass's size.
    - ``flags[2]`` counts the episodes that terminated.

    Every per-row quantity is read and written with one gather or scatter at the row's frame (no
    advanced indexing) and written straight into its output tensor where it has one: each op is a
    kernel of its own in the graph, and their count, not their bytes, bounds the step's time. On
    CUDA the bookkeeping (everything but the paste, the frame starts and the loss's ``reduce``) can
    run instead as a few CuPy kernels (``rewards.cuda``: ``step_check``, ``step_gaze``,
    ``step_post``, ``step_order``, ``frame_start``), one thread per row, of which this torch code
    is the reference (``kernel``; ``kernels`` says which runs).

    Args:
        state: the batch it steps (its tensors are read and written in place, never replaced;
            ``history`` contiguous).
        validate: gate the step on every action being valid (see above).
        capacity: the rows of ``frame_ends()`` (default ``frame_end_capacity``); ``sizes`` are
            ``pass_sizes(capacity, B)``, larger ones for frames that end in lockstep.
        frame_out, canvas_out: optional (B, 3, H, W) uint8 observation buffers kept equal to the
            current frame and to the canvas (written only where they change).
        kernel: ``"auto"`` (default): the step kernels where they run (a CUDA state, CuPy
            imports, see ``rewards.cuda.step_unsupported``), else the torch code; ``"cupy"``: the
            same, warning when they cannot run; ``"torch"``: always the torch code.
    """

    def __init__(
        self,
        params: CoreParams,
        state: GazeState,
        *,
        validate: bool = True,
        capacity: int | None = None,
        frame_out: torch.Tensor | None = None,
        canvas_out: torch.Tensor | None = None,
        kernel: str = "auto",
    ) -> None:
        reason = static_step_unsupported(params)
        if reason is not None:
            raise ValueError(f"the static step cannot run here: {reason}")
        if not state.history.is_contiguous():
            raise ValueError(f"the static step needs a contiguous state.history, got strides {state.history.stride()}")
        B, device = state.batch_size, state.device
        C = frame_end_capacity(params.config, B) if capacity is None else int(capacity)
        if not 1 <= C <= B:
            raise ValueError(f"capacity must lie in [1, B={B}], got {C}")
        self.params, self.state, self.validate, self.capacity = params, state, bool(validate), C
        self.sizes = pass_sizes(C, B)
        self.frame_out, self.canvas_out = frame_out, canvas_out
        self.kernels = _step_kernels(kernel, state)
        self.action = torch.full((B,), params.config.grid.num_patches, dtype=torch.int64, device=device)  # input
        self.flags = torch.zeros(3, dtype=torch.int64, device=device)  # all valid, rows moved, rows terminated
        self.order = torch.arange(B, device=device)  # (B,) moved rows first
        self.offset = torch.zeros((), dtype=torch.int64, device=device)  # input of frame_ends(size)
        self._rows = torch.arange(B, device=device)
        self._slots = {size: torch.arange(size, device=device) for size in self.sizes}
        self._delta = torch.zeros(B, dtype=torch.float64, device=device)
        self._all_valid = torch.ones((), dtype=torch.bool, device=device)  # go without validation
        self._events = torch.zeros(2, B, dtype=torch.int64, device=device)  # step kernels: moved, terminated
        self._first_valid = torch.zeros(C, dtype=torch.bool, device=device)  # step kernels: frame_ends()' valid
        flag = lambda: torch.zeros(B, dtype=torch.bool, device=device)  # noqa: E731
        real = lambda: torch.zeros(B, dtype=torch.float32, device=device)  # noqa: E731
        self.transition = Transition(
            action=self.action,
            is_gaze=flag(),
            frame_index=torch.zeros(B, dtype=torch.int64, device=device),
            loss_before=real(),
            loss_after=real(),
            frame_end=flag(),
            scored=flag(),
            next_start_loss=real(),
            terminated=flag(),
            state=state,
        )

    def run(self) -> None:
        """One step of every row (see the class docstring); the frame-end work is left to
        ``frame_ends``."""
        if self.kernels:
            self._run_with_kernels()
            return
        params, state, tr = self.params, self.state, self.transition
        B, N, T = state.batch_size, params.config.grid.num_patches, params.config.num_frames
        action = self.action
        t = torch.clamp(state.t, max=T - 1, out=tr.frame_index)  # (B,) the frame acted in
        at_t = t[:, None]  # (B, 1) index of the frame in (B, T) tensors
        history = state.history.view(B, T * N)  # (B, T N): (frame, patch) cells
        cell = torch.add(action.clamp(0, N - 1), t, alpha=N)[:, None]  # (B, 1) cell of (t, patch)
        seen = history.gather(1, cell)  # (B, 1) bool: the patch was gazed in frame t
        num_gazed = state.counts.gather(1, at_t)  # (B, 1) int64: gazes so far in frame t
        stop = action == N  # (B,)
        if self.validate:
            # valid_actions without the full mask: STOP after the minimum, an ungazed patch, or any
            # action of an ended episode; in range in every case
            ok = torch.where(stop, num_gazed[:, 0] >= params.config.min_gazes_per_frame, ~seen[:, 0]) | state.done
            go = (ok & (action.clamp(0, N) == action)).all()  # () bool
            live = torch.gt(go, state.done)  # (B,) go and not ended, in one op
        else:
            go = self._all_valid
            live = ~state.done
        is_gaze = torch.bitwise_and(live, action < N, out=tr.is_gaze)  # (B,)
        tr.loss_before.copy_(state.loss)

        history.scatter_(1, cell, seen | is_gaze[:, None])
        num_gazed = num_gazed + is_gaze[:, None]  # (B, 1) gazes in frame t after this step
        state.counts.scatter_(1, at_t, num_gazed)
        pixel_error = params.loss.pixel_error
        delta = params.reconstructor.gaze_static(
            state, action, is_gaze, pixel_error, canvas_out=self.canvas_out, delta_out=self._delta
        )
        state.err_sum += delta
        numel = state.canvas[0].numel()
        torch.where(is_gaze, params.loss.reduce(state.err_sum / numel).float(), state.loss, out=state.loss)
        budget = state.budgets.gather(1, at_t)  # (B, 1)
        frame_end = torch.bitwise_and(live, stop | (num_gazed >= budget)[:, 0], out=tr.frame_end)  # (B,)
        tr.loss_after.copy_(state.loss)
        state.steps += live

        ended_loss = torch.where(frame_end[:, None], state.loss[:, None], state.frame_loss.gather(1, at_t))  # (B, 1)
        state.frame_loss.scatter_(1, at_t, ended_loss)
        torch.bitwise_and(frame_end, state.reward_frames.gather(1, at_t)[:, 0], out=tr.scored)
        state.t += frame_end
        terminated = torch.bitwise_and(frame_end, state.t >= T, out=tr.terminated)  # (B,)
        state.done |= terminated
        tr.next_start_loss.fill_(float("nan"))

        # order the rows that moved to a new frame first (stable), the others after them
        moved = frame_end ^ terminated  # (B,) bool: terminated rows ended a frame too
        moved_so_far = moved.cumsum(0)  # (B,) int64: moved rows up to each row, itself included
        n_moved = moved_so_far[-1]
        position = torch.where(moved, moved_so_far - 1, self._rows + n_moved - moved_so_far)  # (B,)
        self.order.scatter_(0, position, self._rows)
        torch.stack([go, n_moved, terminated.sum()], out=self.flags)

    def _run_with_kernels(self) -> None:
        """``run`` with its bookkeeping in the step kernels (the torch code of ``run`` is their
        reference, op for op); the paste and the loss's ``reduce`` as there."""
        from rewards import cuda

        params, state, tr = self.params, self.state, self.transition
        self.flags[0].fill_(1)
        if self.validate:
            cuda.step_check(state, self.action, self.flags, params.config.min_gazes_per_frame)
        cuda.step_gaze(state, self.action, self.flags, tr)
        delta = params.reconstructor.gaze_static(
            state, self.action, tr.is_gaze, params.loss.pixel_error, canvas_out=self.canvas_out, delta_out=self._delta
        )
        state.err_sum += delta
        new_loss = params.loss.reduce(state.err_sum / state.canvas[0].numel()).float()  # (B,)
        cuda.step_post(state, self.action, self.flags, new_loss, tr, self._events)
        cuda.step_order(self._events, self._events.cumsum(1), self.order, self._first_valid, self.flags)

    def frame_ends(self, size: int | None = None) -> None:
        """The frame-end work of the moved rows among ``order[:capacity]`` (``size`` None, the pass
        that follows ``run``), or among ``order[offset : offset + size]`` (``size`` one of
        ``sizes``): their new frame's views, the carried canvas rescored, ``frame_start_loss``,
        ``next_start_loss`` and ``frame_out``. Moved rows are those before ``flags[1]``."""
        params, state, tr = self.params, self.state, self.transition
        B, T = state.batch_size, state.num_frames
        if size is None:
            slots = self._slots[self.capacity]  # (C,)
            rows = self.order[: self.capacity]  # (C,)
            valid = self._first_valid if self.kernels else slots < self.flags[1]  # (C,) bool: a moved row
        else:
            slots = self.offset + self._slots[size]  # (C,)
            rows = self.order[slots % B]  # (C,) distinct rows (C <= B); past the moved ones, unmoved rows
            valid = slots < self.flags[1]
        pixel_error = params.loss.pixel_error
        err = params.reconstructor.begin_frame_static(
            state, rows, valid, frame_out=self.frame_out, pixel_error=pixel_error
        )  # (C,) float64 when the reconstructor scored the frames in the same pass, else None
        if err is None:
            err, loss = self._scores(rows, valid)  # (C,) float64, (C,) float32 (meaningful where valid)
        else:
            loss = params.loss.reduce(err / state.canvas[0].numel()).float()
        if self.kernels:
            from rewards import cuda

            cuda.frame_start(state, rows, valid, err, loss, tr.next_start_loss)
            return
        t = state.t[rows].clamp(max=T - 1)  # (C,)
        state.err_sum[rows] = torch.where(valid, err, state.err_sum[rows])
        state.loss[rows] = torch.where(valid, loss, state.loss[rows])
        state.frame_start_loss[rows, t] = torch.where(valid, loss, state.frame_start_loss[rows, t])
        tr.next_start_loss[rows] = torch.where(valid, loss, tr.next_start_loss[rows])

    def _scores(self, rows: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``_pixel_scores`` of the current frames of rows ``rows`` (C,) against their canvas; on
        CUDA one CuPy pass over the uint8 pixels of the ``valid`` (C,) rows when it applies (l1,
        mse, psnr)."""
        params, state = self.params, self.state
        if state.device.type == "cuda":
            from rewards import cuda

            mode = cuda.pixel_error_mode(params.loss.pixel_error)
            if mode is not None and mode >= 0 and cuda.available() and state.video.is_contiguous():
                err = cuda.frame_error(state.video, state.t, state.canvas, rows, mode, valid)
                return err, params.loss.reduce(err / state.canvas[0].numel()).float()
        t = state.t[rows].clamp(max=state.num_frames - 1)  # (C,)
        return _pixel_scores(params, state.video[rows, t], state.canvas[rows])


STEP_KERNELS = ("auto", "torch", "cupy")
"""``StaticStep``'s ``kernel`` choices (the front-ends' ``step_kernel``)."""


def check_step_kernel(kernel: str) -> str:
    """``kernel`` when it is one of ``STEP_KERNELS``, else ``ValueError``."""
    if kernel not in STEP_KERNELS:
        raise ValueError(f"the step kernel must be one of {STEP_KERNELS}, got {kernel!r}")
    return kernel


def _step_kernels(kernel: str, state: GazeState) -> bool:
    """Whether ``StaticStep`` (``kernel`` its argument) runs its bookkeeping in the step kernels."""
    check_step_kernel(kernel)
    if kernel == "torch":
        return False
    from rewards import cuda

    reason = cuda.step_unsupported(state)
    if reason is not None and kernel == "cupy":
        cuda.warn_once(reason)
    return reason is None


# ---- observation -----------------------------------------------------------------------------
def observe(params: CoreParams, state: GazeState) -> dict[str, torch.Tensor]:
    """The observation of every episode, batched (see ``AutoGazeEnv`` for the spec)."""
    return {
        "frame": state.frame,  # (B, 3, H, W) uint8
        "canvas": state.canvas.clone(),  # (B, 3, H, W) uint8
        **observe_flags(params, state),
    }


def observe_flags(
    params: CoreParams, state: GazeState, out: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The observation's small entries (all but ``frame`` and ``canvas``), batched: fresh tensors,
    or written into those of ``out`` (the same keys and shapes; other keys are left alone)."""
    out = out or {}
    t = torch.clamp(state.t, max=state.num_frames - 1, out=out.get("frame_index"))  # (B,) int64
    gazed = _at_frame(state.history, t, out.get("gazed"))  # (B, N) bool
    num_gazed = _at_frame(state.counts, t)  # (B,) int64
    live = ~state.done  # (B,)
    left = torch.mul(_at_frame(state.budgets, t) - num_gazed, live, out=out.get("gazes_left"))  # (B,): 0 once ended
    return {
        "gazed": gazed,
        "frame_index": t,
        "gazes_left": left,
        "action_mask": _mask(gazed, num_gazed, live, params.config.min_gazes_per_frame, out.get("action_mask")),
    }


def gazing_ratio(params: CoreParams, state: GazeState) -> torch.Tensor:
    """(B,) float32: gazes so far over the patches of the frames started so far."""
    return _gazing_ratio(params, state, state.frame_t)


def _gazing_ratio(
    params: CoreParams, state: GazeState, frame_t: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``gazing_ratio`` given ``state.frame_t``, into ``out`` when given."""
    started = frame_t + 1  # (B,) frames started so far, the current one included
    gazes = state.counts.sum(1, dtype=torch.float32)  # (B,) exact: whole numbers far below 2^24
    return torch.div(gazes, started * params.config.grid.num_patches, out=out)


def info(params: CoreParams, state: GazeState, out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Diagnostics of every episode, batched: fresh tensors, or written into those of ``out`` (the
    same keys and shapes)."""
    out = out or {}
    t = state.frame_t
    return {
        "loss": _copy(state.loss, out.get("loss")),  # (B,) current frame's loss
        "gazes_this_frame": _at_frame(state.counts, t, out.get("gazes_this_frame")),  # (B,)
        "frame_loss": _copy(state.frame_loss, out.get("frame_loss")),  # (B, T) loss at each frame end, NaN before
        "gazing_ratio": _gazing_ratio(params, state, t, out.get("gazing_ratio")),  # (B,)
    }


def _copy(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return x.clone() if out is None else out.copy_(x)
