import random

import numpy as np
import pytest
import torch

from experiments import training
from experiments.training import (
    EpochSampler,
    Logger,
    capture_rng,
    cosine_schedule,
    latest_checkpoint,
    load_checkpoint,
    make_train_state,
    prune_checkpoints,
    restore_rng,
    restore_train_state,
    save_checkpoint,
    step_dir,
)


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def one_step(model, opt, sched, seed: int = 0) -> None:
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    sched.step()


def test_save_checkpoint__round_trip_is_bit_exact_and_weights_only_loadable(tmp_path):
    model = small_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = cosine_schedule(opt, 10, 2)
    one_step(model, opt, sched)
    gen = torch.Generator().manual_seed(3)
    state = make_train_state(1, opt, sched, {"g": gen}, {"cursor": 5})
    path = save_checkpoint(tmp_path / "ck", model, {"name": "m", "sizes": [1, 2]}, state)

    other = small_model(seed=1)
    ck = load_checkpoint(path, other)
    assert ck.config == {"name": "m", "sizes": [1, 2]}
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    # the training state is readable by the safe loader (no pickled code)
    raw = torch.load(path / training.STATE_FILE, weights_only=True)
    assert raw["step"] == 1 and raw["data_position"] == {"cursor": 5}
    opt2 = torch.optim.AdamW(other.parameters(), lr=0.1)
    sched2 = cosine_schedule(opt2, 10, 2)
    info = restore_train_state(ck.train_state, opt2, sched2, {"g": torch.Generator()})
    assert info["step"] == 1 and sched2.get_last_lr() == sched.get_last_lr()
    one_step(model, opt, sched, seed=1)
    one_step(other, opt2, sched2, seed=1)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_save_checkpoint__failure_leaves_no_partial_folder(tmp_path, monkeypatch):
    model = small_model()
    good = save_checkpoint(tmp_path / "ck", model, {"v": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(training.torch, "save", boom)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "new", model, {"v": 2}, make_train_state(0, opt))
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(good, small_model(seed=5), {"v": 3}, make_train_state(0, opt))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp folders, no "new"
    assert load_checkpoint(good).config == {"v": 1}  # the old checkpoint survived intact


def test_save_checkpoint__replaces_an_existing_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "final", small_model(0), {"v": 1})
    save_checkpoint(tmp_path / "final", small_model(1), {"v": 2})
    assert load_checkpoint(tmp_path / "final").config == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_load_checkpoint__missing_files_name_what_is_missing(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(tmp_path / "ck")


def test_restore_rng__replays_every_generator():
    gen = torch.Generator().manual_seed(7)
    state = capture_rng({"batch": gen})

    def draw():
        return (
            torch.rand(3).tolist(),
            np.random.rand(3).tolist(),
            random.random(),
            torch.rand(2, generator=gen).tolist(),
        )

    first = draw()
    restore_rng(state, {"batch": gen})
    assert draw() == first
    assert draw() != first  # the generators do move on
    with pytest.raises(KeyError, match="other"):
        restore_rng(state, {"other": torch.Generator()})


def test_latest_checkpoint__picks_the_highest_complete_step(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (5, 40, 300):
        save_checkpoint(step_dir(tmp_path, step), small_model(), {"step": step})
    (tmp_path / "step_00009999").mkdir()  # incomplete: no files
    (tmp_path / ".step_00010000.tmp-x").mkdir()
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 300)
    assert prune_checkpoints(tmp_path, keep=2) == [step_dir(tmp_path, 5)]
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 300)
    assert step_dir(tmp_path, 40).exists() and not step_dir(tmp_path, 5).exists()


def test_epoch_sampler__each_item_once_per_epoch_and_state_resumes():
    s = EpochSampler(10, 4, seed=1)
    seen = s.next_batch() + s.next_batch() + s.next_batch()[:2]  # 10 = one epoch
    assert sorted(seen) == list(range(10))
    state = s.state_dict()
    ahead = [s.next_batch() for _ in range(5)]
    t = EpochSampler(10, 4, seed=1)
    t.load_state_dict(state)
    assert [t.next_batch() for _ in range(5)] == ahead
    with pytest.raises(ValueError, match="n=10"):
        EpochSampler(11, 4, seed=1).load_state_dict(state)


def test_cosine_schedule__warms_up_then_decays_to_the_floor():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = cosine_schedule(opt, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    lrs = []
    for _ in range(12):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0) and lrs[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[10] == pytest.approx(0.1) and lrs[11] == pytest.approx(0.1)


def test_logger__writes_scalars_under_the_three_groups(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with Logger(tmp_path) as log:
        log.log("losses", {"recon": 0.5}, 1)
        log.log("charts", {"lr": 0.1}, 1)
        log.log("eval", {"l1": 0.2}, 2)
        with pytest.raises(ValueError, match="losses"):
            log.log("misc", {"x": 1}, 1)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"losses/recon", "charts/lr", "eval/l1"}
    assert acc.Scalars("eval/l1")[0].value == pytest.approx(0.2)
    Logger(None).log("losses", {"recon": 1.0}, 0)  # the null logger writes nothing and does not fail
