import json

import pytest
import torch

from agents.policy import AutoGazePolicy
from experiments.collect_expert import CollectExpertConfig, collect
from experiments.train_bc import ExpertData, TrainBCConfig, main, train
from experiments.training import MODEL_FILE, STATE_FILE, load_checkpoint, step_dir
from gaze_env.video import TensorSource, materialize
from tests.conftest import random_clips


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Six tiny random clips (a materialized clip file) and their greedy-oracle expert data set, with the
    candidates' losses (soft labels)."""
    root = tmp_path_factory.mktemp("bc_data")
    clips = str(materialize(TensorSource(random_clips(6, seed=3)), root / "clips.pt", progress=False))
    expert = root / "expert"
    collect(CollectExpertConfig(videos=clips, out=str(expert), num_clips=6, chunk_clips=4, candidate_losses=True,
                                progress=False))
    return clips, str(expert)


def small(data, out, **kw) -> TrainBCConfig:
    clips, expert = data
    base = dict(
        expert=expert, expert_clips=6, videos=clips, out=str(out), steps=6, batch_size=4, warmup_steps=2,
        encoder_patch_size=16, eval_interval=0, eval_clips=2, eval_baselines=("random",), eval_ratios=(0.1,),
        ckpt_interval=3, progress=False,
    )
    return TrainBCConfig(**{**base, **kw})


def scalars(run_dir, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_expert_data__batches_across_chunks_in_the_asked_order(data):
    expert = ExpertData(data[1])
    assert len(expert) == 6 and len(expert.chunks) == 2
    batch = expert.batch([5, 0, 4, 1])  # clips of both chunks, shuffled
    whole = torch.cat([c.to_tensordict() for c in expert.chunks])
    assert torch.equal(batch["action"], whole["action"][[5, 0, 4, 1]])
    assert torch.equal(batch["video"], whole["video"][[5, 0, 4, 1]])


def test_train_bc__cli_end_to_end_writes_final_checkpoints_and_tensorboard(data, tmp_path, capsys):
    clips, expert = data
    out = tmp_path / "run"
    results = main([
        "--expert", expert, "--expert-clips", "6", "--videos", clips, "--out", str(out), "--steps", "4",
        "--batch-size", "3", "--encoder-patch-size", "16", "--num-multi-token-pred", "2", "--eval-interval", "2",
        "--ckpt-interval", "2", "--eval-clips", "2", "--eval-baselines", "random", "rgb_diff", "--no-progress",
    ])
    policy = AutoGazePolicy.from_pretrained(out / "final")
    assert policy.config.num_multi_token_pred == 2 and policy.config.encoder_patch_size == 16
    assert (out / "step_00000004" / MODEL_FILE).is_file() and (out / "step_00000004" / STATE_FILE).is_file()
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["mean_frame_loss"]) == {"bc_policy", "random", "rgb_diff"}
    assert set(saved["mean_frame_loss"]["bc_policy"]) == {"0.05", "0.1", "0.2"}
    assert "| bc_policy |" in capsys.readouterr().out and results["step"] == 4
    assert sorted(scalars(out, "losses/ce")) == [1, 2, 3, 4]
    assert sorted(scalars(out, "eval/bc_ratio_0.1")) == [2, 4]
    assert set(scalars(out, "charts/lr")) == {1, 2, 3, 4} and scalars(out, "eval/random_ratio_0.1")
    with pytest.raises(FileExistsError, match="--resume"):  # never overwrite a run silently
        main(["--expert", expert, "--videos", clips, "--out", str(out), "--expert-clips", "6", "--no-progress"])


def test_train_bc__resume_after_an_interruption_continues_the_same_run_exactly(data, tmp_path):
    straight = tmp_path / "straight"
    train(small(data, straight))
    split = tmp_path / "split"
    assert train(small(data, split, stop_at=3))["step"] == 3
    assert not (split / "final").exists()
    train(small(data, split, resume=True))
    assert scalars(straight, "losses/total") == scalars(split, "losses/total")  # bit-identical losses
    a = AutoGazePolicy.from_pretrained(straight / "final").state_dict()
    b = AutoGazePolicy.from_pretrained(split / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="lr"):  # other training math cannot resume this run
        train(small(data, split, resume=True, lr=1e-4, stop_at=None, steps=6))


def test_train_bc__soft_labels_and_loss_weights_are_logged_and_summed(data, tmp_path):
    out = tmp_path / "soft"
    train(small(data, out, soft_coef=0.5, ce_coef=0.25, soft_tau=0.2, steps=3, ckpt_interval=0))
    ce, soft, pred = scalars(out, "losses/ce"), scalars(out, "losses/soft"), scalars(out, "losses/pred")
    total, kl = scalars(out, "losses/total"), scalars(out, "charts/kl")
    assert sorted(soft) == sorted(kl) == [1, 2, 3]
    for step in total:  # losses/ce is logged unweighted; the total holds it with its weight
        assert abs(total[step] - (0.25 * ce[step] + pred[step] + soft[step])) < 1e-4
        assert 0 < kl[step] < soft[step] / 0.5  # KL = soft cross-entropy - entropy of the targets
    saved = json.loads((out / "results.json").read_text())["config"]["train"]
    assert (saved["soft_coef"], saved["ce_coef"], saved["soft_tau"]) == (0.5, 0.25, 0.2)


def test_train_bc__soft_labels_refuse_expert_data_without_candidate_losses(data, tmp_path):
    clips, _ = data
    plain = tmp_path / "plain"
    collect(CollectExpertConfig(videos=clips, out=str(plain), num_clips=6, candidate_losses=False, progress=False))
    assert "candidate_loss" not in ExpertData(plain).keys  # what the data holds decides what batches hold
    with pytest.raises(ValueError, match="candidate_loss"):
        train(small(data, tmp_path / "run", expert=str(plain), soft_coef=1.0))
    train(small(data, tmp_path / "hard", expert=str(plain), soft_coef=0.0, steps=2, ckpt_interval=0))
    assert (tmp_path / "hard" / "final").is_dir()


def test_checkpoint__round_trip_is_bit_exact(data, tmp_path):
    out = tmp_path / "run"
    train(small(data, out, steps=3, ckpt_interval=0))
    ckpt = load_checkpoint(step_dir(out, 3))
    fresh = AutoGazePolicy(AutoGazePolicy.from_pretrained(out / "final").config)
    fresh.load_state_dict(ckpt.weights)
    final = AutoGazePolicy.from_pretrained(out / "final")
    assert all(torch.equal(v, final.state_dict()[k]) for k, v in fresh.state_dict().items())
    state = ckpt.train_state
    assert state["step"] == 3 and state["data_position"]["cursor"] == 3 * 4 % 6
    assert len(state["optimizer"]["state"]) == len(list(final.parameters()))


def test_train_bc__bench_mode_times_training_and_generation_without_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written or read
    result = main(["--bench", "--bench-steps", "1", "--batch-size", "2", "--encoder-patch-size", "16",
                   "--num-multi-token-pred", "3", "--soft-coef", "1.0"])
    assert result["train_clips_per_s"] > 0 and result["generate_ms"]["float32"] > 0
    assert result["steps_per_clip"] == 8 * 8  # ratio 0.1 of the tiny preset's 84 patches, 8 frames
    assert list(tmp_path.iterdir()) == []
