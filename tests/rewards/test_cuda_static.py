"""rewards.cuda kernels of the static / graph step equal their torch references (GPU only):
``write_views`` = ``PatchGrid.scale_views`` written into the moved rows, ``frame_error`` = the
float64 sum of ``pixel_error``, ``paste_gaze`` with its observation mirror and output buffer."""

import pytest
import torch

from gaze_env import core
from gaze_env.config import GazeEnvConfig, get_preset
from rewards import cuda, losses
from rewards.losses import make_loss
from rewards.reconstruct import paste_gaze
from tests.conftest import random_clips

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def needs_cuda_and_cupy():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if cuda.cupy_module() is None:
        pytest.skip(f"needs CuPy ({cuda.import_error()})")


@pytest.mark.parametrize("preset", ["tiny", "small", "paper"])
def test_write_views__equals_scale_views_on_the_valid_rows_only(preset):
    grid = get_preset(preset).grid
    B, C, H, K = 10, 6, grid.frame_size, grid.num_scales
    g = torch.Generator(device="cuda").manual_seed(0)
    views = torch.randint(0, 256, (B, K, 3, H, H), dtype=torch.uint8, device="cuda", generator=g)
    level = torch.randint(0, K, (B, H, H), dtype=torch.int8, device="cuda", generator=g)
    frames = random_clips(C, preset, seed=1)[:, 3].contiguous().cuda()  # smooth content: many exact .5 ties
    frames[0] = torch.randint(0, 256, frames[0].shape, dtype=torch.uint8, device="cuda", generator=g)
    rows = torch.tensor([7, 2, 9, 0, 4, 5], device="cuda")
    valid = torch.tensor([True, True, False, True, False, True], device="cuda")
    frame_out = torch.zeros(B, 3, H, H, dtype=torch.uint8, device="cuda")
    expect_views, expect_level, expect_frames = views.clone(), level.clone(), frame_out.clone()
    keep = rows[valid]
    expect_views[keep] = grid.scale_views(frames[valid])
    expect_level[keep] = -1
    expect_frames[keep] = frames[valid]
    cuda.write_views(grid, frames, rows, valid, views, level, frame_out)
    assert torch.equal(views, expect_views)
    assert torch.equal(level, expect_level)
    assert torch.equal(frame_out, expect_frames)


@pytest.mark.parametrize("preset", ["tiny", "paper"])
@pytest.mark.parametrize("loss", ["l1", "mse"])
def test_frame_error__equals_the_float64_sum_of_pixel_error(preset, loss):
    params = core.CoreParams.build(GazeEnvConfig.from_preset(preset), make_loss(loss))
    clips = random_clips(8, preset, seed=2).cuda()
    frames, canvas = clips[:5, 2].contiguous(), clips[:, 5].contiguous()
    rows = torch.tensor([3, 0, 7, 1, 6], device="cuda")
    err = cuda.frame_error(frames, canvas, rows, cuda.pixel_error_mode(params.loss.pixel_error))
    ref, _ = core._pixel_scores(params, frames, canvas[rows])
    if loss == "l1":
        assert torch.equal(err, ref)  # exact sums: the order does not matter
    else:
        torch.testing.assert_close(err, ref, rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="mode"):
        cuda.frame_error(frames, canvas, rows, -1)


@pytest.mark.parametrize("loss", ["l1", "mse"])
def test_paste_gaze__mirrors_the_canvas_and_fills_the_delta_buffer(loss):
    params = core.CoreParams.build(GazeEnvConfig.from_preset("paper", gazing_ratio=0.05), make_loss(loss))
    grid, pixel_error = params.config.grid, params.loss.pixel_error
    state = core.reset(params, random_clips(16, "paper", seed=3).cuda())
    g = torch.Generator(device="cuda").manual_seed(2)
    for _ in range(20):
        mask = core.action_mask(params, state)
        action = torch.multinomial(mask.float() + (~mask.any(1, keepdim=True)).float(), 1, generator=g)[:, 0]
        active = ~state.done & (action < grid.num_patches)
        ref, ker = state.clone(), state.clone()
        mirror = ker.canvas.clone()
        out = torch.full((16,), float("nan"), dtype=torch.float64, device="cuda")
        d_ref = paste_gaze(grid, ref, action, active, pixel_error)
        d_ker = cuda.paste_gaze(grid, ker, action, active, pixel_error, canvas_out=mirror, delta_out=out)
        assert d_ker is out and torch.equal(mirror, ref.canvas) and torch.equal(ker.canvas, ref.canvas)
        if pixel_error is losses.l1.pixel_error:
            assert torch.equal(d_ker, d_ref)
        else:
            torch.testing.assert_close(d_ker, d_ref, rtol=1e-12, atol=1e-12)
        core.step(params, state, action)
