"""Typed, frozen configuration of the gazing MDP and its named presets."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from gaze_env.patches import PatchGrid


@dataclass(frozen=True)
class Preset:
    """A named geometry: frame size, scales, patch size and clip length."""

    name: str
    grid: PatchGrid
    num_frames: int
    used_for: str

    @property
    def frame_size(self) -> int:
        return self.grid.frame_size


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", PatchGrid((16, 32, 64), 8), 8, "CI, tests, CPU default run"),
    "small": Preset("small", PatchGrid((16, 32, 56, 112), 8), 16, "paper token geometry at 1/4 pixels"),
    "paper": Preset("paper", PatchGrid((32, 64, 112, 224), 16), 16, "the published setting (GPU)"),
}


def get_preset(name: str) -> Preset:
    """Look up a preset by name, with an error listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}") from None


@dataclass(frozen=True)
class GazeEnvConfig:
    """Everything that fixes the dynamics of one gazing episode (not the data, not the reward).

    Budgets: frame ``t`` ends after ``budget[t]`` gazes, or earlier on STOP once at least
    ``min_gazes_per_frame`` gazes were made. ``budget[t] = frame_budgets[t]`` when given, else
    ``max(1, floor(gazing_ratio * N))`` for every frame.
    """

    grid: PatchGrid
    """Multi-scale patch vocabulary; its largest scale is the frame size."""
    num_frames: int
    """Frames ``T`` per clip (episode)."""
    gazing_ratio: float = 0.1
    """Per-frame budget as a fraction of the ``N`` patches (ignored when ``frame_budgets`` is set)."""
    frame_budgets: tuple[int, ...] | None = None
    """Explicit per-frame budgets, one per frame, each in ``[min_gazes_per_frame, N]``."""
    min_gazes_per_frame: int = 1
    """STOP is invalid before this many gazes in the current frame (0 allows skipping a frame)."""
    reward_frame_rate: float = 1.0
    """Fraction of frames whose end is scored by the ``frame`` reward (paper: 0.125); at least one
    frame; drawn at reset from the episode's generator."""

    def __post_init__(self) -> None:
        N = self.grid.num_patches
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if not 0.0 < self.gazing_ratio <= 1.0:
            raise ValueError(f"gazing_ratio must lie in (0, 1], got {self.gazing_ratio}")
        if not 0 <= self.min_gazes_per_frame <= N:
            raise ValueError(f"min_gazes_per_frame must lie in [0, {N}], got {self.min_gazes_per_frame}")
        if not 0.0 < self.reward_frame_rate <= 1.0:
            raise ValueError(f"reward_frame_rate must lie in (0, 1], got {self.reward_frame_rate}")
        if self.frame_budgets is not None:
            budgets = tuple(int(b) for b in self.frame_budgets)
            object.__setattr__(self, "frame_budgets", budgets)
            if len(budgets) != self.num_frames:
                raise ValueError(f"frame_budgets needs one entry per frame ({self.num_frames}), got {len(budgets)}")
            lo = max(1, self.min_gazes_per_frame)
            bad = [b for b in budgets if not lo <= b <= N]
            if bad:
                raise ValueError(f"every frame budget must lie in [{lo}, {N}], got {bad}")

    @property
    def frame_size(self) -> int:
        return self.grid.frame_size

    @property
    def budgets(self) -> tuple[int, ...]:
        """Per-frame gaze budgets, one per frame."""
        if self.frame_budgets is not None:
            return self.frame_budgets
        return (budget_for_ratio(self.gazing_ratio, self.grid.num_patches, self.min_gazes_per_frame),) * self.num_frames

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GazeEnvConfig:
        """Config of a named preset (``tiny``, ``small``, ``paper``) with field overrides."""
        preset = get_preset(name)
        return cls(grid=preset.grid, num_frames=preset.num_frames, **overrides)

    def with_(self, **changes) -> GazeEnvConfig:
        return replace(self, **changes)


def budget_for_ratio(gazing_ratio: float, num_patches: int, min_gazes: int = 1) -> int:
    """``max(1, min_gazes, floor(gazing_ratio * N))``, the per-frame budget of a gazing ratio."""
    return max(1, min_gazes, math.floor(gazing_ratio * num_patches + 1e-9))
