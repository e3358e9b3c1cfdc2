import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from agents.baselines import BASELINES, make_baseline, run_episodes
from agents.policy import AutoGazePolicy
from agents.rollout import rollout
from experiments.common import parse_config
from experiments.evaluate import (
    EvaluateConfig,
    behaviour_stats,
    evaluate,
    gazed_mask,
    headline_table,
    last_gaze_prediction,
    main,
    mean_ci,
    patch_detail,
    patch_motion,
    rankdata,
    ratio_to_threshold,
    resolve_policies,
    spearman,
)
from gaze_env.builder import build
from gaze_env.config import get_preset
from gaze_env.video import TensorSource, materialize, sample_video_dir
from tests.conftest import random_clips

GRID = get_preset("tiny").grid
N, T = GRID.num_patches, get_preset("tiny").num_frames


@pytest.fixture
def clip_file(tmp_path):
    return str(materialize(TensorSource(random_clips(2, seed=3)), tmp_path / "clips.pt", progress=False))


@pytest.fixture
def policy_dir(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "tiny_policy"
    AutoGazePolicy.from_preset("tiny").save_pretrained(folder)
    return folder


def small_config(**kwargs) -> EvaluateConfig:
    defaults = dict(ratios=(0.05, 0.1), thresholds=(0.1, 0.15), requirements=(0.1,), bootstrap=200,
                    progress=False, num_videos=2)
    return EvaluateConfig(**{**defaults, **kwargs})


# ---- end to end ------------------------------------------------------------------------------
def test_evaluate__policy_and_every_baseline_write_every_artefact_and_match_direct_rollouts(
    clip_file, policy_dir, tmp_path
):
    out = tmp_path / "eval"
    cfg = small_config(videos=clip_file, num_clips=2, policy=(f"pol={policy_dir}",), out=str(out))
    report = evaluate(cfg)

    names = ["pol", *BASELINES]
    assert list(report["loss_vs_ratio"]) == names and list(report["ratio_to_threshold"]) == names
    assert list(report["stopping"]) == ["pol"] and list(report["calibration"]) == ["pol"]
    expected = {"loss_vs_ratio.png", "calibration.png", "behaviour.png", "report.json", "report.md"}
    expected |= {f"gif/{n}.gif" for n in names}
    assert set(report["artefacts"]) == expected
    for name in expected:
        assert (out / name).stat().st_size > 0, name
    for name in ("loss_vs_ratio.png", "calibration.png", "behaviour.png"):
        assert Image.open(out / name).format == "PNG"
    gif = Image.open(out / "gif" / "pol.gif")
    assert gif.format == "GIF" and gif.n_frames == T
    assert gif.size[0] >= 3 * 4 * GRID.frame_size and gif.size[1] >= 2 * 4 * GRID.frame_size  # 4x, two clips
    saved = json.loads((out / "report.json").read_text())  # strict JSON
    assert saved["loss_vs_ratio"] == report["loss_vs_ratio"] and saved["config"]["policy"] == [f"pol={policy_dir}"]
    md = (out / "report.md").read_text()
    for section in ("## Loss at fixed gazing ratios", "Table 3 analogue", "## Stopping", "calibration", "## Behaviour"):
        assert section in md
    assert headline_table(report) in md

    # the numbers are those of a direct greedy rollout of the policy
    built = build("tiny")
    video = TensorSource(clip_file).clips(range(2))
    policy = AutoGazePolicy.from_pretrained(policy_dir)
    td = rollout(policy, built.params, built.reward, video, budgets=torch.full((2, T), 8), temperature=0.0)
    per_clip = td["frame_loss"].double().mean(1)
    assert report["loss_vs_ratio"]["pol"]["0.1"]["per_clip"] == pytest.approx(per_clip.tolist(), abs=1e-6)
    stop = rollout(policy, built.params, built.reward, video, budgets=torch.full((2, T), report["stop_cap_budget"]),
                   task_loss_requirement=0.1, temperature=0.0)
    gazes = (stop["valid"] & (stop["action"] < N)).sum(1).double()
    cell = report["stopping"]["pol"]["0.1"]
    assert cell["per_clip"]["gazing_ratio"] == pytest.approx((gazes / (T * N)).tolist())
    assert cell["token_reduction_overall"] == pytest.approx(float(2 * T * N / gazes.sum()))
    assert report["calibration"]["pol"]["points"] == 2 * T * 2  # clips x frames x ratios


def test_evaluate__raster_numbers_match_run_episodes_and_hand_interpolation(clip_file, tmp_path):
    cfg = small_config(videos=clip_file, num_clips=2, policy=("none",), baselines=("raster",), ratios=(0.05, 0.1, 0.2),
                       thresholds=(0.07,), num_videos=0, out=str(tmp_path / "e"))
    report = evaluate(cfg)
    built = build("tiny")
    video = TensorSource(clip_file).clips(range(2))
    curves = []
    for ratio, budget in ((0.05, 4), (0.1, 8), (0.2, 16)):
        td = run_episodes(make_baseline("raster"), built.params, video, torch.full((T,), budget))
        cell = report["loss_vs_ratio"]["raster"][str(ratio)]
        assert cell["mean"] == pytest.approx(float(td["frame_loss"].double().mean()), abs=1e-9)
        assert cell["ci_low"] <= cell["mean"] <= cell["ci_high"]
        curves.append(td["frame_loss"].double().mean(1).numpy())
    assert [r["actual_ratio"] for r in report["ratios"]] == pytest.approx([4 / N, 8 / N, 16 / N])
    assert not any(p.name.endswith(".gif") for p in (tmp_path / "e").rglob("*"))
    # Table 3 analogue: interpolate each clip's curve (at the ratios really used) by hand
    x = np.array([4, 8, 16]) / N
    for clip, got in enumerate(report["ratio_to_threshold"]["raster"]["0.07"]["per_clip"]):
        y = np.array([c[clip] for c in curves])
        j = int(np.argmax(y <= 0.07)) if (y <= 0.07).any() else None
        if j is None:
            want = x[-1]
        elif j == 0:
            want = x[0]
        else:
            want = x[j - 1] + (y[j - 1] - 0.07) / (y[j - 1] - y[j]) * (x[j] - x[j - 1])
        assert got == pytest.approx(want)


def test_main__reads_a_real_mp4_folder_and_prints_the_headline_and_paths(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(sample_video_dir() / "carphone_pristine.mp4", videos)
    out = tmp_path / "out"
    report = main(["--videos", str(videos), "--num-clips", "2", "--policy", "none", "--baselines", "raster",
                   "random", "--ratios", "0.1", "--focus-ratio", "0.1", "--num-videos", "1", "--bootstrap", "100",
                   "--no-progress", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "FolderSource" in report["source"] and report["num_clips"] == 2
    assert headline_table(report) in printed and "| raster |" in printed and "| random |" in printed
    assert str(out / "gif" / "raster.gif") in printed and str(out / "report.md") in printed
    assert "calibration.png" not in report["artefacts"]  # no policy, no calibration plot
    assert Image.open(out / "gif" / "random.gif").n_frames == T


# ---- pieces ----------------------------------------------------------------------------------
def test_spearman__hand_cases_with_ties():
    assert rankdata(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    x, y = torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([10.0, 30.0, 20.0, 40.0])
    assert spearman(x, y) == pytest.approx(3 / math.sqrt(10))  # ranks (1, 2.5, 2.5, 4) vs (1, 3, 2, 4)
    z = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.3])
    assert spearman(z, z.exp() * 7) == pytest.approx(1.0) and spearman(z, -(z**3)) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, float("nan"), 2.0, 3.0]), torch.tensor([3.0, 0.0, 2.0, 1.0])) == pytest.approx(
        -1.0
    )
    assert math.isnan(spearman(torch.ones(4), torch.arange(4.0)))


def test_ratio_to_threshold__hand_case_interpolates_in_loss_and_counts_unreached():
    per_clip = torch.tensor([[0.20, 0.10, 0.05], [0.20, 0.15, 0.12], [0.07, 0.06, 0.05]], dtype=torch.float64)
    ratio, unreached = ratio_to_threshold(per_clip, [0.1, 0.2, 0.4], 0.08)
    # clip 0 crosses between 0.2 (0.10) and 0.4 (0.05): 0.2 + (0.10 - 0.08) / 0.05 * 0.2; clip 1 never; clip 2 at once
    assert ratio.tolist() == pytest.approx([0.28, 0.4, 0.1]) and unreached == 1


def test_mean_ci__brackets_the_mean_and_is_seeded():
    values = torch.tensor([1.0, 2.0, 3.0, 10.0])
    a, b = mean_ci(values, 500, seed=1), mean_ci(values, 500, seed=1)
    assert a == b and a["mean"] == 4.0 and 1.0 <= a["ci_low"] < 4.0 < a["ci_high"] <= 10.0 and a["n"] == 4
    assert mean_ci(torch.tensor([2.5]), 50, 0) == {"mean": 2.5, "ci_low": 2.5, "ci_high": 2.5, "n": 1}


def test_gazed_mask_and_last_gaze_prediction__hand_trajectory():
    # clip 0: frame 0 gazes 5 then 7, frame 1 gazes 2 then STOP; clip 1: frame 0 gazes 3, frame 1 gazes 4, padding
    action = torch.tensor([[5, 7, 2, N], [3, 4, N, N]])
    frame_id = torch.tensor([[0, 0, 1, 1], [0, 1, 2, 2]])
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    pred = torch.tensor([[0.5, 0.4, 0.3, 0.9], [0.6, 0.2, 0.8, 0.8]])
    g = gazed_mask(action, frame_id, valid, 2, N)
    assert g.shape == (2, 2, N) and g.sum().item() == 5
    assert g[0, 0, [5, 7]].all() and g[0, 1, 2] and g[1, 0, 3] and g[1, 1, 4] and not g[:, :, N - 1].any()
    td = {"action": action, "frame_id": frame_id, "valid": valid, "loss_pred": pred}
    assert last_gaze_prediction(td, 2, N).flatten().tolist() == pytest.approx([0.4, 0.3, 0.6, 0.2])  # not the STOP
    assert last_gaze_prediction(td, 3, N)[:, 2].isnan().all()  # a frame without gazes


def test_patch_motion_and_detail__static_flat_and_textured_regions():
    video = torch.full((1, 3, 3, 64, 64), 100, dtype=torch.uint8)
    video[0, 2, :, :8, :8] = 200  # frame 2 changes the top-left finest cell only
    video[0, :, :, 32:40, 32:40] = (torch.arange(8)[:, None] + torch.arange(8)) % 2 * 255  # a checkerboard cell
    motion, detail = patch_motion(video, GRID), patch_detail(video, GRID)
    assert motion.shape == detail.shape == (1, 3, N)
    assert motion[0, 0].isnan().all() and (motion[0, 1] == 0).all()
    finest = GRID.offsets[2]  # first patch of the finest scale: the top-left 8x8 cell
    assert motion[0, 2, finest] == pytest.approx(100.0) and motion[0, 2, 0] == pytest.approx(100.0 / 16)
    checker = finest + 4 * 8 + 4
    assert detail[0, 0, checker] > 1000 and detail[0, 0, finest] == 0
    # a coarse patch's detail is the mean of its finest cells' (patch 3 covers cells rows 4-7, cols 4-7)
    cells = finest + (torch.arange(4, 8)[:, None] * 8 + torch.arange(4, 8)).flatten()
    assert detail[0, 0, 3] == pytest.approx(float(detail[0, 0, cells].mean()), rel=1e-5)
    assert detail[0, 0, 3] < detail[0, 0, checker]


def test_behaviour_stats__motion_seeking_and_detail_seeking_gazers():
    g = torch.Generator().manual_seed(0)
    motion = torch.rand(4, T, N, generator=g)
    motion[:, 0] = float("nan")
    detail = torch.rand(4, T, N, generator=g)
    fine = GRID.patch_scale.expand(4, T, N) == 2
    median = torch.quantile(motion[:, 1:].double().flatten(), 0.5)  # the middle bin edge of 4 quantile bins
    gazers = {"mover": motion.double() >= median, "picky": fine & (detail > 0.5) | ~fine & (detail <= 0.5)}
    stats = behaviour_stats(gazers, motion, detail, GRID, bins=4)
    rate = stats["motion"]["gaze_rate"]["mover"]
    assert len(rate) == 4 and rate[:2] == [0.0, 0.0] and rate[2:] == [1.0, 1.0]
    assert sum(stats["motion"]["patches"]) == 4 * (T - 1) * N
    scale = stats["detail"]["mean_scale"]["picky"]
    assert scale[0] < 1.0 < scale[-1] and sum(stats["detail"]["gazes"]["picky"]) == int(gazers["picky"].sum())
    assert stats["detail"]["scale_fraction"]["picky"][-1][2] == 1.0  # high detail: only the finest scale
    motion[:, 1:, : N // 2] = 0.0  # half the patches static: tied quantiles leave no empty bin
    still = behaviour_stats(gazers, motion, detail, GRID, bins=4)["motion"]
    assert len(still["patches"]) == 3 and min(still["patches"]) > 0
    assert still["patches"][0] == 4 * (T - 1) * (N // 2) and still["range"][0][0] == 0.0  # first bin: the static ones


def test_resolve_policies__labels_and_auto_discovery(tmp_path, monkeypatch, policy_dir):
    got = resolve_policies(("a/final", "b/final", "x=c/p", "none"), "tiny")
    assert {k: str(v) for k, v in got.items()} == {"x": "c/p", "a/final": "a/final", "b/final": "b/final"}
    assert list(resolve_policies((str(policy_dir),), "tiny")) == ["tiny_policy"]
    monkeypatch.chdir(tmp_path)
    for folder in ("runs/bc/tiny/final", "runs/rl/tiny/grpo/final"):
        shutil.copytree(policy_dir, folder)
    assert list(resolve_policies(("auto",), "tiny")) == ["bc", "rl-grpo"]
    assert resolve_policies(("auto",), "small") == {}


def test_config__parses_policies_and_rejects_bad_values():
    cfg = parse_config(EvaluateConfig, ["--policy", "runs/a", "b=runs/b", "--thresholds", "0.05", "--num-clips", "3"])
    assert cfg.policy == ("runs/a", "b=runs/b") and cfg.thresholds == (0.05,) and cfg.num_clips == 3
    assert str(cfg.out_dir) == "runs/eval/tiny"
    with pytest.raises(ValueError, match="focus_ratio=0.3 must be one of"):
        EvaluateConfig(focus_ratio=0.3, ratios=(0.1, 0.2))
    with pytest.raises(ValueError, match="empty path"):
        EvaluateConfig(policy=("x=",))
