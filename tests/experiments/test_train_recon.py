import json

import pytest
import torch

from experiments.common import build_parser
from experiments.train_recon import (
    TrainReconConfig,
    gazer_masks,
    main,
    paste_frame_losses,
    quality_table,
    train,
)
from experiments.training import latest_checkpoint, load_checkpoint, step_dir
from gaze_env.config import GazeEnvConfig
from gaze_env.core import CoreParams
from gaze_env.video import TensorSource
from rewards.losses import l1
from rewards.mae import BlockCausalMAE, MAEConfig, load_mae
from tests.conftest import random_clips


def sources():
    return TensorSource(random_clips(12, seed=1)), TensorSource(random_clips(4, seed=2))


def config(tmp_path, **overrides) -> TrainReconConfig:
    base = dict(
        out=str(tmp_path),
        steps=6,
        batch_size=3,
        frames_per_clip=2,
        warmup_steps=2,
        save_every=3,
        eval_every=0,
        eval_clips=4,
        quality=False,
        progress=False,
        log_every=2,
    )
    return TrainReconConfig(**{**base, **overrides})


def test_train_recon__writes_checkpoints_and_resume_continues_exactly(tmp_path):
    whole = train(config(tmp_path / "a"), sources())
    assert sorted(whole.losses) == [1, 2, 3, 4, 5, 6]
    assert whole.final == tmp_path / "a" / "tiny" / "final"
    assert latest_checkpoint(tmp_path / "a" / "tiny") == step_dir(tmp_path / "a" / "tiny", 6)
    assert len(set(whole.losses.values())) == 6  # the loss moves: a frozen run would not test much

    first = train(config(tmp_path / "b", stop_at=3), sources())
    assert first.final is None and sorted(first.losses) == [1, 2, 3]
    second = train(config(tmp_path / "b", resume="latest"), sources())
    assert sorted(second.losses) == [4, 5, 6]
    assert {**first.losses, **second.losses} == whole.losses  # bit-identical loss curve
    a = load_checkpoint(whole.final).weights
    b = load_checkpoint(second.final).weights
    assert all(torch.equal(a[k], b[k]) for k in a)

    model = load_mae(tmp_path / "b" / "tiny")  # the run folder serves its final checkpoint
    assert model.config == MAEConfig.make("tiny", "tiny")


def test_train_recon__refuses_to_clobber_or_resume_with_other_settings(tmp_path):
    train(config(tmp_path, steps=2, save_every=1), sources())
    with pytest.raises(FileExistsError, match="--resume latest"):
        train(config(tmp_path, steps=2), sources())
    with pytest.raises(ValueError, match="lr: 0.001 -> 0.002"):
        train(config(tmp_path, steps=2, lr=2e-3, resume="latest"), sources())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(config(tmp_path / "empty", resume="latest"), sources())
    again = train(config(tmp_path, steps=2, overwrite=True), sources())
    assert sorted(again.losses) == [1, 2]


def test_train_recon__config_validation_and_help():
    with pytest.raises(ValueError, match="frames_per_clip"):
        TrainReconConfig(frames_per_clip=9)
    with pytest.raises(ValueError, match="unknown size"):
        TrainReconConfig(size="huge")
    text = build_parser(TrainReconConfig).format_help()
    assert "Clips per step: the global batch" in text and "(default: 16)" in text and "--resume" in text
    assert "--no-hflip" in text and "--grad-accum" in text


def test_paste_frame_losses__equals_the_baselines_own_rollout():
    from agents.baselines import make_baseline, run_episodes

    grid = MAEConfig.make("tiny").grid
    video = random_clips(3, seed=3)
    gazed = gazer_masks("error_greedy", grid, video, torch.full((3, 8), 5), torch.Generator().manual_seed(0))
    assert (gazed.sum(-1) == 5).all()
    params = CoreParams.build(GazeEnvConfig(grid=grid, num_frames=8), l1)
    td = run_episodes(make_baseline("error_greedy"), params, video, torch.full((3, 8), 5), seed=0)
    torch.testing.assert_close(paste_frame_losses(grid, video, gazed), td["frame_loss"])


def test_quality_table__untrained_mae_ties_with_paste():
    torch.manual_seed(0)
    model = BlockCausalMAE(MAEConfig.make("tiny", "tiny"))
    rows = quality_table(model, random_clips(3, seed=4), (0.05, 0.2), ("random", "raster"))
    assert [(r["masks"], r["gazes_per_frame"]) for r in rows] == [
        ("random", 4),
        ("random", 16),
        ("raster", 4),
        ("raster", 16),
    ]
    for r in rows:
        assert r["mae_l1"] == pytest.approx(r["paste_l1"], abs=1e-6)
    assert rows[1]["paste_l1"] < rows[0]["paste_l1"]


@pytest.mark.slow
def test_train_recon__cli_run_prints_the_quality_table(tmp_path, capsys, monkeypatch):
    import experiments.train_recon as tr

    monkeypatch.setattr(tr, "data_sources", lambda cfg: sources())
    main(
        [
            "--out",
            str(tmp_path),
            "--steps",
            "4",
            "--batch_size",
            "2",
            "--eval_clips",
            "3",
            "--no-progress",
            "--quality_masks",
            "random",
            "raster",
            "--eval_every",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert "final checkpoint:" in out and "MAE/paste" in out and "raster" in out
    rows = json.loads((tmp_path / "tiny" / "quality.json").read_text())
    assert len(rows) == 4 and all(r["mae_l1"] > 0 for r in rows)
