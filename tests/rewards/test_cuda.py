"""rewards.cuda: the fused CuPy paste kernel equals its torch reference, ``reconstruct.paste_gaze``.

The ``gpu`` tests skip without a CUDA device or CuPy; the others check, on CPU, the torch reference
against a naive per-row paste and that everything works without CuPy.
"""

from types import SimpleNamespace

import pytest
import torch

from gaze_env import core
from gaze_env.builder import build
from gaze_env.config import get_preset
from rewards import cuda, losses
from rewards.reconstruct import PasteReconstructor, paste_gaze
from tests.conftest import random_clips


def needs_cuda_and_cupy() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if cuda.cupy_module() is None:
        pytest.skip(f"needs CuPy ({cuda.import_error()})")


def random_play(preset: str, loss: str, B: int, steps: int, device: str, seed: int = 0, **kwargs):
    """Yield (params, state, action, active) before each of ``steps`` random valid steps of B episodes
    (the state advances through ``core.step`` between yields)."""
    clips = random_clips(4, preset, seed)
    built = build(preset, videos=clips, reward_kwargs={"loss": loss}, gazing_ratio=0.2, **kwargs)
    params, gen = built.params, torch.Generator().manual_seed(seed)
    video = built.source.clips([i % 4 for i in range(B)]).to(device)
    state = core.reset(params, video, generator=gen)
    for _ in range(steps):
        mask = core.action_mask(params, state).cpu()
        mask[~mask.any(1), -1] = True
        action = torch.multinomial(mask.float(), 1, generator=gen)[:, 0].to(device)
        active = ~state.done & (action < params.config.grid.num_patches)
        yield params, state, action, active
        core.step(params, state, action)


def exact_change(pixel_error, before, after) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) float64 sum and sum of magnitudes of the per-element error changes of a paste, with the
    reference's element-wise ops (exactly its per-element values), summed in float64."""
    target = before.frame.float().div_(255)
    change = pixel_error(target, after.canvas.float().div_(255)) - pixel_error(target, before.canvas.float().div_(255))
    return change.double().flatten(1).sum(1), change.double().abs().flatten(1).sum(1)


def naive_paste(grid, state, action, active, pixel_error):
    """One row at a time, straight from the docstring of PasteReconstructor."""
    delta = torch.zeros(state.batch_size, dtype=torch.float64)
    for b in active.nonzero()[:, 0].tolist():
        a = int(action[b])
        k = int(grid.patch_scale[a])
        y0, x0, y1, x1 = grid.regions[a].tolist()
        level = state.aux["level"][b, y0:y1, x0:x1]
        write = level <= k
        canvas = state.canvas[b, :, y0:y1, x0:x1]
        old = canvas.clone()
        canvas[:, write] = state.aux["views"][b, k, :, y0:y1, x0:x1][:, write]
        level[write] = k
        if pixel_error is not None:
            target = state.frame[b, :, y0:y1, x0:x1].float() / 255
            change = pixel_error(target, canvas.float() / 255) - pixel_error(target, old.float() / 255)
            delta[b] = change.double().sum()
    return delta


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_paste_gaze__torch_reference_equals_a_naive_per_row_paste(preset):
    for params, state, action, active in random_play(preset, "mse", B=5, steps=25, device="cpu"):
        grid, pixel_error = params.config.grid, params.loss.pixel_error
        grouped, naive = state.clone(), state.clone()
        d_grouped = paste_gaze(grid, grouped, action, active, pixel_error)
        d_naive = naive_paste(grid, naive, action, active, pixel_error)
        assert torch.equal(grouped.canvas, naive.canvas)
        assert torch.equal(grouped.aux["level"], naive.aux["level"])
        torch.testing.assert_close(d_grouped, d_naive, rtol=1e-5, atol=1e-4)
        assert (d_grouped[~active] == 0).all()


def test_paste_reconstructor__kernel_option_runs_the_torch_code_off_cuda():
    grid = get_preset("tiny").grid
    with pytest.raises(ValueError, match="kernel must be 'auto', 'torch' or 'cupy'"):
        PasteReconstructor(grid, kernel="triton")
    for kernel in ("auto", "cupy"):
        flagged = PasteReconstructor(grid, kernel=kernel)
        assert not flagged.uses_kernels(torch.device("cpu"))
        for params, state, action, active in random_play("tiny", "l1", B=3, steps=10, device="cpu"):
            a, b = state.clone(), state.clone()
            d_flag = flagged.gaze(a, action, active, params.loss.pixel_error)
            d_torch = params.reconstructor.gaze(b, action, active, params.loss.pixel_error)
            assert torch.equal(a.canvas, b.canvas) and torch.equal(d_flag, d_torch)
            assert torch.equal(flagged.views(state, torch.tensor([2, 0])), state.aux["views"][[2, 0]])


def test_paste_reconstructor__which_devices_take_the_kernels(monkeypatch):
    # the decision only (no GPU here): a CUDA device whose kernels run, or do not
    grid = get_preset("tiny").grid
    gpu = torch.device("cuda")
    monkeypatch.setattr(cuda, "unsupported", lambda grid, device: None)
    assert PasteReconstructor(grid).uses_kernels(gpu) and PasteReconstructor(grid, kernel="cupy").uses_kernels(gpu)
    assert not PasteReconstructor(grid, kernel="torch").uses_kernels(gpu)
    monkeypatch.setattr(cuda, "unsupported", lambda grid, device: "no CuPy here")
    assert not PasteReconstructor(grid).uses_kernels(gpu)
    with pytest.warns(UserWarning, match="no CuPy here"):
        assert not PasteReconstructor(grid, kernel="cupy").uses_kernels(gpu)


def test_cuda__loss_modes_layout_and_reasons_without_cuda():
    assert cuda.pixel_error_mode(losses.l1.pixel_error) == 0
    assert cuda.pixel_error_mode(losses.mse.pixel_error) == cuda.pixel_error_mode(losses.psnr.pixel_error) == 1
    assert cuda.pixel_error_mode(None) == -1
    assert cuda.pixel_error_mode(lambda t, r: (t - r) ** 4) is None
    assert cuda.lowres_layout(get_preset("paper").grid) == ((32, 64, 112), (0, 3072, 15360, 52992))
    assert "CUDA" in cuda.unsupported(get_preset("tiny").grid, torch.device("cpu"))
    # rows past CUDA's grid limit take several launches
    assert cuda._row_chunks(0) == [] and cuda._row_chunks(65535) == [(0, 65535)]
    assert cuda._row_chunks(140000) == [(0, 65535), (65535, 131070), (131070, 140000)]


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny", "small", "paper"])
@pytest.mark.parametrize("loss", ["l1", "mse", "psnr", "ssim"])
def test_kernels__equal_the_torch_reconstructor_over_random_plays(preset, loss):
    """Eager ``core.step`` with the kernels (``aux["lowres"]``) vs the torch code (``aux["views"]``):
    canvas, level map, losses and the views bit for bit (mse sums to float64 rounding)."""
    needs_cuda_and_cupy()
    grid = get_preset(preset).grid
    assert cuda.unsupported(grid, torch.device("cuda")) is None
    ker_kw = {"reconstructor": PasteReconstructor(grid)}
    ref_kw = {"reconstructor": PasteReconstructor(grid, kernel="torch")}
    plays = zip(
        random_play(preset, loss, B=48, steps=60, device="cuda", seed=1, **ker_kw),
        random_play(preset, loss, B=48, steps=60, device="cuda", seed=1, **ref_kw),
    )
    rows = torch.tensor([5, 0, 47], device="cuda")
    for (params, ker, action, _), (_, ref, ref_action, _) in plays:
        assert "lowres" in ker.aux and "views" not in ker.aux and "views" in ref.aux
        assert torch.equal(action, ref_action)
        assert torch.equal(ker.canvas, ref.canvas)
        assert torch.equal(ker.aux["level"], ref.aux["level"])
        assert torch.equal(ker.t, ref.t)
        if loss in ("mse", "psnr"):
            torch.testing.assert_close(ker.err_sum, ref.err_sum, rtol=1e-12, atol=1e-12)
        else:
            assert torch.equal(ker.loss, ref.loss)
        assert torch.equal(params.reconstructor.views(ker, rows), ref.aux["views"][rows])


def test_gaze_static__kernel_state_with_a_loss_the_kernel_lacks_rescores_whole_frames(monkeypatch):
    # the fallback's arithmetic on CPU: a state that claims the kernel layout, the kernel's paste
    # stood in for by the torch paste (what the GPU tests show it equals)
    def cube(target, recon):
        return (target - recon).abs() ** 3

    cube_loss = SimpleNamespace(loss=SimpleNamespace(pixel_error=cube, reduce=lambda x: x))
    calls = []

    def kernel_paste(grid, state, action, active, pixel_error, canvas_out=None, delta_out=None):
        calls.append(pixel_error)
        return paste_gaze(grid, state, action, active, pixel_error)

    monkeypatch.setattr(cuda, "paste_gaze", kernel_paste)
    for params, state, action, active in random_play("tiny", "l1", B=4, steps=12, device="cpu"):
        calls.clear()
        ker = state.clone()
        ker.aux["lowres"] = torch.zeros(4, 1)
        frames = state.video[torch.arange(4), state.frame_t]
        ker.err_sum = core._pixel_scores(cube_loss, frames, state.canvas)[0]
        before = ker.err_sum.clone()
        out = torch.full((4,), float("nan"), dtype=torch.float64)
        delta = params.reconstructor.gaze_static(ker, action, active, cube, delta_out=out)
        assert delta is out and calls == [None]  # pasted without a loss, then rescored
        after = core._pixel_scores(cube_loss, frames, ker.canvas)[0]
        torch.testing.assert_close(delta, torch.where(active, after - before, 0.0), rtol=0, atol=0)
