import math

import pytest
import torch
from tensordict import TensorDict

from agents.baselines import GreedyOracle, RasterGazer, run_episodes
from agents.bc import RecordingOracle, bc_loss, bc_totals, content_reliance, oracle_labels, soft_targets, trim_steps
from agents.policy import AutoGazePolicy, gazed_before, preprocess
from gaze_env.builder import build
from tests.conftest import random_clips


def expert_batch(n: int = 3, seed: int = 0):
    """Greedy-oracle trajectories of ``n`` random tiny clips with ragged per-frame budgets, with the
    candidates' losses (``candidate_loss``) as ``experiments.collect_expert`` records them."""
    params = build("tiny", videos=random_clips(1)).params
    budgets = torch.tensor([6, 3, 2, 4, 1, 2, 3, 5])[None].expand(n, -1).clone()
    budgets[1:, 0] += torch.arange(1, n)  # clips of different lengths: padding in the batch
    pad = 5  # padding columns as the expert data set stores them
    oracle = RecordingOracle(GreedyOracle(), n, int(budgets.sum(1).max()) + pad, 84, "cpu")
    td = run_episodes(oracle, params, random_clips(n, seed=seed), budgets)
    for key, value in (("action", 84), ("valid", False), ("frame_id", 8), ("loss_after", float("nan"))):
        td[key] = torch.cat([td[key], torch.full((n, pad), value, dtype=td[key].dtype)], 1)
    td["candidate_loss"] = oracle.table
    return td


def one_hot_candidates(batch):
    """``candidate_loss`` whose only candidate at each step is the expert's own action."""
    cand = torch.full(batch["candidate_loss"].shape, float("inf"))
    valid = batch["valid"]
    cand[valid] = cand[valid].scatter(-1, batch["action"][valid][:, None], 0.5)
    return batch.clone().set("candidate_loss", cand)


def test_bc_loss__finite_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    policy = AutoGazePolicy.from_preset("tiny", num_multi_token_pred=3)
    out = bc_loss(policy, expert_batch())
    assert set(out.keys()) >= {"loss_ce", "loss_pred", "acc", "entropy", "pred_mae"}
    loss = out["loss_ce"] + out["loss_pred"]
    assert torch.isfinite(loss) and out["loss_ce"] > 0 and out["loss_pred"] > 0
    loss.backward()
    for name, p in policy.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if "embed_tokens" not in name:  # rows of ids never fed get no gradient; the others must
            assert p.grad.abs().sum() > 0, name
    # every head of the lm head and of the loss head is trained
    K, V = 3, 85
    g = policy.gazing_model.gaze_decoder.lm_head.weight.grad.view(K, V, -1)
    assert bool((g.abs().sum((1, 2)) > 0).all())
    assert bool((policy.gazing_model.gaze_decoder.task_loss_prediction_head.weight.grad.abs().sum(1) > 0).all())
    # diagnostics are detached
    assert not out["acc"].requires_grad and not out["ce_head0"].requires_grad


def test_bc_loss__parts_normalised_by_bc_totals_add_up_to_the_whole_batch():
    torch.manual_seed(2)
    policy = AutoGazePolicy.from_preset("tiny", num_multi_token_pred=3)
    batch = expert_batch(n=4, seed=5)
    K, STOP = 3, policy.config.stop_id
    whole = bc_loss(policy, batch, soft_coef=0.5)
    assert int(bc_totals(batch, K, STOP)["ce"][0]) == int(whole["targets"])  # head 0's count, counted twice
    (whole["loss_ce"] + whole["loss_pred"] + whole["loss_soft"]).backward()
    reference = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad()
    parts = [batch[:1], batch[1:3], batch[3:]]  # uneven parts: a plain mean of their means would differ
    totals = {k: sum(bc_totals(b, K, STOP)[k] for b in parts) for k in ("ce", "pred")}
    ce = pred = soft = 0.0
    for b in parts:
        out = bc_loss(policy, b, totals=totals, soft_coef=0.5)
        (out["loss_ce"] + out["loss_pred"] + out["loss_soft"]).backward()
        ce, pred = ce + out["loss_ce"].detach(), pred + out["loss_pred"].detach()
        soft = soft + out["loss_soft"].detach()
    assert torch.allclose(ce, whole["loss_ce"], atol=1e-6) and torch.allclose(pred, whole["loss_pred"], atol=1e-7)
    assert torch.allclose(soft, whole["loss_soft"], atol=1e-6) and whole["loss_soft"] > 0
    for name, p in policy.named_parameters():
        if name in reference:
            assert torch.allclose(p.grad, reference[name], atol=1e-6, rtol=1e-4), name
    plain = sum(bc_loss(policy, b)["loss_ce"] for b in parts) / 3
    assert not torch.allclose(plain, whole["loss_ce"], atol=1e-4)  # the normalisers matter


@pytest.mark.parametrize("mask_gazed", [True, False])
def test_bc_loss__with_one_head_is_the_next_token_nll_that_score_gives(mask_gazed):
    torch.manual_seed(1)
    policy = AutoGazePolicy.from_preset("tiny")
    batch = expert_batch()
    out = bc_loss(policy, batch, mask_gazed=mask_gazed)
    scored = policy.score(preprocess(batch["video"]), batch["action"], batch["frame_id"], batch["valid"],
                          masked=mask_gazed)
    valid = batch["valid"]
    assert torch.allclose(out["loss_ce"], -scored["log_prob"][valid].mean(), atol=1e-5)
    # the loss head: squared error against the recorded loss after each gaze
    mse = (scored["loss_pred"][valid] - batch["loss_after"][valid]).pow(2).mean()
    assert torch.allclose(out["loss_pred"], mse, atol=1e-6)
    assert torch.allclose(bc_loss(policy, batch, pred_coef=0.25)["loss_pred"], 0.25 * mse, atol=1e-6)


def test_bc_loss__head_k_is_scored_against_the_gaze_k_plus_1_steps_ahead_as_generation_reads_it():
    torch.manual_seed(2)
    K = 3
    policy = AutoGazePolicy.from_preset("tiny", num_multi_token_pred=K).eval()
    video = random_clips(2, seed=4)
    gazes = policy.generate(preprocess(video), frame_budgets=torch.tensor([7, 3, 2, 4, 1, 5, 3, 8]),
                            return_logits=True)
    traj = gazes.to_trajectory()
    mt = policy.multi_token_outputs(preprocess(video), traj["action"], traj["frame_id"], traj["valid"])
    # generation reads head (rank % K) for the slot of rank `rank`: the teacher-forced head agrees
    rank = torch.cat([torch.arange(int(b)) for b in [7, 3, 2, 4, 1, 5, 3, 8]])
    head = (rank % K)[None, :, None, None].expand(2, -1, 1, mt["logits"].shape[-1])
    emitted = gazes.logits[gazes.emitted].view(2, -1, gazes.logits.shape[-1])  # (B, L, V) in slot order
    assert torch.allclose(mt["logits"].gather(2, head)[:, :, 0], emitted, atol=1e-4)
    # a target for head k exists from the step of rank k on: k + 1 steps after the frame's vision row
    assert torch.equal(mt["logits_valid"][0], rank[:, None] >= torch.arange(K))
    # every (step, head) pair with a target is counted once
    batch = TensorDict({"video": video, "loss_after": torch.zeros(traj.shape),
                        **{k: traj[k] for k in ("action", "frame_id", "valid")}}, batch_size=[2])
    out = bc_loss(policy, batch)
    assert out["targets"] == traj["valid"].sum()


def test_bc_loss__padding_columns_and_their_content_do_not_matter():
    torch.manual_seed(3)
    policy = AutoGazePolicy.from_preset("tiny", num_multi_token_pred=2)
    batch = expert_batch()
    trimmed = trim_steps(batch)
    assert trimmed["action"].shape[1] == int(batch["valid"].sum(1).max())
    other = batch.clone()
    pad = ~other["valid"]
    other["action"][pad] = 7
    other["frame_id"][pad] = 0
    other["loss_after"][pad] = 123.0
    a, b = bc_loss(policy, batch), bc_loss(policy, other)
    for key in ("loss_ce", "loss_pred", "acc"):
        assert torch.allclose(a[key], b[key]), key


def test_soft_targets__argmax_in_the_cold_limit_ties_shared_zero_off_candidates():
    inf = float("inf")
    loss = torch.tensor([[0.30, 0.10, inf, 0.20, 0.50], [0.2, 0.2, 0.4, inf, inf], [inf] * 5])
    cold = soft_targets(loss, 1e-4)
    assert torch.allclose(cold[0], torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))
    assert torch.allclose(cold[1], torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0]))  # exact ties split evenly
    assert torch.equal(cold[2], torch.zeros(5))  # no candidate: no target
    warm = soft_targets(loss, 0.5)
    assert torch.allclose(warm[:2].sum(-1), torch.ones(2)) and warm[0, 2] == 0 and warm[1, 3:].eq(0).all()
    assert warm[0, 1] > warm[0, 3] > warm[0, 0] > warm[0, 4] > 0  # lower loss, more mass
    # the temperature is relative to the state's spread: shifting and scaling the losses changes nothing
    assert torch.allclose(soft_targets(3.0 + 0.01 * loss, 0.5), warm, atol=1e-5)
    # a patch tau spreads (median - best) worse than the best weighs 1/e as much
    row = torch.tensor([0.1, 0.2, 0.3])  # spread 0.1
    assert torch.allclose(soft_targets(row, 1.0)[1] / soft_targets(row, 1.0)[0], torch.tensor(math.exp(-1.0)))
    with pytest.raises(ValueError, match="tau"):
        soft_targets(loss, 0.0)


def test_bc_loss__soft_term_equals_the_cross_entropy_for_one_hot_targets():
    torch.manual_seed(4)
    policy = AutoGazePolicy.from_preset("tiny", num_multi_token_pred=2)
    batch = one_hot_candidates(expert_batch())
    for mask_gazed in (True, False):
        out = bc_loss(policy, batch, soft_coef=0.3, mask_gazed=mask_gazed)
        assert torch.allclose(out["loss_soft"], 0.3 * out["loss_ce"], atol=1e-6)
        assert abs(float(out["kl"]) - float(out["loss_ce"].detach())) < 1e-5  # one-hot targets: no entropy
    plain = bc_loss(policy, batch, mask_gazed=False)
    assert plain["loss_soft"] == 0 and "kl" not in plain.keys()
    assert torch.allclose(plain["loss_ce"], out["loss_ce"])  # the soft term leaves the others alone


def test_bc_loss__soft_gradient_is_policy_minus_targets_on_every_target_row():
    torch.manual_seed(5)
    policy = AutoGazePolicy.from_preset("tiny")
    batch = expert_batch()
    captured = {}
    outputs = policy.multi_token_outputs

    def capture(*args):
        td = outputs(*args)
        td["logits"].retain_grad()
        captured["logits"] = td["logits"]
        return td

    policy.multi_token_outputs = capture
    out = bc_loss(policy, batch, soft_coef=1.0, soft_tau=0.2)
    out["loss_soft"].backward()
    logits, valid = captured["logits"].detach()[:, :, 0], batch["valid"][:, : captured["logits"].shape[1]]
    banned = gazed_before(batch["action"], batch["frame_id"], batch["valid"], 8, 85)[:, : logits.shape[1]]
    banned[..., 84] = True
    p = torch.softmax(logits.masked_fill(banned, float("-inf")), -1)  # (B, L, V)
    q = torch.nn.functional.pad(soft_targets(batch["candidate_loss"][:, : logits.shape[1]], 0.2), (0, 1))
    expected = ((p - q) / valid.sum())[valid]
    grad = captured["logits"].grad[:, :, 0][valid]
    assert torch.allclose(grad, expected, atol=1e-7)
    # descending it moves probability towards the patches the oracle ranks high
    qv, pv = q[valid], p[valid]
    assert bool((grad[qv > pv + 1e-3] < 0).all()) and bool((grad[(qv == 0) & (pv > 0)] > 0).all())
    kl = (qv * (qv.clamp(min=1e-30).log() - pv.clamp(min=1e-30).log())).sum(-1).mean()
    assert torch.isclose(out["kl"], kl, atol=1e-5)


def test_bc_loss__soft_term_needs_candidate_losses_matching_the_actions():
    policy = AutoGazePolicy.from_preset("tiny")
    batch = expert_batch(2)
    with pytest.raises(KeyError, match="candidate_loss"):
        bc_loss(policy, batch.exclude("candidate_loss"), soft_coef=1.0)
    assert bc_loss(policy, batch.exclude("candidate_loss"))["loss_soft"] == 0  # not needed without the term
    bad = batch.clone()
    bad["candidate_loss"][:, 1] = 0.0  # every patch a candidate, also the one gazed at step 0
    with pytest.raises(ValueError, match="banned"):
        bc_loss(policy, bad, soft_coef=1.0)


def test_bc_loss__rejects_a_float_video_and_missing_keys():
    policy = AutoGazePolicy.from_preset("tiny")
    batch = expert_batch(2)
    with pytest.raises(TypeError, match="uint8"):
        bc_loss(policy, batch.clone().set("video", batch["video"].float()))
    with pytest.raises(KeyError, match="loss_after"):
        bc_loss(policy, batch.exclude("loss_after"))


@pytest.mark.slow
def test_bc_training__overfits_a_handful_of_expert_trajectories():
    torch.manual_seed(0)
    batch = expert_batch(4, seed=7)
    policy = AutoGazePolicy.from_preset("tiny", encoder_patch_size=16)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    for _ in range(120):
        out = bc_loss(policy, batch)
        optimizer.zero_grad()
        (out["loss_ce"] + out["loss_pred"]).backward()
        optimizer.step()
    policy.eval()
    with torch.no_grad():
        final = bc_loss(policy, batch)
    assert final["acc"] > 0.97, float(final["acc"])
    assert final["loss_ce"] < 0.3
    # and greedy generation under the same budgets replays the expert
    gazes = policy.generate(preprocess(batch["video"]), frame_budgets=batch["budgets"]).to_trajectory()
    L = gazes.shape[1]
    same = (gazes["action"] == batch["action"][:, :L]) & gazes["valid"]
    assert same.sum() / gazes["valid"].sum() > 0.9


def test_oracle_labels__on_the_oracles_own_trajectories_are_its_actions_and_steer_other_ones():
    batch = expert_batch(2)
    params = build("tiny", videos=random_clips(1)).params
    labels = oracle_labels(params, batch["video"], batch["action"], batch["valid"], batch["budgets"])
    valid = batch["valid"]
    assert torch.equal(labels["target"][valid], batch["action"][valid])
    assert torch.allclose(labels["loss_after"][valid], batch["loss_after"][valid])
    L = batch["valid"].shape[1]
    assert torch.equal(labels["candidate_loss"], batch["candidate_loss"][:, :L])  # what collect_expert records
    assert bool((labels["target"][~valid] == 84).all()) and bool(labels["loss_after"][~valid].isnan().all())
    # a raster trajectory: the labels are the oracle's patches in the raster's states, never a gazed one
    raster = run_episodes(RasterGazer(), params, batch["video"], batch["budgets"])
    relabel = oracle_labels(params, raster["video"], raster["action"], raster["valid"], batch["budgets"])
    v = raster["valid"]
    assert not torch.equal(relabel["target"][v], raster["action"][v])
    banned = gazed_before(raster["action"], raster["frame_id"], v, 8, 85)
    assert not bool(banned.gather(-1, relabel["target"][..., None])[..., 0][v].any())
    # the soft labels in those states: the oracle's argmin, never on a gazed patch
    cand = relabel["candidate_loss"]
    assert torch.equal(cand[v].argmin(-1), relabel["target"][v]) and bool(torch.isinf(cand[~v]).all())
    assert not bool(torch.isfinite(cand[..., :84])[banned[..., :84]].any())
    # bc_loss scores those labels on the raster's inputs
    policy = AutoGazePolicy.from_preset("tiny")
    plain, relabelled = bc_loss(policy, raster), bc_loss(policy, raster.clone().update(relabel))
    assert not torch.allclose(plain["loss_ce"], relabelled["loss_ce"])
    assert torch.allclose(bc_loss(policy, raster.clone().set("target", raster["action"]))["loss_ce"], plain["loss_ce"])


def test_content_reliance__zero_gap_for_a_policy_blind_to_the_video_and_not_for_a_seeing_one():
    batch = expert_batch(3)
    policy = AutoGazePolicy.from_preset("tiny")
    seeing = content_reliance(policy, batch)
    assert policy.training  # left as it was
    assert seeing["content_gap"] == seeing["ce_other_video"] - seeing["ce_own_video"] != 0.0
    assert seeing["ce_own_video"] == pytest.approx(float(bc_loss(policy.eval(), batch)["ce"]))
    with torch.no_grad():  # the vision tokens no longer depend on the frames
        policy.gazing_model.vision_model.out_proj.weight.zero_()
    blind = content_reliance(policy, batch)
    assert blind["content_gap"] == 0.0
    with pytest.raises(ValueError, match="at least 2 clips"):
        content_reliance(policy, batch[:1])
