"""PPO: GAE over gaze steps, the value head, ClipPPOLoss over teacher-forced scores."""

from copy import deepcopy

import pytest
import torch
from tensordict import TensorDict

from agents.grpo import GroupBudgets, collect, group_budgets
from agents.policy import AutoGazePolicy, preprocess
from agents.ppo import PPOConfig, gae, make_loss_module, ppo_loss, ppo_step, with_value_head
from gaze_env.builder import build
from tests.conftest import random_clips


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    built = build("tiny", videos=random_clips(1), gazing_ratio=0.05)
    return built, with_value_head(AutoGazePolicy.from_preset("tiny")), random_clips(2, seed=4)


def test_gae__matches_hand_computed_values_and_masks_padding():
    g, lam = 0.9, 0.5
    reward = torch.tensor([[0.0, -1.0, -2.0, 5.0]])
    value = torch.tensor([[0.5, 0.25, -1.0, 7.0]])
    valid = torch.tensor([[True, True, True, False]])  # the last step is padding
    adv, target = gae(TensorDict({"reward": reward, "value": value, "valid": valid}, [1]), g, lam)
    d2 = -2.0 - (-1.0)  # last valid step: no bootstrap
    d1 = -1.0 + g * -1.0 - 0.25
    d0 = 0.0 + g * 0.25 - 0.5
    a2, a1 = d2, d1 + g * lam * d2
    a0 = d0 + g * lam * a1
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2, 0.0]]), atol=1e-6)
    assert torch.allclose(target, torch.tensor([[a0 + 0.5, a1 + 0.25, a2 - 1.0, 0.0]]), atol=1e-6)


def test_with_value_head__copies_the_policy_and_adds_a_fresh_head():
    torch.manual_seed(1)
    base = AutoGazePolicy.from_preset("tiny")
    policy = with_value_head(base)
    assert base.value_head is None and policy.value_head is not None and with_value_head(policy) is policy
    video = preprocess(random_clips(1))
    action = torch.tensor([[3, 7, 1, 2]])
    frame_id = torch.tensor([[0, 0, 1, 1]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    a, b = base.score(video, action, frame_id, valid), policy.score(video, action, frame_id, valid)
    assert torch.equal(a["log_prob"], b["log_prob"]) and torch.equal(a["loss_pred"], b["loss_pred"])
    assert "value" in b.keys() and b["value"].abs().max() < 1.0


def test_clip_ppo_loss__gradients_raise_good_actions_and_pull_values_to_targets():
    # two-action toy on the flat step layout ppo_loss hands to ClipPPOLoss
    logits = torch.zeros(2, 2, requires_grad=True)  # one row per step
    value = torch.zeros(2, 1, requires_grad=True)
    steps = TensorDict(
        {
            "logits": logits,
            "action": torch.tensor([0, 1]),
            "action_log_prob": torch.log(torch.tensor([0.5, 0.5])),
            "advantage": torch.tensor([[1.0], [-1.0]]),
            "value_target": torch.tensor([[1.0], [-1.0]]),
            "state_value": value,
        },
        batch_size=[2],
    )
    out = make_loss_module(PPOConfig(normalize_advantage=False))(steps)
    assert out["mean_ratio"].item() == pytest.approx(1.0)
    (out["loss_objective"] + out["loss_critic"]).backward()
    assert logits.grad[0, 0] < 0 < logits.grad[0, 1]  # step 0: action 0 had advantage +1
    assert logits.grad[1, 1] > 0 > logits.grad[1, 0]  # step 1: action 1 had advantage -1
    assert value.grad[0, 0] < 0 < value.grad[1, 0]  # values move towards their targets


def _batch(tiny, cfg):
    built, policy, video = tiny
    budgets = group_budgets(policy, built.params, video, cfg.budgets)
    batch = collect(policy, built.params, built.reward, video, budgets, cfg.group_size, temperature=1.0,
                    generator=torch.Generator().manual_seed(0))
    batch["advantage"], batch["value_target"] = gae(batch, cfg.gamma, cfg.gae_lambda)
    return batch


def test_ppo_loss__flat_distribution_reproduces_the_rollout_log_probs(tiny):
    _, policy, _ = tiny
    cfg = PPOConfig(group_size=2, budgets=GroupBudgets(mode="fixed"))
    batch = _batch(tiny, cfg)
    assert "value" in batch.keys()
    out = ppo_loss(policy, batch, cfg, make_loss_module(cfg))
    assert out["mean_ratio"].item() == pytest.approx(1.0, abs=1e-4)
    assert out["max_ratio"].item() == pytest.approx(1.0, abs=1e-3)
    assert out["kl_approx"].abs().item() < 1e-5
    for k in ("loss_objective", "loss_critic", "loss_pred"):
        assert torch.isfinite(out[k]) and out[k].requires_grad, k


def test_ppo_step__updates_and_lowers_the_value_loss(tiny):
    built, policy0, video = tiny
    policy = deepcopy(policy0)
    cfg = PPOConfig(group_size=2, minibatches=2, epochs=2, budgets=GroupBudgets(mode="fixed"))
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    out = ppo_step(policy, opt, built.params, built.reward, video, cfg, temperature=1.0,
                   generator=torch.Generator().manual_seed(0))
    for k in ("loss_objective", "loss_critic", "loss_pred", "clip_fraction", "frame_loss", "time_update"):
        assert torch.isfinite(out[k]), k
    assert any(not torch.equal(a, b) for a, b in zip(policy0.parameters(), policy.parameters()))
    batch = _batch(tiny, cfg)
    module = make_loss_module(cfg)
    before = ppo_loss(policy, batch, cfg, module)["loss_critic"].item()
    critic_opt = torch.optim.Adam(policy.parameters(), lr=3e-4)  # fresh: no momentum from the PPO step
    for _ in range(3):
        critic_opt.zero_grad()
        ppo_loss(policy, batch, cfg, module)["loss_critic"].backward()
        critic_opt.step()
    assert ppo_loss(policy, batch, cfg, module)["loss_critic"].item() < before
    with pytest.raises(ValueError, match="value head"):
        ppo_step(AutoGazePolicy.from_preset("tiny"), opt, built.params, built.reward, video, cfg, temperature=1.0,
                 generator=torch.Generator())
