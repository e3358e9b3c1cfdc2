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

TorchRL's ``MCAdvantage`` normalises trajectory returns by the group std and broadcasts one value
per trajectory; the paper's advantage is per gaze and unnormalised, so it is written here.
"""

from __future__ import annotations

from typing import Literal

import torch
from tensordict import TensorDict

Aggregate = Literal["sum", "token", "sequence"]


def discounted_returns(reward: torch.Tensor, valid: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B, L) rewards, (B, L) bool valid -> (B, L) returns ``R_l = r_l + gamma * R_{l+1}``, 0 on padding."""
    reward = torch.where(valid, reward, torch.zeros_like(reward))
    out = torch.zeros_like(reward)
    running = torch.zeros_like(reward[:, 0])
    for l in range(reward.shape[1] - 1, -1, -1):
        running = reward[:, l] + gamma * running * valid[:, l]
        out[:, l] = running
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


def aggregate(per_step: torch.Tensor, valid: torch.Tensor, mode: Aggregate = "sum") -> torch.Tensor:
    """Reduce (B, L) per-step terms over valid steps: ``sum`` (paper: no normaliser), ``token``
    (mean over all valid steps of the batch) or ``sequence`` (mean per rollout, then over rollouts)."""
    x = torch.where(valid, per_step, torch.zeros_like(per_step))
    if mode == "sum":
        return x.sum()
    if mode == "token":
        return x.sum() / valid.sum().clamp_min(1)
    if mode == "sequence":
        return (x.sum(1) / valid.sum(1).clamp_min(1)).mean()
    raise ValueError(f"aggregate must be 'sum', 'token' or 'sequence', got {mode!r}")


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
) -> TensorDict:
    """Policy-gradient loss over (B, L) steps.

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
        "loss_objective": -aggregate(surrogate, valid, aggregation),
        "ratio": aggregate(ratio.detach(), valid, "token"),
        "clip_fraction": clip_fraction,
        "approx_kl": aggregate((ratio.detach() - 1) - log_ratio.detach(), valid, "token"),
        "advantage_abs": aggregate(adv.abs(), valid, "token"),
    }
    if ref_log_prob is not None and kl_coef:
        d = ref_log_prob.detach() - log_prob
        k3 = d.exp() - 1 - d  # unbiased, non-negative estimate of KL(pi || ref)
        out["loss_kl"] = kl_coef * aggregate(k3, valid, aggregation)
        out["kl_ref"] = aggregate(k3.detach(), valid, "token")
    return TensorDict(out, batch_size=[])
