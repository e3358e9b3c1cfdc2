"""Turns the keyword arguments every front-end accepts into the core's parameters.

The Gymnasium env, the vector env and the TorchRL env all take the same keywords (``preset``,
``videos``, ``gazing_ratio``, ``reward``, ...) and call ``build`` so that they cannot drift apart.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gaze_env.config import GazeEnvConfig, get_preset
from gaze_env.core import CoreParams
from gaze_env.video import FolderSource, TensorSource, VideoSource, default_source
from rewards.base import RewardFn, make_reward
from rewards.reconstruct import PasteReconstructor, Reconstructor


@dataclass(frozen=True)
class Built:
    """What a front-end needs: the core's parameters, the reward and where clips come from."""

    params: CoreParams
    reward: RewardFn
    source: VideoSource

    @property
    def config(self) -> GazeEnvConfig:
        return self.params.config


def resolve_source(videos: Any, num_frames: int, size: int, split: str = "train") -> VideoSource:
    """``None`` (embedded default data), a folder or file path, a list of paths, a VideoSource,
    or a uint8 tensor of clips (n, T, 3, S, S)."""
    if videos is None:
        return default_source(split, num_frames, size)
    if isinstance(videos, torch.Tensor):
        return TensorSource(videos)
    if isinstance(videos, (str, os.PathLike)) or (
        isinstance(videos, Sequence) and all(isinstance(v, (str, os.PathLike)) for v in videos)
    ):
        return FolderSource(videos, num_frames, size, upscale=True)
    if hasattr(videos, "clip") and hasattr(videos, "num_frames"):
        if (videos.num_frames, videos.size) != (num_frames, size):
            raise ValueError(
                f"the video source yields {videos.num_frames} x {videos.size}px clips, the env needs "
                f"{num_frames} x {size}px (pick a matching preset or source)"
            )
        return videos
    raise TypeError(
        f"videos must be None, a path, a list of paths, a VideoSource or a uint8 tensor, got {type(videos)}"
    )


def resolve_reconstructor(reconstructor: str | Reconstructor, config: GazeEnvConfig) -> Reconstructor:
    if isinstance(reconstructor, str):
        if reconstructor in ("paste", "paste-grey"):
            return PasteReconstructor(config.grid, "grey")
        if reconstructor == "paste-black":
            return PasteReconstructor(config.grid, "black")
        raise ValueError(f"unknown reconstructor {reconstructor!r}; known: 'paste', 'paste-black', or an object")
    for method in ("init", "begin_frame", "gaze"):
        if not callable(getattr(reconstructor, method, None)):
            raise TypeError(f"a reconstructor needs a {method}() method (see rewards.reconstruct.Reconstructor)")
    return reconstructor


def build(
    preset: str = "tiny",
    videos: Any = None,
    gazing_ratio: float = 0.1,
    frame_budgets: Sequence[int] | None = None,
    min_gazes_per_frame: int = 1,
    reward: Any = "frame",
    reward_kwargs: dict | None = None,
    gaze_cost: float = 0.0,
    loss_threshold: float | None = None,
    reconstructor: str | Reconstructor = "paste",
    reward_frame_rate: float = 1.0,
    split: str = "train",
) -> Built:
    """Resolve the shared keyword arguments (documented on ``AutoGazeEnv``)."""
    p = get_preset(preset)
    config = GazeEnvConfig(
        grid=p.grid,
        num_frames=p.num_frames,
        gazing_ratio=gazing_ratio,
        frame_budgets=tuple(frame_budgets) if frame_budgets is not None else None,
        min_gazes_per_frame=min_gazes_per_frame,
        reward_frame_rate=reward_frame_rate,
    )
    kwargs = dict(reward_kwargs or {})
    shaping = {k: v for k, v in (("gaze_cost", gaze_cost), ("loss_threshold", loss_threshold)) if v}
    if shaping:
        if reward not in ("frame", "dense"):
            raise ValueError(
                f"gaze_cost / loss_threshold shape the built-in 'frame' and 'dense' rewards, not {reward!r}"
            )
        kwargs.update(shaping)
    reward_fn = make_reward(reward, **kwargs)
    # a reward that brings its own reconstructor (a learned one) replaces the paste canvas
    recon = getattr(reward_fn, "reconstructor", None) or resolve_reconstructor(reconstructor, config)
    params = CoreParams(config, recon, reward_fn.loss)
    return Built(params, reward_fn, resolve_source(videos, p.num_frames, p.frame_size, split))
