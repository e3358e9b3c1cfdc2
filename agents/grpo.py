"""GRPO for gazing (the paper's stage 2): group-relative advantages over discounted gaze returns.

The math is pure functions over padded trajectories (B, L) with a ``valid`` mask whose True
entries come first in every row (padding at the end):

- ``discounted_returns``: return of every step, discounted in gaze steps. With the paper's frame
  reward (``-loss_tau`` at the last gaze of each scored frame ``tau``) this is exactly
  ``sum_{tau >= t} gamma^(steps from this gaze to the last gaze of frame tau) * (-loss_tau)``.
- ``group_relative_advantage``: return minus the mean over the group's rollouts at the same step
  (rollouts of a group share their per-frame gaze counts, so step ``l`` means the same gaze slot
  in each); optionally divided by the group's std.
- ``policy_gradient_loss``: ``-sum(ratio * advantage)`` on-policy (ratio = 1 with gradient), with
  optional PPO clipping, a KL term towards a reference (BC) policy, and token / sequence / sum
  aggregation.
- ``loss_prediction_loss``: L2 of the policy's predicted frame loss against the actual one.

TorchRL's ``MCAdvantage`` normalises trajectory returns by the group std and broadcasts one value
per trajectory; the paper's advantage is per gaze and unnormalised, so it is written here.

On top of the math, one GRPO iteration (``grpo_step``) is:

1. ``group_budgets``: per clip, the per-frame gaze counts every rollout of its group will use
   (paper: the counts of one greedy rollout stopped by the policy's own task-loss prediction);
2. ``collect``: ``G`` sampled rollouts per clip under those counts (``agents.rollout``), scored
   by the environment, the same reward frames for the whole group;
3. ``grpo_advantage``: discounted returns and group-relative advantages;
4. ``grpo_update``: ``epochs`` passes of ``minibatches`` whole groups, each one teacher-forced
   ``policy.score`` and one optimizer step on ``grpo_loss`` (policy gradient + loss head).

``agents.ppo`` reuses 1, 2 and 4's plumbing with a critic and GAE instead of the group baseline.

Data-parallel training (``experiments.distributed``): each process rolls out its own clips (whole
groups) and ``minibatch_update`` joins the processes through a ``DataParallel`` (one all-reduce of
the gradients per optimizer step). With ``totals`` (``grpo_totals`` summed over the processes)
every process's loss is its share of the global batch's loss, so the update is the
single-process one; per-clip generators (``grpo_step(generator=[...])``) make the rollouts
independent of how the clips are spread over processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from tensordict import TensorDict

from agents.policy import AutoGazePolicy, preprocess
from agents.rollout import RolloutEngine, device_clock, rollout
from gaze_env.config import budget_for_ratio
from gaze_env.core import CoreParams
from rewards.base import RewardFn
from rewards.mae import sample_gaze_counts

Aggregate = Literal["sum", "token", "sequence"]
BudgetMode = Literal["threshold", "sampled", "fixed"]
LossPredSteps = Literal["all", "frame_end"]


def discounted_returns(reward: torch.Tensor, valid: torch.Tensor, gamma: float, chunk: int = 32) -> torch.Tensor:
    """(B, L) rewards, (B, L) bool valid -> (B, L) returns ``R_l = r_l + gamma * R_{l+1}``, 0 on
    padding (an invalid step ends the run of steps before it).

    Computed in float64 blocks of ``chunk`` steps (a (chunk, chunk) matrix of discounts inside a
    block, a loop over the blocks for what comes after), so that a trajectory of hundreds of gaze
    steps costs a dozen small operations rather than a few per step."""
    B, L = reward.shape
    C = max(1, min(chunk, L))
    n = -(-L // C)
    r = torch.where(valid, reward, torch.zeros_like(reward)).double()
    r = F.pad(r, (0, n * C - L)).view(B, n, C)
    v = F.pad(valid, (0, n * C - L)).view(B, n, C)
    steps = torch.arange(C, device=reward.device)
    gaps = (~v).long().cumsum(-1)  # (B, n, C) invalid steps so far in the block
    # run[b, c, l, m]: steps l..m of the block are all valid (m >= l)
    run = v[..., :, None] & (gaps[..., :, None] == gaps[..., None, :]) & (steps[None, :] >= steps[:, None])
    gap = (steps[None, :] - steps[:, None]).clamp(min=0)  # (C, C) steps from l to m
    discount = torch.tensor(gamma, dtype=torch.float64, device=reward.device) ** gap  # (C, C) gamma^(m - l)
    inside = (torch.where(run, discount, 0.0) * r[..., None, :]).sum(-1)  # (B, n, C) return within the block
    # steps whose run reaches the block's end also get the discounted return of the next block's first step
    carry = torch.where(v & (gaps == gaps[..., -1:]), discount[:, -1] * gamma, 0.0)  # (B, n, C)
    out = torch.empty_like(inside)
    after = torch.zeros(B, dtype=torch.float64, device=reward.device)
    for c in range(n - 1, -1, -1):
        out[:, c] = inside[:, c] + carry[:, c] * after[:, None]
        after = out[:, c, 0]
    out = out.view(B, n * C)[:, :L].to(reward.dtype)
    return torch.where(valid, out, torch.zeros_like(out))


def group_relative_advantage(
    returns: torch.Tensor, valid: torch.Tensor, group_size: int, *, std_normalize: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """(B, L) returns of ``B = n_groups * G`` rollouts, consecutive rows forming a group ->
    (B, L) advantages ``R - mean_group(R)`` at each step (over the group's valid entries),
    divided by the group's std at that step when ``std_normalize``; 0 on padding."""
    B, L = returns.shape
    if B % group_size:
        raise ValueError(f"batch {B} is not a whole number of groups of {group_size}")
    r = returns.reshape(-1, group_size, L)
    v = valid.reshape(-1, group_size, L).float()
    count = v.sum(1, keepdim=True).clamp_min(1.0)
    mean = (r * v).sum(1, keepdim=True) / count
    adv = r - mean
    if std_normalize:
        var = ((adv * v) ** 2).sum(1, keepdim=True) / count
        adv = adv / (var.sqrt() + eps)
    return (adv * v).reshape(B, L)


def aggregate(
    per_step: torch.Tensor, valid: torch.Tensor, mode: Aggregate = "sum", total: torch.Tensor | None = None
) -> torch.Tensor:
    """Reduce (B, L) per-step terms over valid steps: ``sum`` (paper: no normaliser), ``token``
    (mean over all valid steps of the batch) or ``sequence`` (mean per rollout, then over rollouts).

    ``total``: the normaliser of a larger batch this one is part of (``aggregate_count`` summed
    over the parts): the result is then this part's share of that batch's value."""
    x = torch.where(valid, per_step, torch.zeros_like(per_step))
    if mode == "sum":
        return x.sum()
    if mode == "token":
        return x.sum() / (valid.sum() if total is None else total).clamp_min(1)
    if mode == "sequence":
        per_row = x.sum(1) / valid.sum(1).clamp_min(1)
        return per_row.mean() if total is None else per_row.sum() / total.clamp_min(1)
    raise ValueError(f"aggregate must be 'sum', 'token' or 'sequence', got {mode!r}")


def aggregate_count(valid: torch.Tensor, mode: Aggregate) -> torch.Tensor:
    """The normaliser of ``aggregate(., valid, mode)``: valid steps (``token``), rollouts
    (``sequence``), 0 (``sum``, none); int64 scalar."""
    if mode == "token":
        return valid.sum()
    if mode == "sequence":
        return torch.tensor(valid.shape[0], device=valid.device)
    return torch.zeros((), dtype=torch.int64, device=valid.device)


def policy_gradient_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantage: torch.Tensor,
    valid: torch.Tensor,
    *,
    clip_eps: float | None = None,
    ref_log_prob: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    aggregation: Aggregate = "sum",
    total: torch.Tensor | None = None,
) -> TensorDict:
    """Policy-gradient loss over (B, L) steps (``total``: see :func:`aggregate`).

    ``ratio = exp(log_prob - old_log_prob)`` (1 on-policy, with the policy's gradient);
    ``loss_objective = -agg(ratio * A)``, or PPO's ``-agg(min(ratio A, clip(ratio) A))`` with
    ``clip_eps``; ``loss_kl = kl_coef * agg(k3(ref || pi))`` when ``ref_log_prob`` is given.
    Returns ``loss_*`` entries (to be summed) and diagnostics.
    """
    log_ratio = log_prob - old_log_prob.detach()
    ratio = log_ratio.exp()
    adv = advantage.detach()
    surrogate = ratio * adv
    clip_fraction = torch.zeros((), device=log_prob.device)
    if clip_eps is not None:
        clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
        surrogate = torch.minimum(surrogate, clipped)
        clip_fraction = aggregate(((ratio - 1).abs() > clip_eps).float(), valid, "token")
    out = {
        "loss_objective": -aggregate(surrogate, valid, aggregation, total),
        "ratio": aggregate(ratio.detach(), valid, "token"),
        "clip_fraction": clip_fraction,
        "approx_kl": aggregate((ratio.detach() - 1) - log_ratio.detach(), valid, "token"),
        "advantage_abs": aggregate(adv.abs(), valid, "token"),
    }
    if ref_log_prob is not None and kl_coef:
        d = ref_log_prob.detach() - log_prob
        k3 = d.exp() - 1 - d  # unbiased, non-negative estimate of KL(pi || ref)
        out["loss_kl"] = kl_coef * aggregate(k3, valid, aggregation, total)
        out["kl_ref"] = aggregate(k3.detach(), valid, "token")
    return TensorDict(out, batch_size=[])


def loss_prediction_loss(
    loss_pred: torch.Tensor,
    loss_after: torch.Tensor,
    mask: torch.Tensor,
    *,
    coef: float = 1.0,
    aggregation: Aggregate = "sum",
    total: torch.Tensor | None = None,
) -> TensorDict:
    """Train the task-loss head on the losses the environment measured (``total``: see
    :func:`aggregate`).

    (B, L) predicted frame loss after each step, (B, L) actual loss after it, (B, L) bool steps to
    train on -> ``loss_pred = coef * agg((loss_pred - loss_after)^2)`` (aggregated like the policy
    loss, so ``coef`` weighs the two whatever the aggregation) and the diagnostic
    ``loss_pred_abs_err`` (mean absolute error over the steps)."""
    target = torch.where(mask, loss_after, torch.zeros_like(loss_after)).detach()
    err = torch.where(mask, loss_pred - target, torch.zeros_like(loss_pred))
    return TensorDict(
        {
            "loss_pred": coef * aggregate(err.pow(2), mask, aggregation, total),
            "loss_pred_abs_err": aggregate(err.detach().abs(), mask, "token"),
        },
        batch_size=[],
    )


def frame_end_steps(frame_id: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the last valid step of every frame (a gaze that used up the budget, or STOP)."""
    nxt_valid = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], 1)
    nxt_frame = torch.cat([frame_id[:, 1:], frame_id[:, -1:]], 1)
    return valid & (~nxt_valid | (nxt_frame != frame_id))


def annealed_temperature(progress: float, start: float, end: float) -> float:
    """Sampling temperature at ``progress`` in [0, 1] of training: geometric from ``start`` to
    ``end`` (equal steps in log-temperature, so the cold end is not rushed)."""
    if start <= 0 or end <= 0:
        raise ValueError(f"temperatures must be > 0, got start={start}, end={end}")
    return start * (end / start) ** min(max(progress, 0.0), 1.0)


# ---- groups of rollouts ----------------------------------------------------------------------
@dataclass(frozen=True)
class GroupBudgets:
    """How the per-frame gaze counts a group of rollouts shares are chosen."""

    mode: BudgetMode = "threshold"
    """``threshold`` (paper): the per-frame gaze counts of one greedy rollout of the current policy
    that stops each frame once its predicted loss is at most ``task_loss_requirement``;
    ``sampled``: a per-clip gazing ratio ~ exponential truncated to ``ratio_range``, split over the
    frames by a Dirichlet (``alpha_first`` / ``alpha_rest``), like the behaviour-cloning labels;
    ``fixed``: the environment config's budgets."""
    task_loss_requirement: float = 0.05
    """Stop threshold of the ``threshold`` rollout (a value of the environment's loss)."""
    max_ratio: float = 0.3
    """Per-frame gaze cap of the ``threshold`` rollout, as a fraction of the N patches."""
    ratio_range: tuple[float, float] = (0.02, 0.2)
    """``sampled``: range of the per-clip gazing ratio."""
    ratio_scale: float = 0.05
    """``sampled``: mean of the exponential the ratio is drawn from (before truncation)."""
    alpha_first: int = 10
    """``sampled``: Dirichlet concentration of the first frame's share."""
    alpha_rest: int = 3
    """``sampled``: Dirichlet concentration of every later frame's share."""

    def __post_init__(self) -> None:
        if self.mode not in ("threshold", "sampled", "fixed"):
            raise ValueError(f"budget mode must be 'threshold', 'sampled' or 'fixed', got {self.mode!r}")
        if not 0 < self.max_ratio <= 1:
            raise ValueError(f"max_ratio must lie in (0, 1], got {self.max_ratio}")


@torch.no_grad()
def group_budgets(
    policy: AutoGazePolicy,
    params: CoreParams,
    video: torch.Tensor,
    spec: GroupBudgets,
    generator: torch.Generator | None = None,
    engine: RolloutEngine | None = None,
) -> torch.Tensor:
    """(n, T) int64 per-frame gaze counts for ``n`` clips ``video`` (n, T, 3, H, W) uint8, each
    in ``[max(1, min_gazes_per_frame), N]`` (see :class:`GroupBudgets`); ``sampled`` draws from
    ``generator``; ``threshold``'s greedy rollout runs on ``engine`` (default ``generate``)."""
    cfg = params.config
    n, T, N = video.shape[0], cfg.num_frames, cfg.grid.num_patches
    lo = max(1, cfg.min_gazes_per_frame)
    if spec.mode == "fixed":
        counts = torch.tensor(cfg.budgets, device=video.device).expand(n, T)
    elif spec.mode == "sampled":
        if generator is None:
            raise ValueError("sampled budgets need an explicit torch.Generator")
        counts = sample_gaze_counts(
            n,
            T,
            N,
            generator,
            ratio_range=spec.ratio_range,
            ratio_scale=spec.ratio_scale,
            alpha_first=spec.alpha_first,
            alpha_rest=spec.alpha_rest,
        ).to(video.device)
    else:
        gazes = (engine or RolloutEngine("reference")).generate(
            policy,
            video,
            torch.full((n, T), budget_for_ratio(spec.max_ratio, N, lo), device=video.device),
            task_loss_requirement=spec.task_loss_requirement,
            temperature=0.0,
            min_gazes_per_frame=lo,
        )
        counts = gazes.num_gazes
    return counts.clamp(lo, N).to(torch.int64).contiguous()


def scored_frames(params: CoreParams, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(n, T) bool frames the ``frame`` reward scores, drawn like ``core.reset`` does: every frame
    when ``reward_frame_rate >= 1``, else ``max(1, round(rate * T))`` distinct frames per clip."""
    cfg = params.config
    T = cfg.num_frames
    if cfg.reward_frame_rate >= 1.0:
        return torch.ones(n, T, dtype=torch.bool, device=device)
    if generator is None:
        raise ValueError("reward_frame_rate < 1 draws the scored frames: pass an explicit torch.Generator")
    m = max(1, round(cfg.reward_frame_rate * T))
    order = torch.rand(n, T, generator=generator, device=generator.device).argsort(dim=1)[:, :m].to(device)
    return torch.zeros(n, T, dtype=torch.bool, device=device).scatter_(1, order, True)


def collect(
    policy: AutoGazePolicy,
    params: CoreParams,
    reward_fn: RewardFn,
    video: torch.Tensor,
    budgets: torch.Tensor,
    group_size: int,
    *,
    temperature: float,
    generator: torch.Generator,
    timings: dict[str, float] | None = None,
    engine: RolloutEngine | None = None,
) -> TensorDict:
    """``group_size`` sampled rollouts of each of ``n`` clips ``video`` (n, T, 3, H, W) uint8,
    all rollouts of a clip under its per-frame counts ``budgets`` (n, T) and scored on the same
    reward frames, generated by ``engine`` (default ``AutoGazePolicy.generate``).

    Returns the trajectory TensorDict of :func:`agents.rollout.rollout`, batch ``[n * G]`` (the
    G rollouts of clip ``i`` are rows ``i * G .. i * G + G - 1``), plus ``temperature`` (n * G,)
    and ``clip`` (n * G,) int64 (``i``: rows with one ``clip`` share their video, so that the
    update encodes it once).
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    n = video.shape[0]
    frames = scored_frames(params, n, generator, video.device)
    batch = rollout(
        policy,
        params,
        reward_fn,
        video,
        budgets=budgets.repeat_interleave(group_size, 0),
        temperature=temperature,
        generator=generator,
        reward_frames=frames.repeat_interleave(group_size, 0),
        timings=timings,
        group_size=group_size,
        engine=engine,
    )
    batch["temperature"] = torch.full((n * group_size,), float(temperature), device=video.device)
    batch["clip"] = torch.arange(n, device=video.device).repeat_interleave(group_size)
    return batch


STEP_KEYS = ("action", "frame_id", "valid", "log_prob", "loss_pred", "value", "reward", "loss_after")
"""Per-step (B, L) entries of a batch of rollouts (the others are per rollout or per frame)."""


def cat_rollouts(parts: Sequence[TensorDict], group_size: int, stop_id: int) -> TensorDict:
    """One batch of the :func:`collect` batches ``parts`` (whole groups each), their steps padded
    to the longest (STOP, invalid, zeros) and ``clip`` renumbered over the whole batch."""
    if len(parts) == 1:
        return parts[0]
    L = max(p["action"].shape[1] for p in parts)
    padded = []
    for p in parts:
        p = p.clone(recurse=False)
        extra = L - p["action"].shape[1]
        if extra:
            for key in STEP_KEYS:
                if key in p.keys():
                    p[key] = F.pad(p[key], (0, extra), value=stop_id if key == "action" else 0)
        padded.append(p)
    batch = torch.cat(padded)
    batch["clip"] = torch.arange(batch.batch_size[0] // group_size, device=batch.device).repeat_interleave(group_size)
    return batch


def trajectory_stats(batch: TensorDict, num_patches: int) -> dict[str, float]:
    """Diagnostics of a batch of rollouts: mean episode return, mean per-frame loss, gazing ratio,
    and the mean absolute error of the loss prediction the rollouts were generated with."""
    valid = batch["valid"]
    gaze = valid & (batch["action"] != num_patches)
    T = batch["frame_loss"].shape[1]
    return {
        "episode_return": float(batch["reward"].sum(1).mean()),
        "frame_loss": float(batch["frame_loss"].mean()),
        "gazing_ratio": float(gaze.sum(1).float().mean()) / (T * num_patches),
        "rollout_loss_pred_abs_err": float(aggregate((batch["loss_pred"] - batch["loss_after"]).abs(), gaze, "token")),
    }


class DataParallel(Protocol):
    """What ``minibatch_update`` needs of a multi-process run (``experiments.distributed.Dist``)."""

    world_size: int

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over the processes."""
        ...


def all_sum_gradients(params: Sequence[torch.nn.Parameter], parallel: DataParallel, mean: bool) -> None:
    """Sum (``mean``: average) every parameter's gradient over the processes, in one all-reduce
    (a parameter without a gradient counts as zeros, so that every process sends the same shapes)."""
    params = [p for p in params if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = parallel.all_sum(torch.cat([g.reshape(-1) for g in grads]))
    if mean:
        flat /= parallel.world_size
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).to(p.dtype)


def minibatch_update(
    policy: AutoGazePolicy,
    optimizer: torch.optim.Optimizer,
    batch: TensorDict,
    loss_fn: Callable[..., TensorDict],
    *,
    group_size: int,
    epochs: int,
    minibatches: int,
    max_grad_norm: float | None,
    micro_batch: int | None = None,
    summed: bool = False,
    amp: bool = False,
    generator: torch.Generator | None = None,
    totals_fn: Callable[[TensorDict], dict[str, torch.Tensor]] | None = None,
    parallel: DataParallel | None = None,
) -> TensorDict:
    """``epochs`` passes over ``batch`` in ``minibatches`` minibatches of whole groups (shuffled
    with ``generator`` when there are several), one optimizer step on the sum of ``loss_fn``'s
    ``loss_*`` entries each.

    ``micro_batch`` rollouts go through ``loss_fn`` at a time, gradients accumulated, to bound
    memory: with ``summed`` (the loss sums over rollouts) the parts add up to the minibatch's
    loss; otherwise (a mean) each part is weighted by its share of rollouts, exact for means over
    rollouts and close for means over steps. ``totals_fn`` (a minibatch -> its normalisers, e.g.
    :func:`grpo_totals`): the normalisers of the whole minibatch (over all processes) go to
    ``loss_fn(part, totals)``, whose ``loss_*`` entries are then the part's share and add up
    exactly. ``amp``: bf16 autocast of ``loss_fn`` on CUDA.

    ``parallel``: every process holds its own groups and takes the same number of minibatches and
    micro-batches of them; gradients are summed over the processes before clipping (averaged when
    the losses are means without ``totals_fn``: exact when the processes' minibatches are alike),
    and the returned ``loss_*`` entries are the global ones, the diagnostics the processes' mean.
    Returns the mean of every entry over the optimizer steps, and ``grad_norm``."""
    B = batch.batch_size[0]
    n = B // group_size
    if n * group_size != B or not 1 <= minibatches <= n:
        raise ValueError(f"{B} rollouts in groups of {group_size} cannot form {minibatches} minibatches")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    device = batch["valid"].device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")
    members = torch.arange(group_size)
    records = []
    for _ in range(epochs):
        if minibatches > 1:
            gen_device = generator.device if generator is not None else "cpu"
            groups = torch.randperm(n, generator=generator, device=gen_device).cpu()
        else:
            groups = torch.arange(n)
        for chunk in groups.chunk(minibatches):
            rows = (chunk[:, None] * group_size + members).flatten().to(device)
            optimizer.zero_grad(set_to_none=True)
            totals = None
            if totals_fn is not None:
                totals = totals_fn(batch[rows])
                if parallel is not None:
                    totals = {k: parallel.all_sum(v) for k, v in totals.items()}
            exact = summed or totals is not None  # the parts' losses add up to the minibatch's
            total: dict[str, torch.Tensor] = {}
            for part in rows.split(micro_batch or rows.numel()):
                share = part.numel() / rows.numel()
                with autocast:  # padding costs little: score sizes its sequence by the valid steps
                    out = loss_fn(batch[part]) if totals is None else loss_fn(batch[part], totals)
                loss = sum(v for k, v in out.items() if k.startswith("loss_"))
                ((1.0 if exact else share) * loss).backward()
                for k, v in out.items():
                    w = 1.0 if exact and k.startswith("loss_") else share
                    total[k] = total.get(k, 0.0) + w * v.detach().float()
            if parallel is not None and parallel.world_size > 1:
                all_sum_gradients(list(policy.parameters()), parallel, mean=not exact)
                keys = list(total)
                joined = parallel.all_sum(torch.stack([total[k].float().reshape(()) for k in keys]))
                for k, v in zip(keys, joined):
                    total[k] = v if exact and k.startswith("loss_") else v / parallel.world_size
            total["grad_norm"] = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm or math.inf)
            optimizer.step()
            records.append(TensorDict(total, batch_size=[]))
    return torch.stack(records).apply(lambda x: x.float().mean(0), batch_size=[])


# ---- GRPO ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GRPOConfig:
    """GRPO hyper-parameters (paper defaults where the paper gives one)."""

    group_size: int = 12
    """G: rollouts per clip (paper 12); they share their per-frame gaze counts."""
    gamma: float = 0.995
    """Discount per gaze step (paper 0.995)."""
    std_normalize: bool = False
    """Divide advantages by the group's std at each step (paper: no)."""
    aggregation: Aggregate = "sum"
    """How per-step losses are reduced: sum (paper), token or sequence."""
    clip_eps: float | None = None
    """PPO-style ratio clipping (paper: none, on-policy)."""
    epochs: int = 1
    """Passes over each batch of rollouts (paper: 1, on-policy)."""
    minibatches: int = 1
    """Optimizer steps per pass (each over whole groups)."""
    kl_coef: float = 0.0
    """Weight of a k3 KL term towards the reference (BC) policy (paper: 0)."""
    loss_pred_coef: float = 1.0
    """Weight of the task-loss head's L2 on the measured losses."""
    loss_pred_steps: LossPredSteps = "all"
    """Steps the loss head learns from: every step, or only frame ends (for reconstructors that
    only score frame ends, like the learned MAE)."""
    max_grad_norm: float | None = 1.0
    """Gradient-norm clipping (None: off)."""
    micro_batch: int | None = None
    """Rollouts per forward / backward pass of the update (None: the whole minibatch)."""
    amp: bool = False
    """bf16 autocast of the update's teacher-forced pass on CUDA."""
    budgets: GroupBudgets = field(default_factory=GroupBudgets)
    """How each group's per-frame gaze counts are chosen."""

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"GRPO needs group_size >= 2 (a group mean), got {self.group_size}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must lie in (0, 1], got {self.gamma}")
        if self.clip_eps is None and self.epochs * self.minibatches > 1:
            raise ValueError(
                f"{self.epochs} epochs x {self.minibatches} minibatches reuse rollouts off-policy: set clip_eps"
            )


def grpo_advantage(batch: TensorDict, cfg: GRPOConfig) -> TensorDict:
    """Add ``return`` (discounted in gaze steps) and ``advantage`` (group-relative) to ``batch``
    (rows grouped as :func:`collect` makes them); returns it."""
    batch["return"] = discounted_returns(batch["reward"], batch["valid"], cfg.gamma)
    batch["advantage"] = group_relative_advantage(
        batch["return"], batch["valid"], cfg.group_size, std_normalize=cfg.std_normalize
    )
    return batch


def loss_pred_mask(batch: TensorDict, steps: LossPredSteps) -> torch.Tensor:
    """(B, L) bool steps whose measured loss trains the loss head."""
    if steps == "frame_end":
        return frame_end_steps(batch["frame_id"], batch["valid"])
    return batch["valid"]


def score_rollouts(policy: AutoGazePolicy, batch: TensorDict, temperature: float) -> TensorDict:
    """``policy.score`` of a batch of rollouts at ``temperature``; with a ``clip`` entry (see
    :func:`collect`) every clip is encoded once and its vision tokens shared by its rollouts
    (the encoder's gradient is then the sum over them, as with one encoding per rollout), unless
    the policy has ``canvas_input`` (a frame's tokens then depend on the rollout's gazes)."""
    clip = batch.get("clip", None)
    if clip is None or policy.config.canvas_input:  # canvas_input: each rollout encodes its own canvases
        return policy.score(
            preprocess(batch["video"]), batch["action"], batch["frame_id"], batch["valid"], temperature=temperature
        )
    clips, row_clip = torch.unique(clip, return_inverse=True)  # (m,), (B,) index into clips
    rows = torch.arange(clip.shape[0], device=clip.device)
    first = torch.full_like(clips, clip.shape[0]).scatter_reduce(0, row_clip, rows, reduce="amin")  # a row per clip
    tokens, _ = policy.encode(preprocess(batch["video"][first]))  # (m, T, P, H)
    return policy.score(
        None, batch["action"], batch["frame_id"], batch["valid"], temperature=temperature, tokens=tokens[row_clip]
    )


def grpo_totals(batch: TensorDict, cfg: GRPOConfig, stop_id: int) -> dict[str, torch.Tensor]:
    """The normalisers of :func:`grpo_loss` on ``batch``: ``gaze`` (policy-gradient terms) and
    ``pred`` (loss head), see :func:`aggregate_count`. Summed over the parts of a larger batch
    and passed as ``totals``, the parts' losses add up to the larger batch's loss."""
    gaze = batch["valid"] & (batch["action"] != stop_id)
    return {
        "gaze": aggregate_count(gaze, cfg.aggregation),
        "pred": aggregate_count(loss_pred_mask(batch, cfg.loss_pred_steps), cfg.aggregation),
    }


def grpo_loss(
    policy: AutoGazePolicy, batch: TensorDict, cfg: GRPOConfig, totals: dict[str, torch.Tensor] | None = None
) -> TensorDict:
    """GRPO loss of a batch of rollouts with ``advantage`` (and ``ref_log_prob`` for the KL term):
    one teacher-forced pass at the rollouts' temperature (:func:`score_rollouts`). Returns
    ``loss_objective``, ``loss_pred`` (and ``loss_kl``) plus diagnostics (``ratio``,
    ``clip_fraction``, ``approx_kl``, ``advantage_abs``, ``entropy``, ``loss_pred_abs_err``).
    ``totals``: :func:`grpo_totals` of a larger batch this one is part of (the losses are then
    this part's share)."""
    totals = totals or {}
    scored = score_rollouts(policy, batch, float(batch["temperature"][0]))
    gaze = batch["valid"] & (batch["action"] != policy.config.stop_id)  # STOP comes from the stop rule
    out = policy_gradient_loss(
        scored["log_prob"],
        batch["log_prob"],
        batch["advantage"],
        gaze,
        clip_eps=cfg.clip_eps,
        ref_log_prob=batch.get("ref_log_prob", None),
        kl_coef=cfg.kl_coef,
        aggregation=cfg.aggregation,
        total=totals.get("gaze"),
    )
    out.update(
        loss_prediction_loss(
            scored["loss_pred"],
            batch["loss_after"],
            loss_pred_mask(batch, cfg.loss_pred_steps),
            coef=cfg.loss_pred_coef,
            aggregation=cfg.aggregation,
            total=totals.get("pred"),
        )
    )
    out["entropy"] = aggregate(scored["entropy"].detach(), gaze, "token")
    return out


def grpo_update(
    policy: AutoGazePolicy,
    optimizer: torch.optim.Optimizer,
    batch: TensorDict,
    cfg: GRPOConfig,
    *,
    ref_policy: AutoGazePolicy | None = None,
    generator: torch.Generator | None = None,
    parallel: DataParallel | None = None,
) -> TensorDict:
    """Optimise ``grpo_loss`` on a batch with advantages (``epochs`` x ``minibatches`` steps);
    ``ref_policy`` (frozen) scores the batch once for the KL term; ``parallel``: this process's
    share of a multi-process batch (see :func:`minibatch_update`). Returns mean diagnostics."""
    if ref_policy is not None and cfg.kl_coef:
        with torch.no_grad():
            batch["ref_log_prob"] = score_rollouts(ref_policy, batch, float(batch["temperature"][0]))["log_prob"]
    return minibatch_update(
        policy,
        optimizer,
        batch,
        lambda mb, totals: grpo_loss(policy, mb, cfg, totals),
        group_size=cfg.group_size,
        epochs=cfg.epochs,
        minibatches=cfg.minibatches,
        max_grad_norm=cfg.max_grad_norm,
        micro_batch=cfg.micro_batch,
        summed=cfg.aggregation == "sum",
        amp=cfg.amp,
        generator=generator,
        totals_fn=lambda mb: grpo_totals(mb, cfg, policy.config.stop_id),
        parallel=parallel,
    )


def grpo_step(
    policy: AutoGazePolicy,
    optimizer: torch.optim.Optimizer,
    params: CoreParams,
    reward_fn: RewardFn,
    video: torch.Tensor,
    cfg: GRPOConfig,
    *,
    temperature: float,
    generator: torch.Generator | Sequence[torch.Generator],
    ref_policy: AutoGazePolicy | None = None,
    engine: RolloutEngine | None = None,
    parallel: DataParallel | None = None,
) -> TensorDict:
    """One GRPO iteration on ``n`` clips ``video`` (n, T, 3, H, W) uint8: group budgets, ``n * G``
    rollouts at ``temperature`` (generated by ``engine``, default ``AutoGazePolicy.generate``),
    advantages, update.

    ``generator``: one for the whole batch, or one per clip (each clip's group is then rolled out
    on its own, its draws independent of the other clips: what makes a multi-process run equal
    the single-process one). ``parallel``: this process's clips are its share of a multi-process
    batch (see :func:`minibatch_update`).

    Returns a TensorDict of the ``loss_*`` entries and diagnostics (see :func:`grpo_loss`,
    :func:`trajectory_stats`), ``temperature``, ``episodes`` and the seconds spent in
    ``time_budgets`` (the threshold rollout), ``time_generate`` (sampling the rollouts),
    ``time_replay`` (environment and reward) and ``time_update``.
    """
    timings: dict[str, float] = {}
    per_clip = not isinstance(generator, torch.Generator)
    if per_clip and len(generator) != video.shape[0]:
        raise ValueError(f"{len(generator)} generators for {video.shape[0]} clips: pass one per clip or one in all")
    parts = []
    groups = zip(video.split(1), generator) if per_clip else [(video, generator)]
    for clips, gen in groups:
        start = device_clock(video.device)
        budgets = group_budgets(policy, params, clips, cfg.budgets, gen, engine)
        timings["budgets"] = timings.get("budgets", 0.0) + device_clock(video.device) - start
        parts.append(collect(
            policy, params, reward_fn, clips, budgets, cfg.group_size, temperature=temperature, generator=gen,
            timings=timings, engine=engine,
        ))
    batch = cat_rollouts(parts, cfg.group_size, policy.config.stop_id)
    grpo_advantage(batch, cfg)
    start = device_clock(video.device)
    shuffle = generator[0] if per_clip else generator
    out = grpo_update(policy, optimizer, batch, cfg, ref_policy=ref_policy, generator=shuffle, parallel=parallel)
    timings["update"] = device_clock(video.device) - start
    out.update(trajectory_stats(batch, policy.config.num_patches))
    out["temperature"] = float(temperature)
    out["episodes"] = float(batch.batch_size[0])
    out.update({f"time_{k}": v for k, v in timings.items()})
    return out
