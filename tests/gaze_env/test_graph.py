"""CUDA graphs (``step_mode="graph"``, with the CuPy kernels of ``rewards.cuda``) equal the eager
step of the torch reconstructor (``kernel="torch"``) on CUDA, bit for bit: random plays with frame
ends (several frame-end passes) and automatic resets, through the vector env, the TorchRL env and
the runner itself. GPU only (the same code runs op by op on CPU in test_static_step.py)."""

import pytest
import torch

from gaze_env import core
from gaze_env.config import GazeEnvConfig, get_preset
from gaze_env.graph import StepRunner
from gaze_env.torchrl_env import AutoGazeTorchEnv
from gaze_env.vector_env import AutoGazeVectorEnv
from rewards.base import make_reward
from rewards.losses import make_loss
from rewards.reconstruct import PasteReconstructor
from tests.conftest import random_clips

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def random_valid(mask: torch.Tensor, gen: torch.Generator, stop_weight: float = 0.05) -> torch.Tensor:
    """(B, N + 1) bool -> (B,) int64: valid actions, STOP now and then; STOP for ended rows."""
    weights = mask.float()
    weights[:, -1] *= stop_weight * weights[:, :-1].sum(1)
    weights[:, -1] += (~mask.any(1)).float()
    return torch.multinomial(weights, 1, generator=gen)[:, 0]


def assert_same(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=where)


@pytest.mark.parametrize(
    ("preset", "loss", "autoreset", "ratio", "steps"),
    [
        ("tiny", "l1", "NextStep", 0.1, 160),
        ("tiny", "mse", "SameStep", 0.05, 120),
        ("paper", "l1", "NextStep", 0.02, 130),
        ("paper", "psnr", "SameStep", 0.02, 100),
    ],
)
def test_graph__vector_env_equals_eager_over_random_plays(preset, loss, autoreset, ratio, steps):
    kw = dict(
        num_envs=24,
        preset=preset,
        videos=random_clips(6, preset, seed=4),
        device="cuda",
        return_tensors=True,
        autoreset_mode=autoreset,
        gazing_ratio=ratio,
        reward="dense",
        reward_kwargs={"loss": loss},
    )
    torch_code = PasteReconstructor(get_preset(preset).grid, kernel="torch")
    eager = AutoGazeVectorEnv(step_mode="eager", reconstructor=torch_code, **kw)
    graph = AutoGazeVectorEnv(**kw)
    assert graph.step_mode == "graph"
    outs = [env.reset(seed=7) for env in (eager, graph)]
    assert_same(outs[0][0], outs[1][0], "reset obs")
    gen = torch.Generator(device="cuda").manual_seed(0)
    ended = frame_ends = 0
    for i in range(steps):
        actions = random_valid(outs[0][0]["action_mask"], gen)
        prev = outs[0][0]["frame_index"].clone()
        outs = [env.step(actions) for env in (eager, graph)]
        for j, name in enumerate(("obs", "reward", "terminated", "truncated", "info")):
            assert_same(outs[0][j], outs[1][j], f"step {i} {name}")
        ended += int(outs[0][2].sum())
        frame_ends += int((outs[0][0]["frame_index"] != prev).sum())
    assert graph._runner.captured
    assert ended >= 10 and frame_ends >= 100  # autoresets and frame ends were compared


def test_graph__step_runner_with_several_frame_end_passes_equals_the_eager_step():
    config = GazeEnvConfig.from_preset("small", frame_budgets=(2, 1, 3, 1) * 4)
    reward = make_reward("frame", loss="l1")
    params = core.CoreParams.build(config, make_loss("l1"))
    ref_params = core.CoreParams.build(config, make_loss("l1"), PasteReconstructor(config.grid, kernel="torch"))
    clips = random_clips(12, "small", seed=2).cuda()
    ref = core.reset(ref_params, clips)
    runner = StepRunner(params, core.reset(params, clips), reward, capture=True, capacity=2)
    assert "lowres" in runner.state.aux and "views" in ref.aux
    assert runner.captured
    gen = torch.Generator(device="cuda").manual_seed(1)
    passes = 0
    while not bool(ref.done.all()):
        action = random_valid(core.action_mask(params, ref), gen)
        tr_ref = core.step(ref_params, ref, action)
        tr = runner.step(action)
        passes += -(-int(runner.static.flags[1]) // 2)
        for name in ("is_gaze", "loss_after", "frame_end", "scored", "next_start_loss", "terminated"):
            assert_same(getattr(tr, name), getattr(tr_ref, name), name)
        assert_same(runner.reward, reward(tr_ref).float(), "reward")
        assert_same(core.observe(params, ref), {k: runner.obs[k] for k in core.observe(params, ref)}, "obs")
    plain = lambda state: {k: v for k, v in state._tensors().items() if not k.startswith("aux.")}  # noqa: E731
    assert_same(plain(runner.state), plain(ref), "state")
    assert_same(runner.state.aux["level"], ref.aux["level"], "level")
    assert passes > 8 * 4  # frames ending in lockstep took several passes
    before = runner.state.clone()
    with pytest.raises(ValueError, match="out of range"):
        runner.step(torch.full((12,), 999, device="cuda"))
    assert_same(runner.state._tensors(), before._tensors(), "state after an invalid batch")


def test_graph__torchrl_env_rollouts_equal_eager():
    kw = dict(preset="tiny", videos=random_clips(5, seed=1), device="cuda", gazing_ratio=0.05)
    rollouts = []
    for mode, kernel in (("eager", "torch"), ("graph", "auto")):
        env = AutoGazeTorchEnv(
            8, step_mode=mode, reconstructor=PasteReconstructor(get_preset("tiny").grid, kernel=kernel), **kw
        )
        env.set_seed(3)
        torch.manual_seed(0)
        rollouts.append(env.rollout(70, break_when_any_done=False))
    assert_same(rollouts[0].to_dict(), rollouts[1].to_dict(), "rollout")
    assert bool(rollouts[1]["next", "done"].any())  # partial resets happened
