"""The AutoGaze gazing MDP: patch geometry, video sources, the batched core and its front-ends.

Importing this package registers ``AutoGaze-v0`` with Gymnasium, so both
``gymnasium.make("AutoGaze-v0")`` (after ``import gaze_env``) and
``gymnasium.make("gaze_env:AutoGaze-v0")`` work.
"""

from gymnasium.envs.registration import register, registry

from gaze_env.config import PRESETS, GazeEnvConfig, get_preset
from gaze_env.patches import PatchGrid

ENV_ID = "AutoGaze-v0"


def register_envs() -> None:
    """Register ``AutoGaze-v0`` (idempotent)."""
    if ENV_ID not in registry:
        register(
            id=ENV_ID,
            entry_point="gaze_env.gym_env:AutoGazeEnv",
            vector_entry_point="gaze_env.vector_env:AutoGazeVectorEnv",
        )


register_envs()

__all__ = ["ENV_ID", "PRESETS", "GazeEnvConfig", "PatchGrid", "get_preset", "register_envs"]
