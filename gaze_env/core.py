"""The batched gazing MDP: all dynamics, written once over ``GazeState``.

Pure-ish torch functions, batch-first and device-agnostic: ``reset`` builds the state of ``B``
episodes, ``step`` applies ``B`` actions in place and returns the ``Transition``, ``action_mask``
and ``observe`` read the state. The Gymnasium, vector and TorchRL environments are thin
front-ends over these functions; nothing here loops over the batch in Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gaze_env.config import GazeEnvConfig
from gaze_env.types import GazeState, Transition
from rewards.losses import LossFn
from rewards.reconstruct import PasteReconstructor, Reconstructor


@dataclass(frozen=True)
class CoreParams:
    """Everything fixed for the life of an environment: the MDP config, the reconstructor and the
    per-frame loss the state tracks (the reward function's ``loss``)."""

    config: GazeEnvConfig
    reconstructor: Reconstructor
    loss: LossFn

    @classmethod
    def build(cls, config: GazeEnvConfig, loss: LossFn, reconstructor: Reconstructor | None = None) -> CoreParams:
        return cls(config, reconstructor if reconstructor is not None else PasteReconstructor(config.grid), loss)


# ---- scoring ---------------------------------------------------------------------------------
def _score_rows(params: CoreParams, state: GazeState, rows: torch.Tensor) -> None:
    """Recompute ``loss`` (and ``err_sum``) of rows ``rows`` (int64 (M,)) from scratch."""
    if rows.numel() == 0:
        return
    target = state.video[rows, state.frame_t[rows]].float().div_(255)  # (M, 3, H, W)
    recon = state.canvas[rows].float().div_(255)  # (M, 3, H, W)
    pixel_error = getattr(params.loss, "pixel_error", None)
    if pixel_error is not None:
        err = pixel_error(target, recon).flatten(1).double().sum(1)  # (M,) summed in float64: batch-size invariant
        state.err_sum[rows] = err
        state.loss[rows] = params.loss.reduce(err / target[0].numel()).float()
    else:
        state.loss[rows] = params.loss(target, recon).float()


def _all_rows(state: GazeState) -> torch.Tensor:
    return torch.arange(state.batch_size, device=state.device)


# ---- reset -----------------------------------------------------------------------------------
def reset(
    params: CoreParams,
    video: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    budgets: torch.Tensor | None = None,
) -> GazeState:
    """Start ``B`` episodes.

    Args:
        video: (B, T, 3, H, W) uint8 clips, ``T`` and ``H = W`` as the config says.
        generator: draws the frames the ``frame`` reward scores (when ``reward_frame_rate < 1``).
        budgets: (B, T) int64 per-frame gaze budgets overriding the config's.
    """
    cfg = params.config
    N, H, T = cfg.grid.num_patches, cfg.frame_size, cfg.num_frames
    if video.dtype != torch.uint8 or video.ndim != 5 or tuple(video.shape[1:]) != (T, 3, H, H):
        raise ValueError(
            f"video must be uint8 (B, {T}, 3, {H}, {H}) for this config, got {video.dtype} {tuple(video.shape)}"
        )
    B, device = video.shape[0], video.device
    if budgets is None:
        budgets = torch.tensor(cfg.budgets, device=device).expand(B, T).clone()
    else:
        budgets = torch.as_tensor(budgets, dtype=torch.int64, device=device).expand(B, T).clone()
        lo = max(1, cfg.min_gazes_per_frame)
        if bool(((budgets < lo) | (budgets > N)).any()):
            raise ValueError(f"budgets must lie in [{lo}, {N}], got {budgets.min().item()}..{budgets.max().item()}")
    if cfg.reward_frame_rate >= 1.0:
        reward_frames = torch.ones(B, T, dtype=torch.bool, device=device)
    else:
        m = max(1, round(cfg.reward_frame_rate * T))
        gen_device = generator.device if generator is not None else device
        order = torch.rand(B, T, generator=generator, device=gen_device).argsort(dim=1)[:, :m].to(device)  # (B, m)
        reward_frames = torch.zeros(B, T, dtype=torch.bool, device=device).scatter_(1, order, True)
    nan = torch.full((B, T), float("nan"), device=device)
    state = GazeState(
        video=video,
        t=torch.zeros(B, dtype=torch.int64, device=device),
        history=torch.zeros(B, T, N, dtype=torch.bool, device=device),
        counts=torch.zeros(B, T, dtype=torch.int64, device=device),
        budgets=budgets,
        reward_frames=reward_frames,
        canvas=torch.empty(B, 3, H, H, dtype=torch.uint8, device=device),
        loss=torch.zeros(B, device=device),
        err_sum=torch.zeros(B, dtype=torch.float64, device=device),
        frame_start_loss=nan,
        frame_loss=nan.clone(),
        steps=torch.zeros(B, dtype=torch.int64, device=device),
        done=torch.zeros(B, dtype=torch.bool, device=device),
        aux={},
    )
    params.reconstructor.init(state)
    _score_rows(params, state, _all_rows(state))
    state.frame_start_loss[:, 0] = state.loss
    return state


# ---- masks and validation --------------------------------------------------------------------
def action_mask(params: CoreParams, state: GazeState) -> torch.Tensor:
    """(B, N + 1) bool: valid actions (ungazed patches of the current frame; STOP once the frame
    has ``min_gazes_per_frame`` gazes). All False after the episode ended."""
    live = ~state.done  # (B,)
    patches = ~state.gazed & live[:, None]  # (B, N)
    stop = (state.num_gazed >= params.config.min_gazes_per_frame) & live  # (B,)
    return torch.cat([patches, stop[:, None]], dim=1)


def invalid_action_message(params: CoreParams, state: GazeState, action: torch.Tensor) -> str | None:
    """Why the first invalid action of the batch is invalid, or None when all are valid.
    Episodes that ended accept (and ignore) any in-range action, so ragged batches can run on."""
    N = params.config.grid.num_patches
    bad_range = (action < 0) | (action > N)
    ok = action_mask(params, state).gather(1, action.clamp(0, N)[:, None])[:, 0] & ~bad_range
    ok |= state.done & ~bad_range  # ended episodes ignore their action
    if bool(ok.all()):
        return None
    i = int((~ok).nonzero()[0, 0])
    a, where = int(action[i]), f"env {i}" if state.batch_size > 1 else "the env"
    if bool(bad_range[i]):
        return f"action {a} in {where} is out of range: actions are 0..{N - 1} (patches) and {N} (STOP)"
    t, n = int(state.t[i]), int(state.num_gazed[i])
    if a == N:
        return (
            f"STOP in {where} after {n} gaze(s) in frame {t}: at least "
            f"min_gazes_per_frame={params.config.min_gazes_per_frame} are needed first"
        )
    return f"patch {a} in {where} was already gazed in frame {t}: a patch may be gazed once per frame"


# ---- step ------------------------------------------------------------------------------------
def step(params: CoreParams, state: GazeState, action: torch.Tensor, *, validate: bool = True) -> Transition:
    """Apply one action per episode, in place.

    A patch action gazes it in the current frame and updates the reconstruction and loss. The
    frame ends on STOP or when its budget is used up; the next frame then starts from the carried
    reconstruction, and after the last frame the episode terminates. Ended episodes ignore their
    action. With ``validate`` an invalid action raises ``ValueError`` (no state change).
    """
    cfg = params.config
    N, T = cfg.grid.num_patches, cfg.num_frames
    action = torch.as_tensor(action, dtype=torch.int64, device=state.device).reshape(-1)
    if action.shape[0] != state.batch_size:
        raise ValueError(f"expected {state.batch_size} actions, got {action.shape[0]}")
    if validate:
        msg = invalid_action_message(params, state, action)
        if msg is not None:
            raise ValueError(msg)
    B = state.batch_size
    b = _all_rows(state)
    active = ~state.done  # (B,)
    is_gaze = active & (action < N)  # (B,)
    t = state.frame_t  # (B,)
    loss_before = state.loss.clone()

    patch = action.clamp(0, N - 1)
    state.history[b, t, patch] |= is_gaze
    state.counts[b, t] += is_gaze
    pixel_error = getattr(params.loss, "pixel_error", None)
    delta = params.reconstructor.gaze(state, action, is_gaze, pixel_error)
    if delta is not None:
        state.err_sum += delta
        numel = state.canvas[0].numel()
        state.loss = torch.where(is_gaze, params.loss.reduce(state.err_sum / numel).float(), state.loss)
    else:
        _score_rows(params, state, is_gaze.nonzero()[:, 0])
    frame_end = active & ((action == N) | (state.counts[b, t] >= state.budgets[b, t]))  # (B,)
    # optional hook: a reconstructor too costly to run per gaze (the learned MAE) scores frame ends
    end_frame = getattr(params.reconstructor, "end_frame", None)
    if end_frame is not None and bool(frame_end.any()):
        ending = frame_end.nonzero()[:, 0]
        state.loss[ending] = end_frame(state, ending, params.loss).to(state.loss.dtype)
    loss_after = state.loss.clone()
    state.steps += active

    state.frame_loss[b, t] = torch.where(frame_end, loss_after, state.frame_loss[b, t])
    scored = frame_end & state.reward_frames[b, t]
    state.t += frame_end
    terminated = frame_end & (state.t >= T)
    state.done |= terminated
    next_start = torch.full((B,), float("nan"), device=state.device)
    moved = (frame_end & ~terminated).nonzero()[:, 0]  # (M,)
    if moved.numel():
        params.reconstructor.begin_frame(state, moved)
        _score_rows(params, state, moved)
        state.frame_start_loss[moved, state.t[moved]] = state.loss[moved]
        next_start[moved] = state.loss[moved]
    return Transition(
        action=action,
        is_gaze=is_gaze,
        frame_index=t,
        loss_before=loss_before,
        loss_after=loss_after,
        frame_end=frame_end,
        scored=scored,
        next_start_loss=next_start,
        terminated=terminated,
        state=state,
    )


# ---- observation -----------------------------------------------------------------------------
def observe(params: CoreParams, state: GazeState) -> dict[str, torch.Tensor]:
    """The observation of every episode, batched (see ``AutoGazeEnv`` for the spec)."""
    return {
        "frame": state.frame,  # (B, 3, H, W) uint8
        "canvas": state.canvas.clone(),  # (B, 3, H, W) uint8
        "gazed": state.gazed.clone(),  # (B, N) bool
        "frame_index": state.frame_t.clone(),  # (B,) int64
        "gazes_left": torch.where(state.done, 0, state.budget - state.num_gazed),  # (B,) int64
        "action_mask": action_mask(params, state),  # (B, N + 1) bool
    }


def gazing_ratio(params: CoreParams, state: GazeState) -> torch.Tensor:
    """(B,) float32: gazes so far over the patches of the frames started so far."""
    started = (state.t + 1).clamp(max=state.num_frames)
    return state.counts.sum(1).float() / (started * params.config.grid.num_patches)


def info(params: CoreParams, state: GazeState) -> dict[str, torch.Tensor]:
    """Diagnostics of every episode, batched."""
    return {
        "loss": state.loss.clone(),  # (B,) current frame's loss
        "gazes_this_frame": state.num_gazed,  # (B,)
        "frame_loss": state.frame_loss.clone(),  # (B, T) loss at each frame end, NaN before
        "gazing_ratio": gazing_ratio(params, state),  # (B,)
    }
