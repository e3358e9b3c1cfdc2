"""Label clips with the greedy oracle: the behaviour-cloning data set (paper, "Training", stage 1).

For every clip a gazing length is drawn as in the paper (per-clip gazing ratio ~ exponential
truncated to ``[min_ratio, max_ratio]``, split over the frames by a Dirichlet with ``alpha_first``
for frame 1 and ``alpha_rest`` for the others), and ``agents.baselines.GreedyOracle`` fills each
frame's budget with the patch that lowers the frame's loss most.

Storage (``--out``, default ``data/expert/<preset>/``)::

    meta.json              settings that fix the data (checked when appending / resuming)
    manifest.json          done clip indices and chunk names (derived from the chunks)
    chunks/chunk-<first>/  one memory-mapped TensorDict per chunk (``TensorDict.memmap_``)
                           + clips.json, the clip indices it holds

A chunk is written under a temporary name and renamed when complete, so a killed run leaves
only whole chunks; rerunning skips the clips already done (same settings => the same data as an
uninterrupted run) and a larger ``--num-clips`` appends. ``load_expert`` reads it back.

Each chunk's TensorDict (batch [n]) holds ``video`` (n, T, 3, H, W) uint8, ``action`` (n, L)
int64 padded with STOP, ``valid`` (n, L) bool, ``frame_id`` (n, L) int64 padded with T,
``reward`` (n, L) (the paper's frame reward), ``loss_after`` (n, L) (loss after each gaze, NaN
on padding), ``frame_loss`` / ``frame_start_loss`` (n, T), ``budgets`` / ``counts`` (n, T) int64,
``ratio`` (n,) the drawn gazing ratio and ``clip_index`` (n,) int64 (index into the source).
With ``--candidate-losses`` also ``candidate_loss`` (n, L, N) float32: the frame's loss after
each patch the oracle could have gazed at that step (what it took the minimum of; +inf where a
patch was not a candidate and on padding), the soft labels of ``agents.bc``'s distillation term
(about half again the size on disk). ``L`` is the same in every chunk (the longest possible
clip, see ``max_steps``).

    python -m experiments.collect_expert --preset tiny --num-clips 1024
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tensordict import TensorDict
from tqdm import tqdm

from agents.baselines import GreedyOracle, run_episodes
from agents.bc import RecordingOracle
from experiments.common import (
    atomic_write_json,
    clip_source,
    commit_dir,
    dir_size,
    parse_config,
    resolve_device,
    seed_everything,
)
from gaze_env.builder import build

FORMAT = "autogaze-expert-v1"
CHUNK_PREFIX = "chunk-"
TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class CollectExpertConfig:
    """Label clips with the greedy oracle into a resumable memory-mapped data set."""

    preset: Literal["tiny", "small", "paper"] = "tiny"
    """Geometry preset (frame size, scales, patch size, frames per clip)."""
    out: str | None = None
    """Output folder (default: data/expert/<preset>)."""
    videos: str | None = None
    """Clips to label: a folder or video file, or a .pt file from gaze_env.video.materialize;
    none = the embedded default data (split below)."""
    split: Literal["train", "val"] = "train"
    """Split of the embedded default data (when videos is none)."""
    num_clips: int = 1024
    """Clips to label: source indices first_clip .. first_clip + num_clips - 1 (a rerun with more
    appends, a rerun with the same resumes). The default 1024 makes about 100 MB for tiny in well
    under a minute of 2 CPU cores (small: about 0.6 MB and 0.2 CPU-s per clip)."""
    first_clip: int = 0
    """Source index of the first clip to label."""
    min_ratio: float = 0.02
    """Smallest per-clip gazing ratio (gazes / (T * N))."""
    max_ratio: float = 0.2
    """Largest per-clip gazing ratio."""
    ratio_scale: float = 0.05
    """Mean of the exponential that draws ratio - min_ratio before truncation at max_ratio."""
    alpha_first: float = 10.0
    """Dirichlet concentration of frame 1's share of the clip's gazes (first frames need more)."""
    alpha_rest: float = 3.0
    """Dirichlet concentration of every later frame's share."""
    loss: str = "l1"
    """Per-frame loss the oracle minimises: l1, mse, psnr, ssim or module:function."""
    reconstructor: str = "paste"
    """Reconstructor the oracle simulates: paste (grey start) or paste-black."""
    max_candidates: int | None = None
    """Patches the oracle tries per gaze, drawn at random (none: every valid patch)."""
    candidate_losses: bool = False
    """Also store the loss after every valid patch at every step (``candidate_loss``, N floats per
    step): the soft labels of behaviour cloning's distillation term (``TrainBCConfig.soft_coef``).
    With max_candidates, every valid patch is scored for them, not only the drawn ones. The
    actions are the same either way."""
    chunk_clips: int = 64
    """Clips labelled together (one batch) and committed to disk as one chunk."""
    seed: int = 0
    """Seeds the per-clip gazing lengths and the oracle's candidate draws."""
    device: str = "cpu"
    """Torch device of the oracle: cpu, cuda, cuda:<i> or auto."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def __post_init__(self) -> None:
        if not 0.0 < self.min_ratio <= self.max_ratio <= 1.0:
            raise ValueError(f"need 0 < min_ratio <= max_ratio <= 1, got {self.min_ratio}, {self.max_ratio}")
        if self.ratio_scale <= 0 or self.alpha_first <= 0 or self.alpha_rest <= 0:
            raise ValueError("ratio_scale, alpha_first and alpha_rest must be > 0")
        if self.num_clips < 0 or self.first_clip < 0 or self.chunk_clips < 1:
            raise ValueError(
                f"need num_clips >= 0, first_clip >= 0, chunk_clips >= 1; got {self.num_clips}, "
                f"{self.first_clip}, {self.chunk_clips}"
            )

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path("data/expert") / self.preset

    def data_settings(self) -> dict:
        """The settings that decide what a clip's labels are (must match to append / resume)."""
        keys = (
            "preset",
            "videos",
            "split",
            "min_ratio",
            "max_ratio",
            "ratio_scale",
            "alpha_first",
            "alpha_rest",
            "loss",
            "reconstructor",
            "max_candidates",
            "seed",
        )
        out = {k: getattr(self, k) for k in keys}
        if self.max_candidates is not None:  # the candidate draws are per chunk
            out["chunk_clips"] = self.chunk_clips
        if self.candidate_losses:  # absent otherwise: data sets labelled before the option still match
            out["candidate_losses"] = True
        return out


# ---- gazing lengths --------------------------------------------------------------------------
def sample_budgets(
    rng: np.random.Generator, num_frames: int, num_patches: int, cfg: CollectExpertConfig
) -> tuple[float, np.ndarray]:
    """One clip's gazing ratio and per-frame budgets (T,) int64, each in [1, N].

    The ratio is ``min_ratio + x`` with ``x ~ Exponential(mean=ratio_scale)`` truncated to
    ``[0, max_ratio - min_ratio]`` (inverse CDF); the clip's ``round(ratio * T * N)`` gazes are
    split by Dirichlet shares, rounded by largest remainder, then each frame clipped to [1, N].
    """
    lam, span = 1.0 / cfg.ratio_scale, cfg.max_ratio - cfg.min_ratio
    u = rng.random()
    ratio = cfg.min_ratio - math.log1p(-u * -math.expm1(-lam * span)) / lam
    total = round(ratio * num_frames * num_patches)
    alpha = np.full(num_frames, cfg.alpha_rest)
    alpha[0] = cfg.alpha_first
    raw = rng.dirichlet(alpha) * total
    budgets = np.floor(raw).astype(np.int64)
    short = total - int(budgets.sum())
    budgets[np.argsort(-(raw - budgets), kind="stable")[:short]] += 1
    return ratio, np.clip(budgets, 1, num_patches)


def max_steps(cfg: CollectExpertConfig, num_frames: int, num_patches: int) -> int:
    """Upper bound on one clip's gazes: every stored trajectory is padded to this length."""
    return min(num_frames * num_patches, round(cfg.max_ratio * num_frames * num_patches) + num_frames)


def clip_rng(seed: int, clip_index: int) -> np.random.Generator:
    """The generator of one clip's gazing length: depends on nothing but (seed, clip)."""
    return np.random.default_rng((seed, clip_index))


# ---- storage ---------------------------------------------------------------------------------
def _chunk_dirs(out: Path) -> list[Path]:
    folder = out / "chunks"
    return sorted(p for p in folder.iterdir() if p.name.startswith(CHUNK_PREFIX)) if folder.is_dir() else []


def _chunk_clips(chunk: Path) -> list[int]:
    return json.loads((chunk / "clips.json").read_text())


def _check_meta(out: Path, meta: dict) -> None:
    path = out / "meta.json"
    if not path.exists():
        atomic_write_json(path, meta)
        return
    old = json.loads(path.read_text())
    diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} on disk vs {meta.get(k)!r} now" for k in diff)
        raise ValueError(f"{out} was collected with other settings ({shown}); use the same settings or another --out")


def _write_manifest(out: Path) -> dict:
    chunks = _chunk_dirs(out)
    clips = sorted(i for c in chunks for i in _chunk_clips(c))
    manifest = {"format": FORMAT, "chunks": [c.name for c in chunks], "clips": clips, "num_clips": len(clips)}
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def _pad(td: TensorDict, length: int, num_patches: int, num_frames: int) -> TensorDict:
    """Pad the (n, L) step fields of a trajectory TensorDict to ``length`` steps."""
    n, L = td["action"].shape
    if L > length:
        raise ValueError(f"a trajectory of {L} steps exceeds the storage length {length}")
    fill = {"action": num_patches, "valid": False, "frame_id": num_frames, "reward": 0.0, "loss_after": float("nan")}
    for key, value in fill.items():
        x = td[key]
        td[key] = torch.cat([x, torch.full((n, length - L), value, dtype=x.dtype, device=x.device)], dim=1)
    return td


def expert_chunks(path: str | Path) -> list[TensorDict]:
    """The committed chunks of an expert data set, memory-mapped (nothing read yet), in order."""
    path = Path(path)
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"{path} is not an expert data set (no meta.json); run experiments.collect_expert")
    return [TensorDict.load_memmap(c) for c in _chunk_dirs(path)]


def load_expert(path: str | Path) -> TensorDict:
    """All clips of an expert data set as one in-memory TensorDict, batch [clips] (fields: see the
    module docstring), sorted by ``clip_index``; for data larger than memory iterate
    ``expert_chunks`` instead."""
    chunks = expert_chunks(path)
    if not chunks:
        raise ValueError(f"{path} holds no committed chunk yet")
    td = torch.cat(chunks)  # reads the memory maps into one in-memory TensorDict
    if not bool((td["clip_index"][1:] >= td["clip_index"][:-1]).all()):
        td = td[td["clip_index"].argsort()]
    if bool((td["clip_index"][1:] == td["clip_index"][:-1]).any()):
        raise ValueError(f"{path} holds some clip twice; the data set is corrupt")
    return td


# ---- collection ------------------------------------------------------------------------------
@dataclass
class Summary:
    """What a collection run did and what the data set holds."""

    out: str
    clips: int
    """Clips in the data set."""
    new_clips: int
    """Clips labelled by this run."""
    gazes: int
    """Gazes stored in the data set."""
    mean_frame_loss: float
    """Mean per-frame loss over the data set."""
    megabytes: float
    """Size on disk."""
    seconds: float
    clips_per_second: float
    """Clips labelled per second by this run, everything included (loading, writing)."""
    oracle_clips_per_second: float
    """Clips per second of the oracle rollouts alone (``run_episodes``)."""

    def __str__(self) -> str:
        return (
            f"{self.out}: {self.clips} clips ({self.new_clips} new), {self.gazes} gazes, mean frame loss "
            f"{self.mean_frame_loss:.4f}, {self.megabytes:.1f} MB on disk; {self.seconds:.1f} s, "
            f"{self.clips_per_second:.2f} clips/s ({self.oracle_clips_per_second:.2f} clips/s in the oracle)"
        )


def collect(cfg: CollectExpertConfig, *, on_chunk: Callable[[int], None] | None = None) -> Summary:
    """Label the clips of ``cfg`` not yet on disk; ``on_chunk(k)`` runs after the k-th chunk of
    this run is committed (progress hooks, tests)."""
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    built = build(cfg.preset, reward="frame", reward_kwargs={"loss": cfg.loss}, reconstructor=cfg.reconstructor)
    params, reward = built.params, built.reward
    T, N = params.config.num_frames, params.config.grid.num_patches
    length = max_steps(cfg, T, N)
    source = clip_source(cfg.preset, cfg.videos, cfg.split, min_clips=cfg.first_clip + cfg.num_clips)
    if len(source) < cfg.first_clip + cfg.num_clips:
        raise ValueError(
            f"the source holds {len(source)} clips; first_clip + num_clips = {cfg.first_clip + cfg.num_clips}"
        )

    out = cfg.out_dir
    (out / "chunks").mkdir(parents=True, exist_ok=True)
    _check_meta(out, {"format": FORMAT, "max_steps": length, **cfg.data_settings()})
    for stale in (out / "chunks").glob(f"{TMP_PREFIX}*"):  # chunks a killed run left half written
        shutil.rmtree(stale)
    for stale in out.glob(".*.tmp"):  # a manifest a killed run left half written
        stale.unlink()
    done = {i for c in _chunk_dirs(out) for i in _chunk_clips(c)}
    _write_manifest(out)
    todo = [i for i in range(cfg.first_clip, cfg.first_clip + cfg.num_clips) if i not in done]

    oracle = GreedyOracle(max_candidates=cfg.max_candidates)
    groups = [todo[lo : lo + cfg.chunk_clips] for lo in range(0, len(todo), cfg.chunk_clips)]
    bar = tqdm(total=len(todo), desc=f"oracle {cfg.preset}", unit="clip", disable=not cfg.progress)
    oracle_seconds = 0.0
    # decoding / generating the next chunk's clips overlaps with labelling this one
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(source.clips, groups[0]) if groups else None
        for k, clips in enumerate(groups, start=1):
            video = pending.result().to(device)
            pending = pool.submit(source.clips, groups[k]) if k < len(groups) else None
            drawn = [sample_budgets(clip_rng(cfg.seed, i), T, N, cfg) for i in clips]
            budgets = torch.tensor(np.stack([b for _, b in drawn]), device=device)
            generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + clips[0])
            tick = time.perf_counter()
            gazer = RecordingOracle(oracle, len(clips), length, N, device) if cfg.candidate_losses else oracle
            td = run_episodes(gazer, params, video, budgets, generator=generator, reward=reward).cpu()
            oracle_seconds += time.perf_counter() - tick
            td = _pad(td, length, N, T)
            if cfg.candidate_losses:
                td["candidate_loss"] = gazer.table.cpu()
            td["ratio"] = torch.tensor([r for r, _ in drawn], dtype=torch.float32)
            td["clip_index"] = torch.tensor(clips, dtype=torch.int64)
            name = f"{CHUNK_PREFIX}{clips[0]:09d}"
            tmp = out / "chunks" / f"{TMP_PREFIX}{name}"
            shutil.rmtree(tmp, ignore_errors=True)
            td.memmap_(prefix=tmp)
            (tmp / "clips.json").write_text(json.dumps(clips))
            commit_dir(tmp, out / "chunks" / name)
            _write_manifest(out)
            bar.update(len(clips))
            bar.set_postfix(loss=f"{float(td['frame_loss'].mean()):.4f}")
            if on_chunk is not None:
                on_chunk(k)
    bar.close()

    seconds = time.perf_counter() - start
    chunks = expert_chunks(out)
    gazes = sum(int(c["valid"].sum()) for c in chunks)
    total = sum(c.batch_size[0] for c in chunks)
    loss_sum = sum(float(c["frame_loss"].sum()) for c in chunks)
    return Summary(
        out=str(out),
        clips=total,
        new_clips=len(todo),
        gazes=gazes,
        mean_frame_loss=loss_sum / max(1, total * T),
        megabytes=dir_size(out) / 2**20,
        seconds=seconds,
        clips_per_second=len(todo) / seconds if seconds > 0 else float("nan"),
        oracle_clips_per_second=len(todo) / oracle_seconds if oracle_seconds > 0 else float("nan"),
    )


def main(argv: list[str] | None = None) -> Summary:
    cfg = parse_config(CollectExpertConfig, argv)
    seed_everything(cfg.seed)  # for library code on global RNGs; ours takes explicit generators
    summary = collect(cfg)
    print(summary)
    atomic_write_json(cfg.out_dir / "summary.json", asdict(summary))
    return summary


if __name__ == "__main__":
    main()
