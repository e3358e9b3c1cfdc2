import pytest
import torch
from torchrl.collectors import Collector
from torchrl.envs import Compose, ExplorationType, InitTracker, TransformedEnv, set_exploration_type
from torchrl.envs.utils import step_mdp

from agents.actor import GazeStep, gaze_state_primer, make_gaze_actor
from agents.policy import AutoGazePolicy, preprocess
from agents.rollout import rollout
from gaze_env.torchrl_env import AutoGazeTorchEnv
from tests.conftest import OFFICIAL_PARTS, random_clips

STEPS = 8 * 8  # tiny preset at gazing ratio 0.1: 8 frames of 8 gazes


def make_env(policy, clips, batch_size=2, **kw):
    base = AutoGazeTorchEnv(batch_size, "tiny", videos=clips, gazing_ratio=0.1, **kw)
    base.set_seed(0)
    return base, TransformedEnv(base, Compose(InitTracker(), gaze_state_primer(policy, base)))


def which_clip(frames: torch.Tensor, clips: torch.Tensor) -> torch.Tensor:
    """(B,) index of the clip whose first frame each row shows."""
    same = (frames[:, None] == clips[None, :, 0]).flatten(2).all(-1)  # (B, n)
    assert bool((same.sum(1) == 1).all())
    return same.float().argmax(1)


def valid_actions(roll) -> bool:
    return bool(roll["action_mask"].gather(-1, roll["action"][..., None]).all())


def parts(ours: bool) -> dict:
    """The preset's own parts (canvas input, pointer head: recurrent state of their own) or none."""
    return {} if ours else OFFICIAL_PARTS


@pytest.mark.parametrize("K, ours", [(1, False), (3, False), (1, True), (3, True)])
def test_gaze_actor__greedy_actions_are_valid_and_equal_generate(K, ours):
    torch.manual_seed(K)
    policy = AutoGazePolicy.from_preset("tiny", num_multi_token_pred=K, **parts(ours)).eval()
    clips = random_clips(3, seed=3)
    base, env = make_env(policy, clips)
    actor = make_gaze_actor(policy, base)
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        roll = env.rollout(STEPS, actor)
    assert bool(roll["next", "done"][:, -1].all()) and not bool(roll["next", "done"][:, :-1].any())
    assert valid_actions(roll)
    video = clips[which_clip(roll["frame"][:, 0], clips)]
    expected = policy.generate(preprocess(video), gazing_ratio=0.1, return_logits=True)
    traj = expected.to_trajectory()
    assert torch.equal(roll["action"], traj["action"])
    # the step's logits are those of the head generation used for that slot
    logits = expected.logits[expected.emitted].view(2, STEPS, -1)
    assert torch.allclose(roll["logits"], logits, atol=1e-4)
    assert torch.allclose(roll["action_log_prob"], traj["log_prob"], atol=1e-4)


@pytest.mark.parametrize("ours", [False, True])
def test_gaze_actor__sampled_log_probs_equal_the_policys_teacher_forced_score(ours):
    torch.manual_seed(0)
    policy = AutoGazePolicy.from_preset("tiny", num_multi_token_pred=2, **parts(ours)).eval()
    clips = random_clips(2, seed=5)
    base, env = make_env(policy, clips)
    with set_exploration_type(ExplorationType.RANDOM):
        roll = env.rollout(STEPS, make_gaze_actor(policy, base, temperature=2.0))
    assert valid_actions(roll)
    video = clips[which_clip(roll["frame"][:, 0], clips)]
    valid = torch.ones_like(roll["action"], dtype=torch.bool)
    scored = policy.score(preprocess(video), roll["action"], roll["frame_index"], valid, temperature=2.0)
    assert torch.allclose(roll["action_log_prob"], scored["log_prob"], atol=1e-4)


@pytest.mark.parametrize("ours", [False, True])
def test_gaze_actor__collector_resets_the_state_between_episodes(ours):
    torch.manual_seed(0)
    policy = AutoGazePolicy.from_preset("tiny", **parts(ours)).eval()
    clips = random_clips(3, seed=6)
    base, _ = make_env(policy, clips)
    # the bare env: the collector appends the actor's primer and InitTracker itself
    collector = Collector(base, make_gaze_actor(policy, base), frames_per_batch=2 * (STEPS + 20),
                          total_frames=2 * (STEPS + 20), exploration_type=ExplorationType.DETERMINISTIC,
                          auto_register_policy_transforms=True)
    batch = next(iter(collector))
    collector.shutdown()
    assert valid_actions(batch) and bool(batch["is_init"][:, [0, STEPS]].all())
    done = batch["next", "done"][..., 0]
    assert bool(done[:, STEPS - 1].all())  # each env finished one episode and started another
    # the second episode is gazed as a fresh one: the same as generate on its clip
    second = batch[:, STEPS:]
    video = clips[which_clip(second["frame"][:, 0], clips)]
    traj = policy.generate(preprocess(video), gazing_ratio=0.1).to_trajectory()
    assert torch.equal(second["action"], traj["action"][:, :20])


def test_gaze_actor__task_loss_requirement_ends_frames_with_stop_like_rollout():
    policy = AutoGazePolicy.from_preset("tiny").eval()
    clips = random_clips(2, seed=1)
    base, env = make_env(policy, clips)
    actor = make_gaze_actor(policy, base, task_loss_requirement=1e9)
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        roll = env.rollout(100, actor, break_when_any_done=True)
    # a requirement everything meets: one gaze then STOP in every frame
    assert roll.shape[1] == 16 and bool((roll["action"][:, 1::2] == 84).all())
    video = clips[which_clip(roll["frame"][:, 0], clips)]
    td = rollout(policy, base.params, base.reward_fn, video, task_loss_requirement=1e9, temperature=0.0)
    assert torch.equal(roll["action"], td["action"])


def test_gaze_step__rejects_official_quirks_foreign_states_and_full_caches():
    with pytest.raises(ValueError, match="official_decode_quirks"):
        GazeStep(AutoGazePolicy.from_preset("tiny", official_decode_quirks=True), 8, 8)
    policy = AutoGazePolicy.from_preset("tiny").eval()
    base, env = make_env(policy, random_clips(1), batch_size=1)
    small = make_gaze_actor(policy, num_frames=1, max_gazes_per_frame=8)  # room for one frame
    with pytest.raises(ValueError, match="recurrent state"):  # the env's primer made a larger state
        env.rollout(2, small)
    td = base.reset()  # no primer: the actor starts from an empty state of its own size
    with pytest.raises(ValueError, match="KV cache"):
        for _ in range(STEPS):
            td = step_mdp(base.step(small(td)), keep_other=True)
