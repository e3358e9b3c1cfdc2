"""Batched rollouts: the policy's cached generation, scored by the environment's core.

The policy's gazes depend only on the video and its own predictions (the task-loss stop uses the
policy's *predicted* loss), so a rollout generates a whole batch of trajectories with the KV cache
first and then replays the actions through ``gaze_env.core`` (one batched step per slot) to get
the rewards and the actual losses. The result is the trajectory TensorDict of DESIGN.md.
"""

from __future__ import annotations

import time

import torch
from tensordict import TensorDict

from agents.policy import AutoGazePolicy, preprocess
from gaze_env import core
from gaze_env.core import CoreParams
from rewards.base import RewardFn


def device_clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _Clock:
    """Adds the seconds since the previous lap to ``timings[name]`` (no-op without ``timings``),
    so that asynchronous kernels are charged to the lap that launched them."""

    def __init__(self, device: torch.device, timings: dict[str, float] | None) -> None:
        self.device, self.timings = device, timings
        self.last = device_clock(device) if timings is not None else 0.0

    def lap(self, name: str) -> None:
        if self.timings is not None:
            now = device_clock(self.device)
            self.timings[name] = self.timings.get(name, 0.0) + now - self.last
            self.last = now


def replay(
    params: CoreParams,
    reward_fn: RewardFn,
    video: torch.Tensor,
    action: torch.Tensor,
    valid: torch.Tensor,
    budgets: torch.Tensor,
    generator: torch.Generator | None = None,
    reward_frames: torch.Tensor | None = None,
) -> TensorDict:
    """Score trajectories in the core.

    Args:
        video: (B, T, 3, H, W) uint8. action: (B, L) int64 per-frame ids, STOP = N, padding after
            the end. valid: (B, L) bool, True entries first. budgets: (B, T) int64 per-frame budgets
            the actions were generated under (frames end when they are used up).
        reward_frames: (B, T) bool frames the ``frame`` reward scores, replacing the ones
            ``core.reset`` draws when the config's ``reward_frame_rate < 1`` (GRPO gives all
            rollouts of a group the same frames, so that their returns are comparable).
    Returns: TensorDict [B] with ``reward`` (B, L), ``loss_after`` (B, L) loss of the acted frame
    after each step, ``frame_loss`` (B, T), ``frame_start_loss`` (B, T), ``scored`` (B, T).
    """
    B, L = action.shape
    state = core.reset(params, video, generator=generator, budgets=budgets)
    if reward_frames is not None:
        state.reward_frames = reward_frames.to(state.device, torch.bool).expand(B, -1).clone()
    reward = torch.zeros(B, L, device=video.device)
    loss_after = torch.zeros(B, L, device=video.device)
    for l in range(L):
        if bool(state.done.all()):
            break
        live = valid[:, l] & ~state.done
        a = torch.where(live, action[:, l], params.config.grid.stop)
        tr = core.step(params, state, a, validate=False)
        reward[:, l] = torch.where(live, reward_fn(tr), 0.0)
        loss_after[:, l] = torch.where(live, tr.loss_after, 0.0)
    if not bool(state.done.all()):
        raise ValueError("trajectories ended before their episodes: actions and budgets disagree")
    return TensorDict(
        {
            "reward": reward,
            "loss_after": loss_after,
            "frame_loss": state.frame_loss,
            "frame_start_loss": state.frame_start_loss,
            "scored": state.reward_frames,
        },
        batch_size=[B],
    )


@torch.no_grad()
def rollout(
    policy: AutoGazePolicy,
    params: CoreParams,
    reward_fn: RewardFn,
    video: torch.Tensor,
    *,
    budgets: torch.Tensor | None = None,
    task_loss_requirement: float | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    reward_frames: torch.Tensor | None = None,
    timings: dict[str, float] | None = None,
) -> TensorDict:
    """Generate gazes for ``video`` (B, T, 3, H, W) uint8 and score them.

    ``budgets`` (B, T) defaults to the env config's; ``reward_frames`` (B, T) bool, see
    :func:`replay`. ``timings``, when given, receives the seconds spent in ``generate`` (the
    policy) and ``replay`` (the environment and its reward), the device synchronised around each.
    Returns TensorDict [B]: ``video`` (stored once), ``budgets`` (B, T), ``action`` /
    ``frame_id`` / ``valid`` / ``log_prob`` / ``loss_pred`` (/ ``value``) (B, L) from the policy,
    and ``reward`` / ``loss_after`` (B, L), ``frame_loss`` / ``frame_start_loss`` / ``scored``
    (B, T) from the environment.
    """
    B, T = video.shape[:2]
    if budgets is None:
        budgets = torch.tensor(params.config.budgets, device=video.device).expand(B, T)
    budgets = budgets.to(video.device, torch.int64).expand(B, T).contiguous()
    clock = _Clock(video.device, timings)
    gazes = policy.generate(
        preprocess(video),
        frame_budgets=budgets,
        task_loss_requirement=task_loss_requirement,
        temperature=temperature,
        generator=generator if temperature > 0 else None,
        min_gazes_per_frame=max(1, params.config.min_gazes_per_frame),
    )
    traj = gazes.to_trajectory()  # [B, L]
    clock.lap("generate")
    scored = replay(params, reward_fn, video, traj["action"], traj["valid"], budgets, generator, reward_frames)
    clock.lap("replay")
    out = TensorDict({"video": video, "budgets": budgets}, batch_size=[B])
    for key in traj.keys():
        out[key] = traj[key]
    out.update(scored)
    return out
