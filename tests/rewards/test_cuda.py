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


def test_paste_reconstructor__cupy_flag_runs_the_torch_code_off_cuda():
    grid = get_preset("tiny").grid
    with pytest.raises(ValueError, match="kernel must be 'torch' or 'cupy'"):
        PasteReconstructor(grid, kernel="triton")
    flagged = PasteReconstructor(grid, kernel="cupy")
    for params, state, action, active in random_play("tiny", "l1", B=3, steps=10, device="cpu"):
        a, b = state.clone(), state.clone()
        d_flag = flagged.gaze(a, action, active, params.loss.pixel_error)
        d_torch = params.reconstructor.gaze(b, action, active, params.loss.pixel_error)
        assert torch.equal(a.canvas, b.canvas) and torch.equal(d_flag, d_torch)


def test_paste_reconstructor__cupy_flag_sends_cuda_states_to_the_kernel(monkeypatch):
    # wiring only (no GPU here): a stand-in CUDA state, CuPy "importable", the kernel recorded
    calls = []
    monkeypatch.setattr(cuda, "cupy_module", lambda: SimpleNamespace())
    monkeypatch.setattr(cuda, "paste_gaze", lambda grid, state, action, active, pe: calls.append(pe) or "delta")
    x = torch.zeros(1)
    state = SimpleNamespace(device=torch.device("cuda"), canvas=x, video=x, aux={"level": x, "views": x})
    rec = PasteReconstructor(get_preset("tiny").grid, kernel="cupy")
    action, active = torch.zeros(1, dtype=torch.int64), torch.ones(1, dtype=torch.bool)
    assert rec.gaze(state, action, active, losses.mse.pixel_error) == "delta"
    assert calls == [losses.mse.pixel_error]


def test_cuda__loss_modes_and_support_without_cuda_tensors():
    assert cuda.pixel_error_mode(losses.l1.pixel_error) == 0
    assert cuda.pixel_error_mode(losses.mse.pixel_error) == cuda.pixel_error_mode(losses.psnr.pixel_error) == 1
    assert cuda.pixel_error_mode(None) == -1
    assert cuda.pixel_error_mode(lambda t, r: (t - r) ** 4) is None
    _, state, _, _ = next(random_play("tiny", "l1", B=2, steps=1, device="cpu"))
    assert not cuda.supports(state, losses.l1.pixel_error)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny", "small", "paper"])
@pytest.mark.parametrize("loss", ["l1", "mse", "psnr", "ssim"])
def test_paste_gaze__cupy_kernel_equals_torch_reference_on_random_states(preset, loss):
    needs_cuda_and_cupy()
    for params, state, action, active in random_play(preset, loss, B=64, steps=30, device="cuda", seed=1):
        grid = params.config.grid
        pixel_error = getattr(params.loss, "pixel_error", None)
        assert cuda.supports(state, pixel_error)
        ref, ker = state.clone(), state.clone()
        d_ref = paste_gaze(grid, ref, action, active, pixel_error)
        d_ker = cuda.paste_gaze(grid, ker, action, active, pixel_error)
        assert torch.equal(ker.canvas, ref.canvas)
        assert torch.equal(ker.aux["level"], ref.aux["level"])
        if pixel_error is None:
            assert d_ker is None and d_ref is None
            continue
        exact, magnitude = exact_change(pixel_error, state, ref)
        assert (d_ker - exact).abs().max().item() <= 1e-6
        # the reference sums in float32: equal up to its rounding
        assert ((d_ref - d_ker).abs() <= 1e-5 * (1 + magnitude)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("loss", ["l1", "mse"])
def test_paste_reconstructor__cupy_env_run_matches_the_torch_run(loss):
    needs_cuda_and_cupy()
    grid = get_preset("tiny").grid
    runs = []
    for kernel in ("torch", "cupy"):
        rec = PasteReconstructor(grid, kernel=kernel)
        # one state object, stepped in place: once the play is exhausted it is past its last step
        state = list(random_play("tiny", loss, B=16, steps=80, device="cuda", seed=2, reconstructor=rec))[-1][1]
        runs.append((state.canvas, state.loss, state.frame_loss))
    (canvas_t, loss_t, frames_t), (canvas_c, loss_c, frames_c) = runs
    assert torch.equal(canvas_t, canvas_c)
    torch.testing.assert_close(loss_c, loss_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(frames_c, frames_t, rtol=1e-5, atol=1e-6, equal_nan=True)
