"""Behaviour cloning on greedy-oracle gazes (paper "Training", stage 1): the loss.

``bc_loss`` scores a batch of expert trajectories (as ``experiments.collect_expert`` stores them)
in ONE teacher-forced pass of the policy and returns a TensorDict whose ``loss_*`` entries are
summed for the update and whose other entries are diagnostics (the TorchRL loss convention):

- ``loss_ce``: ``ce_coef`` x next-token cross-entropy on the expert gazes. With ``K`` prediction heads every
  head is trained at every position: head ``k`` at the row of step ``i`` of a frame (the frame's
  last vision token for ``i = -1``) predicts the frame's step ``i + 1 + k``; pairs without a
  target in the same frame are masked. Each head's mean cross-entropy counts equally. ``K = 1``
  is plain next-token prediction.
- ``loss_pred``: ``pred_coef`` x squared error of the loss-prediction head against the frame loss
  recorded after each gaze (``loss_after``); loss head ``k`` at the row of step ``i`` predicts the
  loss after step ``i + k``, all heads trained.
- ``loss_soft`` (``soft_coef > 0``): distillation of the oracle's whole ranking, not only its
  argmax. Expert data labelled with ``--candidate-losses`` holds in ``candidate_loss`` the loss
  after every patch the oracle could have gazed in each state (``RecordingOracle`` records it);
  ``soft_targets`` turns it into a distribution that puts most mass on the best patch and some on
  near-ties, and ``loss_soft`` is ``soft_coef`` x its cross-entropy against each head (the KL
  divergence plus the targets' entropy, a constant), normalised as ``loss_ce`` (per head over the
  same targets, heads counting equally, the same ``bc_totals``). With one-hot targets it equals
  the cross-entropy. On the tiny preset's default run it did not change the held-out loss beyond
  seed noise (the policy there barely uses the clip's content, see ``experiments.train_bc``), so
  it is off by default.

By default the cross-entropy is taken under the distribution generation samples from: patches
already gazed in the frame (the expert's earlier steps, which include the picks of earlier heads
of the same decoding step) and STOP have probability 0 (``mask_gazed``).

STOP slots: the expert data has none (fixed per-frame budgets end every frame), like
``AutoGazePolicy.generate`` with budgets only (``Gazes.to_trajectory`` then has no STOP either).
STOP never comes from the policy's softmax (only from the task-loss stop rule), so STOP steps of a
trajectory are never cross-entropy targets nor loss-prediction targets; they are laid out as
``AutoGazePolicy.score`` lays them out (a slot that later tokens do not see).

``oracle_labels`` relabels any trajectory with the oracle's choice in every state it visits (the
DAgger labels, given to ``bc_loss`` as ``target``, with the soft labels of those states). Two
DAgger trials on the tiny preset (4 rounds of 256 rolled-out clips; 3 rounds of 1024 on the same,
continued policy, hard + soft labels) did not improve the held-out loss, so
``experiments.train_bc`` does not use it yet.

Data-parallel training: ``bc_totals`` counts a batch's targets from its structure alone (no
forward pass); summed over every rank and micro-batch of a step and passed as ``totals``, each
part's loss is its share of the whole batch's loss, so the gradients add up to the single-process
gradient exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tensordict import TensorDict, TensorDictBase

from agents.baselines import GreedyOracle, ViewErrorCache, candidate_losses
from agents.policy import AutoGazePolicy, frame_layout, gazed_before, preprocess
from gaze_env import core
from gaze_env.core import CoreParams
from gaze_env.types import GazeState

__all__ = [
    "BATCH_KEYS",
    "OPTIONAL_KEYS",
    "RecordingOracle",
    "bc_loss",
    "bc_totals",
    "oracle_labels",
    "soft_targets",
    "trim_steps",
]

BATCH_KEYS = ("video", "action", "frame_id", "valid", "loss_after")
"""Entries of an expert batch ``bc_loss`` always reads."""
OPTIONAL_KEYS = ("target", "candidate_loss")
"""Entries it reads when present: DAgger labels, the oracle's candidate losses (soft labels)."""
_STEP_KEYS = ("action", "frame_id", "valid", "loss_after", *OPTIONAL_KEYS)


def trim_steps(batch: TensorDictBase) -> TensorDictBase:
    """Drop the trailing step columns no trajectory of the batch uses (expert data is padded to
    the longest possible clip): ``action`` / ``frame_id`` / ``valid`` / ``loss_after`` (and
    ``target``) (B, L) -> (B, L'), ``candidate_loss`` (B, L, N) -> (B, L', N), with ``L'`` the
    last valid column + 1."""
    valid = batch["valid"]
    used = valid.any(0)
    length = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
    out = batch.select(*BATCH_KEYS, *OPTIONAL_KEYS, strict=False)
    for key in _STEP_KEYS:
        if key in out.keys():
            out[key] = out[key][:, :length]
    return out


def _targets(batch: TensorDictBase, stop_id: int) -> torch.Tensor:
    """(B, L) bool: the steps with a cross-entropy target (valid gazes whose label is a gaze)."""
    action = batch["action"]
    return batch["valid"].bool() & (action != stop_id) & (batch.get("target", action) != stop_id)


def soft_targets(candidate_loss: torch.Tensor, tau: float) -> torch.Tensor:
    """The oracle's soft labels: (..., N) float loss after each candidate patch (+inf: not a
    candidate) -> (..., N) float32 probabilities ``softmax(-(loss - best) / (tau * spread))``,
    0 off the candidates.

    ``spread`` is the median candidate's loss minus the best one's, so the temperature is relative
    to how much the patches differ in this state (a frame's first gazes differ by orders of
    magnitude more than its last ones): a patch ``tau`` spreads worse than the best one weighs
    ``1/e`` as much. ``tau -> 0`` gives the oracle's argmax (split evenly between exact ties).
    Rows without a candidate get all zeros.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    loss = candidate_loss.float()
    ok = torch.isfinite(loss)
    best = loss.masked_fill(~ok, float("inf")).min(-1, keepdim=True).values
    median = loss.masked_fill(~ok, float("nan")).nanmedian(-1, keepdim=True).values
    spread = (median - best).nan_to_num(0.0).clamp(min=1e-8)
    logits = (-(loss - best) / (tau * spread)).masked_fill(~ok, float("-inf"))
    probs = torch.softmax(logits.masked_fill(~ok.any(-1, keepdim=True), 0.0), dim=-1)
    return probs.masked_fill(~ok, 0.0)


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
    ce_coef: float = 1.0,
    soft_coef: float = 0.0,
    soft_tau: float = 0.1,
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
            reached); default ``action``. ``candidate_loss`` (B, L, N) float, needed when
            ``soft_coef > 0``: the frame's loss after each candidate patch in the state before
            each step (+inf: not a candidate), as ``experiments.collect_expert`` stores it.
        pred_coef: weight of ``loss_pred`` (0 turns the loss head's training off).
        mask_gazed: cross-entropy under the masked distribution generation samples from (see the
            module docstring); False: the plain softmax over all ``N + 1`` ids.
        ce_coef: weight of ``loss_ce`` (0: the soft term alone trains the heads; ``ce`` stays a
            diagnostic).
        soft_coef: weight of ``loss_soft``, the cross-entropy against ``soft_targets(
            candidate_loss, soft_tau)`` (0: off, ``candidate_loss`` not needed).
        soft_tau: temperature of the soft targets, relative to each state's spread of candidate
            losses (see ``soft_targets``).
        totals: ``bc_totals`` summed over all parts of a larger batch (ranks, micro-batches):
            the losses are then this part's share of that batch's losses (``loss_ce`` sums the
            per-head means' shares); None: this batch alone.

    Returns:
        TensorDict, batch []: ``loss_ce``, ``loss_pred``, ``loss_soft`` (differentiable; their sum
        is the loss; ``loss_soft`` is 0 when ``soft_coef`` is 0) and detached diagnostics: ``ce``
        (``loss_ce`` unweighted), ``ce_head0``, ``ce_head_last`` (head ``K - 1``), ``acc`` (top-1 accuracy
        of head 0, the next-gaze head, under the same mask), ``acc_head_last``, ``entropy`` (head
        0), ``pred_mse`` (unweighted), ``pred_mae`` (head 0, the loss after the current gaze),
        ``targets`` (gazes scored) and, with the soft term, ``kl`` (the policy's KL divergence
        from the soft targets, heads averaged as in ``loss_soft``, unweighted).
    """
    if min(pred_coef, ce_coef, soft_coef) < 0:
        raise ValueError(f"pred_coef, ce_coef and soft_coef must be >= 0, got {pred_coef}, {ce_coef}, {soft_coef}")
    missing = [k for k in BATCH_KEYS if k not in batch.keys()]
    if missing:
        raise KeyError(f"the expert batch lacks {missing}; it needs {list(BATCH_KEYS)} (experiments.collect_expert)")
    if soft_coef > 0 and "candidate_loss" not in batch.keys():
        raise KeyError("soft_coef > 0 needs the expert batch's 'candidate_loss' (B, L, N): label the data with "
                       "experiments.collect_expert --candidate-losses, or set soft_coef to 0")
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
    has = norm_n > 0

    def head_mean(per_target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, K) per-target losses (0 off target_mask) -> (mean over the heads with targets of
        the per-head means, the per-head means (K,))."""
        per_head = per_target.sum((0, 1)) / norm_n.clamp(min=1)  # (K,)
        return (per_head[has].sum() / has.sum() if bool(has.any()) else out["logits"].sum() * 0.0), per_head

    ce_mean, per_head = head_mean(ce)
    loss_soft, kl = torch.zeros((), device=logits.device), None
    if soft_coef > 0:
        probs = soft_targets(batch["candidate_loss"], soft_tau)  # (B, L, N)
        q = F.pad(probs, (0, V - probs.shape[-1]))[:, :, None, :]  # (B, L, 1, V), STOP gets 0
        logp = F.log_softmax(logits, dim=-1)  # (B, L, K, V)
        q_logp = torch.where(q > 0, q * logp, 0.0)  # 0 log 0 = 0 (banned ids have q = 0)
        soft = (-q_logp.sum(-1)).masked_fill(~target_mask, 0.0)  # (B, L, K)
        if not bool(torch.isfinite(soft).all()):
            raise ValueError("the soft targets put mass on a banned id: candidate_loss does not match the actions")
        loss_soft = soft_coef * head_mean(soft)[0]
        with torch.no_grad():  # KL = cross-entropy - entropy of the targets
            q_logq = torch.where(probs > 0, probs * probs.clamp(min=1e-30).log(), 0.0).sum(-1)  # (B, L)
            kl = head_mean(soft + q_logq[..., None].masked_fill(~target_mask, 0.0))[0]

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
            "ce": ce_mean.detach(),
            "ce_head0": per_head[0].detach(),
            "ce_head_last": per_head[last].detach(),
            "acc": correct[..., 0].sum() / n0,
            "acc_head_last": correct[..., last].sum() / per_head_n[last].clamp(min=1),
            "entropy": (entropy0 * head0).sum() / n0,
            "pred_mse": pred_mse.detach(),
            "pred_mae": err[..., 0].abs().sum() / pred_mask[..., 0].sum().clamp(min=1),
            "targets": head0.sum().float(),
        }
        if kl is not None:
            diagnostics["kl"] = kl
    losses = {"loss_ce": ce_coef * ce_mean, "loss_pred": pred_coef * pred_mse, "loss_soft": loss_soft}
    return TensorDict({**losses, **diagnostics}, batch_size=[])


class RecordingOracle:
    """The greedy oracle, also recording the loss after every valid patch in every state it acts in.

    Rolled out by ``agents.baselines.run_episodes`` (or replayed by ``oracle_labels``), which put
    the action of live row ``b`` at step column ``state.steps[b]``: ``act`` writes that state's
    candidate losses at the same place of ``table`` (B, L, N) float32 (+inf: not a candidate, or
    no step), the soft labels of ``bc_loss``. Without ``max_candidates`` its action is the argmin
    of the recorded losses (``GreedyOracle``'s own rule, lowest index on ties); with it, the
    wrapped oracle draws and scores its candidates itself (every valid patch is still recorded).
    """

    name = "greedy_oracle"

    def __init__(
        self, oracle: GreedyOracle, batch_size: int, length: int, num_patches: int, device: torch.device | str
    ) -> None:
        self.oracle = oracle
        self.table = torch.full((batch_size, length, num_patches), float("inf"), device=device)
        self._cache = ViewErrorCache()

    def act(self, params: CoreParams, state: GazeState, generator: torch.Generator | None) -> torch.Tensor:
        mask = core.action_mask(params, state)  # (B, N + 1)
        N = mask.shape[1] - 1
        losses = candidate_losses(
            params, state, mask[:, :N], method=self.oracle.method, context=self.oracle.context,
            chunk_bytes=self.oracle.chunk_bytes, cache=self._cache,
        )  # (B, N) +inf where not a candidate
        live = (~state.done).nonzero()[:, 0]
        col = state.steps[live]
        if bool((col >= self.table.shape[1]).any()):
            raise ValueError(f"an episode runs past the {self.table.shape[1]} recorded steps")
        self.table[live, col] = losses[live]
        if self.oracle.max_candidates is not None:
            return self.oracle.act(params, state, generator)
        return torch.where(mask[:, :N].any(1), losses.argmin(1), N)


@torch.no_grad()
def content_reliance(policy: AutoGazePolicy, batch: TensorDictBase) -> dict[str, float]:
    """How much ``policy`` reads the video: ``bc_loss``'s cross-entropy on the expert trajectories
    of ``batch`` (at least 2 clips) with each clip's own video (``ce_own_video``) and with the next
    clip's video in its place (``ce_other_video``, the same gazes), and their difference
    (``content_gap``). A gap near 0 means the predictions come from the gaze history and positions
    alone: a content-blind policy, however low its cross-entropy."""
    if batch.batch_size[0] < 2:
        raise ValueError(f"content_reliance needs at least 2 clips to swap videos, got {batch.batch_size[0]}")
    was_training = policy.training
    policy.eval()
    own = float(bc_loss(policy, batch)["ce"])
    swapped = batch.clone(False).set("video", batch["video"].roll(1, 0))
    other = float(bc_loss(policy, swapped)["ce"])
    policy.train(was_training)
    return {"ce_own_video": own, "ce_other_video": other, "content_gap": other - own}


@torch.no_grad()
def oracle_labels(
    params: CoreParams,
    video: torch.Tensor,
    action: torch.Tensor,
    valid: torch.Tensor,
    budgets: torch.Tensor,
    *,
    oracle: GreedyOracle | None = None,
    generator: torch.Generator | None = None,
) -> TensorDict:
    """The oracle's choice in every state a trajectory visits (DAgger's labels).

    Replays ``action`` (B, L) (valid steps first, per-frame ``budgets`` (B, T) it was made
    under) through ``gaze_env.core`` and asks ``oracle`` (default ``GreedyOracle()``) before
    every step what it would gaze there. Behaviour cloning on the expert's own trajectories
    never sees the states a trained policy drifts into (e.g. a frame whose earlier gazes
    re-gazed the previous frame's patches); these labels teach the way back.

    Returns TensorDict [B]: ``target`` (B, L) int64 the oracle's patch (STOP where the step is
    not valid or no patch is left), ``loss_after`` (B, L) float32, the frame's loss after the
    trajectory's own step (NaN at invalid steps), what its loss head should predict, and
    ``candidate_loss`` (B, L, N) float32, the loss after each patch the oracle chose from (+inf
    elsewhere and at invalid steps), the soft labels of ``bc_loss``.
    """
    B, L = action.shape
    STOP = params.config.grid.stop
    recorder = RecordingOracle(oracle if oracle is not None else GreedyOracle(), B, L, STOP, video.device)
    state = core.reset(params, video, generator=generator, budgets=budgets)
    target = torch.full((B, L), STOP, dtype=torch.int64, device=video.device)
    loss_after = torch.full((B, L), float("nan"), device=video.device)
    for step in range(L):
        if bool(state.done.all()):
            break
        live = valid[:, step] & ~state.done
        if bool((state.steps[live] != step).any()):  # the recorder writes at column state.steps
            raise ValueError(f"column {step} of a trajectory is not its episode's step {step}: valid steps come first")
        target[:, step] = torch.where(live, recorder.act(params, state, generator), STOP)
        tr = core.step(params, state, torch.where(live, action[:, step], STOP), validate=False)
        loss_after[:, step] = torch.where(live, tr.loss_after, float("nan"))
    candidate_loss = recorder.table.masked_fill(~valid.bool()[..., None], float("inf"))
    return TensorDict(
        {"target": target, "loss_after": loss_after, "candidate_loss": candidate_loss},
        batch_size=[B],
        device=video.device,
    )
