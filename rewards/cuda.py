"""Optional CuPy kernels for the environment's hot path, each with the torch reference it must equal.

- ``paste_gaze`` fuses ``PasteReconstructor``'s per-gaze update into one launch: paste the gazed
  square into the canvas (finer scales kept), optionally mirror it into an observation buffer, and
  sum the change of the l1 / mse pixel error over it. One warp per env row and chunk of its square,
  so the work is the gazed squares and nothing else.
  Reference: ``rewards.reconstruct.paste_gaze``; the canvas and level map are bit-identical to it,
  the per-element error changes too, and the delta is their float64 sum.
- ``write_views`` stores the scale views of the frames that rows moved to (the frame-end work of
  ``PasteReconstructor.begin_frame_static``): torch's antialiased downsizing as
  ``PatchGrid.scale_views`` does it, then one kernel per scale upsizes (torch's bilinear formula,
  its FMA contraction matched against torch at run time), rounds, clamps and converts to uint8 straight
  into the rows of ``state.aux["views"]``: the reference's float upsized copy and its ``round_`` /
  ``clamp_`` / ``to`` / ``stack`` passes and the masked write-back become one pass. torch's own
  upsizing kernel loops over the batch in each thread, so it was also the slowest part of a frame
  end. Reference: ``PatchGrid.scale_views``, bit-identical.
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

// One warp per env row (WARPS rows per block), blockIdx.y-th chunk of `chunk` pixels of its
// gazed square: a wide launch of short, independent warps (a block per row left most of the card
// waiting on the few rows that gazed a coarse square).
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
    double* __restrict__ partial,             // (B, S): this warp's part of the row's delta
    const int B, const int N, const int K, const int T, const int H,
    const int mode,                           // -1 none, 0 l1, 1 mse
    const int chunk)                          // pixels of the square per warp (blockIdx.y-th chunk)
{
    const int lane = threadIdx.x & 31;
    const long long b = (long long)blockIdx.x * (BLOCK / 32) + (threadIdx.x >> 5);
    if (b >= B) return;  // whole warps: the shuffles below stay within live warps
    double acc = 0.0;
    if (active[b]) {
        long long a = action[b];
        a = a < 0 ? 0 : (a >= N ? N - 1 : a);
        const int k = (int)table[3 * a];
        const int R = region_sizes[k];
        const int begin = blockIdx.y * chunk, end = min(R * R, begin + chunk);
        if (begin < end) {
            const int y0 = (int)table[3 * a + 1] * R;
            const int x0 = (int)table[3 * a + 2] * R;
            const long long HW = (long long)H * H;
            unsigned char* cb = canvas + b * 3 * HW;
            unsigned char* ob = canvas_out == NULL ? NULL : canvas_out + b * 3 * HW;
            signed char* lb = level + b * HW;
            const unsigned char* vb = views + (b * K + k) * 3 * HW;
            const unsigned char* tb = video + (b * T + frame_t[b]) * 3 * HW;
            for (int p = begin + lane; p < end; p += 32) {
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
    }
    for (int s = 16; s > 0; s >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, s);
    if (lane == 0 && mode >= 0) partial[b * gridDim.y + blockIdx.y] = acc;
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

// torch's area_pixel_compute_source_index (align_corners=False, not cubic); `fused`: whether the
// compiler contracted scale * x - 0.5 into one FMA (what torch's build did is found at run time)
__device__ __forceinline__ float source_index(const float scale, const int dst, const bool fused) {
    const float x = dst + 0.5f;
    const float src = fused ? __fmaf_rn(scale, x, -0.5f) : __fsub_rn(__fmul_rn(scale, x), 0.5f);
    return src < 0.0f ? 0.0f : src;
}

// torch's bilinear value h0 * (w0 * a + w1 * b) + h1 * (w0 * c + w1 * d), with each way a
// compiler may contract it into FMAs (form 0: none; 1 to 4: which product of each sum is fused)
__device__ __forceinline__ float bilinear(
    const int form, const float h0, const float h1, const float w0, const float w1,
    const float a, const float b, const float c, const float d)
{
    if (form == 0) {
        const float top = __fadd_rn(__fmul_rn(w0, a), __fmul_rn(w1, b));
        const float bottom = __fadd_rn(__fmul_rn(w0, c), __fmul_rn(w1, d));
        return __fadd_rn(__fmul_rn(h0, top), __fmul_rn(h1, bottom));
    }
    const bool inner_first = form == 1 || form == 3;  // fma(w0, a, w1 * b) vs fma(w1, b, w0 * a)
    const bool outer_first = form == 1 || form == 2;  // fma(h0, top, h1 * bottom) vs fma(h1, bottom, h0 * top)
    const float top = inner_first ? __fmaf_rn(w0, a, __fmul_rn(w1, b)) : __fmaf_rn(w1, b, __fmul_rn(w0, a));
    const float bottom = inner_first ? __fmaf_rn(w0, c, __fmul_rn(w1, d)) : __fmaf_rn(w1, d, __fmul_rn(w0, c));
    return outer_first ? __fmaf_rn(h0, top, __fmul_rn(h1, bottom)) : __fmaf_rn(h1, bottom, __fmul_rn(h0, top));
}

// views[rows[c], k] = uint8(clamp(round(up(down[c])))) for the rows with valid[c], where up is
// torch's bilinear upsample_bilinear2d_out_frame (align_corners=False, no scale factors) in the
// FMA contraction `variant` (bit 0: source index fused; bits 1..: bilinear form) that equals
// torch's on this device (found at run time, see _fused_upsample_variant); raw, when given,
// receives the float values before rounding. Grid: (x blocks over the 3 H H pixels, C rows).
extern "C" __global__ void upsample_view(
    const float* __restrict__ down,           // (C, 3, s, s)
    const long long* __restrict__ rows,       // (C,)
    const bool* __restrict__ valid,           // (C,)
    unsigned char* __restrict__ views,        // (B, K, 3, H, H)
    float* __restrict__ raw,                  // (C, 3, H, H) or NULL
    const int s, const int H, const float rscale, const int k, const int K, const int variant)
{
    const int c = blockIdx.y;
    if (!valid[c]) return;
    const bool fused_index = variant & 1;
    const int form = variant >> 1;
    const long long hw = (long long)H * H, n = 3 * hw;
    unsigned char* dst = views + (rows[c] * K + k) * n;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const int ch = (int)(i / hw), pix = (int)(i % hw);
        const int h2 = pix / H, w2 = pix % H;
        const float* plane = down + ((long long)c * 3 + ch) * s * s;
        const float h1r = source_index(rscale, h2, fused_index);
        const int h1 = h1r;
        const int h1p = (h1 < s - 1) ? 1 : 0;
        const float h1lambda = h1r - h1;
        const float h0lambda = 1.0f - h1lambda;
        const float w1r = source_index(rscale, w2, fused_index);
        const int w1 = w1r;
        const int w1p = (w1 < s - 1) ? 1 : 0;
        const float w1lambda = w1r - w1;
        const float w0lambda = 1.0f - w1lambda;
        const float val = bilinear(
            form, h0lambda, h1lambda, w0lambda, w1lambda,
            plane[h1 * s + w1], plane[h1 * s + w1 + w1p],
            plane[(h1 + h1p) * s + w1], plane[(h1 + h1p) * s + w1 + w1p]);
        if (raw != NULL) raw[(long long)c * n + i] = val;
        dst[i] = (unsigned char)fminf(fmaxf(rintf(val), 0.0f), 255.0f);
    }
}
"""

PASTE_CHUNK = 256
"""Pixels of a gazed square per warp of ``paste_gaze``: a coarse patch's square (12,544 pixels at
paper size) spreads over many warps instead of making one the launch's long tail."""

STREAMS = 4
"""Side streams ``write_views`` spreads the antialiased downsizing over: torch's kernel runs one
thread per output pixel and loops over the batch, so a few small calls in parallel beat one."""

_cupy: ModuleType | None = None
_cupy_error: str | None = None
_module = None
_functions: dict[tuple[str, int], object] = {}
_external: dict[int, object] = {}
_side_streams: dict[int, list[torch.cuda.Stream]] = {}
_fused_variant: dict[tuple[PatchGrid, int], int | None] = {}
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


def _stream(ptr: int):
    """CuPy's handle of the CUDA stream ``ptr`` (a torch stream), made once per stream."""
    cp = cupy_module()
    if not ptr:
        return cp.cuda.Stream.null
    if ptr not in _external:
        # ExternalStream is deprecated in CuPy 14 in favour of Stream.from_external, which needs
        # an object with __cuda_stream__; it still wraps a raw handle, which is all we have here
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            _external[ptr] = cp.cuda.ExternalStream(ptr)
    return _external[ptr]


def _launch(name: str, device: torch.device, grid: tuple[int, ...], args: tuple) -> None:
    """Launch kernel ``name`` on torch's current stream (the capturing stream inside a CUDA graph
    capture), so it is ordered with the torch ops around it."""
    cp = cupy_module()
    fn = _function(name, device)
    stream = _stream(torch.cuda.current_stream(device).cuda_stream)
    with cp.cuda.Device(device.index if device.index is not None else torch.cuda.current_device()), stream:
        fn(grid, (BLOCK,), args)


def _streams(device: torch.device) -> list[torch.cuda.Stream]:
    """``STREAMS`` side streams of ``device``, made on first use (which must not be inside a graph
    capture: the warm-up of ``gaze_env.graph.StepRunner`` makes them)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = [torch.cuda.Stream(device) for _ in range(STREAMS)]
    return _side_streams[index]


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
    chunks = math.ceil(max(grid.region_sizes) ** 2 / PASTE_CHUNK)
    partial = torch.empty(B, chunks, dtype=torch.float64, device=device)  # (B, S) per-warp sums
    pointers = (state.canvas, canvas_out, state.aux["level"], state.aux["views"], state.video)
    pointers += (action, active, frame_t, table, sizes, partial)
    scalars = (B, grid.num_patches, grid.num_scales, state.num_frames, grid.frame_size, mode, PASTE_CHUNK)
    args = tuple(_ptr(t) for t in pointers) + tuple(np.int32(s) for s in scalars)
    _launch("paste_gaze", device, (math.ceil(B / (BLOCK // 32)), chunks), args)
    if mode < 0:
        return None
    return torch.sum(partial, dim=1, out=delta)  # exact for l1 in any order (see the module docstring)


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

    Each coarse scale: torch's antialiased downsizing (the call ``scale_views`` makes, spread over
    ``STREAMS`` side streams for large batches), then ``upsample_view``, torch's bilinear upsizing
    fused with the rounding to uint8 and the write into ``views`` (in the FMA contraction whose
    floats equal torch's on this device, see ``_fused_upsample_variant``; without one, torch's
    upsizing and ``write_view``).

    Args:
        frames: (C, 3, H, W) uint8, the frames rows ``rows`` (int64 (C,), distinct) moved to.
        valid: (C,) bool.
        views: (B, k, 3, H, W) uint8 and level: (B, H, W) int8, updated in place.
        frame_out: (B, 3, H, W) uint8, an observation buffer of the current frames.
    """
    C, H, K, device = frames.shape[0], grid.frame_size, grid.num_scales, frames.device
    if C == 0:
        return
    if C > 65535:
        raise ValueError(f"write_views handles at most 65535 rows per call (a grid dimension), got {C}")
    _contiguous(frames=frames, views=views, level=level, frame_out=frame_out)
    rows, valid = rows.contiguous(), valid.contiguous()
    n, hw = 3 * H * H, H * H
    blocks = max(1, math.ceil(n / (BLOCK * ELEMENTS_PER_THREAD)))
    variant = _fused_upsample_variant(grid, device)
    side = _streams(device)
    x = frames.float()  # (C, 3, H, W)
    groups = max(1, min(len(side), C // 16))  # slices of at least 16 rows
    bounds = [round(C * g / groups) for g in range(groups + 1)]
    main = torch.cuda.current_stream(device)
    for g in range(groups):
        lo, hi = bounds[g], bounds[g + 1]
        stream = side[g] if groups > 1 else main
        if stream is not main:
            stream.wait_stream(main)
        with torch.cuda.stream(stream):
            for k, s in enumerate(grid.scales[:-1]):
                down = grid.resize(x[lo:hi], s)  # (M, 3, s, s): the call scale_views makes
                if variant is not None:
                    args = (_ptr(down), _ptr(rows[lo:hi]), _ptr(valid[lo:hi]), _ptr(views), np.uint64(0))
                    args += (np.int32(s), np.int32(H), np.float32(s) / np.float32(H), np.int32(k), np.int32(K))
                    _launch("upsample_view", device, (blocks, hi - lo), args + (np.int32(variant),))
                else:
                    up = grid.resize(down, H).contiguous()  # (M, 3, H, W) float
                    args = (_ptr(up), _ptr(frames[lo:hi]), _ptr(rows[lo:hi]), _ptr(valid[lo:hi]), _ptr(views))
                    args += (np.uint64(0), np.uint64(0), np.int64(n), np.int64(hw), np.int32(k), np.int32(K))
                    _launch("write_view", device, (blocks, hi - lo), args)
    if groups > 1:
        for stream in side[:groups]:
            main.wait_stream(stream)
    # the finest view is the frame itself (scale_views rounds its float copy back to it)
    args = (np.uint64(0), _ptr(frames), _ptr(rows), _ptr(valid), _ptr(views), _ptr(level), _ptr(frame_out))
    args += (np.int64(n), np.int64(hw), np.int32(K - 1), np.int32(K))
    _launch("write_view", device, (blocks, C), args)
    del x  # freed on the main stream once the side streams joined it


UPSAMPLE_VARIANTS = 10
"""FMA contractions ``upsample_view`` can compute torch's bilinear value in (2 source-index forms x
5 value forms)."""


def _fused_upsample_variant(grid: PatchGrid, device: torch.device) -> int | None:
    """The contraction ``variant`` in which ``upsample_view``'s floats equal torch's bilinear
    upsizing bit for bit on this device for every coarse scale of ``grid``, or None (then the
    views take torch's upsizing). The formula is torch's, but how a compiler contracts it into FMAs
    is not promised: each variant is tried once, on downsized random frames, before any capture."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (grid, index)
    if key not in _fused_variant:
        H, K = grid.frame_size, grid.num_scales
        gen = torch.Generator(device=device).manual_seed(0)
        frames = torch.randint(0, 256, (3, 3, H, H), dtype=torch.uint8, device=device, generator=gen)
        frames[1] = frames[0].float().mean(0, keepdim=True).to(torch.uint8)  # smooth-ish planes too
        views = torch.zeros(3, K, 3, H, H, dtype=torch.uint8, device=device)
        rows = torch.arange(3, device=device)
        valid = torch.ones(3, dtype=torch.bool, device=device)
        raw = torch.empty(3, 3, H, H, device=device)
        blocks = max(1, math.ceil(3 * H * H / (BLOCK * ELEMENTS_PER_THREAD)))
        found = None
        for variant in range(UPSAMPLE_VARIANTS):
            exact = True
            for k, s in enumerate(grid.scales[:-1]):
                down = grid.resize(frames.float(), s)
                args = (_ptr(down), _ptr(rows), _ptr(valid), _ptr(views), _ptr(raw))
                args += (np.int32(s), np.int32(H), np.float32(s) / np.float32(H), np.int32(k), np.int32(K))
                _launch("upsample_view", device, (blocks, 3), args + (np.int32(variant),))
                exact = exact and torch.equal(raw, grid.resize(down, H))
            if exact:
                found = variant
                break
        if found is None:
            warnings.warn(
                "no FMA contraction of the fused bilinear upsizing rounds exactly as torch's on this "
                "device: using torch's upsizing (slower)",
                stacklevel=3,
            )
        _fused_variant[key] = found
    return _fused_variant[key]


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
