import json

import pytest

from agents.baselines import BASELINES
from experiments.common import parse_config
from experiments.evaluate_baselines import EvaluateBaselinesConfig, evaluate, main, markdown_table
from gaze_env.video import TensorSource, materialize
from tests.conftest import random_clips


@pytest.fixture
def clip_file(tmp_path):
    return str(materialize(TensorSource(random_clips(4, seed=9)), tmp_path / "clips.pt", progress=False))


def test_evaluate__oracle_beats_random_and_error_greedy_at_every_ratio(clip_file):
    cfg = EvaluateBaselinesConfig(videos=clip_file, num_clips=4, ratios=(0.05, 0.2), batch_size=3)
    results = evaluate(cfg)
    losses = results["mean_frame_loss"]
    assert list(losses) == list(BASELINES)
    for ratio in ("0.05", "0.2"):
        assert losses["greedy_oracle"][ratio] < losses["random"][ratio]
        assert losses["greedy_oracle"][ratio] < losses["error_greedy"][ratio]
    for name in BASELINES:  # more gazes, lower loss
        assert losses[name]["0.2"] < losses[name]["0.05"]
    assert results["budgets"] == {"0.05": 4, "0.2": 16}


def test_main__prints_markdown_table_and_writes_json(clip_file, tmp_path, capsys):
    out = tmp_path / "res.json"
    main(
        [
            "--videos",
            clip_file,
            "--num-clips",
            "2",
            "--ratios",
            "0.1",
            "--baselines",
            "raster",
            "random",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "| baseline | ratio 0.1 |" in printed and "| raster |" in printed and "| random |" in printed
    saved = json.loads(out.read_text())
    assert set(saved["mean_frame_loss"]) == {"raster", "random"}
    assert saved["config"]["ratios"] == [0.1] and saved["table"] in printed


def test_markdown_table__rows_per_baseline_columns_per_ratio():
    table = markdown_table({"a": {0.02: 0.5, 0.1: 0.25}, "b": {0.02: 0.125, 0.1: 0.0625}}, (0.02, 0.1))
    assert table.splitlines() == [
        "| baseline | ratio 0.02 | ratio 0.1 |",
        "|---|---:|---:|",
        "| a | 0.5000 | 0.2500 |",
        "| b | 0.1250 | 0.0625 |",
    ]


def test_config__parses_tuples_and_rejects_unknown_baselines():
    cfg = parse_config(EvaluateBaselinesConfig, ["--ratios", "0.02", "0.3", "--baselines", "rgb-diff"])
    assert cfg.ratios == (0.02, 0.3) and cfg.baselines == ("rgb-diff",)
    with pytest.raises(ValueError, match="unknown baselines \\['nope'\\]"):
        EvaluateBaselinesConfig(baselines=("nope",))
    with pytest.raises(SystemExit):
        parse_config(EvaluateBaselinesConfig, ["--ratios", "abc"])
