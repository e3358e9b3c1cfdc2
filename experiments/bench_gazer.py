"""Gazer speed: milliseconds per call of gazing at T-frame clips with random weights, next to the
official AutoGaze implementation's published timings (paper preset, 16 x 224 x 224, bf16, no
early stop).

Engines (each row one call of B clips, CUDA-synchronised wall time, median over ``--repeats``):

- ``reference``: ``AutoGazePolicy.generate`` (cached decoding with a dynamic set of clips);
- ``static``: ``Gazer`` with :class:`agents.gazer.StaticGenerator`, eager;
- ``graph``: the same engine replaying CUDA graphs (CUDA only);
- ``graph+compile``: ``torch.compile`` before capture (``--compile``).

``same`` is the fraction of gaze slots identical to the reference engine's (bf16 numerics may
flip near-ties between engines whose batch shapes differ; fp32 gives 1.0).

    python -m experiments.bench_gazer --device cuda --dtype bf16
    python -m experiments.bench_gazer --device cpu --dtype fp32 --preset tiny --frames 8 --repeats 1

Writes JSON (``--out``) and appends a ``## gazer`` section to ``--markdown`` (append only).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from agents.gazer import Gazer
from agents.policy import AutoGazePolicy, Gazes
from experiments.common import atomic_write_json, resolve_device

OFFICIAL_MS: dict[tuple[int, float, int], float] = {
    (10, 0.1, 1): 332.0,
    (10, 0.1, 16): 326.0,
    (10, 0.75, 1): 2100.0,
    (10, 0.75, 16): 2900.0,
    (1, 0.1, 1): 2200.0,
}
"""(K, gazing ratio, batch) -> ms per call of the official implementation (paper preset, bf16)."""

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.bench_gazer",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="model precision (default: bf16)")
    parser.add_argument("--preset", default="paper", help="policy preset (default: paper)")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip (default: 16)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="clips per call (default: 1 16)")
    parser.add_argument(
        "--ratios", type=float, nargs="+", default=[0.1, 0.75], help="gazing ratios (default: 0.1 0.75)"
    )
    parser.add_argument("--k", type=int, nargs="+", default=[10, 1], help="multi-token K values (default: 10 1)")
    parser.add_argument(
        "--all", action="store_true", help="every K x ratio x batch combination, not only those with official timings"
    )
    parser.add_argument(
        "--engines",
        nargs="+",
        default=["reference", "static", "graph"],
        choices=["reference", "static", "graph"],
        help="engines to time (graph: CUDA only; default: all)",
    )
    parser.add_argument("--compile", action="store_true", help="also time graph+compile (torch.compile before capture)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per row first (default: 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/gazer.json"), help="JSON results")
    parser.add_argument("--markdown", default="docs/benchmarks.md", help="append the table here; '' = nowhere")
    return parser


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> tuple[list[float], Any]:
    """Milliseconds of ``repeats`` calls after ``warmup`` untimed ones, and the last output."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return times, out


def agreement(ours: Gazes, reference: Gazes) -> float:
    """Fraction of (clip, frame, slot) entries with the same id and emitted flag."""
    G = min(ours.ids.shape[-1], reference.ids.shape[-1])
    same = (ours.ids[..., :G] == reference.ids[..., :G]) & (ours.emitted[..., :G] == reference.emitted[..., :G])
    return float(same.float().mean())


def make_call(engine: str, policy: AutoGazePolicy, video: torch.Tensor, ratio: float) -> Callable[[], Gazes]:
    """One gazing call of ``engine`` on ``video`` (B, T, 3, S, S) preprocessed, returning its Gazes."""
    if engine == "reference":
        return lambda: policy.generate(video, gazing_ratio=ratio)
    gazer = Gazer(
        policy, batch_size=video.shape[0], cuda_graph=engine.startswith("graph"), compile=engine == "graph+compile"
    )
    return lambda: gazer(video, gazing_ratio=ratio, task_loss_requirement=None, preprocessed=True).chunks[0]


def cases(args: argparse.Namespace) -> list[tuple[int, float, int]]:
    out = [(k, r, b) for k in args.k for r in args.ratios for b in args.batch_sizes]
    return out if args.all else [c for c in out if c in OFFICIAL_MS]


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    engines = [e for e in args.engines if e != "graph" or device.type == "cuda"]
    if args.compile and device.type == "cuda":
        engines.append("graph+compile")
    rows = []
    for k, ratio, batch in cases(args):
        torch.manual_seed(args.seed)
        policy = AutoGazePolicy.from_preset(args.preset, num_multi_token_pred=k).eval().to(device=device, dtype=dtype)
        size = policy.config.input_img_size
        g = torch.Generator(device=device).manual_seed(args.seed)
        video = torch.randn(batch, args.frames, 3, size, size, generator=g, device=device).to(dtype)
        reference = None
        for engine in engines:
            row: dict[str, Any] = {"k": k, "ratio": ratio, "batch": batch, "engine": engine}
            try:
                fn = make_call(engine, policy, video, ratio)
                times, out = time_calls(fn, device, args.repeats, args.warmup)
                row["ms"] = statistics.median(times)
                row["ms_all"] = times
                if engine == "reference":
                    reference = out
                if reference is not None:
                    row["same"] = agreement(out, reference)
            except Exception as error:  # a failing engine (e.g. compile) must not hide the others
                row["error"] = f"{type(error).__name__}: {error}"[:500]
            official = OFFICIAL_MS.get((k, ratio, batch))
            row["official_ms"] = official
            if "ms" in row and official is not None:
                row["speedup_vs_official"] = official / row["ms"]
            rows.append(row)
            print(format_row(row), flush=True)
    for row in rows:
        base = next(
            (
                r
                for r in rows
                if r["engine"] == "reference"
                and (r["k"], r["ratio"], r["batch"]) == (row["k"], row["ratio"], row["batch"])
            ),
            None,
        )
        if base is not None and "ms" in base and "ms" in row:
            row["speedup_vs_reference"] = base["ms"] / row["ms"]
    return {
        "benchmark": "gazer",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "preset": args.preset,
        "frames": args.frames,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "rows": rows,
    }


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def format_row(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"| {row['k']} | {row['ratio']} | {row['batch']} | {row['engine']} | failed: {row['error']} | | | | |"
    return (
        f"| {row['k']} | {row['ratio']} | {row['batch']} | {row['engine']} | {row['ms']:.1f} | "
        f"{_fmt(row.get('official_ms'), '{:.0f}')} | {_fmt(row.get('speedup_vs_official'), '{:.1f}x')} | "
        f"{_fmt(row.get('speedup_vs_reference'), '{:.1f}x')} | {_fmt(row.get('same'), '{:.3f}')} |"
    )


HEADER = (
    "| K | ratio | B | engine | ms / call | official ms | vs official | vs reference | same gazes |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def markdown(result: dict[str, Any], argv: Sequence[str]) -> str:
    lines = [
        "",
        "## gazer",
        "",
        f"`python -m experiments.bench_gazer {' '.join(argv)}` on {result['device']}, torch {result['torch']}, "
        f"{result['dtype']}, preset {result['preset']}, {result['frames']} frames, random weights, no early stop, "
        f"median of {result['repeats']} calls after {result['warmup']} warm-up calls ({result['date']}). "
        "Official: the published timings of the official implementation (bf16). 'same gazes': fraction of "
        "slots equal to the reference engine's.",
        "",
        HEADER,
        *(format_row(r) for r in result["rows"]),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import sys

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
