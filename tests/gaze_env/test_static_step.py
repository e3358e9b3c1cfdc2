"""core.StaticStep and gaze_env.graph.StepRunner (op by op, on CPU) equal the eager ``core.step``.

The static step is the code the CUDA graphs capture; these tests run it op by op on CPU against the
reference on every field of the state and of the transition, including frame ends processed in
several fixed-size passes, validation, and in-place resets.
"""

from types import SimpleNamespace

import pytest
import torch

from gaze_env import core
from gaze_env.config import GazeEnvConfig
from gaze_env.graph import StepRunner, resolve_step_mode
from gaze_env.types import GazeState, Transition
from rewards.base import make_reward
from rewards.losses import make_loss
from rewards.reconstruct import PasteReconstructor, paste_gaze, paste_gaze_static
from tests.conftest import random_clips

TRANSITION_FIELDS = (
    "action",
    "is_gaze",
    "frame_index",
    "loss_before",
    "loss_after",
    "frame_end",
    "scored",
    "next_start_loss",
    "terminated",
)


def make_params(preset="tiny", loss="l1", **kw) -> core.CoreParams:
    return core.CoreParams.build(GazeEnvConfig.from_preset(preset, **kw), make_loss(loss))


def random_actions(params, state: GazeState, g: torch.Generator, stop_prob: float = 0.15) -> torch.Tensor:
    """Valid actions, STOP now and then; any in-range action for ended rows."""
    mask = core.action_mask(params, state).float()  # (B, N + 1)
    mask[:, -1] *= stop_prob * mask[:, :-1].sum(1)
    mask[state.done] = 1.0
    return torch.multinomial(mask, 1, generator=g)[:, 0]


def assert_same_state(a: GazeState, b: GazeState) -> None:
    ta, tb = a._tensors(), b._tensors()
    assert ta.keys() == tb.keys()
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], rtol=0, atol=0, equal_nan=True, msg=name)


def assert_same_transition(a: Transition, b: Transition) -> None:
    for name in TRANSITION_FIELDS:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, equal_nan=True, msg=name)


def static_step(static: core.StaticStep, action: torch.Tensor) -> Transition:
    """What a runner does around ``StaticStep``: actions in, run, frame-end passes."""
    static.action.copy_(action)
    static.run()
    offset = 0
    for size in core.plan_passes(int(static.flags[1]), static.sizes):
        static.offset.fill_(offset)
        static.frame_ends(size)
        offset += size
    return static.transition


@pytest.mark.parametrize(
    ("preset", "loss", "capacity", "kw"),
    [
        ("tiny", "l1", None, {}),
        ("tiny", "mse", 1, {"min_gazes_per_frame": 0}),
        ("tiny", "psnr", 2, {"reward_frame_rate": 0.5}),
        ("small", "l1", 3, {"gazing_ratio": 0.03}),
    ],
)
def test_static_step__equals_step_on_every_field(preset, loss, capacity, kw):
    params = make_params(preset, loss, **kw)
    B = 5
    video = random_clips(B, preset, seed=3)
    g = torch.Generator().manual_seed(0)
    ref = core.reset(params, video, generator=torch.Generator().manual_seed(1))
    mine = ref.clone()
    frame = torch.empty_like(mine.canvas)
    frame.copy_(mine.frame)
    canvas = mine.canvas.clone()
    static = core.StaticStep(params, mine, capacity=capacity, frame_out=frame, canvas_out=canvas)
    steps = frame_ends = 0
    while not bool(ref.done.all()):
        action = random_actions(params, ref, g)
        tr_ref = core.step(params, ref, action)
        tr = static_step(static, action)
        assert_same_transition(tr, tr_ref)
        assert_same_state(mine, ref)
        assert torch.equal(frame, ref.frame) and torch.equal(canvas, ref.canvas)
        assert int(static.flags[2]) == int(tr_ref.terminated.sum())
        steps += 1
        frame_ends += int(tr_ref.frame_end.sum())
    assert frame_ends >= B * params.config.num_frames  # every frame of every row ended once
    assert steps >= params.config.num_frames


def test_static_step__an_invalid_action_flags_the_batch_and_changes_nothing():
    params = make_params()
    state = core.reset(params, random_clips(3))
    core.step(params, state, torch.tensor([5, 6, 7]))
    before = state.clone()
    static = core.StaticStep(params, state)
    static.action.copy_(torch.tensor([1, 6, 2]))  # env 1 gazes patch 6 again
    static.run()
    assert static.flags.tolist() == [0, 0, 0]
    assert_same_state(state, before)
    assert "patch 6 in env 1 was already gazed" in core.invalid_action_message(params, state, static.action)
    unchecked = core.StaticStep(params, state, validate=False)
    unchecked.action.copy_(torch.tensor([1, 84, 2]))  # STOP after one gaze: valid
    unchecked.run()
    assert unchecked.flags[0] == 1 and unchecked.flags[1] == 1


def test_static_step__unsupported_configurations_say_why():
    assert core.static_step_unsupported(make_params()) is None
    assert "not a per-pixel loss" in core.static_step_unsupported(make_params(loss="ssim"))
    grid = GazeEnvConfig.from_preset("tiny").grid
    scoring = SimpleNamespace(end_frame=lambda *a: None, gaze_static=None, begin_frame_static=None)
    params = core.CoreParams(make_params().config, scoring, make_loss("l1"))
    assert "end_frame" in core.static_step_unsupported(params)
    params = core.CoreParams(make_params().config, SimpleNamespace(gaze=print), make_loss("l1"))
    assert "no gaze_static()" in core.static_step_unsupported(params)
    with pytest.raises(ValueError, match="not a per-pixel loss"):
        core.StaticStep(make_params(loss="ssim"), core.reset(make_params(loss="ssim"), random_clips(1)))
    cpu = torch.device("cpu")
    assert resolve_step_mode("auto", make_params(), cpu) == "eager"
    assert resolve_step_mode("static", make_params(), cpu) == "static"
    assert resolve_step_mode("auto", make_params(loss="ssim"), torch.device("cuda")) == "eager"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_step_mode("graph", make_params(), cpu)
    with pytest.raises(ValueError, match="cannot run here: the loss 'ssim'"):
        resolve_step_mode("static", make_params(loss="ssim"), cpu)
    with pytest.raises(ValueError, match="step_mode must be one of"):
        resolve_step_mode("fast", make_params(), cpu)
    assert PasteReconstructor(grid).gaze_static is not None


def test_frame_end_capacity__twice_the_expected_frame_ends_within_bounds():
    config = GazeEnvConfig.from_preset("paper")  # budget 26
    assert core.frame_end_capacity(config, 4096) == 316
    assert core.frame_end_capacity(config, 64) == 8
    assert core.frame_end_capacity(config, 1) == 1


def test_plan_passes__covers_the_moved_rows_wasting_at_most_half_a_pass():
    assert core.pass_sizes(316, 4096) == (4096, 1264, 316, 79, 20, 5, 2, 1)
    assert core.pass_sizes(8, 8) == core.pass_sizes(8) == (8, 2, 1)
    assert core.plan_passes(3780, core.pass_sizes(316, 4096)) == [4096]
    sizes = core.pass_sizes(316)
    assert sizes == (316, 79, 20, 5, 2, 1)
    assert core.plan_passes(0, sizes) == []
    assert core.plan_passes(3, sizes) == [5]
    assert core.plan_passes(150, sizes) == [79, 79]
    assert core.plan_passes(700, sizes) == [316, 316, 79]
    for moved in range(1, 1000):
        plan = core.plan_passes(moved, sizes)
        assert sum(plan) >= moved and sum(plan[:-1]) < moved and plan[-1] <= 2 * max(1, moved - sum(plan[:-1]))


@pytest.mark.parametrize("loss", ["l1", "mse"])
def test_paste_gaze_static__equals_paste_gaze_and_mirrors_the_canvas(loss):
    params = make_params("small", loss)
    grid, pixel_error = params.config.grid, params.loss.pixel_error
    state = core.reset(params, random_clips(6, "small", seed=2))
    g = torch.Generator().manual_seed(4)
    for _ in range(30):
        action = random_actions(params, state, g, stop_prob=0.0)
        active = ~state.done & (action < grid.num_patches)
        ref, mine = state.clone(), state.clone()
        mirror = state.canvas.clone()
        d_ref = paste_gaze(grid, ref, action, active, pixel_error)
        d_mine = paste_gaze_static(grid, mine, action, active, pixel_error, canvas_out=mirror)
        assert torch.equal(d_mine, d_ref)
        assert_same_state(mine, ref)
        assert torch.equal(mirror, ref.canvas)
        core.step(params, state, action)


def test_step_runner__op_by_op_equals_the_eager_step_observation_info_and_reward():
    params = make_params(frame_budgets=[2, 3, 1, 2, 3, 1, 2, 2])
    reward = make_reward("dense", loss="l1", gaze_cost=0.01)
    params = core.CoreParams(params.config, params.reconstructor, reward.loss)
    video = random_clips(4, seed=5)
    ref = core.reset(params, video)
    runner = StepRunner(params, ref.clone(), reward, capacity=1)
    assert not runner.captured and runner.capacity == 1 and runner.reward is not None
    g = torch.Generator().manual_seed(2)
    while not bool(ref.done.all()):
        action = random_actions(params, ref, g)
        tr_ref = core.step(params, ref, action)
        tr = runner.step(action)
        assert_same_transition(tr, tr_ref)
        assert torch.equal(runner.reward, reward(tr_ref).float())
        assert runner.num_terminated == int(tr_ref.terminated.sum())
        for key, value in core.observe(params, ref).items():
            assert torch.equal(runner.obs[key], value), key
        for key, value in core.info(params, ref).items():
            torch.testing.assert_close(runner.info[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    with pytest.raises(ValueError, match="action 99 in env 0 is out of range"):
        runner.step(torch.tensor([99, 0, 0, 0]))


def test_step_runner__refresh_and_matches_follow_in_place_resets():
    params = make_params()
    reward = make_reward("frame")
    state = core.reset(params, random_clips(3))
    runner = StepRunner(params, state, reward)
    runner.step(torch.tensor([1, 2, 3]))
    clips = random_clips(5, seed=9)
    rows = torch.tensor([0, 2])
    core.reset_rows(params, state, rows, lambda lo, hi: clips[3:5][lo:hi])
    runner.refresh(rows)
    assert runner.matches(state, validate=True) and not runner.matches(state, validate=False)
    for key, value in core.observe(params, state).items():
        assert torch.equal(runner.obs[key], value), key
    state.canvas = state.canvas.clone()  # a replaced tensor: the runner no longer steps this state
    assert not runner.matches(state, validate=True)


def test_reset_rows__in_chunks_equals_one_reset_and_keeps_the_storage():
    params = make_params(reward_frame_rate=0.5)
    state = core.reset(params, random_clips(6, seed=1))
    pointers = [t.data_ptr() for t in state._tensors().values()]
    expected = state.clone()
    clips = random_clips(4, seed=8)
    rows = torch.tensor([5, 0, 3, 1])
    budgets = torch.tensor([[2] * 8, [3] * 8, [1] * 8, [4] * 8])
    expected.assign(rows, core.reset(params, clips, generator=torch.Generator().manual_seed(3), budgets=budgets))
    gen = torch.Generator().manual_seed(3)
    core.reset_rows(params, state, rows, lambda lo, hi: clips[lo:hi], generator=gen, budgets=budgets, chunk_rows=3)
    assert_same_state(state, expected)
    assert [t.data_ptr() for t in state._tensors().values()] == pointers
