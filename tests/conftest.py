"""Shared test helpers: small random clips, so that most tests never decode video."""

import pytest
import torch

from gaze_env.config import get_preset

# Tests run two xdist workers on two cores: more torch threads per worker only oversubscribe.
torch.set_num_threads(1)


OFFICIAL_PARTS = {"canvas_input": False, "pointer_head": False, "pointer_coverage": False}
"""Policy overrides that drop our optional parts from a preset (the official architecture)."""


def random_clips(n: int, preset: str = "tiny", seed: int = 0) -> torch.Tensor:
    """(n, T, 3, H, W) uint8 clips of smooth random content with some motion."""
    p = get_preset(preset)
    g = torch.Generator().manual_seed(seed)
    H, T = p.frame_size, p.num_frames
    base = torch.randint(0, 256, (n, 1, 3, H // 8, H // 8), generator=g).float()
    base = torch.nn.functional.interpolate(base[:, 0], size=(H, H), mode="bilinear", align_corners=False)
    frames = []
    for t in range(T):
        shifted = torch.roll(base, shifts=(t, 2 * t), dims=(-2, -1))
        frames.append(shifted + torch.randn(shifted.shape, generator=g) * 4)
    return torch.stack(frames, 1).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture
def clips():
    return random_clips
