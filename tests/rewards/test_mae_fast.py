"""The MAE reward's fast path: sync-free padded preparation and CUDA-graph replay (``MAEGraphRunner``).

CPU tests check the padded path against ``BlockCausalMAE.prepare`` / ``reconstruct`` exactly; the
``gpu`` tests check the graphed path against the eager one on CUDA (bf16 tolerance)."""

import pytest
import torch

from gaze_env import core
from gaze_env.config import GazeEnvConfig
from rewards.losses import l1
from rewards.mae import (
    BlockCausalMAE,
    MAEConfig,
    MAEGraphRunner,
    MAEReconstructor,
    benchmark,
    sample_gaze_counts,
    sample_gaze_masks,
    token_capacity,
)
from tests.conftest import random_clips


def scrambled(preset: str = "tiny", size: str = "tiny", seed: int = 0, device: str = "cpu") -> BlockCausalMAE:
    """An untrained model whose output head is not zero, so the whole network shapes the output."""
    torch.manual_seed(seed)
    model = BlockCausalMAE(MAEConfig.make(preset, size)).eval()
    torch.nn.init.normal_(model.head.weight, std=0.05)
    return model.to(device)


def ragged(model: BlockCausalMAE, B: int, seed: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Clips (B, T, 3, H, W) uint8 and training-like gazes (B, T, N) bool with very different counts:
    clip 1 has one coarse gaze per frame, clip 2 none at all."""
    preset = model.config.preset
    video = random_clips(B, preset, seed=seed)
    g = torch.Generator().manual_seed(seed)
    counts = sample_gaze_counts(B, video.shape[1], model.grid.num_patches, g)
    gazed = sample_gaze_masks(model.grid, video, counts, g)
    gazed[1] = False
    gazed[1, :, 0] = True
    gazed[2] = False
    return video.to(device), gazed.to(device)


# ---- the padded, sync-free preparation -------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", "small", "paper"])  # small, paper: paste cells finer than patches
@pytest.mark.parametrize("extra", [0, 37])
def test_prepare_padded__equals_prepare_on_ragged_batches(preset, extra):
    model = scrambled(preset)
    video, gazed = ragged(model, 4, seed=1)
    T = video.shape[1]
    frames = torch.tensor([[T - 1, 1], [2, 2], [0, 5], [6, 3]])  # unsorted, repeated, clip 2 never gazed
    ref = model.prepare(video, gazed, frames)
    L = ref.tokens.shape[1]
    out = model.prepare_padded(video, gazed, frames, L + extra)
    assert out.tokens.shape == (4, L + extra, ref.tokens.shape[2])
    for name in ("prior", "prior_age", "prior_level"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name
    assert torch.equal(out.token_valid[:, :L], ref.token_valid) and not out.token_valid[:, L:].any()
    valid = ref.token_valid
    for name in ("tokens", "token_index", "token_frame"):
        assert torch.equal(getattr(out, name)[:, :L][valid], getattr(ref, name)[valid]), name
    assert (out.token_frame[~out.token_valid] == T).all()  # padding reads as a frame after every query
    with torch.no_grad():
        torch.testing.assert_close(model(out), model(ref), atol=1e-5, rtol=0)  # padding is masked out


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_prepare_padded__saturated_pixels_paste_like_prepare(preset):
    """Black / white pixel noise pushes the resized views to the ends of [0, 255] (where
    ``prepare`` clamps and the padded path does not need to)."""
    model = scrambled(preset)
    T, H, N = model.config.num_frames, model.grid.frame_size, model.grid.num_patches
    g = torch.Generator().manual_seed(0)
    video = (torch.rand(2, T, 3, H, H, generator=g) < 0.5).to(torch.uint8) * 255
    gazed = torch.rand(2, T, N, generator=g) < 0.3
    frames = torch.tensor([[T - 1, T // 2], [3, 1]])
    ref = model.prepare(video, gazed, frames)
    out = model.prepare_padded(video, gazed, frames, ref.tokens.shape[1])
    assert torch.equal(out.prior, ref.prior) and torch.equal(out.tokens, ref.tokens)


def test_prepare_padded__capacity_holds_the_first_tokens_in_order():
    model = scrambled()
    video, gazed = ragged(model, 3, seed=2)
    frames = torch.tensor([[7], [7], [7]])
    ref = model.prepare(video, gazed, frames)
    cut = model.prepare_padded(video, gazed, frames, 5)  # fewer slots than clip 0 has tokens
    n = ref.token_valid.sum(1)
    assert n[0] > 5 and cut.token_valid.sum(1).tolist() == n.clamp(max=5).tolist()
    assert torch.equal(cut.token_index[0], ref.token_index[0, :5])


def test_token_capacity__multiples_of_16_with_little_padding_and_few_sizes():
    caps = [token_capacity(n) for n in range(0, 4241)]  # up to T N of the paper preset
    assert all(c >= max(n, 16) and c % 16 == 0 for n, c in enumerate(caps))
    assert all(c <= max(32, 1.125 * n + 16) for n, c in enumerate(caps))
    assert len(set(caps)) < 60  # few graphs to capture
    assert token_capacity(416) == 416  # paper preset at ratio 0.1: 16 frames x 26 gazes, no padding


# ---- the runner ------------------------------------------------------------------------------
def test_mae_graph_runner__padded_path_equals_reconstruct_on_cpu():
    model = scrambled(seed=3)
    runner = MAEGraphRunner(model)  # on the CPU: no graphs, the padded path eagerly
    video, gazed = ragged(model, 5, seed=3)
    for frames in (torch.tensor([[7, 1], [2, 2], [0, 5], [6, 3], [4, 4]]), torch.tensor([[0], [1], [2], [1], [0]])):
        torch.testing.assert_close(
            runner(video, gazed, frames), model.reconstruct(video, gazed, frames), atol=1e-5, rtol=0
        )
    assert runner.num_graphs == 0


def test_mae_graph_runner__bad_inputs_raise():
    model = scrambled()
    video, gazed = ragged(model, 3, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 8\), got 0\.\.8"):
        MAEGraphRunner(model)(video, gazed, torch.tensor([[0], [8], [1]]))
    with pytest.raises(ValueError, match="gazed must be bool"):
        MAEGraphRunner(model)(video, gazed.long(), torch.tensor([[0], [1], [1]]))
    with pytest.raises(ValueError, match="graphs=True needs CUDA"):
        MAEGraphRunner(model, graphs=True)(video, gazed, torch.tensor([[0], [1], [1]]))


def test_benchmark__padded_mode_matches_eager_on_cpu():
    rows = benchmark("tiny", "tiny", (3,), 2, (0.1, 0.5), "cpu", iters=1, warmup=0, modes=("eager", "padded"))
    assert [(r["ratio"], r["mode"]) for r in rows] == [(0.1, "eager"), (0.1, "padded"), (0.5, "eager"), (0.5, "padded")]
    assert all(r["clips_per_s"] > 0 and r["max_abs_diff"] <= 1e-5 for r in rows)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        benchmark("tiny", "tiny", (1,), device="cpu", modes=("graph",))


# ---- CUDA ------------------------------------------------------------------------------------
def needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def bf16_close(out: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor) -> None:
    """``out`` is as close to the float32 result ``exact`` as bf16 ``eager`` is (both in bf16)."""
    err, err_eager = (out - exact).abs(), (eager - exact).abs()
    assert err.max() <= 1.5 * err_eager.max() + 2e-3, (err.max(), err_eager.max())
    assert err.mean() <= 1.5 * err_eager.mean() + 1e-4, (err.mean(), err_eager.mean())


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["small", "paper"])
def test_mae_graph_runner__graphs_equal_eager_on_cuda(preset):
    needs_cuda()
    model = scrambled(preset, "small", seed=4, device="cuda")
    video, gazed = ragged(model, 10, seed=4, device="cuda")
    T = video.shape[1]
    frames = torch.randint(0, T, (10, 2), generator=torch.Generator().manual_seed(4)).cuda()
    frames[0] = T - 1  # clip 0 holds the most tokens, so the 9-clip batch below has the same shapes
    gazed[0] = gazed[3]
    ref = model.prepare(video, gazed, frames)
    padded = model.prepare_padded(video, gazed, frames, token_capacity(ref.tokens.shape[1]))
    assert torch.equal(padded.prior, ref.prior) and torch.equal(padded.prior_age, ref.prior_age)
    runner = MAEGraphRunner(model)
    for B in (10, 9, 3):  # 9 replays the graph of 10 with a stale last row, 3 has its own
        v, g, f = video[:B], gazed[:B], frames[:B]
        out = runner(v, g, f)
        with torch.no_grad():
            exact = model(model.prepare(v, g, f)).float().clamp(0, 1)
        bf16_close(out, model.reconstruct(v, g, f), exact)
        torch.testing.assert_close(out, MAEGraphRunner(model, graphs=False)(v, g, f), atol=2e-2, rtol=0)
    assert runner.num_graphs == 2
    with torch.no_grad():
        model.head.weight.mul_(-1)  # graphs read the weights in place
    torch.testing.assert_close(runner(video, gazed, frames), model.reconstruct(video, gazed, frames), atol=2e-2, rtol=0)
    assert runner.num_graphs == 2


@pytest.mark.gpu
def test_mae_reconstructor__graphed_env_run_matches_eager_on_cuda():
    needs_cuda()
    model = scrambled("small", "small", seed=5, device="cuda")
    video = random_clips(6, "small", seed=5).cuda()
    cfg = GazeEnvConfig.from_preset("small", reward_frame_rate=0.125)
    losses = []
    for graphs in (None, False):
        params = core.CoreParams.build(cfg, l1, MAEReconstructor(model, graphs=graphs))
        state = core.reset(params, video, generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(1)
        while not bool(state.done.all()):
            mask = core.action_mask(params, state)[:, :-1].cpu()
            core.step(params, state, torch.rand(mask.shape, generator=g).masked_fill(~mask, -1).argmax(1).cuda())
        losses.append(state.frame_loss)
        assert state.reward_frames.sum() == 12
    torch.testing.assert_close(losses[0], losses[1], atol=3e-3, rtol=0)
