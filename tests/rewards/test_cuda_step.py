"""rewards.cuda's step kernels (the bookkeeping of ``core.StaticStep`` and the runner's observation)
equal the torch code they replace, field for field: on the CPU through a host build of their CUDA
source (g++; they are plain per-thread code, no shared memory or synchronisation, so a loop over
the grid runs them as the GPU would), and on the GPU for real (``gpu``)."""

import ctypes
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from gaze_env import core
from gaze_env.config import GazeEnvConfig
from gaze_env.graph import StepRunner
from rewards import cuda
from rewards.base import make_reward
from rewards.losses import make_loss
from tests.conftest import random_clips
from tests.gaze_env.test_static_step import assert_same_state, assert_same_transition, random_actions

HOST_HEADER = r"""
#include <algorithm>
#include <cstring>
using std::min;
struct Index { unsigned x, y, z; };
Index blockIdx, threadIdx, blockDim, gridDim;
#define __global__
#define __restrict__
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
extern "C" void set_index(unsigned block, unsigned thread, unsigned threads, unsigned blocks) {
    blockIdx.x = block; threadIdx.x = thread; blockDim.x = threads; gridDim.x = blocks;
}
"""

ARG_TYPES = {"ptr": (np.uint64, ctypes.c_void_p), "i64": (np.int64, ctypes.c_longlong), "i32": (np.int32, ctypes.c_int)}


def kernel_signatures(source: str) -> dict[str, list[str]]:
    """Kernel name -> its parameters' kinds ("ptr", "i64", "i32"), what CuPy must be given."""
    text = re.sub(r"//[^\n]*", "", source)
    out = {}
    for m in re.finditer(r'extern "C" __global__ void (\w+)\((.*?)\)\s*\{', text, re.S):
        params = [p.strip() for p in m.group(2).split(",")]
        out[m.group(1)] = ["ptr" if "*" in p else "i64" if "long long" in p else "i32" for p in params]
    return out


@pytest.fixture(scope="module")
def host_launch(tmp_path_factory):
    """A stand-in for ``cuda._launch`` that runs the step kernels on the host, checking that every
    argument has the type its parameter needs (CuPy packs them by type: a wrong size would shift
    the others)."""
    if shutil.which("g++") is None:
        pytest.skip("needs g++ to build the step kernels for the host")
    folder = tmp_path_factory.mktemp("step_kernels")
    (folder / "step.cpp").write_text(HOST_HEADER + cuda._STEP_SOURCE)
    compile_cmd = ["g++", "-O1", "-shared", "-fPIC", "-ffp-contract=off"]
    subprocess.run([*compile_cmd, "-o", str(folder / "step.so"), str(folder / "step.cpp")], check=True)
    lib = ctypes.CDLL(str(folder / "step.so"))
    signatures = kernel_signatures(cuda._STEP_SOURCE)
    assert sorted(signatures) == sorted(cuda.STEP_KERNEL_NAMES)
    launched = []

    def launch(name: str, device: torch.device, grid: tuple[int, ...], args: tuple, shared: int = 0) -> None:
        kinds = signatures[name]
        assert len(args) == len(kinds), f"{name}: {len(args)} arguments for {len(kinds)} parameters"
        for i, (arg, kind) in enumerate(zip(args, kinds)):
            assert type(arg) is ARG_TYPES[kind][0], f"{name} argument {i}: {type(arg).__name__} for a {kind}"
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = [ARG_TYPES[k][1] for k in kinds], None
        values = [(int(a) or None) if k == "ptr" else int(a) for a, k in zip(args, kinds)]
        (blocks,) = grid
        for block in range(blocks):
            for thread in range(cuda.BLOCK):
                lib.set_index(block, thread, cuda.BLOCK, blocks)
                fn(*values)
        launched.append(name)

    launch.launched = launched
    return launch


def host_kernel_runner(params, state, reward, capacity, validate=True) -> StepRunner:
    """A runner whose static step takes the kernel path on a CPU state (the kernels on the host)."""
    runner = StepRunner(params, state, reward, capacity=capacity, validate=validate, kernel="torch")
    runner.static.kernels = True
    runner.refresh()
    return runner


def assert_plays_equal(params, reward, runner: StepRunner, ref, torch_runner: StepRunner, g) -> int:
    """Step ``runner``, ``torch_runner`` and the eager ``ref`` to the end with the same random valid
    actions, comparing everything after each step; returns the steps with more frame-end passes."""
    extra = 0
    while not bool(ref.done.all()):
        action = random_actions(params, ref, g)
        tr_ref = core.step(params, ref, action)
        tr, tr_torch = runner.step(action), torch_runner.step(action)
        assert_same_transition(tr, tr_ref)
        assert_same_transition(tr_torch, tr_ref)
        assert_same_state(runner.state, ref)
        assert torch.equal(runner.reward, reward(tr_ref).float())
        assert runner.static.flags.tolist() == torch_runner.static.flags.tolist()
        assert torch.equal(runner.static.order, torch_runner.static.order)
        assert runner.num_terminated == int(tr_ref.terminated.sum())
        for key, value in core.observe(params, ref).items():
            assert torch.equal(runner.obs[key], value), key
        for key, value in core.info(params, ref).items():
            torch.testing.assert_close(runner.info[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
        extra += int(runner.static.flags[1]) > runner.capacity
    return extra


@pytest.mark.parametrize(
    ("preset", "loss", "reward", "capacity", "kw"),
    [
        ("tiny", "l1", "dense", 1, {"frame_budgets": (2, 3, 1, 2, 3, 1, 2, 2)}),
        ("tiny", "mse", "frame", 2, {"min_gazes_per_frame": 0, "reward_frame_rate": 0.5}),
        ("tiny", "psnr", "dense", None, {}),
        ("small", "l1", "frame", 3, {"gazing_ratio": 0.03}),
    ],
)
def test_step_kernels__on_the_host_equal_the_eager_step_and_the_torch_static_step(
    host_launch, monkeypatch, preset, loss, reward, capacity, kw
):
    monkeypatch.setattr(cuda, "_launch", host_launch)
    reward = make_reward(reward, loss=loss, gaze_cost=0.01)
    params = core.CoreParams.build(GazeEnvConfig.from_preset(preset, **kw), reward.loss)
    B = 5
    ref = core.reset(params, random_clips(B, preset, seed=3), generator=torch.Generator().manual_seed(1))
    runner = host_kernel_runner(params, ref.clone(), reward, capacity)
    torch_runner = StepRunner(params, ref.clone(), reward, capacity=capacity, kernel="torch")
    extra = assert_plays_equal(params, reward, runner, ref, torch_runner, torch.Generator().manual_seed(0))
    if capacity == 1:
        assert extra > 0  # frames that ended together took more passes
    assert set(host_launch.launched) == set(cuda.STEP_KERNEL_NAMES)
    before = runner.state.clone()
    for bad in (999, -1):
        with pytest.raises(ValueError, match="out of range"):
            runner.step(torch.full((B,), bad))
        assert_same_state(runner.state, before)


def test_step_kernels__on_the_host_flag_invalid_batches_and_skip_the_check_without_validation(host_launch, monkeypatch):
    monkeypatch.setattr(cuda, "_launch", host_launch)
    params = core.CoreParams.build(GazeEnvConfig.from_preset("tiny", min_gazes_per_frame=2), make_loss("l1"))
    state = core.reset(params, random_clips(3))
    core.step(params, state, torch.tensor([5, 6, 7]))
    runner = host_kernel_runner(params, state, make_reward("frame"), 1)
    before = state.clone()
    with pytest.raises(ValueError, match="patch 6 in env 1 was already gazed"):
        runner.step(torch.tensor([1, 6, 2]))
    assert runner.static.flags.tolist() == [0, 0, 0]
    assert_same_state(state, before)
    with pytest.raises(ValueError, match="STOP in env 0 after 1 gaze"):
        runner.step(torch.tensor([84, 1, 2]))
    unchecked = host_kernel_runner(params, state, make_reward("frame"), 1, validate=False)
    unchecked.step(torch.tensor([84, 1, 2]))  # STOP before the minimum: not checked
    assert unchecked.static.flags.tolist() == [1, 1, 0]
    assert state.t.tolist() == [1, 0, 0] and state.counts[:, 0].tolist() == [1, 2, 2]


def test_step_kernels__unavailable_on_cpu_say_why_and_leave_the_torch_code(monkeypatch):
    monkeypatch.setattr(cuda, "_warned", set())
    params = core.CoreParams.build(GazeEnvConfig.from_preset("tiny"), make_loss("l1"))
    state = core.reset(params, random_clips(2))
    assert "run on CUDA, not cpu" in cuda.step_unsupported(state)
    assert not core.StaticStep(params, state).kernels
    with pytest.warns(UserWarning, match="using the torch code: the step kernels run on CUDA"):
        assert not core.StaticStep(params, state, kernel="cupy").kernels
    with pytest.raises(ValueError, match=r"step kernel must be one of \('auto', 'torch', 'cupy'\), got 'fast'"):
        core.StaticStep(params, state, kernel="fast")


@pytest.mark.gpu
@pytest.mark.parametrize(("preset", "loss"), [("paper", "l1"), ("small", "psnr")])
def test_step_kernels__on_cuda_equal_the_torch_code_in_captured_graphs(preset, loss):
    if not torch.cuda.is_available() or cuda.cupy_module() is None:
        pytest.skip("needs a CUDA device and CuPy")
    config = GazeEnvConfig.from_preset(preset, frame_budgets=(1, 3, 2, 1) * 4)
    reward = make_reward("dense", loss=loss, gaze_cost=0.01)
    params = core.CoreParams.build(config, reward.loss)
    clips = random_clips(40, preset, seed=5).cuda()
    ref = core.reset(params, clips, generator=torch.Generator().manual_seed(2))
    runner = StepRunner(params, ref.clone(), reward, capture=True, capacity=4, kernel="cupy")
    torch_runner = StepRunner(params, ref.clone(), reward, capture=True, capacity=4, kernel="torch")
    assert runner.static.kernels and not torch_runner.static.kernels
    assert runner.captured and torch_runner.captured
    gen = torch.Generator(device="cuda").manual_seed(0)
    extra = assert_plays_equal(params, reward, runner, ref, torch_runner, gen)
    assert extra > 0
    before = runner.state.clone()
    with pytest.raises(ValueError, match="out of range"):
        runner.step(torch.full((40,), -1, device="cuda"))
    assert_same_state(runner.state, before)
