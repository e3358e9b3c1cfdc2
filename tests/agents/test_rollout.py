import torch

from agents.policy import AutoGazePolicy, preprocess
from agents.rollout import rollout
from gaze_env.builder import build
from tests.conftest import random_clips


def test_rollout__rewards_and_losses_come_from_the_env_and_log_probs_from_the_policy():
    built = build("tiny", videos=random_clips(1))
    policy = AutoGazePolicy.from_preset("tiny").eval()
    video = random_clips(3, seed=5)
    budgets = torch.tensor([[3, 2, 2, 2, 2, 2, 2, 1]]).expand(3, 8)
    td = rollout(policy, built.params, built.reward, video, budgets=budgets, temperature=1.0,
                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(td["valid"].sum(1), budgets.sum(1))  # budgets used, no STOP needed
    # the frame reward pays -loss once per frame: returns equal minus the summed frame losses
    assert torch.allclose(td["reward"].sum(1), -td["frame_loss"].sum(1), atol=1e-6)
    last = td["valid"].sum(1) - 1
    assert torch.allclose(td["loss_after"].gather(1, last[:, None])[:, 0], td["frame_loss"][:, -1])
    scored = policy.score(preprocess(video), td["action"], td["frame_id"], td["valid"])
    assert torch.allclose(scored["log_prob"][td["valid"]], td["log_prob"][td["valid"]], atol=1e-5)


def test_rollout__task_loss_requirement_stops_frames_with_stop_actions():
    built = build("tiny", videos=random_clips(1))
    policy = AutoGazePolicy.from_preset("tiny").eval()
    video = random_clips(2, seed=1)
    td = rollout(policy, built.params, built.reward, video, task_loss_requirement=1e9, temperature=0.0)
    # a requirement everything meets: one gaze then STOP in every frame
    assert torch.equal(td["valid"].sum(1), torch.full((2,), 16))
    assert bool((td["action"][:, 1::2] == 84).all())
