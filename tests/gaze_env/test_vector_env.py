"""AutoGazeVectorEnv: make_vec, batched spaces and infos, autoreset modes, partial resets, seeding."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from gaze_env import ENV_ID
from gaze_env.gym_env import observation_space
from gaze_env.vector_env import AutoGazeVectorEnv
from tests.conftest import random_clips

N, T = 84, 8  # tiny preset


def make(num_envs=3, n_clips=5, **kwargs):
    return gym.make_vec(ENV_ID, num_envs=num_envs, videos=random_clips(n_clips), **kwargs)


def valid_actions(mask, gen: torch.Generator) -> np.ndarray:
    """A uniformly random valid action per env (STOP where none is: an ended env)."""
    mask = torch.as_tensor(mask)
    weights = mask.float()
    weights[:, -1] += (~mask.any(1)).float()
    return torch.multinomial(weights, 1, generator=gen)[:, 0].numpy()


def same(a, b) -> bool:
    """Nested equality of observations / infos / step tuples, NaN equal to NaN."""
    try:
        np.testing.assert_equal(a, b)
    except AssertionError:
        return False
    return True


def assert_same_nested(a, b) -> None:
    """Equality of step tuples whose infos may hold object arrays of dicts (``final_obs``)."""
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_nested(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_nested(a[k], b[k])
    elif isinstance(a, np.ndarray) and a.dtype == object:
        assert a.shape == b.shape
        for x, y in zip(a, b):
            assert_same_nested(x, y)
    else:
        np.testing.assert_equal(a, b)


def first_patch(mask) -> np.ndarray:
    """The first valid patch of every env (-1 rows have none)."""
    mask = np.asarray(mask)[:, :N]
    return np.where(mask.any(1), mask.argmax(1), N)


def test_make_vec__returns_the_batched_env_with_batched_spaces():
    for mode in (None, "vector_entry_point"):
        env = make(num_envs=4, vectorization_mode=mode)
        assert isinstance(env, AutoGazeVectorEnv)
        assert env.num_envs == 4
        assert env.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
        assert env.single_observation_space == observation_space(env.config)
        assert env.observation_space == batch_space(env.single_observation_space, 4)
        assert env.action_space == batch_space(gym.spaces.Discrete(N + 1), 4)
        assert env.spec.id == ENV_ID and env.spec.kwargs["num_envs"] == 4


def test_vector_env__observations_actions_and_infos_follow_the_vector_conventions():
    env = make(num_envs=3)
    gen = torch.Generator().manual_seed(0)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert obs["action_mask"].shape == (3, N + 1) and obs["action_mask"].dtype == np.bool_
    for _ in range(12):
        actions = valid_actions(obs["action_mask"], gen)
        assert env.action_space.contains(actions)
        obs, reward, terminated, truncated, info = env.step(actions)
        assert env.observation_space.contains(obs)
        assert reward.shape == (3,) and reward.dtype == np.float64
        assert terminated.dtype == np.bool_ and not truncated.any()
    assert set(info) == {"loss", "gazes_this_frame", "frame_loss", "gazing_ratio"} | {
        f"_{k}" for k in ("loss", "gazes_this_frame", "frame_loss", "gazing_ratio")
    }
    assert info["frame_loss"].shape == (3, T) and info["_loss"].all()
    assert (obs["gazes_left"] == env.state.budget.numpy() - info["gazes_this_frame"]).all()


def test_vector_env__seeded_resets_and_steps_are_deterministic():
    def rollout(seed):
        env = make(num_envs=3, n_clips=50)
        gen = torch.Generator().manual_seed(1)
        out = [env.reset(seed=seed)]
        for _ in range(20):
            out.append(env.step(valid_actions(out[-1][0]["action_mask"], gen)))
        return out

    first, again, other = rollout(7), rollout(7), rollout(8)
    assert same(first, again)
    assert not np.array_equal(first[0][0]["frame"], other[0][0]["frame"])


def test_vector_env__returned_observations_are_not_reused():
    env = make(num_envs=2)
    obs, _ = env.reset(seed=0)
    kept = {k: v.copy() for k, v in obs.items()}
    obs2, *_ = env.step(first_patch(obs["action_mask"]))
    obs2["canvas"][:] = 0
    assert same(obs, kept)
    assert not np.array_equal(env.state.canvas.numpy(), obs2["canvas"])


def test_vector_env__next_step_autoreset_restarts_ended_envs_on_the_following_step():
    # env 0 spends one gaze per frame (ends after T steps), env 1 two
    budgets = np.array([[1] * T, [2] * T])
    env = make(num_envs=2)
    obs, _ = env.reset(seed=0, options={"budgets": budgets})
    for step in range(T):
        obs, reward, terminated, _, _ = env.step(first_patch(obs["action_mask"]))
        assert terminated.tolist() == [step == T - 1, False]
    assert not obs["action_mask"][0].any()  # the final observation of env 0
    assert reward[0] < 0  # its last frame was scored
    env1_steps = int(env.state.steps[1])
    obs, reward, terminated, truncated, info = env.step(np.array([N, first_patch(obs["action_mask"])[1]]))
    assert reward[0] == 0.0 and not terminated[0] and not truncated[0]
    assert obs["frame_index"][0] == 0 and not obs["gazed"][0].any() and obs["action_mask"][0, :N].all()
    assert info["gazes_this_frame"][0] == 0 and np.isnan(info["frame_loss"][0]).all()
    assert int(env.state.steps[0]) == 0 and int(env.state.steps[1]) == env1_steps + 1
    assert any(torch.equal(env.state.video[0], clip) for clip in random_clips(5))


def test_vector_env__same_step_autoreset_reports_final_observation_and_info():
    env = make(num_envs=2, autoreset_mode=AutoresetMode.SAME_STEP, frame_budgets=[1] * T)
    assert env.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    obs, _ = env.reset(seed=0)
    for step in range(T):
        obs, reward, terminated, _, info = env.step(first_patch(obs["action_mask"]))
        assert ("final_obs" in info) == (step == T - 1)
    assert terminated.all() and (reward < 0).all()
    assert info["_final_obs"].all() and info["_final_info"].all()
    final = info["final_obs"][1]
    assert final["frame_index"] == T - 1 and not final["action_mask"].any()
    assert np.isfinite(info["final_info"]["frame_loss"]).all()
    assert (obs["frame_index"] == 0).all() and obs["action_mask"][:, :N].all()


def test_vector_env__disabled_autoreset_keeps_ended_envs_until_masked_reset():
    env = make(num_envs=2, autoreset_mode="Disabled", frame_budgets=[1] * T)
    obs, _ = env.reset(seed=0)
    for _ in range(T):
        obs, _, terminated, _, _ = env.step(first_patch(obs["action_mask"]))
    assert terminated.all()
    with pytest.raises(ValueError, match="env 0 has ended and autoreset_mode is DISABLED"):
        env.step(np.array([0, 0]))
    obs, info = env.reset(options={"reset_mask": np.array([True, True])})
    assert obs["action_mask"][:, :N].all() and info["_loss"].all()


def test_vector_env__partial_reset_replaces_only_the_masked_rows():
    env = make(num_envs=4, n_clips=6)
    gen = torch.Generator().manual_seed(3)
    obs, _ = env.reset(seed=0, options={"clip_index": np.array([0, 1, 2, 3])})
    for _ in range(5):
        obs, *_ = env.step(valid_actions(obs["action_mask"], gen))
    before = env.state.clone()
    mask = np.array([True, False, True, False])
    obs, info = env.reset(options={"reset_mask": mask, "clip_index": np.array([5, 4])})
    after, clips = env.state, random_clips(6)
    for name, old in before._tensors().items():
        new = after._tensors()[name]
        torch.testing.assert_close(new[[1, 3]], old[[1, 3]], rtol=0, atol=0, equal_nan=True, msg=name)
    assert torch.equal(after.video[0], clips[5]) and torch.equal(after.video[2], clips[4])
    assert (after.t[[0, 2]] == 0).all() and not after.history[[0, 2]].any()
    assert (after.aux["level"][[0, 2]] == -1).all()
    assert info["_loss"].tolist() == mask.tolist()
    assert obs["action_mask"][[0, 2], :N].all()


def test_vector_env__invalid_actions_raise_naming_the_env():
    env = make(num_envs=3)
    obs, _ = env.reset(seed=0)
    actions = first_patch(obs["action_mask"])
    env.step(actions)
    with pytest.raises(ValueError, match="patch .* in env 0 was already gazed"):
        env.step(actions)
    with pytest.raises(ValueError, match="out of range"):
        env.step(np.array([1, 2, N + 1]))
    with pytest.raises(ValueError, match=r"one action per env, shape \(3,\)"):
        env.step(np.array([1, 2]))
    with pytest.raises(ValueError, match="integers"):
        env.step(np.array([1.5, 2.0, 3.0]))
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"clip": 0})


def test_vector_env__return_tensors_keeps_everything_on_the_torch_device():
    env = make(num_envs=2, return_tensors=True, device=torch.device("cpu"))
    obs, info = env.reset(seed=0)
    assert all(isinstance(v, torch.Tensor) and v.device == env.device for v in obs.values())
    assert all(isinstance(v, torch.Tensor) for v in info.values())
    obs, reward, terminated, truncated, info = env.step(torch.as_tensor(first_patch(obs["action_mask"].numpy())))
    assert isinstance(reward, torch.Tensor) and reward.dtype == torch.float32 and reward.shape == (2,)
    assert terminated.dtype == torch.bool and truncated.dtype == torch.bool
    assert obs["frame"].dtype == torch.uint8 and obs["action_mask"].shape == (2, N + 1)


@pytest.mark.gpu
def test_vector_env__cuda_device_returns_cuda_tensors():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    env = make(num_envs=2, return_tensors=True, device="cuda")
    obs, _ = env.reset(seed=0)
    obs, reward, *_ = env.step(torch.zeros(2, dtype=torch.int64, device="cuda"))
    assert obs["canvas"].is_cuda and reward.is_cuda and env.state.video.is_cuda


def test_vector_env__render_gives_one_picture_per_env():
    env = make(num_envs=2, render_mode="rgb_array")
    env.reset(seed=0)
    pictures = env.render()
    assert len(pictures) == 2 and pictures[0].shape == (64, 3 * 64 + 8, 3) and pictures[0].dtype == np.uint8


@pytest.mark.parametrize("autoreset_mode", ["NextStep", "SameStep"])
def test_vector_env__static_step_mode_plays_the_eager_episodes(autoreset_mode):
    kw = {"num_envs": 4, "autoreset_mode": autoreset_mode, "frame_budgets": [2, 1, 3, 1, 2, 1, 1, 2]}
    eager, static = make(step_mode="eager", **kw), make(step_mode="static", **kw)
    assert eager.unwrapped.step_mode == "eager" and static.unwrapped.step_mode == "static"
    outs = [env.reset(seed=3) for env in (eager, static)]
    assert_same_nested(outs[0], outs[1])
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):  # several episodes per env: autoresets included
        actions = valid_actions(outs[0][0]["action_mask"], gen)
        outs = [env.step(actions) for env in (eager, static)]
        assert_same_nested(outs[0], outs[1])
    assert static.unwrapped._runner is not None and not static.unwrapped._runner.captured


def test_vector_env__return_tensors_reuses_buffers_in_static_mode_and_numpy_stays_fresh():
    env = make(num_envs=2, return_tensors=True, step_mode="static")
    obs, _ = env.reset(seed=0)
    first, *_ = env.step(torch.as_tensor(first_patch(obs["action_mask"].numpy())))
    kept = {k: v.clone() for k, v in first.items()}
    second, *_ = env.step(torch.as_tensor(first_patch(first["action_mask"].numpy())))
    assert all(second[k] is first[k] for k in first)  # the same buffers, updated in place
    assert not torch.equal(second["gazed"], kept["gazed"])
    numpy_env = make(num_envs=2, step_mode="static")
    obs, _ = numpy_env.reset(seed=0)
    obs2, *_ = numpy_env.step(first_patch(obs["action_mask"]))
    obs3, *_ = numpy_env.step(first_patch(obs2["action_mask"]))
    assert not np.array_equal(obs2["gazed"], obs3["gazed"])  # numpy observations are fresh copies


def test_vector_env__step_mode_is_checked():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        make(step_mode="graph")
    with pytest.raises(ValueError, match="not a per-pixel loss"):
        make(step_mode="static", reward_kwargs={"loss": "ssim"})
    assert make(reward_kwargs={"loss": "ssim"}).unwrapped.step_mode == "eager"
