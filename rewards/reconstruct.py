"""Reconstructors: how the gazed patches are turned back into a frame.

A reconstructor owns ``state.canvas`` (B, 3, H, W) uint8, the reconstruction of the current
frame, and whatever working tensors it keeps in ``state.aux``. The core calls it at reset, when
rows move to a new frame, and after every batch of gazes.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from gaze_env.patches import PatchGrid
from gaze_env.types import GazeState


@runtime_checkable
class Reconstructor(Protocol):
    """Rebuilds the current frame from the gazes made so far."""

    def init(self, state: GazeState) -> None:
        """Set ``state.canvas`` (and ``state.aux``) for frame 0 of every row."""

    def begin_frame(self, state: GazeState, rows: torch.Tensor) -> None:
        """Rows ``rows`` (int64 (M,)) just moved to frame ``state.t[rows]``; prepare their canvas."""

    def gaze(
        self, state: GazeState, action: torch.Tensor, active: torch.Tensor, pixel_error=None
    ) -> torch.Tensor | None:
        """Apply gaze ``action`` (B,) int64 where ``active`` (B,) bool; ``state.history`` already
        holds it. May return the change (B,) float64 of the summed ``pixel_error`` over the frame
        (when given and cheap to compute), else ``None`` and the core recomputes the loss."""

    # Optional: ``end_frame(state, rows, loss_fn) -> (M,)``: the loss of rows ``rows`` whose frame
    # just ended, when the reconstructor scores frame ends differently from the running canvas
    # (the learned MAE does); the core then records it as the frame's loss.


class PasteReconstructor:
    """Training-free "paste" canvas.

    Frame ``t`` starts from frame ``t - 1``'s reconstruction (``initial`` grey or black at
    ``t = 0``). Each gazed patch pastes its content: the frame resized to the patch's scale, cut to
    the patch, upsampled back to the square it covers. Within a frame, coarse scales are pasted
    first, so finer gazes overwrite coarser ones whatever order they came in: a pixel keeps the
    content of the finest scale that covered it. Gazing every finest-scale patch therefore
    reproduces the frame exactly; gazing nothing keeps the previous canvas.

    Working tensors in ``state.aux``: ``views`` (B, k, 3, H, W) uint8, what each scale sees of the
    current frame; ``level`` (B, H, W) int8, the finest scale pasted on each pixel this frame (-1:
    none). Each gaze touches only the square it covers.

    Args:
        grid: the patch geometry.
        initial: ``"grey"`` (128) or ``"black"`` (0) canvas at ``t = 0``.
        kernel: ``"torch"`` (default) or ``"cupy"``: with ``"cupy"``, gazes on CUDA tensors run
            the fused kernel of ``rewards.cuda`` (paste + pixel-error delta in one launch) when
            CuPy imports and the loss is l1 / mse / psnr; otherwise the torch code runs.
    """

    def __init__(self, grid: PatchGrid, initial: str = "grey", kernel: str = "torch") -> None:
        if initial not in ("grey", "black"):
            raise ValueError(f"initial must be 'grey' or 'black', got {initial!r}")
        if kernel not in ("torch", "cupy"):
            raise ValueError(f"kernel must be 'torch' or 'cupy', got {kernel!r}")
        self.grid = grid
        self.initial_value = 128 if initial == "grey" else 0
        self.kernel = kernel
        self._tables: dict[torch.device, torch.Tensor] = {}

    def _table(self, device: torch.device) -> torch.Tensor:
        """(N, 3) int64 (scale, row, col) of every patch, cached per device."""
        if device not in self._tables:
            self._tables[device] = self.grid.table.to(device)
        return self._tables[device]

    def init(self, state: GazeState) -> None:
        state.canvas = torch.full_like(state.video[:, 0], self.initial_value)
        state.aux["views"] = self.grid.scale_views(state.video[:, 0])
        state.aux["level"] = torch.full(state.canvas[:, 0].shape, -1, dtype=torch.int8, device=state.device)

    def begin_frame(self, state: GazeState, rows: torch.Tensor) -> None:
        state.aux["views"][rows] = self.grid.scale_views(state.video[rows, state.t[rows]])
        state.aux["level"][rows] = -1

    def gaze(
        self, state: GazeState, action: torch.Tensor, active: torch.Tensor, pixel_error=None
    ) -> torch.Tensor | None:
        if self.kernel == "cupy" and state.device.type == "cuda":
            from rewards import cuda

            if cuda.supports(state, pixel_error):
                return cuda.paste_gaze(self.grid, state, action, active, pixel_error)
        return paste_gaze(self.grid, state, action, active, pixel_error, self._table(state.device))


def paste_gaze(
    grid: PatchGrid,
    state: GazeState,
    action: torch.Tensor,
    active: torch.Tensor,
    pixel_error=None,
    table: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Paste gaze ``action`` (B,) int64 where ``active`` (B,) bool, in place; the torch reference.

    Rows are grouped by the scale of their patch; a patch of scale ``k`` covers one tile of the
    ``g_k x g_k`` grid of ``R_k x R_k`` squares, so each group reads and writes its tiles through
    a ``(B, 3, g, R, g, R)`` view of the canvas: the work is the gazed squares, nothing more.

    Returns (B,) float64: the change of the summed ``pixel_error`` over the current frame (0 for
    inactive rows), or None without ``pixel_error``. Each row's change is the float32 sum of its
    square's per-element changes, summed in float64.
    """
    B, T = state.batch_size, state.num_frames
    table = grid.table.to(state.device) if table is None else table  # (N, 3)
    patch = table[action.clamp(0, grid.num_patches - 1)]  # (B, 3): (scale, row, col)
    canvas, views, level = state.canvas, state.aux["views"], state.aux["level"]
    delta = torch.zeros(B, dtype=torch.float64, device=state.device) if pixel_error is not None else None
    for k, (g, R) in enumerate(zip(grid.grid_sizes, grid.region_sizes)):
        rows = (active & (patch[:, 0] == k)).nonzero()[:, 0]  # (M,)
        if rows.numel() == 0:
            continue
        r, c = patch[rows, 1], patch[rows, 2]  # (M,), (M,)
        tiles = canvas.view(B, 3, g, R, g, R)
        level_tiles = level.view(B, g, R, g, R)
        old = tiles[rows, :, r, :, c, :]  # (M, 3, R, R)
        lvl = level_tiles[rows, r, :, c, :]  # (M, R, R)
        write = lvl <= k  # (M, R, R): finer scales pasted earlier this frame stay
        new = torch.where(write[:, None], views[:, k].view(B, 3, g, R, g, R)[rows, :, r, :, c, :], old)
        tiles[rows, :, r, :, c, :] = new
        level_tiles[rows, r, :, c, :] = torch.where(write, torch.full_like(lvl, k), lvl)
        if delta is not None:
            t = state.frame_t[rows]
            target = state.video.view(B, T, 3, g, R, g, R)[rows, t, :, r, :, c, :].float().div_(255)
            change = pixel_error(target, new.float().div_(255)) - pixel_error(target, old.float().div_(255))
            delta[rows] = change.reshape(rows.numel(), -1).double().sum(1)  # float64: batch-size invariant
    return delta
