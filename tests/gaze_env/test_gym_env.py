import subprocess
import sys
import warnings

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import gaze_env  # noqa: F401  (registers AutoGaze-v0)
from tests.conftest import random_clips


def masked_random_episode(env, seed: int, max_steps: int = 10_000):
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    trace = []
    for _ in range(max_steps):
        valid = np.flatnonzero(obs["action_mask"])
        obs, r, term, trunc, info = env.step(int(rng.choice(valid)))
        trace.append((r, obs["canvas"].copy(), info["loss"]))
        if term or trunc:
            return trace
    raise AssertionError("episode did not end")


@pytest.mark.parametrize("preset", ["tiny", "small", "paper"])
@pytest.mark.parametrize("reward", ["frame", "dense"])
def test_autogaze_env__passes_gymnasium_check_env(preset, reward):
    videos = random_clips(2, preset)
    env = gymnasium.make("AutoGaze-v0", preset=preset, reward=reward, videos=videos)
    # check_env steps one unseeded action_space.sample() after a reset: STOP there (1 in N + 1) is
    # an invalid action and raises; a seeded action space makes the check deterministic
    env.unwrapped.action_space.seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert not caught, [str(w.message) for w in caught]


def test_autogaze_env__default_data_and_module_style_id():
    env = gymnasium.make("gaze_env:AutoGaze-v0")
    obs, info = env.reset(seed=0)
    assert env.action_space == gymnasium.spaces.Discrete(85)
    assert obs["frame"].shape == (3, 64, 64) and obs["frame"].dtype == np.uint8
    assert obs["action_mask"].dtype == np.bool_ and not obs["action_mask"][-1]  # STOP needs 1 gaze
    assert "frame_loss" not in info and "frame_end_loss" not in info


def test_autogaze_env__infos_report_frame_ends_and_batch_in_the_sync_vector_env():
    env = gymnasium.make("AutoGaze-v0", videos=random_clips(1), frame_budgets=[1] * 8)
    env.reset(seed=0)
    ended = []
    for t in range(8):
        _, _, term, _, info = env.step(0)
        assert info["frame_end_index"] == t
        ended.append(info["frame_end_loss"])
    assert term and info["frame_loss"].shape == (8,) and np.array_equal(info["frame_loss"], ended)
    envs = gymnasium.make_vec("AutoGaze-v0", num_envs=2, vectorization_mode="sync", videos=random_clips(2))
    obs, _ = envs.reset(seed=0)
    ended = 0
    for _ in range(80):  # tiny budget 8: frames end every 8 steps, episodes after 64 (then autoreset)
        first_valid = np.where(obs["action_mask"].any(1), obs["action_mask"].argmax(1), 0)
        obs, _, term, _, infos = envs.step(first_valid)
        ended += int(infos.get("_frame_end_loss", np.zeros(2, bool)).sum())
        if term.any():
            assert infos["frame_loss"].shape == (2, 8) and infos["_frame_loss"].tolist() == term.tolist()
    assert infos["loss"].shape == (2,) and ended >= 16


def test_autogaze_env__small_preset_from_the_shell():
    code = (
        "import gymnasium, gaze_env; env = gymnasium.make('AutoGaze-v0', preset='small'); "
        "o,_ = env.reset(seed=0); print(env.action_space, o['action_mask'].shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "Discrete(266) (266,)"


def test_autogaze_env__same_seed_same_trajectory_different_seed_differs():
    videos = random_clips(4)
    env = gymnasium.make("AutoGaze-v0", videos=videos, reward="dense")
    a, b, c = (masked_random_episode(env, s) for s in (5, 5, 6))
    assert len(a) == len(b) and all(x[0] == y[0] and np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    assert len(a) != len(c) or any(x[0] != y[0] for x, y in zip(a, c))


def test_autogaze_env__invalid_actions_raise():
    env = gymnasium.make("AutoGaze-v0", videos=random_clips(1), frame_budgets=[1] * 8).unwrapped
    env.reset(seed=0)
    with pytest.raises(ValueError, match="STOP .* after 0 gaze"):
        env.step(84)
    with pytest.raises(ValueError, match="out of range"):
        env.step(85)
    with pytest.raises(ValueError, match="integer"):
        env.step(1.5)
    for _ in range(8):
        _, _, term, _, _ = env.step(0)
    assert term
    with pytest.raises(ValueError, match="after the episode ended"):
        env.step(0)


def test_autogaze_env__reset_options_play_a_given_clip_with_budgets():
    clip = random_clips(1, seed=9)[0]
    env = gymnasium.make("AutoGaze-v0", videos=random_clips(2)).unwrapped
    obs, _ = env.reset(seed=0, options={"video": clip, "budgets": [3] * 8})
    assert np.array_equal(obs["frame"], clip[0].numpy()) and obs["gazes_left"] == 3
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"clip": clip})


def test_autogaze_env__custom_reward_by_callable_and_module_path():
    videos = random_clips(1)
    env = gymnasium.make("AutoGaze-v0", videos=videos, reward=lambda tr: -tr.is_gaze.float())
    rewards = [t[0] for t in masked_random_episode(env, 0)]
    assert set(rewards) <= {-1.0, 0.0} and -1.0 in rewards
    env = gymnasium.make("AutoGaze-v0", videos=videos, reward="tests.rewards.custom_rewards:minus_gazes")
    assert [t[0] for t in masked_random_episode(env, 0)] == rewards
    # a per-frame loss by path becomes the frame reward's loss: half the default L1 reward
    full = masked_random_episode(gymnasium.make("AutoGaze-v0", videos=videos), 1)
    half = masked_random_episode(
        gymnasium.make(
            "AutoGaze-v0", videos=videos, reward="frame", reward_kwargs={"loss": "tests.rewards.custom_rewards:half_l1"}
        ),
        1,
    )
    assert np.allclose([h[0] for h in half], [0.5 * f[0] for f in full], atol=1e-6)


def test_autogaze_env__gaze_cost_only_with_builtin_rewards():
    with pytest.raises(ValueError, match="gaze_cost"):
        gymnasium.make("AutoGaze-v0", videos=random_clips(1), reward=lambda tr: tr.loss_after, gaze_cost=0.1)


def test_autogaze_env__render_shows_frame_gazes_and_canvas():
    env = gymnasium.make("AutoGaze-v0", videos=random_clips(1), render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    env.step(0)
    img = env.render()
    assert img.shape == (64, 3 * 64 + 8, 3) and img.dtype == np.uint8
    assert np.array_equal(img[:, :64].transpose(2, 0, 1), obs["frame"])
    canvas = env.unwrapped.state.canvas[0].permute(1, 2, 0).numpy()
    assert np.array_equal(img[:, -64:], canvas)
    overlay = img[:, 68:132]
    assert not np.array_equal(overlay[:32, :32], overlay[40:, 40:])  # gazed square is tinted


def test_autogaze_env__runs_on_a_given_torch_device():
    env = gymnasium.make("AutoGaze-v0", videos=random_clips(1), device="cpu").unwrapped
    env.reset(seed=0)
    assert env.state.video.device == torch.device("cpu")
