"""Downstream ViT speed-up from gazing: a ViT-B/16-like encoder (plain torch, random weights) fed
only the gazed multi-scale patches of T-frame clips, against the same ViT fed every patch of the
finest scale.

Tokens, as in the official multi-scale ViT usage: patch ``(scale s, row r, col c)`` of the gaze
vocabulary is the frame resized to ``g_s * p`` pixels (``g_s`` patches per side at scale ``s``,
``p`` the ViT patch size) and cut into ``p x p`` patches, i.e. the patch's region resized to the
ViT patch size. Every token goes through the same linear patch embedding, plus a position
embedding (the finest grid's table, bilinearly resized to the scale's ``g_s x g_s`` grid), a
scale embedding and a frame embedding. All tokens of a clip attend to each other (joint
space-time attention), in the full baseline (``T * g_finest^2`` tokens) and with gazes
(``sum over frames of the gazes``, clips of a batch padded to the longest and masked). The
gazes come from a :class:`agents.gazer.Gazer` (random paper-preset policy unless
``--checkpoint``), fixed ratio, no early stop; only their number matters for speed. Timed:
tokenisation (resizing, patch gathering) + embedding + transformer, CUDA-synchronised.

    python -m experiments.vit_speedup --device cuda --dtype bf16
    python -m experiments.vit_speedup --device cpu --preset tiny --frames 4 --dim 64 --depth 2 --heads 2

Writes JSON (``--out``), prints a table and appends a ``## ViT speed-up`` section to
``--markdown`` (append only).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agents.gazer import Gazer
from agents.policy import AutoGazePolicy
from experiments.common import atomic_write_json, resolve_device
from gaze_env.patches import PatchGrid

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------------
# the ViT
# ---------------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm transformer block: multi-head self-attention (SDPA) + GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x (B, L, D), mask (B, 1, 1, L) bool (True = attend) or None."""
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(attn.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.norm2(x))


class MultiScaleViT(nn.Module):
    """A ViT over tokens from the multi-scale patch vocabulary ``grid`` (see the module docstring).

    Args:
        grid: the gaze vocabulary; token ``i`` of a frame is its patch ``i``.
        patch_size: ViT patch side ``p`` (every patch is resized to it).
        dim / depth / heads / mlp_ratio: ViT-B is 768 / 12 / 12 / 4.
        max_frames: frames the frame embedding covers.
    """

    def __init__(
        self, grid: PatchGrid, patch_size: int, dim: int, depth: int, heads: int, mlp_ratio: float, max_frames: int
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.grid, self.patch_size = grid, patch_size
        finest = grid.grid_sizes[-1]
        self.patch_embed = nn.Linear(3 * patch_size * patch_size, dim)
        self.pos_embed = nn.Parameter(torch.randn(dim, finest, finest) * 0.02)
        self.scale_embed = nn.Parameter(torch.randn(grid.num_scales, dim) * 0.02)
        self.frame_embed = nn.Parameter(torch.randn(max_frames, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def patches(self, frames: Tensor) -> Tensor:
        """(B, T, 3, H, W) float -> (B, T, N, 3 p^2): every patch of every scale, vocabulary order."""
        B, T = frames.shape[:2]
        p, x = self.patch_size, frames.flatten(0, 1)
        out = []
        for g in self.grid.grid_sizes:
            side = g * p
            resized = x if x.shape[-1] == side else F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
            out.append(F.unfold(resized, kernel_size=p, stride=p).transpose(1, 2))  # (BT, g^2, 3 p^2)
        return torch.cat(out, 1).view(B, T, self.grid.num_patches, -1)

    def token_embed(self) -> Tensor:
        """(N, D): position + scale embedding of every patch of a frame, vocabulary order."""
        out = []
        for k, g in enumerate(self.grid.grid_sizes):
            pos = F.interpolate(self.pos_embed[None], size=(g, g), mode="bilinear", align_corners=False)[0]
            out.append(pos.flatten(1).T + self.scale_embed[k])
        return torch.cat(out)

    def forward(self, frames: Tensor, index: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
        """Encode clips: frames (B, T, 3, H, W) float; ``index`` (B, L) int64 tokens to keep, as
        ``t * N + patch`` (None: every patch of the finest scale); ``valid`` (B, L) bool marks the
        real ones (None: all). Returns (B, L, D)."""
        B, T = frames.shape[:2]
        N, first = self.grid.num_patches, self.grid.offsets[-2]
        if index is None:
            index = torch.arange(T, device=frames.device)[:, None] * N + torch.arange(first, N, device=frames.device)
            index = index.flatten().expand(B, -1)
        patches = self.patches(frames).flatten(1, 2)  # (B, T N, 3 p^2)
        tokens = patches.gather(1, index[..., None].expand(-1, -1, patches.shape[-1]))
        extra = self.token_embed()[index % N] + self.frame_embed[index // N]  # (B, L, D)
        x = self.patch_embed(tokens) + extra
        mask = None if valid is None else valid[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------
# the experiment
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.vit_speedup",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="ViT and gazer precision")
    parser.add_argument("--preset", default="paper", help="gazer policy preset / geometry (default: paper)")
    parser.add_argument("--checkpoint", help="a trained gazer folder instead of a random policy")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip (default: 16)")
    parser.add_argument("--batch-size", type=int, default=1, help="clips per forward (default: 1)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.1, 0.25], help="gazing ratios")
    parser.add_argument("--patch-size", type=int, help="ViT patch size (default: the gaze patch size)")
    parser.add_argument("--dim", type=int, default=768, help="ViT width (default: 768, ViT-B)")
    parser.add_argument("--depth", type=int, default=12, help="ViT blocks (default: 12)")
    parser.add_argument("--heads", type=int, default=12, help="attention heads (default: 12)")
    parser.add_argument("--mlp-ratio", type=float, default=4.0, help="MLP width / dim (default: 4)")
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per row (default: 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forwards per row first (default: 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/vit_speedup.json"), help="JSON results")
    parser.add_argument("--markdown", default="docs/benchmarks.md", help="append the table here; '' = nowhere")
    return parser


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    """Median milliseconds of ``repeats`` calls after ``warmup`` untimed ones."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def gazed_index(gazer: Gazer, frames: Tensor, ratio: float) -> tuple[Tensor, Tensor]:
    """The gazes of ``frames`` (B, T, 3, S, S) preprocessed as ViT token indices ``t * N + patch``:
    index (B, L) int64 and valid (B, L) bool, L the most gazes of a clip."""
    (gazes,) = gazer(frames, gazing_ratio=ratio, task_loss_requirement=None, preprocessed=True).chunks
    B, T, G = gazes.ids.shape
    N = gazes.num_patches
    flat = (torch.arange(T, device=gazes.ids.device)[:, None] * N + gazes.ids).view(B, T * G)
    real = gazes.is_gaze.view(B, T * G)
    order = torch.sort((~real).to(torch.uint8), dim=1, stable=True).indices  # real gazes first
    L = int(real.sum(1).max())
    index, valid = flat.gather(1, order)[:, :L], real.gather(1, order)[:, :L]
    return torch.where(valid, index, 0), valid


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    if args.checkpoint:
        gazer = Gazer.from_pretrained(args.checkpoint, device=device, dtype=dtype, batch_size=args.batch_size)
    else:
        policy = AutoGazePolicy.from_preset(args.preset, max_num_frames=max(args.frames, 1))
        gazer = Gazer(policy, device=device, dtype=dtype, batch_size=args.batch_size)
    if args.frames > gazer.clip_len:
        raise ValueError(f"--frames {args.frames} is more than the gazer's clip length {gazer.clip_len}")
    grid, size = gazer.grid, gazer.config.input_img_size
    patch = args.patch_size or grid.patch_size
    vit = MultiScaleViT(grid, patch, args.dim, args.depth, args.heads, args.mlp_ratio, args.frames)
    vit = vit.eval().to(device=device, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(args.seed)
    frames = torch.randn(args.batch_size, args.frames, 3, size, size, generator=g, device=device).to(dtype)

    full_tokens = args.frames * grid.grid_sizes[-1] ** 2
    full_ms = time_ms(lambda: vit(frames), device, args.repeats, args.warmup)
    rows: list[dict[str, Any]] = [
        {"ratio": 1.0, "setting": "all finest-scale patches", "tokens": full_tokens, "ms": full_ms}
    ]
    print(format_row(rows[0], full_ms), flush=True)
    for ratio in args.ratios:
        with torch.no_grad():
            index, valid = gazed_index(gazer, frames, ratio)
        mask = None if bool(valid.all()) else valid
        ms = time_ms(lambda index=index, mask=mask: vit(frames, index, mask), device, args.repeats, args.warmup)
        row = {
            "ratio": ratio,
            "setting": "gazed multi-scale patches",
            "tokens": float(valid.sum(1).float().mean()),
            "ms": ms,
            "speedup": full_ms / ms,
        }
        rows.append(row)
        print(format_row(row, full_ms), flush=True)
    return {
        "benchmark": "vit_speedup",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "vit": {"dim": args.dim, "depth": args.depth, "heads": args.heads, "mlp_ratio": args.mlp_ratio, "patch": patch},
        "parameters": sum(p.numel() for p in vit.parameters()),
        "grid": {"scales": list(grid.scales), "patch_size": grid.patch_size, "num_patches": grid.num_patches},
        "frames": args.frames,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "rows": rows,
    }


HEADER = "| gazing ratio | tokens / clip | ms / forward | speed-up |\n|---|---|---|---|"


def format_row(row: dict[str, Any], full_ms: float) -> str:
    ratio = "all (finest scale)" if row["setting"] == "all finest-scale patches" else f"{row['ratio']:g}"
    return f"| {ratio} | {row['tokens']:.0f} | {row['ms']:.2f} | {full_ms / row['ms']:.1f}x |"


def markdown(result: dict[str, Any], argv: Sequence[str]) -> str:
    vit, full_ms = result["vit"], result["rows"][0]["ms"]
    lines = [
        "",
        "## ViT speed-up",
        "",
        f"`python -m experiments.vit_speedup {' '.join(argv)}` on {result['device']}, torch {result['torch']}, "
        f"{result['dtype']}: plain-torch ViT (dim {vit['dim']}, depth {vit['depth']}, heads {vit['heads']}, "
        f"patch {vit['patch']}, {result['parameters'] / 1e6:.1f}M parameters, random weights), "
        f"{result['batch_size']} clip(s) of {result['frames']} frames, joint space-time attention; gazed "
        "multi-scale patches (each resized to the ViT patch) vs every finest-scale patch; tokenisation + "
        f"forward, median of {result['repeats']} ({result['date']}).",
        "",
        HEADER,
        *(format_row(r, full_ms) for r in result["rows"]),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    print(HEADER)
    result = run(args)
    atomic_write_json(args.out, result)
    print(f"results -> {args.out}")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        with open(args.markdown, "a") as file:
            file.write(markdown(result, argv))
        print(f"table appended to {args.markdown}")
    return result


if __name__ == "__main__":
    main()
