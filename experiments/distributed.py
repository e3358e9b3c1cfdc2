"""Data-parallel training on PyTorch's own engine: ``torchrun`` + ``DistributedDataParallel``.

Every trainer (``train_bc``, ``train_rl``, ``train_recon``) runs unchanged as one process or
under ``torchrun``::

    python -m experiments.train_bc                                        # one process
    torchrun --standalone --nproc_per_node=2 -m experiments.train_bc      # 2 processes, this node
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 -m experiments.train_bc --device cuda  # multi-node (run on each)

What the trainers rely on (see ``Dist``):

- **Process group**: opened when the process was started by ``torchrun`` (``RANK`` /
  ``WORLD_SIZE`` / ``LOCAL_RANK`` in the environment, world size 1 included); backend NCCL
  when the run's device is CUDA, gloo on CPU. A run's ``--device cuda`` means ``cuda:<LOCAL_RANK>``.
- **Global batch**: a config's batch is the *global* one, split as
  ``global = per-rank batch x world size x accumulation``; ``Dist.split`` takes this rank's share
  of a global batch of indices, so each item is seen once per epoch across ranks and the update
  is the single-process one (``Dist.all_sum`` provides global normalisers).
- **Seeds**: weights are built from the run's seed on every rank (DDP also broadcasts rank 0's);
  anything drawn per rank uses ``Dist.rank_seed(seed)``.
- **Files**: rank 0 alone writes logs, checkpoints and results (``Dist.is_main``); every rank
  reads the checkpoint it resumes from, so multi-node runs need ``--out`` on a shared file
  system. A checkpoint holds no world size: resuming with another one works when the global batch
  still divides.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from tensordict import TensorDictBase
from torch import nn

from experiments.common import resolve_device

__all__ = ["Dist", "LossModule", "abort", "cleanup", "is_main_process", "launched_by_torchrun", "run", "setup"]

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
T = TypeVar("T")


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process outside torchrun (what prints a run's summary)."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class Dist:
    """This process's place in the run; ``Dist()`` is the single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    enabled: bool = False
    """A process group is open (torchrun), even at world size 1."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    @property
    def multi(self) -> bool:
        """More than one process: the collectives below communicate (else they are no-ops)."""
        return self.enabled and self.world_size > 1

    @property
    def backend(self) -> str | None:
        return dist.get_backend() if self.enabled else None

    def describe(self) -> str:
        """E.g. ``2 processes (gloo, cpu)`` or ``1 process (nccl, cuda:0)``: for the start-up line."""
        n = f"{self.world_size} process{'es' if self.world_size > 1 else ''}"
        return f"{n} ({self.backend or 'no process group'}, {self.device})"

    def rank_seed(self, seed: int) -> int:
        """A seed for what each rank draws on its own (different per rank, rank 0 keeps ``seed``)."""
        return seed + 1_000_003 * self.rank

    def per_rank(self, global_batch: int, accumulation: int = 1, what: str = "batch size") -> int:
        """Items per rank and micro-batch of a global batch; a clear error if it does not divide."""
        parts = self.world_size * accumulation
        if global_batch % parts:
            raise ValueError(
                f"the global {what} {global_batch} must be divisible by world size x accumulation = "
                f"{self.world_size} x {accumulation} = {parts}; change it or the number of processes"
            )
        return global_batch // parts

    def split(self, items: Sequence[Any], accumulation: int = 1) -> list[list[Any]]:
        """This rank's share of a global batch, as ``accumulation`` micro-batches: rank r takes the
        r-th contiguous block, so the ranks' shares are disjoint and cover ``items``."""
        n = self.per_rank(len(items), accumulation)
        mine = list(items)[self.rank * n * accumulation : (self.rank + 1) * n * accumulation]
        return [mine[i * n : (i + 1) * n] for i in range(accumulation)]

    def shard(self, n: int) -> range:
        """This rank's contiguous share of ``n`` items that need not divide (evaluation)."""
        lo, hi = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        return range(lo, hi)

    # ---- collectives (no-ops in a single process)
    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over ranks (a new tensor; no gradient)."""
        t = t.detach().clone()
        if self.multi:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_mean(self, values: Mapping[str, float]) -> dict[str, float]:
        """Mean over ranks of scalar diagnostics (one collective for all of them)."""
        if not self.multi or not values:
            return dict(values)
        t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=self.device)
        t = self.all_sum(t) / self.world_size
        return dict(zip(values, t.tolist()))

    def weighted_mean(self, value: float, weight: float) -> float:
        """``sum(value * weight) / sum(weight)`` over ranks (means of shards of unequal size)."""
        if not self.multi:
            return value
        t = self.all_sum(torch.tensor([value * weight, weight], dtype=torch.float64, device=self.device))
        return float(t[0] / t[1]) if float(t[1]) > 0 else float("nan")

    def barrier(self) -> None:
        if self.multi:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.multi:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def wrap(self, module: nn.Module, find_unused: bool = False) -> nn.Module:
        """``module`` under ``DistributedDataParallel`` when a process group is open, else itself;
        ``find_unused``: some parameters get no gradient from the loss (e.g. the policy's loss or
        value head under a loss that ignores it)."""
        if not self.enabled:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        # a (1, n) parameter's gradient comes back with strides (1, 1), its bucket view's are (n, 1): the
        # same memory order, which the reducer's stride check does not see (it says so: "not an error")
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)

    @contextlib.contextmanager
    def accumulate(self, model: nn.Module, sync: bool) -> Iterator[None]:
        """Around one micro-batch's backward: skip DDP's gradient all-reduce unless ``sync`` (the
        last micro-batch of a step)."""
        if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
            yield
        else:
            with model.no_sync():
                yield

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs)


class LossModule(nn.Module):
    """``forward(*args) = fn(model, *args)``: puts a loss that calls the model's methods (not its
    ``forward``) through DDP's forward, which gradient synchronisation needs. A TensorDict result
    comes back as a plain dict (DDP looks for the output's tensors in dicts, not TensorDicts)."""

    def __init__(self, model: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.fn(self.model, *args, **kwargs)
        return dict(out.items()) if isinstance(out, TensorDictBase) else out


def setup(device: str, timeout_minutes: float = 60.0) -> Dist:
    """Open the process group when launched by ``torchrun`` and pick this rank's device.

    ``device``: the run's ``--device`` (``cpu``, ``cuda``, ``cuda:<i>``, ``auto``). Under torchrun
    ``cuda`` / ``auto`` mean ``cuda:<LOCAL_RANK>``; an explicit ``cuda:<i>`` is refused for more
    than one process (the ranks would share one card). ``timeout_minutes`` bounds a collective's
    wait (rank 0 may label expert data while the others wait at a barrier).
    """
    if not launched_by_torchrun():
        return Dist(device=resolve_device(device))
    rank, world, local = (int(os.environ[v]) for v in TORCHRUN_VARS)
    if device in ("cuda", "auto") and torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices here; "
                             f"lower --nproc_per_node")
        dev = torch.device("cuda", local)
    elif device.startswith("cuda:") and world > 1:
        raise ValueError(f"--device {device} names one card for {world} processes; use --device cuda "
                         f"(each rank takes cuda:<LOCAL_RANK>)")
    else:
        dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes), **kwargs)
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev, enabled=True)


def run(device: str, timeout_minutes: float, fn: Callable[[Dist], T]) -> T:
    """``fn(dist)`` between ``setup`` and ``cleanup``; on an error this rank leaves the process
    group at once (``abort``) and re-raises: every trainer's entry point."""
    d = setup(device, timeout_minutes)
    try:
        out = fn(d)
    except BaseException:
        abort(d)
        raise
    cleanup(d)
    return out


def cleanup(d: Dist) -> None:
    """Close the process group ``setup`` opened, after a final barrier (the end of a run)."""
    if d.enabled and dist.is_initialized():
        d.barrier()
        dist.destroy_process_group()


def abort(d: Dist) -> None:
    """Close the process group without waiting for the other ranks (this rank failed; torchrun
    then stops the others)."""
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
