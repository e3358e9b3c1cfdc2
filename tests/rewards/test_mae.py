import gymnasium
import numpy as np
import pytest
import torch

import gaze_env  # noqa: F401  (registers AutoGaze-v0)
from experiments.train_recon import paste_frame_losses
from experiments.training import save_checkpoint
from gaze_env import core
from gaze_env.config import GazeEnvConfig
from rewards.base import make_reward
from rewards.losses import l1
from rewards.mae import (
    BlockCausalMAE,
    MAEConfig,
    MAEReconstructor,
    benchmark,
    load_mae,
    mae_loss,
    sample_gaze_counts,
    sample_gaze_masks,
)
from tests.conftest import random_clips


def untrained(seed: int = 0, preset: str = "tiny") -> BlockCausalMAE:
    torch.manual_seed(seed)
    return BlockCausalMAE(MAEConfig.make(preset, "tiny")).eval()


def scrambled(seed: int = 0) -> BlockCausalMAE:
    """An untrained model whose output head is not zero, so the whole network shapes the output."""
    model = untrained(seed)
    torch.nn.init.normal_(model.head.weight, std=0.05)
    return model


def masks(video: torch.Tensor, seed: int = 0, **kwargs) -> torch.Tensor:
    grid = MAEConfig.make("tiny").grid
    g = torch.Generator().manual_seed(seed)
    counts = sample_gaze_counts(video.shape[0], video.shape[1], grid.num_patches, g, **kwargs)
    return sample_gaze_masks(grid, video, counts, g)


def all_frames(B: int, T: int) -> torch.Tensor:
    return torch.arange(T).expand(B, T)


# ---- the network -----------------------------------------------------------------------------
def test_block_causal_mae__untrained_reconstructs_the_paste_canvas_of_the_core():
    video = random_clips(3, seed=1)
    gazed = masks(video)
    model = untrained()
    mae = l1(video.flatten(0, 1).float() / 255, model.reconstruct(video, gazed, all_frames(3, 8)).flatten(0, 1))
    paste = paste_frame_losses(model.grid, video, gazed)
    torch.testing.assert_close(mae.reshape(3, 8), paste, atol=1e-6, rtol=0)


def test_block_causal_mae__frame_t_never_depends_on_later_frames():
    model = scrambled()
    video = random_clips(2, seed=2)
    gazed = masks(video, seed=2)
    t = 3
    later = video.clone()
    later[:, t + 1 :] = 255 - later[:, t + 1 :]
    gazed_later = gazed.clone()
    gazed_later[:, t + 1 :] = torch.rand(gazed[:, t + 1 :].shape, generator=torch.Generator().manual_seed(9)) < 0.5
    frames = torch.tensor([[t, 7], [t, 6]])  # later frames are requested too, so their tokens are encoded
    a = model.reconstruct(video, gazed, frames)
    b = model.reconstruct(later, gazed_later, frames)
    torch.testing.assert_close(a[:, 0], b[:, 0], atol=1e-5, rtol=0)
    assert (a[:, 1] - b[:, 1]).abs().max() > 0.1  # the later frames did change


def test_block_causal_mae__earlier_frames_do_shape_later_ones():
    model = scrambled()
    video = random_clips(1, seed=3)
    gazed = masks(video, seed=3)
    other = video.clone()
    other[:, 0] = 255 - other[:, 0]
    frames = torch.tensor([[5]])
    assert (model.reconstruct(video, gazed, frames) - model.reconstruct(other, gazed, frames)).abs().max() > 1e-3


def test_block_causal_mae__ragged_batch_equals_per_clip_runs():
    model = scrambled(1)
    video = random_clips(3, seed=4)
    gazed = masks(video, seed=4)
    gazed[1] = False
    gazed[1, :, 0] = True  # one coarse gaze per frame next to clips with many
    gazed[2, :, :40] = True
    frames = torch.tensor([[7, 1], [2, 2], [0, 5]])
    batched = model.reconstruct(video, gazed, frames)
    for i in range(3):
        single = model.reconstruct(video[i : i + 1], gazed[i : i + 1], frames[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single, atol=1e-5, rtol=0)


def test_block_causal_mae__packs_only_gazed_tokens_up_to_the_batch_max():
    model = untrained()
    video = random_clips(2)
    gazed = torch.zeros(2, 8, 84, dtype=torch.bool)
    gazed[0, :, :3] = True  # 24 tokens
    gazed[1, :, :1] = True  # 8 tokens
    inputs = model.prepare(video, gazed, torch.tensor([[7], [7]]))
    assert inputs.tokens.shape[1] == 24
    assert inputs.token_valid.sum(1).tolist() == [24, 8]
    inputs = model.prepare(video, gazed, torch.tensor([[1], [7]]))  # clip 0 needs frames 0..1 only
    assert inputs.token_valid.sum(1).tolist() == [6, 8]


def test_block_causal_mae__bad_inputs_raise_with_shapes():
    model = untrained()
    video = random_clips(1)
    gazed = masks(video)
    with pytest.raises(ValueError, match="uint8"):
        model.reconstruct(video.float(), gazed, torch.tensor([[0]]))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        model.reconstruct(video, gazed, torch.tensor([[8]]))
    with pytest.raises(ValueError, match="gazed must be bool"):
        model.reconstruct(video, gazed[..., :10], torch.tensor([[0]]))


@pytest.mark.slow
def test_block_causal_mae__more_gazes_lower_expected_loss_after_brief_training():
    torch.manual_seed(0)
    model = BlockCausalMAE(MAEConfig.make("tiny", "tiny"))
    train = random_clips(32, seed=10)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(30):
        video = train[(torch.arange(8) + 8 * step) % 32]
        counts = sample_gaze_counts(8, 8, 84, g)
        gazed = sample_gaze_masks(model.grid, video, counts, g)
        loss, _ = mae_loss(model, video, gazed, torch.rand(8, 8, generator=g).argsort(-1)[:, :3], l1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.head.weight.abs().max() > 0  # it did move away from the paste canvas
    video = random_clips(12, seed=11)
    rank = torch.rand(12, 8, 84, generator=torch.Generator().manual_seed(1)).argsort(-1).argsort(-1)
    losses = []
    for n in (2, 5, 10, 20, 40):
        recon = model.reconstruct(video, rank < n, all_frames(12, 8))  # nested: each mask holds the previous
        losses.append(l1(video.flatten(0, 1).float() / 255, recon.flatten(0, 1)).mean().item())
    assert all(b <= a * 1.01 for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.8 * losses[0], losses


# ---- training gazes --------------------------------------------------------------------------
def test_sample_gaze_counts__bounded_and_first_frame_heavier():
    g = torch.Generator().manual_seed(0)
    counts = sample_gaze_counts(2000, 8, 84, g)
    assert counts.min() >= 1 and counts.max() <= 84
    ratio = counts.sum(1) / (84 * 8)
    assert ratio.min() >= 0.015 and ratio.max() <= 0.21  # ~[0.02, 0.2] up to rounding
    assert counts[:, 0].float().mean() > 1.8 * counts[:, 1:].float().mean()
    assert ratio.median() < 0.11  # exponential: mass near the low end


def test_sample_gaze_masks__exact_counts_and_biases():
    grid = MAEConfig.make("tiny").grid
    video = torch.full((400, 2, 3, 64, 64), 128, dtype=torch.uint8)
    video[:, 1, :, :16, :16] = 255  # only the top-left corner changes in frame 1
    counts = torch.full((400, 2), 6)
    g = torch.Generator().manual_seed(0)
    uniform = sample_gaze_masks(grid, video, counts, g, uniform_prob=1.0)
    biased = sample_gaze_masks(grid, video, counts, g, coarse_bias=1.0, uniform_prob=0.0)
    assert (uniform.sum(-1) == 6).all() and (biased.sum(-1) == 6).all()
    coarse = grid.scale_masks[0]
    assert biased[:, 0][:, coarse].float().mean() > 3 * uniform[:, 0][:, coarse].float().mean()
    corner = grid.pixel_mask(torch.eye(84, dtype=torch.bool))[:, :16, :16].any(-1).any(-1)  # patches over it
    share = biased[:, 1][:, corner].sum() / biased[:, 1].sum()
    assert share > 2 * (uniform[:, 1][:, corner].sum() / uniform[:, 1].sum())


# ---- checkpoints -----------------------------------------------------------------------------
def tiny_checkpoint(path, seed: int = 0):
    model = scrambled(seed)
    return save_checkpoint(path, model, model.checkpoint_config()), model


def test_load_mae__round_trip_is_bit_exact(tmp_path):
    path, model = tiny_checkpoint(tmp_path / "ck")
    loaded = load_mae(path)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    video = random_clips(2)
    gazed = masks(video)
    frames = torch.tensor([[1, 7], [0, 4]])
    assert torch.equal(model.reconstruct(video, gazed, frames), loaded.reconstruct(video, gazed, frames))


def test_load_mae__missing_or_foreign_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_recon"):
        load_mae(tmp_path / "nowhere")
    path = save_checkpoint(tmp_path / "other", torch.nn.Linear(2, 2), {"kind": "policy"})
    with pytest.raises(ValueError, match="not an MAE checkpoint"):
        load_mae(path)
    run = tmp_path / "run"
    tiny_checkpoint(run / "final")
    assert isinstance(load_mae(run), BlockCausalMAE)  # a run folder means its final/ checkpoint


# ---- the environment -------------------------------------------------------------------------
def test_mae_reward__needs_a_checkpoint():
    with pytest.raises(ValueError, match="checkpoint"):
        make_reward("mae")
    with pytest.raises(FileNotFoundError, match="no MAE checkpoint"):
        make_reward("mae", checkpoint="/nonexistent/ck")


def test_mae_reward__geometry_mismatch_is_reported_at_reset(tmp_path):
    path, _ = tiny_checkpoint(tmp_path / "ck")
    env = gymnasium.make(
        "AutoGaze-v0",
        preset="small",
        videos=random_clips(1, "small"),
        reward="mae",
        reward_kwargs={"checkpoint": str(path)},
    )
    with pytest.raises(ValueError, match=r"tiny geometry \(64 px.*112 px"):
        env.reset(seed=0)


def test_mae_reward__env_runs_an_episode_scored_by_the_mae(tmp_path):
    path, model = tiny_checkpoint(tmp_path / "ck")
    videos = random_clips(2, seed=5)
    env = gymnasium.make("AutoGaze-v0", videos=videos, reward="mae", reward_kwargs={"checkpoint": str(path)})
    obs, info = env.reset(seed=0, options={"clip_index": 1})
    rng = np.random.default_rng(0)
    rewards, terminated = [], False
    while not terminated:
        obs, r, terminated, _, info = env.step(int(rng.choice(np.flatnonzero(obs["action_mask"]))))
        rewards.append(r)
    state = env.unwrapped.state
    expected = l1(
        videos[1].float() / 255, model.reconstruct(videos[1:2], state.history, all_frames(1, 8))[0]
    )  # every frame's MAE loss from the episode's gazes
    np.testing.assert_allclose(info["frame_loss"], expected.numpy(), atol=1e-5)
    scored = [r for r in rewards if r != 0.0]
    np.testing.assert_allclose(scored, -expected.numpy(), atol=1e-5)
    paste = paste_frame_losses(model.grid, videos[1:2], state.history)[0]
    assert not np.allclose(info["frame_loss"], paste.numpy(), atol=1e-4)  # not the paste canvas's loss


def test_mae_reconstructor__scored_frames_only_in_a_ragged_batch(tmp_path):
    model = scrambled(2)
    video = random_clips(3, seed=6)
    cfg = GazeEnvConfig.from_preset("tiny", reward_frame_rate=0.25)
    params = core.CoreParams.build(cfg, l1, MAEReconstructor(model, frames="scored"))
    budgets = torch.tensor([[2] * 8, [5] * 8, [1, 3, 2, 4, 1, 2, 3, 9]])
    state = core.reset(params, video, generator=torch.Generator().manual_seed(0), budgets=budgets)
    g = torch.Generator().manual_seed(1)
    while not bool(state.done.all()):
        mask = core.action_mask(params, state)[:, :84]
        core.step(params, state, torch.rand(3, 84, generator=g).masked_fill(~mask, -1).argmax(1))
    mae = l1(video.flatten(0, 1).float() / 255, model.reconstruct(video, state.history, all_frames(3, 8)).flatten(0, 1))
    paste = paste_frame_losses(model.grid, video, state.history).flatten()
    scored = state.reward_frames.flatten()
    assert scored.sum() == 6
    torch.testing.assert_close(state.frame_loss.flatten()[scored], mae[scored], atol=1e-5, rtol=0)
    torch.testing.assert_close(state.frame_loss.flatten()[~scored], paste[~scored], atol=1e-6, rtol=0)


def test_benchmark__reports_positive_throughput_on_cpu():
    (row,) = benchmark("tiny", "tiny", (2,), recon_frames=2, device="cpu", iters=1, warmup=0)
    assert row["clips_per_s"] > 0 and row["batch"] == 2 and row["params"] > 0
