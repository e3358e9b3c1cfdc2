"""Pictures of gazing: frame | gazed patches coloured by scale | reconstruction."""

from __future__ import annotations

import torch

from gaze_env.patches import PatchGrid

# one colour per scale, coarse to fine (RGB); more scales cycle
SCALE_COLOURS = torch.tensor(
    [[66, 133, 244], [52, 168, 83], [251, 188, 5], [234, 67, 53], [171, 71, 188], [0, 172, 193]], dtype=torch.float32
)


def gaze_overlay(frame: torch.Tensor, gazed: torch.Tensor, grid: PatchGrid, dim: float = 0.35) -> torch.Tensor:
    """(3, H, W) uint8 frame + (N,) bool gazes -> (3, H, W) uint8: the frame dimmed, each gazed
    patch's square tinted and outlined in its scale's colour (finer scales drawn on top)."""
    out = frame.float() * dim
    H = grid.frame_size
    for k in range(grid.num_scales):
        covered = grid.pixel_mask(gazed, scale=k)  # (H, W)
        if not bool(covered.any()):
            continue
        colour = SCALE_COLOURS[k % len(SCALE_COLOURS)].to(frame.device)[:, None, None]
        out = torch.where(covered, 0.5 * frame.float() + 0.5 * colour, out)
        border = torch.zeros(H, H, dtype=torch.bool, device=frame.device)
        side = grid.region_sizes[k]
        for y0, x0, y1, x1 in grid.regions[grid.scale_masks[k] & gazed.cpu()].tolist():
            border[y0:y1, x0] = border[y0:y1, x1 - 1] = True
            border[y0, x0:x1] = border[y1 - 1, x0:x1] = True
        if side > 2:
            out = torch.where(border, colour, out)
    return out.round().clamp(0, 255).to(torch.uint8)


def side_by_side(
    frame: torch.Tensor, gazed: torch.Tensor, canvas: torch.Tensor, grid: PatchGrid, gap: int = 4
) -> torch.Tensor:
    """(H, 3W + 2 gap, 3) uint8 HWC image: frame | gaze overlay | reconstruction."""
    H = grid.frame_size
    white = torch.full((3, H, gap), 255, dtype=torch.uint8, device=frame.device)
    panels = [frame, white, gaze_overlay(frame, gazed, grid), white, canvas]
    return torch.cat(panels, dim=2).permute(1, 2, 0).contiguous()
