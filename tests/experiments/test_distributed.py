"""Data-parallel training: ``experiments.distributed`` and the trainers under ``torchrun`` (gloo, CPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.collect_expert import CollectExpertConfig, collect
from experiments.distributed import Dist, launched_by_torchrun, setup
from experiments.train_bc import TrainBCConfig, train
from experiments.training import EpochSampler, load_checkpoint
from gaze_env.video import TensorSource, materialize
from tests.conftest import random_clips

ROOT = Path(__file__).resolve().parents[2]


def torchrun(nproc: int, module: str, args: list[str]) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc -m module args`` (gloo on this CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *args]
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    return run


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(folder).weights


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=2e-5, rtol=1e-4), (name, (a[name] - b[name]).abs().max())


# ---- Dist ------------------------------------------------------------------------------------
def test_dist__single_process_by_default():
    assert not launched_by_torchrun()
    d = setup("cpu")
    assert (d.rank, d.world_size, d.enabled, d.is_main) == (0, 1, False, True)
    assert d.all_sum(torch.tensor([2.0])).item() == 2.0 and d.weighted_mean(0.3, 7) == 0.3
    assert d.split(list(range(6)), accumulation=2) == [[0, 1, 2], [3, 4, 5]]


def test_dist__ranks_split_each_epoch_into_disjoint_shares_covering_every_item():
    n, batch, world, accum = 12, 4, 2, 2
    ranks = [Dist(rank=r, world_size=world) for r in range(world)]
    samplers = [EpochSampler(n, batch, seed=3) for _ in ranks]  # the same global order on every rank
    for _epoch in range(2):
        seen: list[int] = []
        for _step in range(n // batch):
            shares = []
            for d, sampler in zip(ranks, samplers):
                parts = d.split(sampler.next_batch(), accum)
                assert len(parts) == accum and all(len(p) == batch // (world * accum) for p in parts)
                shares.append([i for p in parts for i in p])
            assert not set(shares[0]) & set(shares[1])  # no clip on two ranks in one step
            seen += shares[0] + shares[1]
        assert sorted(seen) == list(range(n))  # every clip exactly once per epoch across ranks
    assert [p.start for p in (Dist(rank=r, world_size=3).shard(7) for r in range(3))] == [0, 2, 4]


def test_dist__global_batch_must_divide_with_a_clear_error():
    with pytest.raises(ValueError, match=r"global batch size 6 .* 2 x 2 = 4"):
        Dist(rank=0, world_size=2).per_rank(6, accumulation=2)


# ---- trainers under torchrun ---------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_data")
    clips = str(materialize(TensorSource(random_clips(8, seed=4)), root / "clips.pt", progress=False))
    expert = root / "expert"
    collect(CollectExpertConfig(videos=clips, out=str(expert), num_clips=8, chunk_clips=4, progress=False))
    return clips, str(expert)


def bc_args(data, out: Path, **kw) -> list[str]:
    clips, expert = data
    base = dict(expert=expert, expert_clips=8, videos=clips, out=str(out), steps=4, batch_size=4, warmup_steps=1,
                encoder_patch_size=16, num_multi_token_pred=2, eval_interval=0, eval_clips=3,
                eval_baselines="random", eval_ratios=0.1, ckpt_interval=2)
    base.update(kw)
    flag = {True: "", False: "no-"}
    return [f"--{flag[v]}{k.replace('_', '-')}" if isinstance(v, bool) else f"--{k.replace('_', '-')}={v}"
            for k, v in base.items()] + ["--no-progress"]


@pytest.mark.slow
def test_train_bc__two_gloo_processes_equal_one_process_and_only_rank_0_writes(data, tmp_path):
    from experiments.train_bc import main

    single = tmp_path / "single"
    main(bc_args(data, single))
    accum = tmp_path / "accum"  # one process, the same global batch in two micro-batches
    main(bc_args(data, accum, grad_accum=2))
    assert_close(weights(single / "final"), weights(accum / "final"))

    pair = tmp_path / "pair"
    run = torchrun(2, "experiments.train_bc", bc_args(data, pair))
    assert_close(weights(single / "final"), weights(pair / "final"))
    assert run.stdout.count("| bc_policy |") == 1  # rank 0 alone prints the table ...
    assert len(list((pair / "tb").iterdir())) == 1  # ... and writes TensorBoard events
    assert sorted(p.name for p in pair.iterdir()) == sorted(p.name for p in single.iterdir())

    # resume with another world size: 2 processes stop at step 2, one process finishes
    switch = tmp_path / "switch"
    torchrun(2, "experiments.train_bc", bc_args(data, switch, stop_at=2))
    assert not (switch / "final").exists()
    main(bc_args(data, switch, resume=True))
    assert_close(weights(single / "final"), weights(switch / "final"))


def test_train_bc__global_batch_not_divisible_is_refused_before_training(data, tmp_path):
    cfg = TrainBCConfig(batch_size=3, grad_accum=2, expert=data[1], videos=data[0], expert_clips=8,
                        out=str(tmp_path / "x"), progress=False)
    with pytest.raises(ValueError, match="global batch size 3"):
        train(cfg)


@pytest.mark.slow
def test_train_recon__runs_under_two_gloo_processes_with_rank_0_writing(data, tmp_path):
    out = tmp_path / "recon"
    args = [f"--videos={data[0]}", f"--out={out}", "--steps=2", "--batch-size=4", "--grad-accum=2",
            "--frames-per-clip=2", "--warmup-steps=1", "--save-every=2", "--eval-every=0", "--eval-clips=2",
            "--gazer-prob=0", "--no-quality", "--no-progress", "--device=cpu"]
    torchrun(2, "experiments.train_recon", args)
    run = out / "tiny"
    assert (run / "final").is_dir() and (run / "step_00000002").is_dir()
    assert len(list((run / "tb").iterdir())) == 1  # one writer
    assert load_checkpoint(run / "final").train_state["step"] == 2


def rl_args(data, init: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"--videos={data[0]}", f"--init={init}", f"--out={out}", "--steps=3", "--clips-per-step=4",
        "--group-size=3", "--budgets=fixed", "--gazing-ratio=0.06", "--clip-seeds", "--aggregation=token",
        "--micro-batch=3", "--eval-clips=2", "--eval-ratios=0.06", "--sweep-ratios=0.06", "--eval-interval=0",
        "--ckpt-interval=2", "--no-compare", "--lr=1e-3", "--no-progress", *extra,
    ]


@pytest.mark.slow
def test_train_rl__grpo_on_two_gloo_processes_equals_one_process(data, tmp_path):
    from agents.policy import AutoGazePolicy
    from experiments.train_rl import main

    torch.manual_seed(0)
    init = tmp_path / "bc"
    AutoGazePolicy.from_preset("tiny").save_pretrained(init)
    single = main(rl_args(data, init, tmp_path / "single"))
    run = torchrun(2, "experiments.train_rl", rl_args(data, init, tmp_path / "pair"))
    a, b = weights(tmp_path / "single" / "final"), weights(tmp_path / "pair" / "final")
    assert_close(a, b)
    start = weights(init)
    assert any(not torch.allclose(a[k], start[k]) for k in a)  # it trained
    assert run.stdout.count("final policy:") == 1 and len(list((tmp_path / "pair" / "tb").iterdir())) == 1
    assert single["step"] == 3

    # without --clip-seeds each process draws from its own seed: a different (equally valid) run
    torchrun(2, "experiments.train_rl", [a for a in rl_args(data, init, tmp_path / "own") if a != "--clip-seeds"])
    assert (tmp_path / "own" / "final").is_dir()
