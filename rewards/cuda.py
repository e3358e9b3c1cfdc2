"""Optional CuPy kernels for the environment's hot path, each with the torch reference it must equal.

- ``paste_gaze`` fuses ``PasteReconstructor``'s per-gaze update into one launch: paste the gazed
  square into the canvas (finer scales kept), optionally mirror it into an observation buffer, and
  sum the change of the l1 / mse pixel error over it. One CUDA block per env row, its threads
  striding over the square's pixels, so the work is the gazed squares and nothing else.
  Reference: ``rewards.reconstruct.paste_gaze``; the canvas and level map are bit-identical to it,
  the per-element error changes too, and the delta is their float64 sum.
- ``write_views`` stores the scale views of the frames that rows moved to (the frame-end work of
  ``PasteReconstructor.begin_frame_static``): torch resizes as ``PatchGrid.scale_views`` does, one
  kernel per scale rounds, clamps and converts to uint8 straight into the rows of
  ``state.aux["views"]`` (the reference's ``round_`` / ``clamp_`` / ``to`` / ``stack`` passes and
  the masked write-back become one pass). Reference: ``PatchGrid.scale_views``, bit-identical.
- ``frame_error`` sums the l1 / mse pixel error of whole frames against canvas rows (rescoring at
  frame starts) in one pass over the uint8 pixels, per-block float64 partial sums added by torch.
  Reference: ``pixel_error(target / 255, canvas / 255)`` summed in float64 (``core._score_rows``).

Per-element values round exactly as torch's CUDA ops do (torch divides a CUDA tensor by a Python
scalar as ``x * (1 / 255)``; the ``_rn`` intrinsics are never contracted into FMAs). The float64
sums then differ from torch's only in summation order: for l1 every partial sum is exact (the
values are multiples of 2^-31 below 2^17), so the results are identical; for mse they agree to
float64 rounding.

Kernels are launched with raw device pointers on torch's current stream, with no CuPy arrays or
allocations, so they can be captured in a CUDA graph (``gaze_env.graph``) once they were compiled
by a first, eager call. Used by a ``PasteReconstructor`` built with ``kernel="cupy"`` (eager
steps) and by the static / graph step on CUDA; CuPy is imported lazily and nothing else needs it.
"""

from __future__ import annotations

import math
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

ELEMENTS_PER_THREAD = 8
"""Work per thread of the element-wise kernels (``write_views``, ``frame_error``)."""

_SOURCE = r"""
#define BLOCK 256
// torch divides a CUDA tensor by a Python scalar as x * (1 / 255); the _rn intrinsics are never
// contracted into FMAs, so every per-element value rounds exactly as torch's does
#define INV255 (1.0f / 255.0f)

extern "C" __global__ void paste_gaze(
    unsigned char* __restrict__ canvas,       // (B, 3, H, H)
    unsigned char* __restrict__ canvas_out,   // (B, 3, H, H) mirror of the canvas, or NULL
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
        unsigned char* ob = canvas_out == NULL ? NULL : canvas_out + (long long)b * 3 * HW;
        signed char* lb = level + (long long)b * HW;
        const unsigned char* vb = views + ((long long)b * K + k) * 3 * HW;
        const unsigned char* tb = video + ((long long)b * T + frame_t[b]) * 3 * HW;
        for (int p = threadIdx.x; p < R * R; p += blockDim.x) {
            const long long off = (long long)(y0 + p / R) * H + (x0 + p % R);
            if (lb[off] <= k) {
                for (int c = 0; c < 3; ++c) {
                    const long long o = c * HW + off;
                    const unsigned char before = cb[o], after = vb[o];
                    if (mode >= 0 && before != after) {
                        const float t = __fmul_rn((float)tb[o], INV255);
                        float eb = __fsub_rn(t, __fmul_rn((float)before, INV255));
                        float ea = __fsub_rn(t, __fmul_rn((float)after, INV255));
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
                    if (ob != NULL) ob[o] = after;
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

// One scale view of the rows that moved to a new frame: views[rows[c], k] = round(clamp(up[c]))
// (or frames[c] itself for the finest scale, up == NULL, also copied to frame_out[rows[c]] when
// given); level[rows[c]] = -1 when level is given. Rows with valid[c] == 0 are left alone.
// Grid: (x blocks over the n pixels, C rows).
extern "C" __global__ void write_view(
    const float* __restrict__ up,             // (C, n) the view resized back to H, or NULL
    const unsigned char* __restrict__ frames, // (C, n) the frames (used when up is NULL)
    const long long* __restrict__ rows,       // (C,)
    const bool* __restrict__ valid,           // (C,)
    unsigned char* __restrict__ views,        // (B, K, n)
    signed char* __restrict__ level,          // (B, hw) or NULL
    unsigned char* __restrict__ frame_out,    // (B, n) or NULL
    const long long n, const long long hw, const int k, const int K)
{
    const int c = blockIdx.y;
    if (!valid[c]) return;
    const long long row = rows[c];
    unsigned char* dst = views + (row * K + k) * n;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        if (up != NULL) {
            // torch: v.round_().clamp_(0, 255).to(torch.uint8); round_ is rint (half to even)
            const float v = fminf(fmaxf(rintf(up[(long long)c * n + i]), 0.0f), 255.0f);
            dst[i] = (unsigned char)v;
        } else {
            const unsigned char v = frames[(long long)c * n + i];
            dst[i] = v;
            if (frame_out != NULL) frame_out[row * n + i] = v;
        }
        if (level != NULL && i < hw) level[row * hw + i] = -1;
    }
}

// partial[c, x] = sum over this block's pixels of pixel_error(target[c] / 255, canvas[rows[c]] / 255)
// in float64; mode 0 l1, 1 mse. Grid: (G blocks over the n pixels, C rows).
extern "C" __global__ void frame_error(
    const unsigned char* __restrict__ target, // (C, n)
    const unsigned char* __restrict__ canvas, // (B, n)
    const long long* __restrict__ rows,       // (C,)
    double* __restrict__ partial,             // (C, G)
    const long long n, const int mode)
{
    __shared__ double buf[BLOCK];
    const int c = blockIdx.y;
    const unsigned char* tb = target + (long long)c * n;
    const unsigned char* cb = canvas + rows[c] * n;
    double acc = 0.0;
    const long long stride = (long long)gridDim.x * BLOCK;
    for (long long i = (long long)blockIdx.x * BLOCK + threadIdx.x; i < n; i += stride) {
        float e = __fsub_rn(__fmul_rn((float)tb[i], INV255), __fmul_rn((float)cb[i], INV255));
        e = mode == 0 ? fabsf(e) : __fmul_rn(e, e);
        acc += (double)e;
    }
    buf[threadIdx.x] = acc;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[(long long)c * gridDim.x + blockIdx.x] = buf[0];
}
"""

_cupy: ModuleType | None = None
_cupy_error: str | None = None
_module = None
_functions: dict[tuple[str, int], object] = {}
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


def usable(state: GazeState, pixel_error: Callable | None) -> bool:
    """Whether the kernels can run on ``state`` with this loss: CUDA tensors (contiguous), CuPy
    importable, l1 / mse / psnr or no pixel loss. Silent (see ``supports`` for the warning)."""
    if state.device.type != "cuda" or pixel_error_mode(pixel_error) is None or cupy_module() is None:
        return False
    tensors = (state.canvas, state.aux["level"], state.aux["views"], state.video)
    return all(t.is_contiguous() for t in tensors)


def supports(state: GazeState, pixel_error: Callable | None) -> bool:
    """``usable``, warning once when CuPy was asked for (``kernel="cupy"``) but does not import."""
    global _warned
    if state.device.type == "cuda" and pixel_error_mode(pixel_error) is not None and cupy_module() is None:
        if not _warned:
            warnings.warn(f"kernel='cupy' asked for, CuPy does not import ({_cupy_error}): using torch", stacklevel=3)
            _warned = True
    return usable(state, pixel_error)


def _function(name: str, device: torch.device):
    """Kernel ``name`` of ``_SOURCE``, compiled on first use and loaded once per device."""
    global _module
    cp = cupy_module()
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (name, index)
    if key not in _functions:
        if _module is None:
            _module = cp.RawModule(code=_SOURCE)
        with cp.cuda.Device(index):
            _functions[key] = _module.get_function(name)
    return _functions[key]


def _ptr(t: torch.Tensor | None) -> np.uint64:
    """A kernel pointer argument: the tensor's device address (NULL for None)."""
    return np.uint64(0 if t is None else t.data_ptr())


def _launch(name: str, device: torch.device, grid: tuple[int, ...], args: tuple) -> None:
    """Launch kernel ``name`` on torch's current stream (the capturing stream inside a CUDA graph
    capture), so it is ordered with the torch ops around it."""
    cp = cupy_module()
    fn = _function(name, device)
    ptr = torch.cuda.current_stream(device).cuda_stream
    stream = cp.cuda.ExternalStream(ptr) if ptr else cp.cuda.Stream.null
    with cp.cuda.Device(device.index if device.index is not None else torch.cuda.current_device()), stream:
        fn(grid, (BLOCK,), args)


def _tables(grid: PatchGrid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (grid, device)
    if key not in _geometry:
        _geometry[key] = (
            grid.table.to(device).contiguous(),  # (N, 3) int64
            torch.tensor(grid.region_sizes, dtype=torch.int32, device=device),  # (K,)
        )
    return _geometry[key]


def _contiguous(**tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous for the CuPy kernels, got strides {t.stride()}")


def paste_gaze(
    grid: PatchGrid,
    state: GazeState,
    action: torch.Tensor,
    active: torch.Tensor,
    pixel_error=None,
    *,
    canvas_out: torch.Tensor | None = None,
    delta_out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The fused kernel; same contract as ``rewards.reconstruct.paste_gaze`` (check ``usable``
    first). Returns (B,) float64 pixel-error deltas (into ``delta_out`` when given), or None without
    ``pixel_error``. ``canvas_out`` (B, 3, H, W) uint8, when given, receives every pixel written to
    the canvas (an observation buffer kept equal to it)."""
    mode = pixel_error_mode(pixel_error)
    B, device = state.batch_size, state.device
    delta = delta_out if delta_out is not None else torch.empty(B, dtype=torch.float64, device=device)
    if B == 0:
        return delta if mode >= 0 else None
    _contiguous(canvas_out=canvas_out, delta_out=delta_out)
    table, sizes = _tables(grid, device)
    action = action.to(device=device, dtype=torch.int64).contiguous()
    active = active.to(device=device, dtype=torch.uint8).contiguous()
    frame_t = state.frame_t.contiguous()
    pointers = (state.canvas, canvas_out, state.aux["level"], state.aux["views"], state.video)
    pointers += (action, active, frame_t, table, sizes, delta)
    scalars = (grid.num_patches, grid.num_scales, state.num_frames, grid.frame_size, mode)
    _launch("paste_gaze", device, (B,), tuple(_ptr(t) for t in pointers) + tuple(np.int32(s) for s in scalars))
    return delta if mode >= 0 else None


def write_views(
    grid: PatchGrid,
    frames: torch.Tensor,
    rows: torch.Tensor,
    valid: torch.Tensor,
    views: torch.Tensor,
    level: torch.Tensor,
    frame_out: torch.Tensor | None = None,
) -> None:
    """``views[rows[c]] = grid.scale_views(frames)[c]`` and ``level[rows[c]] = -1`` (and
    ``frame_out[rows[c]] = frames[c]`` when given) for the rows with ``valid[c]``; the others are
    left alone.

    Args:
        frames: (C, 3, H, W) uint8, the frames rows ``rows`` (int64 (C,), distinct) moved to.
        valid: (C,) bool.
        views: (B, k, 3, H, W) uint8 and level: (B, H, W) int8, updated in place.
        frame_out: (B, 3, H, W) uint8, an observation buffer of the current frames.
    """
    C, H = frames.shape[0], grid.frame_size
    if C == 0:
        return
    if C > 65535:
        raise ValueError(f"write_views handles at most 65535 rows per call (a grid dimension), got {C}")
    _contiguous(frames=frames, views=views, level=level, frame_out=frame_out)
    rows, valid = rows.contiguous(), valid.contiguous()
    n, hw, K = 3 * H * H, H * H, grid.num_scales
    blocks = max(1, math.ceil(n / (BLOCK * ELEMENTS_PER_THREAD)))
    x = frames.float()
    for k, s in enumerate(grid.scales):
        # the same resizes as PatchGrid.scale_views; the finest view is the frame itself
        up = None if s == H else grid.resize(grid.resize(x, s), H).contiguous()  # (C, 3, H, W) float
        last = k == K - 1
        args = (_ptr(up), _ptr(frames), _ptr(rows), _ptr(valid), _ptr(views))
        args += (_ptr(level if last else None), _ptr(frame_out if last else None))
        args += (np.int64(n), np.int64(hw), np.int32(k), np.int32(K))
        _launch("write_view", frames.device, (blocks, C), args)


def frame_error(frames: torch.Tensor, canvas: torch.Tensor, rows: torch.Tensor, mode: int) -> torch.Tensor:
    """(C,) float64: ``pixel_error(frames[c] / 255, canvas[rows[c]] / 255)`` summed over the frame,
    for ``mode`` 0 (l1) or 1 (mse / psnr); ``frames`` (C, 3, H, W) and ``canvas`` (B, 3, H, W)
    uint8, ``rows`` int64 (C,)."""
    if mode not in (0, 1):
        raise ValueError(f"frame_error computes l1 (mode 0) or mse (mode 1), got mode {mode}")
    C = frames.shape[0]
    n = frames[0].numel() if C else 0
    if C == 0:
        return torch.zeros(0, dtype=torch.float64, device=frames.device)
    if C > 65535:
        raise ValueError(f"frame_error handles at most 65535 rows per call (a grid dimension), got {C}")
    _contiguous(frames=frames, canvas=canvas)
    blocks = max(1, math.ceil(n / (BLOCK * ELEMENTS_PER_THREAD)))
    partial = torch.empty(C, blocks, dtype=torch.float64, device=frames.device)
    rows = rows.contiguous()
    args = (_ptr(frames), _ptr(canvas), _ptr(rows), _ptr(partial), np.int64(n), np.int32(mode))
    _launch("frame_error", frames.device, (blocks, C), args)
    return partial.sum(1)
