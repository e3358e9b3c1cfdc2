import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.collect_expert import (
    CollectExpertConfig,
    collect,
    expert_chunks,
    load_expert,
    main,
    max_steps,
    sample_budgets,
)
from experiments.common import build_parser, parse_config
from gaze_env.video import TensorSource, materialize
from tests.conftest import random_clips

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def clip_file(tmp_path):
    """Ten tiny random clips in a materialized clip file (no video decoding in these tests)."""
    return str(materialize(TensorSource(random_clips(10, seed=3)), tmp_path / "clips.pt", progress=False))


def config(clip_file, out, **kw) -> CollectExpertConfig:
    base = dict(videos=clip_file, out=str(out), num_clips=10, chunk_clips=3, progress=False)
    return CollectExpertConfig(**{**base, **kw})


def assert_same_data(a, b):
    assert a.batch_size == b.batch_size and set(a.keys()) == set(b.keys())
    for key in a.keys():
        x, y = a[key], b[key]
        assert torch.equal(
            torch.nan_to_num(x, nan=-1.0) if x.is_floating_point() else x,
            torch.nan_to_num(y, nan=-1.0) if y.is_floating_point() else y,
        ), key


def test_sample_budgets__ratio_range_split_and_first_frame_share():
    cfg = CollectExpertConfig()
    T, N = 16, 265
    ratios, shares = [], []
    for i in range(400):
        ratio, budgets = sample_budgets(np.random.default_rng((0, i)), T, N, cfg)
        assert cfg.min_ratio <= ratio <= cfg.max_ratio
        assert budgets.dtype == np.int64 and budgets.shape == (T,)
        assert budgets.min() >= 1 and budgets.max() <= N
        assert budgets.sum() <= max_steps(cfg, T, N)
        if budgets.min() > 1:  # no frame clipped up to 1: the total is exact
            assert budgets.sum() == round(ratio * T * N)
        ratios.append(ratio)
        shares.append(budgets / budgets.sum())
    shares = np.mean(shares, axis=0)
    assert shares[0] > 2.0 * shares[1:].mean()  # alpha 10 vs 3: about 3.3x
    assert np.median(ratios) < (cfg.min_ratio + cfg.max_ratio) / 2  # exponential: mass near the low end
    again = sample_budgets(np.random.default_rng((0, 7)), T, N, cfg)
    assert again[0] == sample_budgets(np.random.default_rng((0, 7)), T, N, cfg)[0]


def test_collect__stores_oracle_trajectories_with_frame_boundaries(clip_file, tmp_path):
    summary = collect(config(clip_file, tmp_path / "out", num_clips=4))
    assert summary.clips == 4 and summary.new_clips == 4 and summary.megabytes > 0
    td = load_expert(tmp_path / "out")
    T, N = 8, 84
    assert td["clip_index"].tolist() == [0, 1, 2, 3]
    assert td["video"].dtype == torch.uint8 and torch.equal(td["video"], random_clips(10, seed=3)[:4])
    assert td["action"].shape == (4, max_steps(CollectExpertConfig(), T, N))
    assert torch.equal(td["counts"], td["budgets"]) and torch.equal(td["valid"].sum(1), td["budgets"].sum(1))
    assert summary.gazes == int(td["valid"].sum())
    for row in range(4):
        valid = td["valid"][row]
        frames, actions = td["frame_id"][row][valid], td["action"][row][valid]
        assert torch.equal(torch.bincount(frames, minlength=T), td["budgets"][row])
        assert bool((frames[1:] >= frames[:-1]).all()) and bool((actions < N).all())
        assert bool((td["action"][row][~valid] == N).all())
        ends = torch.cumsum(td["budgets"][row], 0) - 1
        torch.testing.assert_close(td["loss_after"][row, ends], td["frame_loss"][row])
        # within a frame the oracle's loss only goes down
        for t in range(T):
            losses = td["loss_after"][row][valid][frames == t]
            assert bool((losses[1:] <= losses[:-1] + 1e-6).all())
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["clips"] == [0, 1, 2, 3] and len(manifest["chunks"]) == 2


def test_collect__candidate_losses_are_what_the_oracle_chose_from(clip_file, tmp_path):
    from agents.baselines import GreedyOracle, run_episodes
    from agents.policy import gazed_before
    from gaze_env.builder import build

    collect(config(clip_file, tmp_path / "out", num_clips=3, candidate_losses=True))
    td = load_expert(tmp_path / "out")
    T, N = 8, 84
    cand, valid = td["candidate_loss"], td["valid"]
    assert cand.dtype == torch.float32 and cand.shape == (*td["action"].shape, N)
    # the oracle took the lowest one (lowest index on ties), and its loss is the one recorded after the gaze
    best = cand[valid].argmin(-1)
    assert torch.equal(best, td["action"][valid])
    torch.testing.assert_close(cand[valid].min(-1).values, td["loss_after"][valid])
    # the candidates are the patches not gazed yet in the frame; nothing on padding
    banned = gazed_before(td["action"], td["frame_id"], valid, T, N)
    assert torch.equal(torch.isfinite(cand) & valid[..., None], ~banned & valid[..., None])
    assert bool(torch.isinf(cand[~valid]).all())
    # the recording changes nothing: the same trajectories as the plain oracle
    plain = collect(config(clip_file, tmp_path / "plain", num_clips=3))  # the default: no candidate losses
    assert plain.clips == 3
    other = load_expert(tmp_path / "plain")
    assert "candidate_loss" not in other.keys()
    assert_same_data(td.exclude("candidate_loss"), other)
    params = build("tiny", videos=td["video"][:1]).params
    again = run_episodes(GreedyOracle(), params, td["video"], td["budgets"])
    assert torch.equal(again["action"][again["valid"]], td["action"][valid])


def test_collect__max_candidates_still_records_every_valid_patch(clip_file, tmp_path):
    collect(config(clip_file, tmp_path / "out", num_clips=2, max_candidates=5, candidate_losses=True))
    td = load_expert(tmp_path / "out")
    valid = td["valid"]
    per_step = torch.isfinite(td["candidate_loss"][valid]).sum(-1)
    assert bool((per_step > 5).all())
    # the drawn patch is a candidate, never better than the best of all of them
    taken = td["candidate_loss"][valid].gather(-1, td["action"][valid][:, None])[:, 0]
    assert bool(torch.isfinite(taken).all()) and bool((taken >= td["candidate_loss"][valid].min(-1).values).all())


def test_collect__resume_after_interruption_equals_uninterrupted_run(clip_file, tmp_path):
    whole = collect(config(clip_file, tmp_path / "whole"))
    assert whole.clips == 10

    class Interrupt(Exception):
        pass

    def stop_after_two(k):
        if k == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        collect(config(clip_file, tmp_path / "cut"), on_chunk=stop_after_two)
    assert len(expert_chunks(tmp_path / "cut")) == 2
    # a run killed while writing leaves a temporary chunk folder behind
    stale = tmp_path / "cut" / "chunks" / ".tmp-chunk-000000006"
    stale.mkdir()
    (stale / "action.memmap").write_bytes(b"partial")
    half_manifest = tmp_path / "cut" / ".manifest.json.123.tmp"
    half_manifest.write_text('{"chunks": [')
    resumed = collect(config(clip_file, tmp_path / "cut"))
    assert resumed.new_clips == 4 and resumed.clips == 10
    assert not stale.exists() and not half_manifest.exists()
    assert_same_data(load_expert(tmp_path / "whole"), load_expert(tmp_path / "cut"))
    # nothing left to do: a rerun adds nothing
    assert collect(config(clip_file, tmp_path / "cut")).new_clips == 0
    assert len(expert_chunks(tmp_path / "cut")) == 4


def test_collect__appends_more_clips_without_touching_the_old_ones(clip_file, tmp_path):
    collect(config(clip_file, tmp_path / "out", num_clips=5))
    before = load_expert(tmp_path / "out")
    summary = collect(config(clip_file, tmp_path / "out", num_clips=8))
    after = load_expert(tmp_path / "out")
    assert summary.new_clips == 3 and after["clip_index"].tolist() == list(range(8))
    assert_same_data(before, after[:5])


def test_collect__refuses_to_mix_settings(clip_file, tmp_path):
    collect(config(clip_file, tmp_path / "out", num_clips=3))
    with pytest.raises(ValueError, match="other settings .*seed: 0 on disk vs 1 now"):
        collect(config(clip_file, tmp_path / "out", num_clips=3, seed=1))


def test_collect__candidate_losses_are_a_setting_of_the_data_set(clip_file, tmp_path):
    collect(config(clip_file, tmp_path / "out", num_clips=2))
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert "candidate_losses" not in meta  # data sets labelled before the option keep matching
    with pytest.raises(ValueError, match="candidate_losses: None on disk vs True now"):
        collect(config(clip_file, tmp_path / "out", num_clips=3, candidate_losses=True))


def test_load_expert__errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an expert data set"):
        load_expert(tmp_path)


def test_config__cli_help_and_parsing():
    text = build_parser(CollectExpertConfig).format_help()
    assert "--alpha-first" in text and "Dirichlet concentration of frame 1" in text
    assert "(default: 10.0)" in text
    cfg = parse_config(
        CollectExpertConfig, ["--preset", "small", "--max-candidates", "16", "--no-progress", "--num_clips", "5"]
    )
    assert (cfg.preset, cfg.max_candidates, cfg.progress, cfg.num_clips) == ("small", 16, False, 5)
    assert parse_config(CollectExpertConfig, ["--max-candidates", "none"]).max_candidates is None
    with pytest.raises(SystemExit):
        parse_config(CollectExpertConfig, ["--preset", "huge"])
    with pytest.raises(SystemExit):
        parse_config(CollectExpertConfig, ["--min-ratio", "0.5", "--max-ratio", "0.1"])


def test_main__writes_summary(clip_file, tmp_path, capsys):
    main(["--videos", clip_file, "--out", str(tmp_path / "out"), "--num-clips", "2", "--no-progress"])
    assert "2 clips (2 new)" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["clips"] == 2


@pytest.mark.slow
def test_collect__killed_process_resumes_to_the_same_data(clip_file, tmp_path):
    args = ["--videos", clip_file, "--num-clips", "10", "--chunk-clips", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "experiments.collect_expert", *args]
    subprocess.run([*cmd, "--out", str(tmp_path / "whole")], check=True, env=env, cwd=ROOT, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, "--out", str(out)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((out / "chunks").glob("chunk-*"))) >= 1:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 1 <= len(list((out / "chunks").glob("chunk-*"))) < 10  # killed mid-run
    subprocess.run([*cmd, "--out", str(out)], check=True, env=env, cwd=ROOT, capture_output=True)
    assert_same_data(load_expert(tmp_path / "whole"), load_expert(out))


def test_load_expert__sorts_clips_collected_out_of_order(clip_file, tmp_path):
    out = tmp_path / "out"
    collect(config(clip_file, out, num_clips=3))
    collect(config(clip_file, out, first_clip=6, num_clips=3))
    summary = collect(config(clip_file, out, num_clips=10, chunk_clips=4))  # one chunk holds 3, 4, 5, 9
    assert summary.new_clips == 4
    td = load_expert(out)
    assert td["clip_index"].tolist() == list(range(10))
    whole = collect(config(clip_file, tmp_path / "whole"))
    assert whole.clips == 10
    assert torch.equal(td["video"], load_expert(tmp_path / "whole")["video"])
    assert torch.equal(td["budgets"], load_expert(tmp_path / "whole")["budgets"])
