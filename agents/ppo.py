"""PPO for gazing: a critic on the policy's decoder, GAE over gaze steps, TorchRL's ``ClipPPOLoss``.

Same rollouts as GRPO (``agents.grpo.collect``: groups of rollouts sharing per-frame gaze counts;
a critic needs no group, but the shared counts keep the budgets of a batch like GRPO's), then:

- values: the policy's value head (``PolicyConfig.value_head``; :func:`with_value_head` adds a
  freshly initialised one to a behaviour-cloned policy), the value of the state before each gaze;
- advantages: GAE over gaze steps (``torchrl.objectives.value.functional``), the trajectory
  ending (``done`` and ``terminated``) at its last valid step, padding masked;
- loss: TorchRL's ``ClipPPOLoss`` (clipped surrogate, value loss, optional entropy bonus), plus the
  task-loss head's L2 on the measured losses (``agents.grpo.loss_prediction_loss``), for
  ``epochs`` passes of ``minibatches`` minibatches of whole groups.

How ``ClipPPOLoss`` meets a teacher-forced transformer: the loss calls its actor on the TensorDict
it is given, one row per step, and reads a distribution; the policy, however, can only score a
step inside the whole padded trajectory (one causal pass over ``[frame tokens, gazes, ...]``).
So each minibatch first runs ``policy.score`` once over its ``[b, L]`` trajectories (with
gradient), then flattens the valid gaze steps into a ``[M]`` TensorDict holding each step's
masked, tempered logits and value; the loss's actor is the distribution head over those logits
(a ``ProbabilisticTensorDictModule`` -> ``Categorical``) and its critic reads the value. Gradients
flow from ``ClipPPOLoss``'s outputs through the stored logits and values into the policy. The
loss's ``mean`` reduction is the token aggregation of ``agents.grpo``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from tensordict import TensorDict
from tensordict.nn import ProbabilisticTensorDictModule, TensorDictModule
from torch import nn
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value.functional import vec_generalized_advantage_estimate

from agents.grpo import (
    DataParallel,
    GroupBudgets,
    LossPredSteps,
    collect,
    group_budgets,
    loss_pred_mask,
    loss_prediction_loss,
    minibatch_update,
    trajectory_stats,
)
from agents.policy import AutoGazePolicy, gazed_before, preprocess
from agents.rollout import device_clock
from gaze_env.core import CoreParams
from rewards.base import RewardFn


@dataclass(frozen=True)
class PPOConfig:
    """PPO hyper-parameters (CleanRL names where they exist)."""

    group_size: int = 4
    """Rollouts per clip sharing their per-frame gaze counts."""
    gamma: float = 0.995
    """Discount per gaze step."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    clip_coef: float = 0.2
    """Surrogate clipping epsilon."""
    epochs: int = 4
    """Passes over each batch of rollouts."""
    minibatches: int = 4
    """Minibatches (of whole groups) per pass."""
    critic_coef: float = 0.5
    """Weight of the value loss (L2 to the GAE value target)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (0: off)."""
    normalize_advantage: bool = True
    """Standardise advantages over each minibatch."""
    loss_pred_coef: float = 1.0
    """Weight of the task-loss head's L2 on the measured losses (token-averaged)."""
    loss_pred_steps: LossPredSteps = "all"
    """Steps the loss head learns from (see ``agents.grpo.GRPOConfig``)."""
    max_grad_norm: float | None = 1.0
    """Gradient-norm clipping (None: off)."""
    micro_batch: int | None = None
    """Rollouts per forward / backward pass of the update (None: the whole minibatch)."""
    amp: bool = False
    """bf16 autocast of the update's teacher-forced pass on CUDA."""
    budgets: GroupBudgets = field(default_factory=GroupBudgets)
    """How each group's per-frame gaze counts are chosen."""

    def __post_init__(self) -> None:
        if not 0 < self.gamma <= 1 or not 0 <= self.gae_lambda <= 1:
            raise ValueError(f"need 0 < gamma <= 1 and 0 <= gae_lambda <= 1, got {self.gamma}, {self.gae_lambda}")
        if self.clip_coef <= 0:
            raise ValueError(f"clip_coef must be > 0, got {self.clip_coef}")


def with_value_head(policy: AutoGazePolicy) -> AutoGazePolicy:
    """``policy`` itself when it has a value head, else a copy with a freshly initialised one
    (every other weight copied; the copy lives on the policy's device)."""
    if policy.value_head is not None:
        return policy
    out = AutoGazePolicy(replace(policy.config, value_head=True)).to(policy.device)
    missing, unexpected = out.load_state_dict(policy.state_dict(), strict=False)
    if unexpected or any(not k.startswith("value_head.") for k in missing):
        raise RuntimeError(f"weights do not match: missing {missing}, unexpected {unexpected}")
    return out


def gae(batch: TensorDict, gamma: float, lmbda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over gaze steps of padded trajectories: (B, L) ``advantage`` and ``value_target``
    from ``reward``, ``value`` (of the state before each step) and ``valid``; the episode ends at
    the last valid step (no bootstrap), padding gets 0."""
    valid = batch["valid"]
    value = torch.where(valid, batch["value"], 0.0).float()
    reward = torch.where(valid, batch["reward"], 0.0).float()
    nxt_valid = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], 1)
    done = ~nxt_valid  # the last valid step and every padding step end an episode
    next_value = torch.where(nxt_valid, torch.cat([value[:, 1:], torch.zeros_like(value[:, :1])], 1), 0.0)
    adv, target = vec_generalized_advantage_estimate(
        gamma, lmbda, value[..., None], next_value[..., None], reward[..., None], done[..., None], done[..., None]
    )
    return torch.where(valid, adv[..., 0], 0.0), torch.where(valid, target[..., 0], 0.0)


def make_loss_module(cfg: PPOConfig) -> ClipPPOLoss:
    """``ClipPPOLoss`` over a flat ``[M]`` TensorDict of gaze steps (see the module docstring):
    ``logits`` (M, N + 1) masked and tempered, ``action``, ``action_log_prob`` (behaviour),
    ``advantage`` / ``value_target`` / ``state_value`` (M, 1)."""
    actor = ProbabilisticTensorDictModule(
        in_keys=["logits"],
        out_keys=["action"],
        distribution_class=torch.distributions.Categorical,
        return_log_prob=True,
        log_prob_key="action_log_prob",
    )
    critic = TensorDictModule(nn.Identity(), in_keys=["state_value"], out_keys=["state_value"])
    return ClipPPOLoss(
        actor,
        critic,
        clip_epsilon=cfg.clip_coef,
        entropy_bonus=cfg.entropy_coef > 0,
        entropy_coeff=cfg.entropy_coef,
        critic_coeff=cfg.critic_coef,
        loss_critic_type="l2",
        normalize_advantage=cfg.normalize_advantage,
        functional=False,  # the actor and critic hold no parameters: the policy's are upstream
        reduction="mean",
    )


def ppo_loss(policy: AutoGazePolicy, batch: TensorDict, cfg: PPOConfig, loss_module: ClipPPOLoss) -> TensorDict:
    """PPO loss of a batch with ``advantage`` and ``value_target``: ``loss_objective``,
    ``loss_critic`` (, ``loss_entropy``), ``loss_pred`` and diagnostics."""
    cfg_p = policy.config
    temperature = float(batch["temperature"][0])
    action, frame_id, valid = batch["action"], batch["frame_id"], batch["valid"]
    scored = policy.score(
        preprocess(batch["video"]), action, frame_id, valid, temperature=temperature, return_logits=True
    )
    banned = gazed_before(action, frame_id, valid, batch["video"].shape[1], cfg_p.vocab_size)
    banned[..., cfg_p.stop_id] = True  # STOP is never sampled; the gaze-only steps below never take it
    logits = (scored["logits"] / temperature).masked_fill(banned, float("-inf"))
    gaze = valid & (action != cfg_p.stop_id)
    steps = TensorDict(
        {
            "logits": logits[gaze],
            "action": action[gaze],
            "action_log_prob": batch["log_prob"][gaze],
            "advantage": batch["advantage"][gaze][:, None],
            "value_target": batch["value_target"][gaze][:, None],
            "state_value": scored["value"][gaze][:, None],
        },
        batch_size=[int(gaze.sum())],
    )
    out = loss_module(steps)  # loss_objective, loss_critic (, loss_entropy) and scalar diagnostics
    out.update(
        loss_prediction_loss(
            scored["loss_pred"],
            batch["loss_after"],
            loss_pred_mask(batch, cfg.loss_pred_steps),
            coef=cfg.loss_pred_coef,
            aggregation="token",
        )
    )
    return out


def ppo_step(
    policy: AutoGazePolicy,
    optimizer: torch.optim.Optimizer,
    params: CoreParams,
    reward_fn: RewardFn,
    video: torch.Tensor,
    cfg: PPOConfig,
    *,
    temperature: float,
    generator: torch.Generator,
    loss_module: ClipPPOLoss | None = None,
    parallel: DataParallel | None = None,
) -> TensorDict:
    """One PPO iteration on ``n`` clips ``video`` (n, T, 3, H, W) uint8 with a policy that has a
    value head: group budgets, ``n * group_size`` rollouts, GAE, clipped updates. Returns the
    ``loss_*`` entries, diagnostics and timings like :func:`agents.grpo.grpo_step`.
    ``parallel``: this process's clips are its share of a multi-process batch (gradients averaged
    over the processes, see :func:`agents.grpo.minibatch_update`)."""
    if policy.value_head is None:
        raise ValueError("PPO needs a policy with a value head: use agents.ppo.with_value_head(policy)")
    loss_module = loss_module if loss_module is not None else make_loss_module(cfg).to(video.device)
    timings: dict[str, float] = {}
    start = device_clock(video.device)
    budgets = group_budgets(policy, params, video, cfg.budgets, generator)
    timings["budgets"] = device_clock(video.device) - start
    batch = collect(
        policy, params, reward_fn, video, budgets, cfg.group_size, temperature=temperature, generator=generator,
        timings=timings,
    )
    batch["advantage"], batch["value_target"] = gae(batch, cfg.gamma, cfg.gae_lambda)
    start = device_clock(video.device)
    out = minibatch_update(
        policy,
        optimizer,
        batch,
        lambda mb: ppo_loss(policy, mb, cfg, loss_module),
        group_size=cfg.group_size,
        epochs=cfg.epochs,
        minibatches=cfg.minibatches,
        max_grad_norm=cfg.max_grad_norm,
        micro_batch=cfg.micro_batch,
        amp=cfg.amp,
        generator=generator,
        parallel=parallel,
    )
    timings["update"] = device_clock(video.device) - start
    out.update(trajectory_stats(batch, policy.config.num_patches))
    out["temperature"] = float(temperature)
    out["episodes"] = float(batch.batch_size[0])
    out.update({f"time_{k}": v for k, v in timings.items()})
    return out
