"""Evaluate trained gazers against every baseline on held-out clips: numbers, tables, plots, GIFs.

    python -m experiments.evaluate                                   # what `make eval` runs
    python -m experiments.evaluate --policy runs/bc/tiny/final rl=runs/rl/tiny/grpo/final
    python -m experiments.evaluate --videos my_videos/ --num-clips 32 --baselines random greedy_oracle

Gazers: the policies of ``--policy`` (folders written by ``AutoGazePolicy.save_pretrained``, each
``path`` or ``label=path``; ``auto``, the default, takes the exports of ``make train-bc`` /
``make train-rl`` for the preset that exist) decoding greedily, and the ``--baselines`` of
``agents.baselines``. Clips: the first ``--num-clips`` of ``--videos`` (a folder or video file,
read with ``FolderSource``, or a ``.pt`` clip file), by default the embedded validation split
(``prepare_data.default_data("val", preset)``). What is measured, every clip in one batched
rollout per gazer and setting:

1. **Loss vs gazing ratio**: every frame gets the budget ``max(1, floor(r * N))`` for each ratio
   ``r`` of ``--ratios``; a clip's score is its mean per-frame loss (``--loss``, L1 by default) at
   each frame's end. Curves are plotted against the ratio really used (budget / N).
2. **Ratio to reach a loss** (the paper's Table 3 analogue): per clip, the gazing ratio at which
   its loss-vs-ratio curve first reaches each ``--thresholds`` loss, interpolated linearly in
   loss between the two swept budgets around the crossing (``experiments.train_rl``'s
   ``ratio_to_threshold``). Clips that never reach it count at the largest swept ratio, so the
   mean is then a lower bound (marked ``>=``) and the number of such clips is reported.
3. **Stopping** (policies only): budgets capped at ``--stop-cap-ratio`` and each frame stopped by
   the policy's loss-prediction head once it predicts a loss at or below the
   ``task_loss_requirement`` (``--requirements``): achieved loss, share of frames that meet the
   requirement, gazing ratio and token reduction factor (all patches / gazed patches), per clip.
4. **Loss-prediction calibration** (policies only): the prediction at each frame's last gaze vs
   the frame's actual loss, over the clips, frames and ratios of (1): Spearman rank correlation,
   mean absolute error and bias.
5. **Behaviour** at ``--focus-ratio``: the gaze rate of patches binned by frame-difference
   magnitude (mean ``|frame_t - frame_{t-1}|`` over the patch region, frames t >= 1), and the scale
   of the gazed patches binned by detail (mean over the region of the Laplacian variance of its
   finest-scale cells, so that detail does not grow with region size). Bins are quantiles of all
   patches, shared by every gazer.

Means come with 95% percentile-bootstrap confidence intervals over clips (``--bootstrap``
resamples, seeded). Outputs under ``--out`` (default ``runs/eval/<preset>/``): ``report.json``
(every number, per-clip values and the config), ``report.md`` (the tables), ``loss_vs_ratio.png``,
``calibration.png`` (with policies), ``behaviour.png`` and ``gif/<gazer>.gif``: frame | gazes
coloured by scale | reconstruction over the first ``--num-videos`` clips at ``--focus-ratio``.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from agents.baselines import Baseline, make_baseline, patch_means, run_episodes
from agents.policy import AutoGazePolicy
from agents.rollout import rollout
from experiments.common import (
    atomic_write_json,
    atomic_write_text,
    clip_source,
    config_dict,
    parse_config,
    resolve_device,
    seed_everything,
)
from experiments.evaluate_baselines import EvaluateBaselinesConfig
from experiments.prepare_data import default_data
from experiments.train_rl import ratio_to_threshold
from experiments.training import progress as progress_bar
from gaze_env import core
from gaze_env.builder import Built, build
from gaze_env.config import budget_for_ratio
from gaze_env.patches import PatchGrid
from gaze_env.render import side_by_side
from gaze_env.video import VideoSource

__all__ = [
    "EvaluateConfig",
    "behaviour_stats",
    "evaluate",
    "gazed_mask",
    "headline_table",
    "last_gaze_prediction",
    "main",
    "markdown_report",
    "mean_ci",
    "patch_detail",
    "patch_motion",
    "rankdata",
    "resolve_policies",
    "spearman",
]

Gazer = AutoGazePolicy | Baseline
CI_METHOD = "95% percentile bootstrap over clips"


@dataclass(frozen=True)
class EvaluateConfig(EvaluateBaselinesConfig):
    """Evaluate trained policies and every baseline on held-out clips (tables, plots, GIFs)."""

    videos: str | None = None
    """Clips: a folder or video file, or a .pt file from gaze_env.video.materialize; none = the
    embedded default data of --split (prepare_data.default_data)."""
    num_clips: int = 128
    """Clips evaluated: source indices 0 .. num_clips - 1 (fewer if the source holds fewer). 128 tiny
    clips took 70 s on 2 busy CPU cores (1 thread) with every baseline and a random tiny policy; a
    trained policy whose own stop rarely fires adds up to about 40 s of stopping runs."""
    ratios: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
    """Gazing ratios of the loss curves; each frame's budget is max(1, floor(ratio * N))."""
    batch_size: int = 256
    """Most clips rolled out together (memory bound; all clips in one batch by default)."""
    out: str | None = None
    """Output folder (default: runs/eval/<preset>)."""
    policy: tuple[str, ...] = ("auto",)
    """Policy folders (AutoGazePolicy.save_pretrained), each PATH (labelled by its folder name) or
    LABEL=PATH; auto = the exports of make train-bc / train-rl for the preset that exist; none =
    baselines only."""
    thresholds: tuple[float, ...] = (0.06, 0.08, 0.1)
    """Losses of the ratio-to-reach table (the paper's Table 3 analogue)."""
    requirements: tuple[float, ...] = (0.06, 0.08, 0.1)
    """task_loss_requirement values of the policies' own stopping."""
    stop_cap_ratio: float = 0.75
    """Per-frame budget cap (as a gazing ratio) when the policy stops itself (paper default 0.75)."""
    focus_ratio: float = 0.1
    """Gazing ratio (one of --ratios) of the behaviour statistics and the GIFs."""
    behaviour_bins: int = 5
    """Quantile bins of frame difference and of detail in the behaviour statistics."""
    num_videos: int = 2
    """Clips shown in each gazer's GIF (0: no GIFs)."""
    gif_scale: int = 0
    """Nearest-neighbour upscaling of GIF frames; 0 = enough for frames of at least 256 px."""
    bootstrap: int = 10000
    """Bootstrap resamples of the confidence intervals."""
    progress: bool = True
    """Show a tqdm progress bar."""
    threads: int = 1
    """torch CPU threads during the evaluation (0: torch's default). The rollouts are loops of small
    ops where more threads mostly wait on each other: on a busy 2-core box 2 threads took 11 to 217 s
    for what 1 thread did in 15 s."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.focus_ratio not in self.ratios:
            raise ValueError(f"focus_ratio={self.focus_ratio} must be one of --ratios {self.ratios}")
        if not 0 < self.stop_cap_ratio <= 1:
            raise ValueError(f"stop_cap_ratio must be in (0, 1], got {self.stop_cap_ratio}")
        if self.behaviour_bins < 1 or self.bootstrap < 1 or min(self.num_videos, self.gif_scale, self.threads) < 0:
            raise ValueError(
                "behaviour_bins and bootstrap must be >= 1, num_videos, gif_scale and threads >= 0; got "
                f"{self.behaviour_bins}, {self.bootstrap}, {self.num_videos}, {self.gif_scale}, {self.threads}"
            )
        for spec in self.policy:
            if spec not in ("auto", "none") and not _split_spec(spec)[1]:
                raise ValueError(f"empty path in --policy {spec!r}; use PATH or LABEL=PATH")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path("runs/eval") / self.preset


# ---- statistics ------------------------------------------------------------------------------
def rankdata(x: torch.Tensor) -> torch.Tensor:
    """(n,) -> (n,) float64 ranks 1..n, ties sharing their average rank (scipy's ``rankdata``)."""
    _, inverse, counts = torch.unique(x.flatten(), sorted=True, return_inverse=True, return_counts=True)
    average = counts.cumsum(0).double() - (counts.double() - 1) / 2  # mean of each tie group's ranks
    return average[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of paired samples (pairs with a non-finite value are dropped);
    NaN with fewer than 2 pairs or when either side is constant."""
    x, y = x.flatten().double(), y.flatten().double()
    keep = torch.isfinite(x) & torch.isfinite(y)
    if int(keep.sum()) < 2:
        return float("nan")
    rx, ry = rankdata(x[keep]), rankdata(y[keep])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / denom if denom > 0 else float("nan")


def mean_ci(values: torch.Tensor, resamples: int, seed: int, level: float = 0.95) -> dict[str, float]:
    """Mean of ``values`` (n,) with a percentile-bootstrap confidence interval of the mean."""
    v = values.flatten().double().cpu()
    n = v.numel()
    if n == 0:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    generator = torch.Generator().manual_seed(seed)
    means = v[torch.randint(0, n, (resamples, n), generator=generator)].mean(1)
    alpha = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return {"mean": float(v.mean()), "ci_low": lo, "ci_high": hi, "n": n}


# ---- trajectories ----------------------------------------------------------------------------
def gazed_mask(action: torch.Tensor, frame_id: torch.Tensor, valid: torch.Tensor, num_frames: int,
               num_patches: int) -> torch.Tensor:
    """Trajectory (B, L) ``action`` / ``frame_id`` / ``valid`` -> (B, T, N) bool patches gazed per frame."""
    B, L = action.shape
    is_gaze = valid & (action < num_patches)
    out = torch.zeros(B, num_frames, num_patches + 1, dtype=torch.bool, device=action.device)
    b = torch.arange(B, device=action.device)[:, None].expand(B, L)
    # STOP, padding and invalid steps all land in the extra column, dropped below
    out[b, torch.where(is_gaze, frame_id, 0), torch.where(is_gaze, action, num_patches)] = True
    return out[..., :num_patches]


def last_gaze_prediction(td, num_frames: int, num_patches: int) -> torch.Tensor:
    """(B, T) float32: the policy's ``loss_pred`` after the last gaze of each frame (its prediction
    of the frame's final loss); NaN for frames without a gaze."""
    action, frame_id, valid, pred = td["action"], td["frame_id"], td["valid"], td["loss_pred"]
    B, L = action.shape
    is_gaze = valid & (action < num_patches)
    step = torch.arange(L, device=action.device).expand(B, L)
    last = torch.full((B, num_frames), -1, dtype=torch.int64, device=action.device).scatter_reduce(
        1, torch.where(is_gaze, frame_id, 0), torch.where(is_gaze, step, -1), "amax"
    )
    out = pred.gather(1, last.clamp(min=0)).float()
    return out.masked_fill(last < 0, float("nan"))


# ---- per-patch video statistics --------------------------------------------------------------
def patch_motion(video: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """(B, T, 3, H, W) uint8 -> (B, T, N) float32: mean ``|frame_t - frame_{t-1}|`` (0..255, over
    channels and the patch region); NaN at t = 0."""
    B, T = video.shape[:2]
    diff = (video[:, 1:].float() - video[:, :-1].float()).abs().mean(2)  # (B, T-1, H, W)
    means = patch_means(grid, diff.flatten(0, 1)).view(B, T - 1, -1)
    return torch.cat([torch.full_like(means[:, :1], float("nan")), means], dim=1)


LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def patch_detail(video: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """(B, T, 3, H, W) uint8 -> (B, T, N) float32: the variance of the Laplacian of the grey frame
    inside each finest-scale cell, averaged over the patch region (a finest patch: exactly its
    Laplacian variance), so that a coarse patch is not scored higher for covering more edges."""
    B, T, _, H, _ = video.shape
    weights = torch.tensor([0.299, 0.587, 0.114], device=video.device).view(1, 3, 1, 1)
    grey = (video.flatten(0, 1).float() * weights).sum(1, keepdim=True)  # (BT, 1, H, W)
    lap = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), LAPLACIAN.to(video.device).view(1, 1, 3, 3))[:, 0]
    r = grid.region_sizes[-1]
    g = H // r
    cells = lap.reshape(B * T, g, r, g, r).var(dim=(2, 4), unbiased=False)  # (BT, g, g)
    per_pixel = cells.repeat_interleave(r, 1).repeat_interleave(r, 2)  # (BT, H, W)
    return patch_means(grid, per_pixel).view(B, T, -1)


def _quantile_edges(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Inner bin edges (< bins of them, strictly increasing) at the quantiles of ``values``."""
    v = values[torch.isfinite(values)].double()
    if v.numel() == 0 or bins < 2:
        return torch.empty(0, dtype=torch.float64)
    if v.numel() > 2**24:  # torch.quantile's limit; a strided subsample keeps the edges
        v = v[:: math.ceil(v.numel() / 2**24)]
    q = torch.quantile(v, torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1])
    return torch.unique(q[q > v.min()])  # an edge at the minimum (many static patches) leaves an empty bin


def _bin_ranges(edges: torch.Tensor, values: torch.Tensor) -> list[list[float]]:
    v = values[torch.isfinite(values)].double()
    bounds = [float(v.min()), *edges.tolist(), float(v.max())]
    return [[lo, hi] for lo, hi in zip(bounds, bounds[1:])]


def behaviour_stats(gazed: dict[str, torch.Tensor], motion: torch.Tensor, detail: torch.Tensor, grid: PatchGrid,
                    bins: int) -> dict:
    """Gaze rate vs frame difference and gazed scale vs detail.

    ``gazed`` maps each gazer to (B, T, N) bool; ``motion`` and ``detail`` are (B, T, N) from
    :func:`patch_motion` / :func:`patch_detail` (motion NaN at t = 0, which is left out). Bins are
    quantiles over all patches, shared by every gazer. Returns JSON-ready lists, one entry per bin:
    ``motion``: ``range``, ``patches``, ``gaze_rate[gazer]`` (fraction of the bin's patches
    gazed); ``detail``: ``range``, ``patches``, ``gazes[gazer]``, ``mean_scale[gazer]`` (scale index,
    0 = coarsest; NaN when no gaze), ``scale_fraction[gazer]`` (per bin, per scale).
    """
    scale = grid.patch_scale.to(motion.device).expand_as(motion)  # (B, T, N)
    k = grid.num_scales
    m_edges = _quantile_edges(motion, bins)
    m_bin = torch.bucketize(motion.double(), m_edges.to(motion.device), right=True)  # (B, T, N)
    m_ok = torch.isfinite(motion)
    nm = m_edges.numel() + 1
    m_count = torch.bincount(m_bin[m_ok], minlength=nm)
    d_edges = _quantile_edges(detail, bins)
    d_bin = torch.bucketize(detail.double(), d_edges.to(detail.device), right=True)
    nd = d_edges.numel() + 1
    out = {
        "motion": {"range": _bin_ranges(m_edges, motion), "patches": m_count.tolist(), "gaze_rate": {}},
        "detail": {
            "range": _bin_ranges(d_edges, detail),
            "patches": torch.bincount(d_bin.flatten(), minlength=nd).tolist(),
            "gazes": {},
            "mean_scale": {},
            "scale_fraction": {},
        },
    }
    for name, g in gazed.items():
        g = g.to(motion.device)
        hits = torch.bincount(m_bin[m_ok & g], minlength=nm)
        out["motion"]["gaze_rate"][name] = (hits.double() / m_count.clamp(min=1)).tolist()
        per = torch.bincount(d_bin[g] * k + scale[g], minlength=nd * k).view(nd, k).double()  # (bins, k)
        total = per.sum(1)
        frac = per / total.clamp(min=1)[:, None]
        mean_scale = (frac * torch.arange(k, dtype=torch.float64)).sum(1).masked_fill(total == 0, float("nan"))
        out["detail"]["gazes"][name] = total.long().tolist()
        out["detail"]["mean_scale"][name] = mean_scale.tolist()
        out["detail"]["scale_fraction"][name] = frac.tolist()
    return out


# ---- rollouts --------------------------------------------------------------------------------
def _split_spec(spec: str) -> tuple[str | None, str]:
    label, sep, path = spec.partition("=")
    return (label, path) if sep else (None, spec)


def resolve_policies(specs: tuple[str, ...], preset: str) -> dict[str, Path]:
    """``--policy`` values -> {label: folder}. ``LABEL=PATH`` keeps its label; a bare path is
    labelled by its folder name, or by as many trailing path parts as make labels unique (two
    ``.../final`` exports: ``bc/final``, ``grpo/final``). ``auto``: ``runs/bc/<preset>/final``
    (``bc``) and ``runs/rl/<preset>/<algo>/final`` (``rl-<algo>``) where they exist; ``none``: no
    policy."""
    named: dict[str, Path] = {}
    bare: list[Path] = []
    for spec in specs:
        if spec == "none":
            continue
        if spec == "auto":
            candidates = [("bc", Path("runs/bc") / preset / "final")]
            candidates += [(f"rl-{p.parent.name}", p) for p in sorted((Path("runs/rl") / preset).glob("*/final"))]
            named.update({label: path for label, path in candidates if (path / "config.json").exists()})
            continue
        label, path = _split_spec(spec)
        if label is None:
            bare.append(Path(path))
        else:
            named[label] = Path(path)
    depth = 1
    while True:
        labels = ["/".join(p.resolve().parts[-depth:]) for p in bare]
        if len(set(labels)) == len(labels) or depth > 32:
            break
        depth += 1
    out = dict(named)
    for label, path in zip(labels, bare):
        if label in out:
            raise ValueError(f"two policies are labelled {label!r}; name them with LABEL=PATH")
        out[label] = path
    return out


def _load_policy(path: Path, grid: PatchGrid, device: torch.device) -> AutoGazePolicy:
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a policy folder (no config.json); pass AutoGazePolicy.save_pretrained "
                                "folders, e.g. runs/bc/<preset>/final")
    policy = AutoGazePolicy.from_pretrained(path, device).eval()
    if policy.config.grid != grid:
        raise ValueError(f"policy {path} gazes on {policy.config.grid}, the evaluation preset uses {grid}; "
                         "pick the preset it was trained for (--preset)")
    return policy


@dataclass
class Run:
    """Per-clip results of one gazer in one setting, on the CPU."""

    frame_loss: torch.Tensor  # (n, T) float64 loss of each frame at its end
    gazed: torch.Tensor  # (n, T, N) bool patches gazed per frame
    prediction: torch.Tensor | None  # (n, T) float32 policy's predicted frame loss (last gaze); None: baseline
    head: dict[str, torch.Tensor]  # action / valid / budgets (v, ...) of the first clips, for the GIFs

    @property
    def gazes(self) -> torch.Tensor:
        """(n,) int64 gazes per clip."""
        return self.gazed.sum((1, 2))


@torch.no_grad()
def run_gazer(gazer: Gazer, built: Built, video: torch.Tensor, budget: int, cfg: EvaluateConfig, *,
              requirement: float | None = None) -> Run:
    """Roll ``gazer`` over all clips ``video`` (n, T, 3, H, W) uint8 (in batches of
    ``cfg.batch_size``) with ``budget`` gazes per frame; policies decode greedily and, with
    ``requirement``, stop frames by their predicted loss."""
    T, N = built.config.num_frames, built.config.grid.num_patches
    device = resolve_device(cfg.device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    losses, gazed, preds, head = [], [], [], {}
    for lo in range(0, video.shape[0], cfg.batch_size):
        clips = video[lo : lo + cfg.batch_size].to(device)
        budgets = torch.full((clips.shape[0], T), budget, dtype=torch.int64, device=device)
        if isinstance(gazer, AutoGazePolicy):
            td = rollout(gazer, built.params, built.reward, clips, budgets=budgets,
                         task_loss_requirement=requirement, temperature=0.0)
            preds.append(last_gaze_prediction(td, T, N).cpu())
        else:
            td = run_episodes(gazer, built.params, clips, budgets, generator=generator)
        losses.append(td["frame_loss"].double().cpu())
        gazed.append(gazed_mask(td["action"], td["frame_id"], td["valid"], T, N).cpu())
        if lo == 0:
            head = {k: td[k][: cfg.num_videos].cpu() for k in ("action", "valid", "budgets")}
    return Run(torch.cat(losses), torch.cat(gazed), torch.cat(preds) if preds else None, head)


def replay_canvases(built: Built, video: torch.Tensor, action: torch.Tensor, valid: torch.Tensor,
                    budgets: torch.Tensor) -> torch.Tensor:
    """The reconstruction at the end of every frame: (B, T, 3, H, W) uint8, by stepping the
    trajectories (B, L) through the core again."""
    params = built.params
    state = core.reset(params, video, budgets=budgets)
    canvases = torch.zeros_like(video)
    stop = params.config.grid.stop
    for l in range(action.shape[1]):
        if bool(state.done.all()):
            break
        tr = core.step(params, state, torch.where(valid[:, l] & ~state.done, action[:, l], stop), validate=False)
        rows = tr.frame_end.nonzero()[:, 0]
        canvases[rows, tr.frame_index[rows]] = state.canvas[rows]  # the paste canvas carries on unchanged
    return canvases


# ---- pictures --------------------------------------------------------------------------------
def _atomic_save(path: Path, save: Callable[[str], object]) -> Path:
    """``save(temporary path)`` then ``os.replace`` onto ``path``: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        save(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_gif(path: Path, label: str, video: torch.Tensor, gazed: torch.Tensor, canvases: torch.Tensor,
              frame_loss: torch.Tensor, grid: PatchGrid, scale: int, loss_name: str, ms_per_frame: int = 500) -> Path:
    """Animated GIF, one frame per video frame, one row per clip: a caption, then frame | gazes
    coloured by scale | reconstruction (``gaze_env.render.side_by_side``) upscaled ``scale`` x."""
    B, T = video.shape[:2]
    caption, gap = 14, 6
    frames = []
    for t in range(T):
        rows = []
        for b in range(B):
            img = side_by_side(video[b, t], gazed[b, t], canvases[b, t], grid).numpy()
            img = img.repeat(scale, 0).repeat(scale, 1)
            pil = Image.new("RGB", (img.shape[1], img.shape[0] + caption), "white")
            pil.paste(Image.fromarray(img), (0, caption))
            text = (f"{label}  clip {b}  frame {t + 1}/{T}  gazes {int(gazed[b, t].sum())}  "
                    f"{loss_name} {float(frame_loss[b, t]):.4f}")
            ImageDraw.Draw(pil).text((2, 1), text, fill="black")
            rows.append(np.asarray(pil))
            rows.append(np.full((gap, img.shape[1], 3), 255, dtype=np.uint8))
        frames.append(Image.fromarray(np.concatenate(rows[:-1], 0)))
    return _atomic_save(path, lambda p: frames[0].save(p, format="GIF", save_all=True, append_images=frames[1:],
                                                       duration=ms_per_frame, loop=0))


def _figure(ncols: int, width: float = 5.0, height: float = 4.0):
    from matplotlib.figure import Figure  # object-oriented Agg: no pyplot, no global backend

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save_figure(fig, path: Path) -> Path:
    return _atomic_save(path, lambda p: fig.savefig(p, format="png", dpi=110))


def plot_loss_vs_ratio(report: dict, path: Path) -> Path:
    fig, (ax,) = _figure(1, 7.0, 4.8)
    x = [r["actual_ratio"] for r in report["ratios"]]
    for name, curve in report["loss_vs_ratio"].items():
        cells = [curve[str(r["ratio"])] for r in report["ratios"]]
        y = [c["mean"] for c in cells]
        line = ax.plot(x, y, marker="o", ms=3, label=name, lw=2.2 if name in report["policies"] else 1.2)[0]
        ax.fill_between(x, [c["ci_low"] for c in cells], [c["ci_high"] for c in cells], color=line.get_color(),
                        alpha=0.15, lw=0)
        stops: dict[tuple[float, float], list[str]] = {}  # requirements landing on one point share a label
        for req, cell in report["stopping"].get(name, {}).items():
            stops.setdefault((cell["gazing_ratio"]["mean"], cell["loss"]["mean"]), []).append(req)
        for xy, reqs in stops.items():
            ax.plot(*xy, marker="*", ms=10, ls="none", color=line.get_color())
            ax.annotate("stop@" + ",".join(reqs), xy, fontsize=7, textcoords="offset points", xytext=(4, 4))
    for thr in report["config"]["thresholds"]:
        ax.axhline(thr, color="grey", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("gazing ratio (gazed patches / all patches)")
    ax.set_ylabel(f"mean per-frame {report['loss']}")
    ax.set_title(f"loss vs gazing ratio, {report['num_clips']} clips ({report['config']['preset']}); "
                 "bands: 95% CI; stars: own stop", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save_figure(fig, path)


def plot_calibration(points: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], report: dict,
                     path: Path) -> Path:
    """One scatter per policy: predicted vs actual frame loss, coloured by gazing ratio."""
    fig, axes = _figure(len(points), 4.6, 4.4)
    for ax, (name, (pred, actual, ratio)) in zip(axes, points.items()):
        keep = torch.isfinite(pred) & torch.isfinite(actual)
        sc = ax.scatter(actual[keep].numpy(), pred[keep].numpy(), c=ratio[keep].numpy(), s=5, alpha=0.6,
                        cmap="viridis", norm=_log_norm(ratio))
        lo = float(min(actual[keep].min(), pred[keep].min())) if bool(keep.any()) else 0.0
        hi = float(max(actual[keep].max(), pred[keep].max())) if bool(keep.any()) else 1.0
        ax.plot([lo, hi], [lo, hi], color="grey", ls="--", lw=0.8)
        ax.set_xlabel(f"actual frame {report['loss']}")
        ax.set_ylabel("predicted (loss head, last gaze)")
        ax.set_title(f"{name}: Spearman {_num(report['calibration'][name]['spearman'], '.3f')}", fontsize=9)
        fig.colorbar(sc, ax=ax, label="gazing ratio")
    return _save_figure(fig, path)


def _log_norm(ratio: torch.Tensor):
    from matplotlib.colors import LogNorm

    return LogNorm(vmin=float(ratio.min()), vmax=max(float(ratio.max()), float(ratio.min()) * 1.0001))


def plot_behaviour(report: dict, path: Path) -> Path:
    beh = report["behaviour"]
    fig, (a, b) = _figure(2, 5.5, 4.2)
    mids_m = [(lo + hi) / 2 for lo, hi in beh["motion"]["range"]]
    for name, rate in beh["motion"]["gaze_rate"].items():
        a.plot(range(len(rate)), rate, marker="o", ms=3, label=name)
    a.set_xticks(range(len(mids_m)), [f"{lo:.1f}-{hi:.1f}" for lo, hi in beh["motion"]["range"]], fontsize=7,
                 rotation=30)
    a.set_xlabel("mean |frame_t - frame_t-1| over the patch (0..255), quantile bins")
    a.set_ylabel("gaze rate (fraction of patches gazed)")
    a.set_title(f"gaze rate vs frame difference (ratio {beh['ratio']:g}, frames t >= 1)", fontsize=9)
    for name, scale in beh["detail"]["mean_scale"].items():
        b.plot(range(len(scale)), scale, marker="o", ms=3, label=name)
    b.set_xticks(range(len(beh["detail"]["range"])), [f"{lo:.0f}-{hi:.0f}" for lo, hi in beh["detail"]["range"]],
                 fontsize=7, rotation=30)
    b.set_xlabel("detail: Laplacian variance of the patch region, quantile bins")
    b.set_ylabel("mean scale index of gazed patches (0 = coarsest)")
    b.set_title("chosen scale vs detail", fontsize=9)
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save_figure(fig, path)


# ---- tables ----------------------------------------------------------------------------------
def _num(x: float | None, spec: str) -> str:
    """``x`` formatted with ``spec``; ``n/a`` for a missing (None, NaN) value."""
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def _cell(s: dict, digits: int = 4, prefix: str = "") -> str:
    f = f".{digits}f"
    return f"{prefix}{_num(s['mean'], f)} [{_num(s['ci_low'], f)}, {_num(s['ci_high'], f)}]"


def _json_ready(obj):
    """Non-finite floats -> None, so that report.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_ready(v) for v in obj]
    return obj


def headline_table(report: dict) -> str:
    """Markdown: one row per gazer, one column per gazing ratio, cells = mean per-frame loss [95% CI]."""
    ratios = report["ratios"]
    lines = [
        "| gazer | " + " | ".join(f"ratio {r['ratio']:g} ({r['budget']}/frame)" for r in ratios) + " |",
        "|---|" + "---:|" * len(ratios),
    ]
    for name, curve in report["loss_vs_ratio"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(curve[str(r["ratio"])]) for r in ratios) + " |")
    return "\n".join(lines)


def threshold_table(report: dict) -> str:
    """Markdown: gazing ratio needed to reach each loss threshold, per gazer."""
    thresholds = report["config"]["thresholds"]
    n = report["num_clips"]
    lines = [
        "| gazer | " + " | ".join(f"{report['loss']} {t:g}" for t in thresholds) + " |",
        "|---|" + "---:|" * len(thresholds),
    ]
    for name, row in report["ratio_to_threshold"].items():
        cells = []
        for t in thresholds:
            c = row[str(t)]
            miss = c["unreached"]
            cells.append(_cell(c, prefix=">= " if miss else "") + (f" ({miss}/{n} never)" if miss else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stopping_table(report: dict) -> str:
    lines = [
        f"| policy | requirement | achieved {report['loss']} | frames meeting it | gazing ratio | "
        "token reduction (per clip) | token reduction (overall) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rows in report["stopping"].items():
        for req, c in rows.items():
            lines.append(
                f"| {name} | {req} | {_cell(c['loss'])} | {_num(c['frames_meeting'], '.1%')} | "
                f"{_cell(c['gazing_ratio'])} | {_cell(c['token_reduction'], 2)} | "
                f"{_num(c['token_reduction_overall'], '.2f')}x |"
            )
    return "\n".join(lines)


def calibration_table(report: dict) -> str:
    ratios = [r["ratio"] for r in report["ratios"]]
    lines = [
        "| policy | Spearman (all) | " + " | ".join(f"ratio {r:g}" for r in ratios)
        + " | MAE | bias (pred - actual) | points |",
        "|---|---:|" + "---:|" * len(ratios) + "---:|---:|---:|",
    ]
    for name, c in report["calibration"].items():
        per = " | ".join(_num(c["spearman_per_ratio"][str(r)], ".3f") for r in ratios)
        lines.append(f"| {name} | {_num(c['spearman'], '.3f')} | {per} | {_num(c['mae'], '.4f')} | "
                     f"{_num(c['bias'], '+.4f')} | {c['points']} |")
    return "\n".join(lines)


def behaviour_tables(report: dict) -> str:
    beh = report["behaviour"]
    names = list(beh["motion"]["gaze_rate"])
    lines = [
        f"Gaze rate vs frame difference (ratio {beh['ratio']:g}; frames t >= 1). Patches of every scale share "
        "the bins; a coarse patch averages the difference over a larger region, so a gazer that favours a "
        "scale also favours that scale's typical range of differences.",
        "",
        "| mean abs frame difference | patches | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for i, (lo, hi) in enumerate(beh["motion"]["range"]):
        rates = " | ".join(_num(beh["motion"]["gaze_rate"][n][i], ".3f") for n in names)
        lines.append(f"| {lo:.2f} - {hi:.2f} | {beh['motion']['patches'][i]} | {rates} |")
    lines += [
        "",
        "Mean scale index of the gazed patches (0 = coarsest) vs detail (Laplacian variance):",
        "",
        "| detail | patches | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for i, (lo, hi) in enumerate(beh["detail"]["range"]):
        means = " | ".join(_num(beh["detail"]["mean_scale"][n][i], ".2f") for n in names)
        lines.append(f"| {lo:.0f} - {hi:.0f} | {beh['detail']['patches'][i]} | {means} |")
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    """The whole ``report.md``."""
    cfg = report["config"]
    parts = [
        f"# Evaluation: preset {cfg['preset']}, {report['num_clips']} clips",
        "",
        f"Clips: `{report['source']}` (indices 0..{report['num_clips'] - 1}), {report['num_frames']} frames of "
        f"{report['frame_size']} px, N = {report['num_patches']} patches per frame. Loss: per-frame "
        f"{report['loss']} of the `{cfg['reconstructor']}` reconstruction at each frame's end, averaged per clip. "
        f"Intervals: {report['ci']} ({cfg['bootstrap']} resamples). Policies decode greedily: "
        + (", ".join(f"`{k}` = `{v}`" for k, v in report["policies"].items()) or "none") + ".",
        "",
        "## Loss at fixed gazing ratios",
        "",
        headline_table(report),
        "",
        "## Gazing ratio needed to reach a loss (Table 3 analogue)",
        "",
        "Per clip: the first swept budget whose clip loss is at or below the threshold, interpolated "
        "linearly in loss with the budget before it; clips that never get there count at the largest "
        "swept ratio (the mean is then a lower bound, `>=`).",
        "",
        threshold_table(report),
    ]
    if report["stopping"]:
        parts += [
            "",
            "## Stopping by the loss-prediction head (task_loss_requirement)",
            "",
            f"Budget cap {report['stop_cap_budget']} gazes per frame (ratio {cfg['stop_cap_ratio']:g}); a frame "
            "stops once the predicted loss is at or below the requirement. Token reduction = all patches / "
            "gazed patches.",
            "",
            stopping_table(report),
            "",
            "## Loss-prediction calibration",
            "",
            "Predicted loss after each frame's last gaze vs the frame's actual loss, over all clips, frames "
            "and swept ratios (Spearman rank correlation; per ratio in the middle columns).",
            "",
            calibration_table(report),
        ]
    parts += ["", "## Behaviour", "", behaviour_tables(report), "", "## Files", ""]
    parts += [f"- `{name}`" for name in report["artefacts"]]
    parts += ["", f"Took {report['seconds']['total']:.1f} s on {cfg['device']}.", ""]
    return "\n".join(parts)


# ---- the evaluation --------------------------------------------------------------------------
def _source(cfg: EvaluateConfig) -> VideoSource:
    if cfg.videos is None:
        return default_data(cfg.split, cfg.preset, progress=cfg.progress)
    return clip_source(cfg.preset, cfg.videos, cfg.split)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def evaluate(cfg: EvaluateConfig) -> dict:
    """Run the whole evaluation, write every artefact under ``cfg.out_dir``; returns the report
    (what ``report.json`` holds). torch's CPU thread count is ``cfg.threads`` meanwhile."""
    previous = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _evaluate(cfg)
    finally:
        torch.set_num_threads(previous)


def _evaluate(cfg: EvaluateConfig) -> dict:
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    built = build(cfg.preset, reward_kwargs={"loss": cfg.loss}, reconstructor=cfg.reconstructor)
    grid, T = built.config.grid, built.config.num_frames
    N = grid.num_patches
    source = _source(cfg)
    n = min(cfg.num_clips, len(source))
    video = source.clips(range(n))  # (n, T, 3, H, W) uint8, CPU
    paths = resolve_policies(cfg.policy, cfg.preset)
    gazers: dict[str, Gazer] = {label: _load_policy(path, grid, device) for label, path in paths.items()}
    for name in cfg.baselines:
        kwargs = {"max_candidates": cfg.max_candidates} if name.replace("-", "_") == "greedy_oracle" else {}
        baseline = make_baseline(name, **kwargs)
        gazers[baseline.name] = baseline
    ratios = sorted(set(cfg.ratios))
    budgets = {r: budget_for_ratio(r, N, built.config.min_gazes_per_frame) for r in ratios}
    actual = [budgets[r] / N for r in ratios]
    cap = budget_for_ratio(cfg.stop_cap_ratio, N, built.config.min_gazes_per_frame)
    policies = [name for name, g in gazers.items() if isinstance(g, AutoGazePolicy)]

    def ci(values: torch.Tensor) -> dict[str, float]:
        return mean_ci(values, cfg.bootstrap, cfg.seed)

    report: dict = {
        "config": config_dict(cfg),
        "source": repr(source),
        "num_clips": n,
        "num_frames": T,
        "frame_size": grid.frame_size,
        "num_patches": N,
        "loss": cfg.loss,
        "ci": CI_METHOD,
        "policies": {k: str(v) for k, v in paths.items()},
        "ratios": [{"ratio": r, "budget": budgets[r], "actual_ratio": a} for r, a in zip(ratios, actual)],
        "stop_cap_budget": cap,
        "loss_vs_ratio": {},
        "ratio_to_threshold": {},
        "stopping": {},
        "calibration": {},
        "seconds": {},
    }
    total_runs = len(gazers) * len(ratios) + len(policies) * len(cfg.requirements)
    bar = progress_bar(total_runs, desc=f"eval {cfg.preset}", enabled=cfg.progress)
    runs: dict[str, dict[float, Run]] = {}
    calib_points: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for name, gazer in gazers.items():
        tick = time.perf_counter()
        runs[name] = {}
        for r in ratios:
            bar.set_postfix_str(f"{name} @ {r:g}")
            runs[name][r] = run_gazer(gazer, built, video, budgets[r], cfg)
            bar.update(1)
        per_clip = torch.stack([runs[name][r].frame_loss.mean(1) for r in ratios], 1)  # (n, m)
        report["loss_vs_ratio"][name] = {
            str(r): {**ci(per_clip[:, j]), "per_clip": per_clip[:, j].tolist()} for j, r in enumerate(ratios)
        }
        report["ratio_to_threshold"][name] = {}
        for thr in cfg.thresholds:
            needed, unreached = ratio_to_threshold(per_clip, actual, thr)
            report["ratio_to_threshold"][name][str(thr)] = {
                **ci(needed),
                "unreached": unreached,
                "per_clip": needed.tolist(),
                "reached": (per_clip <= thr).any(1).tolist(),
            }
        if isinstance(gazer, AutoGazePolicy):
            report["stopping"][name] = {}
            for req in cfg.requirements:
                bar.set_postfix_str(f"{name} stop @ {req:g}")
                run = run_gazer(gazer, built, video, cap, cfg, requirement=req)
                gazes = run.gazes.double()
                ratio_used = gazes / (T * N)
                report["stopping"][name][str(req)] = {
                    "loss": ci(run.frame_loss.mean(1)),
                    "gazing_ratio": ci(ratio_used),
                    "token_reduction": ci(1 / ratio_used),
                    "token_reduction_overall": float(n * T * N / gazes.sum()),
                    "frames_meeting": float((run.frame_loss <= req).double().mean()),
                    "per_clip": {
                        "loss": run.frame_loss.mean(1).tolist(),
                        "frames_meeting": (run.frame_loss <= req).double().mean(1).tolist(),
                        "gazing_ratio": ratio_used.tolist(),
                        "token_reduction": (1 / ratio_used).tolist(),
                        "gazes_per_frame": run.gazed.sum(2).tolist(),
                    },
                }
                bar.update(1)
            pred = torch.stack([runs[name][r].prediction for r in ratios])  # (m, n, T)
            true = torch.stack([runs[name][r].frame_loss.float() for r in ratios])
            where = torch.tensor(actual).view(-1, 1, 1).expand_as(pred)
            calib_points[name] = (pred.flatten(), true.flatten(), where.flatten())
            err = (pred - true)[torch.isfinite(pred)].double()
            report["calibration"][name] = {
                "spearman": spearman(pred, true),
                "spearman_per_ratio": {str(r): spearman(pred[j], true[j]) for j, r in enumerate(ratios)},
                "mae": float(err.abs().mean()),
                "bias": float(err.mean()),
                "points": int(err.numel()),
            }
        report["seconds"][name] = time.perf_counter() - tick
    bar.close()

    focus = cfg.focus_ratio
    report["behaviour"] = {
        "ratio": focus,
        "budget": budgets[focus],
        **behaviour_stats({k: v[focus].gazed for k, v in runs.items()}, patch_motion(video, grid),
                          patch_detail(video, grid), grid, cfg.behaviour_bins),
    }

    out = cfg.out_dir
    artefacts = [_save_name(plot_loss_vs_ratio(report, out / "loss_vs_ratio.png"), out)]
    if calib_points:
        artefacts.append(_save_name(plot_calibration(calib_points, report, out / "calibration.png"), out))
    artefacts.append(_save_name(plot_behaviour(report, out / "behaviour.png"), out))
    v = min(cfg.num_videos, n, cfg.batch_size)  # GIF trajectories come from the first batch
    if v:
        scale = cfg.gif_scale or max(1, math.ceil(256 / grid.frame_size))
        clips = video[:v].to(device)
        for name, run in runs.items():
            head = run[focus].head
            canvases = replay_canvases(built, clips, head["action"].to(device), head["valid"].to(device),
                                       head["budgets"].to(device)).cpu()
            path = write_gif(out / "gif" / f"{_safe(name)}.gif", name, video[:v], run[focus].gazed[:v], canvases,
                             run[focus].frame_loss[:v], grid, scale, cfg.loss)
            artefacts.append(_save_name(path, out))
    artefacts += ["report.json", "report.md"]
    report["artefacts"] = artefacts
    report["seconds"]["total"] = time.perf_counter() - start
    report = _json_ready(report)
    atomic_write_text(out / "report.md", markdown_report(report))
    atomic_write_json(out / "report.json", report)
    return report


def _save_name(path: Path, root: Path) -> str:
    return str(path.relative_to(root))


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(EvaluateConfig, argv)
    seed_everything(cfg.seed)  # for library code on global RNGs; ours takes explicit generators
    report = evaluate(cfg)
    if not report["policies"]:
        print("no policy evaluated (none given, none found by --policy auto): baselines only")
    print(f"\nmean per-frame {cfg.loss} [95% CI], preset {cfg.preset}, {report['num_clips']} clips:\n")
    print(headline_table(report))
    print(f"\ngazing ratio to reach a loss:\n\n{threshold_table(report)}")
    out = cfg.out_dir
    print(f"\nwritten to {out}/ in {report['seconds']['total']:.0f} s:")
    for name in report["artefacts"]:
        print(f"  {out / name}")
    return report


if __name__ == "__main__":
    main()
