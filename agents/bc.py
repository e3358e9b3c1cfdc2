"""Behaviour cloning on greedy-oracle gazes (paper "Training", stage 1): the loss.

``bc_loss`` scores a batch of expert trajectories (as ``experiments.collect_expert`` stores them)
in ONE teacher-forced pass of the policy and returns a TensorDict whose ``loss_*`` entries are
summed for the update and whose other entries are diagnostics (the TorchRL loss convention):

- ``loss_ce``: next-token cross-entropy on the expert gazes. With ``K`` prediction heads every
  head is trained at every position: head ``k`` at the row of step ``i`` of a frame (the frame's
  last vision token for ``i = -1``) predicts the frame's step ``i + 1 + k``; pairs without a
  target in the same frame are masked. Each head's mean cross-entropy counts equally. ``K = 1``
  is plain next-token prediction.
- ``loss_pred``: ``pred_coef`` x squared error of the loss-prediction head against the frame loss
  recorded after each gaze (``loss_after``); loss head ``k`` at the row of step ``i`` predicts the
  loss after step ``i + k``, all heads trained.

By default the cross-entropy is taken under the distribution generation samples from: patches
already gazed in the frame (the expert's earlier steps, which include the picks of earlier heads
of the same decoding step) and STOP have probability 0 (``mask_gazed``).

STOP slots: the expert data has none (fixed per-frame budgets end every frame), like
``AutoGazePolicy.generate`` with budgets only (``Gazes.to_trajectory`` then has no STOP either).
STOP never comes from the policy's softmax (only from the task-loss stop rule), so STOP steps of a
trajectory are never cross-entropy targets nor loss-prediction targets; they are laid out as
``AutoGazePolicy.score`` lays them out (a slot that later tokens do not see).

``oracle_labels`` relabels any trajectory with the oracle's choice in every state it visits (the
DAgger labels, given to ``bc_loss`` as ``target``). A short DAgger trial on the tiny preset (4
rounds of 256 rolled-out clips) did not improve the held-out loss, so ``experiments.train_bc``
does not use it yet.

Data-parallel training: ``bc_totals`` counts a batch's targets from its structure alone (no
forward pass); summed over every rank and micro-batch of a step and passed as ``totals``, each
part's loss is its share of the whole batch's loss, so the gradients add up to the single-process
gradient exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tensordict import TensorDict, TensorDictBase

from agents.baselines import Baseline, GreedyOracle
from agents.policy import AutoGazePolicy, frame_layout, gazed_before, preprocess
from gaze_env import core
from gaze_env.core import CoreParams

__all__ = ["BATCH_KEYS", "bc_loss", "bc_totals", "oracle_labels", "trim_steps"]

BATCH_KEYS = ("video", "action", "frame_id", "valid", "loss_after")
"""Entries of an expert batch ``bc_loss`` reads."""


def trim_steps(batch: TensorDictBase) -> TensorDictBase:
    """Drop the trailing step columns no trajectory of the batch uses (expert data is padded to
    the longest possible clip): ``action`` / ``frame_id`` / ``valid`` / ``loss_after`` (and
    ``target``) (B, L) -> (B, L') with ``L'`` the last valid column + 1."""
    valid = batch["valid"]
    used = valid.any(0)
    length = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
    out = batch.select(*BATCH_KEYS, "target", strict=False)
    for key in ("action", "frame_id", "valid", "loss_after", "target"):
        if key in out.keys():
            out[key] = out[key][:, :length]
    return out


def _targets(batch: TensorDictBase, stop_id: int) -> torch.Tensor:
    """(B, L) bool: the steps with a cross-entropy target (valid gazes whose label is a gaze)."""
    action = batch["action"]
    return batch["valid"].bool() & (action != stop_id) & (batch.get("target", action) != stop_id)


def bc_totals(batch: TensorDictBase, num_heads: int, stop_id: int) -> dict[str, torch.Tensor]:
    """The normalisers of ``bc_loss`` on ``batch``, from its structure alone: ``ce`` (K,) int64
    cross-entropy targets per head, ``pred`` () int64 loss-prediction targets. Sums of these over
    the parts of a batch, given to ``bc_loss(..., totals=...)``, make the parts' losses add up to
    the whole batch's loss."""
    valid = batch["valid"].bool()
    _, _, rank = frame_layout(batch["frame_id"], valid, batch["video"].shape[1])  # (B, L)
    heads = torch.arange(num_heads, device=rank.device)
    is_gaze = _targets(batch, stop_id)
    ce = (valid[..., None] & (rank[..., None] >= heads) & is_gaze[..., None]).sum((0, 1))  # (K,)
    scored = is_gaze & torch.isfinite(batch["loss_after"].float())
    pred = (valid[..., None] & (rank[..., None] >= heads - 1) & scored[..., None]).sum()
    return {"ce": ce, "pred": pred}


def bc_loss(
    policy: AutoGazePolicy,
    batch: TensorDictBase,
    *,
    pred_coef: float = 1.0,
    mask_gazed: bool = True,
    totals: dict[str, torch.Tensor] | None = None,
) -> TensorDict:
    """Behaviour-cloning loss of ``policy`` on a batch of expert trajectories.

    Args:
        batch: TensorDict [B] with ``video`` (B, T, 3, H, W) uint8, ``action`` (B, L) int64
            per-frame patch ids (STOP = N, padding anything), ``frame_id`` (B, L) int64,
            ``valid`` (B, L) bool and ``loss_after`` (B, L) float (the frame's loss after each
            step; NaN or anything at padding). Padding columns are trimmed here. Optional
            ``target`` (B, L) int64: the id to predict at each step when it is not the step's
            own action (``oracle_labels``: the oracle's choice in the state the trajectory
            reached); default ``action``.
        pred_coef: weight of ``loss_pred`` (0 turns the loss head's training off).
        mask_gazed: cross-entropy under the masked distribution generation samples from (see the
            module docstring); False: the plain softmax over all ``N + 1`` ids.
        totals: ``bc_totals`` summed over all parts of a larger batch (ranks, micro-batches):
            the losses are then this part's share of that batch's losses (``loss_ce`` sums the
            per-head means' shares); None: this batch alone.

    Returns:
        TensorDict, batch []: ``loss_ce``, ``loss_pred`` (differentiable; their sum is the loss)
        and detached diagnostics: ``ce`` (= ``loss_ce``), ``ce_head0``, ``ce_head_last`` (head
        ``K - 1``), ``acc`` (top-1 accuracy of head 0, the next-gaze head, under the same mask),
        ``acc_head_last``, ``entropy`` (head 0), ``pred_mse`` (unweighted), ``pred_mae``
        (head 0, the loss after the current gaze) and ``targets`` (gazes scored).
    """
    if pred_coef < 0:
        raise ValueError(f"pred_coef must be >= 0, got {pred_coef}")
    missing = [k for k in BATCH_KEYS if k not in batch.keys()]
    if missing:
        raise KeyError(f"the expert batch lacks {missing}; it needs {list(BATCH_KEYS)} (experiments.collect_expert)")
    batch = trim_steps(batch)
    cfg = policy.config
    K, V, STOP = cfg.num_multi_token_pred, cfg.vocab_size, cfg.stop_id
    video = batch["video"]
    if video.dtype != torch.uint8:
        raise TypeError(f"batch['video'] must be uint8 (B, T, 3, H, W), got {video.dtype}")
    action, frame_id = batch["action"], batch["frame_id"]
    valid = batch["valid"].bool()
    labels = batch.get("target", action)
    is_gaze = _targets(batch, STOP)  # (B, L) steps with a target
    out = policy.multi_token_outputs(preprocess(video), action, frame_id, valid)
    logits = out["logits"]  # (B, L, K, V) float32
    target_mask = out["logits_valid"] & is_gaze[..., None]  # (B, L, K)
    if mask_gazed:
        banned = gazed_before(action, frame_id, valid, video.shape[1], V)  # (B, L, V)
        banned[..., STOP] = True
        banned &= is_gaze[..., None]  # rows without a target keep finite logits
        logits = logits.masked_fill(banned[:, :, None, :], float("-inf"))
    target = torch.where(is_gaze, labels, 0)[..., None].expand_as(target_mask)  # (B, L, K)
    ce = F.cross_entropy(logits.flatten(0, 2), target.flatten(), reduction="none").view(target_mask.shape)
    ce = ce.masked_fill(~target_mask, 0.0)
    per_head_n = target_mask.sum((0, 1))  # (K,)
    norm_n = per_head_n if totals is None else totals["ce"].to(per_head_n.device)  # (K,)
    per_head = ce.sum((0, 1)) / norm_n.clamp(min=1)  # (K,)
    has = norm_n > 0
    loss_ce = per_head[has].sum() / has.sum() if bool(has.any()) else logits.sum() * 0.0

    loss_after = batch["loss_after"].float()
    pred_mask = out["loss_pred_valid"] & (is_gaze & torch.isfinite(loss_after))[..., None]  # (B, L, K)
    err = (out["loss_pred"] - torch.nan_to_num(loss_after)[..., None]).masked_fill(~pred_mask, 0.0)
    pred_n = pred_mask.sum() if totals is None else totals["pred"].to(pred_mask.device)
    pred_mse = err.pow(2).sum() / pred_n.clamp(min=1)

    with torch.no_grad():
        head0 = target_mask[..., 0]
        n0 = head0.sum().clamp(min=1)
        pick = logits.argmax(-1)  # (B, L, K)
        correct = (pick == target) & target_mask
        logp0 = F.log_softmax(logits[..., 0, :], dim=-1)
        entropy0 = -(logp0.exp() * logp0.masked_fill(torch.isinf(logp0), 0.0)).sum(-1)
        last = K - 1
        diagnostics = {
            "ce": loss_ce.detach(),
            "ce_head0": per_head[0].detach(),
            "ce_head_last": per_head[last].detach(),
            "acc": correct[..., 0].sum() / n0,
            "acc_head_last": correct[..., last].sum() / per_head_n[last].clamp(min=1),
            "entropy": (entropy0 * head0).sum() / n0,
            "pred_mse": pred_mse.detach(),
            "pred_mae": err[..., 0].abs().sum() / pred_mask[..., 0].sum().clamp(min=1),
            "targets": head0.sum().float(),
        }
    return TensorDict({"loss_ce": loss_ce, "loss_pred": pred_coef * pred_mse, **diagnostics}, batch_size=[])


@torch.no_grad()
def oracle_labels(
    params: CoreParams,
    video: torch.Tensor,
    action: torch.Tensor,
    valid: torch.Tensor,
    budgets: torch.Tensor,
    *,
    oracle: Baseline | None = None,
    generator: torch.Generator | None = None,
) -> TensorDict:
    """The oracle's choice in every state a trajectory visits (DAgger's labels).

    Replays ``action`` (B, L) (valid steps first, per-frame ``budgets`` (B, T) it was made
    under) through ``gaze_env.core`` and asks ``oracle`` (default ``GreedyOracle()``) before
    every step what it would gaze there. Behaviour cloning on the expert's own trajectories
    never sees the states a trained policy drifts into (e.g. a frame whose earlier gazes
    re-gazed the previous frame's patches); these labels teach the way back.

    Returns TensorDict [B]: ``target`` (B, L) int64 the oracle's patch (STOP where the step is
    not valid or no patch is left) and ``loss_after`` (B, L) float32, the frame's loss after the
    trajectory's own step (NaN at invalid steps), what its loss head should predict.
    """
    oracle = oracle if oracle is not None else GreedyOracle()
    B, L = action.shape
    STOP = params.config.grid.stop
    state = core.reset(params, video, generator=generator, budgets=budgets)
    target = torch.full((B, L), STOP, dtype=torch.int64, device=video.device)
    loss_after = torch.full((B, L), float("nan"), device=video.device)
    for step in range(L):
        if bool(state.done.all()):
            break
        live = valid[:, step] & ~state.done
        target[:, step] = torch.where(live, oracle.act(params, state, generator), STOP)
        tr = core.step(params, state, torch.where(live, action[:, step], STOP), validate=False)
        loss_after[:, step] = torch.where(live, tr.loss_after, float("nan"))
    return TensorDict({"target": target, "loss_after": loss_after}, batch_size=[B], device=video.device)
