"""Per-frame reconstruction losses: ``loss(target, recon) -> (B,)``, lower is better.

Inputs are float tensors (B, 3, H, W) with pixels in [0, 1]. Losses that are a function of the
mean of a per-pixel error (``PixelLoss``: l1, mse, psnr) also expose ``pixel_error`` so that the
environment can update them incrementally from the few pixels a gaze changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PixelLoss:
    """``reduce(mean over pixels and channels of pixel_error(target, recon))``."""

    name: str
    pixel_error: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (..., ) float -> same shape
    reduce: Callable[[torch.Tensor], torch.Tensor]  # (B,) mean error -> (B,) loss

    def __call__(self, target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.pixel_error(target, recon).flatten(1).mean(1))


def summed_pixel_error(pixel_error: Callable, target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """(M, 3, H, W) uint8 frames and reconstructions -> (M,) float64: ``pixel_error`` of their
    [0, 1] pixels summed over each frame, in float64 (batch-size invariant). The environment's
    running ``err_sum`` starts from, and is rescored with, exactly this."""
    return pixel_error(target.float().div_(255), recon.float().div_(255)).flatten(1).double().sum(1)


def _abs_error(target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    return (target - recon).abs()


def _sq_error(target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    return (target - recon).square()


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _neg_psnr(mse: torch.Tensor) -> torch.Tensor:
    # -PSNR in dB (peak 1), so that lower is better like every loss here; capped at 100 dB.
    return 10.0 * torch.log10(mse.clamp_min(1e-10))


l1 = PixelLoss("l1", _abs_error, _identity)
"""Mean absolute error on [0, 1] pixels (the default)."""
mse = PixelLoss("mse", _sq_error, _identity)
"""Mean squared error on [0, 1] pixels."""
psnr = PixelLoss("psnr", _sq_error, _neg_psnr)
"""Negative PSNR in dB (peak 1): ``10 log10(mse)``; a reward of ``-loss`` is the PSNR."""


def ssim(target: torch.Tensor, recon: torch.Tensor, window: int = 7) -> torch.Tensor:
    """``1 - SSIM`` with a uniform ``window x window`` window (channel mean), (B,)."""
    c1, c2 = 0.01**2, 0.03**2
    pad = window // 2

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.pad(x, (pad,) * 4, mode="reflect"), window, stride=1)

    mu_x, mu_y = blur(target), blur(recon)
    var_x = blur(target * target) - mu_x.square()
    var_y = blur(recon * recon) - mu_y.square()
    cov = blur(target * recon) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return 1.0 - s.flatten(1).mean(1)


@dataclass(frozen=True)
class WeightedLoss:
    """``sum_i w_i * loss_i(target, recon)``."""

    terms: tuple[tuple[float, LossFn], ...]

    def __call__(self, target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        return sum(w * fn(target, recon) for w, fn in self.terms)


LOSSES: dict[str, LossFn] = {"l1": l1, "mse": mse, "psnr": psnr, "ssim": ssim}


def make_loss(spec: str | LossFn | Mapping[str, float]) -> LossFn:
    """A loss from a name (``l1``, ``mse``, ``psnr``, ``ssim``), a ``"module:function"`` path, a
    callable, or a mapping ``{name: weight}`` for a weighted sum."""
    if isinstance(spec, Mapping):
        if not spec:
            raise ValueError("a weighted loss needs at least one {name: weight} entry")
        terms = tuple((float(w), make_loss(name)) for name, w in spec.items())
        if any(not math.isfinite(w) for w, _ in terms):
            raise ValueError(f"loss weights must be finite, got {dict(spec)}")
        return terms[0][1] if len(terms) == 1 and terms[0][0] == 1.0 else WeightedLoss(terms)
    if isinstance(spec, str):
        if spec in LOSSES:
            return LOSSES[spec]
        if ":" in spec:
            from rewards.base import import_path

            return import_path(spec)
        raise ValueError(f"unknown loss {spec!r}; known: {sorted(LOSSES)}, a 'module:function' path, or a callable")
    if callable(spec):
        return spec
    raise TypeError(f"a loss must be a name, a 'module:function' path, a callable or a mapping, got {type(spec)}")
