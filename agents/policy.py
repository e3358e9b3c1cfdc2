"""AutoGazePolicy: the paper's gaze model, weight-compatible with the official AutoGaze release.

Architecture (official module names, so ``state_dict()`` keys equal the official ones):

- ``gazing_model.vision_model``: a shallow causal video conv net. Conv3d patch embedding with
  kernel = stride = ``(1, e, e)`` on the ``input_img_size`` frame (``P = (input_img_size / e)^2``
  tokens per frame), LayerNorm over channels, ``encoder_depth`` blocks of a 3D conv that is causal
  in time (zero frames before the first one, or a conv cache when streaming) + ReLU, and a 1x1x1
  output projection.
- ``gazing_model.connector.pos_embed`` (P, H): a learned spatial position embedding.
- ``gazing_model.gaze_decoder``: a LLaMA decoder (RMSNorm, llama3-scaled RoPE, SwiGLU MLP, no
  biases) over ``[vision tokens of frame 0, gaze tokens of frame 0, vision tokens of frame 1, ...]``;
  ``lm_head`` emits ``K * (N + 1)`` logits (head-major: index ``k * (N + 1) + v``) and
  ``task_loss_prediction_head`` K predicted frame losses per position.
- ``value_head`` (K, H) (optional, ours, not in official checkpoints): a critic with the same
  indexing as the logits (value of the state before each gaze).

Gazes are per-frame patch ids of the multi-scale vocabulary of ``gaze_env.patches.PatchGrid``
(``N`` patches, STOP = ``N``). STOP is never sampled: it only comes from the task-loss stop rule
(the predicted loss of the frame is at or below ``task_loss_requirement``). The same decoder code
serves cached generation, streaming and teacher-forced scoring.

Decoding. Each decoder call writes its tokens into a static, preallocated KV cache with a write
pointer per clip, so clips of a batch never share a padded layout and padding never takes cache
slots: ragged per-clip budgets cost nothing for the clips that are done. A step's tokens are
written by the next decoder call; a clip that finished its frame (budget reached or stopped) takes
part in that one call to write its last tokens and then drops out of the frame's decoder calls
(the active clips' cache rows are gathered, one copy per layer and call while some clip is out).
When no clip goes on, one small "flush" call writes the pending tokens (the official code feeds
them with the next frame's prefill; causality makes the two identical, and the flush leaves the
streaming state with nothing pending and gives the loss prediction after the last slot).

Official quirks, reproduced only when ``PolicyConfig.official_decode_quirks`` is set (as
:meth:`AutoGazePolicy.load_official` does):

1. stale decode position ids: HF ``generate`` (transformers 4.51) never advances the explicit
   ``position_ids``, so every decode step of a frame reuses the last K positions of that frame's
   prefill. Our own models use correct positions (the count of attended tokens before each token,
   as in teacher forcing), so generation and :meth:`AutoGazePolicy.score` agree to fp precision.
2. tokens fed by one decode call attend to each other even when one of them is STOP (it is
   masked only from the next frame on).

``PolicyConfig.stop_per_head`` reproduces the official per-head stop for K > 1 (head i is replaced
by STOP when its own predicted loss meets the requirement, so a real gaze can follow a STOP in the
same frame). The default stops at the first such head and drops the later heads, so STOP always
ends the frame as in the environment's MDP. With K = 1 the two are the same.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tensordict import TensorDict
from torch import Tensor, nn

from gaze_env.patches import PatchGrid

CONFIG_FORMAT = "autogaze-gym/policy-v1"
OURS = ("value_head.", "canvas_embed.", "pointer.")
"""Prefixes of the optional parts that are not in official checkpoints (see :class:`PolicyConfig`)."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicyConfig:
    """Everything that fixes the shape and the decoding behaviour of an :class:`AutoGazePolicy`."""

    input_img_size: int = 224
    """Side in pixels of the square frame the encoder sees; the largest scale."""
    scales: tuple[int, ...] = (32, 64, 112, 224)
    """Gaze vocabulary scales in pixels, strictly ascending, the last one ``input_img_size``."""
    patch_size: int = 16
    """Side of a gaze patch in pixels at its own scale; ``N = sum((s / patch_size)^2)``."""
    encoder_patch_size: int = 16
    """Kernel = stride of the conv patch embedding; ``P = (input_img_size / encoder_patch_size)^2``
    vision tokens per frame (usually the patch grid of the finest scale)."""
    encoder_hidden_size: int = 192
    """Channels of the conv encoder trunk (official ``vision_model_config.hidden_dim``)."""
    encoder_depth: int = 1
    """Number of causal 3D conv blocks."""
    encoder_temporal_kernel: int = 3
    """Frames seen by a causal conv block (the current one and ``k - 1`` before it)."""
    encoder_spatial_kernel: int = 3
    """Spatial kernel of a causal conv block (odd; padded to keep the grid)."""
    hidden_size: int = 192
    """Decoder width ``H`` (also the encoder output and the connector width)."""
    intermediate_size: int = 384
    """SwiGLU MLP width."""
    num_layers: int = 4
    """Decoder layers."""
    num_heads: int = 6
    """Attention heads (no grouped KV); ``hidden_size / num_heads`` must be even."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 5e5
    """RoPE base."""
    rope_llama3_factor: float | None = 8.0
    """llama3 RoPE scaling factor; ``None`` for plain RoPE."""
    rope_llama3_low_freq_factor: float = 1.0
    """llama3 RoPE scaling: low-frequency factor."""
    rope_llama3_high_freq_factor: float = 4.0
    """llama3 RoPE scaling: high-frequency factor."""
    rope_llama3_original_max_positions: int = 8192
    """llama3 RoPE scaling: original context length."""
    num_multi_token_pred: int = 10
    """``K``: gazes predicted per decoder call (any K >= 1, at most ``P``)."""
    max_num_frames: int = 16
    """Frames per clip the model is meant for; the default capacity of a streaming state."""
    value_head: bool = False
    """Add a (K, H) critic head (not part of official checkpoints)."""
    canvas_input: bool = False
    """(ours, not in official checkpoints) The encoder also sees the policy's own paste
    reconstruction of the frame as it starts (``canvas``: frame ``t - 1``'s reconstruction from the
    gazes made there, mid-grey before frame 0, as the environment's paste canvas), its absolute
    error to the frame, and the absolute error of what each coarser scale would paste (the frame
    resized to the scale and back), through a second patch embedding ``canvas_embed`` added to the
    frame's. The policy then knows where the reconstruction is stale and what a gaze at each scale
    would gain there, without inferring it from the gaze history. The canvas is computed inside the
    policy from the frames and its own gazes, so gazing still needs nothing but the video, and
    streams."""
    pointer_head: bool = False
    """(ours, not in official checkpoints) Add to every patch's logit a pointer term: the match of a
    query from the predicting hidden state with the patch's key, pooled over the current frame's
    vision tokens inside the patch's square (area-weighted, one key projection per scale), so that
    a location's content maps to its patch id directly instead of only through ``lm_head``."""
    pointer_dim: int = 32
    """Query / key width of the pointer head."""
    pointer_coverage: bool = False
    """The pointer's patch keys also depend on the frame's gazes so far: each patch has one key
    per coverage state (not gazed, or pasted at scale ``s`` as the finest so far) and its logit
    mixes their matches by the fraction of its square in each state, so that a patch whose square
    was just pasted at some scale is judged by what pasting it would still change there."""
    resize_input: bool = False
    """Resize every frame to ``input_img_size`` with bicubic interpolation (align_corners=False,
    no antialias) inside the model, as the official model does. When off, frames must already be
    ``input_img_size`` pixels."""
    official_decode_quirks: bool = False
    """Reproduce the official HF decode path (stale decode position ids, a decode call's tokens
    see each other even when STOP); see the module docstring. Off: correct positions."""
    stop_per_head: bool = False
    """Official per-head task-loss stop for K > 1 (a real gaze may follow a STOP in one frame).
    Off: the first stopping head ends the frame and later heads are dropped. With it, the log-prob
    of a gaze that follows a STOP of its own step cannot be recomputed by ``score``: that gaze was
    also masked from the pick the STOP replaced, which the trajectory does not record."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(int(s) for s in self.scales))
        grid = self.grid  # validates scales / patch_size
        if grid.frame_size != self.input_img_size:
            raise ValueError(f"the largest scale {grid.frame_size} must equal input_img_size={self.input_img_size}")
        if self.input_img_size % self.encoder_patch_size:
            raise ValueError(
                f"encoder_patch_size={self.encoder_patch_size} must divide input_img_size={self.input_img_size}"
            )
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"hidden_size={self.hidden_size} must split into num_heads={self.num_heads} heads of even size"
            )
        if not 1 <= self.num_multi_token_pred <= self.tokens_per_frame:
            raise ValueError(
                f"num_multi_token_pred must lie in [1, {self.tokens_per_frame}] (tokens per frame), "
                f"got {self.num_multi_token_pred}"
            )
        if self.pointer_coverage and not self.pointer_head:
            raise ValueError("pointer_coverage shapes the pointer head's keys: it needs pointer_head=True")
        if self.encoder_spatial_kernel % 2 == 0 or self.encoder_temporal_kernel < 1:
            raise ValueError(
                "encoder_spatial_kernel must be odd and encoder_temporal_kernel >= 1, got "
                f"{self.encoder_spatial_kernel} and {self.encoder_temporal_kernel}"
            )
        for name in ("encoder_depth", "num_layers", "max_num_frames", "intermediate_size", "encoder_hidden_size",
                     "pointer_dim"):
            if getattr(self, name) < (0 if name == "encoder_depth" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def grid(self) -> PatchGrid:
        """The gaze vocabulary."""
        return PatchGrid(self.scales, self.patch_size)

    @property
    def num_patches(self) -> int:
        """``N``: patches per frame over all scales."""
        return self.grid.num_patches

    @property
    def stop_id(self) -> int:
        """The STOP / EOS token, ``N``."""
        return self.num_patches

    @property
    def vocab_size(self) -> int:
        """``N + 1``."""
        return self.num_patches + 1

    @property
    def tokens_per_frame(self) -> int:
        """``P``: vision tokens per frame."""
        return (self.input_img_size // self.encoder_patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


PRESETS: dict[str, PolicyConfig] = {
    # tiny and small are ours: the official architecture plus the canvas input and the
    # coverage-aware pointer head, which make behaviour cloning read the video (see PolicyConfig).
    # CPU default: the env's tiny geometry (N = 84, P = 64), a small decoder.
    "tiny": PolicyConfig(
        input_img_size=64,
        scales=(16, 32, 64),
        patch_size=8,
        encoder_patch_size=8,
        encoder_hidden_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_multi_token_pred=1,
        max_num_frames=8,
        canvas_input=True,
        pointer_head=True,
        pointer_coverage=True,
    ),
    # Paper token geometry (N = 265, P = 196) at 1/4 of the pixels, paper-sized decoder.
    "small": PolicyConfig(
        input_img_size=112,
        scales=(16, 32, 56, 112),
        patch_size=8,
        encoder_patch_size=8,
        encoder_hidden_size=192,
        hidden_size=192,
        intermediate_size=384,
        num_layers=4,
        num_heads=6,
        num_multi_token_pred=10,
        max_num_frames=16,
        canvas_input=True,
        pointer_head=True,
        pointer_coverage=True,
    ),
    # The published model (TRAIN.md stage 1): 3,258,240 parameters with K = 10, official checkpoints
    # load into it (canvas_input / pointer_head / pointer_coverage=True add our parts on top).
    "paper": PolicyConfig(),
}


# ---------------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------------
def preprocess(video: Tensor) -> Tensor:
    """uint8 video (..., 3, H, W) -> float32 model input of the same shape.

    Follows the official ``AutoGazeImageProcessor`` as documented with the official fixtures:
    ``x / 127.5 - 1`` and then ImageNet mean / std normalisation. The processor's resize of the
    shortest edge to 224 is left to the model (``PolicyConfig.resize_input``) or to the caller:
    frames here are square. This is an assumption from the documentation, not checked against the
    processor's code (not available offline).
    """
    if video.dtype != torch.uint8:
        raise TypeError(f"preprocess expects uint8 video, got {video.dtype}")
    if video.dim() < 3 or video.shape[-3] != 3:
        raise ValueError(f"video must be (..., 3, H, W), got {tuple(video.shape)}")
    x = video.float() / 127.5 - 1.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------------------------------------
# modules (official names)
# ---------------------------------------------------------------------------------------------
class CausalConvBlock(nn.Module):
    """3D conv over (current + k-1 previous frames, k_s x k_s) + ReLU, causal in time."""

    def __init__(self, channels: int, temporal_kernel: int, spatial_kernel: int) -> None:
        super().__init__()
        self.temporal_kernel = temporal_kernel
        pad = (spatial_kernel - 1) // 2
        self.conv3d = nn.Conv3d(
            channels, channels, (temporal_kernel, spatial_kernel, spatial_kernel), padding=(0, pad, pad)
        )

    def forward(self, x: Tensor, past: Tensor | None) -> tuple[Tensor, Tensor]:
        """x (B, C, T, h, w), past (B, C, k-1, h, w) or None (zeros) -> (B, C, T, h, w), new past."""
        B, C, _, h, w = x.shape
        if past is None:
            past = x.new_zeros(B, C, self.temporal_kernel - 1, h, w)
        x = torch.cat([past, x], dim=2)
        new_past = x[:, :, x.shape[2] - (self.temporal_kernel - 1) :]
        return F.relu(self.conv3d(x)), new_past


class VisionEncoder(nn.Module):
    """The official ``ShallowVideoConvNet`` (temporal patch size 1)."""

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        e, c = cfg.encoder_patch_size, cfg.encoder_hidden_size
        self.temporal_conv = nn.Conv3d(3, c, kernel_size=(1, e, e), stride=(1, e, e))
        self.norm = nn.LayerNorm(c)
        self.blocks = nn.ModuleList(
            CausalConvBlock(c, cfg.encoder_temporal_kernel, cfg.encoder_spatial_kernel)
            for _ in range(cfg.encoder_depth)
        )
        self.out_proj = nn.Conv3d(c, cfg.hidden_size, kernel_size=1)

    def forward(
        self, frames: Tensor, conv_cache: list[Tensor] | None, extra: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """frames (B, T, 3, S, S) -> features (B, T, P, H) (row-major grid), new conv cache.
        ``extra`` (B, C, T, h, w): added to the normalised patch embedding (the optional canvas
        embedding: after the LayerNorm, so that how much error a token holds is not normalised away)."""
        x = self.temporal_conv(frames.transpose(1, 2))  # (B, C, T, h, w)
        x = self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)  # LayerNorm over channels
        if extra is not None:
            x = x + extra
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, past = block(x, None if conv_cache is None else conv_cache[i])
            new_cache.append(past)
        x = self.out_proj(x)  # (B, H, T, h, w)
        return x.permute(0, 2, 3, 4, 1).flatten(2, 3), new_cache


class Connector(nn.Module):
    """Adds the learned spatial position embedding to every frame's vision tokens."""

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(cfg.tokens_per_frame, cfg.hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, P, H) -> (B, T, P, H)."""
        return x + self.pos_embed


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class KVWrite(NamedTuple):
    """Where a cached decoder call writes its keys / values and which keys it reads."""

    keys: list[Tensor]  # per layer (Bc, S + 1, heads, head_dim); slot S is a write-only trash slot
    values: list[Tensor]  # per layer, like keys
    rows: Tensor | None  # (B',) clips of the call, None = all clips in order
    write_index: Tensor  # (B', Q) cache slot of every input token (S for padding)
    num_keys: int  # keys [0, num_keys) are read


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        H, self.num_heads, self.head_dim = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.q_proj = nn.Linear(H, H, bias=False)
        self.k_proj = nn.Linear(H, H, bias=False)
        self.v_proj = nn.Linear(H, H, bias=False)
        self.o_proj = nn.Linear(H, H, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, layer: int, cache: KVWrite | None
    ) -> Tensor:
        """x (B, Q, H), cos / sin (B, Q, 1, hd), mask (B, 1, Q, S) bool (True = attend), or None for
        plain causal attention without a cache (SDPA's fused causal kernels, no (B, S, S) mask)."""
        if mask is None and cache is not None:
            raise ValueError("causal attention (mask=None) reads no cache: pass an explicit mask")
        B, Q, _ = x.shape
        shape = (B, Q, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape)
        k = self.k_proj(x).view(shape)
        v = self.v_proj(x).view(shape)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            kc, vc = cache.keys[layer], cache.values[layer]
            b = (torch.arange(B, device=x.device) if cache.rows is None else cache.rows)[:, None]
            kc[b, cache.write_index] = k
            vc[b, cache.write_index] = v
            if cache.rows is None:
                k, v = kc[:, : cache.num_keys], vc[:, : cache.num_keys]
            else:
                k, v = kc[cache.rows, : cache.num_keys], vc[cache.rows, : cache.num_keys]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=mask is None
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, Q, -1))


class MLP(nn.Module):
    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, layer: int, cache: KVWrite | None
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, layer, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def rope_inv_freq(cfg: PolicyConfig) -> Tensor:
    """(head_dim / 2,) float32 RoPE inverse frequencies, llama3-scaled as in transformers 4.51."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if cfg.rope_llama3_factor is None:
        return inv_freq
    factor, low, high = cfg.rope_llama3_factor, cfg.rope_llama3_low_freq_factor, cfg.rope_llama3_high_freq_factor
    old_len = cfg.rope_llama3_original_max_positions
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class LlamaBody(nn.Module):
    """The official decoder body (``gaze_decoder.model``): embeddings, layers, final norm."""

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(self, embeds: Tensor, positions: Tensor, mask: Tensor | None, cache: KVWrite | None) -> Tensor:
        """embeds (B, Q, H), positions (B, Q) int64, mask (B, 1, Q, S) bool (None: causal, no cache)
        -> hidden (B, Q, H)."""
        freqs = positions[..., None].float() * self.inv_freq.float()  # (B, Q, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]  # (B, Q, 1, hd)
        cos, sin = emb.cos().to(embeds.dtype), emb.sin().to(embeds.dtype)
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, i, cache)
        return self.norm(x)


class GazeDecoder(nn.Module):
    """LLaMA body + multi-token gaze head + task-loss prediction head (official names)."""

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        self.model = LlamaBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.num_multi_token_pred * cfg.vocab_size, bias=False)
        self.task_loss_prediction_head = nn.Linear(cfg.hidden_size, cfg.num_multi_token_pred, bias=False)


class GazingModel(nn.Module):
    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        self.vision_model = VisionEncoder(cfg)
        self.connector = Connector(cfg)
        self.gaze_decoder = GazeDecoder(cfg)


class CanvasEmbedding(nn.Module):
    """(ours) Patch embedding of what a frame's gazes can change (``PolicyConfig.canvas_input``):
    the canvas the frame starts from, its absolute error to the frame and the absolute error of
    every coarser scale's view of the frame (what pasting at that scale leaves; the finest scale's
    is 0), per pixel; same kernel and stride as the frame's patch embedding. Summed over a patch's
    square these give the L1 gain of pasting it at any scale over the canvas or over a coarser paste."""

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        e, self.grid = cfg.encoder_patch_size, cfg.grid
        channels = 3 * (2 + self.grid.num_scales - 1)
        self.proj = nn.Conv3d(channels, cfg.encoder_hidden_size, kernel_size=(1, e, e), stride=(1, e, e))

    def forward(self, frames: Tensor, canvas: Tensor) -> Tensor:
        """frames, canvas (B, T, 3, S, S) preprocessed float -> (B, C, T, h, w)."""
        out = []
        for t in range(frames.shape[1]):  # a frame at a time: the views of a whole clip can be large
            f, c = frames[:, t], canvas[:, t]
            views = self.grid.views(f.float())[:, :-1].to(f.dtype)  # (B, k - 1, 3, S, S)
            feats = torch.cat([c, (f - c).abs(), (f[:, None] - views).abs().flatten(1, 2)], dim=1)
            out.append(self.proj(feats[:, :, None]))  # (B, C, 1, h, w)
        return torch.cat(out, dim=2)


def pool_matrix(cfg: PolicyConfig) -> Tensor:
    """(N, P) float32: the fraction of patch ``v``'s square that vision token ``j`` covers (each row
    sums to 1; tokens are the ``encoder_patch_size`` squares of the frame, row-major)."""
    grid, e = cfg.grid, cfg.encoder_patch_size
    side = cfg.input_img_size // e
    lo = torch.arange(side) * e  # token edges in pixels
    y0, x0, y1, x1 = grid.regions.unbind(1)  # (N,) each

    def overlap(a: Tensor, b: Tensor) -> Tensor:  # (N, side) pixels shared with each token row / column
        return (torch.minimum(b[:, None], lo + e) - torch.maximum(a[:, None], lo)).clamp(min=0)

    area = ((y1 - y0) * (x1 - x0)).float()
    cover = overlap(y0, y1)[:, :, None] * overlap(x0, x1)[:, None, :]  # (N, side, side)
    return cover.flatten(1).float() / area[:, None]


class PointerHead(nn.Module):
    """(ours) ``PolicyConfig.pointer_head``: a query per prediction head against per-patch keys.

    A frame's patch keys are computed once from its vision tokens, their final hidden states and
    their encoder features (the decoder's input, which no norm has rescaled) (:meth:`patch_keys`);
    a position's pointer logits (:meth:`logits`) are added to ``lm_head``'s (STOP gets 0)."""

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        self.K, self.d, self.grid = cfg.num_multi_token_pred, cfg.pointer_dim, cfg.grid
        ks = self.grid.num_scales
        self.states = ks + 1 if cfg.pointer_coverage else 1  # S: coverage states with a key each
        self.query = nn.Linear(cfg.hidden_size, self.K * self.d, bias=False)
        self.key = nn.Linear(cfg.hidden_size, ks * self.states * self.d, bias=False)
        self.token_key = nn.Linear(cfg.hidden_size, ks * self.states * self.d, bias=False)
        self.register_buffer("pool", pool_matrix(cfg), persistent=False)
        if cfg.pointer_coverage:
            # bool, so ``.to(dtype)`` of a bf16 copy leaves it exact
            self.register_buffer("cover", coverage_table(cfg.grid), persistent=False)

    def coverage(self, gazed: Tensor) -> Tensor:
        """gazed (..., N) bool, the frame's gazes so far -> (..., N, S) float32: the fraction of
        every patch's square whose finest gazed scale is each state (0: not gazed, ``1 + s``:
        scale ``s``); all in state 0 without ``pointer_coverage`` (S = 1)."""
        if self.states == 1:
            return gazed.new_ones(*gazed.shape, 1, dtype=torch.float32)
        offsets, cover = self.grid.offsets, self.cover.float()  # (N, C)
        level = torch.zeros(*gazed.shape[:-1], cover.shape[1], dtype=torch.int64, device=gazed.device)
        for k in range(self.grid.num_scales):  # coarse first: finer scales overwrite
            part = gazed[..., offsets[k] : offsets[k + 1]].float() @ cover[offsets[k] : offsets[k + 1]]
            level = torch.where(part > 0, k + 1, level)  # (..., C) cells pasted at scale k
        share = cover / cover.sum(1, keepdim=True)  # (N, C) the fraction of v's square cell c is
        return share @ F.one_hot(level, self.states).float()  # (N, C) @ (..., C, S)

    def patch_keys(self, hidden: Tensor, tokens: Tensor) -> Tensor:
        """hidden (..., P, H) final hidden states of a frame's vision tokens, tokens (..., P, H)
        the tokens themselves (:meth:`AutoGazePolicy.encode`) -> (..., N, S, d) keys (one per
        coverage state), scaled by ``d ** -0.5``."""
        ks, S, d = self.grid.num_scales, self.states, self.d
        keys = self.key(hidden) + self.token_key(tokens.to(hidden.dtype))
        keys = keys.unflatten(-1, (ks, S * d))  # (..., P, k, S d)
        offsets = self.grid.offsets
        pool = self.pool.to(keys.dtype)
        parts = [pool[offsets[k] : offsets[k + 1]] @ keys[..., k, :] for k in range(ks)]
        return (torch.cat(parts, dim=-2) * d**-0.5).unflatten(-1, (S, d))  # (..., N, S, d)

    def at_steps(
        self, query: Tensor, keys: Tensor, action: Tensor, frame_id: Tensor, rank: Tensor, valid: Tensor,
        shift: Tensor,
    ) -> Tensor:
        """Pointer logits of trajectory steps in teacher forcing, frame by frame.

        query (B, L, J, d): J queries per step, query ``j`` made ``shift[..., j]`` steps before the
        step (so its coverage state is the frame's gazes of rank below ``rank - shift``); keys
        (B, T, N, S, d); action / frame_id / rank (B, L) int64 (0 at invalid steps), valid (B, L)
        bool, shift (J,) or (B, L, J) int64 -> (B, L, J, N + 1) float32 (STOP and invalid steps 0).

        The steps are laid out (B, T, G, ...) by frame and rank for one batched product with each
        frame's keys (gathering a frame's keys for every step would take d times the memory of the
        logits)."""
        B, L, J, d = query.shape
        T, N, S = keys.shape[1:4]
        G = int(rank[valid].max()) + 1 if bool(valid.any()) else 1
        slot = torch.where(valid, frame_id * G + rank, T * G)  # (B, L); T * G collects the invalid steps
        laid = query.new_zeros(B, T * G + 1, J, d).scatter(1, slot[..., None, None].expand(-1, -1, J, d), query)
        scores = torch.einsum("btgjd,btnsd->btgjns", laid[:, : T * G].view(B, T, G, J, d), keys.to(query.dtype))
        at = slot.clamp(max=T * G - 1)[..., None, None, None].expand(-1, -1, J, N, S)
        out = scores.reshape(B, T * G, J, N, S).gather(1, at).float()  # (B, L, J, N, S)
        if S > 1:
            gaze = valid & (action < N)
            laid_gazes = torch.zeros(B, T * G + 1, N + 1, dtype=torch.int32, device=query.device)
            b = torch.arange(B, device=query.device)[:, None].expand(B, L)
            laid_gazes.index_put_((b, slot, torch.where(gaze, action, N)), gaze.int(), accumulate=True)
            laid_gazes = laid_gazes[:, : T * G, :N].view(B, T, G, N)
            before = (laid_gazes.cumsum(2) - laid_gazes) > 0  # (B, T, G, N) gazes of lower rank
            weights = self.coverage(before).view(B, T * G, N, S)
            rows = (frame_id[..., None] * G + (rank[..., None] - shift).clamp(min=0)).clamp(0, T * G - 1)  # (B, L, J)
            w = weights.gather(1, rows.reshape(B, L * J, 1, 1).expand(-1, -1, N, S)).view(B, L, J, N, S)
            out = (out * w).sum(-1)
        else:
            out = out[..., 0]
        return F.pad(out.masked_fill(~valid[..., None, None], 0.0), (0, 1))

    def queries(self, hidden: Tensor) -> Tensor:
        """hidden (..., H) -> (..., K, d)."""
        return self.query(hidden).unflatten(-1, (self.K, self.d))

    def logits(self, hidden: Tensor, keys: Tensor, gazed: Tensor) -> Tensor:
        """hidden (A, H), keys (A, N, S, d), gazed (A, N) bool the frame's gazes so far ->
        (A, K, N + 1) pointer logits (0 for STOP)."""
        scores = torch.einsum("akd,ansd->akns", self.queries(hidden), keys)  # (A, K, N, S)
        mixed = (scores.float() * self.coverage(gazed)[:, None]).sum(-1)
        return F.pad(mixed, (0, 1))


def coverage_table(grid: PatchGrid) -> Tensor:
    """Cells of side ``gcd`` of the patch squares' sides tile every square exactly -> (N, C) bool,
    True where patch ``v`` covers cell ``c``."""
    cell = math.gcd(*grid.region_sizes)
    side = grid.frame_size // cell
    lo = torch.arange(side) * cell
    y0, x0, y1, x1 = grid.regions.unbind(1)
    rows = (lo >= y0[:, None]) & (lo < y1[:, None])  # (N, side)
    cols = (lo >= x0[:, None]) & (lo < x1[:, None])
    return (rows[:, :, None] & cols[:, None, :]).flatten(1)  # (N, C)


def blank_canvas(batch_size: int, size: int, device: torch.device) -> Tensor:
    """(B, 3, S, S) float32: the preprocessed mid-grey (128) canvas a clip's frame 0 starts from."""
    grey = torch.full((batch_size, 3, size, size), 128, dtype=torch.uint8, device=device)
    return preprocess(grey)


def start_canvases(grid: PatchGrid, frames: Tensor, action: Tensor, frame_id: Tensor, valid: Tensor) -> Tensor:
    """The canvas every frame starts from (``PolicyConfig.canvas_input``) for given trajectories.

    frames (B, T, 3, S, S) preprocessed float; action / frame_id / valid (B, L) as
    :meth:`AutoGazePolicy.score` takes them -> (B, T, 3, S, S) float32: frame 0 starts from
    :func:`blank_canvas`, frame ``t + 1`` from frame ``t``'s paste of its gazes over its start."""
    B, T, _, S, _ = frames.shape
    N = grid.num_patches
    gaze = valid & (action < N)
    gazed = torch.zeros(B, T, N + 1, dtype=torch.bool, device=frames.device)
    gazed[torch.arange(B, device=frames.device)[:, None].expand_as(action)[gaze], frame_id[gaze], action[gaze]] = True
    canvas = blank_canvas(B, S, frames.device)
    out = [canvas]
    for t in range(T - 1):
        canvas = grid.paste(canvas, grid.views(frames[:, t].float()), gazed[:, t, :N])
        out.append(canvas)
    return torch.stack(out, dim=1)


# ---------------------------------------------------------------------------------------------
# generation state and output
# ---------------------------------------------------------------------------------------------
@dataclass
class DecodeCache:
    """Streaming state of a batch of B clips; :meth:`AutoGazePolicy.generate` mutates it in place."""

    keys: list[Tensor]  # per layer (B, S + 1, heads, head_dim); slot S is a trash slot for padding
    values: list[Tensor]  # per layer, like keys
    visible: Tensor  # (B, S + 1) bool: the cached token may be attended by later tokens
    length: Tensor  # (B,) int64: cache slots used
    num_attended: Tensor  # (B,) int64: visible tokens so far (the next correct position id)
    conv_cache: list[Tensor] | None  # per conv block (B, C, k - 1, h, w); None before the first frame
    frames_seen: int  # frames processed so far
    canvas: Tensor | None = None  # (B, 3, S, S) float: the canvas the next frame starts from
    # (PolicyConfig.canvas_input); None before the first frame

    @property
    def capacity(self) -> int:
        """``S``: cache slots per clip."""
        return self.visible.shape[1] - 1


@dataclass
class Gazes:
    """Gazes of B clips over T frames, G slots per frame (G = the largest budget).

    A slot is *emitted* when it belongs to the clip's trajectory: a gaze, or the STOP that ended
    the frame (with ``stop_per_head``, real gazes may follow a STOP). The rest is padding.
    """

    ids: Tensor  # (B, T, G) int64 per-frame patch ids in [0, N); STOP (= N) at STOP and padding
    emitted: Tensor  # (B, T, G) bool
    log_prob: Tensor  # (B, T, G) float32 log-prob of the gaze under the (masked, tempered) sampling
    # distribution; 0 at STOP and padding
    loss_pred: Tensor  # (B, T, G) float32 predicted frame loss after this slot; 0 at padding
    value: Tensor | None  # (B, T, G) float32 value of the state before this slot (value head only)
    logits: Tensor | None  # (B, T, G, N + 1) raw logits of the head that chose the slot (on request)
    num_patches: int  # N

    @property
    def is_gaze(self) -> Tensor:
        """(B, T, G) bool: real gazes."""
        return self.emitted & (self.ids != self.num_patches)

    @property
    def num_gazes(self) -> Tensor:
        """(B, T) int64 real gazes per clip and frame."""
        return self.is_gaze.sum(-1)

    def gazed_patches(self) -> Tensor:
        """(B, T, N) bool: the patches gazed in each frame."""
        B, T, _ = self.ids.shape
        out = torch.zeros(B, T, self.num_patches + 1, dtype=torch.bool, device=self.ids.device)
        out.scatter_(2, torch.where(self.is_gaze, self.ids, self.num_patches), True)
        return out[..., : self.num_patches]

    @staticmethod
    def cat(parts: list[Gazes]) -> Gazes:
        """Concatenate along frames (e.g. the frames of a stream), padding slots to the widest."""
        G = max(p.ids.shape[2] for p in parts)

        def pad(name: str, value: float) -> Tensor | None:
            if getattr(parts[0], name) is None:
                return None
            out = []
            for p in parts:
                x = getattr(p, name)
                widths = [0, 0] * (x.dim() - 3) + [0, G - x.shape[2]]
                out.append(F.pad(x, widths, value=value))
            return torch.cat(out, dim=1)

        N = parts[0].num_patches
        return Gazes(
            pad("ids", N),
            pad("emitted", False),
            pad("log_prob", 0.0),
            pad("loss_pred", 0.0),
            pad("value", 0.0),
            pad("logits", 0.0),
            N,
        )

    def to_official(self, frame_offset: int = 0) -> dict[str, Tensor]:
        """Official conventions: ``gazing_pos`` (B, S) global ids ``local + N * t`` (padding and
        STOP hold ``N + N * t``), ``if_padded_gazing`` (B, S) bool (True at STOP and padding),
        ``num_gazing_each_frame`` (T,) slots per frame (the most any clip emitted)."""
        N = self.num_patches
        counts = self.emitted.sum(-1).amax(0)  # (T,)
        pos, padded = [], []
        for t, n in enumerate(counts.tolist()):
            pos.append(self.ids[:, t, :n] + N * (t + frame_offset))
            padded.append(~self.is_gaze[:, t, :n])
        return {
            "gazing_pos": torch.cat(pos, 1),
            "if_padded_gazing": torch.cat(padded, 1),
            "num_gazing_each_frame": counts,
        }

    def to_trajectory(self) -> TensorDict:
        """Compact per-step layout, batch [B, L]: ``action`` (B, L) int64 per-frame ids (STOP = N),
        ``frame_id`` (B, L) int64, ``valid`` (B, L) bool, ``log_prob``, ``loss_pred`` and ``value``
        (B, L) float; L = the most slots any clip emitted. Feed it back to :meth:`AutoGazePolicy.score`."""
        B, T, G = self.ids.shape
        emitted = self.emitted.reshape(B, T * G)
        order = torch.sort((~emitted).to(torch.uint8), dim=1, stable=True).indices  # emitted first, in order
        L = int(emitted.sum(1).max())
        order = order[:, :L]
        frame = torch.arange(T, device=self.ids.device).repeat_interleave(G).expand(B, -1)
        out = {
            "action": self.ids.reshape(B, -1).gather(1, order),
            "frame_id": frame.gather(1, order),
            "valid": emitted.gather(1, order),
            "log_prob": self.log_prob.reshape(B, -1).gather(1, order),
            "loss_pred": self.loss_pred.reshape(B, -1).gather(1, order),
        }
        if self.value is not None:
            out["value"] = self.value.reshape(B, -1).gather(1, order)
        td = TensorDict(out, batch_size=[B, L], device=self.ids.device)
        td["action"] = torch.where(td["valid"], td["action"], self.num_patches)
        return td


class TeacherForced(NamedTuple):
    """What :meth:`AutoGazePolicy.teacher_forced` returns (entries at invalid steps are meaningless)."""

    hidden: Tensor  # (B, S, H) final hidden states of the whole sequence
    pos: Tensor  # (B, L) int64 sequence row of each step's token
    rank: Tensor  # (B, L) int64 index of each step in its frame
    action: Tensor  # (B, L) int64 the actions, 0 at invalid steps
    frame_id: Tensor  # (B, L) int64 the frame ids, 0 at invalid steps
    valid: Tensor  # (B, L) bool
    keys: Tensor | None  # (B, T, N, S, d) every frame's pointer keys (pointer head only)


def frame_layout(frame_id: Tensor, valid: Tensor, num_frames: int) -> tuple[Tensor, Tensor, Tensor]:
    """Where the steps of trajectories sit in their frames.

    frame_id (B, L) int64 in [0, num_frames) (anything at invalid steps is read as 0), valid
    (B, L) bool; the valid steps of a frame are contiguous and frames non-decreasing. Returns
    ``per_frame`` (B, T) valid steps of each frame, ``before`` (B, T) valid steps in earlier frames
    and ``rank`` (B, L) the index of each step in its frame."""
    fid = torch.where(valid, frame_id, 0)
    per_frame = torch.zeros(fid.shape[0], num_frames, dtype=torch.int64, device=fid.device)
    per_frame.scatter_add_(1, fid, valid.long())  # (B, T)
    before = per_frame.cumsum(1) - per_frame  # (B, T)
    rank = valid.long().cumsum(1) - 1 - before.gather(1, fid)  # (B, L)
    return per_frame, before, rank


def gazed_before(action: Tensor, frame_id: Tensor, valid: Tensor, num_frames: int, vocab_size: int) -> Tensor:
    """(B, L, V) bool: the ids taken by valid steps before each step in the same frame.

    action / frame_id (B, L) int64 in [0, V) / [0, num_frames) at valid steps, valid (B, L) bool;
    the valid steps of a frame are contiguous and frames non-decreasing."""
    B, L = action.shape
    act, fid = torch.where(valid, action, 0), torch.where(valid, frame_id, 0)
    onehot = F.one_hot(act, vocab_size) * valid[..., None]  # (B, L, V)
    seen = onehot.cumsum(1) - onehot  # occurrences strictly before each step
    frame_counts = torch.zeros(B, num_frames, vocab_size, dtype=onehot.dtype, device=action.device).index_put(
        (torch.arange(B, device=action.device)[:, None].expand(B, L), fid), onehot, accumulate=True
    )
    earlier = (frame_counts.cumsum(1) - frame_counts).gather(1, fid[..., None].expand(-1, -1, vocab_size))
    return (seen - earlier) > 0


# ---------------------------------------------------------------------------------------------
# the policy
# ---------------------------------------------------------------------------------------------
class AutoGazePolicy(nn.Module):
    """The AutoGaze gaze model with cached / streaming generation and teacher-forced scoring.

    ``state_dict()`` keys equal the official checkpoint keys (``gazing_model.*``), plus
    ``value_head.*`` when the config asks for a value head.
    """

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.config = config
        self.gazing_model = GazingModel(config)
        self.value_head = nn.Linear(config.hidden_size, config.num_multi_token_pred) if config.value_head else None
        self.canvas_embed = CanvasEmbedding(config) if config.canvas_input else None
        self.pointer = PointerHead(config) if config.pointer_head else None
        self._init_weights()

    def _init_weights(self) -> None:
        # As the official model: HF LLaMA init (normal 0.02) for the decoder, PyTorch defaults for
        # the conv encoder, standard normal for the position embedding.
        extra = [m for m in (self.value_head, self.pointer) if m is not None]
        for m in [*self.gazing_model.gaze_decoder.modules(), *(x for e in extra for x in e.modules())]:
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    # ---- construction / persistence ----------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> AutoGazePolicy:
        """A fresh model from a named preset (``tiny``, ``small``, ``paper``) with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown policy preset {name!r}; known presets: {sorted(PRESETS)}")
        return cls(replace(PRESETS[name], **overrides))

    @property
    def device(self) -> torch.device:
        return self.gazing_model.connector.pos_embed.device

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write ``model.safetensors`` and ``config.json`` into ``folder``, each atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        text = json.dumps({"format": CONFIG_FORMAT, **asdict(self.config)}, indent=2)
        _atomic_write(folder / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        _atomic_write(folder / "config.json", lambda p: Path(p).write_text(text))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> AutoGazePolicy:
        """Load a folder written by :meth:`save_pretrained` (safetensors only, never unpickles)."""
        folder = Path(folder)
        raw = json.loads((folder / "config.json").read_text())
        if raw.pop("format", None) != CONFIG_FORMAT:
            raise ValueError(
                f"{folder / 'config.json'} is not a {CONFIG_FORMAT} config; for official AutoGaze "
                "checkpoints use AutoGazePolicy.load_official"
            )
        known = {f.name for f in fields(PolicyConfig)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown} in {folder / 'config.json'}")
        model = cls(PolicyConfig(**raw))
        model.load_state_dict(load_file(folder / "model.safetensors", device=str(device)), strict=True)
        return model.to(device)

    @classmethod
    def load_official(
        cls, folder: str | os.PathLike, device: str | torch.device = "cpu", **overrides
    ) -> AutoGazePolicy:
        """Load an official AutoGaze checkpoint folder (``config.json`` + ``model.safetensors``).

        The config turns on the official behaviour (``resize_input``, ``official_decode_quirks``,
        ``stop_per_head``); ``overrides`` may change any field, e.g. ``value_head=True``,
        ``canvas_input=True`` or ``pointer_head=True`` (the parts these add, which no official
        checkpoint has, are then the only keys allowed to be missing: they keep their fresh
        initialisation).
        """
        folder = Path(folder)
        cfg = replace(official_config(json.loads((folder / "config.json").read_text())), **overrides)
        model = cls(cfg)
        state = load_file(folder / "model.safetensors", device=str(device))
        missing, unexpected = model.load_state_dict(state, strict=False)
        allowed = {k for k in model.state_dict() if k.startswith(OURS)}
        if unexpected or set(missing) - allowed:
            raise ValueError(
                f"official checkpoint does not match the config: missing {sorted(set(missing) - allowed)}, "
                f"unexpected {sorted(unexpected)}"
            )
        return model.to(device)

    # ---- encoder -----------------------------------------------------------------------------
    def frames(self, video: Tensor) -> Tensor:
        """Preprocessed float video (B, T, 3, H, W) -> the (B, T, 3, S, S) frames the encoder sees
        (resized to ``input_img_size`` when ``resize_input``)."""
        cfg = self.config
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"video must be (B, T, 3, H, W), got {tuple(video.shape)}")
        if not video.is_floating_point():
            raise TypeError(f"video must be float (see agents.policy.preprocess), got {video.dtype}")
        B, T = video.shape[:2]
        S = cfg.input_img_size
        if cfg.resize_input:
            frames = F.interpolate(video.flatten(0, 1), size=(S, S), mode="bicubic", align_corners=False)
            return frames.view(B, T, 3, S, S)
        if tuple(video.shape[-2:]) != (S, S):
            raise ValueError(f"frames must be {S}x{S} (resize_input is off), got {tuple(video.shape[-2:])}")
        return video

    def encode(
        self, video: Tensor, conv_cache: list[Tensor] | None = None, canvas: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """Preprocessed float video (B, T, 3, H, W) -> vision tokens (B, T, P, H), new conv cache.

        ``conv_cache`` continues a stream (None = zeros before the first frame). ``canvas``
        (B, T, 3, S, S): the canvas each frame starts from, required exactly when
        ``config.canvas_input`` (see :func:`start_canvases`)."""
        video = self.frames(video)
        if (canvas is None) == self.config.canvas_input:
            raise ValueError(
                "this policy " + ("needs the canvases its frames start from (canvas_input)" if self.config.canvas_input
                                  else "takes no canvas (canvas_input is off)")
            )
        extra = None
        if canvas is not None:
            if canvas.shape != video.shape:
                raise ValueError(
                    f"canvas must be shaped like the frames {tuple(video.shape)}, got {tuple(canvas.shape)}"
                )
            extra = self.canvas_embed(video, canvas.to(video.dtype))
        features, conv_cache = self.gazing_model.vision_model(video, conv_cache, extra)
        return self.gazing_model.connector(features), conv_cache

    # ---- generation --------------------------------------------------------------------------
    def new_state(
        self, batch_size: int, *, max_frames: int | None = None, max_gazes_per_frame: int | None = None
    ) -> DecodeCache:
        """An empty streaming state with room for ``max_frames`` frames (default
        ``config.max_num_frames``) of at most ``max_gazes_per_frame`` slots (default ``N``)."""
        cfg = self.config
        frames = cfg.max_num_frames if max_frames is None else max_frames
        gazes = cfg.num_patches if max_gazes_per_frame is None else max_gazes_per_frame
        return self._allocate_state(batch_size, frames * (cfg.tokens_per_frame + gazes))

    def _allocate_state(self, batch_size: int, capacity: int) -> DecodeCache:
        cfg = self.config
        dtype = self.gazing_model.gaze_decoder.lm_head.weight.dtype
        shape = (batch_size, capacity + 1, cfg.num_heads, cfg.head_dim)
        return DecodeCache(
            keys=[torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(cfg.num_layers)],
            values=[torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(cfg.num_layers)],
            visible=torch.zeros(batch_size, capacity + 1, dtype=torch.bool, device=self.device),
            length=torch.zeros(batch_size, dtype=torch.int64, device=self.device),
            num_attended=torch.zeros(batch_size, dtype=torch.int64, device=self.device),
            conv_cache=None,
            frames_seen=0,
        )

    def frame_budgets(
        self,
        batch_size: int,
        num_frames: int,
        gazing_ratio: float | Tensor | None = None,
        frame_budgets: int | Tensor | None = None,
        task_loss_requirement: float | Tensor | None = None,
    ) -> Tensor:
        """(B, T) int64 gaze budgets: ``frame_budgets`` as given, else ``max(1, int(float32(ratio) * N))``
        (ratio a float, (T,) or (B, T)), else ``N`` when only a task-loss requirement is given."""
        N, dev = self.config.num_patches, self.device
        if frame_budgets is not None and gazing_ratio is not None:
            raise ValueError("give gazing_ratio or frame_budgets, not both")
        if frame_budgets is not None:
            budgets = torch.as_tensor(frame_budgets, dtype=torch.int64, device=dev)
        elif gazing_ratio is not None:
            ratio = torch.as_tensor(gazing_ratio, dtype=torch.float32, device=dev)
            if bool(((ratio <= 0) | (ratio > 1)).any()):
                raise ValueError(f"gazing_ratio must lie in (0, 1], got {gazing_ratio}")
            budgets = (ratio * N).to(torch.int64).clamp(min=1)
        elif task_loss_requirement is not None:
            budgets = torch.tensor(N, device=dev)
        else:
            raise ValueError("give gazing_ratio, frame_budgets or task_loss_requirement")
        budgets = _expand(budgets, batch_size, num_frames, "budgets")
        if bool(((budgets < 1) | (budgets > N)).any()):
            raise ValueError(f"per-frame budgets must lie in [1, {N}], got {budgets.min()}..{budgets.max()}")
        return budgets

    @torch.no_grad()
    def generate(
        self,
        video: Tensor,
        *,
        gazing_ratio: float | Tensor | None = None,
        frame_budgets: int | Tensor | None = None,
        task_loss_requirement: float | Tensor | None = None,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        min_gazes_per_frame: int = 1,
        state: DecodeCache | None = None,
        return_logits: bool = False,
    ) -> Gazes:
        """Gaze at a batch of clips, frame by frame, with a KV cache.

        Args:
            video: (B, T, 3, H, W) float, preprocessed (see :func:`preprocess`).
            gazing_ratio / frame_budgets / task_loss_requirement: per-frame budgets and stop
                threshold, see :meth:`frame_budgets`; budgets may differ per clip (B, T).
                ``task_loss_requirement`` (float, (T,) or (B, T)) stops a frame once the predicted
                loss is at or below it.
            temperature: 0 = greedy; > 0 samples from ``softmax(masked logits / temperature)``
                with ``generator`` (required, on the model's device).
            min_gazes_per_frame: STOP is not allowed before this many slots of a frame (official: 1).
            state: continue this stream (from :meth:`new_state`; mutated in place). None: a fresh
                state sized for this clip.
            return_logits: also return every slot's raw head logits.

        The patch of a frame already gazed and STOP are masked; for K > 1 heads choose in order,
        each head's pick masked from the later heads; the last step of a frame is cut to the
        budget. ``log_prob`` is under the distribution the gaze was drawn from (temperature 1 when
        greedy): :meth:`score` with ``masked=True`` and the same temperature gives it back. Unlike
        the official sampling (HF ``generate``, whose default ``top_k=50`` applies), sampling uses
        the whole masked distribution.
        """
        cfg = self.config
        B, T = video.shape[:2]
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if temperature > 0 and generator is None:
            raise ValueError("sampling (temperature > 0) needs an explicit torch.Generator")
        if min_gazes_per_frame < 0:
            raise ValueError(f"min_gazes_per_frame must be >= 0, got {min_gazes_per_frame}")
        budgets = self.frame_budgets(B, T, gazing_ratio, frame_budgets, task_loss_requirement)
        thresholds = None
        if task_loss_requirement is not None:
            thr = torch.as_tensor(task_loss_requirement, dtype=torch.float32, device=self.device)
            thresholds = _expand(thr, B, T, "task_loss_requirement")
        need = T * cfg.tokens_per_frame + int(budgets.amax(0).sum())
        if state is None:
            state = self._allocate_state(B, need)
        elif state.length.shape[0] != B:
            raise ValueError(f"state holds {state.length.shape[0]} clips, video has {B}")
        if int(state.length.max()) + need > state.capacity:
            raise ValueError(
                f"the state has {state.capacity - int(state.length.max())} free cache slots, these frames may "
                f"need {need}; make it with a larger max_frames / max_gazes_per_frame"
            )
        if not cfg.canvas_input:
            tokens, state.conv_cache = self.encode(video, state.conv_cache)  # (B, T, P, H)
        else:  # each frame's canvas follows from the gazes of the frame before: encode frame by frame
            frames_in = self.frames(video)
            if state.canvas is None:
                state.canvas = blank_canvas(B, cfg.input_img_size, self.device)
        frames = []
        for t in range(T):
            thr = None if thresholds is None else thresholds[:, t]
            if cfg.canvas_input:
                frame_tokens, state.conv_cache = self.encode(
                    frames_in[:, t : t + 1], state.conv_cache, state.canvas[:, None]
                )
            else:
                frame_tokens = tokens[:, t : t + 1]
            g = self._gaze_frame(
                state, frame_tokens[:, 0], budgets[:, t], thr, temperature, generator, min_gazes_per_frame,
                return_logits,
            )
            if cfg.canvas_input:
                views = cfg.grid.views(frames_in[:, t].float())
                state.canvas = cfg.grid.paste(state.canvas, views, g.gazed_patches()[:, 0])
            frames.append(g)
        state.frames_seen += T
        return Gazes.cat(frames)

    def _decoder_call(
        self,
        state: DecodeCache,
        rows: Tensor,
        embeds: Tensor,
        write: Tensor,
        see: Tensor,
        keep: Tensor,
        positions: Tensor,
    ) -> Tensor:
        """Run B' clips' new tokens through the decoder against the cache.

        rows (B',) sorted clip indices; embeds (B', Q, H); write (B', Q) bool (False = padding,
        sent to the trash slot); see (B', Q) bool: the token is visible to the other tokens of
        this call; keep (B', Q) bool: visible to all later calls; positions (B', Q) int64.
        Returns the final hidden states (B', Q, H).
        """
        B_all = state.length.shape[0]
        everyone = rows.numel() == B_all
        length = state.length[rows]  # (B',)
        slot = length[:, None] + write.long().cumsum(1) - 1  # (B', Q) own slot (padding: the previous one)
        write_index = torch.where(write, slot, state.capacity)
        num_keys = int((length + write.sum(1)).max())
        b = rows[:, None]
        state.visible[b, write_index] = see & write
        visible = state.visible[:, :num_keys] if everyone else state.visible[rows, :num_keys]  # (B', S)
        causal = torch.arange(num_keys, device=rows.device) <= slot[..., None]  # (B', Q, S)
        mask = (visible[:, None, :] & causal)[:, None]  # (B', 1, Q, S)
        cache = KVWrite(state.keys, state.values, None if everyone else rows, write_index, num_keys)
        hidden = self.gazing_model.gaze_decoder.model(embeds, positions, mask, cache)
        state.visible[b, write_index] = keep & write
        state.length[rows] += write.sum(1)
        state.num_attended[rows] += (keep & write).sum(1)
        return hidden

    def _heads(
        self, hidden: Tensor, keys: Tensor | None = None, gazed: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """hidden (A, H); pointer head only: the frame's pointer keys (A, N, S, d) and its gazes so
        far (A, N) or (A, N + 1) bool -> logits (A, K, N+1) float32, loss prediction (A, K), value
        (A, K) or None."""
        dec, K = self.gazing_model.gaze_decoder, self.config.num_multi_token_pred
        logits = dec.lm_head(hidden).float().view(hidden.shape[0], K, -1)
        if self.pointer is not None:
            logits = logits + self.pointer.logits(hidden, keys, gazed[:, : self.config.num_patches])
        loss = dec.task_loss_prediction_head(hidden).float()
        value = None if self.value_head is None else self.value_head(hidden).float()
        return logits, loss, value

    def _choose(
        self, logits: Tensor, used: Tensor, take: Tensor, temperature: float, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """Head-by-head choice. logits (A, K, V), used (A, V) bool (masked for every head), take
        (A, K) bool heads in use -> tokens (A, K) int64, log-probs (A, K) float32 (0 where not taken)."""
        A, K, _ = logits.shape
        scores = logits.masked_fill(used[:, None, :], float("-inf"))
        if temperature == 0:
            # Greedy: only the argmaxes are sequential. Row i of ``scores`` ends up masked with the
            # picks of heads < i only, which is what head i chose from, so one log-softmax after the
            # loop gives every head's log-prob (3 small ops per head instead of 9: decoding is
            # launch-bound on GPUs). Rows of heads not taken may have no token left: their picks
            # only mask later rows that are not taken either.
            picks = []
            for i in range(K):
                tok = scores[:, i].argmax(-1)  # (A,)
                picks.append(tok)
                if i + 1 < K:
                    scores[:, i + 1 :].scatter_(2, tok[:, None, None].expand(-1, K - i - 1, 1), float("-inf"))
            tokens = torch.stack(picks, 1)  # (A, K)
            logp = F.log_softmax(torch.where(take[..., None], scores, 0.0), dim=-1)
            return tokens, torch.where(take, logp.gather(-1, tokens[..., None])[..., 0], 0.0)
        arange_a = torch.arange(A, device=logits.device)
        tokens = torch.zeros(A, K, dtype=torch.int64, device=logits.device)
        log_probs = torch.zeros(A, K, device=logits.device)
        for i in range(K):
            # heads not in use may have no token left: give them a harmless row
            s = torch.where(take[:, i, None], scores[:, i], 0.0)
            logp = F.log_softmax(s / temperature, dim=-1)
            tok = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]
            tokens[:, i] = tok
            log_probs[:, i] = torch.where(take[:, i], logp[arange_a, tok], 0.0)
            later = torch.arange(i + 1, K, device=logits.device)
            scores[arange_a[:, None], later, tok[:, None]] = float("-inf")  # no repeat in later heads
        return tokens, log_probs

    def _gaze_frame(
        self,
        state: DecodeCache,
        vision: Tensor,
        budget: Tensor,
        threshold: Tensor | None,
        temperature: float,
        generator: torch.Generator | None,
        min_gazes_per_frame: int,
        return_logits: bool,
    ) -> Gazes:
        """One frame for every clip: vision (B, P, H), budget (B,) int64, threshold (B,) or None."""
        cfg = self.config
        K, V, STOP, P = cfg.num_multi_token_pred, cfg.vocab_size, cfg.stop_id, cfg.tokens_per_frame
        B, dev = vision.shape[0], vision.device
        G = int(budget.max())
        ids = torch.full((B, G), STOP, dtype=torch.int64, device=dev)
        emitted = torch.zeros(B, G, dtype=torch.bool, device=dev)
        log_prob = torch.zeros(B, G, device=dev)
        loss_pred = torch.zeros(B, G, device=dev)
        value = torch.zeros(B, G, device=dev) if self.value_head is not None else None
        logits_out = torch.zeros(B, G, V, device=dev) if return_logits else None
        heads = torch.arange(K, device=dev)
        embed = self.gazing_model.gaze_decoder.model.embed_tokens

        # prefill: the frame's vision tokens
        active = torch.arange(B, device=dev)
        ones = torch.ones(B, P, dtype=torch.bool, device=dev)
        positions = state.num_attended[:, None] + torch.arange(P, device=dev)
        prefill = self._decoder_call(state, active, vision, ones, ones, ones, positions)  # (B, P, H)
        keys = None if self.pointer is None else self.pointer.patch_keys(prefill, vision)  # (A, N, d)
        used = torch.zeros(B, V, dtype=torch.bool, device=dev)
        logits, loss, val = self._heads(prefill[:, -1], keys, used)  # (A, K, V), (A, K), (A, K) or None
        stale_base = state.num_attended - K  # official decode positions: the last K of the prefill
        done = torch.zeros(B, dtype=torch.int64, device=dev)  # slots emitted in this frame
        used[:, STOP] = True
        while True:
            start = done[active]  # (A,)
            take = heads < (budget[active] - start).clamp(max=K)[:, None]  # (A, K)
            tokens, logp = self._choose(logits, used[active], take, temperature, generator)
            slot = start[:, None] + heads  # (A, K)
            stop = torch.zeros_like(take)
            if threshold is not None:
                stop = take & (slot >= min_gazes_per_frame) & (loss <= threshold[active, None])
            emit = take if cfg.stop_per_head else take & (stop.long().cumsum(1) - stop.long() == 0)
            stop = stop & emit
            step_ids = torch.where(stop, STOP, tokens)
            # record the emitted slots; the loss after slot (head i < K-1) is head i+1's prediction here
            rb, rs = active[:, None].expand(-1, K)[emit], slot[emit]
            ids[rb, rs] = step_ids[emit]
            emitted[rb, rs] = True
            log_prob[rb, rs] = torch.where(stop, 0.0, logp)[emit]
            loss_pred[rb, rs] = F.pad(loss[:, 1:], (0, 1))[emit]
            if value is not None:
                value[rb, rs] = val[emit]
            if logits_out is not None:
                logits_out[rb, rs] = logits[emit]
            keep = emit & ~stop
            used[active[:, None].expand(-1, K)[keep], step_ids[keep]] = True
            done[active] += emit.sum(1)
            cont = ~stop.any(1) & (done[active] < budget[active])  # (A,)
            decode = bool(cont.any())
            # write this step's tokens: with the next decode step when some clip goes on, else in
            # the end-of-frame flush (what the official code does in the next frame's prefill)
            if decode and cfg.official_decode_quirks:
                positions, see = stale_base[active, None] + heads, emit
            else:
                positions, see = state.num_attended[active, None] + keep.long().cumsum(1) - 1, keep
            out = self._decoder_call(state, active, embed(step_ids), emit, see, keep, positions)  # (A, K, H)
            logits, loss, val = self._heads(out[:, K - 1], keys, used[active])
            last = emit[:, K - 1]  # the loss after a head-(K-1) slot is head 0's prediction at its row
            loss_pred[active[last], slot[last, K - 1]] = loss[last, 0]
            if not decode:
                break
            active, logits, loss = active[cont], logits[cont], loss[cont]
            val = None if val is None else val[cont]
            keys = None if keys is None else keys[cont]
        return Gazes(
            ids[:, None],
            emitted[:, None],
            log_prob[:, None],
            loss_pred[:, None],
            None if value is None else value[:, None],
            None if logits_out is None else logits_out[:, None],
            cfg.num_patches,
        )

    # ---- teacher forcing ---------------------------------------------------------------------
    def forward(self, video: Tensor, action: Tensor, frame_id: Tensor, valid: Tensor, **kwargs) -> TensorDict:
        """Same as :meth:`score`."""
        return self.score(video, action, frame_id, valid, **kwargs)

    def score(
        self,
        video: Tensor | None,
        action: Tensor,
        frame_id: Tensor,
        valid: Tensor,
        *,
        masked: bool = True,
        temperature: float = 1.0,
        return_logits: bool = False,
        tokens: Tensor | None = None,
    ) -> TensorDict:
        """Score a batch of trajectories in one teacher-forced pass (differentiable).

        Args:
            video: (B, T, 3, H, W) float, preprocessed.
            action: (B, L) int64 per-frame ids in [0, N], STOP = N.
            frame_id: (B, L) int64 frame of each step; non-decreasing over the valid steps of a clip.
            valid: (B, L) bool; invalid steps are ignored (they may sit anywhere).
            masked: score under the distribution generation samples from: patches already gazed in
                the frame and STOP get probability 0, and STOP steps get log_prob 0 (they come from
                the stop rule, not from sampling). False: the plain softmax over all N + 1 ids, as
                the official teacher-forced forward (STOP steps score the STOP logit).
            temperature: divide the logits by it before the softmax.
            return_logits: add the raw logits (B, L, N + 1) of the head that predicts each step.
            tokens: the vision tokens (B, T, P, H) of ``video`` (:meth:`encode`), instead of
                ``video`` (pass None): rollouts of one clip can then share one encoding.

        Returns a TensorDict, batch [B, L]: ``log_prob``, ``entropy`` (0 at STOP steps when masked),
        ``loss_pred`` (predicted frame loss after the step, the official
        ``task_loss_prediction``), ``value`` (value of the state before the step, value head
        only) and ``logits``; all 0 at invalid steps.
        """
        cfg = self.config
        K, V, STOP, H = cfg.num_multi_token_pred, cfg.vocab_size, cfg.stop_id, cfg.hidden_size
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        hidden, pos, rank, act, fid, valid, keys = self.teacher_forced(video, action, frame_id, valid, tokens=tokens)
        B, T = (video if tokens is None else tokens).shape[:2]
        L = action.shape[1]
        dev = hidden.device
        b_idx = torch.arange(B, device=dev)

        head = rank % K  # (B, L) the head that predicts each step ...
        src = torch.where(valid, pos - head - 1, 0)  # ... from this row
        after_head = (head + 1) % K
        after_row = torch.where(valid, pos - after_head, 0)
        h_src = hidden.gather(1, src[..., None].expand(-1, -1, H))  # (B, L, H)
        dec = self.gazing_model.gaze_decoder
        weight = dec.lm_head.weight.view(K, V, H)
        logits = torch.zeros(B, L, V, dtype=hidden.dtype, device=dev)
        query = None if self.pointer is None else hidden.new_zeros(B, L, cfg.pointer_dim)
        for k in range(K):
            sel = valid & (head == k)
            if bool(sel.any()):
                logits[sel] = (h_src[sel] @ weight[k].T).to(logits.dtype)  # autocast: bf16 product
                if query is not None:
                    q_weight = self.pointer.query.weight.view(K, cfg.pointer_dim, H)[k]
                    query[sel] = (h_src[sel] @ q_weight.T).to(query.dtype)
        logits = logits.float()
        if query is not None:
            pointer = self.pointer.at_steps(query[:, :, None], keys, act, fid, rank, valid, head[..., None])
            logits = logits + pointer[:, :, 0]
        loss_all = dec.task_loss_prediction_head(hidden).float()  # (B, S, K)
        loss_pred = loss_all[b_idx[:, None], after_row, after_head]

        scores = logits / temperature
        is_stop = act == STOP
        if masked:
            banned = gazed_before(act, fid, valid, T, V)
            banned[..., STOP] = True
            banned &= (valid & ~is_stop)[..., None]  # STOP and invalid steps are not scored: keep them finite
            scores = scores.masked_fill(banned, float("-inf"))
        logp_all = F.log_softmax(scores, dim=-1)
        log_prob = logp_all.gather(-1, act[..., None])[..., 0]
        entropy = -(logp_all.exp() * logp_all.masked_fill(torch.isinf(logp_all), 0.0)).sum(-1)
        drop = ~valid | (is_stop if masked else torch.zeros_like(valid))
        out = {
            "log_prob": log_prob.masked_fill(drop, 0.0),
            "entropy": entropy.masked_fill(drop, 0.0),
            "loss_pred": loss_pred.masked_fill(~valid, 0.0),
        }
        if self.value_head is not None:
            value = self.value_head(hidden).float()[b_idx[:, None], src, head]
            out["value"] = value.masked_fill(~valid, 0.0)
        if return_logits:
            out["logits"] = logits.masked_fill(~valid[..., None], 0.0)
        return TensorDict(out, batch_size=[B, L], device=dev)

    def teacher_forced(
        self, video: Tensor | None, action: Tensor, frame_id: Tensor, valid: Tensor, *, tokens: Tensor | None = None
    ) -> TeacherForced:
        """The one teacher-forced decoder pass :meth:`score` and :meth:`multi_token_outputs` share.

        Arguments as :meth:`score`. Returns the final hidden states of the whole sequence
        ``[vision_0 (P), steps of frame 0, vision_1 (P), ...]`` and where every step sits in it.
        Without STOP steps every token is visible, and attention is the plain causal one (no
        (B, 1, S, S) mask is built, so SDPA may use its fused causal kernels).
        """
        cfg = self.config
        STOP, P, H = cfg.stop_id, cfg.tokens_per_frame, cfg.hidden_size
        if (video is None) == (tokens is None):
            raise ValueError("give video or its vision tokens, not both or neither")
        B, T = (video if tokens is None else tokens).shape[:2]
        dev = action.device
        valid = valid.bool()
        if action.shape != frame_id.shape or action.shape != valid.shape or action.shape[0] != B:
            raise ValueError(
                f"action, frame_id and valid must share a shape (B={B}, L), got "
                f"{tuple(action.shape)}, {tuple(frame_id.shape)}, {tuple(valid.shape)}"
            )
        act = torch.where(valid, action, 0)
        fid = torch.where(valid, frame_id, 0)
        if bool(((act < 0) | (act > STOP)).any()) or bool(((fid < 0) | (fid >= T)).any()):
            raise ValueError(f"valid actions must lie in [0, {STOP}] and frame ids in [0, {T})")
        last_frame = torch.where(valid, fid, -1).cummax(1).values
        if bool((valid & (fid < last_frame)).any()):
            raise ValueError("frame_id must be non-decreasing over the valid steps of each clip")
        L = action.shape[1]

        # sequence layout per clip: [vision_0 (P), steps of frame 0, vision_1 (P), steps of frame 1, ...]
        per_frame, before, rank = frame_layout(fid, valid, T)
        pos = (fid + 1) * P + before.gather(1, fid) + rank  # (B, L) sequence position of each step
        seq_len = int((T * P + per_frame.sum(1)).max())
        vis_pos = torch.arange(T, device=dev)[:, None] * P + torch.arange(P, device=dev) + before[:, :, None]  # (B,T,P)

        if tokens is None:
            canvas = None
            if cfg.canvas_input:
                video = self.frames(video)
                canvas = start_canvases(cfg.grid, video, act, fid, valid)
            tokens, _ = self.encode(video, canvas=canvas)  # (B, T, P, H)
        elif tokens.shape[0] != B or tokens.shape[2:] != (P, H):
            raise ValueError(f"tokens must be (B={B}, T, {P}, {H}), got {tuple(tokens.shape)}")
        b_idx = torch.arange(B, device=dev)
        embeds = torch.zeros(B, seq_len, H, dtype=tokens.dtype, device=dev)
        embeds = embeds.index_put((b_idx[:, None, None].expand_as(vis_pos), vis_pos), tokens)
        vb, vpos = b_idx[:, None].expand(B, L)[valid], pos[valid]
        gaze_embeds = self.gazing_model.gaze_decoder.model.embed_tokens(act[valid]).to(embeds.dtype)
        embeds = embeds.index_put((vb, vpos), gaze_embeds)
        visible = torch.zeros(B, seq_len, dtype=torch.bool, device=dev)
        visible[b_idx[:, None, None].expand_as(vis_pos), vis_pos] = True
        visible[vb, vpos] = act[valid] != STOP
        positions = (visible.long().cumsum(1) - 1).clamp(min=0)
        mask = None  # every token visible: plain causal attention (padding only follows a clip's tokens)
        if bool((valid & (act == STOP)).any()):
            causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=dev).tril()
            mask = (visible[:, None, :] & causal)[:, None]  # (B, 1, S, S)
        hidden = self.gazing_model.gaze_decoder.model(embeds, positions, mask, None)  # (B, S, H)
        keys = None
        if self.pointer is not None:
            vision = hidden.gather(1, vis_pos.view(B, T * P, 1).expand(-1, -1, H)).view(B, T, P, H)
            keys = self.pointer.patch_keys(vision, tokens)  # (B, T, N, S, d)
        return TeacherForced(hidden, pos, rank, act, fid, valid, keys)

    def multi_token_outputs(self, video: Tensor, action: Tensor, frame_id: Tensor, valid: Tensor) -> TensorDict:
        """Every head's prediction of every step, in one teacher-forced pass (multi-token training).

        Head ``k`` at the row of step ``i`` of a frame predicts the frame's step ``i + 1 + k`` (the
        row of the frame's last vision token counts as step ``-1``), and loss head ``k`` there the
        frame's loss after step ``i + k``; generation reads head ``k`` only every ``K`` steps,
        training reads all of them. Arguments as :meth:`score` (STOP steps are laid out as there).

        Returns a TensorDict, batch [B, L]: ``logits`` (B, L, K, N + 1) float32, head ``k``'s raw
        logits for step ``j``, made ``k + 1`` steps before it; ``logits_valid`` (B, L, K) bool, such
        a row exists (``rank(j) >= k``) and ``j`` is valid; ``loss_pred`` (B, L, K) float32, loss
        head ``k``'s prediction of the loss after step ``j``, made ``k`` steps before it (head 0:
        at the step's own token); ``loss_pred_valid`` (B, L, K) bool (``rank(j) >= k - 1``).
        Head 0 of ``logits`` and ``loss_pred`` equals :meth:`score`'s when ``K = 1``.
        """
        cfg = self.config
        K, V, H = cfg.num_multi_token_pred, cfg.vocab_size, cfg.hidden_size
        hidden, pos, rank, act, fid, valid, keys = self.teacher_forced(video, action, frame_id, valid)
        B, L = action.shape
        heads = torch.arange(K, device=video.device)
        logits_valid = valid[..., None] & (rank[..., None] >= heads)  # (B, L, K)
        src = torch.where(logits_valid, pos[..., None] - heads - 1, 0)  # (B, L, K) predicting rows
        h_src = hidden.gather(1, src.view(B, L * K, 1).expand(-1, -1, H)).view(B, L, K, H)
        dec = self.gazing_model.gaze_decoder
        logits = torch.einsum("blkh,kvh->blkv", h_src, dec.lm_head.weight.view(K, V, H)).float()
        if self.pointer is not None:
            query = torch.einsum("blkh,kdh->blkd", h_src, self.pointer.query.weight.view(K, cfg.pointer_dim, H))
            logits = logits + self.pointer.at_steps(query, keys, act, fid, rank, valid, heads)
        loss_valid = valid[..., None] & (rank[..., None] >= heads - 1)  # (B, L, K)
        loss_row = torch.where(loss_valid, pos[..., None] - heads, 0)
        h_loss = hidden.gather(1, loss_row.view(B, L * K, 1).expand(-1, -1, H)).view(B, L, K, H)
        loss_pred = torch.einsum("blkh,kh->blk", h_loss, dec.task_loss_prediction_head.weight).float()
        return TensorDict(
            {
                "logits": logits.masked_fill(~logits_valid[..., None], 0.0),
                "logits_valid": logits_valid,
                "loss_pred": loss_pred.masked_fill(~loss_valid, 0.0),
                "loss_pred_valid": loss_valid,
            },
            batch_size=[B, L],
            device=video.device,
        )

    def score_official(
        self, video: Tensor, gazing_pos: Tensor, if_padded_gazing: Tensor, num_gazing_each_frame: Tensor
    ) -> dict[str, Tensor]:
        """The official ``AutoGazeModel.forward(video, gazing_info)``: ``gaze_probs`` and
        ``task_loss_prediction`` (B, S) for official-format gazes (every slot scored, padding as STOP)."""
        N, T = self.config.num_patches, video.shape[1]
        B = gazing_pos.shape[0]
        counts = torch.as_tensor(num_gazing_each_frame, device=gazing_pos.device)
        frame_id = torch.arange(T, device=gazing_pos.device).repeat_interleave(counts).expand(B, -1)
        action = torch.where(if_padded_gazing, N, gazing_pos - N * frame_id)
        td = self.score(video, action, frame_id, torch.ones_like(if_padded_gazing), masked=False)
        return {"gaze_probs": td["log_prob"].exp(), "task_loss_prediction": td["loss_pred"]}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def official_config(raw: dict) -> PolicyConfig:
    """Translate an official ``AutoGazeConfig`` dict (its ``config.json``) into a :class:`PolicyConfig`."""
    gm = raw["gaze_model_config"]
    vis, con, dec = gm["vision_model_config"], gm["connector_config"], gm["gaze_decoder_config"]
    scales = tuple(sorted(int(s) for s in str(raw["scales"]).split("+")))
    n_total = int(raw["num_vision_tokens_each_frame"])
    # official per-scale counts: int(s^2 / sum(s^2) * N); the patch size follows from them
    counts = [int(s**2 / sum(x**2 for x in scales) * n_total) for s in scales]
    sides = [math.isqrt(c) for c in counts]
    patch = scales[0] // sides[0] if sides[0] else 0
    if sum(counts) != n_total or any(g * g != c or g * patch != s for g, c, s in zip(sides, counts, scales)):
        raise ValueError(f"scales {scales} with {n_total} tokens per frame do not form a square patch grid")
    checks = {
        "vision_model_config.temporal_patch_size": (vis.get("temporal_patch_size", 1), 1),
        "vision_model_config.out_dim": (vis["out_dim"], dec["hidden_size"]),
        "connector_config.hidden_dim": (con["hidden_dim"], dec["hidden_size"]),
        "gaze_decoder_config.num_key_value_heads": (
            dec.get("num_key_value_heads", dec["num_attention_heads"]),
            dec["num_attention_heads"],
        ),
        "gaze_decoder_config.head_dim": (
            dec.get("head_dim", dec["hidden_size"] // dec["num_attention_heads"]),
            dec["hidden_size"] // dec["num_attention_heads"],
        ),
        "gaze_decoder_config.vocab_size": (dec["vocab_size"], n_total + 1),
        "gaze_decoder_config.eos_token_id": (dec["eos_token_id"], n_total),
        "gaze_decoder_config.hidden_act": (dec.get("hidden_act", "silu"), "silu"),
        "gaze_decoder_config.attention_bias": (dec.get("attention_bias", False), False),
        "gaze_decoder_config.mlp_bias": (dec.get("mlp_bias", False), False),
    }
    for name, (got, want) in checks.items():
        if got != want:
            raise ValueError(f"unsupported official config: {name} is {got!r}, this implementation needs {want!r}")
    rope = dec.get("rope_scaling") or None
    if rope is not None and rope.get("rope_type", rope.get("type")) != "llama3":
        raise ValueError(f"unsupported rope_scaling {rope}; only llama3 (or none) is implemented")
    return PolicyConfig(
        input_img_size=int(gm["input_img_size"]),
        scales=scales,
        patch_size=patch,
        encoder_patch_size=int(vis["kernel_size"]),
        encoder_hidden_size=int(vis["hidden_dim"]),
        encoder_depth=int(vis["depth"]),
        encoder_temporal_kernel=int(vis["trunk_temporal_kernel_size"]),
        encoder_spatial_kernel=int(vis["trunk_spatial_kernel_size"]),
        hidden_size=int(dec["hidden_size"]),
        intermediate_size=int(dec["intermediate_size"]),
        num_layers=int(dec["num_hidden_layers"]),
        num_heads=int(dec["num_attention_heads"]),
        rms_norm_eps=float(dec["rms_norm_eps"]),
        rope_theta=float(dec["rope_theta"]),
        rope_llama3_factor=None if rope is None else float(rope["factor"]),
        rope_llama3_low_freq_factor=1.0 if rope is None else float(rope["low_freq_factor"]),
        rope_llama3_high_freq_factor=4.0 if rope is None else float(rope["high_freq_factor"]),
        rope_llama3_original_max_positions=8192 if rope is None else int(rope["original_max_position_embeddings"]),
        num_multi_token_pred=int(dec.get("num_multi_token_pred", raw.get("num_multi_token_pred", 1))),
        max_num_frames=int(raw.get("max_num_frames", 16)),
        value_head=False,
        resize_input=True,
        official_decode_quirks=True,
        stop_per_head=True,
    )


def _expand(x: Tensor, B: int, T: int, name: str) -> Tensor:
    """A scalar, (T,) or (B, T) tensor -> (B, T), with a clear error otherwise."""
    if x.dim() > 2 or (x.dim() >= 1 and x.shape[-1] != T) or (x.dim() == 2 and x.shape[0] != B):
        raise ValueError(
            f"{name} must be a scalar, ({T},) or ({B}, {T}) for B={B} clips of T={T} frames, got shape {tuple(x.shape)}"
        )
    return x.expand(B, T)


def _atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write ``path`` through a temporary file in the same folder and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
