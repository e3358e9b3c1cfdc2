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
from rewards.losses import summed_pixel_error


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
    #
    # Optional, for the static / CUDA-graph step (``gaze_env.core.StaticStep``): ``gaze_static`` and
    # ``begin_frame_static``, the same updates with fixed shapes and no host sync (see
    # ``PasteReconstructor``). Without them the front-ends step eagerly.


class PasteReconstructor:
    """Training-free "paste" canvas.

    Frame ``t`` starts from frame ``t - 1``'s reconstruction (``initial`` grey or black at
    ``t = 0``). Each gazed patch pastes its content: the frame resized to the patch's scale, cut to
    the patch, upsampled back to the square it covers. Within a frame, coarse scales are pasted
    first, so finer gazes overwrite coarser ones whatever order they came in: a pixel keeps the
    content of the finest scale that covered it. Gazing every finest-scale patch therefore
    reproduces the frame exactly; gazing nothing keeps the previous canvas.

    Two implementations, identical bit for bit (tests compare them on the GPU):

    - torch (CPU, and CUDA with ``kernel="torch"``): ``state.aux["views"]`` (B, k, 3, H, W) uint8,
      what each scale sees of the current frame brought back to full size, written at each frame
      start; a gaze copies its square (``paste_gaze``).
    - CuPy kernels (CUDA with ``kernel="auto"`` or ``"cupy"``, see ``rewards.cuda``):
      ``state.aux["lowres"]`` (B, L) float32, the current frame downsized to each coarse scale;
      a gaze upsizes just the square it pastes, in the same launch as the incremental loss. A frame
      start writes 207 KiB per row at paper size instead of 588 KiB of views computed through a
      full-size float copy per scale.

    Both keep ``level`` (B, H, W) int8, the finest scale pasted on each pixel this frame (-1: none).
    The implementation is chosen per state when it is made (``init``) and kept by its rows.

    Args:
        grid: the patch geometry.
        initial: ``"grey"`` (128) or ``"black"`` (0) canvas at ``t = 0``.
        kernel: ``"auto"`` (default): the kernels on CUDA where they run (CuPy imports and their
            resizing rounds as torch's on the device), else torch; ``"cupy"``: the same, warning when
            they cannot run; ``"torch"``: always the torch code.
    """

    def __init__(self, grid: PatchGrid, initial: str = "grey", kernel: str = "auto") -> None:
        if initial not in ("grey", "black"):
            raise ValueError(f"initial must be 'grey' or 'black', got {initial!r}")
        if kernel not in ("auto", "torch", "cupy"):
            raise ValueError(f"kernel must be 'auto', 'torch' or 'cupy', got {kernel!r}")
        self.grid = grid
        self.initial_value = 128 if initial == "grey" else 0
        self.kernel = kernel
        self._tables: dict[torch.device, torch.Tensor] = {}

    def _table(self, device: torch.device) -> torch.Tensor:
        """(N, 3) int64 (scale, row, col) of every patch, cached per device."""
        if device not in self._tables:
            self._tables[device] = self.grid.table.to(device)
        return self._tables[device]

    def uses_kernels(self, device: torch.device) -> bool:
        """Whether states made on ``device`` take the CuPy kernels (see the class docstring)."""
        if self.kernel == "torch" or device.type != "cuda":
            return False
        from rewards import cuda

        reason = cuda.unsupported(self.grid, device)
        if reason is not None and self.kernel == "cupy":
            cuda.warn_once(reason)
        return reason is None

    def init(self, state: GazeState) -> None:
        state.canvas = torch.full_like(state.video[:, 0], self.initial_value)
        state.aux["level"] = torch.full(state.canvas[:, 0].shape, -1, dtype=torch.int8, device=state.device)
        if self.uses_kernels(state.device) and state.video.is_contiguous():
            from rewards import cuda

            L = cuda.lowres_layout(self.grid)[1][-1]
            state.aux["lowres"] = torch.empty(state.batch_size, L, device=state.device)
            rows = torch.arange(state.batch_size, device=state.device)
            cuda.begin_rows(self.grid, state.video, state.t, rows, None, state.aux["lowres"])
        else:
            state.aux["views"] = self.grid.scale_views(state.video[:, 0])

    def begin_frame(self, state: GazeState, rows: torch.Tensor) -> None:
        if "lowres" in state.aux:
            from rewards import cuda

            cuda.begin_rows(self.grid, state.video, state.t, rows, None, state.aux["lowres"], state.aux["level"])
            return
        state.aux["views"][rows] = self.grid.scale_views(state.video[rows, state.t[rows]])
        state.aux["level"][rows] = -1

    def gaze(
        self, state: GazeState, action: torch.Tensor, active: torch.Tensor, pixel_error=None
    ) -> torch.Tensor | None:
        if "lowres" in state.aux:
            from rewards import cuda

            return cuda.paste_gaze(self.grid, state, action, active, pixel_error)
        return paste_gaze(self.grid, state, action, active, pixel_error, self._table(state.device))

    def views(self, state: GazeState, rows: torch.Tensor) -> torch.Tensor:
        """(M, k, 3, H, W) uint8: what each scale sees of the current frame of rows ``rows`` (M,),
        brought back to full size (``PatchGrid.scale_views`` of those frames), in either
        implementation."""
        if "lowres" in state.aux:
            from rewards import cuda

            frames = state.video[rows, state.frame_t[rows]]
            return cuda.upsized_views(self.grid, state.aux["lowres"][rows], frames)
        return state.aux["views"][rows]

    # ---- the static step (gaze_env.core.StaticStep): fixed shapes, no host syncs ---------------
    # With the kernels both methods are single launches over every row (masked); the torch code
    # below does every scale for every row, far more work than the kernel's gazed square.
    def gaze_static(
        self,
        state: GazeState,
        action: torch.Tensor,
        active: torch.Tensor,
        pixel_error=None,
        *,
        canvas_out: torch.Tensor | None = None,
        delta_out: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """``gaze`` with fixed shapes and no host sync (CUDA-graph capturable); ``canvas_out``
        (B, 3, H, W) uint8, when given, receives every pixel written to the canvas, and the delta
        goes to ``delta_out`` (B,) float64 when given."""
        if "lowres" in state.aux:
            from rewards import cuda

            if pixel_error is None or cuda.pixel_error_mode(pixel_error) is not None:
                return cuda.paste_gaze(
                    self.grid, state, action, active, pixel_error, canvas_out=canvas_out, delta_out=delta_out
                )
            # a per-pixel loss the kernel does not compute: paste, then rescore the whole frames as
            # the core scores frame starts (float64 sums of pixel_error), the change against err_sum
            cuda.paste_gaze(self.grid, state, action, active, None, canvas_out=canvas_out)
            target = state.video[torch.arange(state.batch_size, device=state.device), state.frame_t]
            delta = torch.where(active, summed_pixel_error(pixel_error, target, state.canvas) - state.err_sum, 0.0)
            return delta_out.copy_(delta) if delta_out is not None else delta
        delta = paste_gaze_static(
            self.grid, state, action, active, pixel_error, self._table(state.device), canvas_out=canvas_out
        )
        if delta is not None and delta_out is not None:
            return delta_out.copy_(delta)
        return delta

    def begin_frame_static(
        self,
        state: GazeState,
        rows: torch.Tensor,
        valid: torch.Tensor,
        *,
        frame_out: torch.Tensor | None = None,
        pixel_error=None,
    ) -> torch.Tensor | None:
        """``begin_frame`` for the rows ``rows`` (int64 (C,), distinct) with ``valid`` (C,) bool,
        the others untouched, with fixed shapes; the frames the rows moved to
        (``state.video[rows, state.frame_t[rows]]``) are also written to the rows of ``frame_out``
        (B, 3, H, W) uint8 when given (an observation buffer). Returns, when it is cheap (the
        kernels, l1 / mse / psnr ``pixel_error``), the (C,) float64 summed ``pixel_error`` of those
        frames against the rows' canvas (meaningless where not ``valid``), else None."""
        level = state.aux["level"]
        if "lowres" in state.aux:
            from rewards import cuda

            mode = cuda.pixel_error_mode(pixel_error)
            score = mode is not None and mode >= 0
            return cuda.begin_rows(
                self.grid,
                state.video,
                state.t,
                rows,
                valid,
                state.aux["lowres"],
                level,
                frame_out,
                canvas=state.canvas if score else None,
                mode=mode if score else -1,
            )
        views = state.aux["views"]
        frames = state.video[rows, state.frame_t[rows]]  # (C, 3, H, W)
        new = self.grid.scale_views(frames)  # (C, k, 3, H, W)
        views[rows] = torch.where(valid[:, None, None, None, None], new, views[rows])
        level[rows] = torch.where(valid[:, None, None], torch.full_like(level[rows], -1), level[rows])
        if frame_out is not None:
            frame_out[rows] = torch.where(valid[:, None, None, None], frames, frame_out[rows])
        return None


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


def paste_gaze_static(
    grid: PatchGrid,
    state: GazeState,
    action: torch.Tensor,
    active: torch.Tensor,
    pixel_error=None,
    table: torch.Tensor | None = None,
    *,
    canvas_out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``paste_gaze`` with fixed shapes and no host sync: every scale visits every row, the rows
    whose patch is not of that scale (or that are not ``active``) write back what they read.

    Same canvas, level map and delta as ``paste_gaze`` (each row's delta is the same float64 sum of
    the same float32 per-element changes); ``canvas_out`` (B, 3, H, W) uint8, when given, receives
    the same writes as the canvas. The torch fallback of ``PasteReconstructor.gaze_static``; on
    CUDA the CuPy kernel does the work of the gazed squares only.
    """
    B, T = state.batch_size, state.num_frames
    table = grid.table.to(state.device) if table is None else table  # (N, 3)
    patch = table[action.clamp(0, grid.num_patches - 1)]  # (B, 3): (scale, row, col)
    b = torch.arange(B, device=state.device)
    t = state.frame_t  # (B,)
    canvas, views, level = state.canvas, state.aux["views"], state.aux["level"]
    delta = torch.zeros(B, dtype=torch.float64, device=state.device) if pixel_error is not None else None
    for k, (g, R) in enumerate(zip(grid.grid_sizes, grid.region_sizes)):
        on = active & (patch[:, 0] == k)  # (B,)
        r, c = patch[:, 1].clamp(max=g - 1), patch[:, 2].clamp(max=g - 1)  # (B,): in range for every row
        tiles = canvas.view(B, 3, g, R, g, R)
        level_tiles = level.view(B, g, R, g, R)
        old = tiles[b, :, r, :, c, :]  # (B, 3, R, R)
        lvl = level_tiles[b, r, :, c, :]  # (B, R, R)
        write = (lvl <= k) & on[:, None, None]  # (B, R, R)
        new = torch.where(write[:, None], views[:, k].view(B, 3, g, R, g, R)[b, :, r, :, c, :], old)
        tiles[b, :, r, :, c, :] = new
        if canvas_out is not None:
            canvas_out.view(B, 3, g, R, g, R)[b, :, r, :, c, :] = new
        level_tiles[b, r, :, c, :] = torch.where(write, torch.full_like(lvl, k), lvl)
        if delta is not None:
            target = state.video.view(B, T, 3, g, R, g, R)[b, t, :, r, :, c, :].float().div_(255)
            change = pixel_error(target, new.float().div_(255)) - pixel_error(target, old.float().div_(255))
            delta += torch.where(on, change.reshape(B, -1).double().sum(1), 0.0)  # float64: batch-size invariant
    return delta
