"""The AutoGaze policy as a step-by-step TorchRL actor for ``gaze_env.torchrl_env.AutoGazeTorchEnv``.

``make_gaze_actor`` builds ``TensorDictSequential(ProbabilisticActor(GazeStep), RecordAction)``:

- ``GazeStep`` reads the observation (``frame``, ``gazed``, ``frame_index``, ``action_mask``) and
  the recurrent state under ``"gaze_state"``, runs the decoder call the policy's own
  ``generate`` would run at this step, and writes ``logits`` (B, N + 1) (divided by the
  temperature), ``policy_mask`` (B, N + 1) bool and the next recurrent state under
  ``("next", "gaze_state")``;
- ``ProbabilisticActor`` draws ``action`` from ``MaskedCategorical(logits, policy_mask)`` (mode
  under ``ExplorationType.DETERMINISTIC``: greedy) and records ``action_log_prob``;
- ``RecordAction`` appends the drawn action to the tokens the next decoder call writes.

The recurrent state is the policy's decode state as tensors (TorchRL keeps recurrent states in
the tensordict, like ``LSTMModule``): the KV cache ``kv_keys`` / ``kv_values`` (B, layers, S + 1,
heads, head_dim), ``visible`` (B, S + 1), ``length`` / ``num_attended`` (B,), the conv cache
``conv`` (B, depth, C, k - 1, h, w), the current decoder call's head outputs ``head_logits``
(B, K, N + 1) / ``head_loss`` (B, K), and the gazes not written to the cache yet, ``pending``
(B, K) / ``num_pending`` (B,). All zeros is the empty state, so a row is reset by zeroing it: at
an episode start (``frame_index == 0`` with no gaze yet, or ``is_init`` from ``InitTracker``),
and by the state's ``TensorDictPrimer`` on env resets. ``S = num_frames * (P +
max_gazes_per_frame)``. As for TorchRL's recurrent modules, the env needs that primer so that
rollouts carry the state from step to step: ``TransformedEnv(env, Compose(InitTracker(),
gaze_state_primer(policy, env)))``, or a collector built with
``auto_register_policy_transforms=True`` (it calls ``GazeStep.make_tensordict_primer``).
Note: ``TransformedEnv.reset`` keeps only spec keys of the reset tensordict, so the env's
``"video"`` / ``"clip_index"`` / ``"budgets"`` reset inputs do not reach a wrapped env.

Step semantics, identical to ``AutoGazePolicy.generate``: at the first gaze of a frame the
pending gazes of the previous frame are written (the end-of-frame flush) and the frame's vision
tokens are decoded (the prefill); head ``i`` of a decoder call gives the ``i``-th gaze after it,
masked by the env's ``action_mask`` (which holds the earlier heads' gazes) with STOP removed;
after ``K`` gazes the next decoder call writes them. STOP comes only from the task-loss stop rule
(``task_loss_requirement``): then ``policy_mask`` allows only STOP. Greedy actions equal
``generate(..., temperature=0)`` on the same clip and budgets (tested).

Cost: the state travels with every step of a rollout (collectors store it per step):
``2 * layers * (S + 1) * H`` floats per env and step (tiny preset at ratio 0.1: about 0.6 MB).
For training use the batched ``agents.rollout.rollout``; this actor serves TorchRL tooling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase, TensorDictSequential
from torchrl.data import Composite, Unbounded
from torchrl.envs import TensorDictPrimer
from torchrl.modules import MaskedCategorical, ProbabilisticActor

from agents.policy import AutoGazePolicy, DecodeCache, blank_canvas, preprocess

__all__ = [
    "STATE_KEY",
    "GazeStep",
    "RecordAction",
    "gaze_state_primer",
    "gaze_state_spec",
    "make_gaze_actor",
]

STATE_KEY = "gaze_state"
"""Root key of the recurrent state in the tensordict."""


@dataclass(frozen=True)
class _Dims:
    """Shapes of the recurrent state."""

    layers: int
    capacity: int  # S: KV cache slots
    heads: int
    head_dim: int
    depth: int
    channels: int
    past: int  # k - 1 frames of conv cache
    grid: int  # h = w of the encoder's token grid
    K: int
    V: int
    frame: int  # S: side of the frames the encoder sees
    keys: tuple[int, int, int] | None  # (N, S, d) of the pointer keys (pointer head only)
    canvas: bool  # the policy keeps its own canvas (canvas_input)


def _dims(policy: AutoGazePolicy, num_frames: int, max_gazes_per_frame: int) -> _Dims:
    c = policy.config
    return _Dims(
        layers=c.num_layers,
        capacity=num_frames * (c.tokens_per_frame + max_gazes_per_frame),
        heads=c.num_heads,
        head_dim=c.head_dim,
        depth=c.encoder_depth,
        channels=c.encoder_hidden_size,
        past=c.encoder_temporal_kernel - 1,
        grid=c.input_img_size // c.encoder_patch_size,
        K=c.num_multi_token_pred,
        V=c.vocab_size,
        frame=c.input_img_size,
        keys=(c.num_patches, policy.pointer.states, c.pointer_dim) if c.pointer_head else None,
        canvas=c.canvas_input,
    )


def _state_shapes(d: _Dims, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Per-row shape and dtype of every recurrent state entry."""
    kv = (d.layers, d.capacity + 1, d.heads, d.head_dim)
    shapes = {
        "kv_keys": (kv, dtype),
        "kv_values": (kv, dtype),
        "visible": ((d.capacity + 1,), torch.bool),
        "length": ((), torch.int64),
        "num_attended": ((), torch.int64),
        "conv": ((d.depth, d.channels, d.past, d.grid, d.grid), dtype),
        "head_logits": ((d.K, d.V), torch.float32),
        "head_loss": ((d.K,), torch.float32),
        "pending": ((d.K,), torch.int64),
        "num_pending": ((), torch.int64),
    }
    if d.keys is not None:
        shapes["patch_keys"] = (d.keys, dtype)
    if d.canvas:
        image = (3, d.frame, d.frame)
        shapes["canvas"] = (image, torch.float32)  # the canvas the current frame started from
        shapes["last_frame"] = (image, torch.float32)  # the current frame, preprocessed
        shapes["frame_gazed"] = ((d.V - 1,), torch.bool)  # the current frame's gazes so far
    return shapes


def gaze_state_spec(
    policy: AutoGazePolicy, num_frames: int, max_gazes_per_frame: int, batch_size: int | None = None
) -> Composite:
    """The recurrent state's spec under ``STATE_KEY``, batch [batch_size] (or one row when None)."""
    dtype = policy.gazing_model.gaze_decoder.lm_head.weight.dtype
    shapes = _state_shapes(_dims(policy, num_frames, max_gazes_per_frame), dtype)
    dev, lead = policy.device, () if batch_size is None else (batch_size,)
    inner = Composite(
        {k: Unbounded(shape=(*lead, *s), dtype=t, device=dev) for k, (s, t) in shapes.items()},
        shape=lead,
        device=dev,
    )
    return Composite({STATE_KEY: inner}, shape=lead, device=dev)


def gaze_state_primer(
    policy: AutoGazePolicy, env, max_gazes_per_frame: int | None = None
) -> TensorDictPrimer:
    """A ``TensorDictPrimer`` that puts an empty (all-zero) recurrent state into every reset row:
    append it (and ``InitTracker``) to the env, e.g. ``TransformedEnv(env, Compose(InitTracker(),
    gaze_state_primer(policy, env)))``, so that rollouts carry the state from step to step.
    Collectors built with ``auto_register_policy_transforms=True`` append both themselves."""
    num_frames, max_gazes = _env_sizes(env, max_gazes_per_frame)
    return TensorDictPrimer(gaze_state_spec(policy, num_frames, max_gazes, env.batch_size[0]), default_value=0,
                            expand_specs=False)


def _env_sizes(env, max_gazes_per_frame: int | None) -> tuple[int, int]:
    config = env.config
    return config.num_frames, max_gazes_per_frame if max_gazes_per_frame is not None else max(config.budgets)


class GazeStep(TensorDictModuleBase):
    """One step of the policy's cached decoding, from the observation and the recurrent state.

    Args:
        policy: the gaze model (eval mode is the caller's business; no gradients are taken).
        num_frames / max_gazes_per_frame: size the KV cache (frames per episode, largest budget).
        min_gazes_per_frame: STOP (from the stop rule) only after this many gazes in a frame.
        temperature: divides the logits (> 0; use ``ExplorationType.DETERMINISTIC`` for greedy).
        task_loss_requirement: stop a frame once the predicted loss is at or below it (None: never).
    """

    def __init__(
        self,
        policy: AutoGazePolicy,
        num_frames: int,
        max_gazes_per_frame: int,
        *,
        min_gazes_per_frame: int = 1,
        temperature: float = 1.0,
        task_loss_requirement: float | None = None,
    ) -> None:
        super().__init__()
        cfg = policy.config
        if cfg.official_decode_quirks or cfg.stop_per_head:
            raise ValueError(
                "the step actor decodes with correct positions and stops at the first stopping head; "
                "load the policy with official_decode_quirks=False and stop_per_head=False"
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature} (greedy: ExplorationType.DETERMINISTIC)")
        if not 1 <= max_gazes_per_frame <= cfg.num_patches:
            raise ValueError(f"max_gazes_per_frame must lie in [1, {cfg.num_patches}], got {max_gazes_per_frame}")
        self.policy = policy
        self.dims = _dims(policy, num_frames, max_gazes_per_frame)
        self.min_gazes_per_frame = max(1, min_gazes_per_frame)
        self.temperature = float(temperature)
        self.task_loss_requirement = task_loss_requirement
        state_keys = [(STATE_KEY, k) for k in _state_shapes(self.dims, torch.float32)]
        self.in_keys = ["frame", "gazed", "frame_index", "action_mask", *state_keys]
        self.out_keys = ["logits", "policy_mask", "loss_pred", *(("next", *k) for k in state_keys)]
        self.num_frames, self.max_gazes_per_frame = num_frames, max_gazes_per_frame

    def make_tensordict_primer(self) -> TensorDictPrimer:
        """The primer of the recurrent state (expanded to the env's batch size), found by TorchRL's
        ``get_primers_from_module`` and collectors with ``auto_register_policy_transforms``."""
        spec = gaze_state_spec(self.policy, self.num_frames, self.max_gazes_per_frame)
        return TensorDictPrimer(spec, default_value=0, expand_specs=True)

    def _read_state(self, td: TensorDictBase) -> dict[str, torch.Tensor]:
        """Fresh copies of the recurrent state (zeros where the tensordict has none): the tensors
        of earlier steps stay untouched, as rollouts keep them."""
        B = td.batch_size[0]
        dtype = self.policy.gazing_model.gaze_decoder.lm_head.weight.dtype
        state = td.get(STATE_KEY, None)
        out = {}
        for key, (shape, t) in _state_shapes(self.dims, dtype).items():
            value = None if state is None else state.get(key, None)
            if value is None:
                out[key] = torch.zeros((B, *shape), dtype=t, device=self.policy.device)
            elif tuple(value.shape[1:]) != shape:
                raise ValueError(f"recurrent state {key!r} has shape {tuple(value.shape)}, expected (B, *{shape}): "
                                 "was it made for another policy, clip length or budget?")
            else:
                out[key] = value.clone()
        return out

    @torch.no_grad()
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        policy, d = self.policy, self.dims
        K, STOP, P = d.K, d.V - 1, policy.config.tokens_per_frame
        B = tensordict.batch_size[0]
        dev = policy.device
        s = self._read_state(tensordict)
        gazed = tensordict["gazed"].to(dev)  # (B, N)
        env_mask = tensordict["action_mask"].to(dev)  # (B, N + 1)
        frame_index = tensordict["frame_index"].to(dev).reshape(B)
        live = env_mask.any(-1)  # ended episodes have no valid action
        frame_start = live & ~gazed.any(-1)
        reset = frame_start & (frame_index == 0)
        is_init = tensordict.get("is_init", None)
        if is_init is not None:
            reset |= is_init.to(dev).reshape(B)
        for value in s.values():
            value[reset] = 0

        cache = DecodeCache(
            keys=[s["kv_keys"][:, i] for i in range(d.layers)],
            values=[s["kv_values"][:, i] for i in range(d.layers)],
            visible=s["visible"],
            length=s["length"],
            num_attended=s["num_attended"],
            conv_cache=None,
            frames_seen=0,
        )
        heads = torch.arange(K, device=dev)
        embed = policy.gazing_model.gaze_decoder.model.embed_tokens
        # write the pending gazes: a full decoding step mid-frame (its output gives the next K
        # heads), or the previous frame's last step at a frame start (the end-of-frame flush)
        num_pending = s["num_pending"]
        rows = (live & (num_pending > 0) & (frame_start | (num_pending == K))).nonzero()[:, 0]
        if rows.numel():
            pending = s["pending"][rows]
            write = heads < num_pending[rows, None]  # (R, K)
            keep = write & (pending != STOP)
            positions = cache.num_attended[rows, None] + keep.long().cumsum(1) - 1
            self._check_capacity(cache, rows, K)
            out = policy._decoder_call(cache, rows, embed(pending), write, keep, keep, positions)  # (R, K, H)
            cont = ~frame_start[rows]
            if bool(cont.any()):
                keys = s["patch_keys"][rows[cont]] if d.keys is not None else None
                logits, loss, _ = policy._heads(out[cont, K - 1], keys, gazed[rows[cont]])
                s["head_logits"][rows[cont]] = logits
                s["head_loss"][rows[cont]] = loss
            num_pending[rows] = 0
        # prefill: the new frame's vision tokens, through the conv cache
        rows = frame_start.nonzero()[:, 0]
        if rows.numel():
            frames = policy.frames(preprocess(tensordict["frame"].to(dev)[rows])[:, None])  # (R, 1, 3, S, S)
            canvas = None
            if d.canvas:  # the canvas this frame starts from: the last frame's paste over its own start
                grid = policy.config.grid
                pasted = grid.paste(s["canvas"][rows], grid.views(s["last_frame"][rows]), s["frame_gazed"][rows])
                first = (frame_index[rows] == 0)[:, None, None, None]
                canvas = torch.where(first, blank_canvas(rows.numel(), d.frame, dev), pasted)
                s["canvas"][rows], s["last_frame"][rows], s["frame_gazed"][rows] = canvas, frames[:, 0].float(), False
                canvas = canvas[:, None]
            conv = [s["conv"][rows, i] for i in range(d.depth)]
            tokens, new_conv = policy.encode(frames.to(s["conv"].dtype), conv, canvas)
            for i, c in enumerate(new_conv):
                s["conv"][rows, i] = c
            ones = torch.ones(rows.numel(), P, dtype=torch.bool, device=dev)
            positions = cache.num_attended[rows, None] + torch.arange(P, device=dev)
            self._check_capacity(cache, rows, P)
            hidden = policy._decoder_call(cache, rows, tokens[:, 0], ones, ones, ones, positions)  # (R, P, H)
            keys = None
            if d.keys is not None:
                keys = s["patch_keys"][rows] = policy.pointer.patch_keys(hidden, tokens[:, 0])
            logits, loss, _ = policy._heads(hidden[:, -1], keys, gazed[rows])  # a frame start: none yet
            s["head_logits"][rows] = logits
            s["head_loss"][rows] = loss

        b = torch.arange(B, device=dev)
        head = num_pending.clamp(max=K - 1)
        logits = s["head_logits"][b, head]  # (B, V)
        loss = s["head_loss"][b, head]  # (B,)
        allowed = env_mask.clone()
        allowed[:, STOP] = False
        if self.task_loss_requirement is not None:
            stop = live & (gazed.sum(-1) >= self.min_gazes_per_frame) & (loss <= self.task_loss_requirement)
            allowed[stop] = False
            allowed[stop, STOP] = True
        allowed[~allowed.any(-1), STOP] = True  # ended episodes: the env ignores their action
        tensordict.set("logits", logits / self.temperature)
        tensordict.set("policy_mask", allowed)
        tensordict.set("loss_pred", loss)
        tensordict.set(("next", STATE_KEY), TensorDict(s, batch_size=[B], device=dev))
        return tensordict

    @staticmethod
    def _check_capacity(cache: DecodeCache, rows: torch.Tensor, new: int) -> None:
        if int(cache.length[rows].max()) + new > cache.capacity:
            raise ValueError(
                f"the actor's KV cache ({cache.capacity} slots) is full: an episode has more frames or gazes "
                "than num_frames / max_gazes_per_frame allow"
            )


class RecordAction(TensorDictModuleBase):
    """Appends the drawn ``action`` to the gazes the next decoder call writes (and, with
    ``track_gazes``, marks the gazed patch in the frame's ``frame_gazed``: the policy's canvas)."""

    def __init__(self, track_gazes: bool = False) -> None:
        super().__init__()
        self.track_gazes = track_gazes
        state = ["pending", "num_pending", *(["frame_gazed"] if track_gazes else [])]
        self.in_keys = ["action", *(("next", STATE_KEY, k) for k in state)]
        self.out_keys = [("next", STATE_KEY, k) for k in state]

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        pending = tensordict.get(("next", STATE_KEY, "pending")).clone()
        count = tensordict.get(("next", STATE_KEY, "num_pending"))
        action = tensordict.get("action").to(pending.device).reshape(count.shape)
        b = torch.arange(count.shape[0], device=count.device)
        pending[b, count.clamp(max=pending.shape[1] - 1)] = action
        tensordict.set(("next", STATE_KEY, "pending"), pending)
        tensordict.set(("next", STATE_KEY, "num_pending"), count + 1)
        if self.track_gazes:  # STOP (= N) and the ignored actions of ended episodes mark nothing
            gazed = tensordict.get(("next", STATE_KEY, "frame_gazed"))
            N = gazed.shape[1]
            marked = F.pad(gazed, (0, 1)).scatter(1, action.clamp(0, N)[:, None], True)[:, :N]
            tensordict.set(("next", STATE_KEY, "frame_gazed"), marked)
        return tensordict


def make_gaze_actor(
    policy: AutoGazePolicy,
    env=None,
    *,
    num_frames: int | None = None,
    max_gazes_per_frame: int | None = None,
    min_gazes_per_frame: int | None = None,
    temperature: float = 1.0,
    task_loss_requirement: float | None = None,
) -> TensorDictSequential:
    """The policy as a TorchRL actor (see the module docstring).

    Args:
        env: an ``AutoGazeTorchEnv`` (or anything with its ``config``): frames, largest budget and
            minimum gazes per frame default to its config's.
        num_frames / max_gazes_per_frame / min_gazes_per_frame: override them (needed without env).
        temperature / task_loss_requirement: as ``AutoGazePolicy.generate``.

    Output keys: ``action`` (B,) int64, ``action_log_prob`` (B,), ``logits``, ``policy_mask``,
    ``loss_pred`` (B,) and the next recurrent state under ``("next", "gaze_state")``.
    """
    if env is not None:
        frames, gazes = _env_sizes(env, max_gazes_per_frame)
        num_frames = num_frames if num_frames is not None else frames
        max_gazes_per_frame = gazes
        if min_gazes_per_frame is None:
            min_gazes_per_frame = env.config.min_gazes_per_frame
    if num_frames is None or max_gazes_per_frame is None:
        raise ValueError("give env, or num_frames and max_gazes_per_frame")
    step = GazeStep(
        policy, num_frames, max_gazes_per_frame, min_gazes_per_frame=min_gazes_per_frame or 1,
        temperature=temperature, task_loss_requirement=task_loss_requirement,
    )
    actor = ProbabilisticActor(
        module=step,
        in_keys={"logits": "logits", "mask": "policy_mask"},
        out_keys=["action"],
        distribution_class=MaskedCategorical,
        return_log_prob=True,
    )
    return TensorDictSequential(actor, RecordAction(track_gazes=policy.config.canvas_input))
