import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gaze_env.config import PRESETS, GazeEnvConfig, budget_for_ratio, get_preset
from gaze_env.patches import PatchGrid


@st.composite
def grids(draw) -> PatchGrid:
    """Random valid grids: patch p, grid sides dividing the finest grid side."""
    p = draw(st.sampled_from([1, 2, 4, 8]))
    finest = draw(st.sampled_from([2, 4, 6, 8, 12]))
    divisors = [d for d in range(1, finest) if finest % d == 0]
    coarse = draw(st.lists(st.sampled_from(divisors), unique=True, max_size=3)) if divisors else []
    sides = sorted(coarse) + [finest]
    return PatchGrid(tuple(g * p for g in sides), p)


def test_presets__match_design_table():
    expected = {"tiny": (64, 84, 8), "small": (112, 265, 16), "paper": (224, 265, 16)}
    for name, (frame, n, frames) in expected.items():
        p = get_preset(name)
        assert (p.frame_size, p.grid.num_patches, p.num_frames) == (frame, n, frames)
        assert p.grid.stop == n and p.grid.num_actions == n + 1
    assert PRESETS["paper"].grid.grid_sizes == (2, 4, 7, 14)
    assert PRESETS["paper"].grid.offsets == (0, 4, 20, 69, 265)


def test_get_preset__unknown_name_lists_known():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*paper"):
        get_preset("huge")


@pytest.mark.parametrize(
    "scales, p, msg",
    [
        ((32, 16, 64), 8, "ascending"),
        ((16, 30, 64), 8, "multiple of patch_size"),
        ((), 8, "at least one"),
        ((24, 64), 8, "divisible by the grid side 3"),
        ((16, 64), 0, "positive int"),
    ],
)
def test_patchgrid__rejects_invalid_geometry(scales, p, msg):
    with pytest.raises(ValueError, match=msg):
        PatchGrid(scales, p)


@settings(max_examples=40, deadline=None)
@given(grids(), st.data())
def test_patchgrid__flat_index_round_trip(grid, data):
    idx = torch.tensor(data.draw(st.lists(st.integers(0, grid.num_patches - 1), min_size=1, max_size=20)))
    s, r, c = grid.unflatten(idx)
    assert torch.equal(grid.flatten(s, r, c), idx)
    g = torch.tensor(grid.grid_sizes)[s]
    assert bool(((r >= 0) & (r < g) & (c >= 0) & (c < g)).all())


@settings(max_examples=30, deadline=None)
@given(grids())
def test_patchgrid__every_scale_tiles_the_frame_exactly(grid):
    H = grid.frame_size
    for k in range(grid.num_scales):
        cover = torch.zeros(H, H, dtype=torch.int64)
        for y0, x0, y1, x1 in grid.regions[grid.scale_masks[k]].tolist():
            assert y1 - y0 == x1 - x0 == grid.region_sizes[k]
            cover[y0:y1, x0:x1] += 1
        assert bool((cover == 1).all()), f"scale {k} does not tile the frame exactly once"


def test_patchgrid__unflatten_rejects_out_of_range():
    grid = PRESETS["tiny"].grid
    with pytest.raises(ValueError, match=r"\[0, 84\)"):
        grid.unflatten(torch.tensor([84]))


def test_patchgrid__pixel_mask_matches_regions():
    grid = PRESETS["tiny"].grid
    gazed = torch.zeros(grid.num_patches, dtype=torch.bool)
    gazed[[1, 10, 83]] = True
    mask = grid.pixel_mask(gazed)
    expected = torch.zeros(64, 64, dtype=torch.bool)
    for y0, x0, y1, x1 in grid.regions[[1, 10, 83]].tolist():
        expected[y0:y1, x0:x1] = True
    assert torch.equal(mask, expected)
    assert torch.equal(grid.pixel_mask(gazed, scale=0), grid.pixel_mask(gazed & grid.scale_masks[0]))


def test_patchgrid__extract_finest_scale_is_the_frame_cut_in_patches():
    grid = PRESETS["tiny"].grid
    frames = torch.rand(2, 3, 64, 64)
    patches = grid.extract(frames)
    assert [tuple(x.shape) for x in patches] == [(2, 4, 3, 8, 8), (2, 16, 3, 8, 8), (2, 64, 3, 8, 8)]
    # patch (row 2, col 5) of the finest scale is the frame's pixels there
    assert torch.equal(patches[2][:, 2 * 8 + 5], frames[:, :, 16:24, 40:48])


def test_patchgrid__scale_views_finest_is_exact_and_coarse_is_blurred():
    grid = PRESETS["tiny"].grid
    frames = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    views = grid.scale_views(frames)
    assert views.shape == (2, 3, 3, 64, 64) and views.dtype == torch.uint8
    assert torch.equal(views[:, -1], frames)
    # the coarsest view of noise is much smoother than the frame
    assert views[:, 0].float().diff(dim=-1).abs().mean() < 0.5 * frames.float().diff(dim=-1).abs().mean()


def test_config__budgets_from_ratio_and_explicit():
    cfg = GazeEnvConfig.from_preset("small", gazing_ratio=0.1)
    assert cfg.budgets == (26,) * 16  # floor(0.1 * 265), the paper's per-frame cap
    assert budget_for_ratio(0.001, 84) == 1
    cfg = GazeEnvConfig.from_preset("tiny", frame_budgets=[1, 2, 3, 4, 5, 6, 7, 8])
    assert cfg.budgets == (1, 2, 3, 4, 5, 6, 7, 8)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"gazing_ratio": 0.0}, "gazing_ratio"),
        ({"frame_budgets": [1, 2]}, "one entry per frame"),
        ({"frame_budgets": [0] * 8}, r"\[1, 84\]"),
        ({"min_gazes_per_frame": 85}, "min_gazes_per_frame"),
        ({"reward_frame_rate": 0.0}, "reward_frame_rate"),
    ],
)
def test_config__rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        GazeEnvConfig.from_preset("tiny", **kw)
