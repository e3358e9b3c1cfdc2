"""AutoGazeTorchEnv: specs, check_env_specs, collectors with a masked policy, partial resets, seeding."""

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torchrl.collectors import Collector
from torchrl.data import Categorical, Composite
from torchrl.envs.utils import check_env_specs
from torchrl.modules import MaskedCategorical, ProbabilisticActor

from gaze_env.torchrl_env import AutoGazeTorchEnv
from tests.conftest import random_clips

N, T, H = 84, 8, 64  # tiny preset


def make(B=3, n_clips=5, **kwargs):
    return AutoGazeTorchEnv(B, videos=random_clips(n_clips), **kwargs)


def uniform_masked_policy() -> ProbabilisticActor:
    """Uniform logits, masked by ``action_mask``: a random policy that only takes valid actions."""
    logits = TensorDictModule(
        lambda mask: torch.zeros(mask.shape, dtype=torch.float32, device=mask.device),
        in_keys=["action_mask"],
        out_keys=["logits"],
    )
    return ProbabilisticActor(
        logits,
        in_keys={"logits": "logits", "mask": "action_mask"},
        distribution_class=MaskedCategorical,
        return_log_prob=True,
    )


def test_torchrl_env__specs_are_derived_from_the_patch_grid():
    env = make(B=4)
    assert env.batch_size == torch.Size([4])
    assert isinstance(env.action_spec, Categorical) and env.action_spec.space.n == N + 1
    assert env.action_spec.shape == (4,)
    obs = env.observation_spec
    assert isinstance(obs, Composite) and obs.shape == (4,)
    assert obs["frame"].shape == (4, 3, H, H) and obs["frame"].dtype == torch.uint8
    assert obs["canvas"].shape == (4, 3, H, H)
    assert obs["gazed"].shape == (4, N) and obs["gazed"].dtype == torch.bool
    assert obs["action_mask"].shape == (4, N + 1) and obs["action_mask"].dtype == torch.bool
    assert obs["frame_index"].space.n == T and obs["gazes_left"].space.n == N + 1
    assert obs["info", "frame_loss"].shape == (4, T)
    assert env.reward_spec.shape == (4, 1)
    assert set(env.full_done_spec.keys()) == {"done", "terminated", "truncated"}


def test_torchrl_env__passes_check_env_specs():
    env = make(B=3)
    check_env_specs(env, seed=0, break_when_any_done="both")


def test_torchrl_env__rand_action_draws_valid_actions_only():
    env = make(B=3)
    env.set_seed(0)
    td = env.reset()
    for _ in range(30):
        td = env.rand_action(td)
        assert td["action_mask"].gather(1, td["action"][:, None]).all()
        _, td = env.step_and_maybe_reset(td)


def test_torchrl_env__collector_runs_a_masked_categorical_policy():
    env = make(B=2)
    env.set_seed(0)
    policy = uniform_masked_policy()
    collector = Collector(env, policy, frames_per_batch=100, total_frames=200, auto_register_policy_transforms=False)
    batches = list(collector)
    collector.shutdown()
    assert len(batches) == 2
    data = torch.cat(batches, dim=1)  # (B, L)
    assert data.batch_size == torch.Size([2, 100])
    assert data["action_mask"].gather(-1, data["action"][..., None]).all()
    done = data["next", "done"][..., 0]
    assert done.sum() >= 2  # budget 8 per frame, 8 frames: episodes of at most 8 * 9 steps
    after = data["frame_index"][:, 1:][done[:, :-1]]
    assert (after == 0).all()  # every done row was reset before its next step
    assert torch.isfinite(data["action_log_prob"]).all()
    assert (data["next", "reward"] <= 0).all() and (data["next", "reward"][done] < 0).all()


def test_torchrl_env__partial_reset_replaces_only_the_reset_rows():
    env = make(B=4, n_clips=6)
    env.set_seed(0)
    td = env.reset(TensorDict({"clip_index": torch.tensor([0, 1, 2, 3])}, batch_size=[4]))
    for _ in range(5):
        _, td = env.step_and_maybe_reset(env.rand_action(td))
    before = env.state.clone()
    reset = torch.tensor([True, False, True, False])
    td.set("_reset", reset[:, None])
    td.set("clip_index", torch.tensor([5, 0, 4, 0]))
    out = env.reset(td)
    after, clips = env.state, random_clips(6)
    for name, old in before._tensors().items():
        new = after._tensors()[name]
        torch.testing.assert_close(new[[1, 3]], old[[1, 3]], rtol=0, atol=0, equal_nan=True, msg=name)
    assert torch.equal(after.video[0], clips[5]) and torch.equal(after.video[2], clips[4])
    assert (after.t[[0, 2]] == 0).all() and not after.history[[0, 2]].any()
    assert (out["frame_index"][[0, 2]] == 0).all() and out["action_mask"][[0, 2], :N].all()
    assert torch.equal(out["canvas"], after.canvas) and not out["done"].any()


def test_torchrl_env__reset_tensordict_sets_per_env_budgets():
    env = make(B=2)
    budgets = torch.tensor([[3] * T, [5] * T])
    td = env.reset(TensorDict({"budgets": budgets}, batch_size=[2]))
    assert td["gazes_left"].tolist() == [3, 5]
    for _ in range(3):
        td["action"] = td["action_mask"][:, :N].float().argmax(1)
        td = env.step(td)["next"]
    assert td["frame_index"].tolist() == [1, 0] and td["gazes_left"].tolist() == [3, 2]


def test_torchrl_env__set_seed_makes_clip_draws_reproducible():
    def first_frames(seed):
        env = make(B=3, n_clips=50)
        env.set_seed(seed)
        return env.reset()["frame"]

    assert torch.equal(first_frames(1), first_frames(1))
    assert not torch.equal(first_frames(1), first_frames(2))


def test_torchrl_env__invalid_actions_raise():
    env = make(B=2)
    td = env.reset()
    td["action"] = torch.tensor([0, 0])
    td = env.step(td)["next"]
    td["action"] = torch.tensor([1, 0])
    with pytest.raises(ValueError, match="patch 0 in env 1 was already gazed"):
        env.step(td)


def test_torchrl_env__rejects_a_batch_shape_it_cannot_serve():
    with pytest.raises(ValueError, match="batch_size must be one positive int"):
        AutoGazeTorchEnv([2, 3], videos=random_clips(2))


@pytest.mark.gpu
def test_torchrl_env__runs_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    env = make(B=2, device="cuda")
    td = env.rollout(10, break_when_any_done=False)
    assert td.device.type == "cuda" and td["next", "canvas"].is_cuda and env.state.video.is_cuda


def test_torchrl_env__image_specs_hold_no_per_pixel_bounds():
    # paper size, B = 4096: Bounded image specs would build and compare 2 x 0.6 GB of bounds each
    env = AutoGazeTorchEnv(4096, preset="paper", videos=random_clips(1, "paper"))
    spec = env.observation_spec["frame"]
    assert spec.shape == (4096, 3, 224, 224) and spec.dtype == torch.uint8
    assert not any(isinstance(v, torch.Tensor) and v.numel() > 1 for v in vars(spec.space).values())
    pixels = torch.tensor([[0, 255]], dtype=torch.uint8)
    small = make(B=1).observation_spec["canvas"]
    assert small.is_in(torch.full((1, 3, H, H), 255, dtype=torch.uint8)) and not small.is_in(pixels)


@pytest.mark.parametrize("step_mode", ["eager", "static"])
def test_torchrl_env__step_modes_give_the_same_rollout(step_mode):
    envs = [make(B=3, frame_budgets=[1, 2] * 4, step_mode=m) for m in ("eager", step_mode)]
    rollouts = []
    for env in envs:
        env.set_seed(5)
        torch.manual_seed(0)
        rollouts.append(env.rollout(40, break_when_any_done=False))
    assert rollouts[1]["next", "reward"].shape == (3, 40, 1)
    torch.testing.assert_close(rollouts[0], rollouts[1], rtol=0, atol=0, equal_nan=True)
    assert (rollouts[1]["next", "frame_index"][:, 1:] != rollouts[1]["next", "frame_index"][:, :-1]).any()
