import math

import pytest
import torch

from agents.grpo import aggregate, discounted_returns, group_relative_advantage, policy_gradient_loss


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
