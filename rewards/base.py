"""The reward protocol, the built-in rewards and the registry that resolves user rewards.

A reward function maps a batched ``Transition`` (see ``gaze_env.types``) to rewards (B,). It also
names the per-frame ``loss(target, recon) -> (B,)`` the environment tracks, since the losses in a
transition are computed with it.

Accepted wherever a reward is configured (Gymnasium env, TorchRL env, training configs):
- a registered name: ``"frame"`` (paper), ``"dense"``, ``"mae"`` (learned reconstructor), ...;
- an object with ``__call__(transition)`` and a ``loss`` attribute;
- a plain callable: ``f(transition) -> (B,)`` (tracked loss from ``reward_kwargs["loss"]``, default
  l1), or a per-frame loss ``f(target, recon) -> (B,)``, which becomes the ``frame`` reward's loss;
- a ``"module:function"`` path to any of the above (a factory is called with ``reward_kwargs``).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from gaze_env.types import Transition
from rewards.losses import LossFn, make_loss


@runtime_checkable
class RewardFn(Protocol):
    """``reward(transition) -> (B,) float32``; ``loss`` is the per-frame loss the env tracks."""

    loss: LossFn

    def __call__(self, tr: Transition) -> torch.Tensor: ...


def import_path(path: str) -> Any:
    """Resolve ``"package.module:attribute"``, with errors that say which part failed."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'module:function', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} of {path!r}: {e}") from e
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} (from {path!r})") from None
    return obj


@dataclass
class _Shaping:
    """Options shared by the built-in rewards."""

    loss: LossFn
    gaze_cost: float = 0.0
    loss_threshold: float | None = None

    def excess(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss``, or ``max(loss - threshold, 0)`` with a threshold: once the frame is good enough
        more gazes earn nothing, so with a gaze cost STOP becomes the better action."""
        return loss if self.loss_threshold is None else (loss - self.loss_threshold).clamp_min(0.0)

    def cost(self, tr: Transition) -> torch.Tensor:
        return self.gaze_cost * tr.is_gaze.float()


@dataclass
class FrameReward(_Shaping):
    """Paper reward: ``-loss(frame_t, recon_t)`` when frame ``t`` ends (on the frames drawn for
    scoring, see ``GazeEnvConfig.reward_frame_rate``), ``-gaze_cost`` per gaze."""

    def __call__(self, tr: Transition) -> torch.Tensor:
        r = torch.where(tr.scored, -self.excess(tr.loss_after), torch.zeros_like(tr.loss_after))
        return r - self.cost(tr)


@dataclass
class DenseReward(_Shaping):
    """Each gaze earns the decrease of the current frame's loss; ``-gaze_cost`` per gaze.

    Over an episode, ``sum(dense) = sum(frame) + sum_t loss_at_start_of_frame_t`` (every frame
    scored): the returns differ by the losses carried into each frame, which no action of that
    frame changes."""

    def __call__(self, tr: Transition) -> torch.Tensor:
        return self.excess(tr.loss_before) - self.excess(tr.loss_after) - self.cost(tr)


@dataclass
class CallableReward:
    """A user's ``f(transition) -> (B,)`` with the loss the env should track."""

    fn: Callable[[Transition], torch.Tensor]
    loss: LossFn = field(default_factory=lambda: make_loss("l1"))

    def __call__(self, tr: Transition) -> torch.Tensor:
        return self.fn(tr)


def _frame(loss="l1", gaze_cost: float = 0.0, loss_threshold: float | None = None) -> FrameReward:
    return FrameReward(make_loss(loss), float(gaze_cost), loss_threshold)


def _dense(loss="l1", gaze_cost: float = 0.0, loss_threshold: float | None = None) -> DenseReward:
    return DenseReward(make_loss(loss), float(gaze_cost), loss_threshold)


REGISTRY: dict[str, Callable[..., RewardFn] | str] = {
    "frame": _frame,
    "dense": _dense,
    "mae": "rewards.mae:make_mae_reward",
}
"""Name -> factory(**reward_kwargs), or a lazily imported ``"module:factory"`` path."""


def register_reward(name: str, factory: Callable[..., RewardFn] | str) -> None:
    """Make ``name`` usable wherever a reward is configured."""
    REGISTRY[name] = factory


def _n_positional(fn: Callable) -> int | None:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in params)


def make_reward(spec: str | Callable | RewardFn = "frame", **kwargs) -> RewardFn:
    """Resolve a reward spec (see the module docstring) with ``kwargs`` = ``reward_kwargs``."""
    if isinstance(spec, str):
        if spec in REGISTRY:
            factory = REGISTRY[spec]
            if isinstance(factory, str):
                factory = import_path(factory)
            return factory(**kwargs)
        if ":" not in spec:
            raise ValueError(f"unknown reward {spec!r}; registered: {sorted(REGISTRY)}, or give 'module:function'")
        spec = import_path(spec)
        if inspect.isclass(spec) or (callable(spec) and _n_positional(spec) == 0):
            return make_reward(spec(**kwargs))
    if hasattr(spec, "loss") and callable(spec):
        if kwargs:
            raise ValueError(f"reward_kwargs {sorted(kwargs)} given with a ready reward object {spec!r}")
        return spec
    if callable(spec):
        n = _n_positional(spec)
        if n == 2:  # a per-frame loss(target, recon)
            return _frame(loss=spec, **kwargs)
        if n == 1:
            loss = make_loss(kwargs.pop("loss", "l1"))
            if kwargs:
                raise ValueError(f"a plain reward callable only takes reward_kwargs['loss'], got also {sorted(kwargs)}")
            return CallableReward(spec, loss)
        raise ValueError(
            f"a reward callable takes one argument (the Transition) or two (target, recon as a loss); "
            f"{spec!r} takes {n}"
        )
    raise TypeError(f"a reward must be a name, a 'module:function' path or a callable, got {type(spec)}")
