"""rewards.cuda kernels of the static / graph step equal their torch references (GPU only):
``begin_rows`` = torch's downsizing written into the moved rows, ``frame_error`` = the
float64 sum of ``pixel_error``, ``paste_gaze`` with its observation mirror and output buffer."""

import pytest
import torch

from gaze_env import core
from gaze_env.config import GazeEnvConfig, get_preset
from rewards import cuda, losses
from rewards.losses import make_loss
from rewards.reconstruct import PasteReconstructor, paste_gaze
from tests.conftest import random_clips

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def needs_cuda_and_cupy():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if cuda.cupy_module() is None:
        pytest.skip(f"needs CuPy ({cuda.import_error()})")


@pytest.mark.parametrize("preset", ["tiny", "small", "paper"])
def test_begin_rows__equals_torch_downsizing_on_the_valid_rows_only(preset):
    grid = get_preset(preset).grid
    B, T, H, K = 10, 3, grid.frame_size, grid.num_scales
    sizes, offsets = cuda.lowres_layout(grid)
    g = torch.Generator(device="cuda").manual_seed(0)
    video = random_clips(B, preset, seed=1)[:, :T].contiguous().cuda()  # smooth content: many exact .5 ties
    video[0] = torch.randint(0, 256, video[0].shape, dtype=torch.uint8, device="cuda", generator=g)
    frame_t = torch.randint(0, T + 2, (B,), device="cuda", generator=g)  # past the end: the last frame
    lowres = torch.randn(B, offsets[-1], device="cuda", generator=g)
    level = torch.randint(0, K, (B, H, H), dtype=torch.int8, device="cuda", generator=g)
    frame_out = torch.zeros(B, 3, H, H, dtype=torch.uint8, device="cuda")
    rows = torch.tensor([7, 2, 9, 0, 4, 5], device="cuda")
    valid = torch.tensor([True, True, False, True, False, True], device="cuda")
    keep = rows[valid]
    frames = video[keep, frame_t[keep].clamp(max=T - 1)]  # (4, 3, H, H)
    expect_low, expect_level, expect_frames = lowres.clone(), level.clone(), frame_out.clone()
    for k, s in enumerate(sizes):
        expect_low[keep, offsets[k] : offsets[k + 1]] = grid.resize(frames.float(), s).flatten(1)
    expect_level[keep] = -1
    expect_frames[keep] = frames
    canvas = torch.randint(0, 256, (B, 3, H, H), dtype=torch.uint8, device="cuda", generator=g)
    err = cuda.begin_rows(grid, video, frame_t, rows, valid, lowres, level, frame_out, canvas=canvas, mode=0)
    assert torch.equal(err[valid], cuda.frame_error(video, frame_t, canvas, rows, 0)[valid])  # l1: exact sums
    assert torch.equal(lowres, expect_low)
    assert torch.equal(level, expect_level)
    assert torch.equal(frame_out, expect_frames)
    assert torch.equal(cuda.upsized_views(grid, lowres[keep], frames), grid.scale_views(frames))


@pytest.mark.parametrize("preset", ["tiny", "paper"])
@pytest.mark.parametrize("loss", ["l1", "mse"])
def test_frame_error__equals_the_float64_sum_of_pixel_error(preset, loss):
    params = core.CoreParams.build(GazeEnvConfig.from_preset(preset), make_loss(loss))
    video = random_clips(8, preset, seed=2).cuda()
    canvas = video[:, 5].contiguous()
    frame_t = torch.tensor([2, 0, 1, 7, 9, 3, 4, 2], device="cuda")
    rows = torch.tensor([3, 0, 7, 1, 6], device="cuda")
    err = cuda.frame_error(video, frame_t, canvas, rows, cuda.pixel_error_mode(params.loss.pixel_error))
    frames = video[rows, frame_t[rows].clamp(max=video.shape[1] - 1)]
    ref, _ = core._pixel_scores(params, frames, canvas[rows])
    if loss == "l1":
        assert torch.equal(err, ref)  # exact sums: the order does not matter
    else:
        torch.testing.assert_close(err, ref, rtol=1e-13, atol=0)
    valid = torch.tensor([True, False, True, False, True], device="cuda")
    masked = cuda.frame_error(video, frame_t, canvas, rows, cuda.pixel_error_mode(params.loss.pixel_error), valid)
    assert torch.equal(masked[valid], err[valid]) and (masked[~valid] == 0).all()
    with pytest.raises(ValueError, match="mode"):
        cuda.frame_error(video, frame_t, canvas, rows, -1)


@pytest.mark.parametrize("loss", ["l1", "mse"])
def test_paste_gaze__mirrors_the_canvas_and_fills_the_delta_buffer(loss):
    config = GazeEnvConfig.from_preset("paper", gazing_ratio=0.05)
    grid = config.grid
    params = core.CoreParams.build(config, make_loss(loss), PasteReconstructor(grid))
    ref_params = core.CoreParams.build(config, make_loss(loss), PasteReconstructor(grid, kernel="torch"))
    pixel_error = params.loss.pixel_error
    clips = random_clips(16, "paper", seed=3).cuda()
    state, ref = core.reset(params, clips), core.reset(ref_params, clips)
    assert "lowres" in state.aux and "views" in ref.aux
    g = torch.Generator(device="cuda").manual_seed(2)
    for _ in range(20):
        mask = core.action_mask(params, state)
        action = torch.multinomial(mask.float() + (~mask.any(1, keepdim=True)).float(), 1, generator=g)[:, 0]
        active = ~state.done & (action < grid.num_patches)
        mirror = state.canvas.clone()
        out = torch.full((16,), float("nan"), dtype=torch.float64, device="cuda")
        expect, ker = ref.clone(), state.clone()
        d_ref = paste_gaze(grid, expect, action, active, pixel_error)
        d_ker = cuda.paste_gaze(grid, ker, action, active, pixel_error, canvas_out=mirror, delta_out=out)
        assert d_ker is out and torch.equal(mirror, expect.canvas) and torch.equal(ker.canvas, expect.canvas)
        if pixel_error is losses.l1.pixel_error:
            assert torch.equal(d_ker, d_ref)
        else:
            torch.testing.assert_close(d_ker, d_ref, rtol=1e-12, atol=1e-12)
        core.step(params, state, action)
        core.step(ref_params, ref, action)
