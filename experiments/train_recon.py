"""Train the learned reconstruction reward: the block-causal multi-scale MAE of ``rewards.mae``.

    python -m experiments.train_recon                       # tiny preset on the CPU, ~8 min
    python -m experiments.train_recon --resume latest       # continue runs/recon/tiny from its newest checkpoint
    python -m experiments.train_recon --preset small --size small --device cuda --steps 20000 --batch_size 64
    python -m experiments.train_recon --videos ~/videos     # your own videos (by-file train / val split)

Each step draws clips from the training data, per-frame gaze counts like the paper's labels
(``rewards.mae.sample_gaze_counts``: per-clip ratio ~ exponential on [0.02, 0.2], Dirichlet split
over frames), the gazes themselves (random multi-scale gazes biased to coarse scales and changing
regions, ``rewards.mae.sample_gaze_masks``, or for a ``gazer_prob`` share of the batches the
gazes of a baseline gazer such as the greedy oracle at those counts) and ``frames_per_clip``
frames to reconstruct, and minimises the per-frame loss (L1 by default) with AdamW, a cosine
schedule and gradient clipping. At the end it prints a quality table: on
held-out clips and identical gazes, the MAE's L1 next to the paste canvas's L1 (replayed through
``gaze_env.core`` with ``PasteReconstructor``).

Writes ``<out>/<preset>/``:
    step_00000500/ ...  checkpoints every ``save_every`` steps (the newest ``keep_last`` are kept)
    final/              the final checkpoint; use it as reward_kwargs={"checkpoint": "<out>/<preset>/final"}
    tb/                 TensorBoard (losses/, charts/, eval/)
    quality.json        the quality table
A checkpoint folder holds model.safetensors, config.json and train_state.pt (see
``experiments.training``).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from experiments.common import clip_source, config_dict, parse_config
from experiments.distributed import Dist, LossModule, is_main_process, run
from experiments.prepare_data import default_data
from experiments.training import (
    EpochSampler,
    Logger,
    cosine_schedule,
    latest_checkpoint,
    load_checkpoint,
    make_train_state,
    progress,
    prune_checkpoints,
    restore_train_state,
    save_checkpoint,
    step_dir,
)
from gaze_env import core
from gaze_env.config import GazeEnvConfig, budget_for_ratio, get_preset
from gaze_env.core import CoreParams
from gaze_env.video import TensorSource, VideoSource, materialize
from rewards.losses import LossFn, l1, make_loss
from rewards.mae import (
    MODEL_SIZES,
    BlockCausalMAE,
    MAEConfig,
    mae_loss,
    sample_gaze_counts,
    sample_gaze_masks,
)


@dataclass
class TrainReconConfig:
    """Hyper-parameters of ``train_recon`` (every field is a ``--flag``)."""

    preset: str = "tiny"
    """Geometry preset (tiny, small, paper): frame size, scales, patch size, clip length."""
    size: str = "tiny"
    """Model size (tiny: CPU, small: GPU); see rewards.mae.MODEL_SIZES."""
    videos: str | None = None
    """A folder of your own videos (split by file into train / val); default: the embedded data."""
    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 16
    """Clips per step: the global batch, over all processes under torchrun (each takes
    batch-size / (processes x --grad-accum) clips per micro-batch)."""
    grad_accum: int = 1
    """Micro-batches per step on each process, gradients accumulated."""
    frames_per_clip: int = 4
    """Frames reconstructed (and scored) per clip and step."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.05
    """AdamW weight decay (on linear weights only)."""
    warmup_steps: int = 150
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = 0.05
    """Final learning rate as a fraction of lr."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 disables)."""
    loss: str = "l1"
    """Per-frame training loss: a name (l1, mse, psnr, ssim) or a JSON mapping such as '{"l1": 1, "ssim": 0.2}'."""
    ratio_min: float = 0.02
    """Smallest per-clip gazing ratio of the random training gazes."""
    ratio_max: float = 0.2
    """Largest per-clip gazing ratio of the random training gazes."""
    ratio_scale: float = 0.05
    """Mean of the exponential the per-clip gazing ratio is drawn from (before truncation)."""
    coarse_bias: float = 1.0
    """Mean bias of the training gazes to coarse scales (0: every patch alike, 1: every scale alike)."""
    change_bias: float = 1.0
    """Mean bias of the training gazes to regions that changed since the previous frame."""
    bias_jitter: float = 1.0
    """Per-clip spread of both biases: each is scaled by a uniform draw on [1 - jitter, 1 + jitter]."""
    uniform_prob: float = 0.25
    """Fraction of clips whose training gazes are uniform (no coarse / change bias)."""
    gazer_prob: float = 0.5
    """Fraction of training batches whose gazes come from a gazer of ``gazers`` (rolled out on the
    paste canvas at the same per-frame counts) instead of the random sampler."""
    gazers: tuple[str, ...] = ("error_greedy", "greedy_oracle")
    """Baseline gazers (agents.baselines) of those batches, drawn uniformly; empty for none."""
    hflip: bool = True
    """Flip half of the training clips horizontally."""
    seed: int = 0
    """Seeds the model init, the data order and every random draw (the training gazes of a step
    from (seed, process rank, step))."""
    dist_timeout: float = 60.0
    """Under torchrun: minutes a process waits in a collective."""
    threads: int = 1
    """torch CPU threads (0: torch's default). One thread is fastest when other jobs share the
    cores (busy-waiting threads oversubscribe them); raise it on a dedicated machine."""
    device: str = "auto"
    """cpu, cuda, cuda:1, ... or auto (CUDA when available); bf16 autocast on CUDA."""
    out: str = "runs/recon"
    """Output root; the run goes to <out>/<preset>/."""
    save_every: int = 500
    """Steps between checkpoints."""
    keep_last: int = 2
    """Step checkpoints kept (final/ is kept apart)."""
    log_every: int = 20
    """Steps between TensorBoard scalars and progress-bar updates."""
    eval_every: int = 500
    """Steps between held-out evaluations (0: never during training)."""
    eval_clips: int = 64
    """Held-out clips of the evaluations and the final quality table."""
    quality: bool = True
    """Print (and save) the quality table at the end."""
    quality_ratios: tuple[float, ...] = (0.05, 0.1)
    """Gazing ratios of the quality table."""
    quality_masks: tuple[str, ...] = ("random", "error_greedy", "greedy_oracle")
    """Gaze masks of the quality table: random, or names of agents.baselines."""
    resume: str | None = None
    """Continue a run: 'latest' (newest checkpoint under <out>/<preset>) or a checkpoint folder."""
    overwrite: bool = False
    """Start afresh even if <out>/<preset> holds checkpoints (they are deleted)."""
    stop_at: int | None = None
    """Stop after this step (with a checkpoint) without finishing, for time-boxed jobs; resume later."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        get_preset(self.preset)
        if self.size not in MODEL_SIZES:
            raise ValueError(f"unknown size {self.size!r}; known: {sorted(MODEL_SIZES)}")
        if min(self.steps, self.batch_size, self.grad_accum, self.save_every, self.log_every) < 1:
            raise ValueError("steps, batch_size, grad_accum, save_every and log_every must be >= 1")
        if not 1 <= self.frames_per_clip <= get_preset(self.preset).num_frames:
            raise ValueError(f"frames_per_clip must lie in [1, T], got {self.frames_per_clip}")
        if not 0 < self.ratio_min <= self.ratio_max <= 1:
            raise ValueError(f"need 0 < ratio_min <= ratio_max <= 1, got {self.ratio_min}, {self.ratio_max}")
        from agents.baselines import BASELINES  # names only; experiments wire agents

        for name in (*self.gazers, *self.quality_masks):
            if name != "random" and name.replace("-", "_") not in BASELINES:
                raise ValueError(f"unknown gazer {name!r}; known: random, {', '.join(BASELINES)}")
        if not 0.0 <= self.gazer_prob <= 1.0:
            raise ValueError(f"gazer_prob must lie in [0, 1], got {self.gazer_prob}")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise ValueError(f"stop_at must lie in [1, steps={self.steps}], got {self.stop_at}")


RESUME_MAY_CHANGE = frozenset(
    {
        "resume",
        "device",
        "threads",
        "progress",
        "stop_at",
        "save_every",
        "keep_last",
        "log_every",
        "eval_every",
        "eval_clips",
        "quality",
        "quality_ratios",
        "quality_masks",
        "overwrite",
        "out",
        "dist_timeout",
    }
)
"""Fields a resumed run may change; any other change would alter the training trajectory (a new
device or thread count may still change the last bits of the arithmetic)."""


@dataclass
class TrainResult:
    run_dir: Path
    final: Path | None
    """The final checkpoint (None when stopped early by ``stop_at``)."""
    losses: dict[int, float] = field(default_factory=dict)
    """Training loss of every step this call ran (step -> loss)."""
    quality: list[dict[str, Any]] = field(default_factory=list)
    """The quality table (see ``quality_table``), when computed."""
    eval_clips: int = 0
    """Held-out clips of the evaluations."""
    seconds: float = 0.0


# ---- data ------------------------------------------------------------------------------------
def data_sources(cfg: TrainReconConfig) -> tuple[VideoSource, VideoSource]:
    """(train, val) clips: the embedded default data, or ``--videos`` (a folder / file split by
    file, or a materialised ``.pt``), decoded once into ``<out>/<preset>/data/`` and read back
    memory-mapped so that training steps never decode video."""
    if cfg.videos is None:
        return (
            default_data("train", cfg.preset, progress=cfg.progress),
            default_data("val", cfg.preset, progress=cfg.progress),
        )
    out = []
    for split in ("train", "val"):
        source = clip_source(cfg.preset, cfg.videos, split)
        if not isinstance(source, TensorSource):
            path = Path(cfg.out) / cfg.preset / "data" / f"{split}_{source.num_frames}x{source.size}.pt"
            if not path.exists():
                materialize(source, path, progress=cfg.progress)
            source = TensorSource(path)
        out.append(source)
    return out[0], out[1]


def _make_loss(spec: str) -> LossFn:
    return make_loss(json.loads(spec) if spec.strip().startswith("{") else spec)


def training_batch(
    cfg: TrainReconConfig, video: torch.Tensor, grid, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Augment clips and draw their gazes and frames to reconstruct: (video, gazed (B,T,N), frames (B,F)).
    The gazes come from the random sampler or, with probability ``gazer_prob``, from a baseline
    gazer, so the model learns both to fill in after poor gazing and to trust a good paste canvas."""
    B, T = video.shape[:2]
    dev = video.device
    if cfg.hflip:
        flip = (torch.rand(B, generator=generator, device=generator.device) < 0.5).to(dev)
        video = torch.where(flip[:, None, None, None, None], video.flip(-1), video)
    counts = sample_gaze_counts(
        B,
        T,
        grid.num_patches,
        generator,
        ratio_range=(cfg.ratio_min, cfg.ratio_max),
        ratio_scale=cfg.ratio_scale,
    )
    pick = torch.rand(2, generator=generator, device=generator.device).tolist()
    if cfg.gazers and pick[0] < cfg.gazer_prob:
        gazer = cfg.gazers[min(int(pick[1] * len(cfg.gazers)), len(cfg.gazers) - 1)]
        gazed = gazer_masks(gazer, grid, video, counts, generator)
    else:
        gazed = sample_gaze_masks(
            grid,
            video,
            counts,
            generator,
            coarse_bias=cfg.coarse_bias,
            change_bias=cfg.change_bias,
            uniform_prob=cfg.uniform_prob,
            bias_jitter=cfg.bias_jitter,
        )
    frames = torch.rand(B, T, generator=generator, device=generator.device).argsort(-1)[:, : cfg.frames_per_clip]
    return video, gazed, frames.to(dev)


# ---- evaluation ------------------------------------------------------------------------------
def paste_frame_losses(grid, video: torch.Tensor, gazed: torch.Tensor, loss: LossFn = l1) -> torch.Tensor:
    """Replay gazes (B, T, N) bool (>= 1 per frame) through ``gaze_env.core`` with the paste
    canvas: (B, T) float32, the loss at each frame end."""
    B, T, N = gazed.shape
    counts = gazed.sum(-1)
    if bool((counts < 1).any()):
        raise ValueError("every frame needs at least one gaze to be replayed")
    params = CoreParams.build(GazeEnvConfig(grid=grid, num_frames=T), loss)
    state = core.reset(params, video, budgets=counts)
    order = (~gazed).to(torch.int8).argsort(dim=-1, stable=True)  # gazed patches first, index order
    b = torch.arange(B, device=video.device)
    while not bool(state.done.all()):
        t = state.frame_t
        core.step(params, state, order[b, t, state.counts[b, t].clamp(max=N - 1)], validate=False)
    return state.frame_loss


def mae_frame_losses(
    model: BlockCausalMAE, video: torch.Tensor, gazed: torch.Tensor, loss: LossFn = l1, chunk: int = 32
) -> torch.Tensor:
    """The MAE's loss on every frame, (B, T) float32, ``chunk`` clips at a time."""
    B, T = video.shape[:2]
    out = []
    for lo in range(0, B, chunk):
        v, g = video[lo : lo + chunk], gazed[lo : lo + chunk]
        frames = torch.arange(T, device=v.device).expand(v.shape[0], T)
        recon = model.reconstruct(v, g, frames)
        out.append(loss(v.flatten(0, 1).float().div(255), recon.flatten(0, 1)).reshape(v.shape[0], T))
    return torch.cat(out).float()


def gazer_masks(name: str, grid, video: torch.Tensor, counts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gazes (B, T, N) bool with ``counts`` (B, T) per frame from a gazer: ``random`` (uniform)
    or a baseline of ``agents.baselines`` (e.g. ``error_greedy``, ``greedy_oracle``) rolled out on
    the paste canvas."""
    if name == "random":
        return sample_gaze_masks(grid, video, counts, generator, uniform_prob=1.0)
    from agents.baselines import make_baseline, run_episodes  # experiments wire agents and rewards

    B, T = video.shape[:2]
    N = grid.num_patches
    params = CoreParams.build(GazeEnvConfig(grid=grid, num_frames=T), l1)
    td = run_episodes(make_baseline(name), params, video, counts, generator=generator)
    gazed = torch.zeros(B, T + 1, N + 1, dtype=torch.bool, device=video.device)
    b = torch.arange(B, device=video.device)[:, None].expand_as(td["action"])
    gazed[b, td["frame_id"], td["action"]] = td["valid"]
    return gazed[:, :T, :N]


def eval_clip_indices(n_source: int, n: int) -> list[int]:
    """``n`` clip indices spread evenly over a source (videos and synthetic clips alike)."""
    n = min(n, n_source)
    return torch.linspace(0, n_source - 1, n).round().long().unique().tolist()


def quality_table(
    model: BlockCausalMAE,
    video: torch.Tensor,
    ratios: Sequence[float],
    masks: Sequence[str],
    seed: int = 0,
) -> list[dict[str, Any]]:
    """MAE vs paste L1 (mean over clips and frames) at the same gazes, per mask kind and ratio."""
    grid = model.grid
    rows = []
    for name in masks:
        for ratio in ratios:
            n = budget_for_ratio(ratio, grid.num_patches)
            counts = torch.full(video.shape[:2], n, dtype=torch.int64, device=video.device)
            gazed = gazer_masks(name, grid, video, counts, torch.Generator(device=video.device).manual_seed(seed))
            paste = paste_frame_losses(grid, video, gazed).mean().item()
            mae = mae_frame_losses(model, video, gazed).mean().item()
            rows.append(
                dict(masks=name, ratio=ratio, gazes_per_frame=n, paste_l1=paste, mae_l1=mae, mae_over_paste=mae / paste)
            )
    return rows


def format_quality(rows: list[dict[str, Any]], clips: int, preset: str) -> str:
    lines = [
        f"quality on {clips} held-out clips ({preset} val split): mean per-frame L1 on [0, 1] pixels, all frames",
        f"{'masks':14s} {'ratio':>5s} {'gazes/frame':>11s} {'paste L1':>9s} {'MAE L1':>8s} {'MAE/paste':>9s}",
    ]
    for r in rows:
        lines.append(
            f"{r['masks']:14s} {r['ratio']:5.2f} {r['gazes_per_frame']:11d} {r['paste_l1']:9.4f} "
            f"{r['mae_l1']:8.4f} {r['mae_over_paste']:9.3f}"
        )
    return "\n".join(lines)


# ---- training --------------------------------------------------------------------------------
def _optimizer(model: torch.nn.Module, cfg: TrainReconConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if name.endswith(".weight") and p.ndim == 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def _check_resume(saved: dict[str, Any], cfg: TrainReconConfig, path: Path) -> None:
    now = config_dict(cfg)
    changed = sorted(k for k in now if k not in RESUME_MAY_CHANGE and saved.get(k) != now[k])
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ValueError(
            f"cannot resume {path}: the run was made with other settings ({diffs}); "
            "resume with the same settings or start a new --out"
        )


def train(cfg: TrainReconConfig, sources: tuple[VideoSource, VideoSource] | None = None) -> TrainResult:
    """Run (or continue) one training run; see the module docstring. ``sources`` (train, val)
    replaces the data ``cfg`` names (for tests and notebooks). Under ``torchrun`` every process
    runs this (``experiments.distributed``): each takes its share of the global batch and draws
    its own training gazes; rank 0 alone evaluates and writes."""
    return run(cfg.device, cfg.dist_timeout, lambda d: _train(cfg, sources, d))


def _train(cfg: TrainReconConfig, sources: tuple[VideoSource, VideoSource] | None, d: Dist) -> TrainResult:
    start = time.perf_counter()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = d.device
    d.per_rank(cfg.batch_size, cfg.grad_accum)  # fail early when the global batch does not divide
    run_dir = Path(cfg.out) / cfg.preset
    loss_fn = _make_loss(cfg.loss)
    train_src, val_src = sources if sources is not None else data_sources(cfg)

    torch.manual_seed(cfg.seed)
    model = BlockCausalMAE(MAEConfig.make(cfg.preset, cfg.size)).to(device)
    grid, T = model.grid, model.config.num_frames
    if (train_src.num_frames, train_src.size) != (T, grid.frame_size):
        raise ValueError(
            f"data clips are {train_src.num_frames} x {train_src.size}px, the preset needs {T} x {grid.frame_size}px"
        )
    opt = _optimizer(model, cfg)
    sched = cosine_schedule(opt, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
    sampler = EpochSampler(len(train_src), cfg.batch_size, cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    step = 0

    if cfg.resume is not None:
        path = latest_checkpoint(run_dir) if cfg.resume == "latest" else Path(cfg.resume)
        if path is None:
            raise FileNotFoundError(f"--resume latest: no checkpoint under {run_dir} (train without --resume first)")
        ck = load_checkpoint(path, model, map_location=device)
        if ck.train_state is None:
            raise ValueError(f"{path} has no training state to resume from (a weights-only checkpoint)")
        _check_resume(ck.config.get("train", {}), cfg, path)
        info = restore_train_state(ck.train_state, opt, sched, {"batch": gen})
        sampler.load_state_dict(info["data_position"]["sampler"])
        step = info["step"]
        d.print(f"resumed from {path} at step {step}")
    elif latest_checkpoint(run_dir) is not None or (run_dir / "final").exists():
        if not cfg.overwrite:
            raise FileExistsError(
                f"{run_dir} already holds checkpoints: pass --resume latest to continue that run, "
                "--overwrite to start afresh, or another --out"
            )
        d.barrier()  # every rank has looked before rank 0 deletes
        if d.is_main:
            for p in [run_dir / "final", run_dir / "tb", *run_dir.glob("step_*")]:
                shutil.rmtree(p, ignore_errors=True)
    ddp = d.wrap(LossModule(model, mae_loss))  # ddp(video, gazed, frames, loss) = mae_loss(model, ...)
    d.print(f"train_recon {cfg.preset}/{cfg.size}: {model.num_parameters():,} parameters; {cfg.steps} steps of "
            f"{cfg.batch_size} clips; {d.describe()}")

    meta = {**model.checkpoint_config(), "train": config_dict(cfg)}

    def checkpoint(path: Path) -> Path:
        data = {"sampler": sampler.state_dict()}
        if d.is_main:
            save_checkpoint(path, model, meta, make_train_state(step, opt, sched, {"batch": gen}, data))
        return path

    result = TrainResult(run_dir, None)
    eval_idx = eval_clip_indices(len(val_src), cfg.eval_clips)
    eval_video = val_src.clips(eval_idx).to(device)
    result.eval_clips = len(eval_idx)
    stop = cfg.stop_at if cfg.stop_at is not None else cfg.steps
    bar = progress(cfg.steps, initial=step, desc=f"train_recon {cfg.preset}/{cfg.size}",
                   enabled=cfg.progress and d.is_main)
    with Logger(run_dir / "tb" if d.is_main else None, purge_step=step if step else None) as log:
        if step == 0:
            log.text("config", f"```\n{json.dumps(meta, indent=2)}\n```")
        model.train()
        t_last, ema = time.perf_counter(), None
        while step < stop:
            gen.manual_seed(d.rank_seed(cfg.seed) * 1_000_033 + step)  # this rank's gazes of this step
            parts = d.split(sampler.next_batch(), cfg.grad_accum)
            opt.zero_grad(set_to_none=True)
            value = 0.0
            for i, part in enumerate(parts):
                video = train_src.clips(part).to(device)
                video, gazed, frames = training_batch(cfg, video, grid, gen)
                with d.accumulate(ddp, sync=i == len(parts) - 1):
                    loss, _ = ddp(video, gazed, frames, loss_fn)
                    (loss / len(parts)).backward()
                value += loss.item() / len(parts)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            opt.step()
            sched.step()
            step += 1
            value = d.all_mean({"loss": value})["loss"]
            result.losses[step] = value
            ema = value if ema is None else 0.95 * ema + 0.05 * value
            if step % cfg.log_every == 0 or step == stop:
                now = time.perf_counter()
                log.log("losses", {"recon": value}, step)
                log.log(
                    "charts",
                    {
                        "lr": sched.get_last_lr()[0],
                        "grad_norm": float(grad_norm),
                        "gazes_per_frame": gazed.sum(-1).float().mean().item(),
                        "steps_per_s": cfg.log_every / max(now - t_last, 1e-9),
                    },
                    step,
                )
                t_last = now
                bar.set_postfix(loss=f"{ema:.4f}")
            bar.update(1)
            if cfg.eval_every and step % cfg.eval_every == 0 and d.is_main:
                log.log("eval", _held_out(model, eval_video, cfg.seed), step)
                model.train()
            if (step % cfg.save_every == 0 or step == stop) and d.is_main:
                checkpoint(step_dir(run_dir, step))
                prune_checkpoints(run_dir, cfg.keep_last)
        bar.close()
        if step >= cfg.steps:
            result.final = checkpoint(run_dir / "final")
            if cfg.quality and d.is_main:
                result.quality = quality_table(model, eval_video, cfg.quality_ratios, cfg.quality_masks, cfg.seed)
                for r in result.quality:
                    log.log(
                        "eval",
                        {
                            f"{r['masks']}_{r['ratio']}_mae_l1": r["mae_l1"],
                            f"{r['masks']}_{r['ratio']}_paste_l1": r["paste_l1"],
                        },
                        step,
                    )
                (run_dir / "quality.json").write_text(json.dumps(result.quality, indent=2) + "\n")
    result.seconds = time.perf_counter() - start
    return result


def _held_out(model: BlockCausalMAE, video: torch.Tensor, seed: int) -> dict[str, float]:
    """MAE and paste L1 on held-out clips at fixed training-like gazes."""
    gen = torch.Generator(device=video.device).manual_seed(seed + 1)
    B, T = video.shape[:2]
    counts = sample_gaze_counts(B, T, model.grid.num_patches, gen)
    gazed = sample_gaze_masks(model.grid, video, counts, gen)
    mae = mae_frame_losses(model, video, gazed).mean().item()
    paste = paste_frame_losses(model.grid, video, gazed).mean().item()
    return {"mae_l1": mae, "paste_l1": paste, "mae_over_paste": mae / paste}


def main(argv: list[str] | None = None) -> TrainResult:
    cfg = parse_config(TrainReconConfig, argv, __doc__)
    result = train(cfg)
    if not is_main_process():  # under torchrun rank 0 prints the summary
        return result
    losses = list(result.losses.values())
    tail = losses[-50:]
    print(f"run: {result.run_dir}  steps this call: {len(losses)}  wall: {result.seconds:.0f} s")
    if tail:
        print(f"final training loss (mean of last {len(tail)} steps): {sum(tail) / len(tail):.4f}")
    if result.final is not None:
        print(f"final checkpoint: {result.final}")
    else:
        print(f"stopped at step {cfg.stop_at}; continue with --resume latest")
    if result.quality:
        print(format_quality(result.quality, result.eval_clips, cfg.preset))
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
