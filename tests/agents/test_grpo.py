import math
from copy import deepcopy
from dataclasses import replace

import pytest
import torch

from agents.baselines import make_baseline, run_episodes
from agents.grpo import (
    GroupBudgets,
    GRPOConfig,
    aggregate,
    annealed_temperature,
    collect,
    discounted_returns,
    frame_end_steps,
    group_budgets,
    group_relative_advantage,
    grpo_advantage,
    grpo_loss,
    grpo_step,
    grpo_update,
    loss_prediction_loss,
    policy_gradient_loss,
    score_rollouts,
)
from agents.policy import AutoGazePolicy, preprocess
from agents.rollout import RolloutEngine, rollout
from gaze_env.builder import build
from gaze_env.config import budget_for_ratio
from gaze_env.video import moving_object_clip
from tests.conftest import OFFICIAL_PARTS, random_clips


def test_discounted_returns__counts_discount_in_gaze_steps_across_frames():
    # one rollout: frame 0 has gazes at steps 0, 1 (ends there, loss 0.5); frame 1 gazes at 2, 3, 4
    # (ends there, loss 0.2); then two padding steps.
    g = 0.9
    reward = torch.tensor([[0.0, -0.5, 0.0, 0.0, -0.2, 7.0, 7.0]])
    valid = torch.tensor([[True] * 5 + [False] * 2])
    R = discounted_returns(reward, valid, g)
    expected = [
        -0.5 * g + -0.2 * g**4,  # step 0: 1 step to frame 0's last gaze, 4 to frame 1's
        -0.5 + -0.2 * g**3,
        -0.2 * g**2,
        -0.2 * g,
        -0.2,
        0.0,
        0.0,
    ]
    assert torch.allclose(R, torch.tensor([expected]), atol=1e-7)


def test_group_relative_advantage__subtracts_group_mean_per_step_and_masks_padding():
    returns = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 9.0], [10.0, 0.0, 0.0], [20.0, 0.0, 0.0]])
    valid = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0]], dtype=torch.bool)
    adv = group_relative_advantage(returns, valid, group_size=2)
    assert torch.allclose(adv, torch.tensor([[-1.0, -1.0, 0], [1.0, 1.0, 0], [-5.0, 0, 0], [5.0, 0, 0]]))
    adv_std = group_relative_advantage(returns, valid, group_size=2, std_normalize=True)
    assert torch.allclose(adv_std[valid], torch.tensor([-1.0, -1.0, 1.0, 1.0, -1.0, 1.0]), atol=1e-5)
    with pytest.raises(ValueError, match="groups of 3"):
        group_relative_advantage(returns, valid, group_size=3)


def test_aggregate__sum_token_and_sequence_modes():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    valid = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert aggregate(x, valid, "sum").item() == 6.0
    assert aggregate(x, valid, "token").item() == 2.0
    assert aggregate(x, valid, "sequence").item() == pytest.approx((1.5 + 3.0) / 2)


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_policy_gradient_loss__gradient_raises_the_probability_of_positive_advantage(clip_eps):
    # two-action toy: a softmax over logits; action 0 has advantage +1, action 1 has -1
    logits = torch.zeros(2, requires_grad=True)
    actions = torch.tensor([[0], [1]])
    log_prob = torch.log_softmax(logits, 0)[actions]  # (2, 1)
    adv = torch.tensor([[1.0], [-1.0]])
    valid = torch.ones(2, 1, dtype=torch.bool)
    loss = policy_gradient_loss(log_prob, log_prob.detach(), adv, valid, clip_eps=clip_eps)
    assert loss["ratio"].item() == pytest.approx(1.0)
    loss["loss_objective"].backward()
    # gradient descent must increase logit 0 and decrease logit 1
    assert logits.grad[0] < 0 < logits.grad[1]


def test_policy_gradient_loss__clipping_stops_gradient_beyond_the_trust_region():
    log_prob = torch.tensor([[math.log(2.0)]], requires_grad=True)  # ratio 2 vs old prob 1
    loss = policy_gradient_loss(
        log_prob, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool), clip_eps=0.2
    )
    loss["loss_objective"].backward()
    assert log_prob.grad.abs().item() == 0.0 and loss["clip_fraction"].item() == 1.0


def test_policy_gradient_loss__kl_term_is_zero_at_the_reference_and_positive_away():
    valid = torch.ones(1, 3, dtype=torch.bool)
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    same = policy_gradient_loss(lp, lp, torch.zeros(1, 3), valid, ref_log_prob=lp, kl_coef=1.0)
    assert same["loss_kl"].item() == pytest.approx(0.0, abs=1e-7)
    other = policy_gradient_loss(lp, lp, torch.zeros(1, 3), valid, ref_log_prob=lp - 0.3, kl_coef=1.0)
    assert other["loss_kl"].item() > 0


# ---- masking, loss head, schedule ---------------------------------------------------------------
def test_policy_gradient_loss__padding_steps_change_neither_loss_nor_gradient():
    log_prob = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    adv = torch.tensor([[0.5, -0.25, 1e6]])  # the padding step holds garbage
    valid = torch.tensor([[True, True, False]])
    for agg in ("sum", "token", "sequence"):
        loss = policy_gradient_loss(log_prob, log_prob.detach(), adv, valid, aggregation=agg)
        loss["loss_objective"].backward()
        assert log_prob.grad[0, 2].item() == 0.0
        assert loss["advantage_abs"].item() == pytest.approx(0.375)
        log_prob.grad = None
    total = policy_gradient_loss(log_prob, log_prob.detach(), adv, valid, aggregation="sum")["loss_objective"]
    assert total.item() == pytest.approx(-(0.5 - 0.25))


def test_loss_prediction_loss__l2_on_masked_steps_with_the_policy_aggregation():
    pred = torch.tensor([[0.5, 0.2, 9.0]], requires_grad=True)
    actual = torch.tensor([[0.4, 0.4, float("nan")]])  # padding may hold NaN
    mask = torch.tensor([[True, True, False]])
    out = loss_prediction_loss(pred, actual, mask, coef=2.0, aggregation="token")
    assert out["loss_pred"].item() == pytest.approx(2.0 * (0.01 + 0.04) / 2)
    assert out["loss_pred_abs_err"].item() == pytest.approx(0.15)
    out["loss_pred"].backward()
    assert pred.grad[0, 0] > 0 > pred.grad[0, 1] and pred.grad[0, 2] == 0


def test_frame_end_steps__marks_the_last_valid_step_of_every_frame():
    frame_id = torch.tensor([[0, 0, 1, 1, 1, 2, 0, 0]])
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert frame_end_steps(frame_id, valid).tolist() == [[False, True, False, False, True, True, False, False]]


def test_annealed_temperature__geometric_from_start_to_end():
    assert annealed_temperature(0.0, 3.0, 0.3) == pytest.approx(3.0)
    assert annealed_temperature(0.5, 3.0, 0.3) == pytest.approx(math.sqrt(3.0 * 0.3))
    assert annealed_temperature(2.0, 3.0, 0.3) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="temperatures"):
        annealed_temperature(0.5, 0.0, 1.0)


def test_grpo__group_advantage_gradient_raises_the_better_rollouts_action():
    # two-action toy, one group of 4 rollouts of one step: action 0 returns 1, action 1 returns 0
    logits = torch.zeros(2, requires_grad=True)
    actions = torch.tensor([[0], [1], [0], [1]])
    valid = torch.ones(4, 1, dtype=torch.bool)
    reward = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    adv = group_relative_advantage(discounted_returns(reward, valid, 0.995), valid, group_size=4)
    assert adv[:, 0].tolist() == [0.5, -0.5, 0.5, -0.5]
    log_prob = torch.log_softmax(logits, 0)[actions]
    policy_gradient_loss(log_prob, log_prob.detach(), adv, valid)["loss_objective"].backward()
    assert logits.grad[0] < 0 < logits.grad[1]  # descent raises p(action 0)


# ---- groups of rollouts -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    built = build("tiny", videos=random_clips(1), reward_frame_rate=0.25, gazing_ratio=0.05)
    return built, AutoGazePolicy.from_preset("tiny"), random_clips(2, seed=3)


def test_group_budgets__threshold_counts_come_from_the_greedy_task_loss_rollout(tiny):
    built, policy, video = tiny
    spec = GroupBudgets(mode="threshold", task_loss_requirement=0.0, max_ratio=0.1)
    # an untrained loss head predicts losses far from 0 on both sides: count what generate does
    counts = group_budgets(policy, built.params, video, spec)
    N = built.config.grid.num_patches
    gazes = policy.generate(preprocess(video), frame_budgets=budget_for_ratio(0.1, N), task_loss_requirement=0.0)
    assert torch.equal(counts, gazes.num_gazes.clamp(min=1))
    assert counts.shape == (2, 8) and int(counts.max()) <= budget_for_ratio(0.1, N)
    stop_all = group_budgets(policy, built.params, video, replace(spec, task_loss_requirement=1e9))
    assert bool((stop_all == 1).all())  # a requirement every prediction meets: one gaze per frame


def test_group_budgets__sampled_are_seeded_and_fixed_follow_the_config(tiny):
    built, policy, video = tiny
    spec = GroupBudgets(mode="sampled")
    a = group_budgets(policy, built.params, video, spec, torch.Generator().manual_seed(1))
    b = group_budgets(policy, built.params, video, spec, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and bool((a >= 1).all()) and bool((a <= 84).all())
    ratio = a.sum(1).float() / (8 * 84)
    assert bool((ratio > 0.01).all()) and bool((ratio < 0.21).all())
    fixed = group_budgets(policy, built.params, video, GroupBudgets(mode="fixed"))
    assert fixed.tolist() == [list(built.config.budgets)] * 2
    with pytest.raises(ValueError, match="Generator"):
        group_budgets(policy, built.params, video, spec)


def test_collect__a_group_shares_its_gaze_counts_and_reward_frames(tiny):
    built, policy, video = tiny
    budgets = torch.tensor([[3, 1, 2, 1, 1, 2, 1, 1], [2, 2, 2, 2, 1, 1, 1, 1]])
    batch = collect(policy, built.params, built.reward, video, budgets, 3, temperature=1.0,
                    generator=torch.Generator().manual_seed(0))
    assert batch.batch_size == torch.Size([6])
    per_frame = torch.zeros(6, 8, dtype=torch.int64).scatter_add_(
        1, torch.where(batch["valid"], batch["frame_id"], 0), batch["valid"].long()
    )
    assert torch.equal(per_frame, budgets.repeat_interleave(3, 0))
    scored = batch["scored"].view(2, 3, 8)
    assert bool((scored == scored[:, :1]).all()) and scored.sum(-1).eq(2).all()  # 0.25 of 8 frames
    assert not torch.equal(scored[0, 0], torch.ones(8, dtype=torch.bool))
    # the frame reward pays -loss exactly on the scored frames
    assert torch.allclose(batch["reward"].sum(1), -(batch["frame_loss"] * batch["scored"]).sum(1), atol=1e-6)
    assert batch["action"].view(2, 3, -1).unique(dim=1).shape[1] > 1  # sampled rollouts differ


def _fixed_batch(tiny, seed=0):
    built, policy, video = tiny
    cfg = GRPOConfig(group_size=4, budgets=GroupBudgets(mode="fixed"))
    batch = collect(policy, built.params, built.reward, video, group_budgets(policy, built.params, video, cfg.budgets),
                    cfg.group_size, temperature=1.0, generator=torch.Generator().manual_seed(seed))
    return cfg, grpo_advantage(batch, cfg)


def _total(td) -> float:
    return float((td["loss_objective"] + td["loss_pred"]).detach())


def test_grpo_update__changes_parameters_and_lowers_the_loss_on_a_fixed_batch(tiny):
    _, policy0, _ = tiny
    cfg, batch = _fixed_batch(tiny)
    assert torch.allclose(batch["advantage"].view(2, 4, -1).sum(1), torch.zeros(1), atol=1e-6)
    before = grpo_loss(policy0, batch, cfg)
    assert before["ratio"].item() == pytest.approx(1.0, abs=1e-4)  # on-policy: generation = scoring
    assert before["loss_objective"].item() == pytest.approx(0.0, abs=1e-4)  # advantages sum to 0 per step
    for coef in (0.0, 1.0):  # the policy gradient alone, then with the loss head's L2
        policy = deepcopy(policy0)
        cfg_c = replace(cfg, loss_pred_coef=coef)
        opt = torch.optim.SGD(policy.parameters(), lr=0.02)  # a small step along the clipped gradient
        out = grpo_update(policy, opt, batch, cfg_c)
        assert {"loss_objective", "loss_pred", "grad_norm", "entropy"} <= set(out.keys())
        assert any(not torch.equal(a, b) for a, b in zip(policy0.parameters(), policy.parameters()))
        after = grpo_loss(policy, batch, cfg_c)
        assert _total(after) < _total(grpo_loss(policy0, batch, cfg_c)) - 1e-4
        if coef == 0:
            assert after["loss_objective"] < before["loss_objective"] - 1e-3


def test_grpo_update__micro_batches_give_the_same_update(tiny):
    _, policy0, _ = tiny
    cfg, batch = _fixed_batch(tiny, seed=1)
    updated = []
    for micro in (None, 3):
        policy = deepcopy(policy0)
        opt = torch.optim.SGD(policy.parameters(), lr=1e-3)
        out = grpo_update(policy, opt, batch, replace(cfg, micro_batch=micro))
        updated.append((torch.nn.utils.parameters_to_vector(policy.parameters()), out))
    (p_all, out_all), (p_micro, out_micro) = updated
    assert torch.allclose(p_all, p_micro, atol=1e-6)
    for k in ("loss_objective", "loss_pred", "ratio", "entropy"):
        assert out_all[k].item() == pytest.approx(out_micro[k].item(), rel=1e-4, abs=1e-6)


def test_grpo_step__reports_losses_diagnostics_and_timings(tiny):
    built, policy0, video = tiny
    policy = deepcopy(policy0)
    cfg = GRPOConfig(group_size=2, budgets=GroupBudgets(mode="fixed"), kl_coef=0.1)
    out = grpo_step(policy, torch.optim.Adam(policy.parameters(), lr=1e-4), built.params, built.reward, video, cfg,
                    temperature=2.0, generator=torch.Generator().manual_seed(0), ref_policy=policy0)
    for k in ("loss_objective", "loss_pred", "loss_kl", "frame_loss", "gazing_ratio", "episode_return",
              "time_generate", "time_replay", "time_update"):
        assert torch.isfinite(out[k]), k
    assert out["episodes"].item() == 4 and out["temperature"].item() == 2.0
    assert out["gazing_ratio"].item() == pytest.approx(4 / 84)
    with pytest.raises(ValueError, match="clip_eps"):
        GRPOConfig(epochs=2)
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)


@pytest.mark.parametrize("ours", [False, True])
def test_score_rollouts__one_encoding_per_clip_gives_the_per_rollout_scores_and_gradients(tiny, ours):
    torch.manual_seed(0)  # the official architecture shares a clip's encoding; ours (canvas input) cannot
    policy0 = tiny[1] if ours else AutoGazePolicy.from_preset("tiny", **OFFICIAL_PARTS)
    _, batch = _fixed_batch(tiny, seed=2)
    assert batch["clip"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    grads = []
    for shared in (False, True):
        policy = deepcopy(policy0)
        td = batch if shared else batch.exclude("clip")
        part = td[torch.tensor([5, 0, 6, 1])]  # a micro-batch: clips interleaved, not in order
        out = score_rollouts(policy, part, 1.0)
        (out["log_prob"].sum() + out["loss_pred"].sum()).backward()
        grads.append((out, torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])))
    (plain, g_plain), (shared, g_shared) = grads
    for key in ("log_prob", "loss_pred", "entropy"):
        torch.testing.assert_close(shared[key], plain[key], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_shared, g_plain, atol=1e-4, rtol=1e-4)


def test_grpo_loss__under_bf16_autocast_is_the_float32_loss_up_to_rounding(tiny):
    policy = deepcopy(tiny[1])
    cfg, batch = _fixed_batch(tiny, seed=3)
    full = grpo_loss(policy, batch, cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what --amp does on CUDA
        half = grpo_loss(policy, batch, cfg)
    (half["loss_objective"] + half["loss_pred"]).backward()
    assert half["ratio"].item() == pytest.approx(1.0, abs=0.02)
    assert half["loss_pred"].item() == pytest.approx(full["loss_pred"].item(), rel=0.05)
    assert all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)


def test_discounted_returns__blocks_equal_the_step_by_step_recursion():
    g = torch.Generator().manual_seed(0)
    for L, gamma in ((1, 0.9), (31, 0.995), (64, 1.0), (417, 0.995)):
        reward = torch.randn(4, L, generator=g)
        valid = torch.rand(4, L, generator=g) < 0.9  # gaps end runs, as the recursion's reset does
        valid[1, L // 2 :] = False
        expected = torch.zeros(4, L, dtype=torch.float64)
        running = torch.zeros(4, dtype=torch.float64)
        for l in range(L - 1, -1, -1):
            running = torch.where(valid[:, l], reward[:, l].double() + gamma * running, 0.0)
            expected[:, l] = running
        for chunk in (1, 5, 32):
            torch.testing.assert_close(discounted_returns(reward, valid, gamma, chunk).double(), expected,
                                       atol=2e-6, rtol=1e-6)


def test_grpo_step__static_engine_rollouts_train_like_the_reference(tiny):
    built, policy0, video = tiny
    cfg = GRPOConfig(group_size=3, budgets=GroupBudgets(mode="threshold", task_loss_requirement=0.0, max_ratio=0.1))
    engine = RolloutEngine("static")
    policy = deepcopy(policy0)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    counts = group_budgets(policy, built.params, video, cfg.budgets, engine=engine)
    assert torch.equal(counts, group_budgets(policy, built.params, video, cfg.budgets))  # greedy: same counts
    for _ in range(2):  # the engines are kept and reused
        out = grpo_step(policy, opt, built.params, built.reward, video, cfg, temperature=1.0, generator=g,
                        engine=engine)
        assert torch.isfinite(out["loss_objective"]) and out["ratio"].item() == pytest.approx(1.0, abs=1e-4)
    # greedy engines for the threshold counts, sampling ones per power-of-two gaze cap
    assert {key[-1] for key in engine._engines} == {False, True} and len(engine._engines) <= 4


# ---- learning -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_grpo__learns_to_gaze_the_moving_object_from_scratch():
    """One sprite moving over a static background, 3 gazes per frame: GRPO from a fresh policy
    must beat its untrained self and random gazes clearly (the background carries over on the
    paste canvas, so the gazes that pay are the ones on the sprite)."""
    torch.set_num_threads(1)
    T, S, budget = 8, 64, 3
    train = torch.stack([moving_object_clip(T, S, seed=i) for i in range(32)])
    test = torch.stack([moving_object_clip(T, S, seed=1000 + i) for i in range(8)])
    built = build("tiny", frame_budgets=[budget] * T)
    torch.manual_seed(0)
    policy = AutoGazePolicy.from_preset("tiny")

    def greedy_loss() -> float:
        return float(rollout(policy, built.params, built.reward, test, temperature=0.0)["frame_loss"].mean())

    untrained = greedy_loss()
    random_loss = float(run_episodes(make_baseline("random"), built.params, test, seed=0)["frame_loss"].mean())
    cfg = GRPOConfig(group_size=8, aggregation="token", budgets=GroupBudgets(mode="fixed"), loss_pred_coef=0.0)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        clips = train[torch.randint(0, len(train), (4,), generator=g)]
        grpo_step(policy, opt, built.params, built.reward, clips, cfg, temperature=1.0, generator=g)
    trained = greedy_loss()
    assert trained < 0.8 * random_loss < 0.8 * untrained, (trained, random_loss, untrained)
