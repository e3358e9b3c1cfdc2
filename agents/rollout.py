"""Batched rollouts: the policy's cached generation, scored by the environment.

The policy's gazes depend only on the video and its own predictions (the task-loss stop uses the
policy's *predicted* loss), so a rollout generates a whole batch of trajectories first and then
scores the actions (:func:`replay`) to get the rewards and the actual losses. The result is the
trajectory TensorDict of DESIGN.md.

Generation (:class:`RolloutEngine`): ``AutoGazePolicy.generate``, or on CUDA the fixed-shape
``agents.gazer.StaticGenerator`` replayed as CUDA graphs (greedy, or sampling in the graph).

Scoring (:func:`replay`): one ``gaze_env.core.step`` per gaze slot in general. With the paste
canvas, a pixel loss (l1, mse, psnr) and the built-in ``frame`` / ``dense`` rewards, the same
numbers come from T batched passes instead (:func:`paste_replay`): patches of one scale never
overlap and finer scales overwrite coarser ones whatever the order, so a pixel's value after the
first ``j`` gazes of a frame is the view of the finest scale among them that covers it, and the
frame's error after every gaze follows from where each scale was first gazed.
"""

from __future__ import annotations

import math
import time
from copy import deepcopy
from typing import Literal

import torch
from tensordict import TensorDict

from agents.gazer import StaticGenerator
from agents.policy import AutoGazePolicy, Gazes, preprocess
from gaze_env import core
from gaze_env.core import CoreParams
from gaze_env.types import Transition
from rewards.base import DenseReward, FrameReward, RewardFn
from rewards.reconstruct import PasteReconstructor

EngineKind = Literal["auto", "reference", "static"]
ReplayMethod = Literal["auto", "core", "paste"]


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


# ---- generation ------------------------------------------------------------------------------
class RolloutEngine:
    """Where the gazes of rollouts come from.

    ``reference``: ``AutoGazePolicy.generate``. ``static``: ``agents.gazer.StaticGenerator`` (the
    same decoding with fixed shapes; CUDA graphs on CUDA, sampling with Gumbel noise drawn from the
    caller's generator), one engine kept per policy, batch size, clip length, gaze cap (the largest
    budget rounded up to a power of two, so that changing budgets rarely build a new one), minimum
    gazes and greedy / sampling. ``auto``: ``static`` on CUDA, ``reference`` elsewhere.

    Both sample from the same distribution and return the log-probs ``AutoGazePolicy.score``
    gives back; greedy gazes are equal. The draws differ (``generate`` calls
    ``torch.multinomial``), so a seeded run gives other (equally likely) rollouts per engine.
    Rollouts of one clip (``group_size``) share one encoding of the clip in ``static`` (not with
    ``canvas_input``: there a frame's encoding depends on the rollout's earlier gazes).

    Args:
        kind: ``auto``, ``reference`` or ``static``.
        cuda_graph: ``static`` on CUDA replays CUDA graphs (captured on first use of a shape).
        max_engines: static engines kept (least recently used dropped first).
        dtype: generate with a copy of the policy whose parameters are in this precision (e.g.
            ``torch.bfloat16``: about twice as fast on GPUs), refreshed from the policy before every
            call (buffers such as the RoPE frequencies stay float32). The rollouts then sample from
            the rounded policy and their ``log_prob`` is its log-probability, off from the policy's
            by the rounding (``ratio`` in the GRPO diagnostics shows how far). None: the policy.
    """

    def __init__(
        self,
        kind: EngineKind = "auto",
        *,
        cuda_graph: bool = True,
        max_engines: int = 8,
        dtype: torch.dtype | None = None,
    ) -> None:
        if kind not in ("auto", "reference", "static"):
            raise ValueError(f"engine kind must be 'auto', 'reference' or 'static', got {kind!r}")
        if max_engines < 1:
            raise ValueError(f"max_engines must be >= 1, got {max_engines}")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.kind, self.cuda_graph, self.max_engines, self.dtype = kind, cuda_graph, max_engines, dtype
        self._engines: dict[tuple, StaticGenerator] = {}
        self._copies: dict[int, tuple[AutoGazePolicy, AutoGazePolicy]] = {}  # id -> (policy, its copy)

    def resolve(self, device: torch.device) -> Literal["reference", "static"]:
        """The engine used for a policy on ``device``."""
        if self.kind == "auto":
            return "static" if device.type == "cuda" else "reference"
        return self.kind

    @torch.no_grad()
    def generate(
        self,
        policy: AutoGazePolicy,
        video: torch.Tensor,
        budgets: torch.Tensor,
        *,
        group_size: int = 1,
        task_loss_requirement: float | None = None,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        min_gazes_per_frame: int = 1,
    ) -> Gazes:
        """Gazes of ``group_size`` rollouts of each of ``n`` clips ``video`` (n, T, 3, H, W) uint8
        (rows ``i * group_size ...`` roll out clip ``i``), under ``budgets`` (n * group_size, T)
        int64; greedy at ``temperature`` 0, else sampled with ``generator``."""
        B, T = budgets.shape
        if B != video.shape[0] * group_size:
            raise ValueError(f"budgets {tuple(budgets.shape)} must have {group_size} rows per clip of {video.shape[0]}")
        if temperature > 0 and generator is None:
            raise ValueError("sampling (temperature > 0) needs an explicit torch.Generator")
        policy = self._model(policy)
        dtype = policy.gazing_model.gaze_decoder.lm_head.weight.dtype
        if self.resolve(policy.device) == "reference":
            rows = video.repeat_interleave(group_size, 0) if group_size > 1 else video
            return policy.generate(
                preprocess(rows).to(dtype),
                frame_budgets=budgets,
                task_loss_requirement=task_loss_requirement,
                temperature=temperature,
                generator=generator if temperature > 0 else None,
                min_gazes_per_frame=min_gazes_per_frame,
            )
        N = policy.config.num_patches
        cap = min(N, 1 << math.ceil(math.log2(max(1, int(budgets.max())))))
        engine = self._engine(policy, B, cap, T, min_gazes_per_frame, temperature > 0)
        thresholds = None
        if task_loss_requirement is not None:
            thresholds = torch.as_tensor(task_loss_requirement, dtype=torch.float32, device=policy.device)
            thresholds = thresholds.expand(B, T).contiguous()
        frames, tokens = None, None
        if policy.config.canvas_input:  # every rollout's frames are encoded with its own canvas
            frames = preprocess(video.repeat_interleave(group_size, 0) if group_size > 1 else video).to(dtype)
        else:
            tokens, _ = policy.encode(preprocess(video).to(dtype))  # (n, T, P, H): one encoding per clip
            if group_size > 1:
                tokens = tokens.repeat_interleave(group_size, 0)
        engine.reset()
        if temperature > 0:
            return engine.generate(
                frames, budgets, thresholds, tokens=tokens, temperature=temperature, generator=generator
            )
        return engine.generate(frames, budgets, thresholds, tokens=tokens)

    def _model(self, policy: AutoGazePolicy) -> AutoGazePolicy:
        """``policy``, or its copy in ``self.dtype`` with the policy's current weights."""
        if self.dtype is None or self.dtype == policy.gazing_model.gaze_decoder.lm_head.weight.dtype:
            return policy
        policy_and_copy = self._copies.get(id(policy))
        if policy_and_copy is None or policy_and_copy[0] is not policy:
            copy = deepcopy(policy).eval().requires_grad_(False)
            for p in copy.parameters():
                p.data = p.data.to(self.dtype)
            self._copies[id(policy)] = policy_and_copy = (policy, copy)
        copy = policy_and_copy[1]
        with torch.no_grad():  # in place: captured CUDA graphs read these very tensors
            torch._foreach_copy_(list(copy.parameters()), list(policy.parameters()))
        return copy

    def _engine(
        self, policy: AutoGazePolicy, batch: int, cap: int, frames: int, min_gazes: int, sample: bool
    ) -> StaticGenerator:
        key = (id(policy), batch, cap, frames, min_gazes, sample)
        engine = self._engines.pop(key, None)
        if engine is None or engine.policy is not policy:
            engine = StaticGenerator(
                policy,
                batch,
                cap,
                max_frames=frames,
                min_gazes_per_frame=min_gazes,
                cuda_graph=self.cuda_graph and policy.device.type == "cuda",
                sample=sample,
            )
        self._engines[key] = engine  # most recently used last
        while len(self._engines) > self.max_engines:
            self._engines.pop(next(iter(self._engines)))
        return engine


# ---- scoring ---------------------------------------------------------------------------------
def paste_replay_supported(params: CoreParams, reward_fn: RewardFn) -> bool:
    """:func:`paste_replay` gives the core's numbers: the paste canvas, a loss with a per-pixel
    error (l1, mse, psnr), and a reward that reads only the per-step fields of a transition (the
    built-in ``frame`` and ``dense`` rewards; a user's reward may read the state)."""
    return (
        type(params.reconstructor) is PasteReconstructor
        and getattr(params.loss, "pixel_error", None) is not None
        and type(reward_fn) in (FrameReward, DenseReward)
    )


def replay(
    params: CoreParams,
    reward_fn: RewardFn,
    video: torch.Tensor,
    action: torch.Tensor,
    valid: torch.Tensor,
    budgets: torch.Tensor,
    generator: torch.Generator | None = None,
    reward_frames: torch.Tensor | None = None,
    *,
    method: ReplayMethod = "auto",
    group_size: int = 1,
) -> TensorDict:
    """Score trajectories in the environment.

    Args:
        video: (B, T, 3, H, W) uint8. action: (B, L) int64 per-frame ids, STOP = N, padding after
            the end. valid: (B, L) bool, True entries first. budgets: (B, T) int64 per-frame budgets
            the actions were generated under (frames end when they are used up).
        reward_frames: (B, T) bool frames the ``frame`` reward scores, replacing the ones
            ``core.reset`` draws when the config's ``reward_frame_rate < 1`` (GRPO gives all
            rollouts of a group the same frames, so that their returns are comparable).
        method: ``core`` steps ``gaze_env.core`` once per slot; ``paste`` runs
            :func:`paste_replay` (same numbers; needs :func:`paste_replay_supported`); ``auto``
            picks ``paste`` whenever it is supported.
        group_size: consecutive groups of this many rows hold the same clip (``paste`` then works
            out what depends on the clip alone once per group).
    Returns: TensorDict [B] with ``reward`` (B, L), ``loss_after`` (B, L) loss of the acted frame
    after each step, ``frame_loss`` (B, T), ``frame_start_loss`` (B, T), ``scored`` (B, T).
    """
    if method not in ("auto", "core", "paste"):
        raise ValueError(f"replay method must be 'auto', 'core' or 'paste', got {method!r}")
    supported = paste_replay_supported(params, reward_fn)
    if method == "paste" and not supported:
        raise ValueError(
            "the paste replay needs the PasteReconstructor, a pixel loss (l1, mse, psnr) and the frame or dense "
            f"reward; got {type(params.reconstructor).__name__}, {params.loss!r}, {type(reward_fn).__name__}"
        )
    if method == "paste" or (method == "auto" and supported):
        return paste_replay(params, reward_fn, video, action, valid, budgets, generator, reward_frames, group_size)
    return core_replay(params, reward_fn, video, action, valid, budgets, generator, reward_frames)


def core_replay(
    params: CoreParams,
    reward_fn: RewardFn,
    video: torch.Tensor,
    action: torch.Tensor,
    valid: torch.Tensor,
    budgets: torch.Tensor,
    generator: torch.Generator | None = None,
    reward_frames: torch.Tensor | None = None,
) -> TensorDict:
    """:func:`replay` with one batched ``core.step`` per slot: any reconstructor, loss and reward."""
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


def paste_replay(
    params: CoreParams,
    reward_fn: RewardFn,
    video: torch.Tensor,
    action: torch.Tensor,
    valid: torch.Tensor,
    budgets: torch.Tensor,
    generator: torch.Generator | None = None,
    reward_frames: torch.Tensor | None = None,
    group_size: int = 1,
) -> TensorDict:
    """:func:`replay` for the paste canvas in T batched passes, one per frame (see the module
    docstring); arguments and result as there, the same numbers as :func:`core_replay`.

    Like the core: a step of an invalid slot acts as STOP (with reward and loss 0), a frame ends
    at STOP or when its budget is used up, steps after the episode ended are ignored. Per frame,
    for every pixel and scale ``k``: ``tau_k`` the rank of the frame's first gaze of the scale-``k``
    patch covering it. That gaze changes the pixel iff no finer scale came earlier, from the view
    of the finest coarser scale gazed before it (or the carried canvas) to view ``k``; summing
    those per-element error changes over the patch's square gives the change of the frame's
    summed error at that gaze, as the core adds them. The per-element errors are the core's (same
    float32 operations on the same pixels) and the sums float64, so with l1 (all terms multiples of
    2^-31, sums below 2^22) they are exact in any order: losses equal the core's bit for bit. With
    squared errors the float64 sums may round differently in the last bit.
    """
    cfg, grid = params.config, params.config.grid
    N, T, H, ks = grid.num_patches, cfg.num_frames, cfg.frame_size, grid.num_scales
    B, L = action.shape
    G = group_size
    if G < 1 or B % G or video.shape[0] != B:
        raise ValueError(f"{B} trajectories of video {tuple(video.shape)} cannot form groups of {group_size} rows")
    n, dev = B // G, video.device
    pixel_error, reduce = params.loss.pixel_error, params.loss.reduce
    # reset: the starting canvas, the validated budgets and the scored frames, drawn as the core does
    state = core.reset(params, video, generator=generator, budgets=budgets)
    budgets, canvas = state.budgets, state.canvas  # (B, T) int64, (B, 3, H, W) uint8
    scored_frames = state.reward_frames
    if reward_frames is not None:
        scored_frames = reward_frames.to(dev, torch.bool).expand(B, -1)
    a = torch.where(valid, action, N)  # (B, L) what the core steps: STOP at invalid slots
    if bool(((a < 0) | (a > N)).any()):
        raise ValueError(f"actions must lie in [0, {N}] (STOP = {N}), got {int(a.min())}..{int(a.max())}")

    # frames: frame t takes steps [starts[:, t], ends[:, t]), ending at STOP or the budget-th gaze
    width = int(budgets.max())
    j = torch.arange(width, device=dev)
    start = torch.zeros(B, dtype=torch.int64, device=dev)
    starts, lengths = [], []
    for t in range(T):
        idx = start[:, None] + j  # (B, width)
        stop = (j < budgets[:, t, None]) & (idx < L) & (a.gather(1, idx.clamp(max=L - 1)) == N)
        length = torch.where(stop.any(1), stop.long().argmax(1), budgets[:, t] - 1) + 1  # (B,)
        starts.append(start)
        lengths.append(length)
        start = start + length
    if bool((start > L).any()):
        raise ValueError("trajectories ended before their episodes: actions and budgets disagree")
    starts_t, lengths_t = torch.stack(starts, 1), torch.stack(lengths, 1)  # (B, T)
    ends = starts_t + lengths_t
    steps = torch.arange(L, device=dev)
    frame = (steps[None, :, None] >= ends[:, None, :]).sum(-1)  # (B, L) frame of each step; T after the end
    acted = frame < T  # steps the core takes (it ignores the rest)
    f = frame.clamp(max=T - 1)
    rank = steps - starts_t.gather(1, f)  # (B, L) index of the step in its frame
    is_gaze = acted & (a < N)
    frame_end = acted & (steps == ends.gather(1, f) - 1)
    live = acted & valid

    # rank of the first gaze of every patch in every frame (L: never gazed)
    never = L
    key = torch.where(is_gaze, f * N + a.clamp(max=N - 1), T * N)  # (B, L); T * N collects the rest
    first = torch.full((B, T * N + 1), never, dtype=torch.int64, device=dev)
    first.scatter_reduce_(1, key, torch.where(is_gaze, rank, never), reduce="amin")
    first_gaze = is_gaze & (first.gather(1, key) == rank)  # repeats of a patch change nothing
    first = first[:, : T * N].view(B, T, N).to(torch.int32)

    clips = video[::G]  # (n, T, 3, H, W): rows of a group share their clip
    delta = torch.zeros(B, L, dtype=torch.float64, device=dev)  # error change of each step
    start_err = torch.zeros(B, T, dtype=torch.float64, device=dev)  # summed error at each frame start
    for t in range(T):
        target = clips[:, t].float().div_(255)  # (n, 3, H, W)
        views = grid.scale_views(clips[:, t])  # (n, k, 3, H, W) uint8
        e_view = [pixel_error(target, views[:, k].float().div_(255))[:, None] for k in range(ks)]  # (n, 1, 3, H, W)
        e_canvas = pixel_error(target[:, None], canvas.view(n, G, 3, H, H).float().div_(255))  # (n, G, 3, H, W)
        start_err[:, t] = e_canvas.reshape(B, -1).double().sum(1)
        tau = []  # per scale (n, G, 1, H, W): rank of the first gaze of the patch covering each pixel
        for k, (g, R) in enumerate(zip(grid.grid_sizes, grid.region_sizes)):
            cells = first[:, t, grid.offsets[k] : grid.offsets[k + 1]].view(B, g, 1, g, 1)
            tau.append(cells.expand(B, g, R, g, R).reshape(n, G, 1, H, H))
        finer = torch.full_like(tau[0], never)  # first gaze of any finer scale
        sums = [torch.empty(0)] * ks
        for k in reversed(range(ks)):
            changes = tau[k] < finer  # (n, G, 1, H, W) the scale-k gaze is the finest so far
            finer = torch.minimum(finer, tau[k])
            before = e_canvas
            for c in range(k):  # the finest coarser scale gazed earlier, else the carried canvas
                before = torch.where(tau[c] < tau[k], e_view[c], before)
            change = torch.where(changes, e_view[k] - before, 0.0)  # (n, G, 3, H, W) float32, as the core
            g, R = grid.grid_sizes[k], grid.region_sizes[k]
            sums[k] = change.view(B, 3, g, R, g, R).double().sum((1, 3, 5)).view(B, g * g)
        patch_change = torch.cat(sums, 1)  # (B, N) float64: error change at each patch's first gaze
        delta = torch.where(first_gaze & (f == t), patch_change.gather(1, a.clamp(max=N - 1)), delta)
        canvas = canvas.view(n, G, 3, H, H)
        for k in range(ks):  # carry: every pixel keeps the finest scale gazed in this frame
            canvas = torch.where(tau[k] < never, views[:, k : k + 1], canvas)
        canvas = canvas.reshape(B, 3, H, H)

    # summed error after each step: its frame's start plus the changes so far (cumulated per frame)
    window = starts_t[..., None] + j  # (B, T, width)
    inside = j < lengths_t[..., None]
    window = torch.where(inside, window, L).view(B, -1)  # slot L collects the padding
    run = start_err[..., None] + delta.gather(1, window.clamp(max=L - 1)).view(B, T, width).where(inside, 0).cumsum(-1)
    err_after = torch.zeros(B, L + 1, dtype=torch.float64, device=dev).scatter_(1, window, run.view(B, -1))[:, :L]
    numel = 3 * H * H
    loss_after = reduce(err_after / numel).float()  # (B, L), as the core: reduce(err_sum / numel)
    start_loss = reduce(start_err / numel).float()  # (B, T)
    loss_before = torch.where(rank == 0, start_loss.gather(1, f), torch.cat([loss_after[:, :1], loss_after[:, :-1]], 1))
    terminated = frame_end & (f == T - 1)
    next_start = start_loss.gather(1, (f + 1).clamp(max=T - 1))
    tr = Transition(
        action=a.reshape(-1),
        is_gaze=is_gaze.reshape(-1),
        frame_index=f.reshape(-1),
        loss_before=loss_before.reshape(-1),
        loss_after=loss_after.reshape(-1),
        frame_end=frame_end.reshape(-1),
        scored=(frame_end & scored_frames.gather(1, f)).reshape(-1),
        next_start_loss=torch.where(frame_end & ~terminated, next_start, float("nan")).reshape(-1),
        terminated=terminated.reshape(-1),
        state=None,  # type: ignore[arg-type]  # the supported rewards read the per-step fields only
    )
    return TensorDict(
        {
            "reward": torch.where(live, reward_fn(tr).view(B, L), 0.0),
            "loss_after": torch.where(live, loss_after, 0.0),
            "frame_loss": loss_after.gather(1, ends - 1),
            "frame_start_loss": start_loss,
            "scored": scored_frames.clone(),
        },
        batch_size=[B],
    )


# ---- rollouts --------------------------------------------------------------------------------
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
    group_size: int = 1,
    engine: RolloutEngine | None = None,
) -> TensorDict:
    """Generate gazes for ``video`` (n, T, 3, H, W) uint8, ``group_size`` rollouts per clip
    (``B = n * group_size`` rows, clip ``i`` in rows ``i * group_size ...``), and score them.

    ``budgets`` (B, T) defaults to the env config's; ``reward_frames`` (B, T) bool, see
    :func:`replay`; ``engine`` generates (default: ``AutoGazePolicy.generate``). ``timings``,
    when given, receives the seconds spent in ``generate`` (the policy) and ``replay`` (the
    environment and its reward), the device synchronised around each.
    Returns TensorDict [B]: ``video`` (B, T, 3, H, W), ``budgets`` (B, T), ``action`` /
    ``frame_id`` / ``valid`` / ``log_prob`` / ``loss_pred`` (/ ``value``) (B, L) from the policy,
    and ``reward`` / ``loss_after`` (B, L), ``frame_loss`` / ``frame_start_loss`` / ``scored``
    (B, T) from the environment.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    T = video.shape[1]
    B = video.shape[0] * group_size
    if budgets is None:
        budgets = torch.tensor(params.config.budgets, device=video.device)
    budgets = budgets.to(video.device, torch.int64).expand(B, T).contiguous()
    clock = _Clock(video.device, timings)
    gazes = (engine or RolloutEngine("reference")).generate(
        policy,
        video,
        budgets,
        group_size=group_size,
        task_loss_requirement=task_loss_requirement,
        temperature=temperature,
        generator=generator,
        min_gazes_per_frame=max(1, params.config.min_gazes_per_frame),
    )
    traj = gazes.to_trajectory()  # [B, L]
    clock.lap("generate")
    rows = video.repeat_interleave(group_size, 0) if group_size > 1 else video
    scored = replay(
        params, reward_fn, rows, traj["action"], traj["valid"], budgets, generator, reward_frames, group_size=group_size
    )
    clock.lap("replay")
    out = TensorDict({"video": rows, "budgets": budgets}, batch_size=[B])
    for key in traj.keys():
        out[key] = traj[key]
    out.update(scored)
    return out
