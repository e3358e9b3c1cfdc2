"""Learned reconstruction reward: a block-causal multi-scale masked autoencoder (MAE).

The paper scores gazes with a ViT-MAE fine-tuned on video (REFERENCE.md, "Reconstruction model
and reward"). This module is this project's own version of it, sized for a CPU (``tiny``) or a GPU
(``small``), over any ``PatchGrid``:

- **Tokens.** Every gazed patch is one token: its ``p x p`` content at its own scale (the frame
  resized to that scale, cut to the patch), embedded linearly, plus a learned scale embedding, a
  fixed 2-D sin-cos embedding of the centre of the frame square it covers, and a learned frame
  (time) embedding. Ungazed patches never become tokens.
- **Encoder.** A pre-LN ViT over the gazed tokens of a clip. Tokens are packed per clip and padded
  only up to the largest count of the batch, with a key-padding mask. Attention is block-causal
  in time: a token of frame ``t`` attends to the tokens of frames ``<= t``, so adding later frames
  never changes what an earlier frame's tokens compute.
- **Decoder.** For each requested frame ``t``, one query per finest-scale patch position, each
  attending to the encoded tokens of frames ``<= t`` and to the queries of its own frame. A query
  starts from a mask token plus its position, the frame's time embedding and the **paste canvas**
  of that frame (the training-free reconstruction of ``rewards.reconstruct.PasteReconstructor``,
  recomputed here from the gazes, together with how old and how coarse its content is); the head
  predicts a residual over that canvas (initialised to zero). So an untrained MAE reconstructs
  exactly as the paste canvas does, and training only has to learn what the paste gets wrong:
  motion since the last gaze, blur of coarse gazes, never-gazed regions.
- **Output.** Pixels of the finest grid, (B, F, 3, H, W) float in [0, 1].

Batch API: ``BlockCausalMAE.reconstruct(video, gazed, frames)``. Environment API:
``MAEReconstructor`` (the ``Reconstructor`` protocol) and the ``mae`` reward
(``make_mae_reward``, registered in ``rewards.base.REGISTRY``)::

    gymnasium.make("AutoGaze-v0", reward="mae", reward_kwargs={"checkpoint": "runs/recon/tiny/final"})

Fast inference: ``MAEGraphRunner`` computes what ``reconstruct`` does with shapes rounded up to
buckets (``prepare_padded``: a fixed token capacity, padding masked out, no host sync) and, on
CUDA, replays one CUDA graph per bucket; ``MAEReconstructor`` uses it on CUDA by default.

Training helpers (used by ``experiments/train_recon.py``): ``sample_gaze_counts``,
``sample_gaze_masks`` (random multi-scale gazes drawn like real gazing) and ``mae_loss``.
Speed: ``python -m rewards.mae --bench`` (see ``benchmark``; eager vs graphed clips/s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gaze_env.config import get_preset
from gaze_env.patches import PatchGrid
from gaze_env.types import GazeState
from rewards.base import FrameReward
from rewards.losses import LossFn, make_loss
from rewards.reconstruct import PasteReconstructor

__all__ = [
    "MAE_KIND",
    "MODEL_SIZES",
    "BlockCausalMAE",
    "MAEConfig",
    "MAEFrameReward",
    "MAEGraphRunner",
    "MAEInputs",
    "MAEReconstructor",
    "benchmark",
    "load_mae",
    "mae_loss",
    "make_mae_reward",
    "sample_gaze_counts",
    "sample_gaze_masks",
]

MAE_KIND = "autogaze-block-causal-mae-v1"
"""``config.json["kind"]`` of an MAE checkpoint."""
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
"""File names of a checkpoint folder (written by ``experiments.training.save_checkpoint``)."""

GREY = 128.0
"""Value of never-gazed canvas pixels (the paste canvas's grey start)."""
_PIXEL_MEAN, _PIXEL_STD = 0.45, 0.25  # input normalisation of [0, 1] pixels

MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=128, depth=4, heads=4, dec_dim=96, dec_depth=2, dec_heads=4, mlp_ratio=2.0),
    "small": dict(dim=384, depth=8, heads=6, dec_dim=256, dec_depth=4, dec_heads=8, mlp_ratio=4.0),
}
"""Named model sizes: ``tiny`` trains on a CPU in minutes, ``small`` is meant for a GPU."""


# ---- configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class MAEConfig:
    """Geometry (from a preset) and size of a ``BlockCausalMAE``."""

    scales: tuple[int, ...]
    """Scales of the patch grid in pixels, ascending; the last is the frame size."""
    patch_size: int
    """Patch side ``p`` at every scale."""
    num_frames: int
    """Most frames per clip (length of the time embedding)."""
    preset: str | None = None
    """Preset the geometry came from (informative; checks compare the geometry itself)."""
    dim: int = 128
    """Encoder width (a multiple of 4 and of ``heads``)."""
    depth: int = 4
    """Encoder blocks."""
    heads: int = 4
    """Encoder attention heads."""
    dec_dim: int = 96
    """Decoder width (a multiple of 4 and of ``dec_heads``)."""
    dec_depth: int = 2
    """Decoder blocks."""
    dec_heads: int = 4
    """Decoder attention heads."""
    mlp_ratio: float = 2.0
    """MLP hidden width over block width."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(int(s) for s in self.scales))
        _ = self.grid  # validates the geometry
        for name, d, h in (("dim", self.dim, self.heads), ("dec_dim", self.dec_dim, self.dec_heads)):
            if d % 4 or h < 1 or d % h:
                raise ValueError(f"{name}={d} must be a multiple of 4 and of its head count {h}")
        if self.num_frames < 1 or self.depth < 1 or self.dec_depth < 1:
            raise ValueError(f"num_frames, depth and dec_depth must be >= 1, got {self}")

    @property
    def grid(self) -> PatchGrid:
        return PatchGrid(self.scales, self.patch_size)

    @classmethod
    def make(cls, preset: str = "tiny", size: str = "tiny", **overrides: Any) -> MAEConfig:
        """Geometry of ``preset`` (``tiny``, ``small``, ``paper``) with the widths of model ``size``
        (see ``MODEL_SIZES``) and field overrides."""
        if size not in MODEL_SIZES:
            raise ValueError(f"unknown MAE size {size!r}; known: {sorted(MODEL_SIZES)}")
        p = get_preset(preset)
        base = dict(scales=p.grid.scales, patch_size=p.grid.patch_size, num_frames=p.num_frames, preset=preset)
        return cls(**{**base, **MODEL_SIZES[size], **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scales"] = list(self.scales)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MAEConfig field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def describe(self) -> str:
        return (
            f"{self.preset or 'custom'} geometry ({self.grid.frame_size} px, scales {self.scales}, patch "
            f"{self.patch_size}, N={self.grid.num_patches}, {self.num_frames} frames)"
        )


# ---- pixels <-> patches ----------------------------------------------------------------------
def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, S, S) -> (B, (S/p)^2, C*p*p), patches row-major (the flat order of a scale)."""
    B, C, S, _ = x.shape
    g = S // p
    return x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)


def unpatchify(x: torch.Tensor, p: int, channels: int = 3) -> torch.Tensor:
    """Inverse of ``patchify``: (B, g*g, C*p*p) -> (B, C, g*p, g*p)."""
    B, G, _ = x.shape
    g = math.isqrt(G)
    return x.reshape(B, g, g, channels, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, channels, g * p, g * p)


def _sincos(coords: torch.Tensor, dim: int) -> torch.Tensor:
    """(M, 2) float (y, x) -> (M, dim) fixed 2-D sin-cos embedding (dim a multiple of 4)."""
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    parts = []
    for c in coords.double().unbind(1):
        a = c[:, None] * omega[None]
        parts += [a.sin(), a.cos()]
    return torch.cat(parts, 1).float()


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - _PIXEL_MEAN) / _PIXEL_STD


def _autocast(device: torch.device, cache: bool = True):
    """bf16 autocast on CUDA; nothing elsewhere (CPU runs in float32). ``cache=False`` for code
    captured in a CUDA graph (autocast's cache of cast weights must not outlive the capture)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def _attention_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, Q, K) bool, True = may attend -> the ``attn_mask`` of ``scaled_dot_product_attention``.

    On the CPU: the bool mask as (B, 1, Q, K). On CUDA: the additive bias SDPA would derive from
    it (0 where allowed, -inf elsewhere, in the dtype of the queries: autocast's when it is on),
    made once per forward instead of once per block, in rows padded to 16 elements so that the
    memory-efficient kernel reads it in place instead of copying it into an aligned buffer.
    """
    if mask.device.type != "cuda":
        return mask[:, None]
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.float32
    B, Q, K = mask.shape
    bias = torch.zeros(B, 1, Q, -(-K // 16) * 16, dtype=dtype, device=mask.device)[..., :K]
    return bias.masked_fill_(~mask[:, None], float("-inf"))


# ---- inputs ----------------------------------------------------------------------------------
@dataclass
class MAEInputs:
    """What the network reads for ``B`` clips and ``F`` requested frames per clip (``L`` packed
    tokens, ``G`` finest-scale patches, ``C = 3 p^2``). Built by ``BlockCausalMAE.prepare``."""

    tokens: torch.Tensor  # (B, L, C) float: [0, 1] pixels of each gazed patch at its scale; 0 on padding
    token_index: torch.Tensor  # (B, L) int64: flat patch index of each token (0 on padding)
    token_frame: torch.Tensor  # (B, L) int64: frame of each token (> every requested frame on padding)
    token_valid: torch.Tensor  # (B, L) bool: False on padding
    frames: torch.Tensor  # (B, F) int64: the frames to reconstruct
    prior: torch.Tensor  # (B, F, G, C) float: [0, 1] paste canvas of each requested frame, finest patches
    prior_age: torch.Tensor  # (B, F, G) int64: frames since a patch centre was last pasted; T if never
    prior_level: torch.Tensor  # (B, F, G) int64: 1 + scale of that paste; 0 if never


def _region_means(grid: PatchGrid, pixel_map: torch.Tensor) -> torch.Tensor:
    """(B, H, W) float -> (B, N): mean over each patch's frame square, flat order."""
    out = [F.avg_pool2d(pixel_map[:, None], r).flatten(1) for r in grid.region_sizes]
    return torch.cat(out, 1)


# ---- the network -----------------------------------------------------------------------------
class _Block(nn.Module):
    """Pre-LN transformer block. With ``memory`` (a decoder block) the keys and values are the
    memory tokens followed by the block's own tokens; the memory is read, never updated."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, memory: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm_mem = nn.LayerNorm(dim) if memory else None
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def _kv(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, D) -> (2, B, heads, S, D / heads): keys and values."""
        B, S, _ = x.shape
        return self.kv(x).reshape(B, S, 2, self.heads, -1).permute(2, 0, 3, 1, 4)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor | None = None, repeat: int = 1
    ) -> torch.Tensor:
        """x (B * repeat, Q, D); mask (B * repeat, 1, Q, K) bool, True = may attend; memory
        (B, K - Q, D) or None, shared by ``repeat`` consecutive rows of ``x`` (its keys and values
        are computed once per memory row)."""
        BR, Q, D = x.shape
        h = self.norm1(x)
        q = self.q(h).reshape(BR, Q, self.heads, -1).transpose(1, 2)
        kv = self._kv(h)
        if memory is not None:
            mem = self._kv(self.norm_mem(memory))  # (2, B, heads, K - Q, d): each row for `repeat` rows of x
            mem = mem[:, :, None].expand(-1, -1, repeat, -1, -1, -1).flatten(1, 2)
            kv = torch.cat([mem, kv], 3)
        a = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(BR, Q, D))
        return x + self.mlp(self.norm2(x))


class BlockCausalMAE(nn.Module):
    """Block-causal multi-scale MAE over gazed patches (see the module docstring)."""

    def __init__(self, config: MAEConfig) -> None:
        super().__init__()
        self.config = config
        grid = self.grid = config.grid
        p, k, T = grid.patch_size, grid.num_scales, config.num_frames
        C, D, Dd = 3 * p * p, config.dim, config.dec_dim
        G = grid.grid_sizes[-1] ** 2
        self.finest = slice(grid.offsets[-2], grid.offsets[-1])
        # encoder embeddings
        self.patch_embed = nn.Linear(C, D)
        self.scale_embed = nn.Parameter(torch.zeros(k, D))
        self.time_embed = nn.Parameter(torch.zeros(T, D))
        centres = grid.regions.reshape(-1, 2, 2).float().mean(1) / grid.region_sizes[-1]  # (N, 2), finest units
        self.register_buffer("pos_enc", _sincos(centres, D), persistent=False)  # (N, D)
        self.register_buffer("pos_dec", _sincos(centres[self.finest], Dd), persistent=False)  # (G, Dd)
        self.register_buffer("patch_scale", grid.patch_scale.clone(), persistent=False)  # (N,)
        # Paste cells: squares of `cell` pixels (the gcd of the region sides) that lie inside one
        # patch of every scale, so that the paste canvas is constant on each (``prepare_padded``).
        H, nc = grid.frame_size, grid.frame_size // math.gcd(*grid.region_sizes)
        self.cell = H // nc
        first = torch.arange(nc) * self.cell  # first pixel row (and column) of each cell
        cover = [
            grid.offsets[k] + (first[:, None] // side) * g + first[None, :] // side
            for k, (g, side) in enumerate(zip(grid.grid_sizes, grid.region_sizes))
        ]
        self.register_buffer("cell_cover", torch.stack(cover).flatten(1), persistent=False)  # (k, nc^2) patch
        centre = (torch.arange(grid.grid_sizes[-1]) * p + p // 2) // self.cell  # cell of each centre pixel
        self.register_buffer("centre_cell", (centre[:, None] * nc + centre).flatten(), persistent=False)  # (G,)
        self.blocks = nn.ModuleList(_Block(D, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.norm = nn.LayerNorm(D)
        # decoder
        self.memory_proj = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(Dd))
        self.prior_embed = nn.Linear(C, Dd)
        self.dec_time_embed = nn.Parameter(torch.zeros(T, Dd))
        self.age_embed = nn.Parameter(torch.zeros(T + 1, Dd))
        self.level_embed = nn.Parameter(torch.zeros(k + 1, Dd))
        self.dec_blocks = nn.ModuleList(
            _Block(Dd, config.dec_heads, config.mlp_ratio, memory=True) for _ in range(config.dec_depth)
        )
        self.dec_norm = nn.LayerNorm(Dd)
        self.head = nn.Linear(Dd, C)
        self.num_queries = G
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for prm in (self.scale_embed, self.time_embed, self.mask_token, self.dec_time_embed):
            nn.init.trunc_normal_(prm, std=0.02)
        for prm in (self.age_embed, self.level_embed):
            nn.init.trunc_normal_(prm, std=0.02)
        # the residual over the paste canvas starts at zero: an untrained MAE is the paste canvas
        nn.init.zeros_(self.head.weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def checkpoint_config(self) -> dict[str, Any]:
        """What ``config.json`` of a checkpoint must hold for ``load_mae``."""
        return {"kind": MAE_KIND, "model": self.config.to_dict()}

    # ---- inputs --------------------------------------------------------------------------------
    def check_inputs(self, video: torch.Tensor, gazed: torch.Tensor, frames: torch.Tensor) -> None:
        """Raise ValueError on inputs ``prepare`` cannot take (reads ``frames`` on the host)."""
        self.check_shapes(video, gazed, frames)
        T = video.shape[1]
        if frames.numel() and (int(frames.min()) < 0 or int(frames.max()) >= T):
            raise ValueError(f"frames must lie in [0, {T}), got {frames.min().item()}..{frames.max().item()}")

    def check_shapes(self, video: torch.Tensor, gazed: torch.Tensor, frames: torch.Tensor) -> None:
        """The checks of ``check_inputs`` that need no host read: dtypes and shapes."""
        grid, H = self.grid, self.grid.frame_size
        if video.dtype != torch.uint8 or video.ndim != 5 or tuple(video.shape[2:]) != (3, H, H):
            raise ValueError(
                f"video must be uint8 (B, T, 3, {H}, {H}) for this MAE, got {video.dtype} {tuple(video.shape)}"
            )
        B, T = video.shape[:2]
        if T > self.config.num_frames:
            raise ValueError(f"clips of {T} frames are longer than this MAE's {self.config.num_frames}")
        if gazed.dtype != torch.bool or tuple(gazed.shape) != (B, T, grid.num_patches):
            raise ValueError(
                f"gazed must be bool (B, T, N) = {(B, T, grid.num_patches)}, got {gazed.dtype} {tuple(gazed.shape)}"
            )
        if frames.ndim != 2 or frames.shape[0] != B or frames.shape[1] < 1:
            raise ValueError(f"frames must be int64 (B, F) with B = {B} and F >= 1, got {tuple(frames.shape)}")

    @torch.no_grad()
    def prepare(self, video: torch.Tensor, gazed: torch.Tensor, frames: torch.Tensor) -> MAEInputs:
        """Pack the gazed tokens and compute the paste canvas of the requested frames.

        Args:
            video: (B, T, 3, H, W) uint8 clips.
            gazed: (B, T, N) bool gazed patches of every frame.
            frames: (B, F) int64 frames to reconstruct, each in [0, T).

        Only tokens of frames up to each clip's last requested frame are packed (later ones
        could not be attended to anyway).
        """
        frames = torch.as_tensor(frames, dtype=torch.int64, device=video.device)
        self.check_inputs(video, gazed, frames)
        grid, device = self.grid, video.device
        p, H = grid.patch_size, grid.frame_size
        B, Fq = frames.shape
        Tm = int(frames.max()) + 1
        last = frames.max(1).values  # (B,)
        keep = gazed[:, :Tm] & (torch.arange(Tm, device=device)[None, :, None] <= last[:, None, None])
        idx = keep.nonzero()  # (M, 3): (clip, frame, patch), sorted by clip then frame
        counts = keep.flatten(1).sum(1)  # (B,)
        L = max(int(counts.max()) if B else 0, 1)
        pos = torch.arange(idx.shape[0], device=device) - (counts.cumsum(0) - counts)[idx[:, 0]]
        C = 3 * p * p
        tokens = torch.zeros(B, L, C, device=device)
        token_index = torch.zeros(B, L, dtype=torch.int64, device=device)
        token_frame = torch.full((B, L), Tm, dtype=torch.int64, device=device)
        token_valid = torch.zeros(B, L, dtype=torch.bool, device=device)
        token_index[idx[:, 0], pos] = idx[:, 2]
        token_frame[idx[:, 0], pos] = idx[:, 1]
        token_valid[idx[:, 0], pos] = True

        # paste canvas, replayed frame by frame exactly as PasteReconstructor builds it
        c = p // 2  # age and level are read at the centre pixel of each finest patch
        G = grid.grid_sizes[-1] ** 2
        canvas = torch.full((B, 3, H, H), GREY, device=device)  # 0..255 float
        stamp = torch.full((B, H, H), -1, dtype=torch.int64, device=device)  # frame of the last paste
        level = torch.full((B, H, H), -1, dtype=torch.int64, device=device)  # its scale
        prior = torch.zeros(B, Fq, 3, H, H, device=device)
        prior_stamp = torch.zeros(B, Fq, G, dtype=torch.int64, device=device)
        prior_level = torch.zeros(B, Fq, G, dtype=torch.int64, device=device)
        for t in range(Tm):
            x = video[:, t].float()  # (B, 3, H, W) 0..255
            feats = []
            for k, s in enumerate(grid.scales):
                down = x if s == H else grid.resize(x, s)
                feats.append(patchify(down, p))
                m = grid.pixel_mask(gazed[:, t], scale=k)  # (B, H, W)
                view = x if s == H else grid.resize(down, H).round_().clamp_(0, 255)
                canvas = torch.where(m[:, None], view, canvas)
                stamp = torch.where(m, t, stamp)
                level = torch.where(m, k, level)
            in_t = idx[:, 1] == t
            sel = idx[in_t]
            tokens[sel[:, 0], pos[in_t]] = torch.cat(feats, 1)[sel[:, 0], sel[:, 2]] / 255
            hit = frames == t  # (B, F): snapshot the canvas of the requested frames (no host sync)
            prior = torch.where(hit[:, :, None, None, None], canvas[:, None], prior)
            prior_stamp = torch.where(hit[..., None], stamp[:, c::p, c::p].flatten(1)[:, None], prior_stamp)
            prior_level = torch.where(hit[..., None], level[:, c::p, c::p].flatten(1)[:, None], prior_level)
        T = self.config.num_frames
        age = torch.where(prior_stamp >= 0, (frames[..., None] - prior_stamp).clamp(0, T - 1), T)
        return MAEInputs(
            tokens=tokens,
            token_index=token_index,
            token_frame=token_frame,
            token_valid=token_valid,
            frames=frames,
            prior=patchify(prior.flatten(0, 1) / 255, p).reshape(B, Fq, -1, C),
            prior_age=age,
            prior_level=prior_level + 1,
        )

    @torch.no_grad()
    def prepare_padded(
        self, video: torch.Tensor, gazed: torch.Tensor, frames: torch.Tensor, capacity: int
    ) -> MAEInputs:
        """``prepare`` with a fixed token capacity and no host synchronisation (CUDA-graph safe).

        Args:
            video: (B, T, 3, H, W) uint8 clips.
            gazed: (B, T, N) bool gazed patches of every frame.
            frames: (B, F) int64 frames to reconstruct, each in [0, T) (not checked here: the
                caller validates, e.g. with ``check_inputs``).
            capacity: token slots per clip, ``L``. It must be at least the gazes of frames up to
                each clip's last requested frame: tokens past it are dropped. The slots after a
                clip's tokens are padding (``token_valid`` False), masked out of all attention, so
                the network's output does not depend on ``capacity`` (up to rounding).

        The inputs equal ``prepare``'s on every valid token (same order: by frame, then patch)
        and in ``prior``, ``prior_age`` and ``prior_level`` exactly; padding tokens carry frame
        ``T``. Every frame of ``video`` is processed (``prepare`` stops at the last requested
        one): pass ``video[:, :Tm]`` to save the work.
        """
        grid, device = self.grid, video.device
        p, H, K, N = grid.patch_size, grid.frame_size, grid.num_scales, grid.num_patches
        B, T = video.shape[:2]
        Fq, C, G = frames.shape[1], 3 * p * p, self.num_queries
        frame_ids = torch.arange(T, device=device)
        b = torch.arange(B, device=device)[:, None]

        # token slots: the gazes of frames <= the clip's last requested one, packed in order
        keep = (gazed & (frame_ids[:, None] <= frames.max(1).values[:, None, None])).flatten(1)  # (B, T N)
        slot = keep.cumsum(1) - 1
        slot = torch.where(keep & (slot < capacity), slot, capacity)  # the rest go to a dropped slot
        src = torch.zeros(B, capacity + 1, dtype=torch.int64, device=device)
        src = src.scatter_(1, slot, torch.arange(T * N, device=device).expand(B, -1))[:, :capacity]  # (B, L) t N + n
        token_valid = torch.arange(capacity, device=device) < keep.sum(1, keepdim=True)  # (B, L)

        # Every frame at every scale: patch contents (token features) and paste views, as ``prepare``
        # makes them, each written once straight into its final layout.
        BT, cs = B * T, self.cell
        nc, m = H // cs, p // cs  # cells per side, per patch side

        def cells(img: torch.Tensor) -> torch.Tensor:  # (B T, 3, H, W) -> (B T, nc, nc, 3, cs, cs) view
            return img.reshape(BT, 3, nc, cs, nc, cs).permute(0, 2, 4, 1, 3, 5)

        x = video.flatten(0, 1)  # (B T, 3, H, W) uint8
        xf = x.float() if K > 1 else x  # input of the resizes of the coarser scales
        feats = torch.empty(BT, N, C, device=device)  # 0..255 patch contents of every scale, flat order
        views = torch.empty(BT, K, nc, nc, 3, cs, cs, dtype=torch.uint8, device=device)  # by cell
        for k, (s, g) in enumerate(zip(grid.scales, grid.grid_sizes)):
            down = x if s == H else grid.resize(xf, s)
            patches = down.reshape(BT, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
            feats[:, grid.offsets[k] : grid.offsets[k + 1]].view(BT, g, g, 3, p, p).copy_(patches)
            # ``prepare`` also clamps the rounded view to [0, 255]: a no-op, as both resizes
            # average their inputs with non-negative weights summing to 1, so the view stays in
            # [0, 255] up to float rounding, which rounding to integers removes
            views[:, k].copy_(cells(x if s == H else grid.resize(down, H).round_()))
        feats = feats.reshape(B, T * N, C)
        tokens = torch.where(token_valid[..., None], feats[b, src] / 255, 0.0)  # (B, L, C)

        # paste canvas: per cell and frame, the finest scale pasting it (1 + k; 0: none), then for
        # each requested frame the last frame <= it that pasted the cell and that paste's view
        level = (gazed[:, :, self.cell_cover] * torch.arange(1, K + 1, device=device)[:, None]).amax(2)  # (B, T, cells)
        pasted = (level[:, None] > 0) & (frame_ids[:, None] <= frames[:, :, None, None])  # (B, F, T, cells)
        stamp = torch.where(pasted, frame_ids[:, None], -1).amax(2)  # (B, F, cells): -1 if never
        level = level.gather(1, stamp.clamp(min=0)).masked_fill_(stamp < 0, 0)  # (B, F, cells)
        source = (stamp.clamp(min=0) * K + (level - 1).clamp(min=0)) * nc * nc + torch.arange(nc * nc, device=device)
        canvas = views.reshape(B, T * K * nc * nc, -1)[b, source.flatten(1)]  # (B, F cells, 3 cs^2) uint8
        canvas = torch.where(level.reshape(B, -1, 1) > 0, canvas, GREY).div_(255)  # [0, 1]; grey if never pasted
        # cells -> finest patches: cell row i m + a of patch row i holds its pixel rows a cs .. a cs + cs - 1
        gf = grid.grid_sizes[-1]
        canvas = canvas.reshape(B * Fq, gf, m, gf, m, 3, cs, cs)
        prior = canvas.permute(0, 1, 3, 5, 2, 6, 4, 7).reshape(B, Fq, G, C)
        stamp_c = stamp[:, :, self.centre_cell]  # (B, F, G) at the centre pixel of each finest patch
        Tn = self.config.num_frames
        return MAEInputs(
            tokens=tokens,
            token_index=torch.where(token_valid, src % N, 0),
            token_frame=torch.where(token_valid, src // N, T),
            token_valid=token_valid,
            frames=frames,
            prior=prior,
            prior_age=torch.where(stamp_c >= 0, (frames[..., None] - stamp_c).clamp(0, Tn - 1), Tn),
            prior_level=level[:, :, self.centre_cell],
        )

    # ---- network -------------------------------------------------------------------------------
    def forward(self, inputs: MAEInputs) -> torch.Tensor:
        """(B, F, 3, H, W) float reconstruction in [0, 1] units, not clamped."""
        tf, valid, frames = inputs.token_frame, inputs.token_valid, inputs.frames
        B, L = tf.shape
        Fq = frames.shape[1]
        T = self.config.num_frames
        x = (
            self.patch_embed(_normalise(inputs.tokens))
            + self.pos_enc[inputs.token_index]
            + self.scale_embed[self.patch_scale[inputs.token_index]]
            + self.time_embed[tf.clamp(max=T - 1)]
        )
        eye = torch.eye(L, dtype=torch.bool, device=x.device)
        enc_mask = (valid[:, None, :] & (tf[:, None, :] <= tf[:, :, None])) | eye  # (B, L, L)
        enc_mask = _attention_mask(enc_mask)
        for blk in self.blocks:
            x = blk(x, enc_mask)
        memory = self.memory_proj(self.norm(x))  # (B, L, Dd)

        G, Dd = self.num_queries, self.config.dec_dim
        q = (
            self.mask_token
            + self.prior_embed(_normalise(inputs.prior))
            + self.pos_dec
            + self.dec_time_embed[frames][:, :, None]
            + self.age_embed[inputs.prior_age]
            + self.level_embed[inputs.prior_level]
        ).reshape(B * Fq, G, Dd)
        sees = valid[:, None, :] & (tf[:, None, :] <= frames[:, :, None])  # (B, F, L)
        dec_mask = torch.cat([sees.reshape(B * Fq, 1, L).expand(-1, G, -1), sees.new_ones(B * Fq, G, G)], 2)
        dec_mask = _attention_mask(dec_mask)
        for blk in self.dec_blocks:
            q = blk(q, dec_mask, memory, repeat=Fq)
        out = inputs.prior.reshape(B * Fq, G, -1) + self.head(self.dec_norm(q)).float()
        H = self.grid.frame_size
        return unpatchify(out, self.grid.patch_size).reshape(B, Fq, 3, H, H)

    @torch.no_grad()
    def reconstruct(self, video: torch.Tensor, gazed: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Reconstruct frames ``frames`` (B, F) int64 of ``video`` (B, T, 3, H, W) uint8 from the
        gazes ``gazed`` (B, T, N) bool: (B, F, 3, H, W) float in [0, 1]. Frame ``t`` depends only on
        the content and gazes of frames ``<= t``. Runs in eval mode (bf16 autocast on CUDA)."""
        was_training = self.training
        self.eval()
        try:
            inputs = self.prepare(video, gazed, frames)
            with _autocast(video.device):
                return self(inputs).float().clamp_(0, 1)
        finally:
            self.train(was_training)


# ---- checkpoints -----------------------------------------------------------------------------
def _checkpoint_dir(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir() and not (path / CONFIG_FILE).exists() and (path / "final" / CONFIG_FILE).exists():
        return path / "final"  # a run folder: its final checkpoint
    return path


def load_mae(path: str | Path, device: str | torch.device = "cpu") -> BlockCausalMAE:
    """Load an MAE checkpoint folder (``config.json`` + ``model.safetensors``, as written by
    ``experiments.train_recon``), or a run folder holding ``final/``.

    Raises:
        FileNotFoundError: no checkpoint there (the message says how to train one).
        ValueError: the folder holds another kind of checkpoint, or weights that do not fit.
    """
    folder = _checkpoint_dir(path)
    missing = [name for name in (CONFIG_FILE, MODEL_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"no MAE checkpoint at {str(path)!r}: missing {missing} in {str(folder)!r}. Train one with "
            "`python -m experiments.train_recon --preset tiny` (writes runs/recon/tiny/final/) and pass "
            "that folder as reward_kwargs={'checkpoint': ...}"
        )
    meta = json.loads((folder / CONFIG_FILE).read_text())
    if meta.get("kind") != MAE_KIND or "model" not in meta:
        raise ValueError(
            f"{folder / CONFIG_FILE} is not an MAE checkpoint (kind {meta.get('kind')!r}, want {MAE_KIND!r})"
        )
    from safetensors.torch import load_file  # only checkpoint loading needs safetensors

    model = BlockCausalMAE(MAEConfig.from_dict(meta["model"]))
    try:
        model.load_state_dict(load_file(str(folder / MODEL_FILE)))
    except RuntimeError as e:
        raise ValueError(f"weights in {folder / MODEL_FILE} do not fit its config: {e}") from e
    return model.to(device).eval()


# ---- fast inference --------------------------------------------------------------------------
def _bucket(n: int, per_octave: int) -> int:
    """Smallest ``m * 2^e >= n`` with ``per_octave <= m < 2 per_octave`` (``n`` itself when
    ``n <= 2 per_octave``): sizes with at most ``1 / per_octave`` of padding, few per octave."""
    step = 1 << max(0, max(n, 1).bit_length() - 1 - (per_octave.bit_length() - 1))
    return max(1, -(-n // step) * step)


def token_capacity(count: int) -> int:
    """Token slots ``MAEGraphRunner`` gives clips of at most ``count`` tokens: 8 sizes per octave
    (<= 12.5% padding), multiples of 16 (aligned attention rows), at least 16."""
    return max(16, -(-_bucket(count, 8) // 16) * 16)


@dataclass
class _Captured:
    """One CUDA graph of ``MAEGraphRunner._compute`` and its static tensors."""

    graph: torch.cuda.CUDAGraph
    video: torch.Tensor  # (Bb, Tm, 3, H, W) uint8 input
    gazed: torch.Tensor  # (Bb, Tm, N) bool input
    frames: torch.Tensor  # (Bb, F) int64 input
    out: torch.Tensor  # (Bb, F, 3, H, W) float32 output


class MAEGraphRunner:
    """Fast ``BlockCausalMAE.reconstruct``: fixed token capacity, then one CUDA graph replay.

    ``reconstruct`` packs exactly the gazed tokens (host reads of their counts) and replays the
    paste canvas frame by frame: hundreds of small launches with host syncs in between, so it is
    launch-bound at small batches. Here each call makes one host read (the range of ``frames``,
    to validate them, and the largest token count), rounds the shapes up to buckets, and runs
    ``prepare_padded`` + the network, which need no host sync:

    - batch ``B`` -> ``Bb`` (4 sizes per octave; extra rows are empty clips whose outputs are
      dropped), frames to read ``max(frames) + 1`` -> the next power of two ``Tm`` (at most
      ``T``), tokens -> ``token_capacity`` (padding slots are masked out of attention);
    - on CUDA (``graphs=True``, the default there) each ``(Bb, Tm, F, capacity)`` is captured once
      as a CUDA graph (autocast bf16, as ``reconstruct``) and replayed: inputs are copied into its
      static buffers and the output is copied out, so results never alias the graph's memory;
    - with ``graphs=False`` the same padded computation runs eagerly (CPU, or CUDA without graphs).

    The output equals ``reconstruct``'s up to rounding: float32 on the CPU (<= 1e-5), bf16 on
    CUDA (the padded shapes can change kernel tiling). Graphs share one memory pool; the
    ``max_graphs`` most recently used are kept. They read the model's parameters in place: weight
    updates (``load_state_dict``, optimiser steps) are seen, and moving the model to new memory
    (``.to(...)``) drops the graphs, which are captured again on the next call.
    """

    def __init__(self, model: BlockCausalMAE, graphs: bool | None = None, max_graphs: int = 32) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.model = model
        self.graphs = graphs
        self.max_graphs = max_graphs
        self._captured: OrderedDict[tuple[int, int, int, int], _Captured] = OrderedDict()
        self._pool: tuple[int, int] | None = None
        self._memory: tuple[int, ...] = ()  # parameter / buffer addresses the graphs read

    @property
    def num_graphs(self) -> int:
        return len(self._captured)

    @torch.no_grad()
    def __call__(self, video: torch.Tensor, gazed: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Same contract as ``BlockCausalMAE.reconstruct``: (B, F, 3, H, W) float in [0, 1]."""
        model, device = self.model, video.device
        frames = torch.as_tensor(frames, dtype=torch.int64, device=device)
        model.check_shapes(video, gazed, frames)
        graphs = device.type == "cuda" if self.graphs is None else self.graphs
        if graphs and device.type != "cuda":
            raise ValueError(f"graphs=True needs CUDA inputs, got them on {device}")
        B, T = video.shape[:2]
        if B == 0:
            return torch.zeros(0, frames.shape[1], 3, video.shape[-1], video.shape[-1], device=device)
        last = frames.max(1).values  # (B,)
        count = (gazed & (torch.arange(T, device=device)[:, None] <= last[:, None, None])).flatten(1).sum(1).max()
        lo, hi, n = torch.stack([frames.min(), last.max(), count]).tolist()  # the one host read
        if lo < 0 or hi >= T:
            raise ValueError(f"frames must lie in [0, {T}), got {lo}..{hi}")
        Tm, cap = min(T, 1 << hi.bit_length()), token_capacity(n)
        if not graphs:
            return self._compute(video[:, :Tm], gazed[:, :Tm], frames, cap)
        g = self._graph(_bucket(B, 4), Tm, frames.shape[1], cap, video)
        g.video[:B].copy_(video[:, :Tm])
        g.gazed[:B].copy_(gazed[:, :Tm])
        g.frames[:B].copy_(frames)
        if B < g.video.shape[0]:  # rows of an earlier, larger batch: make them empty clips again
            g.gazed[B:].zero_()
            g.frames[B:].zero_()
        g.graph.replay()
        return g.out[:B].clone()

    def _compute(self, video: torch.Tensor, gazed: torch.Tensor, frames: torch.Tensor, capacity: int) -> torch.Tensor:
        model = self.model
        was_training = model.training
        model.eval()
        try:
            inputs = model.prepare_padded(video, gazed, frames, capacity)
            with _autocast(video.device, cache=False):
                return model(inputs).float().clamp_(0, 1)
        finally:
            model.train(was_training)

    def _graph(self, Bb: int, Tm: int, Fq: int, capacity: int, like: torch.Tensor) -> _Captured:
        """The graph of these shapes, captured on first use (after a warm-up on a side stream,
        as capture requires); the least recently used one goes once ``max_graphs`` are held."""
        memory = tuple(t.data_ptr() for t in (*self.model.parameters(), *self.model.buffers()))
        if memory != self._memory:
            self._captured.clear()
            self._memory = memory
        key = (Bb, Tm, Fq, capacity)
        if key in self._captured:
            self._captured.move_to_end(key)
            return self._captured[key]
        device = like.device
        H, N = self.model.grid.frame_size, self.model.grid.num_patches
        video = torch.zeros(Bb, Tm, 3, H, H, dtype=torch.uint8, device=device)
        gazed = torch.zeros(Bb, Tm, N, dtype=torch.bool, device=device)
        frames = torch.zeros(Bb, Fq, dtype=torch.int64, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._compute(video, gazed, frames, capacity)
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            # One pool for all graphs: they never run concurrently and nothing in the pool is read
            # after a replay but the output, which is copied out at once.
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._compute(video, gazed, frames, capacity)
        self._captured[key] = _Captured(graph, video, gazed, frames, out)
        while len(self._captured) > self.max_graphs:
            self._captured.popitem(last=False)
        return self._captured[key]


# ---- the environment's reconstructor and reward ----------------------------------------------
class MAEReconstructor:
    """The ``Reconstructor`` protocol with the learned MAE scoring frame ends.

    Running the MAE after every gaze would cost one network pass per step, so it is deferred:

    - ``init`` / ``begin_frame`` / ``gaze`` keep the paste canvas (``PasteReconstructor``, grey
      start) up to date: it is the observation's ``canvas`` and, during a frame, ``state.loss``
      (what the ``dense`` reward and ``info["loss"]`` read) is the paste canvas's loss.
    - ``end_frame`` (called by ``gaze_env.core.step`` on the rows whose frame just ended, before
      ``loss_after`` / ``frame_loss`` are recorded) runs the MAE on those rows and returns the
      loss of its reconstruction of the ending frame, from all gazes of frames ``<= t``. So the
      ``frame`` reward and ``state.frame_loss`` come from the MAE.

    Args:
        model: a ``BlockCausalMAE`` (moved to the state's device on ``init``).
        frames: ``"scored"`` (default) runs the MAE only on frame ends the ``frame`` reward scores
            (``state.reward_frames``; the paper reconstructs 2 of 16 frames) and leaves the paste
            loss on the others; ``"all"`` runs it at every frame end.
        graphs: run the MAE through ``MAEGraphRunner`` (padded shapes, CUDA graphs) on CUDA
            states; ``None`` (default) = yes, ``False`` = ``BlockCausalMAE.reconstruct`` as on the
            CPU, which always uses ``reconstruct``.
    """

    def __init__(self, model: BlockCausalMAE, frames: str = "scored", graphs: bool | None = None) -> None:
        if frames not in ("scored", "all"):
            raise ValueError(f"frames must be 'scored' or 'all', got {frames!r}")
        self.model = model.eval()
        self.frames = frames
        self.paste = PasteReconstructor(model.grid, "grey")
        self.graphs = graphs
        self.runner = MAEGraphRunner(self.model, graphs=True)

    def check_state(self, state: GazeState) -> None:
        """Raise ValueError when the env's clips do not fit the model's geometry."""
        cfg = self.model.config
        grid = cfg.grid
        T, H, N = state.video.shape[1], state.video.shape[-1], state.history.shape[-1]
        if H != grid.frame_size or N != grid.num_patches or T > cfg.num_frames:
            raise ValueError(
                f"the MAE checkpoint was trained for the {cfg.describe()}, but the env's clips are {H} px with "
                f"N={N} patches and {T} frames: train a checkpoint for the env's preset "
                "(python -m experiments.train_recon --preset <preset>) or make the env with the checkpoint's preset"
            )

    def init(self, state: GazeState) -> None:
        self.check_state(state)
        self.model.to(state.device)
        self.paste.init(state)

    def begin_frame(self, state: GazeState, rows: torch.Tensor) -> None:
        self.paste.begin_frame(state, rows)

    def gaze(self, state: GazeState, action: torch.Tensor, active: torch.Tensor, pixel_error=None):
        return self.paste.gaze(state, action, active, pixel_error)

    def end_frame(self, state: GazeState, rows: torch.Tensor, loss: LossFn) -> torch.Tensor:
        """Loss (M,) float32 of the frame each row of ``rows`` (int64 (M,)) just ended."""
        t = state.t[rows]
        out = state.loss[rows].clone()
        sel = state.reward_frames[rows, t] if self.frames == "scored" else torch.ones_like(t, dtype=torch.bool)
        r = rows[sel]
        if r.numel():
            fast = state.device.type == "cuda" and self.graphs is not False
            reconstruct = self.runner if fast else self.model.reconstruct
            recon = reconstruct(state.video[r], state.history[r], t[sel][:, None])[:, 0]
            target = state.video[r, t[sel]].float().div_(255)
            out[sel] = loss(target, recon).float()
        return out


@dataclass
class MAEFrameReward(FrameReward):
    """The paper's ``frame`` reward over MAE reconstructions; ``reconstructor`` replaces the
    env's paste canvas (``gaze_env.builder.build`` picks it up)."""

    reconstructor: MAEReconstructor | None = None


def make_mae_reward(
    checkpoint: str | Path | None = None,
    loss: Any = "l1",
    gaze_cost: float = 0.0,
    loss_threshold: float | None = None,
    frames: str = "scored",
    graphs: bool | None = None,
) -> MAEFrameReward:
    """Factory of the ``mae`` reward: ``reward_kwargs={"checkpoint": folder, "loss": ..., "gaze_cost":
    ..., "loss_threshold": ..., "frames": "scored" | "all", "graphs": None | bool}`` (see
    ``MAEReconstructor``).

    The checkpoint's geometry is checked against the env's clips at ``reset`` (the factory does not
    see the env's preset): a mismatch raises ValueError naming both.
    """
    if checkpoint is None:
        raise ValueError(
            "the 'mae' reward needs reward_kwargs={'checkpoint': <folder>}, e.g. runs/recon/tiny/final "
            "written by `python -m experiments.train_recon --preset tiny`"
        )
    model = load_mae(checkpoint)
    return MAEFrameReward(make_loss(loss), float(gaze_cost), loss_threshold, MAEReconstructor(model, frames, graphs))


# ---- training --------------------------------------------------------------------------------
def _gamma_int(shape: tuple[int, ...], alpha: int, generator: torch.Generator) -> torch.Tensor:
    """Gamma(alpha, 1) samples for an integer ``alpha``: a sum of ``alpha`` unit exponentials."""
    u = torch.rand((*shape, alpha), generator=generator, device=generator.device)
    return -torch.log1p(-u).sum(-1)


def sample_gaze_counts(
    batch: int,
    num_frames: int,
    num_patches: int,
    generator: torch.Generator,
    *,
    ratio_range: tuple[float, float] = (0.02, 0.2),
    ratio_scale: float = 0.05,
    alpha_first: int = 10,
    alpha_rest: int = 3,
) -> torch.Tensor:
    """Gaze counts per frame like the paper's greedy labels: (B, T) int64, each in [1, N].

    Per clip, a gazing ratio ~ exponential (mean ``ratio_scale``) truncated to ``ratio_range``;
    the clip's ``ratio * N * T`` gazes are split over frames by a Dirichlet with concentration
    ``alpha_first`` for frame 0 and ``alpha_rest`` for the others (integers; the first frame needs
    more). Randomness only from ``generator`` (its device is used, the result is on it).
    """
    lo, hi = ratio_range
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"ratio_range must satisfy 0 < lo <= hi <= 1, got {ratio_range}")
    if int(alpha_first) != alpha_first or int(alpha_rest) != alpha_rest or min(alpha_first, alpha_rest) < 1:
        raise ValueError(f"alpha_first / alpha_rest must be integers >= 1, got {alpha_first}, {alpha_rest}")
    u = torch.rand(batch, generator=generator, device=generator.device)
    lam = 1.0 / ratio_scale
    ratio = lo - torch.log1p(-u * (1 - math.exp(-lam * (hi - lo)))) / lam  # (B,) truncated exponential
    shares = torch.cat(
        [
            _gamma_int((batch, 1), int(alpha_first), generator),
            _gamma_int((batch, num_frames - 1), int(alpha_rest), generator),
        ],
        1,
    )[:, :num_frames]
    shares = shares / shares.sum(1, keepdim=True)
    total = ratio * num_patches * num_frames
    return (shares * total[:, None]).round().clamp(1, num_patches).to(torch.int64)


def sample_gaze_masks(
    grid: PatchGrid,
    video: torch.Tensor,
    counts: torch.Tensor,
    generator: torch.Generator,
    *,
    coarse_bias: float = 1.0,
    change_bias: float = 1.0,
    uniform_prob: float = 0.25,
    bias_jitter: float = 1.0,
) -> torch.Tensor:
    """Random multi-scale gazes drawn like real gazing: (B, T, N) bool, ``counts[b, t]`` per frame.

    Patches are drawn without replacement (Gumbel top-k) with log-weights
    ``-c * log(patches of its scale) + m * log(0.05 + change)``, where ``change`` is the patch
    region's mean absolute change since the previous frame (frame 0: against the grey canvas)
    over the frame's mean change: ``c = 1`` gives every scale the same total weight, 0 every
    patch, and larger ``c`` gazes coarse-to-fine; ``m > 0`` favours moving regions. Per clip,
    ``c = coarse_bias * u`` and ``m = change_bias * v`` with ``u, v`` uniform on
    ``[1 - bias_jitter, 1 + bias_jitter]``, so that a model trained on these gazes meets the
    whole range of gazers, from random to coarse-first to change-driven. A clip is drawn
    uniformly instead with probability ``uniform_prob``. Randomness only from ``generator``.
    """
    B, T = video.shape[:2]
    N, device = grid.num_patches, video.device
    gen_dev = generator.device
    x = video.float().mean(2)  # (B, T, H, W)
    prev = torch.cat([torch.full_like(x[:, :1], GREY), x[:, :-1]], 1)
    change = _region_means(grid, (x - prev).abs().flatten(0, 1)).reshape(B, T, N)
    change = change / (change.mean(-1, keepdim=True) + 1e-3)
    per_scale = torch.tensor([g * g for g in grid.grid_sizes], dtype=torch.float32, device=device)[
        grid.patch_scale.to(device)
    ]
    jitter = 1 + bias_jitter * (2 * torch.rand(2, B, 1, 1, generator=generator, device=gen_dev).to(device) - 1)
    logits = -coarse_bias * jitter[0] * per_scale.log() + change_bias * jitter[1] * (0.05 + change).log()  # (B, T, N)
    uniform = (torch.rand(B, generator=generator, device=gen_dev) < uniform_prob).to(device)
    logits = torch.where(uniform[:, None, None], torch.zeros_like(logits), logits)
    u = torch.rand(B, T, N, generator=generator, device=gen_dev).to(device)
    gumbel = -torch.log(-torch.log(u.clamp(1e-12, 1 - 1e-7)))
    order = (logits + gumbel).argsort(-1, descending=True)
    take = torch.arange(N, device=device) < counts.to(device)[..., None]  # (B, T, N) by rank
    return torch.zeros(B, T, N, dtype=torch.bool, device=device).scatter_(-1, order, take)


def mae_loss(
    model: BlockCausalMAE,
    video: torch.Tensor,
    gazed: torch.Tensor,
    frames: torch.Tensor,
    loss: LossFn,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training objective: mean over clips and frames of ``loss(frame, reconstruction)``.

    Returns ``(scalar, per_frame (B, F))``; autocast bf16 on CUDA. The per-frame loss sees the
    unclamped output (gradients everywhere); ``reconstruct`` clamps to [0, 1].
    """
    inputs = model.prepare(video, gazed, frames)
    with _autocast(video.device):
        recon = model(inputs).float()
    b = torch.arange(video.shape[0], device=video.device)[:, None]
    target = video[b, inputs.frames].float().div_(255)  # (B, F, 3, H, W)
    per_frame = loss(target.flatten(0, 1), recon.flatten(0, 1)).reshape(frames.shape)
    return per_frame.mean(), per_frame


# ---- speed -----------------------------------------------------------------------------------
BENCH_MODES = ("eager", "padded", "graph")
"""``benchmark`` modes: ``reconstruct``; ``MAEGraphRunner`` without graphs; with CUDA graphs."""


def benchmark(
    preset: str = "small",
    size: str = "small",
    batch_sizes: tuple[int, ...] = (8, 64),
    recon_frames: int = 2,
    gazing_ratio: float | tuple[float, ...] = 0.1,
    device: str = "cuda",
    iters: int = 20,
    warmup: int = 3,
    seed: int = 0,
    modes: tuple[str, ...] | None = None,
) -> list[dict[str, Any]]:
    """Reward throughput (clips/s) of the MAE on random clips of the preset's length, one row per
    (gazing ratio, batch size, mode).

    Each clip gets ``gazing_ratio * N`` uniformly random gazes per frame and ``recon_frames``
    distinct random frames to reconstruct (the paper: 2 of 16), the reward's work as the env
    asks for it: decode those frames from the gazed patches. Times cover everything from the
    uint8 clips and bool gazes to the [0, 1] frames: input checks, token packing, the paste
    canvas and the network. ``modes`` (see ``BENCH_MODES``; default ``eager`` and, on CUDA,
    ``graph``): ``eager`` = ``BlockCausalMAE.reconstruct``, ``padded`` / ``graph`` =
    ``MAEGraphRunner`` without / with CUDA graphs (its graphs are captured in the warm-up).
    The weights are random, with a non-zero output head so that the whole network shapes the
    output: ``max_abs_diff`` is each mode's largest difference from ``eager`` on the same inputs.
    """
    dev = torch.device(device)
    modes = modes or (("eager", "graph") if dev.type == "cuda" else ("eager",))
    unknown = set(modes) - set(BENCH_MODES)
    if unknown:
        raise ValueError(f"unknown benchmark mode(s) {sorted(unknown)}; known: {BENCH_MODES}")
    if "graph" in modes and dev.type != "cuda":
        raise ValueError(f"mode 'graph' needs a CUDA device, got {device!r}")
    ratios = (gazing_ratio,) if isinstance(gazing_ratio, (int, float)) else tuple(gazing_ratio)
    torch.manual_seed(seed)
    model = BlockCausalMAE(MAEConfig.make(preset, size)).to(dev).eval()
    nn.init.trunc_normal_(model.head.weight, std=0.02)  # speed does not depend on it; the diffs do
    run = {
        "eager": model.reconstruct,
        "padded": MAEGraphRunner(model, graphs=False),
        "graph": MAEGraphRunner(model, graphs=True) if dev.type == "cuda" else None,
    }
    grid, T = model.grid, model.config.num_frames
    H, N = grid.frame_size, grid.num_patches
    g = torch.Generator(device=dev).manual_seed(seed)
    rows = []
    for ratio in ratios:
        for B in batch_sizes:
            video = torch.randint(0, 256, (B, T, 3, H, H), generator=g, device=dev, dtype=torch.uint8)
            n = max(1, int(ratio * N))
            gazed = torch.rand(B, T, N, generator=g, device=dev).argsort(-1).argsort(-1) < n
            frames = torch.rand(B, T, generator=g, device=dev).argsort(-1)[:, :recon_frames].sort(-1).values
            reference = model.reconstruct(video, gazed, frames)
            for mode in modes:
                fn = run[mode]
                for _ in range(warmup):
                    out = fn(video, gazed, frames)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                start = time.perf_counter()
                for _ in range(iters):
                    out = fn(video, gazed, frames)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                sec = (time.perf_counter() - start) / iters
                peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
                rows.append(
                    dict(
                        preset=preset,
                        size=size,
                        mode=mode,
                        ratio=ratio,
                        gazes_per_frame=n,
                        batch=B,
                        frames=T,
                        recon_frames=recon_frames,
                        ms_per_batch=1e3 * sec,
                        clips_per_s=B / sec,
                        max_abs_diff=(out - reference).abs().max().item(),
                        peak_gib=peak,
                        params=model.num_parameters(),
                        device=str(dev),
                        device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                    )
                )
    return rows


def _main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description="MAE utilities: parameter counts (--params) and reward throughput (--bench).",
    )
    ap.add_argument("--params", action="store_true", help="print parameter counts of every size x preset")
    ap.add_argument("--bench", action="store_true", help="time the reward's reconstructions (clips/s)")
    ap.add_argument("--preset", nargs="+", default=["small", "paper"], help="geometry presets to bench")
    ap.add_argument("--size", nargs="+", default=["small"], help="model sizes to bench (tiny, small)")
    ap.add_argument("--batch", nargs="+", type=int, default=[8, 64], help="batch sizes (clips)")
    ap.add_argument("--recon-frames", type=int, default=2, help="frames reconstructed per clip")
    ap.add_argument("--ratio", nargs="+", type=float, default=[0.1, 0.75], help="gazing ratios of the random gazes")
    ap.add_argument(
        "--mode", nargs="+", choices=BENCH_MODES, help="eager, padded, graph (default: eager + graph on CUDA)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=20, help="timed iterations per row")
    ap.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if args.params or not args.bench:
        for size in MODEL_SIZES:
            for preset in ("tiny", "small", "paper"):
                n = BlockCausalMAE(MAEConfig.make(preset, size)).num_parameters()
                print(f"size={size:5s} preset={preset:5s} params={n / 1e6:.2f}M")
    if args.bench:
        rows = []
        print(
            f"{'preset':6s} {'size':5s} {'ratio':>5s} {'B':>4s} {'mode':6s} {'ms/batch':>9s} {'clips/s':>9s} "
            f"{'x eager':>7s} {'max|diff|':>9s} {'peak GiB':>8s}  device"
        )
        for preset in args.preset:
            for size in args.size:
                mode = tuple(args.mode) if args.mode else None
                new = benchmark(
                    preset,
                    size,
                    tuple(args.batch),
                    args.recon_frames,
                    tuple(args.ratio),
                    args.device,
                    args.iters,
                    modes=mode,
                )
                eager = {(r["ratio"], r["batch"]): r["clips_per_s"] for r in new if r["mode"] == "eager"}
                for r in new:
                    speedup = r["clips_per_s"] / eager.get((r["ratio"], r["batch"]), math.nan)
                    r["speedup_vs_eager"] = speedup
                    print(
                        f"{r['preset']:6s} {r['size']:5s} {r['ratio']:5.2f} {r['batch']:4d} {r['mode']:6s} "
                        f"{r['ms_per_batch']:9.2f} {r['clips_per_s']:9.1f} {speedup:7.1f} {r['max_abs_diff']:9.2e} "
                        f"{r['peak_gib']:8.2f}  {r['device_name']}",
                        flush=True,
                    )
                rows += new
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    _main()
