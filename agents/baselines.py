"""Heuristic gazers and the greedy oracle, acting on the batched core.

Every baseline is a policy ``act(params, state, generator) -> action (B,) int64`` over a
``GazeState`` of ``B`` episodes. It only picks actions ``core.action_mask`` allows and never
says STOP: each frame ends when its budget is used up (rows with no valid patch, i.e. ended
episodes, get STOP, which the core ignores). Randomness comes only from the explicit
``generator``, so a rollout is a function of the seed. Nothing loops over the batch in Python.
Ties between patches go to the lowest flat index, i.e. the coarser scale first.

- ``random``: uniform over the valid patches.
- ``raster``: the first valid patch in index order: coarse to fine, row-major.
- ``rgb_diff``: the patch whose region changed most since the previous frame (mean absolute
  RGB difference over the region; frame 0 is compared with a mid-grey frame, the canvas a
  paste reconstruction starts from), the paper's RGB-difference baseline.
- ``error_greedy``: the patch whose region holds the most current reconstruction error
  ``|frame - canvas|`` (mean over the region, weighted by a power of its area); it reads the
  canvas but never simulates a gaze.
- ``greedy_oracle``: tries every remaining valid patch of the current frame with the real
  reconstructor and loss and keeps the one that leaves the lowest loss: the greedy search that
  labels the paper's behaviour-cloning data.

``run_episodes`` rolls any of them (or any policy with the same ``act``) through the core and
returns the trajectory TensorDict that expert data sets and evaluations store.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
from tensordict import TensorDict

from gaze_env import core
from gaze_env.core import CoreParams
from gaze_env.patches import PatchGrid
from gaze_env.types import GazeState, Transition
from rewards.base import FrameReward
from rewards.reconstruct import PasteReconstructor

__all__ = [
    "BASELINES",
    "Baseline",
    "ErrorGreedy",
    "GreedyOracle",
    "RandomGazer",
    "RasterGazer",
    "RgbDiffGazer",
    "ViewErrorCache",
    "candidate_losses",
    "make_baseline",
    "patch_means",
    "run_episodes",
]

GREY = 128
"""Pixel value of the frame ``rgb_diff`` compares frame 0 with (the paste canvas's grey start)."""


@runtime_checkable
class Baseline(Protocol):
    """A policy over the batched core."""

    name: str

    def act(self, params: CoreParams, state: GazeState, generator: torch.Generator | None) -> torch.Tensor:
        """(B,) int64 actions valid under ``core.action_mask(params, state)``."""
        ...


# ---- shared helpers --------------------------------------------------------------------------
def patch_means(grid: PatchGrid, pixel_map: torch.Tensor) -> torch.Tensor:
    """Mean of a per-pixel map over each patch's region: (B, H, W) float -> (B, N), flat order."""
    B, H = pixel_map.shape[0], grid.frame_size
    out = []
    for r in grid.region_sizes:
        g = H // r
        out.append(pixel_map.reshape(B, g, r, g, r).mean((2, 4)).reshape(B, g * g))
    return torch.cat(out, dim=1)


def _pick_max(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Highest-scoring valid patch per row (first index on ties); STOP for rows with none.

    scores (B, N) float, mask (B, N + 1) bool -> (B,) int64.
    """
    N = scores.shape[1]
    valid = mask[:, :N]
    best = scores.masked_fill(~valid, float("-inf")).argmax(dim=1)
    return torch.where(valid.any(dim=1), best, N)


def _require(generator: torch.Generator | None, name: str) -> torch.Generator:
    if generator is None:
        raise ValueError(f"the {name!r} baseline draws random numbers: pass an explicit torch.Generator")
    return generator


def _uniform(generator: torch.Generator, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, moved to ``device``."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


# ---- heuristics ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RandomGazer:
    """Uniformly random valid patch."""

    name: str = "random"

    def act(self, params: CoreParams, state: GazeState, generator: torch.Generator | None) -> torch.Tensor:
        mask = core.action_mask(params, state)
        scores = _uniform(_require(generator, self.name), (state.batch_size, mask.shape[1] - 1), state.device)
        return _pick_max(scores, mask)


@dataclass(frozen=True)
class RasterGazer:
    """First valid patch in flat index order: every coarse patch before any finer one."""

    name: str = "raster"

    def act(self, params: CoreParams, state: GazeState, generator: torch.Generator | None) -> torch.Tensor:
        mask = core.action_mask(params, state)
        N = mask.shape[1] - 1
        order = -torch.arange(N, device=state.device, dtype=torch.float32).expand(state.batch_size, N)
        return _pick_max(order, mask)


@dataclass(frozen=True)
class RgbDiffGazer:
    """Patch with the largest mean absolute RGB change since the previous frame.

    Frame 0 has no previous frame; it is compared with a mid-grey frame (value ``GREY``), the
    canvas a paste reconstruction starts from, so the first frame's most contrasted patches come
    first. Static regions score 0 and fall back to coarse-to-fine order.
    """

    name: str = "rgb_diff"

    def act(self, params: CoreParams, state: GazeState, generator: torch.Generator | None) -> torch.Tensor:
        b = torch.arange(state.batch_size, device=state.device)
        t = state.frame_t
        frame = state.video[b, t].float()  # (B, 3, H, W)
        prev = state.video[b, (t - 1).clamp(min=0)].float()
        prev = torch.where((t > 0)[:, None, None, None], prev, torch.full_like(prev, GREY))
        change = (frame - prev).abs().mean(dim=1)  # (B, H, W)
        return _pick_max(patch_means(params.config.grid, change), core.action_mask(params, state))


@dataclass(frozen=True)
class ErrorGreedy:
    """Patch whose region holds the most current reconstruction error ``|frame - canvas|``.

    Score = mean error over the region x (region area) ** ``area_exponent``. With 0 (the plain
    mean) the finest patches always win (their mean is at least their parent's), which wastes
    small budgets on tiny squares; with 1 (the summed error) coarse patches always win, whose
    blurry paste may undo finer detail carried from earlier frames. 0.25 measured best on the
    tiny and small validation clips (paste canvas, L1) across gazing ratios 0.02 to 0.2. Cheap
    (one pass over the frame per gaze, no simulated gaze) and reconstructor-agnostic: it only
    reads ``state.canvas``.
    """

    area_exponent: float = 0.25
    name: str = "error_greedy"

    def act(self, params: CoreParams, state: GazeState, generator: torch.Generator | None) -> torch.Tensor:
        grid = params.config.grid
        error = (state.frame.float() - state.canvas.float()).abs().mean(dim=1)  # (B, H, W)
        side = torch.tensor(grid.region_sizes, dtype=torch.float32)[grid.patch_scale].to(state.device)  # (N,)
        scores = patch_means(grid, error) * side.pow(2 * self.area_exponent)
        return _pick_max(scores, core.action_mask(params, state))


# ---- the greedy oracle -----------------------------------------------------------------------
Method = Literal["auto", "fast", "generic"]
Context = Literal["auto", "frame", "clip"]


def _fast_path_ok(params: CoreParams) -> bool:
    """The scale-view shortcut is exact for the paste canvas and a loss of a summed pixel error."""
    recon, loss = params.reconstructor, params.loss
    return (
        isinstance(recon, PasteReconstructor)
        and getattr(recon, "end_frame", None) is None
        and getattr(loss, "pixel_error", None) is not None
        and callable(getattr(loss, "reduce", None))
    )


class ViewErrorCache:
    """Per-row ``pixel_error(frame, view_k)`` maps of the current frame, (B, k, H, W) float32.

    They depend on the frame only, not on the gazes, so the fast path computes them once per
    frame instead of once per gaze. Rows are recomputed when their frame index changes; the whole
    cache when the state's video tensor or the loss changes (the core never writes the video)."""

    def __init__(self) -> None:
        self._video: weakref.ref | None = None
        self._loss = None
        self._frame = torch.empty(0, dtype=torch.int64)
        self._err = torch.empty(0)

    def get(self, params: CoreParams, state: GazeState, rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(M, k, H, W) maps of rows ``rows`` (M,), whose current frames are ``target`` (M, 3, H, W)."""
        video = self._video() if self._video is not None else None
        if video is not state.video or self._loss is not params.loss:
            k, H = params.config.grid.num_scales, params.config.frame_size
            self._video, self._loss = weakref.ref(state.video), params.loss
            self._frame = torch.full((state.batch_size,), -1, dtype=torch.int64, device=state.device)
            self._err = torch.empty(state.batch_size, k, H, H, device=state.device)
        t = state.frame_t[rows]
        stale = (self._frame[rows] != t).nonzero()[:, 0]  # (S,) positions in `rows`
        if stale.numel():
            views = params.reconstructor.views(state, rows[stale]).float().div_(255)  # (S, k, 3, H, W)
            err = params.loss.pixel_error(target[stale, None], views).sum(dim=2)  # (S, k, H, W)
            self._err[rows[stale]] = err
            self._frame[rows[stale]] = t[stale]
        return self._err[rows]


def _paste_candidate_losses(
    params: CoreParams, state: GazeState, rows: torch.Tensor, cache: ViewErrorCache | None = None
) -> torch.Tensor:
    """Loss after gazing each patch, for rows ``rows`` (M,) of a paste-canvas state: (M, N) float32.

    Pasting patch ``a`` of scale ``k`` writes view ``k`` on the pixels of its region whose level
    is ``<= k``, so the change of the summed pixel error is the region sum of
    ``[level <= k] * (e(frame, view_k) - e(frame, canvas))``: one per-pixel map per scale, then
    region sums, for every candidate of every row at once.
    """
    grid = params.config.grid
    M = rows.shape[0]
    target = state.video[rows, state.frame_t[rows]].float().div_(255)  # (M, 3, H, W)
    e_views = (cache or ViewErrorCache()).get(params, state, rows, target)  # (M, k, H, W)
    level = state.aux["level"][rows]  # (M, H, W) int8
    e_old = params.loss.pixel_error(target, state.canvas[rows].float().div_(255)).sum(dim=1)  # (M, H, W)
    deltas = []
    for k, r in enumerate(grid.region_sizes):
        d = torch.where(level <= k, e_views[:, k] - e_old, torch.zeros_like(e_old))
        g = grid.frame_size // r
        deltas.append(d.reshape(M, g, r, g, r).sum((2, 4)).reshape(M, g * g))
    err = state.err_sum[rows, None] + torch.cat(deltas, dim=1).double()  # (M, N) float64
    numel = state.canvas[0].numel()
    return params.loss.reduce((err / numel).flatten()).reshape(err.shape).float()


def _frame_context(state: GazeState, rows: torch.Tensor) -> GazeState:
    """Rows ``rows`` (M,) reduced to their current frame: a copy of the frame, the canvas, the
    gazes of this frame and the reconstructor's working tensors, not of the clip.

    The sub-state holds one frame (its ``frame_t`` is 0) but says ``t = T - 1``: the core ends
    an episode when ``t`` passes the config's ``T``, so ending this frame ends the sub-episode
    instead of starting a frame that is not there."""
    t = state.frame_t[rows]
    M = rows.shape[0]
    return GazeState(
        video=state.video[rows, t][:, None],
        t=torch.full((M,), state.num_frames - 1, dtype=torch.int64, device=state.device),
        history=state.history[rows, t][:, None],
        counts=state.counts[rows, t][:, None],
        budgets=state.budgets[rows, t][:, None],
        reward_frames=state.reward_frames[rows, t][:, None],
        canvas=state.canvas[rows],
        loss=state.loss[rows],
        err_sum=state.err_sum[rows],
        frame_start_loss=state.frame_start_loss[rows, t][:, None],
        frame_loss=state.frame_loss[rows, t][:, None],
        steps=state.steps[rows],
        done=torch.zeros(M, dtype=torch.bool, device=state.device),
        aux={k: v[rows] for k, v in state.aux.items()},
    )


def _row_bytes(state: GazeState) -> int:
    """Bytes one row of a state occupies."""
    return sum(v[0].numel() * v.element_size() for v in state._tensors().values())


def _generic_candidate_losses(
    params: CoreParams, state: GazeState, candidates: torch.Tensor, context: Context, chunk_bytes: int
) -> torch.Tensor:
    """Loss after each candidate by running the real ``core.step`` on copies: (B, N) float32,
    +inf where ``candidates`` (B, N) bool is False.

    Every (row, patch) pair becomes one row of a sub-state (the row's current frame, or its whole
    clip, see ``candidate_losses``) whose budget ends the frame at this gaze, so a reconstructor
    that scores frame ends (``end_frame``, the learned MAE) scores every candidate, on a frame
    drawn for scoring. The pairs are stepped together, ``chunk_bytes`` of sub-state at a time.
    """
    B, N = candidates.shape
    out = torch.full((B, N), float("inf"), device=state.device)
    pairs = candidates.nonzero()  # (P, 2): (row, patch)
    if pairs.numel() == 0:
        return out
    rows = pairs[:, 0].unique()  # (M,) sorted
    base = _frame_context(state, rows) if context == "frame" else state[rows]
    m = torch.arange(rows.shape[0], device=state.device)
    t = base.frame_t
    base.budgets[m, t] = base.counts[m, t] + 1
    base.reward_frames[m, t] = True
    local = torch.searchsorted(rows, pairs[:, 0])  # (P,) row of `base`
    chunk = max(1, chunk_bytes // max(1, _row_bytes(base)))
    for lo in range(0, pairs.shape[0], chunk):
        sel = slice(lo, lo + chunk)
        tr = core.step(params, base[local[sel]], pairs[sel, 1], validate=False)
        out[pairs[sel, 0], pairs[sel, 1]] = tr.loss_after
    return out


def candidate_losses(
    params: CoreParams,
    state: GazeState,
    candidates: torch.Tensor | None = None,
    *,
    method: Method = "auto",
    context: Context = "auto",
    chunk_bytes: int = 256 * 2**20,
    cache: ViewErrorCache | None = None,
) -> torch.Tensor:
    """Loss of the current frame after gazing each candidate patch, every row and candidate at once.

    Args:
        candidates: (B, N) bool patches to try (default: every valid patch of live rows).
        method: ``fast`` computes every candidate from the paste canvas's scale views in one pass
            (needs ``PasteReconstructor`` and a loss with ``pixel_error``); ``generic`` runs
            ``core.step`` on one sub-state row per candidate, for any reconstructor and loss;
            ``auto`` picks ``fast`` when it applies.
        context: what a generic sub-state row copies: ``frame``, the current frame only (exact
            for reconstructors that read nothing of earlier frames, like the paste canvas);
            ``clip``, the whole clip with its gaze history (exact for any reconstructor, e.g. a
            block-causal MAE; costs a clip copy per candidate); ``auto``: ``frame`` for
            ``PasteReconstructor``, ``clip`` otherwise.
        chunk_bytes: sub-state memory per batched ``core.step`` of the generic path.
        cache: the fast path's per-frame maps, kept across calls on the same episodes.

    Returns:
        (B, N) float32: the loss after the gaze (scored as if the frame ended there), +inf where
        not a candidate.
    """
    N = params.config.grid.num_patches
    if candidates is None:
        candidates = core.action_mask(params, state)[:, :N]
    if method not in ("auto", "fast", "generic"):
        raise ValueError(f"method must be 'auto', 'fast' or 'generic', got {method!r}")
    if context not in ("auto", "frame", "clip"):
        raise ValueError(f"context must be 'auto', 'frame' or 'clip', got {context!r}")
    fast = _fast_path_ok(params)
    if method == "fast" and not fast:
        raise ValueError(
            "the fast path needs a PasteReconstructor and a loss with pixel_error / reduce; "
            f"got {type(params.reconstructor).__name__} and {params.loss!r}: use method='generic'"
        )
    if method == "generic" or not fast:
        if context == "auto":
            context = "frame" if isinstance(params.reconstructor, PasteReconstructor) else "clip"
        return _generic_candidate_losses(params, state, candidates, context, chunk_bytes)
    out = torch.full(candidates.shape, float("inf"), device=state.device)
    rows = candidates.any(dim=1).nonzero()[:, 0]
    if rows.numel():
        out[rows] = torch.where(candidates[rows], _paste_candidate_losses(params, state, rows, cache), float("inf"))
    return out


@dataclass(frozen=True)
class GreedyOracle:
    """One-step greedy search with the real reconstruction and loss: for every gaze, try every
    remaining valid patch of the current frame (or ``max_candidates`` of them drawn uniformly
    with the generator) and keep the one with the lowest loss after it (coarser on ties).

    Args:
        max_candidates: try at most this many random valid patches per gaze (``None``: all).
        method, context, chunk_bytes: how candidates are evaluated, see ``candidate_losses``
            (``auto``: the exact fast path for the paste canvas with a pixel loss, else the
            generic path).
    """

    max_candidates: int | None = None
    method: Method = "auto"
    context: Context = "auto"
    chunk_bytes: int = 256 * 2**20
    name: str = "greedy_oracle"
    _cache: ViewErrorCache = field(default_factory=ViewErrorCache, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_candidates is not None and self.max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1 or None, got {self.max_candidates}")
        if self.method not in ("auto", "fast", "generic"):
            raise ValueError(f"method must be 'auto', 'fast' or 'generic', got {self.method!r}")
        if self.context not in ("auto", "frame", "clip"):
            raise ValueError(f"context must be 'auto', 'frame' or 'clip', got {self.context!r}")

    def act(self, params: CoreParams, state: GazeState, generator: torch.Generator | None) -> torch.Tensor:
        mask = core.action_mask(params, state)
        N = mask.shape[1] - 1
        candidates = mask[:, :N]
        if self.max_candidates is not None and self.max_candidates < N:
            gen = _require(generator, f"{self.name} with max_candidates")
            draw = _uniform(gen, (state.batch_size, N), state.device)
            keep = draw.masked_fill(~candidates, -1.0).topk(self.max_candidates, dim=1).indices
            candidates = candidates & torch.zeros_like(candidates).scatter_(1, keep, True)
        losses = candidate_losses(
            params,
            state,
            candidates,
            method=self.method,
            context=self.context,
            chunk_bytes=self.chunk_bytes,
            cache=self._cache,
        )
        return _pick_max(-losses, mask)


# ---- registry --------------------------------------------------------------------------------
_FACTORIES: dict[str, Callable[..., Baseline]] = {
    "random": RandomGazer,
    "raster": RasterGazer,
    "rgb_diff": RgbDiffGazer,
    "error_greedy": ErrorGreedy,
    "greedy_oracle": GreedyOracle,
}
BASELINES: tuple[str, ...] = tuple(_FACTORIES)
"""Names ``make_baseline`` accepts (``-`` may stand for ``_``)."""


def make_baseline(name: str, **kwargs) -> Baseline:
    """Build a baseline by name (see ``BASELINES``); ``kwargs`` go to its constructor
    (``greedy_oracle``: ``max_candidates``, ``method``, ``context``, ``chunk_bytes``; ``error_greedy``:
    ``area_exponent``)."""
    key = name.replace("-", "_")
    if key not in _FACTORIES:
        raise ValueError(f"unknown baseline {name!r}; known: {list(BASELINES)}")
    try:
        return _FACTORIES[key](**kwargs)
    except TypeError as e:
        raise TypeError(f"bad options {sorted(kwargs)} for baseline {key!r}: {e}") from None


# ---- rollouts --------------------------------------------------------------------------------
def run_episodes(
    policy: Baseline,
    params: CoreParams,
    video: torch.Tensor,
    budgets: torch.Tensor | None = None,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
    reward: Callable[[Transition], torch.Tensor] | None = None,
) -> TensorDict:
    """Roll ``policy`` through ``B`` whole episodes and record the trajectories.

    Args:
        video: (B, T, 3, H, W) uint8 clips.
        budgets: (B, T) (or (T,)) int64 per-frame budgets; default the config's.
        seed: seeds a fresh generator on the video's device (used for the policy and ``reset``)
            unless ``generator`` is given.
        reward: ``f(transition) -> (B,)``; default the paper's ``frame`` reward on ``params.loss``.

    Returns:
        TensorDict, batch [B]: ``video`` (B, T, 3, H, W) uint8 (the input, not copied);
        ``action`` (B, L) int64 padded with STOP (= N); ``valid`` (B, L) bool; ``frame_id``
        (B, L) int64 padded with T; ``reward`` (B, L) float32 (0 on padding); ``loss_after``
        (B, L) float32, the frame's loss after each action (NaN on padding); ``frame_loss``
        (B, T) and ``frame_start_loss`` (B, T) float32; ``budgets`` (B, T) and ``counts``
        (B, T) int64, the gazes made per frame. ``L`` is the longest episode.

    Raises:
        ValueError: the policy chose an action the mask forbids (the message says which).
    """
    N, T = params.config.grid.num_patches, params.config.num_frames
    if generator is None:
        generator = torch.Generator(device=video.device).manual_seed(seed)
    reward_fn = reward if reward is not None else FrameReward(params.loss)
    state = core.reset(params, video, generator=generator, budgets=budgets)
    B, device = state.batch_size, state.device
    L = int(state.budgets.sum(dim=1).max()) + T  # every gaze plus one STOP per frame at most
    action = torch.full((B, L), N, dtype=torch.int64, device=device)
    frame_id = torch.full((B, L), T, dtype=torch.int64, device=device)
    rewards = torch.zeros(B, L, device=device)
    loss_after = torch.full((B, L), float("nan"), device=device)
    b = torch.arange(B, device=device)
    while not bool(state.done.all()):
        a = torch.as_tensor(policy.act(params, state, generator), dtype=torch.int64, device=device)
        mask = core.action_mask(params, state)
        ok = mask[b, a.clamp(0, N)] & (a >= 0) & (a <= N)
        live = ~state.done
        if not bool((ok | ~live).all()):
            rows = live.nonzero()[:, 0]
            msg = core.invalid_action_message(params, state[rows], a[rows])
            raise ValueError(f"policy {getattr(policy, 'name', policy)!r} chose an invalid action: {msg}")
        col = state.steps.clamp(max=L - 1)
        tr = core.step(params, state, a, validate=False)
        rows = live.nonzero()[:, 0]
        action[rows, col[rows]] = a[rows]
        frame_id[rows, col[rows]] = tr.frame_index[rows]
        rewards[rows, col[rows]] = reward_fn(tr)[rows].float()
        loss_after[rows, col[rows]] = tr.loss_after[rows]
    length = int(state.steps.max())
    return TensorDict(
        {
            "video": video,
            "action": action[:, :length],
            "valid": torch.arange(length, device=device)[None] < state.steps[:, None],
            "frame_id": frame_id[:, :length],
            "reward": rewards[:, :length],
            "loss_after": loss_after[:, :length],
            "frame_loss": state.frame_loss,
            "frame_start_loss": state.frame_start_loss,
            "budgets": state.budgets,
            "counts": state.counts,
        },
        batch_size=[B],
        device=device,
    )
