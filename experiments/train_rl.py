"""RL fine-tuning of the behaviour-cloned AutoGaze policy with GRPO (paper, stage 2) or PPO.

    python -m experiments.train_rl                    # what `make train-rl` runs: GRPO, tiny, CPU
    python -m experiments.train_rl --algo ppo         # PPO (value head added to the BC policy)
    python -m experiments.train_rl --resume           # continue the run in --out exactly
    python -m experiments.train_rl --preset paper --device cuda --init runs/bc/paper/final
    python -m experiments.train_rl --bench --preset paper --device cuda   # throughput, no checkpoint

What a run does, top to bottom:

1. Policy: ``--init`` (default ``runs/bc/<preset>/final``, the folder ``make train-bc``
   exports; ``random`` starts from a fresh policy). PPO adds a freshly initialised value head.
2. Every step draws ``--clips-per-step`` training clips and runs one ``agents.grpo.grpo_step``
   (or ``agents.ppo.ppo_step``): per clip the per-frame gaze counts of the group (``--budgets``:
   a greedy rollout stopped at ``--task-loss-requirement`` by the policy's own loss prediction,
   the paper's choice), ``--group-size`` rollouts sampled at the annealed temperature under them,
   returns discounted in gaze steps, advantages (GRPO: minus the group mean; PPO: GAE with the
   critic), the update (policy gradient + the loss head's L2 on the measured losses). AdamW,
   linear warm-up + cosine decay.
3. Every ``--eval-interval`` steps: greedy rollouts on held-out clips (the first ``--eval-clips``
   of ``prepare_data.default_data("val", preset)``) at the fixed gazing ratios ``--eval-ratios``,
   and with the policy's own task-loss stop at ``--eval-threshold``. TensorBoard
   (``<out>/tb``): ``losses/``, ``charts/``, ``eval/``.
4. Checkpoints ``<out>/step_<step>/`` every ``--ckpt-interval`` steps (atomic; weights,
   optimizer, schedule, RNG, data position), so that ``--resume`` continues exactly.
5. The export ``<out>/final/`` (``AutoGazePolicy.save_pretrained`` + ``rl.json``), and the
   comparison table of the initial (BC) policy, the RL policy, the greedy oracle and random
   gazes on the held-out clips (``<out>/results.json``, ``results.md``):

   * ``L1 @ ratio r``: mean per-frame loss with every frame's budget ``max(1, floor(r * N))``
     (greedy policy);
   * ``ratio @ loss thr`` (the paper's Table 3 analogue): per clip, the smallest uniform
     per-frame gazing ratio at which the clip's mean per-frame loss is at most ``thr``, found by
     sweeping the budgets of ``--sweep-ratios`` and interpolating linearly between the two
     budgets around the crossing; averaged over clips (clips that never get there count at the
     largest swept ratio, and the table says how many);
   * ``own stop @ thr`` (policies only): the gazing ratio the policy uses, and the loss it
     reaches, when its own loss prediction stops every frame (what ``task_loss_requirement``
     does at inference; at most the largest swept ratio per frame).
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from tensordict import TensorDict

from agents.baselines import Baseline, make_baseline, run_episodes
from agents.grpo import DataParallel, GroupBudgets, GRPOConfig, annealed_temperature, grpo_step
from agents.policy import AutoGazePolicy
from agents.ppo import PPOConfig, make_loss_module, ppo_step, with_value_head
from agents.rollout import RolloutEngine, rollout
from experiments.common import (
    atomic_write_json,
    atomic_write_text,
    clip_source,
    commit_dir,
    config_dict,
    parse_config,
    resolve_device,
    seed_everything,
)
from experiments.distributed import Dist, run
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
from gaze_env.video import SyntheticSource, VideoSource

RUN_ONLY_FIELDS = frozenset(
    {"resume", "stop_at", "progress", "eval_interval", "ckpt_interval", "keep_checkpoints", "device", "threads", "out",
     "eval_clips", "eval_batch_size", "eval_ratios", "eval_threshold", "sweep_ratios", "compare", "dist_timeout"}
)
"""Fields a resumed run may change: they do not change the training math."""

ALGO_DEFAULTS = {
    "grpo": {"group_size": 12, "clip_eps": None, "epochs": 1, "minibatches": 1},
    "ppo": {"group_size": 4, "clip_eps": 0.2, "epochs": 4, "minibatches": 4},
}
"""Values of the algorithm-dependent fields left at none."""


@dataclass(frozen=True)
class TrainRLConfig:
    """RL fine-tuning of the AutoGaze policy (stage 2): GRPO (paper) or PPO."""

    algo: Literal["grpo", "ppo"] = "grpo"
    """Algorithm: grpo (paper: group-relative advantages) or ppo (value head, GAE, ClipPPOLoss)."""
    preset: Literal["tiny", "small", "paper"] = "tiny"
    """Geometry preset of the env and the policy (frame size, scales, patch size, frames)."""
    init: str | None = None
    """Policy to fine-tune: a folder written by AutoGazePolicy.save_pretrained (default
    runs/bc/<preset>/final, what `make train-bc` exports), or 'random' for a fresh policy."""
    out: str | None = None
    """Run folder: checkpoints, TensorBoard, final/ export (default runs/rl/<preset>/<algo>)."""
    resume: bool = False
    """Continue the newest checkpoint in --out exactly; the training settings must be the ones
    it was written with."""
    videos: str | None = None
    """Training (train split) and evaluation (val split) clips: a folder or video file, or a .pt
    file; none = the embedded default data."""
    # ---- environment and reward
    reward: str = "frame"
    """Reward: frame (paper: -loss at the end of each scored frame), dense, or module:function."""
    loss: str = "l1"
    """Per-frame loss of the reward and the evaluation: l1, mse, psnr, ssim or module:function."""
    reconstructor: str = "paste"
    """Reconstructor: paste (grey start) or paste-black."""
    reward_frame_rate: float = 1.0
    """Fraction of frames the frame reward scores per rollout (the same frames for a whole group).
    Paper 0.125, to save learned reconstructions; the paste canvas scores every frame for free
    and at 1.0 the returns are far less noisy, which is what works at tiny scale."""
    # ---- optimisation
    steps: int = 48
    """RL iterations (each: --clips-per-step clips x --group-size rollouts and one update)."""
    clips_per_step: int = 4
    """Clips per iteration: the global batch, over all processes under torchrun (each rolls out
    clips-per-step / processes whole groups)."""
    lr: float = 2e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay (matrices only)."""
    warmup_steps: int = 4
    """Linear warm-up steps."""
    min_lr_ratio: float = 0.1
    """The cosine decays to this fraction of --lr."""
    max_grad_norm: float = 1.0
    """Clip the gradient's global L2 norm to this (0: no clipping)."""
    temperature_start: float = 1.0
    """Sampling temperature of the rollouts at the first step."""
    temperature_end: float = 0.5
    """Sampling temperature at the last step (geometric annealing in between)."""
    micro_batch: int | None = None
    """Rollouts per forward / backward pass of the update (gradients accumulated; none: all):
    saves memory without changing the update."""
    amp: bool = False
    """bf16 on CUDA (never on CPU): autocast of the update's forward pass, and GRPO rollouts
    generated by a bf16 copy of the policy (their log-probs then carry its rounding)."""
    # ---- group budgets
    budgets: Literal["threshold", "sampled", "fixed"] = "threshold"
    """Per-frame gaze counts of a group: threshold (paper: from a greedy rollout stopped by the
    policy's loss prediction), sampled (ratio ~ exponential on [ratio-min, ratio-max], Dirichlet
    split), fixed (--gazing-ratio for every frame)."""
    task_loss_requirement: float = 0.05
    """Stop threshold of the threshold budgets (in units of --loss)."""
    max_ratio: float = 0.3
    """Per-frame gaze cap of the threshold rollout (fraction of the N patches)."""
    ratio_min: float = 0.02
    """Sampled budgets: smallest per-clip gazing ratio."""
    ratio_max: float = 0.2
    """Sampled budgets: largest per-clip gazing ratio."""
    ratio_scale: float = 0.05
    """Sampled budgets: mean of the exponential the ratio is drawn from."""
    gazing_ratio: float = 0.1
    """Fixed budgets (and --bench): per-frame gazing ratio."""
    # ---- the algorithms (none: the algorithm's default, see ALGO_DEFAULTS)
    group_size: int | None = None
    """Rollouts per clip (grpo 12 as the paper; ppo 4)."""
    gamma: float = 0.995
    """Discount per gaze step (paper 0.995)."""
    clip_eps: float | None = None
    """Ratio clipping (grpo: none, on-policy as the paper; ppo 0.2)."""
    epochs: int | None = None
    """Passes over each batch of rollouts (grpo 1; ppo 4)."""
    minibatches: int | None = None
    """Optimizer steps per pass, over whole groups (grpo 1; ppo 4)."""
    std_normalize: bool = False
    """GRPO: divide advantages by the group std (paper: no)."""
    aggregation: Literal["sum", "token", "sequence"] = "sum"
    """GRPO: reduction of the per-gaze losses (paper: sum)."""
    kl_coef: float = 0.0
    """GRPO: weight of a KL term towards the initial policy (paper: 0)."""
    loss_pred_coef: float = 1.0
    """Weight of the loss head's L2 on the measured losses, next to the policy loss."""
    gae_lambda: float = 0.95
    """PPO: GAE lambda."""
    critic_coef: float = 0.5
    """PPO: weight of the value loss."""
    entropy_coef: float = 0.0
    """PPO: weight of the entropy bonus."""
    # ---- evaluation, checkpoints, logging
    eval_interval: int = 16
    """Evaluate every this many steps (0: only at the end)."""
    eval_clips: int = 32
    """Held-out clips scored (the first ones of the val split)."""
    eval_ratios: tuple[float, ...] = (0.05, 0.1, 0.2)
    """Fixed gazing ratios of the evaluation."""
    eval_threshold: float | None = None
    """Loss threshold of the ratio-to-threshold metrics (none: --task-loss-requirement)."""
    sweep_ratios: tuple[float, ...] = (0.02, 0.035, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.3)
    """Uniform gazing ratios swept for 'ratio @ loss thr' in the final table."""
    eval_batch_size: int = 32
    """Clips rolled out together in the evaluation."""
    compare: bool = True
    """Final table: also the initial policy, the greedy oracle and random gazes."""
    ckpt_interval: int = 16
    """Write a checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Newest step checkpoints kept."""
    stop_at: int | None = None
    """Stop after this step with a checkpoint, without finishing (continue with --resume)."""
    device: str = "cpu"
    """Torch device: cpu, cuda, cuda:<i> or auto."""
    threads: int = 1
    """CPU threads of torch: these models are small and decoding is a loop of small ops, where more
    threads mostly wait on each other (2 threads measured 7x slower than 1 on a busy 2-core box)."""
    seed: int = 0
    """Seeds the data order, the rollouts and (PPO) the value head (under torchrun, process r
    rolls out from seed + 1000003 r, unless --clip-seeds)."""
    clip_seeds: bool = False
    """GRPO: roll out each clip's group from its own generator, seeded by (seed, step, the clip's
    place in the step's batch), so that the run does not depend on how the clips are spread over
    processes: any number of processes gives the single-process result. Costs one rollout call
    per clip instead of one per step."""
    dist_timeout: float = 60.0
    """Under torchrun: minutes a process waits in a collective (the others wait while rank 0
    evaluates)."""
    progress: bool = True
    """Show a tqdm progress bar."""
    # ---- benchmark
    bench: bool = False
    """Only measure: RL iterations of a randomly initialised policy on synthetic clips at
    --gazing-ratio (fixed budgets), episodes per second and where the time goes; no data, no
    checkpoint."""
    bench_steps: int = 5
    """Timed iterations (after 2 warm-up iterations)."""
    profile: bool = False
    """With --bench: run one more iteration under torch.profiler and print its 25 costliest ops
    (self device time on CUDA, self CPU time on CPU)."""

    def __post_init__(self) -> None:
        get_preset(self.preset)
        if min(self.steps, self.clips_per_step) < 1 or self.lr <= 0:
            raise ValueError("steps and clips_per_step must be >= 1 and lr > 0")
        if min(self.eval_interval, self.ckpt_interval) < 0 or self.keep_checkpoints < 1 or self.eval_clips < 1:
            raise ValueError("eval_interval, ckpt_interval must be >= 0; keep_checkpoints, eval_clips >= 1")
        if not self.eval_ratios or not all(0 < r <= 1 for r in (*self.eval_ratios, *self.sweep_ratios)):
            raise ValueError("eval_ratios and sweep_ratios must be in (0, 1]")
        if self.stop_at is not None and self.stop_at < 1:
            raise ValueError(f"stop_at must be >= 1, got {self.stop_at}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {self.micro_batch}")
        if self.clip_seeds and self.algo != "grpo":
            raise ValueError("--clip-seeds is for --algo grpo")
        if self.dist_timeout <= 0:
            raise ValueError(f"dist_timeout must be > 0 minutes, got {self.dist_timeout}")

    def get(self, name: str):
        """A field, with the algorithm's default when it is none (see ALGO_DEFAULTS)."""
        value = getattr(self, name)
        return ALGO_DEFAULTS[self.algo][name] if value is None else value

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path("runs/rl") / self.preset / self.algo

    @property
    def init_dir(self) -> Path | None:
        if self.init == "random":
            return None
        return Path(self.init) if self.init is not None else Path("runs/bc") / self.preset / "final"

    @property
    def threshold(self) -> float:
        return self.task_loss_requirement if self.eval_threshold is None else self.eval_threshold

    def group_budgets(self) -> GroupBudgets:
        return GroupBudgets(
            mode="fixed" if self.bench else self.budgets,
            task_loss_requirement=self.task_loss_requirement,
            max_ratio=self.max_ratio,
            ratio_range=(self.ratio_min, self.ratio_max),
            ratio_scale=self.ratio_scale,
        )

    def algo_config(self) -> GRPOConfig | PPOConfig:
        common = dict(
            group_size=self.get("group_size"),
            gamma=self.gamma,
            epochs=self.get("epochs"),
            minibatches=self.get("minibatches"),
            loss_pred_coef=self.loss_pred_coef,
            max_grad_norm=self.max_grad_norm or None,
            micro_batch=self.micro_batch,
            amp=self.amp,
            budgets=self.group_budgets(),
        )
        if self.algo == "ppo":
            return PPOConfig(
                clip_coef=self.get("clip_eps"), gae_lambda=self.gae_lambda, critic_coef=self.critic_coef,
                entropy_coef=self.entropy_coef, **common,
            )
        return GRPOConfig(
            clip_eps=self.get("clip_eps"), std_normalize=self.std_normalize, aggregation=self.aggregation,
            kl_coef=self.kl_coef, **common,
        )


# ---- setup -----------------------------------------------------------------------------------
def env_for(cfg: TrainRLConfig, *, training: bool = True) -> Built:
    """The training env (reward frames as configured), or the evaluation env (every frame scored:
    the evaluation reads the per-frame losses only)."""
    return build(
        cfg.preset,
        reward=cfg.reward,
        reward_kwargs={"loss": cfg.loss} if cfg.reward in ("frame", "dense") else None,
        reconstructor=cfg.reconstructor,
        reward_frame_rate=cfg.reward_frame_rate if training else 1.0,
        gazing_ratio=cfg.gazing_ratio,
    )


def load_init(cfg: TrainRLConfig, device: torch.device) -> AutoGazePolicy:
    """The policy to fine-tune (``--init``), with a value head for PPO; raises FileNotFoundError
    naming ``make train-bc`` when there is no BC export."""
    folder = cfg.init_dir
    if folder is None:
        policy = AutoGazePolicy.from_preset(cfg.preset)
    else:
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"no behaviour-cloned policy at {folder}: run `make train-bc` (PRESET={cfg.preset}) first, "
                "or pass --init <folder written by AutoGazePolicy.save_pretrained> (or --init random)"
            )
        policy = AutoGazePolicy.from_pretrained(folder)
    env = get_preset(cfg.preset)
    if policy.config.scales != env.grid.scales or policy.config.patch_size != env.grid.patch_size:
        raise ValueError(
            f"the policy at {folder} gazes scales {policy.config.scales} / patch {policy.config.patch_size}, "
            f"preset {cfg.preset!r} has {env.grid.scales} / {env.grid.patch_size}"
        )
    if cfg.algo == "ppo":
        policy = with_value_head(policy)
    return policy.to(device)


def make_optimizer(policy: AutoGazePolicy, cfg: TrainRLConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices and conv kernels only."""
    decay, no_decay = [], []
    for name, p in policy.named_parameters():
        is_matrix = p.dim() >= 2 and "embed_tokens" not in name and "pos_embed" not in name
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def sources(cfg: TrainRLConfig) -> tuple[VideoSource, VideoSource]:
    """(train, val) clips: the embedded default data or the splits of --videos."""
    if cfg.videos is None:
        return default_data("train", cfg.preset), default_data("val", cfg.preset)
    return clip_source(cfg.preset, cfg.videos, "train"), clip_source(cfg.preset, cfg.videos, "val")


# ---- evaluation ------------------------------------------------------------------------------
Gazer = AutoGazePolicy | Baseline


@torch.no_grad()
def frame_losses(
    gazer: Gazer, built: Built, video: torch.Tensor, budget: int, batch_size: int, seed: int = 0
) -> torch.Tensor:
    """(n,) per-clip mean per-frame loss of ``gazer`` (greedy policy, or a baseline) on ``video``
    (n, T, 3, H, W) with ``budget`` gazes in every frame."""
    device = gazer.device if isinstance(gazer, AutoGazePolicy) else video.device
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    for lo in range(0, video.shape[0], batch_size):
        clips = video[lo : lo + batch_size].to(device)
        budgets = torch.full((clips.shape[0], built.config.num_frames), budget, dtype=torch.int64, device=device)
        if isinstance(gazer, AutoGazePolicy):
            td = rollout(gazer, built.params, built.reward, clips, budgets=budgets, temperature=0.0)
        else:
            td = run_episodes(gazer, built.params, clips, budgets, generator=generator)
        out.append(td["frame_loss"].double().mean(1).cpu())
    return torch.cat(out)


def ratio_to_threshold(per_clip: torch.Tensor, ratios: Sequence[float], threshold: float) -> tuple[torch.Tensor, int]:
    """Per-clip gazing ratio needed to reach ``threshold``: ``per_clip`` (n, m) mean per-frame
    losses at the ``m`` ascending ``ratios`` -> ((n,) ratio, clips that never reach it).

    The first swept ratio whose loss is at most ``threshold``, interpolated linearly (in loss)
    with the ratio before it; the first ratio when already there; the last when never."""
    r = torch.tensor(ratios, dtype=torch.float64)
    below = per_clip <= threshold  # (n, m)
    reached = below.any(1)
    j = torch.where(reached, below.double().argmax(1), len(ratios) - 1)  # first index at or below
    i = (j - 1).clamp(min=0)
    li, lj = per_clip.gather(1, i[:, None])[:, 0], per_clip.gather(1, j[:, None])[:, 0]
    frac = ((li - threshold) / (li - lj).clamp(min=1e-12)).clamp(0, 1)
    out = torch.where((j > 0) & reached, r[i] + frac * (r[j] - r[i]), r[j])
    return out, int((~reached).sum())


@torch.no_grad()
def task_loss_stop(
    policy: AutoGazePolicy, built: Built, video: torch.Tensor, threshold: float, cap: int, batch_size: int
) -> tuple[float, float]:
    """The policy's own stop: greedy rollouts stopping each frame once the predicted loss is at
    most ``threshold`` (at most ``cap`` gazes). Returns (gazing ratio used, mean per-frame loss)."""
    N, T = built.config.grid.num_patches, built.config.num_frames
    gazes = loss = 0.0
    for lo in range(0, video.shape[0], batch_size):
        clips = video[lo : lo + batch_size].to(policy.device)
        td = rollout(policy, built.params, built.reward, clips, budgets=torch.tensor(cap),
                     task_loss_requirement=threshold, temperature=0.0)
        gazes += float((td["valid"] & (td["action"] != N)).sum())
        loss += float(td["frame_loss"].double().sum())
    n = video.shape[0] * T
    return gazes / (n * N), loss / n


def evaluate(
    gazer: Gazer, built: Built, video: torch.Tensor, cfg: TrainRLConfig, *, sweep: bool
) -> dict[str, float]:
    """The metrics of the module docstring for one gazer: ``loss@<r>`` for --eval-ratios, with
    ``sweep`` also ``ratio@thr`` (and ``unreached``), and for policies ``stop_ratio`` /
    ``stop_loss``."""
    N = built.config.grid.num_patches
    ratios = sorted(set(cfg.eval_ratios) | (set(cfg.sweep_ratios) if sweep else set()))
    per_clip = {r: frame_losses(gazer, built, video, budget_for_ratio(r, N), cfg.eval_batch_size, cfg.seed)
                for r in ratios}
    out = {f"loss@{r:g}": float(per_clip[r].mean()) for r in cfg.eval_ratios}
    if sweep:
        swept = sorted(cfg.sweep_ratios)
        ratio, unreached = ratio_to_threshold(torch.stack([per_clip[r] for r in swept], 1), swept, cfg.threshold)
        out["ratio@thr"] = float(ratio.mean())
        out["unreached"] = float(unreached)
    if isinstance(gazer, AutoGazePolicy):
        cap = budget_for_ratio(max(*cfg.sweep_ratios, *cfg.eval_ratios), N)
        out["stop_ratio"], out["stop_loss"] = task_loss_stop(gazer, built, video, cfg.threshold, cap,
                                                             cfg.eval_batch_size)
    return out


def format_table(rows: dict[str, dict[str, float]], cfg: TrainRLConfig, clips: int) -> str:
    """Markdown: one row per gazer, the metrics of ``evaluate`` as columns."""
    ratios = list(cfg.eval_ratios)
    head = [f"{cfg.loss} @ ratio {r:g}" for r in ratios] + [f"ratio @ {cfg.loss} {cfg.threshold:g}",
                                                           f"own stop @ {cfg.threshold:g}: ratio / {cfg.loss}"]
    lines = ["| gazer | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for name, m in rows.items():
        cells = [f"{m[f'loss@{r:g}']:.4f}" for r in ratios]
        if "ratio@thr" in m:
            extra = f" ({int(m['unreached'])} of {clips} clips never)" if m["unreached"] else ""
            cells.append(f"{m['ratio@thr']:.4f}{extra}")
        else:
            cells.append("")
        cells.append(f"{m['stop_ratio']:.4f} / {m['stop_loss']:.4f}" if "stop_ratio" in m else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- training --------------------------------------------------------------------------------
def _check_resumable(saved: dict, cfg: TrainRLConfig) -> None:
    now = config_dict(cfg)
    diff = sorted(k for k in now if k not in RUN_ONLY_FIELDS and saved["train"].get(k) != now[k])
    if diff:
        shown = ", ".join(f"{k}: {saved['train'].get(k)!r} in the checkpoint vs {now[k]!r} now" for k in diff)
        raise ValueError(f"cannot resume with other training settings ({shown}); use them or another --out")


def _export(policy: AutoGazePolicy, folder: Path, info: dict) -> Path:
    """Write ``folder`` (save_pretrained + rl.json) complete under a temporary name, then rename."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        policy.save_pretrained(tmp)
        atomic_write_json(tmp / "rl.json", info)
        if folder.exists():
            shutil.rmtree(folder)
        return commit_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def train(cfg: TrainRLConfig) -> dict:
    """Run (or resume) RL fine-tuning; returns the results written to ``<out>/results.json``.
    Under ``torchrun`` every process runs this (``experiments.distributed``): each rolls out its
    share of the step's clips (whole groups), gradients are summed over the processes, rank 0
    alone evaluates and writes."""
    return run(cfg.device, cfg.dist_timeout, lambda d: _train(cfg, d))


def _clip_generators(cfg: TrainRLConfig, d: Dist, step: int, device: torch.device) -> list[torch.Generator]:
    """--clip-seeds: one generator per clip of this rank's share of the step's batch, seeded by
    (seed, step, the clip's place in the global batch)."""
    n = d.per_rank(cfg.clips_per_step, what="clips per step")
    places = range(d.rank * n, (d.rank + 1) * n)
    return [torch.Generator(device).manual_seed((cfg.seed * 1_000_003 + step) * 10_007 + j) for j in places]


def _train(cfg: TrainRLConfig, d: Dist) -> dict:
    start_time = time.perf_counter()
    device = d.device
    out = cfg.out_dir
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and ckpt is None:
        d.print(f"--resume: no checkpoint in {out}, starting from the initial policy")
    if not cfg.resume and (latest_checkpoint(out) is not None or (out / "final").exists()):
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or pick another --out")
    d.per_rank(cfg.clips_per_step, what="clips per step")  # fail early when it does not divide

    seed_everything(cfg.seed, device)  # the same initial policy (and PPO value head) on every rank
    policy = load_init(cfg, device)
    generator = torch.Generator(device).manual_seed(d.rank_seed(cfg.seed))  # this rank's rollouts
    algo_cfg = cfg.algo_config()
    built, built_eval = env_for(cfg), env_for(cfg, training=False)
    if cfg.algo == "grpo" and getattr(built.params.reconstructor, "end_frame", None) is not None:
        algo_cfg = replace(algo_cfg, loss_pred_steps="frame_end")
    optimizer = make_optimizer(policy, cfg)
    scheduler = cosine_schedule(optimizer, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
    train_src, val_src = sources(cfg)
    sampler = EpochSampler(len(train_src), cfg.clips_per_step, seed=cfg.seed)
    rl_step = make_rl_step(cfg, algo_cfg, policy, optimizer, built, generator, parallel=d if d.enabled else None)
    step = 0
    run_config = {"policy": asdict(policy.config), "train": config_dict(cfg), "init": str(cfg.init_dir)}
    if ckpt is not None:
        loaded = load_checkpoint(ckpt, policy, map_location=device)
        _check_resumable(loaded.config, cfg)
        state = restore_train_state(loaded.train_state, optimizer, scheduler, {"rollouts": generator})
        sampler.load_state_dict(state["data_position"])
        step = state["step"]
        if d.rank > 0:  # the checkpoint holds rank 0's generator: the others draw afresh
            generator.manual_seed(d.rank_seed(cfg.seed) * 1_000_033 + step)
        d.print(f"resumed {ckpt} at step {step}")

    video_eval = val_src.clips(range(min(cfg.eval_clips, len(val_src))))
    d.print(f"{cfg.algo} from {cfg.init_dir or 'a random policy'}: {policy.num_parameters:,} parameters; "
          f"{cfg.steps} steps of {cfg.clips_per_step} clips x {algo_cfg.group_size} rollouts; "
          f"eval on {video_eval.shape[0]} held-out clips; {d.describe()}")
    stop_at = min(cfg.steps, cfg.stop_at) if cfg.stop_at is not None else cfg.steps
    history: list[dict] = []

    def checkpoint() -> None:
        if d.is_main:
            train_state = make_train_state(step, optimizer, scheduler, {"rollouts": generator}, sampler.state_dict())
            save_checkpoint(step_dir(out, step), policy, run_config, train_state)
            prune_checkpoints(out, cfg.keep_checkpoints)

    def quick_eval() -> dict[str, float]:  # rank 0 (the others wait at their next update)
        metrics = evaluate(policy, built_eval, video_eval, cfg, sweep=False)
        logger.log("eval", metrics, step)
        history.append({"step": step, **metrics})
        return metrics

    with Logger(out / "tb" if d.is_main else None, purge_step=step if ckpt is not None else None) as logger:
        if ckpt is None and d.is_main:
            logger.text("config", f"```\n{json.dumps(run_config, indent=2)}\n```")
            if cfg.eval_interval:
                quick_eval()
        bar = progress(cfg.steps, initial=step, desc=f"{cfg.algo} {cfg.preset}", enabled=cfg.progress and d.is_main)
        while step < stop_at:
            temperature = annealed_temperature(step / max(1, cfg.steps - 1), cfg.temperature_start, cfg.temperature_end)
            (mine,) = d.split(sampler.next_batch())  # this rank's clips: whole groups
            video = train_src.clips(mine).to(device)
            gens = _clip_generators(cfg, d, step, device) if cfg.clip_seeds else None
            td = rl_step(video, temperature, gens)
            scheduler.step()
            step += 1
            values = d.all_mean({k: float(v) for k, v in td.items()})  # loss_* are global already
            values["episodes"] = values["episodes"] * d.world_size
            logger.log("losses", {k.removeprefix("loss_"): v for k, v in values.items() if k.startswith("loss_")}, step)
            logger.log("charts", {"lr": optimizer.param_groups[0]["lr"],
                                  **{k: v for k, v in values.items() if not k.startswith("loss_")}}, step)
            bar.update(1)
            bar.set_postfix(frame_loss=f"{values['frame_loss']:.4f}", T=f"{temperature:.2f}")
            if cfg.eval_interval and step % cfg.eval_interval == 0 and step < cfg.steps and d.is_main:
                metrics = quick_eval()
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if (cfg.ckpt_interval and step % cfg.ckpt_interval == 0) or step == stop_at:
                checkpoint()
        bar.close()
        if step < cfg.steps:
            d.print(f"stopped at step {step} of {cfg.steps} (--stop-at); continue with --resume")
            return {"step": step, "steps": cfg.steps}
        if not d.is_main:  # rank 0 evaluates and writes the results
            return {"step": step, "steps": cfg.steps}
        train_seconds = time.perf_counter() - start_time
        rows = {f"rl ({cfg.algo})": evaluate(policy, built_eval, video_eval, cfg, sweep=True)}
        logger.log("eval", rows[f"rl ({cfg.algo})"], step)
        if cfg.compare:
            if cfg.init_dir is not None:
                rows["init (bc)"] = evaluate(AutoGazePolicy.from_pretrained(cfg.init_dir, device), built_eval,
                                             video_eval, cfg, sweep=True)
            for name in ("greedy_oracle", "random"):
                rows[name] = evaluate(make_baseline(name), built_eval, video_eval, cfg, sweep=True)
        results = {
            "config": run_config,
            "eval_clips": int(video_eval.shape[0]),
            "threshold": cfg.threshold,
            "step": step,
            "metrics": rows,
            "eval_history": history,
            "train_seconds": train_seconds,
        }
        _export(policy, out / "final", results)

    order = [k for k in ("init (bc)", f"rl ({cfg.algo})", "greedy_oracle", "random") if k in rows]
    table = format_table({k: rows[k] for k in order}, cfg, int(video_eval.shape[0]))
    results["seconds"] = time.perf_counter() - start_time
    results["table"] = table
    atomic_write_json(out / "results.json", results)
    text = (f"{cfg.algo} fine-tuning, preset {cfg.preset}, seed {cfg.seed}: mean per-frame {cfg.loss} on "
            f"{video_eval.shape[0]} held-out clips (lower is better; greedy policies)\n\n{table}\n")
    atomic_write_text(out / "results.md", text)
    print(text)
    print(f"final policy: {out / 'final'}; {results['seconds']:.0f} s in all ({train_seconds:.0f} s training)")
    return results


def make_rl_step(
    cfg: TrainRLConfig,
    algo_cfg: GRPOConfig | PPOConfig,
    policy: AutoGazePolicy,
    optimizer: torch.optim.Optimizer,
    built: Built,
    generator: torch.Generator,
    parallel: DataParallel | None = None,
) -> Callable[..., TensorDict]:
    """One iteration of the configured algorithm: ``step(video, temperature, generators=None) ->
    TensorDict`` of losses, diagnostics and timings (``generators``: GRPO, one per clip instead of
    ``generator``; ``parallel``: this process's share of a multi-process batch). GRPO with
    ``--kl-coef`` keeps a frozen copy of the initial policy as the KL reference; its rollouts run
    on a ``RolloutEngine`` (on CUDA the static generator's CUDA graphs, captured on first use;
    with --amp a bf16 copy of the policy)."""
    if cfg.algo == "ppo":
        loss_module = make_loss_module(algo_cfg).to(policy.device)
        return lambda video, temperature, generators=None: ppo_step(
            policy, optimizer, built.params, built.reward, video, algo_cfg, temperature=temperature,
            generator=generator, loss_module=loss_module, parallel=parallel,
        )
    ref_policy = None
    if cfg.kl_coef:
        ref_policy = deepcopy(policy).eval().requires_grad_(False)
    # --amp: the rollouts too run in bf16 (a bf16 copy of the policy, refreshed every call)
    engine = RolloutEngine(dtype=torch.bfloat16 if cfg.amp and policy.device.type == "cuda" else None)
    return lambda video, temperature, generators=None: grpo_step(
        policy, optimizer, built.params, built.reward, video, algo_cfg, temperature=temperature,
        generator=generator if generators is None else generators, ref_policy=ref_policy, engine=engine,
        parallel=parallel,
    )


# ---- benchmark -------------------------------------------------------------------------------
def bench(cfg: TrainRLConfig) -> dict:
    """Episodes per second of RL iterations and where the time goes (see --bench)."""
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    generator = seed_everything(cfg.seed, device)
    policy = AutoGazePolicy.from_preset(cfg.preset).to(device)
    if cfg.algo == "ppo":
        policy = with_value_head(policy)
    algo_cfg = cfg.algo_config()
    built = env_for(cfg)
    optimizer = make_optimizer(policy, cfg)
    p = get_preset(cfg.preset)
    video = SyntheticSource(p.num_frames, p.frame_size, num_clips=cfg.clips_per_step, seed=cfg.seed)
    video = video.clips(range(cfg.clips_per_step)).to(device)
    rl_step = make_rl_step(cfg, algo_cfg, policy, optimizer, built, generator)
    for _ in range(2):
        rl_step(video, cfg.temperature_start)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    walls, parts = [], {}
    for _ in range(cfg.bench_steps):
        t0 = time.perf_counter()
        td = rl_step(video, cfg.temperature_start)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        walls.append(time.perf_counter() - t0)
        for k, v in td.items():
            if k.startswith("time_"):
                parts.setdefault(k.removeprefix("time_"), []).append(float(v))
    wall = statistics.median(walls)
    episodes = cfg.clips_per_step * algo_cfg.group_size
    seconds = {k: statistics.median(v) for k, v in parts.items()}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "algo": cfg.algo,
        "preset": cfg.preset,
        "reward": cfg.reward,
        "num_parameters": policy.num_parameters,
        "K": policy.config.num_multi_token_pred,
        "gazing_ratio": cfg.gazing_ratio,
        "gazes_per_episode": sum(built.config.budgets),
        "clips_per_step": cfg.clips_per_step,
        "group_size": algo_cfg.group_size,
        "episodes_per_step": episodes,
        "step_seconds": wall,
        "episodes_per_s": episodes / wall,
        "seconds": seconds,
        "share": {k: v / wall for k, v in seconds.items()},
        "other_seconds": wall - sum(seconds.values()),  # advantages, diagnostics, host work in between
        "ms_per_episode": {k: 1000 * v / episodes for k, v in seconds.items()},
        "amp": cfg.amp and device.type == "cuda",
        "micro_batch": cfg.micro_batch,
        "peak_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    if cfg.profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            rl_step(video, cfg.temperature_start)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25))
    return result


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(TrainRLConfig, argv, description=__doc__)
    torch.set_num_threads(cfg.threads)
    if cfg.bench:
        return bench(cfg)
    return train(cfg)


if __name__ == "__main__":
    main()
