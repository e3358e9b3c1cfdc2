"""Shared training utilities for every trainer (reconstruction MAE, behaviour cloning, RL).

- **Checkpoints** (``save_checkpoint`` / ``load_checkpoint`` / ``latest_checkpoint``): a folder
  ``step_00001234/`` (or any name) holding

  * ``model.safetensors``: the model weights (``MODEL_FILE``);
  * ``config.json``: everything needed to rebuild the model and the run (``CONFIG_FILE``);
  * ``train_state.pt``: optimizer, scheduler, step, RNG states (torch, CUDA, numpy, python and
    the run's own ``torch.Generator`` objects) and data position, saved with ``torch.save`` so
    that ``torch.load(..., weights_only=True)`` reads it (``STATE_FILE``; optional).

  The folder is written under a temporary name in the same parent and moved into place with
  ``os.replace``, so a crash never leaves a partial checkpoint under the final name.
- **Resuming exactly**: ``make_train_state`` / ``restore_train_state`` capture and restore all of
  the above; ``EpochSampler`` is a seeded epoch-permutation sampler whose position is part of it.
- **Schedules**: ``cosine_schedule`` (linear warm-up, cosine decay to a floor).
- **Logging**: ``Logger`` wraps TensorBoard's ``SummaryWriter`` with the tag groups ``losses/``,
  ``charts/`` and ``eval/``; ``progress`` is the tqdm bar every trainer shows.

Typed configs on the command line, devices and seeding live in ``experiments.common``.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

__all__ = [
    "CONFIG_FILE",
    "MODEL_FILE",
    "STATE_FILE",
    "Checkpoint",
    "EpochSampler",
    "Logger",
    "capture_rng",
    "cosine_schedule",
    "latest_checkpoint",
    "load_checkpoint",
    "make_train_state",
    "progress",
    "prune_checkpoints",
    "restore_rng",
    "restore_train_state",
    "save_checkpoint",
    "step_dir",
]

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "train_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


# ---- checkpoints -----------------------------------------------------------------------------
def step_dir(run_dir: str | Path, step: int) -> Path:
    """``run_dir/step_<step, 8 digits>``: where the checkpoint of ``step`` goes."""
    return Path(run_dir) / f"step_{step:08d}"


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    train_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (see the module docstring); returns ``path``.

    An existing folder at ``path`` is replaced: it is moved aside, the new one is moved in, then
    the old one is deleted, so ``path`` always holds a complete checkpoint (for an instant, none).

    Args:
        model: a module (its ``state_dict``) or a name -> tensor mapping.
        config: JSON-serialisable description (model config, run config, ...).
        train_state: what ``make_train_state`` returns, or None for a weights-only checkpoint.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    # clone: safetensors refuses views into shared storage
    weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    text = json.dumps(config, indent=2, sort_keys=True)  # fails before anything is written
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        _umask_mode(tmp, 0o777)  # mkdtemp makes the folder private; give it the usual permissions
        save_file(weights, str(tmp / MODEL_FILE))
        (tmp / CONFIG_FILE).write_text(text + "\n")
        if train_state is not None:
            torch.save(dict(train_state), tmp / STATE_FILE)
        for f in tmp.iterdir():
            _umask_mode(f, 0o666)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _umask_mode(path: Path, mode: int) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


@dataclass
class Checkpoint:
    """A loaded checkpoint folder."""

    path: Path
    config: dict[str, Any]
    """``config.json``."""
    weights: dict[str, torch.Tensor]
    """Model weights (already loaded into the model when one was given)."""
    train_state: dict[str, Any] | None
    """``train_state.pt`` (None for a weights-only checkpoint)."""


def load_checkpoint(
    path: str | Path, model: torch.nn.Module | None = None, *, map_location: str | torch.device = "cpu"
) -> Checkpoint:
    """Read a checkpoint folder; load the weights into ``model`` (strictly) when given.

    Raises:
        FileNotFoundError: ``path`` is not a checkpoint folder (the message lists what is missing).
    """
    from safetensors.torch import load_file

    path = Path(path)
    missing = [name for name in (MODEL_FILE, CONFIG_FILE) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a checkpoint folder: missing {missing}")
    weights = load_file(str(path / MODEL_FILE), device=str(map_location))
    if model is not None:
        model.load_state_dict(weights)
    config = json.loads((path / CONFIG_FILE).read_text())
    state_file = path / STATE_FILE
    # on the CPU: RNG states must be CPU tensors; optimizers move their state to their parameters
    train_state = torch.load(state_file, map_location="cpu", weights_only=True) if state_file.is_file() else None
    return Checkpoint(path, config, weights, train_state)


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / MODEL_FILE).is_file() and (child / CONFIG_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete ``step_*`` checkpoint of the highest step in ``run_dir``, or None."""
    found = _step_dirs(Path(run_dir))
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest ``step_*`` checkpoints; returns what was deleted."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    doomed = [p for _, p in _step_dirs(Path(run_dir))[:-keep]]
    for p in doomed:
        shutil.rmtree(p)
    return doomed


# ---- RNG and training state ------------------------------------------------------------------
def capture_rng(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """States of the global torch / CUDA / numpy / python RNGs and of ``generators``, in types
    ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }


def restore_rng(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Inverse of ``capture_rng``; every generator in ``generators`` must have a saved state."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    saved = state["generators"]
    for k, g in (generators or {}).items():
        if k not in saved:
            raise KeyError(f"no saved state for generator {k!r}; saved: {sorted(saved)}")
        g.set_state(saved[k])


def make_train_state(
    step: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    data_position: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Everything besides the weights needed to continue a run exactly at ``step``."""
    return {
        "step": int(step),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng(generators),
        "data_position": dict(data_position or {}),
        "extra": extra,
    }


def restore_train_state(
    state: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
) -> dict[str, Any]:
    """Load optimizer / scheduler / RNG states; returns ``{"step", "data_position", "extra"}``."""
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        if state["scheduler"] is None:
            raise ValueError("the checkpoint has no scheduler state to restore")
        scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"], generators)
    return {"step": state["step"], "data_position": state["data_position"], "extra": state["extra"]}


class EpochSampler:
    """Batches of indices into ``n`` items: a fresh permutation per epoch, a function of
    ``(seed, epoch)`` only, so the position ``(epoch, cursor)`` is the whole state. The last
    partial batch of an epoch is topped up from the next epoch."""

    def __init__(self, n: int, batch_size: int, seed: int = 0) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def next_batch(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            take = self._perm[self.cursor : self.cursor + self.batch_size - len(out)]
            out += take.tolist()
            self.cursor += len(take)
            if self.cursor >= self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if (state["n"], state["seed"]) != (self.n, self.seed):
            raise ValueError(
                f"sampler state is for n={state['n']}, seed={state['seed']}; this sampler has n={self.n}, "
                f"seed={self.seed} (different data or seed)"
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._perm = self._permutation(self.epoch)


# ---- schedule ------------------------------------------------------------------------------
def cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at ``total_steps``."""
    if total_steps < 1 or warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"bad schedule: total={total_steps}, warmup={warmup_steps}, min_lr_ratio={min_lr_ratio}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---- logging ---------------------------------------------------------------------------------
class Logger:
    """TensorBoard scalars under the groups ``losses/``, ``charts/`` and ``eval/``.

    ``log_dir=None`` writes nothing (tests, dry runs). ``purge_step`` (on resume) drops events a
    crashed run wrote after the checkpoint, so curves do not fold back on themselves.
    """

    GROUPS = ("losses", "charts", "eval")

    def __init__(self, log_dir: str | Path | None, *, purge_step: int | None = None) -> None:
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard is only needed when logging

            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def log(self, group: str, values: Mapping[str, float], step: int) -> None:
        if group not in self.GROUPS:
            raise ValueError(f"log group must be one of {self.GROUPS}, got {group!r}")
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{group}/{k}", float(v), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int, *, initial: int = 0, desc: str = "", enabled: bool = True) -> tqdm:
    """The progress bar of a training loop (``update(n)``, ``set_postfix(...)``, ``close()``)."""
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, smoothing=0.05)
