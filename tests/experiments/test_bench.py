"""experiments.bench: a tiny CPU run writes JSON and a Markdown table that record the step mode,
the frame ends seen and the profile; the byte model drops the observation copies of reused buffers."""

import json

import pytest

from experiments import bench
from gaze_env.config import get_preset


def test_bench__cpu_run_records_step_mode_frame_ends_and_profile(tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    argv = ["--presets", "tiny", "--batch-sizes", "1,4", "--modes", "gym,vector,torchrl", "--step-mode", "static"]
    argv += ["--steps", "10", "--warmup", "1", "--profile", "2", "--threads", "1", "--out", str(out)]
    bench.main(argv + ["--markdown", str(md)])
    data = json.loads(out.read_text())
    assert data["step_mode"] == "static"
    rows = {(r["mode"], r["batch_size"]): r for r in data["results"]}
    assert set(rows) == {("gym", 1), ("vector", 1), ("vector", 4), ("torchrl", 1), ("torchrl", 4)}
    assert rows["gym", 1]["step_mode"] == "eager" and rows["vector", 4]["step_mode"] == "static"
    assert not any(r["graphs"] for r in data["results"])  # no CUDA here
    assert all(0 < r["frame_end_fraction"] <= 1 for r in data["results"])  # budget 8: frames end within 11 steps
    assert all(r["profile"]["steps"] == 2 for r in data["results"])
    text = md.read_text()
    assert "<!-- bench:" in text and "-static -->" in text and "| tiny | vector | static | 4 |" in text


def test_bytes_per_step__reused_observation_buffers_move_far_less():
    grid = get_preset("paper").grid
    fresh, reused = bench.bytes_per_step(grid, 26), bench.bytes_per_step(grid, 26, fresh_obs=False)
    assert fresh == pytest.approx(654.3e3, rel=1e-3)  # the figure of the first GPU table
    assert fresh - reused == pytest.approx(4 * 3 * 224 * 224)  # frame gather + canvas copy, read + write
    assert reused < 60e3
