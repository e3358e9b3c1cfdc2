"""User-style reward functions, imported by 'module:function' paths in tests."""

import torch


def minus_gazes(tr) -> torch.Tensor:
    """-1 per gaze, 0 for STOP: a transition reward."""
    return -tr.is_gaze.float()


def half_l1(target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """A per-frame loss: half the L1."""
    return 0.5 * (target - recon).abs().flatten(1).mean(1)
