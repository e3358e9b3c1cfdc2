import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.baselines import (
    BASELINES,
    GreedyOracle,
    candidate_losses,
    make_baseline,
    patch_means,
    run_episodes,
)
from gaze_env import core
from gaze_env.config import GazeEnvConfig, budget_for_ratio
from gaze_env.patches import PatchGrid
from rewards.losses import make_loss, ssim
from rewards.reconstruct import PasteReconstructor
from tests.conftest import random_clips


def make_params(preset="tiny", loss="l1", **kw) -> core.CoreParams:
    return core.CoreParams.build(GazeEnvConfig.from_preset(preset, **kw), make_loss(loss))


def noise_clips(n: int, T: int, H: int, seed: int = 0) -> torch.Tensor:
    """Pixel noise: no two patches score alike, so greedy choices have no ties."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, T, 3, H, H), dtype=torch.uint8, generator=g)


def mid_episode_state(params, video, seed=0, steps=11):
    """A state some random gazes into the episode (several frames started)."""
    g = torch.Generator().manual_seed(seed)
    state = core.reset(params, video)
    rnd = make_baseline("random")
    for _ in range(steps):
        core.step(params, state, rnd.act(params, state, g))
    return state


# ---- the greedy oracle ---------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["l1", "psnr"])
@pytest.mark.parametrize("method", ["fast", "generic"])
def test_greedy_oracle__equals_brute_force_greedy_over_all_sequences(loss, method):
    # 3 scales of 1, 4 and 16 patches on a 16 px frame; budgets 2 then 1: 21 * 20 * 21 sequences
    grid = PatchGrid((4, 8, 16), 4)
    N = grid.num_patches
    params = core.CoreParams.build(GazeEnvConfig(grid=grid, num_frames=2, frame_budgets=(2, 1)), make_loss(loss))
    video = noise_clips(1, 2, 16, seed=3)
    seqs = torch.tensor([(a, b, c) for a, b in itertools.permutations(range(N), 2) for c in range(N)])
    S = seqs.shape[0]
    state = core.reset(params, video.expand(S, -1, -1, -1, -1))
    losses = torch.stack([core.step(params, state, seqs[:, k]).loss_after for k in range(3)], dim=1)  # (S, 3)
    assert bool(state.done.all())

    # greedy by brute force: at each step keep the sequences with the lowest loss so far, then the
    # lowest action on ties
    alive = torch.ones(S, dtype=torch.bool)
    for k in range(3):
        best = losses[alive, k].min()
        alive &= losses[:, k] <= best + 1e-7
        alive &= seqs[:, k] == seqs[alive, k].min()
    expected = seqs[alive][0]

    td = run_episodes(GreedyOracle(method=method), params, video)
    assert td["action"][0].tolist() == expected.tolist()
    torch.testing.assert_close(td["loss_after"][0], losses[alive][0])
    # and the oracle's first gaze is the best single gaze of all
    assert float(td["loss_after"][0, 0]) <= float(losses[:, 0].min()) + 1e-7


def test_greedy_oracle__mean_loss_never_worse_than_other_baselines():
    params = make_params()
    video = random_clips(6, seed=1)
    for ratio in (0.05, 0.2):
        budgets = torch.full((8,), budget_for_ratio(ratio, 84))
        runs = {name: run_episodes(make_baseline(name), params, video, budgets, seed=0) for name in BASELINES}
        oracle = runs["greedy_oracle"]
        for name, td in runs.items():
            # the first gaze starts from the same state for everyone: greedy is optimal there
            assert bool((oracle["loss_after"][:, 0] <= td["loss_after"][:, 0] + 1e-7).all()), name
            assert float(oracle["frame_loss"].mean()) <= float(td["frame_loss"].mean()) + 1e-7, (name, ratio)
        assert float(oracle["frame_loss"].mean()) < float(runs["random"]["frame_loss"].mean())


@pytest.mark.parametrize("loss", ["l1", "mse", "psnr"])
def test_candidate_losses__fast_path_equals_generic_path(loss):
    params = make_params(loss=loss, gazing_ratio=0.05)
    state = mid_episode_state(params, random_clips(3, seed=2), steps=13)
    assert len(set(state.t.tolist())) > 1 or int(state.t[0]) > 0  # several frames in play
    fast = candidate_losses(params, state, method="fast")
    frame = candidate_losses(params, state, method="generic", context="frame", chunk_bytes=2**20)
    clip = candidate_losses(params, state, method="generic", context="clip")
    valid = core.action_mask(params, state)[:, :84]
    for other in (frame, clip):
        assert torch.equal(torch.isfinite(other), valid) and torch.equal(torch.isfinite(fast), valid)
        torch.testing.assert_close(fast[valid], other[valid], rtol=1e-5, atol=1e-6)


def test_greedy_oracle__fast_and_generic_rollouts_choose_the_same_gazes():
    params = make_params(gazing_ratio=0.05)
    video = noise_clips(2, 8, 64, seed=4)
    fast = run_episodes(GreedyOracle(method="fast"), params, video)
    generic = run_episodes(GreedyOracle(method="generic", chunk_bytes=2**22), params, video)
    assert torch.equal(fast["action"], generic["action"])
    torch.testing.assert_close(fast["frame_loss"], generic["frame_loss"])


def test_candidate_losses__fast_path_rejects_unsupported_setup():
    params = core.CoreParams.build(GazeEnvConfig.from_preset("tiny"), ssim)
    state = core.reset(params, random_clips(1))
    with pytest.raises(ValueError, match="fast path needs a PasteReconstructor"):
        candidate_losses(params, state, method="fast")


class CornerEndPaste:
    """A custom reconstructor (not a PasteReconstructor): the paste canvas during a frame, but a
    frame end is scored on the top-left quadrant only, like a learned reconstructor that runs at
    frame ends; a gaze elsewhere improves the in-frame loss but not the frame's score."""

    def __init__(self, grid):
        self.paste = PasteReconstructor(grid)

    def init(self, state):
        self.paste.init(state)

    def begin_frame(self, state, rows):
        self.paste.begin_frame(state, rows)

    def gaze(self, state, action, active, pixel_error=None):
        return self.paste.gaze(state, action, active, pixel_error)

    def end_frame(self, state, rows, loss):
        target = state.video[rows, state.frame_t[rows], :, :32, :32].float() / 255
        return loss(target, state.canvas[rows, :, :32, :32].float() / 255).float()


@pytest.mark.parametrize("loss", ["l1", "ssim"])
def test_greedy_oracle__custom_reconstructor_and_loss_match_per_candidate_brute_force(loss):
    cfg = GazeEnvConfig.from_preset("tiny", frame_budgets=(3,) * 8)
    params = core.CoreParams(cfg, CornerEndPaste(cfg.grid), make_loss(loss))
    state = core.reset(params, random_clips(2, seed=5))
    oracle = GreedyOracle()
    for _ in range(4):
        chosen = oracle.act(params, state, None)
        for row in range(2):  # brute force: step a copy for every valid patch, one at a time
            valid = core.action_mask(params, state)[row, :84].nonzero()[:, 0].tolist()
            after = []
            for a in valid:
                copy = state[row].clone()
                t = int(copy.t[0])
                copy.budgets[0, t] = copy.counts[0, t] + 1  # score each candidate as a frame end
                after.append(float(core.step(params, copy, torch.tensor([a])).loss_after[0]))
            assert after[valid.index(int(chosen[row]))] <= min(after) + 1e-6
        core.step(params, state, chosen)
    # only gazes touching the scored quadrant help: the oracle stays there
    y0, x0, _, _ = params.config.grid.regions[state.history[:, 0].nonzero()[:, 1]].unbind(1)
    assert bool(((y0 < 32) & (x0 < 32)).all())


def test_greedy_oracle__max_candidates_restricts_and_stays_valid():
    params = make_params(gazing_ratio=0.1)
    video = random_clips(2, seed=6)
    full = run_episodes(GreedyOracle(), params, video)
    few = run_episodes(GreedyOracle(max_candidates=3), params, video, seed=1)
    assert torch.equal(few["counts"], full["counts"])
    assert float(few["frame_loss"].mean()) > float(full["frame_loss"].mean())
    with pytest.raises(ValueError, match="explicit torch.Generator"):
        GreedyOracle(max_candidates=3).act(params, core.reset(params, video), None)


# ---- heuristics ----------------------------------------------------------------------------------
def test_raster__gazes_coarse_to_fine_in_index_order():
    params = make_params(frame_budgets=(6, 2, 2, 2, 2, 2, 2, 2))
    td = run_episodes(make_baseline("raster"), params, random_clips(1))
    assert td["action"][0, :8].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]


def test_rgb_diff__first_gaze_of_a_frame_goes_where_it_changed():
    params = make_params(gazing_ratio=0.02)
    video = random_clips(1, seed=7)
    video[:, 1] = video[:, 0]
    video[0, 1, :, 40:48, 16:24] = 255 - video[0, 1, :, 40:48, 16:24]  # finest patch (5, 2)
    td = run_episodes(make_baseline("rgb_diff"), params, video)
    first_of_frame_1 = td["action"][0][td["frame_id"][0] == 1][0]
    assert int(first_of_frame_1) == 4 + 16 + 5 * 8 + 2


def test_error_greedy__gazes_where_the_canvas_is_wrong():
    params = make_params(gazing_ratio=0.02)
    video = torch.full((1, 8, 3, 64, 64), 128, dtype=torch.uint8)  # the grey canvas is exact...
    video[0, 0, :, 48:64, 0:16] = 0  # ...except in scale-1 patch (3, 0)
    td = run_episodes(make_baseline("error_greedy"), params, video)
    assert int(td["action"][0, 0]) == 4 + 3 * 4 + 0


def test_patch_means__averages_each_patch_region():
    grid = PatchGrid((16, 32, 64), 8)
    pixel_map = torch.zeros(1, 64, 64)
    pixel_map[0, :8, :8] = 64.0
    means = patch_means(grid, pixel_map)
    assert means.shape == (1, 84)
    assert means[0, 0] == 4.0 and means[0, 4] == 16.0 and means[0, 20] == 64.0
    assert float(means[0, 1:4].abs().sum()) == 0.0


# ---- every baseline ------------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(BASELINES),
    budgets=st.lists(st.integers(1, 9), min_size=8, max_size=8),
    min_gazes=st.integers(0, 1),
    seed=st.integers(0, 2**16),
)
def test_baselines__respect_action_mask_and_budgets(name, budgets, min_gazes, seed):
    params = make_params(min_gazes_per_frame=min_gazes)
    video = random_clips(2, seed=seed % 7)
    td = run_episodes(make_baseline(name), params, video, torch.tensor(budgets), seed=seed)  # raises if invalid
    assert td["counts"].tolist() == [budgets, budgets]
    assert td["valid"].sum(1).tolist() == [sum(budgets)] * 2
    for row in range(2):
        actions, frames = td["action"][row][td["valid"][row]], td["frame_id"][row][td["valid"][row]]
        assert bool((actions < 84).all())  # baselines use their budget, they never STOP
        assert torch.bincount(frames, minlength=8).tolist() == budgets
        for t in range(8):
            gazed = actions[frames == t]
            assert gazed.unique().numel() == gazed.numel()  # never twice in a frame


@pytest.mark.parametrize("name", BASELINES)
def test_baselines__valid_actions_on_a_batch_with_ended_episodes(name):
    params = make_params(frame_budgets=(1,) * 8)
    state = core.reset(params, random_clips(3))
    for _ in range(8):
        core.step(params, state, torch.tensor([0, 1, 2]))
    assert bool(state.done.all())
    fresh = core.reset(params, random_clips(2, seed=1))
    mixed = type(state).cat([state, fresh])  # rows 0-2 ended, rows 3-4 live
    action = make_baseline(name).act(params, mixed, torch.Generator().manual_seed(0))
    assert action.shape == (5,) and action.dtype == torch.int64
    assert action[:3].tolist() == [84, 84, 84]
    mask = core.action_mask(params, mixed)
    assert bool(mask[torch.arange(3, 5), action[3:]].all()) and bool((action[3:] < 84).all())


@pytest.mark.parametrize("name", ["random", "greedy_oracle"])
def test_baselines__deterministic_given_the_seed(name):
    kwargs = {"max_candidates": 5} if name == "greedy_oracle" else {}
    params = make_params(gazing_ratio=0.1)
    video = random_clips(2, seed=8)
    a = run_episodes(make_baseline(name, **kwargs), params, video, seed=11)
    b = run_episodes(make_baseline(name, **kwargs), params, video, seed=11)
    c = run_episodes(make_baseline(name, **kwargs), params, video, seed=12)
    assert torch.equal(a["action"], b["action"]) and torch.equal(a["frame_loss"], b["frame_loss"])
    assert not torch.equal(a["action"], c["action"])


def test_run_episodes__trajectory_fields_and_padding():
    params = make_params()
    budgets = torch.tensor([[3, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 2]])
    video = random_clips(2)
    td = run_episodes(make_baseline("raster"), params, video, budgets)
    assert td.batch_size == torch.Size([2])
    assert td["video"] is video
    assert td["action"].shape == (2, 10) and td["action"].dtype == torch.int64
    assert td["valid"].sum(1).tolist() == [10, 9]
    assert int(td["action"][1, 9]) == 84 and int(td["frame_id"][1, 9]) == 8  # padding: STOP, frame T
    assert torch.isnan(td["loss_after"][1, 9]) and float(td["reward"][1, 9]) == 0.0
    assert td["frame_id"][0].tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]
    # the loss after a frame's last gaze is that frame's loss, and the frame reward pays it
    last = torch.tensor([2, 3, 4, 5, 6, 7, 8, 9])
    torch.testing.assert_close(td["loss_after"][0, last], td["frame_loss"][0])
    torch.testing.assert_close(td["reward"][0, last], -td["frame_loss"][0])
    assert float(td["reward"][0, :2].abs().sum()) == 0.0
    assert torch.equal(td["counts"], budgets)


def test_run_episodes__rejects_a_policy_that_breaks_the_mask():
    class Repeats:
        name = "repeats"

        def act(self, params, state, generator):
            return torch.zeros(state.batch_size, dtype=torch.int64)

    with pytest.raises(ValueError, match="'repeats' chose an invalid action: patch 0 .* already gazed"):
        run_episodes(Repeats(), make_params(gazing_ratio=0.05), random_clips(1))


def test_make_baseline__names_and_errors():
    assert BASELINES == ("random", "raster", "rgb_diff", "error_greedy", "greedy_oracle")
    assert make_baseline("rgb-diff").name == "rgb_diff"
    assert make_baseline("greedy_oracle", max_candidates=4).max_candidates == 4
    with pytest.raises(ValueError, match="unknown baseline 'nope'; known: \\['random'"):
        make_baseline("nope")
    with pytest.raises(TypeError, match="bad options \\['max_candidates'\\] for baseline 'raster'"):
        make_baseline("raster", max_candidates=3)
    with pytest.raises(ValueError, match="explicit torch.Generator"):
        params = make_params()
        make_baseline("random").act(params, core.reset(params, random_clips(1)), None)
