"""Mean per-frame loss of every baseline gazer at several gazing ratios, on held-out clips.

At gazing ratio ``r`` every frame gets the budget ``max(1, floor(r * N))`` and each baseline
(``agents.baselines``) fills it; the score is the loss of each frame's reconstruction when the
frame ends, averaged over frames and clips (lower is better). Prints a Markdown table (one row
per baseline, one column per ratio) and writes it with the raw numbers as JSON.

    python -m experiments.evaluate_baselines --preset tiny --num-clips 64
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from agents.baselines import BASELINES, make_baseline, run_episodes
from experiments.common import (
    atomic_write_json,
    clip_source,
    config_dict,
    parse_config,
    resolve_device,
    seed_everything,
)
from gaze_env.builder import build
from gaze_env.config import budget_for_ratio


@dataclass(frozen=True)
class EvaluateBaselinesConfig:
    """Score every baseline gazer at several gazing ratios on held-out clips."""

    preset: Literal["tiny", "small", "paper"] = "tiny"
    """Geometry preset (frame size, scales, patch size, frames per clip)."""
    videos: str | None = None
    """Clips: a folder or video file, or a .pt file from gaze_env.video.materialize; none = the
    embedded default data (split below)."""
    split: Literal["train", "val"] = "val"
    """Split of the embedded default data (when videos is none)."""
    num_clips: int = 64
    """Clips scored: source indices 0 .. num_clips - 1 (default data: 8 real clips, then synthetic)."""
    ratios: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2)
    """Gazing ratios; each frame's budget is max(1, floor(ratio * N))."""
    baselines: tuple[str, ...] = BASELINES
    """Baselines to score (see agents.baselines.BASELINES)."""
    loss: str = "l1"
    """Per-frame loss: l1, mse, psnr, ssim or module:function."""
    reconstructor: str = "paste"
    """Reconstructor: paste (grey start) or paste-black."""
    max_candidates: int | None = None
    """Patches the greedy oracle tries per gaze (none: every valid patch)."""
    batch_size: int = 32
    """Clips rolled out together."""
    seed: int = 0
    """Seeds the random baselines (the same draws for every ratio)."""
    device: str = "cpu"
    """Torch device: cpu, cuda, cuda:<i> or auto."""
    out: str | None = None
    """JSON output path (default: runs/baselines/<preset>.json)."""

    def __post_init__(self) -> None:
        if self.num_clips < 1 or self.batch_size < 1:
            raise ValueError(f"num_clips and batch_size must be >= 1, got {self.num_clips}, {self.batch_size}")
        if not self.ratios or not all(0 < r <= 1 for r in self.ratios):
            raise ValueError(f"ratios must be in (0, 1], got {self.ratios}")
        unknown = [b for b in self.baselines if b.replace("-", "_") not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baselines {unknown}; known: {list(BASELINES)}")


def markdown_table(losses: dict[str, dict[float, float]], ratios: tuple[float, ...]) -> str:
    """Rows = baselines, columns = gazing ratios, cells = mean per-frame loss."""
    lines = [
        "| baseline | " + " | ".join(f"ratio {r:g}" for r in ratios) + " |",
        "|---|" + "---:|" * len(ratios),
    ]
    for name, row in losses.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[r]:.4f}" for r in ratios) + " |")
    return "\n".join(lines)


def evaluate(cfg: EvaluateBaselinesConfig) -> dict:
    """Run every baseline at every ratio; returns the JSON-ready results."""
    device = resolve_device(cfg.device)
    params = build(cfg.preset, reward_kwargs={"loss": cfg.loss}, reconstructor=cfg.reconstructor).params
    T, N = params.config.num_frames, params.config.grid.num_patches
    source = clip_source(cfg.preset, cfg.videos, cfg.split, min_clips=cfg.num_clips)
    if len(source) < cfg.num_clips:
        raise ValueError(f"the source holds {len(source)} clips, fewer than num_clips={cfg.num_clips}")
    video = source.clips(range(cfg.num_clips))
    losses: dict[str, dict[float, float]] = {}
    seconds: dict[str, float] = {}
    for name in cfg.baselines:
        kwargs = {"max_candidates": cfg.max_candidates} if name.replace("-", "_") == "greedy_oracle" else {}
        policy = make_baseline(name, **kwargs)
        start = time.perf_counter()
        losses[policy.name] = {}
        for ratio in cfg.ratios:
            budgets = torch.full((T,), budget_for_ratio(ratio, N), dtype=torch.int64, device=device)
            generator = torch.Generator(device=device).manual_seed(cfg.seed)
            total = 0.0
            for lo in range(0, cfg.num_clips, cfg.batch_size):
                td = run_episodes(
                    policy, params, video[lo : lo + cfg.batch_size].to(device), budgets, generator=generator
                )
                total += float(td["frame_loss"].double().sum())
            losses[policy.name][ratio] = total / (cfg.num_clips * T)
        seconds[policy.name] = time.perf_counter() - start
    return {
        "config": config_dict(cfg),
        "source": repr(source),
        "num_patches": N,
        "budgets": {str(r): budget_for_ratio(r, N) for r in cfg.ratios},
        "mean_frame_loss": {name: {str(r): v for r, v in row.items()} for name, row in losses.items()},
        "seconds": seconds,
        "table": markdown_table(losses, cfg.ratios),
    }


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(EvaluateBaselinesConfig, argv)
    seed_everything(cfg.seed)  # for library code on global RNGs; ours takes explicit generators
    results = evaluate(cfg)
    out = Path(cfg.out) if cfg.out is not None else Path("runs/baselines") / f"{cfg.preset}.json"
    atomic_write_json(out, results)
    print(f"mean per-frame {cfg.loss} loss, preset {cfg.preset}, {cfg.num_clips} {cfg.split} clips:\n")
    print(results["table"])
    print(f"\nwritten to {out}")
    return results


if __name__ == "__main__":
    main()
