"""Behaviour-cloning pre-training of the AutoGaze policy on greedy-oracle gazes (paper, stage 1).

    python -m experiments.train_bc                      # what `make train-bc` runs (tiny, CPU)
    python -m experiments.train_bc --preset small --device cuda --expert data/expert/small
    python -m experiments.train_bc --resume             # continue the run in --out exactly
    python -m experiments.train_bc --bench --preset paper --device cuda   # throughput, no data

What a run does, top to bottom:

1. Expert data: ``--expert`` (default ``data/expert/<preset>``, the folder ``make collect-expert``
   writes). When it holds fewer than ``--expert-clips`` clips they are labelled first with
   ``experiments.collect_expert.collect`` (its defaults otherwise, with the candidates' losses when
   ``--soft-coef`` > 0; a rerun appends or resumes). Every clip of the data set is then used.
2. Policy: ``AutoGazePolicy.from_preset(preset)`` with the size overrides below; AdamW (no weight
   decay on gains, biases and embeddings), linear warm-up + cosine decay, gradient clipping,
   bf16 autocast on CUDA only. The loss is ``agents.bc.bc_loss`` (one teacher-forced pass per
   batch: multi-token cross-entropy + loss-prediction L2, optionally the soft-label distillation
   term on the oracle's whole ranking of the candidates, ``--soft-coef``).
3. Every ``--eval-interval`` steps and at the end: greedy rollouts of the policy at fixed gazing
   ratios on held-out clips (default: the first ``--eval-clips`` clips of
   ``prepare_data.default_data("val", preset)``), mean per-frame loss through the environment's
   core, next to the greedy oracle, random and rgb_diff baselines on the same clips (computed
   once); and how much the policy reads the video (``agents.bc.content_reliance`` on the last 64
   expert clips: the cross-entropy with each clip's own video vs another clip's, their gap near 0
   for a content-blind policy). TensorBoard (``<out>/tb``): ``losses/``, ``charts/``, ``eval/``.
4. Checkpoints ``<out>/step_<step>/`` every ``--ckpt-interval`` steps (atomic, the newest
   ``--keep-checkpoints`` kept; weights, optimizer, schedule, RNG and data position), so that
   ``--resume`` continues exactly: the same losses as an uninterrupted run.
5. The stable export ``<out>/final/`` (``AutoGazePolicy.save_pretrained``, what the RL stage
   loads), ``<out>/results.json`` and the final table (also ``<out>/results.md``).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from tensordict import TensorDict

from agents.baselines import make_baseline, run_episodes
from agents.bc import BATCH_KEYS, OPTIONAL_KEYS, bc_loss, bc_totals, content_reliance
from agents.policy import AutoGazePolicy, PolicyConfig, gazed_before, preprocess
from agents.rollout import rollout
from experiments.collect_expert import CollectExpertConfig, collect, expert_chunks
from experiments.common import (
    atomic_write_json,
    atomic_write_text,
    clip_source,
    config_dict,
    parse_config,
    resolve_device,
    seed_everything,
)
from experiments.distributed import Dist, LossModule, run
from experiments.evaluate_baselines import markdown_table
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
from gaze_env.builder import Built, build
from gaze_env.config import budget_for_ratio, get_preset

POLICY_OVERRIDES = (
    "num_multi_token_pred",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "encoder_hidden_size",
    "encoder_patch_size",
    "canvas_input",
    "pointer_head",
    "pointer_dim",
    "pointer_coverage",
)
"""TrainBCConfig fields that override the policy preset (same names as PolicyConfig)."""

RUN_ONLY_FIELDS = frozenset(
    {"resume", "stop_at", "progress", "eval_interval", "ckpt_interval", "keep_checkpoints", "device", "out",
     "expert", "expert_clips", "eval_clips", "eval_batch_size", "eval_ratios", "eval_baselines", "videos",
     "grad_accum", "dist_timeout"}
)
"""Fields a resumed run may change: they do not change the training math."""

DIAGNOSTICS = ("acc", "acc_head_last", "entropy", "pred_mae", "kl")
"""Diagnostics of ``agents.bc.bc_loss`` logged under ``charts/`` (``kl`` with the soft term only)."""

BASELINE_ROWS = ("greedy_oracle", "random", "rgb_diff")
"""Baselines of the final table (besides the trained policy)."""


@dataclass(frozen=True)
class TrainBCConfig:
    """Behaviour-cloning pre-training of the AutoGaze policy on greedy-oracle gazes (stage 1)."""

    preset: Literal["tiny", "small", "paper"] = "tiny"
    """Geometry preset of the env and the policy (frame size, scales, patch size, frames)."""
    out: str | None = None
    """Run folder: checkpoints, TensorBoard, final/ export (default runs/bc/<preset>)."""
    resume: bool = False
    """Continue the newest checkpoint in --out exactly (weights, optimizer, schedule, RNG, data
    position); the training settings must be the ones it was written with."""
    # ---- data
    expert: str | None = None
    """Expert data set from experiments.collect_expert (default data/expert/<preset>)."""
    expert_clips: int = CollectExpertConfig.num_clips
    """Label clips with the greedy oracle first when the expert data set holds fewer than this
    (default: collect_expert's own default)."""
    videos: str | None = None
    """Clips for labelling (train split) and evaluation (val split): a folder or video file, or a
    .pt file; none = the embedded default data."""
    # ---- optimisation
    steps: int = 480
    """Optimizer steps (the schedule spans them)."""
    epochs: float | None = None
    """Train this many passes over the expert data instead of --steps (steps = ceil(epochs *
    clips / batch size))."""
    batch_size: int = 32
    """Expert clips per step: the global batch, over all processes under torchrun (each takes
    batch-size / (processes x --grad-accum) clips per micro-batch)."""
    grad_accum: int = 1
    """Micro-batches per step on each process, gradients accumulated (same update as one batch)."""
    lr: float = 2e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW weight decay (matrices only: not on norms, biases, embeddings)."""
    betas: tuple[float, ...] = (0.9, 0.98)
    """AdamW betas."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    min_lr_ratio: float = 0.05
    """The cosine decays to this fraction of --lr."""
    grad_clip: float = 1.0
    """Clip the gradient's global L2 norm to this (0: no clipping)."""
    pred_coef: float = 1.0
    """Weight of the loss-prediction L2 (losses/pred) next to the cross-entropy."""
    mask_gazed: bool = True
    """Cross-entropy over the patches not gazed yet in the frame (what generation samples from)."""
    ce_coef: float = 1.0
    """Weight of the cross-entropy on the expert's own gazes (losses/ce is logged unweighted)."""
    soft_coef: float = 0.0
    """Weight of the soft-label distillation term (losses/soft, agents.bc): cross-entropy against
    the oracle's ranking of every candidate patch (needs expert data with candidate_loss); 0: off."""
    soft_tau: float = 0.1
    """Temperature of the soft labels, in spreads of the candidates' losses (agents.bc.soft_targets)."""
    amp: bool = True
    """bf16 autocast on CUDA (never on CPU)."""
    # ---- policy size (none: the preset's value; names as agents.policy.PolicyConfig)
    num_multi_token_pred: int | None = None
    """K, gazes predicted per decoder call (preset: tiny 1, small / paper 10)."""
    hidden_size: int | None = None
    """Decoder width (preset: tiny 64, small / paper 192)."""
    intermediate_size: int | None = None
    """SwiGLU MLP width (preset: tiny 128, small / paper 384)."""
    num_layers: int | None = None
    """Decoder layers (preset: tiny 2, small / paper 4)."""
    num_heads: int | None = None
    """Attention heads (preset: tiny 4, small / paper 6)."""
    encoder_hidden_size: int | None = None
    """Conv encoder channels (preset: tiny 64, small / paper 192)."""
    encoder_patch_size: int | None = None
    """Conv patch embedding kernel = stride in pixels; (frame / it)^2 vision tokens per frame
    (preset: tiny 8, small 8, paper 16)."""
    canvas_input: bool | None = None
    """The encoder also sees the policy's own paste reconstruction each frame starts from
    (agents.policy.PolicyConfig.canvas_input)."""
    pointer_head: bool | None = None
    """Pointer term on the patch logits from the current frame's vision tokens
    (agents.policy.PolicyConfig.pointer_head)."""
    pointer_dim: int | None = None
    """Query / key width of the pointer head (preset: 32)."""
    pointer_coverage: bool | None = None
    """Pointer keys per coverage state of the frame's gazes so far
    (agents.policy.PolicyConfig.pointer_coverage)."""
    # ---- evaluation, checkpoints, logging
    eval_interval: int = 160
    """Evaluate the policy every this many steps (0: only at the end)."""
    eval_clips: int = 32
    """Held-out clips scored (the first ones of the val split)."""
    eval_ratios: tuple[float, ...] = (0.05, 0.1, 0.2)
    """Fixed gazing ratios of the evaluation (budget max(1, floor(ratio * N)) per frame)."""
    eval_baselines: tuple[str, ...] = BASELINE_ROWS
    """Baselines scored once on the same clips (see agents.baselines.BASELINES)."""
    eval_batch_size: int = 32
    """Clips rolled out together in the evaluation."""
    ckpt_interval: int = 160
    """Write a checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Newest step checkpoints kept."""
    stop_at: int | None = None
    """Stop after this step with a checkpoint, without finishing (the schedule still spans
    --steps; continue with --resume): for time-limited jobs."""
    device: str = "cpu"
    """Torch device: cpu, cuda, cuda:<i> or auto."""
    seed: int = 0
    """Seeds the data order and the policy's initial weights."""
    dist_timeout: float = 60.0
    """Under torchrun: minutes a process waits in a collective (rank 0 may label the expert
    data first while the others wait)."""
    progress: bool = True
    """Show a tqdm progress bar."""
    # ---- benchmark
    bench: bool = False
    """Only measure: training throughput (forward + backward + AdamW step, clips/s) on random
    expert-like data at --bench-ratio, and generation latency of one clip; no data needed."""
    bench_ratio: float = 0.1
    """Gazing ratio of the benchmark's trajectories and generation."""
    bench_steps: int = 20
    """Timed steps (after as many warm-up steps, at least 3)."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.expert_clips < 1 or self.grad_accum < 1:
            raise ValueError(f"steps, batch_size, expert_clips and grad_accum must be >= 1, got {self.steps}, "
                             f"{self.batch_size}, {self.expert_clips}, {self.grad_accum}")
        if self.dist_timeout <= 0:
            raise ValueError(f"dist_timeout must be > 0 minutes, got {self.dist_timeout}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.lr <= 0 or min(self.weight_decay, self.grad_clip, self.pred_coef, self.ce_coef, self.soft_coef) < 0:
            raise ValueError("lr must be > 0 and weight_decay, grad_clip, pred_coef, ce_coef, soft_coef >= 0")
        if self.soft_tau <= 0:
            raise ValueError(f"soft_tau must be > 0, got {self.soft_tau}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need warmup_steps >= 0 and 0 <= min_lr_ratio <= 1, got {self.warmup_steps}, "
                             f"{self.min_lr_ratio}")
        if min(self.eval_interval, self.ckpt_interval) < 0 or self.keep_checkpoints < 1:
            raise ValueError("eval_interval and ckpt_interval must be >= 0, keep_checkpoints >= 1")
        if self.eval_clips < 1 or self.eval_batch_size < 1 or not all(0 < r <= 1 for r in self.eval_ratios):
            raise ValueError("eval_clips and eval_batch_size must be >= 1 and eval_ratios in (0, 1]")
        if self.stop_at is not None and self.stop_at < 1:
            raise ValueError(f"stop_at must be >= 1, got {self.stop_at}")
        if not 0 < self.bench_ratio <= 1 or self.bench_steps < 1:
            raise ValueError("bench_ratio must lie in (0, 1] and bench_steps be >= 1")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path("runs/bc") / self.preset

    @property
    def expert_dir(self) -> Path:
        return Path(self.expert) if self.expert is not None else Path("data/expert") / self.preset

    def policy_config(self) -> PolicyConfig:
        """The preset's policy config with this run's size overrides."""
        overrides = {k: getattr(self, k) for k in POLICY_OVERRIDES if getattr(self, k) is not None}
        return AutoGazePolicy.from_preset(self.preset, **overrides).config


# ---- data ------------------------------------------------------------------------------------
class ExpertData:
    """The clips of an expert data set, memory-mapped chunk by chunk; ``batch(indices)`` reads the
    entries ``bc_loss`` reads of those clips (global index = position in chunk order)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.chunks = expert_chunks(self.path)
        if not self.chunks:
            raise ValueError(f"{self.path} holds no committed chunk; run experiments.collect_expert")
        sizes = torch.tensor([c.batch_size[0] for c in self.chunks])
        self.starts = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.keys = (*BATCH_KEYS, *(k for k in OPTIONAL_KEYS if all(k in c.keys() for c in self.chunks)))
        """Entries ``batch`` reads: ``agents.bc.BATCH_KEYS`` and the optional ones every chunk has."""

    def __len__(self) -> int:
        return int(self.starts[-1])

    def batch(self, indices: Sequence[int]) -> TensorDict:
        """TensorDict [len(indices)] of ``self.keys``, in the order of ``indices``."""
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        chunk = torch.searchsorted(self.starts, idx, right=True) - 1
        parts, order = [], []
        for c in chunk.unique().tolist():
            sel = (chunk == c).nonzero()[:, 0]
            local = idx[sel] - self.starts[c]
            parts.append(self.chunks[c].select(*self.keys)[local].to_tensordict())
            order.append(sel)
        td = torch.cat(parts)
        return td[torch.cat(order).argsort()]


def ensure_expert(cfg: TrainBCConfig) -> ExpertData:
    """The expert data set of ``cfg``, labelled first when it holds fewer than ``expert_clips``."""
    path = cfg.expert_dir
    have = 0
    if (path / "meta.json").exists():
        have = sum(c.batch_size[0] for c in expert_chunks(path))
    if have < cfg.expert_clips:
        print(f"expert data {path}: {have} clips, labelling up to {cfg.expert_clips} with the greedy oracle")
        summary = collect(
            CollectExpertConfig(
                preset=cfg.preset, out=str(path), videos=cfg.videos, num_clips=cfg.expert_clips,
                candidate_losses=cfg.soft_coef > 0, device=cfg.device, progress=cfg.progress,
            )
        )
        print(summary)
    data = ExpertData(path)
    if cfg.soft_coef > 0 and "candidate_loss" not in data.keys:
        raise ValueError(f"{path} holds no candidate_loss (labelled without --candidate-losses): label a data set "
                         "with experiments.collect_expert --candidate-losses (or let train_bc label a fresh --expert "
                         "folder), or pass --soft-coef 0")
    return data


def eval_clips(cfg: TrainBCConfig) -> torch.Tensor:
    """(n, T, 3, H, W) uint8 held-out clips: the val split of --videos or of the default data."""
    source = default_data("val", cfg.preset) if cfg.videos is None else clip_source(cfg.preset, cfg.videos, "val")
    n = min(cfg.eval_clips, len(source))
    return source.clips(range(n))


# ---- evaluation ------------------------------------------------------------------------------
def env_for(preset: str, meta: dict | None = None) -> Built:
    """The env the expert was labelled in (its loss and reconstructor), for evaluation."""
    meta = meta or {}
    return build(preset, reward="frame", reward_kwargs={"loss": meta.get("loss", "l1")},
                 reconstructor=meta.get("reconstructor", "paste"))


def _budgets(built: Built, ratio: float, device: torch.device) -> torch.Tensor:
    cfg = built.config
    return torch.full((cfg.num_frames,), budget_for_ratio(ratio, cfg.grid.num_patches), dtype=torch.int64,
                      device=device)


@torch.no_grad()
def policy_losses(
    policy: AutoGazePolicy, built: Built, video: torch.Tensor, ratios: Sequence[float], batch_size: int
) -> dict[float, float]:
    """Mean per-frame loss of the policy's greedy gazes at each fixed ratio on ``video`` (n, T, ...)."""
    was_training = policy.training
    policy.eval()
    out = {}
    for ratio in ratios:
        total = 0.0
        for lo in range(0, video.shape[0], batch_size):
            clips = video[lo : lo + batch_size].to(policy.device)
            budgets = _budgets(built, ratio, clips.device).expand(clips.shape[0], -1)
            td = rollout(policy, built.params, built.reward, clips, budgets=budgets, temperature=0.0)
            total += float(td["frame_loss"].double().sum())
        out[ratio] = total / (video.shape[0] * video.shape[1])
    policy.train(was_training)
    return out


def baseline_losses(
    names: Sequence[str], built: Built, video: torch.Tensor, ratios: Sequence[float], batch_size: int,
    device: torch.device, seed: int = 0,
) -> dict[str, dict[float, float]]:
    """Mean per-frame loss of each baseline at each ratio (as experiments.evaluate_baselines)."""
    out: dict[str, dict[float, float]] = {}
    for name in names:
        gazer = make_baseline(name)
        out[gazer.name] = {}
        for ratio in ratios:
            generator = torch.Generator(device=device).manual_seed(seed)
            total = 0.0
            for lo in range(0, video.shape[0], batch_size):
                td = run_episodes(gazer, built.params, video[lo : lo + batch_size].to(device),
                                  _budgets(built, ratio, device), generator=generator)
                total += float(td["frame_loss"].double().sum())
            out[gazer.name][ratio] = total / (video.shape[0] * video.shape[1])
    return out


# ---- training --------------------------------------------------------------------------------
def make_optimizer(policy: AutoGazePolicy, cfg: TrainBCConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices and conv kernels only."""
    decay, no_decay = [], []
    for name, p in policy.named_parameters():
        is_matrix = p.dim() >= 2 and "embed_tokens" not in name and "pos_embed" not in name
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(policy.parameters()).is_cuda  # one kernel for the whole update on CUDA
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused)


def total_steps(cfg: TrainBCConfig, num_clips: int) -> int:
    return math.ceil(cfg.epochs * num_clips / cfg.batch_size) if cfg.epochs is not None else cfg.steps


def _check_resumable(saved: dict, cfg: TrainBCConfig, policy_cfg: PolicyConfig) -> None:
    now = config_dict(cfg)
    diff = sorted(k for k in now if k not in RUN_ONLY_FIELDS and saved["train"].get(k) != now[k])
    if diff:
        shown = ", ".join(f"{k}: {saved['train'].get(k)!r} in the checkpoint vs {now[k]!r} now" for k in diff)
        raise ValueError(f"cannot resume with other training settings ({shown}); use them or another --out")
    if saved["policy"] != json.loads(json.dumps(asdict(policy_cfg))):
        raise ValueError("the checkpoint's policy config differs from this run's; use another --out")


def train(cfg: TrainBCConfig) -> dict:
    """Run (or resume) behaviour cloning; returns the results written to ``<out>/results.json``.
    Under ``torchrun`` every process runs this (see ``experiments.distributed``)."""
    return run(cfg.device, cfg.dist_timeout, lambda d: _train(cfg, d))


def _train(cfg: TrainBCConfig, d: Dist) -> dict:
    start_time = time.perf_counter()
    device = d.device
    out = cfg.out_dir
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and ckpt is None:
        d.print(f"--resume: no checkpoint in {out}, starting from scratch")
    if not cfg.resume and (latest_checkpoint(out) is not None or (out / "final").exists()):
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or pick another --out")
    d.per_rank(cfg.batch_size, cfg.grad_accum)  # fail early when the global batch does not divide

    if d.is_main:  # rank 0 labels missing expert data while the others wait
        ensure_expert(cfg)
    d.barrier()
    data = ExpertData(cfg.expert_dir)
    collect_seconds = time.perf_counter() - start_time
    built = env_for(cfg.preset, data.meta)
    clip_shape = tuple(data.chunks[0]["video"].shape[1:])  # (T, 3, H, W)
    if clip_shape != (built.config.num_frames, 3, built.config.frame_size, built.config.frame_size):
        raise ValueError(f"{data.path} holds clips of shape {clip_shape}, not of preset {cfg.preset!r}")
    steps = total_steps(cfg, len(data))
    policy_cfg = cfg.policy_config()
    seed_everything(cfg.seed, device)  # the same initial weights on every rank
    policy = AutoGazePolicy(policy_cfg).to(device)
    optimizer = make_optimizer(policy, cfg)
    scheduler = cosine_schedule(optimizer, steps, cfg.warmup_steps, cfg.min_lr_ratio)
    sampler = EpochSampler(len(data), cfg.batch_size, seed=cfg.seed)  # global batches, the same on every rank
    step = 0
    run_config = {"policy": asdict(policy_cfg), "train": config_dict(cfg), "expert": str(data.path)}
    if ckpt is not None:
        loaded = load_checkpoint(ckpt, policy, map_location=device)
        _check_resumable(loaded.config, cfg, policy_cfg)
        state = restore_train_state(loaded.train_state, optimizer, scheduler)
        sampler.load_state_dict(state["data_position"])
        step = state["step"]
        d.print(f"resumed {ckpt} at step {step}")
    K, STOP = policy_cfg.num_multi_token_pred, policy_cfg.stop_id
    loss_fn = partial(bc_loss, pred_coef=cfg.pred_coef, mask_gazed=cfg.mask_gazed, ce_coef=cfg.ce_coef,
                      soft_coef=cfg.soft_coef, soft_tau=cfg.soft_tau)
    model = d.wrap(LossModule(policy, loss_fn), find_unused=cfg.pred_coef == 0 or policy_cfg.value_head)

    video_eval = eval_clips(cfg)
    shard = d.shard(video_eval.shape[0])
    mine = video_eval[shard.start : shard.stop]  # this rank's evaluation clips
    ratios = tuple(cfg.eval_ratios)

    def pooled(local: dict[float, float]) -> dict[float, float]:  # mean over all ranks' eval clips
        return {r: d.weighted_mean(local.get(r, 0.0), mine.shape[0]) for r in ratios}

    d.print(f"policy {policy.num_parameters:,} parameters (K={K}); {len(data)} expert clips; {steps} steps of "
            f"{cfg.batch_size} ({d.describe()} x {cfg.grad_accum} micro-batch(es)); eval on "
            f"{video_eval.shape[0]} held-out clips")
    local = baseline_losses(cfg.eval_baselines, built, mine, ratios, cfg.eval_batch_size, device) if len(mine) else {}
    names = [make_baseline(n).name for n in cfg.eval_baselines]
    baselines = {name: pooled(local.get(name, {})) for name in names}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")
    stop_at = min(steps, cfg.stop_at) if cfg.stop_at is not None else steps
    history: list[dict] = []
    reliance: dict[str, float] = {}

    def checkpoint() -> None:
        if d.is_main:
            train_state = make_train_state(step, optimizer, scheduler, data_position=sampler.state_dict())
            save_checkpoint(step_dir(out, step), policy, run_config, train_state)
            prune_checkpoints(out, cfg.keep_checkpoints)

    probe = data.batch(range(max(0, len(data) - 64), len(data))).to(device) if len(data) >= 2 else None

    def evaluate() -> dict[float, float]:
        losses = pooled(policy_losses(policy, built, mine, ratios, cfg.eval_batch_size) if len(mine) else {})
        logger.log("eval", {f"bc_ratio_{r:g}": v for r, v in losses.items()}, step)
        if probe is not None:  # does the policy read the video? (the same on every rank)
            reliance.update(content_reliance(policy, probe))
            logger.log("eval", dict(reliance), step)
        oracle = baselines.get("greedy_oracle")
        if oracle is not None:
            logger.log("eval", {f"bc_over_oracle_ratio_{r:g}": v / oracle[r] for r, v in losses.items()}, step)
        history.append({"step": step, **{str(r): v for r, v in losses.items()}})
        return losses

    # a resumed run drops what the interrupted one logged after its checkpoint (it logs step + 1 first)
    log_dir = out / "tb" if d.is_main else None
    with Logger(log_dir, purge_step=step + 1 if ckpt is not None else None) as logger:
        if ckpt is None:
            for name, row in baselines.items():
                logger.log("eval", {f"{name}_ratio_{r:g}": v for r, v in row.items()}, 0)
        bar = progress(steps, initial=step, desc=f"bc {cfg.preset}", enabled=cfg.progress and d.is_main)
        policy.train()
        tick, clips_done = time.perf_counter(), 0
        while step < stop_at:
            parts = [data.batch(p).to(device) for p in d.split(sampler.next_batch(), cfg.grad_accum)]
            # normalisers of the whole global batch: each part's loss is its share of the batch's loss
            totals = {k: d.all_sum(sum(bc_totals(b, K, STOP)[k] for b in parts)) for k in ("ce", "pred")}
            optimizer.zero_grad(set_to_none=True)
            shares, diags = torch.zeros(4, dtype=torch.float64, device=device), []
            for i, batch in enumerate(parts):
                with d.accumulate(model, sync=i == len(parts) - 1):
                    with autocast:
                        td = model(batch, totals=totals)
                    # DDP averages gradients over ranks: scale so that they add up instead
                    ((td["loss_ce"] + td["loss_pred"] + td["loss_soft"]) * d.world_size).backward()
                shares += torch.stack([td[k].detach() for k in ("loss_ce", "loss_pred", "loss_soft", "ce")]).double()
                diags.append({k: td[k].detach() for k in DIAGNOSTICS if k in td.keys()})
            clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), clip)
            optimizer.step()
            scheduler.step()
            step += 1
            clips_done += cfg.batch_size
            loss_ce, loss_pred, loss_soft, ce = d.all_sum(shares).tolist()
            values = d.all_mean({k: float(torch.stack([t[k] for t in diags]).mean()) for k in diags[0].keys()})
            losses = {"total": loss_ce + loss_pred + loss_soft, "ce": ce, "pred": loss_pred}
            logger.log("losses", {**losses, **({"soft": loss_soft} if cfg.soft_coef > 0 else {})}, step)
            logger.log("charts", {
                "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm), **values,
                "epoch": sampler.epoch + sampler.cursor / sampler.n,
            }, step)
            bar.update(1)
            bar.set_postfix(ce=f"{ce:.3f}", acc=f"{values['acc']:.3f}")
            if step % 20 == 0:
                now = time.perf_counter()
                logger.log("charts", {"clips_per_s": clips_done / (now - tick)}, step)
                tick, clips_done = now, 0
            if cfg.eval_interval and step % cfg.eval_interval == 0 and step < steps:
                losses = evaluate()
                if d.is_main:
                    bar.write(f"step {step}: " + ", ".join(f"ratio {r:g} loss {v:.4f}" for r, v in losses.items()))
                tick, clips_done = time.perf_counter(), 0
            if (cfg.ckpt_interval and step % cfg.ckpt_interval == 0) or step == stop_at:
                checkpoint()
                tick, clips_done = time.perf_counter(), 0  # charts/clips_per_s: training alone
        bar.close()
        if step < steps:
            d.print(f"stopped at step {step} of {steps} (--stop-at); continue with --resume")
            return {"step": step, "steps": steps}
        final = evaluate()
        if d.is_main:
            policy.save_pretrained(out / "final")

    rows = {"bc_policy": final, **baselines}
    table = markdown_table(rows, ratios)
    results = {
        "config": run_config,
        "num_parameters": policy.num_parameters,
        "expert_clips": len(data),
        "eval_clips": int(video_eval.shape[0]),
        "world_size": d.world_size,
        "step": step,
        "mean_frame_loss": {name: {str(r): v for r, v in row.items()} for name, row in rows.items()},
        "eval_history": history,
        "content_reliance": reliance,
        "collect_seconds": collect_seconds,
        "seconds": time.perf_counter() - start_time,
        "table": table,
    }
    if not d.is_main:
        return results
    atomic_write_json(out / "results.json", results)
    loss_name = data.meta.get("loss", "l1")
    text = (f"mean per-frame {loss_name} loss on {video_eval.shape[0]} held-out clips (preset {cfg.preset}, "
            f"lower is better):\n\n{table}\n")
    atomic_write_text(out / "results.md", text)
    print(text)
    if reliance:
        print(f"content reliance (last {probe.batch_size[0]} expert clips): cross-entropy "
              f"{reliance['ce_own_video']:.3f} with their own video, {reliance['ce_other_video']:.3f} with "
              f"another clip's (gap {reliance['content_gap']:.3f}; near 0: the policy hardly reads the video)")
    print(f"final policy: {out / 'final'} ({policy.num_parameters:,} parameters); "
          f"{results['seconds']:.0f} s in all ({collect_seconds:.0f} s labelling)")
    return results


# ---- benchmark -------------------------------------------------------------------------------
def expert_like_batch(
    policy_cfg: PolicyConfig, num_frames: int, batch_size: int, ratio: float, generator: torch.Generator
) -> TensorDict:
    """Random trajectories shaped like expert data: every frame gazes ``budget_for_ratio(ratio)``
    distinct random patches; random uint8 video, losses and candidate losses (+inf on the patches
    gazed before in the frame)."""
    N, S, T = policy_cfg.num_patches, policy_cfg.input_img_size, num_frames
    G = budget_for_ratio(ratio, N)
    action = torch.rand(batch_size, T, N, generator=generator).argsort(-1)[..., :G].reshape(batch_size, T * G)
    frame_id = torch.arange(T).repeat_interleave(G).expand(batch_size, -1).clone()
    valid = torch.ones(batch_size, T * G, dtype=torch.bool)
    gazed = gazed_before(action, frame_id, valid, T, N)  # (B, T * G, N)
    candidate_loss = torch.rand(batch_size, T * G, N, generator=generator).masked_fill(gazed, float("inf"))
    return TensorDict(
        {
            "video": torch.randint(0, 256, (batch_size, T, 3, S, S), dtype=torch.uint8, generator=generator),
            "action": action,
            "frame_id": frame_id,
            "valid": valid,
            "loss_after": torch.rand(batch_size, T * G, generator=generator),
            "candidate_loss": candidate_loss,
        },
        batch_size=[batch_size],
    )


def bench(cfg: TrainBCConfig) -> dict:
    """Training throughput and generation latency on random data (see --bench)."""
    device = resolve_device(cfg.device)
    num_frames = get_preset(cfg.preset).num_frames
    generator = seed_everything(cfg.seed)
    policy = AutoGazePolicy(cfg.policy_config()).to(device)
    optimizer = make_optimizer(policy, cfg)
    batch = expert_like_batch(policy.config, num_frames, cfg.batch_size, cfg.bench_ratio, generator).to(device)
    amp = cfg.amp and device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def train_step() -> None:
        with autocast:
            td = bc_loss(policy, batch, pred_coef=cfg.pred_coef, mask_gazed=cfg.mask_gazed, ce_coef=cfg.ce_coef,
                         soft_coef=cfg.soft_coef, soft_tau=cfg.soft_tau)
        optimizer.zero_grad(set_to_none=True)
        (td["loss_ce"] + td["loss_pred"] + td["loss_soft"]).backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()

    warmup = max(3, min(cfg.bench_steps, 10))
    for _ in range(warmup):
        train_step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(cfg.bench_steps):
        t0 = time.perf_counter()
        train_step()
        sync()
        times.append(time.perf_counter() - t0)
    step_ms = 1e3 * statistics.median(times)
    peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    # generation latency: one clip, greedy, fp32 and (CUDA) a bf16 copy of the model
    clip = preprocess(batch["video"][:1])
    latency = {}
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    for dtype in dtypes:
        model = AutoGazePolicy(policy.config).to(device=device, dtype=dtype).eval()
        model.load_state_dict(policy.state_dict())
        x = clip.to(dtype)
        for _ in range(3):
            model.generate(x, gazing_ratio=cfg.bench_ratio)
        sync()
        runs = []
        for _ in range(max(5, cfg.bench_steps)):
            t0 = time.perf_counter()
            model.generate(x, gazing_ratio=cfg.bench_ratio)
            sync()
            runs.append(time.perf_counter() - t0)
        latency[str(dtype).removeprefix("torch.")] = 1e3 * statistics.median(runs)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {
        "device": name,
        "preset": cfg.preset,
        "policy": {k: getattr(policy.config, k) for k in POLICY_OVERRIDES},
        "num_parameters": policy.num_parameters,
        "batch_size": cfg.batch_size,
        "ratio": cfg.bench_ratio,
        "steps_per_clip": int(batch["valid"][0].sum()),
        "bf16_autocast": amp,
        "train_step_ms": step_ms,
        "train_clips_per_s": cfg.batch_size / (step_ms / 1e3),
        "train_peak_gb": peak_gb,
        "generate_ms": latency,
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(TrainBCConfig, argv, description=__doc__)
    if cfg.bench:
        return bench(cfg)
    return train(cfg)


if __name__ == "__main__":
    main()

