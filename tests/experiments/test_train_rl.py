"""The RL entry point end to end at toy size: export, exact resume, errors, metrics, bench mode."""

import json

import pytest
import torch
from safetensors.torch import load_file

from agents.policy import AutoGazePolicy
from experiments.train_rl import TrainRLConfig, main, ratio_to_threshold
from experiments.training import latest_checkpoint, step_dir
from gaze_env.video import TensorSource, materialize
from tests.conftest import random_clips


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A clip file (train and val alike) and a 'behaviour-cloned' policy export to start from."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rl")
    videos = materialize(TensorSource(random_clips(6, seed=7)), root / "clips.pt", progress=False)
    torch.manual_seed(0)
    AutoGazePolicy.from_preset("tiny").save_pretrained(root / "bc")
    return videos, root / "bc"


def argv(assets, out, *extra: str) -> list[str]:
    videos, init = assets
    return [
        "--videos", str(videos), "--init", str(init), "--out", str(out), "--steps", "3", "--clips-per-step", "1",
        "--group-size", "2", "--budgets", "fixed", "--gazing-ratio", "0.04", "--eval-clips", "2",
        "--eval-ratios", "0.04", "--sweep-ratios", "0.02", "0.04", "--eval-interval", "2", "--ckpt-interval", "2",
        "--eval-threshold", "0.2", "--no-progress", "--lr", "1e-3", *extra,
    ]


def test_train_rl__exports_final_and_resumes_exactly(assets, tmp_path):
    whole = main(argv(assets, tmp_path / "a", "--no-compare"))
    final = tmp_path / "a" / "final"
    assert {"config.json", "model.safetensors", "rl.json"} <= {p.name for p in final.iterdir()}
    policy = AutoGazePolicy.from_pretrained(final)
    start = load_file(assets[1] / "model.safetensors")
    assert any(not torch.equal(v, start[k]) for k, v in policy.state_dict().items())  # it trained
    assert json.loads((final / "rl.json").read_text())["step"] == 3
    assert [h["step"] for h in whole["eval_history"]] == [0, 2]
    assert set(whole["metrics"]) == {"rl (grpo)"}
    assert {"loss@0.04", "ratio@thr", "unreached", "stop_ratio", "stop_loss"} <= set(whole["metrics"]["rl (grpo)"])
    assert (tmp_path / "a" / "results.md").exists() and (tmp_path / "a" / "tb").is_dir()

    assert main(argv(assets, tmp_path / "b", "--no-compare", "--stop-at", "2")) == {"step": 2, "steps": 3}
    assert latest_checkpoint(tmp_path / "b") == step_dir(tmp_path / "b", 2) and not (tmp_path / "b" / "final").exists()
    resumed = main(argv(assets, tmp_path / "b", "--no-compare", "--resume"))
    a, b = load_file(final / "model.safetensors"), load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical to the uninterrupted run
    assert resumed["metrics"] == whole["metrics"]

    with pytest.raises(FileExistsError, match="--resume"):
        main(argv(assets, tmp_path / "a", "--no-compare"))
    with pytest.raises(ValueError, match="lr"):
        main(argv(assets, tmp_path / "b", "--no-compare", "--resume", "--lr", "5e-4"))


def test_train_rl__ppo_and_the_comparison_rows(assets, tmp_path):
    out = main(argv(assets, tmp_path, "--algo", "ppo", "--steps", "1", "--eval-interval", "0", "--minibatches", "1",
                    "--epochs", "2"))
    assert list(out["metrics"]) == ["rl (ppo)", "init (bc)", "greedy_oracle", "random"]
    assert "stop_ratio" not in out["metrics"]["random"]
    oracle, rand = out["metrics"]["greedy_oracle"], out["metrics"]["random"]
    assert oracle["loss@0.04"] < rand["loss@0.04"]
    assert "| greedy_oracle |" in out["table"]
    assert AutoGazePolicy.from_pretrained(tmp_path / "final").value_head is not None


def test_train_rl__without_a_bc_export_says_to_run_make_train_bc(tmp_path):
    with pytest.raises(FileNotFoundError, match="make train-bc"):
        main(["--init", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"), "--no-progress"])
    assert TrainRLConfig().init_dir.as_posix() == "runs/bc/tiny/final"


def test_ratio_to_threshold__interpolates_the_first_crossing():
    per_clip = torch.tensor([[0.3, 0.2, 0.1], [0.05, 0.04, 0.03], [0.3, 0.3, 0.3], [0.3, 0.12, 0.05]])
    ratio, unreached = ratio_to_threshold(per_clip.double(), [0.1, 0.2, 0.3], 0.15)
    assert torch.allclose(ratio, torch.tensor([0.25, 0.1, 0.3, 0.1 + 0.1 * 0.15 / 0.18], dtype=torch.float64))
    assert unreached == 1


def test_train_rl__bench_reports_throughput_and_where_the_time_goes():
    out = main(["--bench", "--init", "random", "--clips-per-step", "1", "--group-size", "2", "--bench-steps", "1",
                "--gazing-ratio", "0.04"])
    assert out["episodes_per_step"] == 2 and out["episodes_per_s"] > 0
    assert {"budgets", "generate", "replay", "update"} == set(out["seconds"])
    assert out["gazes_per_episode"] == 8 * 3
