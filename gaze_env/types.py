"""State and transition records of the batched gazing MDP.

Every field is a tensor with a leading batch dimension ``B``; shapes use ``T`` frames, ``N``
patches, ``k`` scales and ``H`` the frame side. ``GazeState`` is updated in place by
``gaze_env.core.step`` (one batched write per field, no Python loop over the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class GazeState:
    """The state of ``B`` gazing episodes."""

    video: torch.Tensor  # (B, T, 3, H, W) uint8: the clips, stored once
    t: torch.Tensor  # (B,) int64: current frame index; T once the episode has ended
    history: torch.Tensor  # (B, T, N) bool: patches gazed in each frame so far
    counts: torch.Tensor  # (B, T) int64: gazes made in each frame
    budgets: torch.Tensor  # (B, T) int64: gaze budget of each frame
    reward_frames: torch.Tensor  # (B, T) bool: frames whose end the `frame` reward scores
    canvas: torch.Tensor  # (B, 3, H, W) uint8: reconstruction of the current frame
    loss: torch.Tensor  # (B,) float32: loss of `canvas` against the current frame
    err_sum: torch.Tensor  # (B,) float64: summed pixel error behind `loss` (pixel losses only)
    frame_start_loss: torch.Tensor  # (B, T) float32: loss when each frame began (carried canvas); NaN before
    frame_loss: torch.Tensor  # (B, T) float32: loss when each frame ended; NaN before
    steps: torch.Tensor  # (B,) int64: actions taken so far (gazes and STOPs)
    done: torch.Tensor  # (B,) bool: the episode has ended
    aux: dict[str, torch.Tensor]  # reconstructor-owned working tensors, each with leading dim B

    @property
    def batch_size(self) -> int:
        return self.video.shape[0]

    @property
    def num_frames(self) -> int:
        return self.video.shape[1]

    @property
    def device(self) -> torch.device:
        return self.video.device

    @property
    def frame_t(self) -> torch.Tensor:
        """(B,) int64: current frame index clamped to the last frame (valid after the end too)."""
        return self.t.clamp(max=self.num_frames - 1)

    @property
    def gazed(self) -> torch.Tensor:
        """(B, N) bool: patches gazed in the current frame."""
        return self.history[torch.arange(self.batch_size, device=self.device), self.frame_t]

    @property
    def num_gazed(self) -> torch.Tensor:
        """(B,) int64: gazes made in the current frame."""
        return self.counts.gather(1, self.frame_t[:, None])[:, 0]

    @property
    def budget(self) -> torch.Tensor:
        """(B,) int64: budget of the current frame."""
        return self.budgets.gather(1, self.frame_t[:, None])[:, 0]

    @property
    def frame(self) -> torch.Tensor:
        """(B, 3, H, W) uint8: the current frame."""
        return self.video[torch.arange(self.batch_size, device=self.device), self.frame_t]

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "aux"}
        out.update({f"aux.{k}": v for k, v in self.aux.items()})
        return out

    def _rebuild(self, tensors: dict[str, torch.Tensor]) -> GazeState:
        aux = {k[4:]: v for k, v in tensors.items() if k.startswith("aux.")}
        return GazeState(**{k: v for k, v in tensors.items() if not k.startswith("aux.")}, aux=aux)

    def clone(self) -> GazeState:
        return self._rebuild({k: v.clone() for k, v in self._tensors().items()})

    def to(self, device: torch.device | str) -> GazeState:
        return self._rebuild({k: v.to(device) for k, v in self._tensors().items()})

    def __getitem__(self, index) -> GazeState:
        """Rows of the batch (an int keeps the batch dimension of size 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self._rebuild({k: v[index] for k, v in self._tensors().items()})

    def assign(self, index: torch.Tensor, other: GazeState) -> None:
        """Overwrite rows ``index`` (int64 (M,) or bool (B,)) with the rows of ``other`` (batch M)."""
        mine, theirs = self._tensors(), other._tensors()
        if mine.keys() != theirs.keys():
            raise ValueError(f"states differ in fields: {sorted(mine.keys() ^ theirs.keys())}")
        for k, v in mine.items():
            v[index] = theirs[k]

    @staticmethod
    def cat(states: list[GazeState]) -> GazeState:
        keys = states[0]._tensors().keys()
        return states[0]._rebuild({k: torch.cat([s._tensors()[k] for s in states]) for k in keys})


@dataclass
class Transition:
    """What one batched step did; the input of every reward function.

    Losses are of the frame acted on (``frame_index``); ``state`` is the state after the step.
    """

    action: torch.Tensor  # (B,) int64: the actions taken (N = STOP)
    is_gaze: torch.Tensor  # (B,) bool: the action gazed a patch (not STOP, episode not over)
    frame_index: torch.Tensor  # (B,) int64: the frame the action was taken in
    loss_before: torch.Tensor  # (B,) float32: loss of that frame before the action
    loss_after: torch.Tensor  # (B,) float32: loss of that frame after the action
    frame_end: torch.Tensor  # (B,) bool: the action ended its frame (STOP or budget used up)
    scored: torch.Tensor  # (B,) bool: frame_end on a frame chosen for the `frame` reward
    next_start_loss: torch.Tensor  # (B,) float32: loss the next frame starts from (NaN unless frame_end)
    terminated: torch.Tensor  # (B,) bool: the action ended the last frame
    state: GazeState  # the state after the step
