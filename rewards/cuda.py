"""Optional CuPy kernels for the environment's hot path on CUDA, each with the torch reference it
must equal bit for bit.

On CUDA a ``PasteReconstructor`` (``kernel="auto"`` or ``"cupy"``) keeps, per row, the frame
downsized to each coarse scale in float32 (``state.aux["lowres"]`` (B, L), ``L = 3 * sum s^2`` over
the coarse scales, see ``lowres_layout``) instead of the full-resolution scale views of the torch
path (``state.aux["views"]`` (B, k, 3, H, W) uint8): a frame start writes 207 KiB per row at
paper size instead of k full-size views (588 KiB), and each gaze upsizes only the square it
pastes.

- ``begin_rows`` is the frame-start work of rows that moved to a new frame: torch's antialiased
  bilinear downsizing (``PatchGrid.resize``, as ``PatchGrid.scale_views`` calls it) of each row's
  current frame, read straight from the clip, into its ``lowres`` row; the level map reset; the
  frame mirrored into an observation buffer and (optionally) scored against the carried canvas.
  Rows flagged invalid are left alone, so a fixed-size pass over a partly filled row list does
  only the real rows' work.
- ``paste_gaze`` fuses ``PasteReconstructor``'s per-gaze update into one launch: each pixel of the
  gazed square (finer scales kept) gets torch's bilinear upsizing of the ``lowres`` plane, rounded
  to uint8 (the finest scale: the frame itself); the canvas (and optionally an observation mirror)
  is written and the change of the l1 / mse pixel error summed. ``PASTE_SPLIT`` blocks per env row.
- ``frame_error`` sums the l1 / mse pixel error of rows' current frames (read from the clips)
  against their canvas (rescoring at frame starts) in one pass over the uint8 pixels.
- The step kernels (``_STEP_SOURCE``: ``step_check``, ``step_gaze``, ``step_post``, ``step_order``,
  ``frame_start``, ``observe_rows``) do the bookkeeping of ``gaze_env.core.StaticStep`` (validation,
  counters, frame ends, the row order of the frame-end passes) and the runner's observation, one
  thread per row, in six launches where its torch code takes about eighty small ops (in a CUDA
  graph each op is a kernel of a few microseconds whatever its size). Their reference is that torch
  code (``StaticStep(kernel="torch")``, ``core.observe_flags``, ``core.info``); they only compare,
  select and copy, so nothing rounds.

References: ``PatchGrid.scale_views`` + ``rewards.reconstruct.paste_gaze`` (canvas and level map
bit-identical, per-element error changes too, the delta their float64 sum) and
``pixel_error(target / 255, canvas / 255)`` summed in float64 (``core._score_rows``).

Exactness. The downsizing and upsizing follow torch's CUDA formulas operation by operation; how
torch's build contracted them into FMAs is not promised, so each kernel has a few contraction
``variant``s and the one that equals torch on this device is picked at first use from random
frames (``lowres_variants``); with none, the reconstructor keeps the torch path (warning when
``kernel="cupy"`` asked for the kernels).
Per-element errors round exactly as torch's CUDA ops do (torch divides a CUDA tensor by a Python
scalar as ``x * (1 / 255)``; the ``_rn`` intrinsics are never contracted into FMAs). The float64
sums then differ from torch's only in summation order: for l1 every partial sum is exact (the
values are multiples of 2^-31 below 2^17), so the results are identical; for mse they agree to
float64 rounding.

Kernels are launched with raw device pointers on torch's current stream, with no CuPy arrays or
allocations, so they can be captured in a CUDA graph (``gaze_env.graph``) once they were compiled
by a first, eager call. CuPy is imported lazily and nothing else needs it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from types import ModuleType

import numpy as np
import torch

from gaze_env.patches import PatchGrid
from gaze_env.types import GazeState, Transition
from rewards import losses

BLOCK = 256
"""Threads per block (a power of two: the block's partial sums are reduced pairwise)."""

ELEMENTS_PER_THREAD = 8
"""Work per thread of the element-wise kernels (``begin_rows``, ``frame_error``)."""

MAX_TAPS = 32
"""Most input pixels one output pixel of the antialiased downsizing reads per axis (a scale
factor up to 15); coarser factors keep the torch path."""

_SOURCE = r"""
#define BLOCK 256
#define MAX_TAPS 32
// torch divides a CUDA tensor by a Python scalar as x * (1 / 255); the _rn intrinsics are never
// contracted into FMAs, so every per-element value rounds exactly as torch's does
#define INV255 (1.0f / 255.0f)

// ---- torch's bilinear upsizing (upsample_bilinear2d_out_frame, align_corners=False) ---------
// area_pixel_compute_source_index (not cubic); `fused`: whether scale * x - 0.5 is one FMA
__device__ __forceinline__ float source_index(const float scale, const int dst, const bool fused) {
    const float x = dst + 0.5f;
    const float src = fused ? __fmaf_rn(scale, x, -0.5f) : __fsub_rn(__fmul_rn(scale, x), 0.5f);
    return src < 0.0f ? 0.0f : src;
}

// h0 * (w0 * a + w1 * b) + h1 * (w0 * c + w1 * d), in each way a compiler may contract it into
// FMAs (form 0: none; 1 to 4: which product of each sum is fused)
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

// pixel (y, x) of the s x s plane upsized to H (rscale = s / H) in contraction `variant`
// (bit 0: source index fused; bits 1..: bilinear form)
__device__ __forceinline__ float upsample_at(
    const float* __restrict__ plane, const int s, const float rscale, const int y, const int x, const int variant)
{
    const bool fused = variant & 1;
    const float hr = source_index(rscale, y, fused);
    const int h1 = hr;
    const int hp = (h1 < s - 1) ? 1 : 0;
    const float hl = hr - h1;
    const float wr = source_index(rscale, x, fused);
    const int w1 = wr;
    const int wp = (w1 < s - 1) ? 1 : 0;
    const float wl = wr - w1;
    return bilinear(variant >> 1, 1.0f - hl, hl, 1.0f - wl, wl,
                    plane[h1 * s + w1], plane[h1 * s + w1 + wp],
                    plane[(h1 + hp) * s + w1], plane[(h1 + hp) * s + w1 + wp]);
}

// torch: v.round_().clamp_(0, 255).to(torch.uint8); round_ is rint (half to even)
__device__ __forceinline__ unsigned char to_pixel(const float v) {
    return (unsigned char)fminf(fmaxf(rintf(v), 0.0f), 255.0f);
}

// pixel_error(target / 255, recon / 255) of one uint8 pair as torch's CUDA ops round it; mode 0
// l1, 1 mse
__device__ __forceinline__ double pixel_error(const unsigned char target, const unsigned char recon, const int mode) {
    const float e = __fsub_rn(__fmul_rn((float)target, INV255), __fmul_rn((float)recon, INV255));
    return (double)(mode == 0 ? fabsf(e) : __fmul_rn(e, e));
}

// ---- torch's antialiased bilinear downsizing (upsample_gen2d_aa_out_frame) ---------------
// The span of input pixels output pixel `i` of every coarse scale reads and their normalised
// triangle-filter weights (torch's _compute_weights_span and _compute_weights, bilinear filter of
// support 1 * scale), the same along both axes: spans[j] = first input, spans[J + j] = count,
// weights[tap * J + j] (output indices side by side: a warp reads one line per tap),
// j = bases[k] + i. One thread per (scale, output index).
extern "C" __global__ void aa_table(
    const int* __restrict__ sizes,            // (S,) coarse scale sides
    const int* __restrict__ bases,            // (S + 1,) first j of each scale
    int* __restrict__ spans,                  // (2, J)
    float* __restrict__ weights,              // (MAX_TAPS, J)
    const int S, const int H)
{
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int J = bases[S];
    if (j >= J) return;
    int k = 0;
    while (j >= bases[k + 1]) ++k;
    const int i = j - bases[k];
    const float scale = __fdiv_rn((float)H, (float)sizes[k]);
    const float support = scale >= 1.0f ? scale : 1.0f;
    const float center = __fmul_rn(scale, __fadd_rn((float)i, 0.5f));
    const int lo = max((int)__fadd_rn(__fsub_rn(center, support), 0.5f), 0);
    const int size = min(min((int)__fadd_rn(__fadd_rn(center, support), 0.5f), H) - lo, MAX_TAPS);
    const float invscale = scale >= 1.0f ? (float)(1.0 / (double)scale) : 1.0f;
    const float offset = __fsub_rn((float)lo, center);
    float total = 0.0f;
    for (int t = 0; t < size; ++t) {
        float x = __fmul_rn(__fadd_rn(__fadd_rn((float)t, offset), 0.5f), invscale);
        x = x < 0.0f ? -x : x;
        const float v = x < 1.0f ? __fsub_rn(1.0f, x) : 0.0f;
        weights[t * J + j] = v;
        total = __fadd_rn(total, v);
    }
    for (int t = 0; t < MAX_TAPS; ++t) {
        const float v = t < size ? weights[t * J + j] : 0.0f;
        weights[t * J + j] = t < size && total != 0.0f ? __fdiv_rn(v, total) : v;
    }
    spans[j] = lo;
    spans[J + j] = size;
}

// The frame-start work of the rows that moved to a new frame. Grid: (D + F blocks, C rows).
// The first D blocks downsize, block d doing band d of bands (D, 4): scale k, channel ch, output
// rows [o0, o0 + no) of lowres[rows[c]] for frame video[rows[c], min(t[rows[c]], T - 1)] as torch
// computes them, separably: first the x pass over each input line the band's rows read (torch's
// interpolate_aa_single_dim, the same value whichever output row asks for it) into shared memory,
// then the y pass; each later term fused into the running sum when `aa_fused`. The other F blocks
// set level[rows[c]] = -1 and frame_out[rows[c]] = the frame (each when not NULL), 16 bytes at a
// time when `vec`, and, with `canvas`, sum the pixel error of the frame against canvas[rows[c]]
// (frame_error's value) into partial[c, block]. Rows with valid[c] == 0 (valid not NULL) are left
// alone (their partial sums too: the caller masks them).
extern "C" __global__ void begin_rows(
    const unsigned char* __restrict__ video,  // (B, T, 3, H, H)
    const long long* __restrict__ frame_t,    // (B,) frame index of each row (clamped to T - 1)
    const long long* __restrict__ rows,       // (C,)
    const bool* __restrict__ valid,           // (C,) or NULL
    float* __restrict__ lowres,               // (B, L) or NULL
    signed char* __restrict__ level,          // (B, H, H) or NULL
    unsigned char* __restrict__ frame_out,    // (B, 3, H, H) or NULL
    const int* __restrict__ bands,            // (D, 4): k, ch, o0, no
    const int* __restrict__ sizes,            // (S,) coarse scale sides
    const int* __restrict__ offsets,          // (S + 1,) starts of each scale's (3, s, s) in a row of L
    const int* __restrict__ bases,            // (S + 1,) of aa_table
    const int* __restrict__ spans,            // (2, J) of aa_table
    const float* __restrict__ weights,        // (MAX_TAPS, J) of aa_table
    const unsigned char* __restrict__ canvas, // (B, 3, H, H) or NULL: score the frame against it
    double* __restrict__ partial,             // (C, F) per-block error sums (with canvas)
    const int S, const int T, const int H, const int D, const int aa_fused, const int vec,
    const int mode)                           // with canvas: 0 l1, 1 mse
{
    extern __shared__ float lines[];          // (input lines of the band, s)
    __shared__ double buf[BLOCK / 32];
    const int c = blockIdx.y;
    if (valid != NULL && !valid[c]) return;
    const long long row = rows[c];
    const long long t = min(frame_t[row], (long long)(T - 1));
    const long long hw = (long long)H * H, n = 3 * hw;
    const unsigned char* frame = video + (row * T + t) * n;
    if ((int)blockIdx.x < D) {
        if (lowres == NULL) return;
        const int* band = bands + 4 * blockIdx.x;
        const int k = band[0], ch = band[1], o0 = band[2], no = band[3];
        const int s = sizes[k], J = bases[S], base = bases[k];
        const int y_lo = spans[base + o0];
        const int y_hi = spans[base + o0 + no - 1] + spans[J + base + o0 + no - 1];  // exclusive
        const unsigned char* plane = frame + ch * hw;
        for (int e = threadIdx.x; e < (y_hi - y_lo) * s; e += BLOCK) {
            const int l = e / s, ox = e % s;
            const int jx = base + ox;
            const int x0 = spans[jx], nx = spans[J + jx];
            const unsigned char* px = plane + (long long)(y_lo + l) * H + x0;
            float r = __fmul_rn((float)px[0], weights[jx]);
            for (int x = 1; x < nx; ++x) {
                const float w = weights[x * J + jx];
                r = aa_fused ? __fmaf_rn((float)px[x], w, r) : __fadd_rn(r, __fmul_rn((float)px[x], w));
            }
            lines[e] = r;
        }
        __syncthreads();
        float* out = lowres + row * offsets[S] + offsets[k] + ch * s * s;
        for (int e = threadIdx.x; e < no * s; e += BLOCK) {
            const int oy = o0 + e / s, ox = e % s;
            const int jy = base + oy;
            const int y0 = spans[jy] - y_lo, ny = spans[J + jy];
            float v = __fmul_rn(lines[y0 * s + ox], weights[jy]);
            for (int y = 1; y < ny; ++y) {
                const float w = weights[y * J + jy];
                const float r = lines[(y0 + y) * s + ox];
                v = aa_fused ? __fmaf_rn(r, w, v) : __fadd_rn(v, __fmul_rn(r, w));
            }
            out[oy * s + ox] = v;
        }
        return;
    }
    const int F = gridDim.x - D;
    const unsigned char* cv = canvas == NULL ? NULL : canvas + row * n;
    double acc = 0.0;
    if (vec) {  // n and hw multiples of 16: 16-byte words
        const uint4* src = reinterpret_cast<const uint4*>(frame);
        const uint4* cw = reinterpret_cast<const uint4*>(cv);
        uint4* dst = frame_out == NULL ? NULL : reinterpret_cast<uint4*>(frame_out + row * n);
        uint4* lv = level == NULL ? NULL : reinterpret_cast<uint4*>(level + row * hw);
        const uint4 ones = make_uint4(0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu);
        for (long long i = (long long)(blockIdx.x - D) * BLOCK + threadIdx.x; i < n / 16; i += (long long)F * BLOCK) {
            const uint4 word = src[i];
            if (dst != NULL) dst[i] = word;
            if (lv != NULL && i < hw / 16) lv[i] = ones;
            if (cv != NULL) {
                const uint4 other = cw[i];
                const unsigned int a[4] = {word.x, word.y, word.z, word.w};
                const unsigned int o[4] = {other.x, other.y, other.z, other.w};
                #pragma unroll
                for (int j = 0; j < 16; ++j) {
                    const int sh = 8 * (j & 3);
                    acc += pixel_error((a[j >> 2] >> sh) & 255u, (o[j >> 2] >> sh) & 255u, mode);
                }
            }
        }
    } else {
        for (long long i = (long long)(blockIdx.x - D) * BLOCK + threadIdx.x; i < n; i += (long long)F * BLOCK) {
            if (frame_out != NULL) frame_out[row * n + i] = frame[i];
            if (level != NULL && i < hw) level[row * hw + i] = -1;
            if (cv != NULL) acc += pixel_error(frame[i], cv[i], mode);
        }
    }
    if (cv == NULL) return;
    for (int s2 = 16; s2 > 0; s2 >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, s2);
    if ((threadIdx.x & 31) == 0) buf[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int w = 0; w < BLOCK / 32; ++w) total += buf[w];
        partial[(long long)c * F + (blockIdx.x - D)] = total;
    }
}

// The full upsizing of one lowres scale (C rows, grid: (x blocks, C)) as raw floats: the probe
// that picks the contraction variant of paste_gaze's upsizing against torch's.
extern "C" __global__ void upsample_probe(
    const float* __restrict__ down,           // (C, 3, s, s)
    float* __restrict__ out,                  // (C, 3, H, H)
    const int s, const int H, const float rscale, const int variant)
{
    const int c = blockIdx.y;
    const long long hw = (long long)H * H, n = 3 * hw;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const int ch = (int)(i / hw), pix = (int)(i % hw);
        const float* plane = down + ((long long)c * 3 + ch) * s * s;
        out[(long long)c * n + i] = upsample_at(plane, s, rscale, pix / H, pix % H, variant);
    }
}

// Grid (B, SPLIT): block (b, y) pastes part of row b's gazed square (finer scales kept). The
// square's R columns are spread over the threads (thread tid: column tid % R, first row tid / R,
// BLOCK / R rows at a time, R <= BLOCK), so each thread's column arithmetic is done once; block y
// takes every SPLIT-th group of rows, UNROLL rows per thread at a time with all their loads issued
// before any use (the work is memory latency). partial[b, y] = its part of the change of the
// summed pixel error (when mode >= 0). FUSED and FORM are the contraction of torch's bilinear
// upsizing that upsample_probe found equal to torch's.
#define SPLIT 4
#define UNROLL 2
template <int FUSED, int FORM>
__global__ void paste_gaze(
    unsigned char* __restrict__ canvas,       // (B, 3, H, H)
    unsigned char* __restrict__ canvas_out,   // (B, 3, H, H) mirror of the canvas, or NULL
    signed char* __restrict__ level,          // (B, H, H)
    const float* __restrict__ lowres,         // (B, L)
    const unsigned char* __restrict__ video,  // (B, T, 3, H, H)
    const long long* __restrict__ action,     // (B,)
    const bool* __restrict__ active,          // (B,)
    const long long* __restrict__ frame_t,    // (B,) (clamped to T - 1)
    const int4* __restrict__ patches,         // (N,): scale, square side R, top, left
    const int* __restrict__ sizes,            // (K - 1,) coarse scale sides
    const int* __restrict__ offsets,          // (K,) starts of the coarse scales in a lowres row, then L
    double* __restrict__ partial,             // (B, SPLIT)
    const int N, const int K, const int T, const int H,
    const int mode)                           // -1 none, 0 l1, 1 mse
{
    __shared__ double buf[BLOCK / 32];
    const long long b = blockIdx.x;
    const int tid = threadIdx.x;
    double acc = 0.0;
    if (active[b]) {
        long long a = action[b];
        a = a < 0 ? 0 : (a >= N ? N - 1 : a);
        const int4 patch = patches[a];
        const int k = patch.x, R = patch.y;
        const int per = BLOCK / R;            // rows per pass of the block
        const int first = tid / R + per * blockIdx.y;
        if (tid < per * R && first < R) {
            const int HW = H * H;
            const bool finest = k == K - 1;
            const int s = finest ? H : sizes[k];
            const float rscale = __fdiv_rn((float)s, (float)H);
            const int x = patch.w + tid % R;
            unsigned char* cb = canvas + b * 3 * HW + x;
            unsigned char* ob = canvas_out == NULL ? NULL : canvas_out + b * 3 * HW + x;
            signed char* lb = level + b * HW + x;
            const unsigned char* tb = video + (b * T + min(frame_t[b], (long long)(T - 1))) * 3 * HW + x;
            const float* low = finest ? NULL : lowres + b * offsets[K - 1] + offsets[k];
            int w1 = 0, w2 = 0;
            float wl = 0.0f;
            if (!finest) {
                const float wr = source_index(rscale, x, FUSED);
                w1 = wr;
                w2 = w1 + ((w1 < s - 1) ? 1 : 0);
                wl = wr - w1;
            }
            for (int r0 = first; r0 < R; r0 += per * SPLIT * UNROLL) {
                int row[UNROLL];
                signed char lv[UNROLL];
                unsigned char before[UNROLL][3], target[UNROLL][3];
                float up[UNROLL][3];
                #pragma unroll
                for (int u = 0; u < UNROLL; ++u) {
                    const int r = r0 + u * per * SPLIT;
                    row[u] = r < R ? (patch.z + r) * H : -1;
                    if (row[u] < 0) continue;
                    lv[u] = lb[row[u]];
                    #pragma unroll
                    for (int c = 0; c < 3; ++c) {
                        before[u][c] = cb[c * HW + row[u]];
                        target[u][c] = tb[c * HW + row[u]];
                    }
                    if (!finest) {
                        const float hr = source_index(rscale, patch.z + r, FUSED);
                        const int h1 = hr;
                        const int h2 = h1 + ((h1 < s - 1) ? 1 : 0);
                        const float hl = hr - h1;
                        #pragma unroll
                        for (int c = 0; c < 3; ++c) {
                            const float* plane = low + c * s * s;
                            up[u][c] = bilinear(FORM, 1.0f - hl, hl, 1.0f - wl, wl, plane[h1 * s + w1],
                                                plane[h1 * s + w2], plane[h2 * s + w1], plane[h2 * s + w2]);
                        }
                    }
                }
                #pragma unroll
                for (int u = 0; u < UNROLL; ++u) {
                    if (row[u] < 0 || lv[u] > k) continue;
                    #pragma unroll
                    for (int c = 0; c < 3; ++c) {
                        const unsigned char after = finest ? target[u][c] : to_pixel(up[u][c]);
                        if (mode >= 0 && before[u][c] != after) {
                            const float tv = __fmul_rn((float)target[u][c], INV255);
                            float eb = __fsub_rn(tv, __fmul_rn((float)before[u][c], INV255));
                            float ea = __fsub_rn(tv, __fmul_rn((float)after, INV255));
                            if (mode == 0) {
                                eb = fabsf(eb);
                                ea = fabsf(ea);
                            } else {
                                eb = __fmul_rn(eb, eb);
                                ea = __fmul_rn(ea, ea);
                            }
                            acc += (double)__fsub_rn(ea, eb);
                        }
                        cb[c * HW + row[u]] = after;
                        if (ob != NULL) ob[c * HW + row[u]] = after;
                    }
                    lb[row[u]] = (signed char)k;
                }
            }
        }
    }
    if (mode < 0) return;
    for (int s2 = 16; s2 > 0; s2 >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, s2);
    if ((tid & 31) == 0) buf[tid >> 5] = acc;
    __syncthreads();
    if (tid == 0) {
        double total = 0.0;
        for (int w = 0; w < BLOCK / 32; ++w) total += buf[w];
        partial[b * SPLIT + blockIdx.y] = total;
    }
}

// partial[c, x] = sum over this block's pixels of pixel_error(frame / 255, canvas[rows[c]] / 255)
// in float64, frame = video[rows[c], min(t[rows[c]], T - 1)]; mode 0 l1, 1 mse; 0 for invalid rows.
// Grid: (G blocks over the n pixels, C rows).
extern "C" __global__ void frame_error(
    const unsigned char* __restrict__ video,  // (B, T, n)
    const long long* __restrict__ frame_t,    // (B,)
    const unsigned char* __restrict__ canvas, // (B, n)
    const long long* __restrict__ rows,       // (C,)
    const bool* __restrict__ valid,           // (C,) or NULL: rows with 0 are skipped (their sums 0)
    double* __restrict__ partial,             // (C, G)
    const long long n, const int T, const int mode)
{
    __shared__ double buf[BLOCK];
    const int c = blockIdx.y;
    if (valid != NULL && !valid[c]) {
        if (threadIdx.x == 0) partial[(long long)c * gridDim.x + blockIdx.x] = 0.0;
        return;
    }
    const long long row = rows[c];
    const unsigned char* tb = video + (row * T + min(frame_t[row], (long long)(T - 1))) * n;
    const unsigned char* cb = canvas + row * n;
    double acc = 0.0;
    const long long stride = (long long)gridDim.x * BLOCK;
    for (long long i = (long long)blockIdx.x * BLOCK + threadIdx.x; i < n; i += stride) {
        acc += pixel_error(tb[i], cb[i], mode);
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

_STEP_SOURCE = r"""
// The bookkeeping of gaze_env.core.StaticStep, one thread per env row (observe_rows: per row and
// action); each kernel equals the torch code it replaces there (integer, boolean and copy
// operations only: nothing rounds). Shapes: B rows, T frames, N patches; (B, T) and (B, T, N)
// tensors row-major; `go` is flags[0] (1: every action of the batch is valid).

// StaticStep's validation: flags[0] = 0 when an action is invalid (flags[0] was set to 1).
extern "C" __global__ void step_check(
    const long long* __restrict__ action,     // (B,)
    const long long* __restrict__ state_t,    // (B,)
    const bool* __restrict__ done,            // (B,)
    const bool* __restrict__ history,         // (B, T, N)
    const long long* __restrict__ counts,     // (B, T)
    long long* __restrict__ flags,            // (3,)
    const int B, const int T, const int N, const int min_gazes)
{
    const long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B) return;
    const long long a = action[b];
    const long long t = min(state_t[b], (long long)(T - 1));
    const long long patch = a < 0 ? 0 : (a > N - 1 ? N - 1 : a);
    const bool seen = history[(b * T + t) * N + patch];
    const bool ok = (a == N ? counts[b * T + t] >= min_gazes : !seen) || done[b];
    if (!(ok && a >= 0 && a <= N)) flags[0] = 0;  // every writer writes 0: no race on the value
}

// StaticStep up to the paste: the gaze recorded in history and counts; is_gaze, frame_index and
// loss_before of the transition.
extern "C" __global__ void step_gaze(
    const long long* __restrict__ action,     // (B,)
    const long long* __restrict__ state_t,    // (B,)
    const bool* __restrict__ done,            // (B,)
    bool* __restrict__ history,               // (B, T, N)
    long long* __restrict__ counts,           // (B, T)
    const float* __restrict__ loss,           // (B,)
    const long long* __restrict__ flags,      // (3,)
    bool* __restrict__ is_gaze,               // (B,)
    long long* __restrict__ frame_index,      // (B,)
    float* __restrict__ loss_before,          // (B,)
    const int B, const int T, const int N)
{
    const long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B) return;
    const long long a = action[b];
    const long long t = min(state_t[b], (long long)(T - 1));
    const bool gaze = flags[0] != 0 && !done[b] && a < N;
    frame_index[b] = t;
    is_gaze[b] = gaze;
    loss_before[b] = loss[b];
    if (gaze) {
        history[(b * T + t) * N + (a < 0 ? 0 : a)] = true;
        counts[b * T + t] += 1;
    }
}

// StaticStep after the paste: the loss (new_loss where a gaze pasted), the frame end and what
// follows from it (frame_loss, t, done, steps), the rest of the transition, and events (2, B):
// row b moved to a new frame (events[b]) or terminated (events[B + b]).
extern "C" __global__ void step_post(
    const long long* __restrict__ action,     // (B,)
    long long* __restrict__ state_t,          // (B,)
    bool* __restrict__ done,                  // (B,)
    const long long* __restrict__ counts,     // (B, T)
    const long long* __restrict__ budgets,    // (B, T)
    const bool* __restrict__ reward_frames,   // (B, T)
    float* __restrict__ loss,                 // (B,)
    const float* __restrict__ new_loss,       // (B,)
    float* __restrict__ frame_loss,           // (B, T)
    long long* __restrict__ steps,            // (B,)
    const long long* __restrict__ flags,      // (3,)
    const bool* __restrict__ is_gaze,         // (B,)
    float* __restrict__ loss_after,           // (B,)
    bool* __restrict__ frame_end,             // (B,)
    bool* __restrict__ scored,                // (B,)
    bool* __restrict__ terminated,            // (B,)
    float* __restrict__ next_start_loss,      // (B,)
    long long* __restrict__ events,           // (2, B)
    const int B, const int T, const int N)
{
    const long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B) return;
    const long long a = action[b];
    const long long t0 = state_t[b];
    const long long cell = b * T + min(t0, (long long)(T - 1));
    const bool live = flags[0] != 0 && !done[b];
    if (is_gaze[b]) loss[b] = new_loss[b];
    const float l = loss[b];
    const bool end = live && (a == N || counts[cell] >= budgets[cell]);
    loss_after[b] = l;
    steps[b] += live;
    if (end) frame_loss[cell] = l;
    scored[b] = end && reward_frames[cell];
    const long long t1 = t0 + end;
    state_t[b] = t1;
    const bool term = end && t1 >= T;
    if (term) done[b] = true;
    frame_end[b] = end;
    terminated[b] = term;
    next_start_loss[b] = __int_as_float(0x7fc00000);  // NaN
    events[b] = end && !term;
    events[B + b] = term;
}

// StaticStep's row order (rows that moved to a new frame first, stably) from so_far = events'
// running sums (2, B); flags[1] = rows moved, flags[2] = rows terminated; first_valid (C,): which
// of the first C slots of order hold a moved row (the rows of frame_ends()).
extern "C" __global__ void step_order(
    const long long* __restrict__ events,     // (2, B)
    const long long* __restrict__ so_far,     // (2, B)
    long long* __restrict__ order,            // (B,)
    bool* __restrict__ first_valid,           // (C,)
    long long* __restrict__ flags,            // (3,)
    const int B, const int C)
{
    const long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B) return;
    const long long moved = so_far[B - 1], s = so_far[b];
    order[events[b] ? s - 1 : b + moved - s] = b;
    if (b < C) first_valid[b] = b < moved;
    if (b == 0) {
        flags[1] = moved;
        flags[2] = so_far[2LL * B - 1];
    }
}

// StaticStep.frame_ends' writes for the C slots: the valid rows' new frame scores.
extern "C" __global__ void frame_start(
    const long long* __restrict__ rows,       // (C,)
    const bool* __restrict__ valid,           // (C,)
    const double* __restrict__ err,           // (C,)
    const float* __restrict__ new_loss,       // (C,)
    const long long* __restrict__ state_t,    // (B,)
    double* __restrict__ err_sum,             // (B,)
    float* __restrict__ loss,                 // (B,)
    float* __restrict__ frame_start_loss,     // (B, T)
    float* __restrict__ next_start_loss,      // (B,)
    const int C, const int T)
{
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C || !valid[c]) return;
    const long long row = rows[c];
    const float l = new_loss[c];
    err_sum[row] = err[c];
    loss[row] = l;
    frame_start_loss[row * T + min(state_t[row], (long long)(T - 1))] = l;
    next_start_loss[row] = l;
}

// core.observe_flags and core.info into the runner's buffers; thread i: row b = i / (N + 1),
// action j = i % (N + 1) (j = N: STOP and the row's other entries).
extern "C" __global__ void observe_rows(
    const long long* __restrict__ state_t,    // (B,)
    const bool* __restrict__ done,            // (B,)
    const bool* __restrict__ history,         // (B, T, N)
    const long long* __restrict__ counts,     // (B, T)
    const long long* __restrict__ budgets,    // (B, T)
    const float* __restrict__ loss,           // (B,)
    const float* __restrict__ frame_loss,     // (B, T)
    bool* __restrict__ gazed,                 // (B, N)
    bool* __restrict__ mask,                  // (B, N + 1)
    long long* __restrict__ frame_index,      // (B,)
    long long* __restrict__ gazes_left,       // (B,)
    float* __restrict__ info_loss,            // (B,)
    long long* __restrict__ gazes_this_frame, // (B,)
    float* __restrict__ info_frame_loss,      // (B, T)
    float* __restrict__ gazing_ratio,         // (B,)
    const long long total, const int T, const int N, const int min_gazes)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const long long b = i / (N + 1);
    const int j = (int)(i % (N + 1));
    const long long t = min(state_t[b], (long long)(T - 1));
    const bool live = !done[b];
    if (j < N) {
        const bool g = history[(b * T + t) * N + j];
        gazed[b * N + j] = g;
        mask[i] = live && !g;
        return;
    }
    const long long n = counts[b * T + t];
    mask[i] = live && n >= min_gazes;
    frame_index[b] = t;
    gazes_left[b] = live ? budgets[b * T + t] - n : 0;
    gazes_this_frame[b] = n;
    info_loss[b] = loss[b];
    float gazes = 0.0f;  // exact: whole numbers far below 2^24, as torch's float32 sum
    for (int k = 0; k < T; ++k) {
        gazes += (float)counts[b * T + k];
        info_frame_loss[b * T + k] = frame_loss[b * T + k];
    }
    gazing_ratio[b] = __fdiv_rn(gazes, (float)((t + 1) * N));
}
"""

STEP_KERNEL_NAMES = ("step_check", "step_gaze", "step_post", "step_order", "frame_start", "observe_rows")
"""The kernels of ``_STEP_SOURCE`` (compiled apart from ``_SOURCE``'s)."""

PASTE_SPLIT = 4
"""Blocks per env row of ``paste_gaze`` (``SPLIT`` in the source)."""

FORMS = 5
"""FMA contractions of torch's bilinear value (see ``bilinear`` in the source)."""

UPSAMPLE_VARIANTS = 2 * FORMS
"""FMA contractions of torch's bilinear upsizing (2 source-index forms x ``FORMS`` value forms)."""

AA_VARIANTS = 2
"""FMA contractions of torch's antialiased downsizing (accumulation fused or not)."""

_cupy: ModuleType | None = None
_cupy_error: str | None = None
_modules: dict[str, object] = {}  # "paste": _SOURCE's, "step": _STEP_SOURCE's
_functions: dict[tuple[str, int], object] = {}
_external: dict[int, object] = {}
_variants: dict[tuple[PatchGrid, int], tuple[int, int] | None] = {}
_warned: set[str] = set()
_geometry: dict[tuple, tuple[torch.Tensor, ...]] = {}


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
    the kernels do not implement it."""
    if pixel_error is None:
        return -1
    return {losses.l1.pixel_error: 0, losses.mse.pixel_error: 1}.get(pixel_error)


def lowres_layout(grid: PatchGrid) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The coarse scales' sides ``s`` and where each one's (3, s, s) float32 block starts in a
    ``lowres`` row, then the row length ``L``: ((s_0, ..), (0, 3 s_0^2, .., L))."""
    sizes = tuple(grid.scales[:-1])
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + 3 * s * s)
    return sizes, tuple(offsets)


def unsupported(grid: PatchGrid, device: torch.device) -> str | None:
    """Why the kernels cannot run ``grid`` on ``device`` (None when they can): no CUDA device, no
    CuPy, a downsizing factor over ``MAX_TAPS`` taps, or no FMA contraction that rounds as torch
    does here (found once per grid and device, see ``lowres_variants``)."""
    if device.type != "cuda":
        return f"the kernels run on CUDA, not {device}"
    if cupy_module() is None:
        return f"CuPy does not import ({_cupy_error})"
    H = grid.frame_size
    taps = max((2 * math.ceil(H / s) + 1 for s in grid.scales[:-1]), default=0)
    if taps > MAX_TAPS:
        return f"a downsizing factor of {H}/{min(grid.scales)} reads {taps} taps per axis, over MAX_TAPS={MAX_TAPS}"
    if max(grid.region_sizes) > BLOCK:
        return f"a patch square of side {max(grid.region_sizes)} is wider than the kernels' {BLOCK} threads"
    if lowres_variants(grid, device) is None:
        return "no FMA contraction of the kernels' resizing rounds exactly as torch's on this device"
    return None


def warn_once(reason: str) -> None:
    """One warning per reason that the kernels were asked for and the torch code runs instead."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"kernel='cupy' asked for, using the torch code: {reason}", stacklevel=3)


def _function(name: str, device: torch.device):
    """Kernel ``name`` of ``_SOURCE`` or ``_STEP_SOURCE``, compiled on first use (each source as
    one module, so that one cannot break the other) and loaded once per device."""
    cp = cupy_module()
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (name, index)
    if key not in _functions:
        source = "step" if name in STEP_KERNEL_NAMES else "paste"
        if source not in _modules:
            if source == "step":
                _modules[source] = cp.RawModule(code=_STEP_SOURCE)
            else:
                pastes = [f"paste_gaze<{fused}, {form}>" for fused in (0, 1) for form in range(FORMS)]
                _modules[source] = cp.RawModule(code=_SOURCE, name_expressions=pastes)
        with cp.cuda.Device(index):
            _functions[key] = _modules[source].get_function(name)
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


def _launch(name: str, device: torch.device, grid: tuple[int, ...], args: tuple, shared: int = 0) -> None:
    """Launch kernel ``name`` on torch's current stream (the capturing stream inside a CUDA graph
    capture), so it is ordered with the torch ops around it; ``shared``: dynamic shared bytes."""
    cp = cupy_module()
    fn = _function(name, device)
    stream = _stream(torch.cuda.current_stream(device).cuda_stream)
    with cp.cuda.Device(device.index if device.index is not None else torch.cuda.current_device()), stream:
        fn(grid, (BLOCK,), args, shared_mem=shared)


def _tables(grid: PatchGrid, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Device tables, made once per grid and device (outside any graph capture: the first call is
    eager): patches (N, 4) int32 (scale, square side, top, left), coarse sides (S,), lowres offsets
    (S + 1,), ``aa_table``'s bases (S + 1,), spans (2, J) int32 and weights (MAX_TAPS, J) float32,
    and ``begin_rows``' bands (D, 4) int32 with their shared bytes."""
    key = (grid, device)
    if key not in _geometry:
        sizes, offsets = lowres_layout(grid)
        bases = [0]
        for s in sizes:
            bases.append(bases[-1] + s)
        i32 = dict(dtype=torch.int32, device=device)
        coarse = torch.tensor(sizes or (0,), **i32)
        base = torch.tensor(bases, **i32)
        spans = torch.zeros(2, max(1, bases[-1]), **i32)
        weights = torch.zeros(MAX_TAPS, max(1, bases[-1]), device=device)
        if sizes:
            args = (_ptr(coarse), _ptr(base), _ptr(spans), _ptr(weights))
            args += (np.int32(len(sizes)), np.int32(grid.frame_size))
            _launch("aa_table", device, (math.ceil(bases[-1] / BLOCK),), args)
        table = grid.table  # (N, 3): scale, row, col
        side = torch.tensor(grid.region_sizes)[table[:, 0]]
        patches = torch.stack([table[:, 0], side, table[:, 1] * side, table[:, 2] * side], dim=1)
        _geometry[key] = (
            patches.to(**i32).contiguous(),
            coarse,
            torch.tensor(offsets, **i32),
            base,
            spans,
            weights,
            _bands(sizes, bases, spans.cpu(), device),
        )
    return _geometry[key]


BAND_ROWS = 16
"""Output rows per block of ``begin_rows``' downsizing (fewer when a band's input lines do not fit
``BAND_SHARED`` bytes of shared memory)."""

BAND_SHARED = 32 * 1024
"""Most shared memory a ``begin_rows`` band uses for its x-pass lines."""


def _bands(
    sizes: tuple[int, ...], bases: list[int], spans: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, int]:
    """``begin_rows``' bands (D, 4) int32, (scale, channel, first output row, rows), each band's
    input lines (its x-pass outputs) within ``BAND_SHARED`` bytes, and the shared bytes the widest
    one needs. ``spans`` (2, J) on the host."""
    first, count = spans[0].tolist(), spans[1].tolist()

    def lines(k: int, o: int, rows: int) -> int:  # input lines output rows [o, o + rows) of scale k read
        last = bases[k] + o + rows - 1
        return first[last] + count[last] - first[bases[k] + o]

    bands, need = [], 0
    for k, s in enumerate(sizes):
        rows = min(BAND_ROWS, s)
        while rows > 1 and max(lines(k, o, min(rows, s - o)) for o in range(0, s, rows)) * s * 4 > BAND_SHARED:
            rows //= 2
        for o in range(0, s, rows):
            need = max(need, lines(k, o, min(rows, s - o)) * s * 4)
            bands += [(k, ch, o, min(rows, s - o)) for ch in range(3)]
    return torch.tensor(bands or [(0, 0, 0, 0)], dtype=torch.int32, device=device), need


def _contiguous(**tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous for the CuPy kernels, got strides {t.stride()}")


def _blocks(n: int) -> int:
    return max(1, math.ceil(n / (BLOCK * ELEMENTS_PER_THREAD)))


MAX_GRID_Y = 65535
"""CUDA's limit on a launch's second grid dimension, the rows of ``begin_rows`` / ``frame_error``:
more rows take several launches."""


def _row_chunks(C: int) -> list[tuple[int, int]]:
    return [(lo, min(C, lo + MAX_GRID_Y)) for lo in range(0, C, MAX_GRID_Y)]


def begin_rows(
    grid: PatchGrid,
    video: torch.Tensor,
    frame_t: torch.Tensor,
    rows: torch.Tensor,
    valid: torch.Tensor | None,
    lowres: torch.Tensor | None,
    level: torch.Tensor | None = None,
    frame_out: torch.Tensor | None = None,
    *,
    canvas: torch.Tensor | None = None,
    mode: int = -1,
    aa_variant: int | None = None,
) -> torch.Tensor | None:
    """The frame-start work of rows ``rows`` (int64 (C,), distinct) where ``valid`` (C,) bool (all
    when None), in place: ``lowres[rows[c]]`` = the coarse scales of frame ``video[rows[c],
    frame_t[rows[c]]]`` (clamped to the last frame) as torch's antialiased downsizing makes them
    (``PatchGrid.resize``), ``level[rows[c]] = -1`` and ``frame_out[rows[c]]`` = that frame (each
    when given). ``video`` (B, T, 3, H, W) uint8, ``frame_t`` (B,) int64, ``lowres`` (B, L) float32,
    ``level`` (B, H, W) int8, ``frame_out`` (B, 3, H, W) uint8.

    With ``canvas`` (B, 3, H, W) uint8 and ``mode`` 0 (l1) or 1 (mse / psnr), also returns
    ``frame_error``'s (C,) float64 sums of those frames against the rows' canvas (meaningless where
    not ``valid``), read in the same pass as the frame copy."""
    C, device = rows.shape[0], video.device
    scoring = canvas is not None
    if scoring and mode not in (0, 1):
        raise ValueError(f"begin_rows scores l1 (mode 0) or mse (mode 1), got mode {mode}")
    if C == 0:
        return torch.zeros(0, dtype=torch.float64, device=device) if scoring else None
    _contiguous(video=video, frame_t=frame_t, lowres=lowres, level=level, frame_out=frame_out, canvas=canvas)
    if aa_variant is None:
        aa_variant = lowres_variants(grid, device)[0] if lowres is not None else 0
    _, sizes, offsets, bases, spans, weights, (bands, shared) = _tables(grid, device)
    rows = rows.contiguous()
    valid = valid.contiguous() if valid is not None else None
    S, T, H = grid.num_scales - 1, video.shape[1], grid.frame_size
    D = bands.shape[0] if lowres is not None and S > 0 else 0
    n, hw = 3 * H * H, H * H
    vec = int(n % 16 == 0 and hw % 16 == 0)
    F = _blocks(n // 16 if vec else n) if level is not None or frame_out is not None or scoring else 0
    # (C, F) per-block sums; those of invalid rows stay unwritten (the caller masks them)
    partial = torch.empty(C, max(1, F), dtype=torch.float64, device=device) if scoring else None
    for lo, hi in _row_chunks(C) if D + F else ():
        part = (rows[lo:hi], None if valid is None else valid[lo:hi], None if partial is None else partial[lo:hi])
        pointers = (video, frame_t, part[0], part[1], lowres, level, frame_out, bands, sizes, offsets, bases, spans)
        pointers += (weights, canvas, part[2])
        scalars = (S, T, H, D, aa_variant, vec, mode)
        args = tuple(_ptr(t) for t in pointers) + tuple(np.int32(v) for v in scalars)
        _launch("begin_rows", device, (D + F, hi - lo), args, shared if D else 0)
    return partial.sum(1) if scoring else None


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
    """Paste gaze ``action`` (B,) int64 where ``active`` (B,) bool into a state whose
    ``aux["lowres"]`` ``begin_rows`` wrote; the contract of ``rewards.reconstruct.paste_gaze``.
    Returns (B,) float64 pixel-error deltas (into ``delta_out`` when given) for l1 / mse / psnr, or
    None (other or no ``pixel_error``: the caller rescores). ``canvas_out`` (B, 3, H, W) uint8,
    when given, receives every pixel written to the canvas (an observation buffer kept equal to it)."""
    mode = pixel_error_mode(pixel_error)
    mode = -1 if mode is None else mode
    B, device = state.batch_size, state.device
    delta = delta_out if delta_out is not None else torch.empty(B, dtype=torch.float64, device=device)
    if B == 0:
        return delta if mode >= 0 else None
    lowres = state.aux["lowres"]
    _contiguous(canvas=state.canvas, level=state.aux["level"], lowres=lowres, video=state.video)
    _contiguous(canvas_out=canvas_out, delta_out=delta_out)
    patches, sizes, offsets = _tables(grid, device)[:3]
    action = action.to(device=device, dtype=torch.int64).contiguous()
    active = active.to(device=device, dtype=torch.bool).contiguous()
    up_variant = lowres_variants(grid, device)[1]
    partial = torch.empty(B, PASTE_SPLIT, dtype=torch.float64, device=device)  # (B, SPLIT) per-block sums
    pointers = (state.canvas, canvas_out, state.aux["level"], lowres, state.video)
    pointers += (action, active, state.t, patches, sizes, offsets, partial)
    scalars = (grid.num_patches, grid.num_scales, state.num_frames, grid.frame_size, mode)
    args = tuple(_ptr(t) for t in pointers) + tuple(np.int32(s) for s in scalars)
    _launch(f"paste_gaze<{up_variant & 1}, {up_variant >> 1}>", device, (B, PASTE_SPLIT), args)
    if mode < 0:
        return None
    return torch.sum(partial, dim=1, out=delta)  # exact for l1 in any order (see the module docstring)


def frame_error(
    video: torch.Tensor,
    frame_t: torch.Tensor,
    canvas: torch.Tensor,
    rows: torch.Tensor,
    mode: int,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """(C,) float64: ``pixel_error(frame / 255, canvas[rows[c]] / 255)`` summed over the frame, where
    frame = ``video[rows[c], frame_t[rows[c]]]`` (clamped to the last frame), for ``mode`` 0 (l1) or 1
    (mse / psnr); ``video`` (B, T, 3, H, W) and ``canvas`` (B, 3, H, W) uint8, ``frame_t`` (B,) and
    ``rows`` (C,) int64; 0 (and no work) where ``valid`` (C,) bool, when given, is False."""
    if mode not in (0, 1):
        raise ValueError(f"frame_error computes l1 (mode 0) or mse (mode 1), got mode {mode}")
    C, device = rows.shape[0], video.device
    if C == 0:
        return torch.zeros(0, dtype=torch.float64, device=device)
    _contiguous(video=video, frame_t=frame_t, canvas=canvas)
    n = canvas[0].numel()
    blocks = _blocks(n)
    partial = torch.empty(C, blocks, dtype=torch.float64, device=device)
    rows = rows.contiguous()
    valid = valid.contiguous() if valid is not None else None
    for lo, hi in _row_chunks(C):
        pointers = (video, frame_t, canvas, rows[lo:hi], None if valid is None else valid[lo:hi], partial[lo:hi])
        args = tuple(_ptr(t) for t in pointers) + (np.int64(n), np.int32(video.shape[1]), np.int32(mode))
        _launch("frame_error", device, (blocks, hi - lo), args)
    return partial.sum(1)


def upsized_views(grid: PatchGrid, lowres: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """The full-resolution scale views (M, k, 3, H, W) uint8 of ``lowres`` rows (M, L) whose frames
    are ``frames`` (M, 3, H, W) uint8, with torch's upsizing: ``PatchGrid.scale_views(frames)`` bit
    for bit (``lowres`` holds torch's downsizing of them); for readers of whole views (the greedy
    oracle)."""
    sizes, offsets = lowres_layout(grid)
    H, M = grid.frame_size, frames.shape[0]
    views = []
    for k, s in enumerate(sizes):
        down = lowres[:, offsets[k] : offsets[k + 1]].view(M, 3, s, s)
        views.append(grid.resize(down, H).round_().clamp_(0, 255).to(torch.uint8))
    views.append(frames)
    return torch.stack(views, dim=1)


def lowres_variants(grid: PatchGrid, device: torch.device) -> tuple[int, int] | None:
    """The FMA contractions (downsizing, upsizing) in which the kernels' floats equal torch's
    ``PatchGrid.resize`` bit for bit on this device for every coarse scale of ``grid``, or None.
    The formulas are torch's, but how a compiler contracts them into FMAs is not promised: each
    variant is tried once (per grid and device, before any graph capture) on random and smooth
    frames."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (grid, index)
    if key in _variants:
        return _variants[key]
    device = torch.device("cuda", index)
    H, C = grid.frame_size, 3
    sizes, offsets = lowres_layout(grid)
    if not sizes:
        _variants[key] = (0, 0)
        return _variants[key]
    gen = torch.Generator(device=device).manual_seed(0)
    video = torch.randint(0, 256, (C, 1, 3, H, H), dtype=torch.uint8, device=device, generator=gen)
    video[1] = video[0].float().mean(1, keepdim=True).to(torch.uint8)  # smooth-ish planes too
    video[2] = video[2] // 64 * 64  # flat areas: exact .5 ties after upsizing
    frames = video[:, 0].float()
    rows, t = torch.arange(C, device=device), torch.zeros(C, dtype=torch.int64, device=device)
    lowres = torch.empty(C, offsets[-1], device=device)
    downs = [grid.resize(frames, s) for s in sizes]
    aa = None
    for variant in range(AA_VARIANTS):
        begin_rows(grid, video, t, rows, None, lowres, aa_variant=variant)
        got = [lowres[:, offsets[k] : offsets[k + 1]].view(C, 3, s, s) for k, s in enumerate(sizes)]
        if all(torch.equal(a, b) for a, b in zip(got, downs)):
            aa = variant
            break
    up = None
    out = torch.empty(C, 3, H, H, device=device)
    for variant in range(UPSAMPLE_VARIANTS):
        exact = True
        for k, s in enumerate(sizes):
            args = (_ptr(downs[k].contiguous()), _ptr(out), np.int32(s), np.int32(H))
            args += (np.float32(s) / np.float32(H), np.int32(variant))
            _launch("upsample_probe", device, (_blocks(3 * H * H), C), args)
            exact = exact and torch.equal(out, grid.resize(downs[k], H))
        if exact:
            up = variant
            break
    _variants[key] = None if aa is None or up is None else (aa, up)
    return _variants[key]


# ---- the static step's bookkeeping (gaze_env.core.StaticStep) -------------------------------
STEP_TENSORS = ("t", "done", "history", "counts", "budgets", "reward_frames", "loss", "err_sum")
STEP_TENSORS += ("frame_loss", "frame_start_loss", "steps")
"""The ``GazeState`` fields the step kernels read and write (contiguous, as ``core.reset`` makes them)."""


def step_unsupported(state: GazeState) -> str | None:
    """Why ``StaticStep`` cannot run its bookkeeping with the step kernels on ``state`` (None when
    it can): not on CUDA, no CuPy, a field not contiguous, or the kernels do not compile here."""
    if state.device.type != "cuda":
        return f"the step kernels run on CUDA, not {state.device}"
    if cupy_module() is None:
        return f"CuPy does not import ({_cupy_error})"
    for name in STEP_TENSORS:
        if not getattr(state, name).is_contiguous():
            return f"state.{name} is not contiguous (strides {getattr(state, name).stride()})"
    try:
        for name in STEP_KERNEL_NAMES:
            _function(name, state.device)
    except Exception as e:  # a compiler or driver error: the torch code still runs
        return f"the step kernels do not compile here ({type(e).__name__}: {e})"
    return None


def _rows_grid(n: int) -> tuple[int]:
    return (max(1, math.ceil(n / BLOCK)),)


def _dims(state: GazeState) -> tuple[np.int32, np.int32, np.int32]:
    """B, T, N of a state as kernel arguments."""
    B, T, N = state.history.shape
    return np.int32(B), np.int32(T), np.int32(N)


def step_check(state: GazeState, action: torch.Tensor, flags: torch.Tensor, min_gazes: int) -> None:
    """``flags[0] = 0`` when an action of ``action`` (B,) int64 is invalid for ``state`` (the check
    of ``core.valid_actions``); ``flags`` (3,) int64 with ``flags[0]`` set to 1 before."""
    pointers = (action, state.t, state.done, state.history, state.counts, flags)
    args = tuple(_ptr(t) for t in pointers) + _dims(state) + (np.int32(min_gazes),)
    _launch("step_check", state.device, _rows_grid(state.batch_size), args)


def step_gaze(state: GazeState, action: torch.Tensor, flags: torch.Tensor, tr: Transition) -> None:
    """``StaticStep.run`` up to the paste: the gazes of ``action`` (B,) int64 (where ``flags[0]``
    and the episode is live) recorded in ``history`` and ``counts``; ``tr.is_gaze``,
    ``tr.frame_index`` and ``tr.loss_before`` written."""
    pointers = (action, state.t, state.done, state.history, state.counts, state.loss, flags)
    pointers += (tr.is_gaze, tr.frame_index, tr.loss_before)
    args = tuple(_ptr(t) for t in pointers) + _dims(state)
    _launch("step_gaze", state.device, _rows_grid(state.batch_size), args)


def step_post(
    state: GazeState,
    action: torch.Tensor,
    flags: torch.Tensor,
    new_loss: torch.Tensor,
    tr: Transition,
    events: torch.Tensor,
) -> None:
    """``StaticStep.run`` after the paste: ``state.loss`` = ``new_loss`` (B,) float32 where
    ``tr.is_gaze``, the frame ends and what follows from them in ``state``, the rest of ``tr``,
    and ``events`` (2, B) int64: 1 where the row moved to a new frame (row 0) or terminated
    (row 1)."""
    _contiguous(new_loss=new_loss)
    pointers = (action, state.t, state.done, state.counts, state.budgets, state.reward_frames, state.loss)
    pointers += (new_loss, state.frame_loss, state.steps, flags, tr.is_gaze, tr.loss_after, tr.frame_end)
    pointers += (tr.scored, tr.terminated, tr.next_start_loss, events)
    args = tuple(_ptr(t) for t in pointers) + _dims(state)
    _launch("step_post", state.device, _rows_grid(state.batch_size), args)


def step_order(
    events: torch.Tensor, so_far: torch.Tensor, order: torch.Tensor, first_valid: torch.Tensor, flags: torch.Tensor
) -> None:
    """``order`` (B,) int64: the rows that moved to a new frame (``events[0]`` (B,)) first, stably,
    the others after them, from ``so_far`` = ``events.cumsum(1)`` (2, B); ``flags[1]`` and
    ``flags[2]`` the rows moved and terminated; ``first_valid`` (C,) bool: ``arange(C) <
    flags[1]``."""
    _contiguous(so_far=so_far)
    B, C = order.shape[0], first_valid.shape[0]
    args = tuple(_ptr(t) for t in (events, so_far, order, first_valid, flags)) + (np.int32(B), np.int32(C))
    _launch("step_order", order.device, _rows_grid(B), args)


def frame_start(
    state: GazeState,
    rows: torch.Tensor,
    valid: torch.Tensor,
    err: torch.Tensor,
    new_loss: torch.Tensor,
    next_start_loss: torch.Tensor,
) -> None:
    """Where ``valid`` (C,) bool: ``state.err_sum``, ``state.loss``, ``state.frame_start_loss`` at
    the current frame and ``next_start_loss`` (B,) float32 of row ``rows`` (C,) int64 set to its
    new frame's ``err`` (C,) float64 and ``new_loss`` (C,) float32; the other rows untouched."""
    rows, err, new_loss = rows.contiguous(), err.contiguous(), new_loss.contiguous()
    C, T = rows.shape[0], state.num_frames
    pointers = (rows, valid.contiguous(), err, new_loss, state.t, state.err_sum, state.loss)
    pointers += (state.frame_start_loss, next_start_loss)
    args = tuple(_ptr(t) for t in pointers) + (np.int32(C), np.int32(T))
    _launch("frame_start", state.device, _rows_grid(C), args)


def observe_rows(state: GazeState, obs: dict[str, torch.Tensor], info: dict[str, torch.Tensor], min_gazes: int) -> None:
    """``core.observe_flags(params, state, out=obs)`` and ``core.info(params, state, out=info)`` in
    one launch (the buffers contiguous, ``min_gazes`` the config's ``min_gazes_per_frame``)."""
    _contiguous(**obs, **{f"info_{k}": v for k, v in info.items()})
    B, T, N = state.history.shape
    pointers = (state.t, state.done, state.history, state.counts, state.budgets, state.loss, state.frame_loss)
    pointers += (obs["gazed"], obs["action_mask"], obs["frame_index"], obs["gazes_left"])
    pointers += (info["loss"], info["gazes_this_frame"], info["frame_loss"], info["gazing_ratio"])
    total = B * (N + 1)
    args = tuple(_ptr(t) for t in pointers) + (np.int64(total), np.int32(T), np.int32(N), np.int32(min_gazes))
    _launch("observe_rows", state.device, _rows_grid(total), args)
