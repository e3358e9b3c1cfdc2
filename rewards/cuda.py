"""Optional CuPy kernels for the reward path, each with the torch reference it must equal.

``paste_gaze`` fuses ``PasteReconstructor``'s per-gaze update into one launch: paste the gazed
square into the canvas (finer scales kept) and sum the change of the l1 / mse pixel error over it.
One CUDA block per env row, its threads striding over the square's pixels, so the work is the
gazed squares and nothing else. Reference: ``rewards.reconstruct.paste_gaze``; the canvas and level
map are bit-identical to it, the per-element error changes too, and the delta is their float64 sum
(the reference sums them in float32, so the two differ by the reference's rounding).

Used only when a ``PasteReconstructor`` is built with ``kernel="cupy"``, its tensors are on CUDA
and CuPy imports; CuPy is imported lazily and nothing else needs it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from types import ModuleType

import numpy as np
import torch

from gaze_env.patches import PatchGrid
from gaze_env.types import GazeState
from rewards import losses

BLOCK = 256
"""Threads per block (a power of two: the block's partial sums are reduced pairwise)."""

_SOURCE = r"""
#define BLOCK 256
extern "C" __global__ void paste_gaze(
    unsigned char* __restrict__ canvas,       // (B, 3, H, H)
    signed char* __restrict__ level,          // (B, H, H)
    const unsigned char* __restrict__ views,  // (B, K, 3, H, H)
    const unsigned char* __restrict__ video,  // (B, T, 3, H, H)
    const long long* __restrict__ action,     // (B,)
    const unsigned char* __restrict__ active, // (B,) 0 / 1
    const long long* __restrict__ frame_t,    // (B,)
    const long long* __restrict__ table,      // (N, 3): scale, row, col
    const int* __restrict__ region_sizes,     // (K,)
    double* __restrict__ delta,               // (B,)
    const int N, const int K, const int T, const int H, const int mode)  // mode: -1 none, 0 l1, 1 mse
{
    __shared__ double partial[BLOCK];
    const int b = blockIdx.x;
    double acc = 0.0;
    if (active[b]) {
        long long a = action[b];
        a = a < 0 ? 0 : (a >= N ? N - 1 : a);
        const int k = (int)table[3 * a];
        const int R = region_sizes[k];
        const int y0 = (int)table[3 * a + 1] * R;
        const int x0 = (int)table[3 * a + 2] * R;
        const long long HW = (long long)H * H;
        unsigned char* cb = canvas + (long long)b * 3 * HW;
        signed char* lb = level + (long long)b * HW;
        const unsigned char* vb = views + ((long long)b * K + k) * 3 * HW;
        const unsigned char* tb = video + ((long long)b * T + frame_t[b]) * 3 * HW;
        // torch divides a CUDA tensor by a Python scalar as x * (1 / 255); the _rn intrinsics are
        // never contracted into FMAs, so every per-element value rounds exactly as torch's does
        const float inv = 1.0f / 255.0f;
        for (int p = threadIdx.x; p < R * R; p += blockDim.x) {
            const long long off = (long long)(y0 + p / R) * H + (x0 + p % R);
            if (lb[off] <= k) {
                for (int c = 0; c < 3; ++c) {
                    const long long o = c * HW + off;
                    const unsigned char before = cb[o], after = vb[o];
                    if (mode >= 0 && before != after) {
                        const float t = __fmul_rn((float)tb[o], inv);
                        float eb = __fsub_rn(t, __fmul_rn((float)before, inv));
                        float ea = __fsub_rn(t, __fmul_rn((float)after, inv));
                        if (mode == 0) {
                            eb = fabsf(eb);
                            ea = fabsf(ea);
                        } else {
                            eb = __fmul_rn(eb, eb);
                            ea = __fmul_rn(ea, ea);
                        }
                        acc += (double)__fsub_rn(ea, eb);
                    }
                    cb[o] = after;
                }
                lb[off] = (signed char)k;
            }
        }
    }
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0 && mode >= 0) delta[b] = partial[0];
}
"""

_cupy: ModuleType | None = None
_cupy_error: str | None = None
_kernel = None
_warned = False
_geometry: dict[tuple[PatchGrid, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def cupy_module() -> ModuleType | None:
    """CuPy, imported on first use; None (and the reason in ``import_error()``) when it fails."""
    global _cupy, _cupy_error
    if _cupy is None and _cupy_error is None:
        try:
            import cupy

            _cupy = cupy
        except Exception as e:  # ImportError, or a CUDA runtime CuPy cannot load
            _cupy_error = f"{type(e).__name__}: {e}"
    return _cupy


def import_error() -> str | None:
    """Why CuPy did not import (None when it did or was not tried yet)."""
    return _cupy_error


def available() -> bool:
    """True when CUDA is usable by torch and CuPy imports."""
    return torch.cuda.is_available() and cupy_module() is not None


def pixel_error_mode(pixel_error: Callable | None) -> int | None:
    """Kernel mode of a loss's ``pixel_error``: -1 none (paste only), 0 l1, 1 mse / psnr; None when
    the kernel does not implement it."""
    if pixel_error is None:
        return -1
    return {losses.l1.pixel_error: 0, losses.mse.pixel_error: 1}.get(pixel_error)


def supports(state: GazeState, pixel_error: Callable | None) -> bool:
    """Whether ``paste_gaze`` can run on ``state`` with this loss: CUDA tensors (contiguous),
    CuPy importable, l1 / mse / psnr or no pixel loss. Warns once when CuPy is missing."""
    global _warned
    if state.device.type != "cuda" or pixel_error_mode(pixel_error) is None:
        return False
    if cupy_module() is None:
        if not _warned:
            warnings.warn(f"kernel='cupy' asked for, CuPy does not import ({_cupy_error}): using torch", stacklevel=3)
            _warned = True
        return False
    tensors = (state.canvas, state.aux["level"], state.aux["views"], state.video)
    return all(t.is_contiguous() for t in tensors)


def _compiled():
    global _kernel
    if _kernel is None:
        _kernel = cupy_module().RawKernel(_SOURCE, "paste_gaze")
    return _kernel


def _tables(grid: PatchGrid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (grid, device)
    if key not in _geometry:
        _geometry[key] = (
            grid.table.to(device).contiguous(),  # (N, 3) int64
            torch.tensor(grid.region_sizes, dtype=torch.int32, device=device),  # (K,)
        )
    return _geometry[key]


def paste_gaze(
    grid: PatchGrid, state: GazeState, action: torch.Tensor, active: torch.Tensor, pixel_error=None
) -> torch.Tensor | None:
    """The fused kernel; same contract as ``rewards.reconstruct.paste_gaze`` (check ``supports``
    first). Returns (B,) float64 pixel-error deltas, or None without ``pixel_error``."""
    cp = cupy_module()
    mode = pixel_error_mode(pixel_error)
    B, device = state.batch_size, state.device
    if B == 0:
        return torch.zeros(0, dtype=torch.float64, device=device) if mode >= 0 else None
    table, sizes = _tables(grid, device)
    action = action.to(device=device, dtype=torch.int64).contiguous()
    active = active.to(device=device, dtype=torch.uint8).contiguous()
    frame_t = state.frame_t.contiguous()
    delta = torch.zeros(B, dtype=torch.float64, device=device)
    canvas, level, views = state.canvas, state.aux["level"], state.aux["views"]
    tensors = (canvas, level, views, state.video, action, active, frame_t, table, sizes, delta)
    scalars = (grid.num_patches, grid.num_scales, state.num_frames, grid.frame_size, mode)
    # launch on torch's current stream, so the kernel is ordered with the torch ops around it
    ptr = torch.cuda.current_stream(device).cuda_stream
    stream = cp.cuda.ExternalStream(ptr) if ptr else cp.cuda.Stream.null
    with cp.cuda.Device(device.index if device.index is not None else torch.cuda.current_device()), stream:
        _compiled()((B,), (BLOCK,), tuple(cp.asarray(t) for t in tensors) + tuple(np.int32(s) for s in scalars))
    return delta if mode >= 0 else None
