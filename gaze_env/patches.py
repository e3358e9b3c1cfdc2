"""Multi-scale patch geometry: the action vocabulary of AutoGaze.

A frame of ``H x H`` pixels is looked at through ``k`` scales ``s_1 < ... < s_k = H``. At scale
``s`` the frame is resized to ``s x s`` and cut into ``(s / p)^2`` patches of ``p x p`` pixels, so
patch ``(row, col)`` of scale ``s`` covers the full-frame square of side ``H / (s / p)`` at
``(row, col) * H / (s / p)``. Flat indices are scale-major (coarsest first) and row-major inside
a scale; ``N`` is the total and index ``N`` is STOP.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PatchGrid:
    """Frozen multi-scale patch vocabulary.

    Args:
        scales: side lengths in pixels the frame is resized to, strictly ascending; the largest
            is the frame size ``H``.
        patch_size: side ``p`` of a patch in pixels at its own scale; divides every scale.
    """

    scales: tuple[int, ...]
    patch_size: int

    def __post_init__(self) -> None:
        scales = tuple(int(s) for s in self.scales)
        object.__setattr__(self, "scales", scales)
        p = self.patch_size
        if not isinstance(p, int) or p <= 0:
            raise ValueError(f"patch_size must be a positive int, got {p!r}")
        if not scales:
            raise ValueError("scales must name at least one scale, got ()")
        if any(b <= a for a, b in zip(scales, scales[1:])):
            raise ValueError(f"scales must be strictly ascending, got {scales}")
        for s in scales:
            if s <= 0 or s % p:
                raise ValueError(f"every scale must be a positive multiple of patch_size={p}; got {s} in {scales}")
        frame = scales[-1]
        for s in scales:
            if frame % (s // p):
                raise ValueError(
                    f"the frame size {frame} must be divisible by the grid side {s // p} of scale {s} "
                    f"(patch_size {p}) so that patches cover whole pixels"
                )

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def frame_size(self) -> int:
        """Side ``H`` of the (square) frame in pixels: the largest scale."""
        return self.scales[-1]

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @cached_property
    def grid_sizes(self) -> tuple[int, ...]:
        """Patches per side at each scale, ``s / p``."""
        return tuple(s // self.patch_size for s in self.scales)

    @cached_property
    def region_sizes(self) -> tuple[int, ...]:
        """Side in full-frame pixels of the square a patch of each scale covers, ``H / (s / p)``."""
        return tuple(self.frame_size // g for g in self.grid_sizes)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Flat index of the first patch of each scale; ``offsets[k] == N`` closes the list."""
        out = [0]
        for g in self.grid_sizes:
            out.append(out[-1] + g * g)
        return tuple(out)

    @property
    def num_patches(self) -> int:
        """``N``: patches over all scales."""
        return self.offsets[-1]

    @property
    def stop(self) -> int:
        """The STOP action index, ``N``."""
        return self.num_patches

    @property
    def num_actions(self) -> int:
        """``N + 1``: every patch plus STOP."""
        return self.num_patches + 1

    # ---- index <-> (scale, row, col) ---------------------------------------------------------
    def unflatten(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat patch indices (any shape, int64, each in ``[0, N)``) -> (scale, row, col), same shape."""
        index = torch.as_tensor(index, dtype=torch.int64)
        table = self.table.to(index.device)  # (N, 3)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_patches):
            raise ValueError(f"patch indices must lie in [0, {self.num_patches}), got {index.min()}..{index.max()}")
        sel = table[index]  # (..., 3)
        return sel[..., 0], sel[..., 1], sel[..., 2]

    def flatten(self, scale: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """(scale, row, col) int64 tensors of one shape -> flat patch indices of that shape."""
        scale, row, col = (torch.as_tensor(x, dtype=torch.int64) for x in (scale, row, col))
        grid = torch.tensor(self.grid_sizes, device=scale.device)
        offs = torch.tensor(self.offsets[:-1], device=scale.device)
        if scale.numel():
            if int(scale.min()) < 0 or int(scale.max()) >= self.num_scales:
                raise ValueError(f"scale must lie in [0, {self.num_scales}), got {scale.min()}..{scale.max()}")
            g = grid[scale]
            if bool(((row < 0) | (row >= g) | (col < 0) | (col >= g)).any()):
                raise ValueError(f"row / col outside the grid of their scale (grid sides {self.grid_sizes})")
        return offs[scale] + row * grid[scale] + col

    # ---- per-patch lookup tables (N, ...) ----------------------------------------------------
    @cached_property
    def table(self) -> torch.Tensor:
        """(N, 3) int64: (scale, row, col) of every flat index."""
        rows = []
        for k, g in enumerate(self.grid_sizes):
            r, c = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
            rows.append(torch.stack([torch.full((g * g,), k), r.reshape(-1), c.reshape(-1)], dim=1))
        return torch.cat(rows).to(torch.int64)

    @cached_property
    def regions(self) -> torch.Tensor:
        """(N, 4) int64: full-frame pixel square ``(y0, x0, y1, x1)`` each patch covers."""
        scale, row, col = self.table.unbind(1)
        side = torch.tensor(self.region_sizes)[scale]
        return torch.stack([row * side, col * side, (row + 1) * side, (col + 1) * side], dim=1)

    @cached_property
    def patch_scale(self) -> torch.Tensor:
        """(N,) int64: scale index of every patch."""
        return self.table[:, 0].clone()

    @cached_property
    def scale_masks(self) -> torch.Tensor:
        """(k, N) bool: row ``i`` marks the patches of scale ``i``."""
        return self.patch_scale[None, :] == torch.arange(self.num_scales)[:, None]

    def split_by_scale(self, mask: torch.Tensor) -> list[torch.Tensor]:
        """(..., N) -> one (..., g_i, g_i) tensor per scale, patches in row-major grid layout."""
        out = []
        for k, g in enumerate(self.grid_sizes):
            out.append(mask[..., self.offsets[k] : self.offsets[k + 1]].reshape(*mask.shape[:-1], g, g))
        return out

    def pixel_mask(self, gazed: torch.Tensor, scale: int | None = None) -> torch.Tensor:
        """(..., N) bool gazed patches -> (..., H, W) bool: pixels covered by any gazed patch
        (of one scale when ``scale`` is given)."""
        H = self.frame_size
        out = torch.zeros(*gazed.shape[:-1], H, H, dtype=torch.bool, device=gazed.device)
        for k, grid in enumerate(self.split_by_scale(gazed)):
            if scale is not None and k != scale:
                continue
            r = self.region_sizes[k]
            out |= grid.repeat_interleave(r, dim=-2).repeat_interleave(r, dim=-1)
        return out

    # ---- pixels ------------------------------------------------------------------------------
    def resize(self, frames: torch.Tensor, size: int) -> torch.Tensor:
        """(B, C, H, W) float -> (B, C, size, size) float, antialiased when shrinking."""
        if frames.shape[-1] == size and frames.shape[-2] == size:
            return frames
        shrink = size < frames.shape[-1]
        return F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)

    def scale_views(self, frames: torch.Tensor) -> torch.Tensor:
        """What each scale sees, brought back to full resolution.

        (B, 3, H, W) uint8 -> (B, k, 3, H, W) uint8: the frame resized to each scale and upsampled
        back to ``H``. The region of patch ``(s, r, c)`` in view ``s`` is exactly that patch's
        content upsampled to the square it covers, so pasting a patch is a region copy.
        """
        return self.views(frames.float()).round_().clamp_(0, 255).to(torch.uint8)

    def views(self, frames: torch.Tensor) -> torch.Tensor:
        """:meth:`scale_views` in floating point, unrounded: (B, C, H, W) float -> (B, k, C, H, W)."""
        H = self.frame_size
        if tuple(frames.shape[-2:]) != (H, H):
            raise ValueError(f"frames must be {H}x{H} for this grid, got {tuple(frames.shape[-2:])}")
        return torch.stack([frames if s == H else self.resize(self.resize(frames, s), H) for s in self.scales], dim=1)

    def paste(self, canvas: torch.Tensor, views: torch.Tensor, gazed: torch.Tensor) -> torch.Tensor:
        """A frame's paste reconstruction: every pixel covered by a gazed patch takes the view of the
        finest scale that gazed it, the others keep ``canvas``.

        canvas (B, C, H, W), views (B, k, C, H, W) (:meth:`scale_views` or :meth:`views` of the
        frame), gazed (B, N) bool -> (B, C, H, W), a new tensor of the views' dtype."""
        out = canvas.to(views.dtype)
        for k in range(self.num_scales):  # coarse first: finer scales overwrite
            out = torch.where(self.pixel_mask(gazed, scale=k)[:, None], views[:, k], out)
        return out

    def extract(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """Patch contents per scale: (B, C, H, W) float -> [(B, g_i^2, C, p, p)] in flat order."""
        p = self.patch_size
        out = []
        for s, g in zip(self.scales, self.grid_sizes):
            x = self.resize(frames, s)  # (B, C, s, s)
            x = x.unfold(2, p, p).unfold(3, p, p)  # (B, C, g, g, p, p)
            out.append(x.permute(0, 2, 3, 1, 4, 5).reshape(frames.shape[0], g * g, frames.shape[1], p, p))
        return out

    def describe(self) -> str:
        parts = " + ".join(f"{g}x{g}" for g in self.grid_sizes)
        return f"PatchGrid(scales={self.scales}, patch={self.patch_size}: {parts} = {self.num_patches} patches)"
