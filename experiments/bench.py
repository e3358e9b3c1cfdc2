"""Environment throughput: env steps per second (rewards included) of every front-end.

Front-ends (``--modes``):
- ``gym``: one ``AutoGazeEnv`` (B = 1 whatever ``--batch-sizes`` says), numpy observations;
- ``sync``: Gymnasium's ``SyncVectorEnv`` of B ``AutoGazeEnv`` (a Python loop over the envs, the
  baseline the batched front-ends replace; only B <= ``--sync-max-envs``);
- ``vector``: ``AutoGazeVectorEnv`` (``make_vec`` with the vector entry point), torch tensors on
  CUDA, numpy on CPU (``--numpy`` forces numpy);
- ``torchrl``: ``AutoGazeTorchEnv`` stepped with ``step_and_maybe_reset`` as collectors do.

The batched front-ends run ``--step-mode`` (``gaze_env.graph``): ``auto`` (their default: CUDA
graphs of the fixed-shape step on CUDA, eager elsewhere), ``eager``, ``static`` or ``graph``, with
the static step's bookkeeping in ``--step-kernel`` (``auto``: CuPy kernels on CUDA where they run;
``torch``: torch ops); each result records the mode that ran, whether its graphs were captured and
whether the step kernels ran. The first step of a graph mode captures the graphs: keep
``--warmup`` >= 1 so that the capture is not timed.

Every step draws a uniformly random valid action per env from its ``action_mask`` (on the env's
device); that draw is NOT counted: the clock (synchronised on CUDA) covers the env's step alone,
including the reward, automatic resets and building the observation. Clips are random uint8
tensors kept on the device (so no decoding or host-to-device copies are timed).

Reported per run: env steps/s (one step = one action of one env: a gaze or a STOP), memory per env
on CUDA (peak allocated during the run over B), the fraction of env steps that ended a frame (the
frame-end work is most of a step's bytes: a short run from synchronised starts may see none), and
a lower bound of the bytes a step must move (``bytes_per_step``) against the card's memory
bandwidth. ``--profile K`` also records, from ``torch.profiler`` over K more steps, the kernels and
host syncs per step and where the GPU time goes.

Writes a JSON file (``--out``) and adds or replaces this configuration's table in
``docs/benchmarks.md`` (``--markdown``). Example::

    python -m experiments.bench --presets tiny,small --batch-sizes 1,64,1024 --device cpu
    python -m experiments.bench --device cuda --presets tiny,small,paper --kernel torch
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from gaze_env import ENV_ID
from gaze_env.config import GazeEnvConfig, get_preset
from gaze_env.core import STEP_KERNELS
from gaze_env.graph import STEP_MODES
from gaze_env.patches import PatchGrid
from gaze_env.torchrl_env import AutoGazeTorchEnv
from rewards.reconstruct import PasteReconstructor

MODES = ("gym", "sync", "vector", "torchrl")

BANDWIDTH_GBS: dict[str, float] = {
    "H200": 4800.0,
    "H100 NVL": 3900.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,  # SXM (HBM3), e.g. "NVIDIA H100 80GB HBM3"
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100": 1555.0,
    "L40S": 864.0,
    "L4": 300.0,
    "A10": 600.0,
    "RTX 4090": 1008.0,
}
"""Peak memory bandwidth in GB/s by a substring of ``torch.cuda.get_device_name`` (first match)."""


@dataclass
class Result:
    preset: str
    mode: str
    batch_size: int
    steps: int
    env_seconds: float
    median_step_ms: float
    steps_per_s: float
    mem_per_env_mb: float | None
    bytes_per_step: float
    achieved_gbs: float
    bandwidth_fraction: float | None
    step_mode: str = "eager"
    graphs: bool = False
    step_kernels: bool = False
    frame_end_fraction: float | None = None
    profile: dict | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.bench",
        description=__doc__.split("\n\n")[0],
        epilog="Random valid actions are drawn on the device from action_mask and are not timed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--presets", default="tiny,small", help="comma-separated presets: tiny, small, paper")
    p.add_argument("--batch-sizes", default="1,64,1024,4096", help="comma-separated numbers of parallel envs B")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated front-ends: {', '.join(MODES)}")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device of the env state")
    p.add_argument(
        "--kernel",
        default="auto",
        choices=("auto", "torch", "cupy"),
        help="PasteReconstructor's kernel: auto (CuPy kernels on CUDA where they run), torch or cupy",
    )
    p.add_argument("--step-mode", default="auto", choices=STEP_MODES, help="step mode of the batched front-ends")
    p.add_argument(
        "--step-kernel",
        default="auto",
        choices=STEP_KERNELS,
        help="the static / graph step's bookkeeping: auto (CuPy kernels on CUDA where they run), torch or cupy",
    )
    p.add_argument("--profile", type=int, default=0, help="profile this many more steps of each run (0: none)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--clips", type=int, default=32, help="random clips in the pool the envs draw from")
    p.add_argument("--gazing-ratio", type=float, default=0.1, help="per-frame budget as a fraction of N")
    p.add_argument("--sync-max-envs", type=int, default=64, help="largest B run in the 'sync' mode")
    p.add_argument("--numpy", action="store_true", help="vector env returns numpy arrays on CUDA too")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="card bandwidth (default: table by GPU name)")
    p.add_argument("--seed", type=int, default=0, help="seed of the clips and actions")
    p.add_argument("--out", default=None, help="JSON output (default runs/bench/bench-<device>-<time>.json)")
    p.add_argument("--markdown", default="docs/benchmarks.md", help="Markdown file whose table is updated ('' skips)")
    args = p.parse_args(argv)
    args.preset_list = [s for s in args.presets.split(",") if s]
    args.batch_list = [int(b) for b in args.batch_sizes.split(",") if b]
    args.mode_list = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.mode_list if m not in MODES]
    if bad:
        p.error(f"unknown modes {bad}; known: {', '.join(MODES)}")
    for name in args.preset_list:
        get_preset(name)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    return args


# ---- machine facts -------------------------------------------------------------------------
def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def card_bandwidth(card: str) -> float | None:
    for key, gbs in BANDWIDTH_GBS.items():
        if key in card:
            return gbs
    return None


def bytes_per_step(grid: PatchGrid, budget: int, fresh_obs: bool = True) -> float:
    """A lower bound of the bytes one env step moves on average (uniformly random gazes).

    Gaze: the square of the gazed patch (mean area sum_k g_k^2 R_k^2 / N pixels) reads canvas,
    scale view and target (3 B/px each) and the level map (1 B/px) and writes canvas and level.
    Observation: the gazed / action_mask bytes; with ``fresh_obs`` (front-ends that hand out new
    tensors every step: gym, sync, torchrl, the eager vector env) also the frame gathered and the
    canvas copied (read + write, 3 B/px each); the graph vector env keeps both in buffers updated
    where they change. Frame end, once per ``budget`` steps: the next frame read and its k scale
    views written, the carried canvas rescored (frame and canvas read).
    """
    H, N, k = grid.frame_size, grid.num_patches, grid.num_scales
    area = sum(g * g * r * r for g, r in zip(grid.grid_sizes, grid.region_sizes)) / N
    gaze = (3 + 3 + 3 + 1 + 3 + 1) * area
    observation = 2 * (2 * N + 1) + (4 * 3 * H * H if fresh_obs else 0)
    frame_end = (3 * H * H * (1 + k) + 2 * 3 * H * H) / budget
    return gaze + observation + frame_end


# ---- runs ----------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_actions(mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(B, N + 1) bool -> (B,) int64 uniformly among the valid actions; STOP where none is valid
    (an ended episode whose action the env ignores)."""
    weights = mask.float()
    weights[:, -1] += (~mask.any(1)).float()
    return torch.multinomial(weights, 1, generator=gen)[:, 0]


class _PadFrameLoss(gym.Wrapper):
    """``AutoGazeEnv``'s ``info["frame_loss"]`` lists the frames ended so far; SyncVectorEnv needs
    one shape per key, so pad it to (T,) with NaN as the batched front-ends report it."""

    def _pad(self, info: dict) -> dict:
        losses = np.full(self.unwrapped.config.num_frames, np.nan, dtype=np.float32)
        losses[: len(info["frame_loss"])] = info["frame_loss"]
        return {**info, "frame_loss": losses}

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return obs, self._pad(info)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, self._pad(info)


def _env_kwargs(preset: str, pool: torch.Tensor, args: argparse.Namespace) -> dict:
    grid = get_preset(preset).grid
    return {
        "preset": preset,
        "videos": pool,
        "gazing_ratio": args.gazing_ratio,
        "reconstructor": PasteReconstructor(grid, kernel=args.kernel),
    }


@dataclass
class RunStats:
    """What one front-end run measured."""

    seconds: list[float]  # inside the env, per timed step
    step_mode: str  # the mode that ran ("eager" for gym / sync)
    graphs: bool  # CUDA graphs were captured and replayed
    step_kernels: bool  # the static step's bookkeeping ran in the CuPy step kernels
    frame_changes: int  # env steps after which the observed frame index differed (timed steps)
    profile: dict | None


def profile_summary(prof: torch.profiler.profile, steps: int) -> dict:
    """Per-step kernel count, GPU time and host-side CUDA calls of a ``torch.profiler`` run, and
    the GPU time's top kernels. Includes the (untimed) random action draw, a few kernels."""
    kernels, runtime = [], {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels.append((e.key, e.count, e.self_device_time_total))
        elif e.key.startswith("cuda") or e.key.startswith("cu"):
            runtime[e.key] = e.count / steps
    kernels.sort(key=lambda k: -k[2])
    device_us = sum(k[2] for k in kernels)
    return {
        "steps": steps,
        "kernels_per_step": sum(k[1] for k in kernels) / steps,
        "gpu_ms_per_step": device_us / steps / 1e3,
        "runtime_calls_per_step": dict(sorted(runtime.items(), key=lambda kv: -kv[1])[:8]),
        "top_kernels": [
            {"name": name[:90], "per_step": count / steps, "ms_per_step": us / steps / 1e3, "share": us / device_us}
            for name, count, us in kernels[:10]
        ]
        if device_us
        else [],
    }


def run_one(mode: str, preset: str, B: int, pool: torch.Tensor, args: argparse.Namespace) -> RunStats:
    """Time the steps of one front-end at batch size B (then profile ``args.profile`` more)."""
    device = torch.device(args.device)
    gen = torch.Generator(device=device if mode in ("vector", "torchrl") else "cpu").manual_seed(args.seed)
    kwargs = _env_kwargs(preset, pool, args)
    batched = {"step_mode": args.step_mode, "step_kernel": args.step_kernel} if mode in ("vector", "torchrl") else {}
    seconds: list[float] = []
    changes = [0]

    def timed(i: int, fn: Callable, before):
        _sync(device)
        t0 = time.perf_counter()
        out, after = fn()
        _sync(device)
        if i >= args.warmup:
            seconds.append(time.perf_counter() - t0)
            changes[0] += int(np.count_nonzero(np.asarray(torch.as_tensor(after).cpu()) != before))
        return out

    if mode == "gym":
        env = gym.make(ENV_ID, device=device, disable_env_checker=True, **kwargs).unwrapped
        rng = np.random.default_rng(args.seed)
        obs, _ = env.reset(seed=args.seed)

        def one(i: int) -> None:
            nonlocal obs
            action = int(rng.choice(np.flatnonzero(obs["action_mask"])))

            def step():
                out, _, terminated, _, _ = env.step(action)
                out = env.reset()[0] if terminated else out
                return out, out["frame_index"]

            obs = timed(i, step, np.asarray(obs["frame_index"]))
    elif mode == "sync":
        env = gym.make_vec(
            ENV_ID, num_envs=B, vectorization_mode="sync", wrappers=[_PadFrameLoss], device=device, **kwargs
        )
        obs, _ = env.reset(seed=args.seed)

        def one(i: int) -> None:
            nonlocal obs
            action = _random_actions(torch.from_numpy(obs["action_mask"]), gen).numpy()

            def step():
                out = env.step(action)[0]
                return out, out["frame_index"]

            obs = timed(i, step, obs["frame_index"].copy())
    elif mode == "vector":
        return_tensors = device.type == "cuda" and not args.numpy
        env = gym.make_vec(ENV_ID, num_envs=B, device=device, return_tensors=return_tensors, **kwargs, **batched)
        obs, _ = env.reset(seed=args.seed)

        def one(i: int) -> None:
            nonlocal obs
            action = _random_actions(torch.as_tensor(obs["action_mask"], device=device), gen)
            before = np.asarray(torch.as_tensor(obs["frame_index"]).cpu()).copy()  # buffers are reused

            def step():
                out = env.step(action)[0]
                return out, out["frame_index"]

            obs = timed(i, step, before)
    else:
        env = AutoGazeTorchEnv(B, device=device, **kwargs, **batched)
        env.set_seed(args.seed)
        td = env.reset()

        def one(i: int) -> None:
            nonlocal td
            td["action"] = _random_actions(td["action_mask"], gen)
            before = td["frame_index"].cpu().numpy().copy()

            def step():
                out = env.step_and_maybe_reset(td)[1]
                return out, out["frame_index"]

            td = timed(i, step, before)

    for i in range(args.warmup + args.steps):
        one(i)
    profile = None
    if args.profile > 0:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        _sync(device)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.profile):
                one(-1)
            _sync(device)
        profile = profile_summary(prof, args.profile)
    unwrapped = getattr(env, "unwrapped", env)
    runner = getattr(unwrapped, "_runner", None)
    return RunStats(
        seconds=seconds,
        step_mode=getattr(unwrapped, "step_mode", "eager"),
        graphs=bool(runner is not None and runner.captured),
        step_kernels=bool(runner is not None and runner.static.kernels),
        frame_changes=changes[0],
        profile=profile,
    )


def bench(args: argparse.Namespace) -> tuple[list[Result], dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    card = card_name(device)
    bandwidth = args.bandwidth_gbs or (card_bandwidth(card) if device.type == "cuda" else None)
    meta = {
        "card": card,
        "device": args.device,
        "kernel": args.kernel,
        "step_mode": args.step_mode,
        "step_kernel": args.step_kernel,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "bandwidth_gbs": bandwidth,
        "python": platform.python_version(),
        "command": "python -m experiments.bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_before": _load(),
    }
    first_grid = get_preset(args.preset_list[0]).grid
    meta["cupy"] = PasteReconstructor(first_grid, kernel=args.kernel).uses_kernels(device)
    if args.kernel == "cupy" and not meta["cupy"]:
        from rewards import cuda

        print(f"warning: --kernel cupy runs the torch code here ({cuda.unsupported(first_grid, device)})")
    results: list[Result] = []
    for preset in args.preset_list:
        p = get_preset(preset)
        cfg = GazeEnvConfig(grid=p.grid, num_frames=p.num_frames, gazing_ratio=args.gazing_ratio)
        gen = torch.Generator().manual_seed(args.seed)
        shape = (args.clips, p.num_frames, 3, p.frame_size, p.frame_size)
        pool = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(device)
        for mode in args.mode_list:
            sizes = [1] if mode == "gym" else [b for b in args.batch_list if mode != "sync" or b <= args.sync_max_envs]
            for B in sizes:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    base = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                stats = run_one(mode, preset, B, pool, args)
                seconds = stats.seconds
                mem = None
                if device.type == "cuda":
                    mem = (torch.cuda.max_memory_allocated(device) - base) / B / 2**20
                rate = B * len(seconds) / sum(seconds)
                # the vector env returning tensors from the static / graph step hands out reused
                # observation buffers; every other front-end fresh tensors or arrays
                reused = mode == "vector" and stats.step_mode != "eager" and device.type == "cuda" and not args.numpy
                moved = bytes_per_step(p.grid, cfg.budgets[0], fresh_obs=not reused)
                achieved = rate * moved / 1e9
                r = Result(
                    preset=preset,
                    mode=mode,
                    batch_size=B,
                    steps=len(seconds),
                    env_seconds=sum(seconds),
                    median_step_ms=1e3 * float(np.median(seconds)),
                    steps_per_s=rate,
                    mem_per_env_mb=mem,
                    bytes_per_step=moved,
                    achieved_gbs=achieved,
                    bandwidth_fraction=achieved / bandwidth if bandwidth else None,
                    step_mode=stats.step_mode,
                    graphs=stats.graphs,
                    step_kernels=stats.step_kernels,
                    frame_end_fraction=stats.frame_changes / (B * len(seconds)),
                    profile=stats.profile,
                )
                results.append(r)
                print(_row(r), flush=True)
                if r.profile is not None:
                    print(_profile_line(r), flush=True)
        del pool
    meta["load_after"] = _load()
    if device.type == "cuda":
        from rewards import cuda

        # the FMA contractions (downsizing, upsizing) of the kernels that matched torch per grid (None: torch code)
        meta["kernel_variants"] = {"/".join(map(str, g.scales)): v for (g, _), v in cuda._variants.items()}
    return results, meta


def _load() -> float | None:
    """The 1-minute load average: CPU timings on a shared machine are only as good as it is low."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


# ---- reports -------------------------------------------------------------------------------
HEADER = (
    "| preset | front-end | step | B | env steps/s | ms / step | median ms | frame ends % | MiB / env "
    "| est. KB / step | est. GB/s | % of bandwidth |\n"
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _row(r: Result) -> str:
    mem = f"{r.mem_per_env_mb:.2f}" if r.mem_per_env_mb is not None else "-"
    frac = f"{100 * r.bandwidth_fraction:.2f}" if r.bandwidth_fraction is not None else "-"
    ends = f"{100 * r.frame_end_fraction:.1f}" if r.frame_end_fraction is not None else "-"
    notes = [note for note, on in (("graphs", r.graphs), ("step kernels", r.step_kernels)) if on]
    step = r.step_mode + (f" ({', '.join(notes)})" if notes else "")
    ms = 1e3 * r.env_seconds / r.steps
    return (
        f"| {r.preset} | {r.mode} | {step} | {r.batch_size} | {r.steps_per_s:,.0f} | {ms:.2f} | "
        f"{r.median_step_ms:.2f} | {ends} | {mem} | {r.bytes_per_step / 1e3:.1f} | {r.achieved_gbs:.3f} | {frac} |"
    )


def _profile_line(r: Result) -> str:
    """One line of ``--profile`` numbers: kernels and GPU time per step, the top kernel."""
    p = r.profile
    top = p["top_kernels"][0] if p["top_kernels"] else None
    calls = ", ".join(f"{k} {v:.1f}" for k, v in list(p["runtime_calls_per_step"].items())[:4])
    head = f"  profile {r.preset}/{r.mode}/B={r.batch_size}: {p['kernels_per_step']:.0f} kernels, "
    head += f"{p['gpu_ms_per_step']:.3f} GPU ms per step; calls per step: {calls}"
    if top:
        head += f"; top kernel {top['name'][:50]!r} {100 * top['share']:.0f}%"
    return head


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def markdown_section(results: list[Result], meta: dict) -> tuple[str, str]:
    """(key, Markdown section) of one configuration; a rerun of the same key replaces it."""
    name = f"{meta['card']}-{meta['device']}-{meta['kernel']}-t{meta['threads']}-{meta['step_mode']}"
    if meta["step_kernel"] != "auto":  # the tables of the default keep their keys
        name += f"-step-{meta['step_kernel']}"
    key = re.sub(r"[^a-z0-9]+", "-", name.lower())
    bw = f", bandwidth {meta['bandwidth_gbs']:.0f} GB/s" if meta["bandwidth_gbs"] else ""
    lines = [
        f"<!-- bench:{key} -->",
        f"### {meta['card']} ({meta['device']}, step mode {meta['step_mode']}, kernel {meta['kernel']}, "
        f"step kernel {meta['step_kernel']}, "
        f"torch CPU threads {meta['threads']}{bw})",
        "",
        f"torch {meta['torch']}, Python {meta['python']}, {meta['date']}, load average "
        f"{_fmt(meta['load_before'])} before / {_fmt(meta['load_after'])} after: `{meta['command']}`",
        "",
        HEADER,
        *(_row(r) for r in results),
        f"<!-- /bench:{key} -->",
    ]
    return key, "\n".join(lines)


MARKDOWN_INTRO = """# Environment benchmarks

Written by `python -m experiments.bench` (see `--help`); each configuration (card, device, step
mode, kernel, threads) has one table, replaced when the bench runs again with it.

- *env steps/s*: actions (gazes or STOPs) applied per second over all B envs, rewards, automatic
  resets and observations included (*ms / step* is its mean, *median ms* is robust to a shared
  machine's hiccups); the random valid actions are drawn on the device from
  `action_mask` and are not timed. `gym` is one `AutoGazeEnv` (B = 1); `sync` is Gymnasium's
  `SyncVectorEnv` over B `AutoGazeEnv`; `vector` is `AutoGazeVectorEnv`; `torchrl` is
  `AutoGazeTorchEnv` stepped with `step_and_maybe_reset`.
- *step*: the batched front-ends' step mode (`eager`, `static`, `graph`; "graphs" when CUDA
  graphs were captured and replayed, "step kernels" when the step's bookkeeping ran in the CuPy
  step kernels), see `gaze_env.graph`.
- *frame ends %*: timed env steps after which the frame index changed (a frame or an episode
  ended); the frame-end work is most of the bytes, so runs that saw none are not representative.
- *MiB / env*: peak CUDA memory allocated during the run over B (CUDA only).
- *est. KB / step*, *est. GB/s*: the bytes a step must move at least (gazed square, observation
  copies where the front-end hands out fresh tensors, frame-end work spread over the frame), times
  the step rate; *% of bandwidth* compares that with the card's peak (`--bandwidth-gbs`).
"""


def update_markdown(path: Path, key: str, section: str) -> None:
    text = path.read_text() if path.exists() else MARKDOWN_INTRO
    pattern = re.compile(rf"<!-- bench:{re.escape(key)} -->.*?<!-- /bench:{re.escape(key)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results, meta = bench(args)
    out = Path(args.out or f"runs/bench/bench-{args.device}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "results": [asdict(r) for r in results]}, indent=2) + "\n")
    print(f"wrote {out}")
    if args.markdown:
        key, section = markdown_section(results, meta)
        update_markdown(Path(args.markdown), key, section)
        print(f"updated {args.markdown} ({key})")


if __name__ == "__main__":
    main()
