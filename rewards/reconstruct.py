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
    """

    def __init__(self, grid: PatchGrid, initial: str = "grey") -> None:
        if initial not in ("grey", "black"):
            raise ValueError(f"initial must be 'grey' or 'black', got {initial!r}")
        self.grid = grid
        self.initial_value = 128 if initial == "grey" else 0
        self._tables: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _geometry(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._tables:
            g = self.grid
            self._tables[device] = (g.regions[:, :2].to(device), g.patch_scale.to(device))
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
        grid = self.grid
        corners, patch_scale = self._geometry(state.device)
        B = state.batch_size
        a = action.clamp(0, grid.num_patches - 1)  # rows without a gaze point somewhere harmless
        y0, x0 = corners[a].unbind(1)  # (B,), (B,)
        scale = patch_scale[a]  # (B,)
        t = state.frame_t
        canvas, views, level = state.canvas, state.aux["views"], state.aux["level"]
        b = torch.arange(B, device=state.device)[:, None, None]  # (B, 1, 1)
        delta = torch.zeros(B, dtype=torch.float64, device=state.device) if pixel_error is not None else None
        for k, side in enumerate(grid.region_sizes):
            sel = active & (scale == k)  # (B,)
            ar = torch.arange(side, device=state.device)
            last = grid.frame_size - side  # rows gazing another scale read an in-bounds square, unwritten
            iy = (y0.clamp(max=last)[:, None] + ar)[:, :, None]  # (B, R, 1)
            ix = (x0.clamp(max=last)[:, None] + ar)[:, None, :]  # (B, 1, R)
            old = canvas[b, :, iy, ix]  # (B, R, R, 3)
            lvl = level[b, iy, ix]  # (B, R, R)
            write = sel[:, None, None] & (lvl <= k)  # (B, R, R)
            new = torch.where(write[..., None], views[b, k, :, iy, ix], old)  # (B, R, R, 3)
            canvas[b, :, iy, ix] = new
            level[b, iy, ix] = torch.where(write, torch.full_like(lvl, k), lvl)
            if delta is not None:
                target = state.video[b, t[:, None, None], :, iy, ix].float().div_(255)  # (B, R, R, 3)
                err_new = pixel_error(target, new.float().div_(255))
                err_old = pixel_error(target, old.float().div_(255))
                delta += (err_new - err_old).flatten(1).sum(1).double()
        return delta
