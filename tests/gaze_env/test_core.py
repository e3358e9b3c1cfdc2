import pytest
import torch

from gaze_env import core
from gaze_env.config import GazeEnvConfig
from rewards.base import make_reward
from rewards.losses import l1, make_loss, ssim
from tests.conftest import random_clips


def make_params(preset="tiny", loss="l1", **kw) -> core.CoreParams:
    return core.CoreParams.build(GazeEnvConfig.from_preset(preset, **kw), make_loss(loss))


def random_valid_actions(params, state, g: torch.Generator, stop_prob: float = 0.1) -> torch.Tensor:
    mask = core.action_mask(params, state).float()  # (B, N + 1)
    mask[:, -1] *= stop_prob * mask[:, :-1].sum(1)  # STOP now and then
    mask[state.done] = 1.0
    return torch.multinomial(mask, 1, generator=g)[:, 0]


def rollout(params, video, seed, reward_fns=(), stop_prob=0.1):
    """Run random valid actions to the end; returns per-step rewards of each reward fn and actions."""
    g = torch.Generator().manual_seed(seed)
    state = core.reset(params, video, generator=torch.Generator().manual_seed(seed))
    rewards = [[] for _ in reward_fns]
    actions, losses = [], []
    while not bool(state.done.all()):
        a = random_valid_actions(params, state, g, stop_prob)
        tr = core.step(params, state, a)
        actions.append(a)
        losses.append(tr.loss_after)
        for out, fn in zip(rewards, reward_fns):
            out.append(fn(tr))
    return state, [torch.stack(r, 1) for r in rewards], torch.stack(actions, 1), torch.stack(losses, 1)


def test_reset__rejects_wrong_video_shape_and_dtype():
    params = make_params()
    with pytest.raises(ValueError, match=r"uint8 \(B, 8, 3, 64, 64\)"):
        core.reset(params, torch.zeros(1, 8, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        core.reset(params, torch.zeros(1, 8, 3, 64, 64))


def test_step__budget_ends_frame_and_last_frame_terminates():
    params = make_params(frame_budgets=[2, 1, 1, 1, 1, 1, 1, 3])
    state = core.reset(params, random_clips(1))
    assert int(state.budget[0]) == 2
    tr = core.step(params, state, torch.tensor([5]))
    assert not tr.frame_end[0] and int(state.t[0]) == 0
    tr = core.step(params, state, torch.tensor([6]))
    assert tr.frame_end[0] and int(state.t[0]) == 1 and not state.gazed.any()
    for _ in range(6):
        core.step(params, state, torch.tensor([0]))
    assert int(state.t[0]) == 7
    core.step(params, state, torch.tensor([1]))
    tr = core.step(params, state, torch.tensor([84]))  # STOP after 1 of 3
    assert tr.terminated[0] and state.done[0] and not core.action_mask(params, state).any()
    assert torch.equal(state.counts[0], torch.tensor([2, 1, 1, 1, 1, 1, 1, 1]))


@pytest.mark.parametrize(
    "setup, action, msg",
    [
        ([], 84, "STOP in the env after 0 gaze"),
        ([3], 3, "patch 3 .* already gazed in frame 0"),
        ([], 85, "out of range"),
        ([], -1, "out of range"),
    ],
)
def test_step__invalid_actions_raise_and_leave_state(setup, action, msg):
    params = make_params()
    state = core.reset(params, random_clips(1))
    for a in setup:
        core.step(params, state, torch.tensor([a]))
    before = state.clone()
    with pytest.raises(ValueError, match=msg):
        core.step(params, state, torch.tensor([action]))
    assert torch.equal(before.history, state.history) and torch.equal(before.canvas, state.canvas)


def test_step__ended_rows_ignore_their_action():
    params = make_params(frame_budgets=[1] * 8)
    state = core.reset(params, random_clips(1))
    for _ in range(8):
        core.step(params, state, torch.tensor([0]))
    before = state.clone()
    tr = core.step(params, state, torch.tensor([0]))
    assert not tr.is_gaze[0] and not tr.frame_end[0] and torch.equal(before.counts, state.counts)
    with pytest.raises(ValueError, match="out of range"):
        core.step(params, state, torch.tensor([99]))


def test_step__min_gazes_zero_allows_skipping_a_frame_and_keeps_canvas():
    params = make_params(min_gazes_per_frame=0)
    video = random_clips(1)
    state = core.reset(params, video)
    core.step(params, state, torch.tensor([0]))  # coarse gaze in frame 0
    core.step(params, state, torch.tensor([84]))
    canvas = state.canvas.clone()
    tr = core.step(params, state, torch.tensor([84]))  # frame 1: nothing gazed
    assert tr.frame_end[0] and torch.equal(state.canvas, canvas)


def test_paste__all_finest_patches_reproduce_the_frame():
    params = make_params(frame_budgets=[64] * 8)
    video = random_clips(2)
    state = core.reset(params, video)
    for a in range(20, 84):  # the 8x8 finest scale of tiny
        if a == 83:
            assert state.loss.max() > 0
        core.step(params, state, torch.full((2,), a))
    assert int(state.t[0]) == 1  # frame 0 ended, frame 1 starts from frame 0's exact copy
    assert torch.equal(state.canvas, video[:, 0])
    assert torch.allclose(state.frame_loss[:, 0], torch.zeros(2))


def test_paste__finer_gazes_overwrite_coarser_in_any_order():
    params = make_params()
    video = random_clips(1)
    views = params.config.grid.scale_views(video[:, 0])[0]  # (k, 3, H, W)
    for order in ([20, 0], [0, 20]):  # fine (8 px at 0,0) then coarse (32 px at 0,0), and reverse
        state = core.reset(params, video)
        for a in order:
            core.step(params, state, torch.tensor([a]))
        c = state.canvas[0]
        assert torch.equal(c[:, :8, :8], views[2][:, :8, :8])
        assert torch.equal(c[:, :32, 8:32], views[0][:, :32, 8:32])
        assert bool((c[:, 32:, :] == 128).all())


def test_step__incremental_loss_equals_full_recompute():
    params = make_params()
    video = random_clips(3, seed=4)
    state, _, _, losses = rollout(params, video, seed=1)
    full = l1(video[:, -1].float() / 255, state.canvas.float() / 255)
    assert torch.allclose(state.loss, full, atol=1e-6)
    assert torch.allclose(state.frame_loss[:, -1], full, atol=1e-6)


def test_step__non_pixel_loss_is_recomputed_each_gaze():
    params = make_params(loss="ssim")
    video = random_clips(2, seed=2)
    state = core.reset(params, video)
    core.step(params, state, torch.tensor([0, 5]))
    expected = ssim(video[:, 0].float() / 255, state.canvas.float() / 255)
    assert torch.allclose(state.loss, expected, atol=1e-6)


def test_dense_return__equals_frame_return_plus_start_losses():
    video = random_clips(4, seed=3)
    for shaping in ({}, {"gaze_cost": 0.01}, {"loss_threshold": 0.05}):
        frame, dense = make_reward("frame", **shaping), make_reward("dense", **shaping)
        params = core.CoreParams.build(GazeEnvConfig.from_preset("tiny"), frame.loss)
        state, (r_frame, r_dense), _, _ = rollout(params, video, seed=7, reward_fns=(frame, dense))
        excess = frame.excess(state.frame_start_loss)  # (B, T) the carried-over term
        assert torch.allclose(r_dense.sum(1), r_frame.sum(1) + excess.sum(1), atol=1e-5)


def test_frame_reward__scores_only_sampled_frames():
    params = make_params(reward_frame_rate=0.25)
    reward = make_reward("frame")
    state, (r,), _, _ = rollout(params, random_clips(3), seed=0, reward_fns=(reward,))
    assert torch.equal(state.reward_frames.sum(1), torch.full((3,), 2))
    assert torch.allclose(r.sum(1), -(state.frame_loss * state.reward_frames).sum(1))


def test_core__batch_of_seven_equals_seven_single_runs():
    params = make_params(gazing_ratio=0.05)
    video = random_clips(7, seed=11)
    g = torch.Generator().manual_seed(0)
    batched = core.reset(params, video)
    singles = [core.reset(params, video[i : i + 1]) for i in range(7)]
    reward = make_reward("dense")
    while not bool(batched.done.all()):
        a = random_valid_actions(params, batched, g, stop_prob=0.3)
        tr_b = core.step(params, batched, a)
        r_b = reward(tr_b)
        for i, s in enumerate(singles):
            if bool(s.done[0]):
                continue
            tr = core.step(params, s, a[i : i + 1])
            assert torch.equal(tr.frame_end, tr_b.frame_end[i : i + 1])
            assert torch.allclose(reward(tr), r_b[i : i + 1], atol=1e-7)
    for i, s in enumerate(singles):
        assert torch.equal(s.canvas[0], batched.canvas[i])
        assert torch.equal(s.history[0], batched.history[i])
        assert torch.allclose(s.frame_loss[0], batched.frame_loss[i], atol=1e-7)


def test_observe__fields_and_shapes():
    params = make_params()
    state = core.reset(params, random_clips(2))
    core.step(params, state, torch.tensor([3, 4]))
    obs = core.observe(params, state)
    assert obs["frame"].shape == obs["canvas"].shape == (2, 3, 64, 64)
    assert obs["gazed"].shape == (2, 84) and obs["gazed"][0, 3] and obs["gazed"][1, 4]
    assert obs["action_mask"].shape == (2, 85) and not obs["action_mask"][0, 3] and obs["action_mask"][0, 84]
    assert torch.equal(obs["gazes_left"], torch.tensor([7, 7]))
    info = core.info(params, state)
    assert torch.allclose(info["gazing_ratio"], torch.full((2,), 1 / 84))


def test_state__assign_and_index_round_trip():
    params = make_params()
    a = core.reset(params, random_clips(3, seed=1))
    b = core.reset(params, random_clips(3, seed=2))
    a.assign(torch.tensor([1]), b[1])
    assert torch.equal(a.video[1], b.video[1]) and torch.equal(a.aux["views"][1], b.aux["views"][1])
    assert not torch.equal(a.video[0], b.video[0])
