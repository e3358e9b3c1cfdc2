"""Use a trained gazer on real video: any resolution, any length, whole clips or frame by frame.

::

    gazer = Gazer.from_pretrained("runs/bc/checkpoint")      # ours or an official AutoGaze folder
    result = gazer("video.mp4", gazing_ratio=0.75, task_loss_requirement=0.7)
    result.indices          # [frame][tile] -> gazed patch ids, in gaze order, no padding
    result.masks            # per scale: (T, rows, cols) bool over the whole frame
    result.token_mask(16, 224)   # (T, 196) bool: the tokens a downstream ViT keeps
    result.to_official()    # per clip: gazing_pos / if_padded_gazing / num_gazing_each_frame

    stream = gazer.stream(gazing_ratio=0.75, task_loss_requirement=0.7)
    for frame in frames:    # (3, H, W) uint8, one at a time
        stream(frame)       # the frame's gazes; stream.result() equals the whole-video call

Command line (``python -m agents.gazer --help``)::

    python -m agents.gazer VIDEO --checkpoint DIR --gazing-ratio 0.75 --task-loss-requirement 0.7 \\
        --out gazes.json --viz gazes.gif

How a video becomes model input
- Tiles: the model sees square frames of ``S = config.input_img_size`` pixels. A frame of any
  size ``H x W`` is cut into ``ceil(H / tile) x ceil(W / tile)`` tiles of ``tile_size`` pixels
  (default ``S``; others are resized to ``S``), row-major; the bottom / right border is padded
  with zeros (black for uint8 input), or, for a model with ``canvas_input``, with the mid-grey its
  canvas starts from (so that it spends no gaze on padding). Every tile is a clip of its own (a batch row); gazes are
  mapped back onto the original frame, and gazes whose patch lies only in the padding are dropped
  from the indices and masks (the official form keeps the model's raw output).
- Clips: the video is cut into clips of ``T = config.max_num_frames`` frames, each gazed from a
  fresh state (the last clip may be shorter: the model is frame-causal).
- Input: a video path (decoded with decord at native resolution), a uint8 tensor ``(T, 3, H, W)``
  or ``(B, T, 3, H, W)`` (a ``VideoSource``'s ``clip(i)`` / ``clips(...)`` is one), or an
  already preprocessed float tensor with ``preprocessed=True`` (see ``agents.policy.preprocess``;
  official checkpoints resize it to their input size themselves).

Generation is greedy. :class:`StaticGenerator` is the engine: the policy's own cached decoding
(``AutoGazePolicy.generate``) rewritten with fixed tensor shapes and no host synchronisation
inside a frame, so that on CUDA its two steps (a frame's prefill and one decode step) are
captured as CUDA graphs once (per frame of a clip) and replayed. It gives the gazes
``generate`` gives (tests hold them equal); ``engine="reference"`` runs ``generate`` itself.
Built with ``sample=True`` it samples instead (RL rollouts, ``agents.rollout.RolloutEngine``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from agents.policy import (
    CONFIG_FORMAT,
    AutoGazePolicy,
    Gazes,
    KVWrite,
    PolicyConfig,
    _atomic_write,
    blank_canvas,
    preprocess,
)
from gaze_env.patches import PatchGrid
from gaze_env.render import gaze_overlay
from gaze_env.video import _decode, _open_reader, frames_to_rgb, resize_frames

__all__ = ["GazeResult", "GazeStream", "Gazer", "StaticGenerator", "TileLayout", "main", "read_video"]

RESULT_FORMAT = "autogaze-gym/gazes-v1"
Engine = Literal["static", "reference"]


# ---------------------------------------------------------------------------------------------
# video at native resolution
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _VideoFile:
    """Frames ``start, start + stride, ...`` (at most ``max_frames``) of a video file, read lazily."""

    path: Path
    num_frames: int
    height: int
    width: int
    fps: float
    start: int
    stride: int

    @classmethod
    def open(cls, path: str | os.PathLike[str], start: int, stride: int, max_frames: int | None) -> _VideoFile:
        if start < 0 or stride < 1 or (max_frames is not None and max_frames < 1):
            raise ValueError(f"need start >= 0, stride >= 1, max_frames >= 1; got {start}, {stride}, {max_frames}")
        path, reader = _open_reader(path)
        available = len(range(start, len(reader), stride))
        if available == 0:
            raise ValueError(f"{path}: start frame {start} is past the end; the video has {len(reader)} frames")
        first = _decode(path, reader, np.array([start]))
        count = available if max_frames is None else min(available, max_frames)
        return cls(path, count, first.shape[1], first.shape[2], float(reader.get_avg_fps()), start, stride)

    def frames(self, first: int, count: int) -> Tensor:
        """uint8 ``(count, 3, H, W)``: frames ``first .. first + count - 1`` of this selection."""
        path, reader = _open_reader(self.path)
        index = self.start + self.stride * np.arange(first, first + count, dtype=np.int64)
        return frames_to_rgb(_decode(path, reader, index))


def read_video(
    path: str | os.PathLike[str], *, start: int = 0, stride: int = 1, max_frames: int | None = None
) -> Tensor:
    """Frames ``start, start + stride, ...`` (at most ``max_frames``) of a video at native
    resolution: uint8 ``(T, 3, H, W)`` RGB (``gaze_env.video.load_clip`` makes square clips)."""
    video = _VideoFile.open(path, start, stride, max_frames)
    return video.frames(0, video.num_frames)


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------
class StaticGenerator:
    """Greedy generation for a fixed batch of clips with fixed tensor shapes.

    The frame loop of ``AutoGazePolicy.generate`` (temperature 0) with every clip in every
    decoder call: a clip that finished its frame writes its tokens to the cache's trash slot and
    its outputs are ignored, so no call depends on which clips are still going and nothing waits
    for the device. Decode steps past the end of a frame change nothing, so without a
    task-loss requirement the number of steps of a frame, ``ceil(budget / K)``, is known in
    advance; with one, the device says after every step whether a clip goes on (one sync).
    A frame is two replayable functions over preallocated buffers: ``prefill`` (the frame's
    vision tokens) and ``step`` (choose K gazes per clip, write them, predict the next ones).

    ``sample=True`` samples at a temperature instead of taking the argmax, from the distribution
    ``generate(temperature=...)`` samples from (the masked logits over the temperature, heads in
    order, each head's pick masked from the later ones), by the Gumbel-max trick: before every
    step the host draws ``E ~ Exp(1)`` per clip, head and id into a buffer from the caller's
    ``torch.Generator``, and the step picks ``argmax(scores / temperature - log E)``, so the
    graphs hold no random-number state. ``log_prob`` is the pick's log-probability under that
    distribution, as ``AutoGazePolicy.score`` at the same temperature gives it back. The draws
    differ from ``generate``'s (it calls ``torch.multinomial``): equal in distribution, not
    sample by sample.
    With ``cuda_graph=True`` both are captured as CUDA graphs once per frame of a clip (attention
    then reads, masked, every cache slot that frame may have filled, instead of exactly those
    filled so far) and replayed; ``compile=True`` first passes them through ``torch.compile``.

    Same outputs as ``generate``: ``ids`` / ``emitted`` equal; ``log_prob``, ``loss_pred`` and
    ``value`` up to floating-point noise (batch shapes differ); ``logits`` are not returned.
    The state carries over between :meth:`generate` calls (streaming) until :meth:`reset`.
    """

    def __init__(
        self,
        policy: AutoGazePolicy,
        batch_size: int,
        max_gazes_per_frame: int,
        *,
        max_frames: int | None = None,
        min_gazes_per_frame: int = 1,
        cuda_graph: bool = False,
        compile: bool = False,
        sample: bool = False,
    ) -> None:
        cfg = policy.config
        N, K, V, P = cfg.num_patches, cfg.num_multi_token_pred, cfg.vocab_size, cfg.tokens_per_frame
        if not 1 <= max_gazes_per_frame <= N:
            raise ValueError(f"max_gazes_per_frame must lie in [1, {N}], got {max_gazes_per_frame}")
        if batch_size < 1 or min_gazes_per_frame < 0:
            raise ValueError(
                f"need batch_size >= 1 and min_gazes_per_frame >= 0, got {batch_size}, {min_gazes_per_frame}"
            )
        self.policy = policy
        self.batch_size, self.max_gazes = batch_size, max_gazes_per_frame
        self.max_frames = cfg.max_num_frames if max_frames is None else max_frames
        self.min_gazes_per_frame = min_gazes_per_frame
        B, G, dev = batch_size, max_gazes_per_frame, policy.device
        # a multiple of 16 keys keeps the attention mask aligned for the fused CUDA kernels
        self.state = policy._allocate_state(B, -(-self.max_frames * (P + G) // 16) * 16)
        dtype = self.state.keys[0].dtype
        # per-frame inputs and outputs; column G of the slot buffers is a trash column
        self.vision = torch.zeros(B, P, cfg.hidden_size, dtype=dtype, device=dev)
        self.budget = torch.zeros(B, dtype=torch.int64, device=dev)
        self.threshold = torch.full((B,), float("-inf"), device=dev)
        self.ids = torch.full((B, G + 1), N, dtype=torch.int64, device=dev)
        self.emitted = torch.zeros(B, G + 1, dtype=torch.bool, device=dev)
        self.log_prob = torch.zeros(B, G + 1, device=dev)
        self.loss_pred = torch.zeros(B, G + 1, device=dev)
        self.value = torch.zeros(B, G + 1, device=dev) if policy.value_head is not None else None
        # the frame's pointer keys (pointer head only), written by the prefill
        self.keys = None
        if policy.pointer is not None:
            self.keys = torch.zeros(B, N, policy.pointer.states, cfg.pointer_dim, dtype=dtype, device=dev)
        # decoding state inside a frame
        self.used = torch.zeros(B, V, dtype=torch.bool, device=dev)
        self.done = torch.zeros(B, dtype=torch.int64, device=dev)
        self.active = torch.zeros(B, dtype=torch.bool, device=dev)
        self.logits = torch.zeros(B, K, V, device=dev)
        self.loss = torch.zeros(B, K, device=dev)
        self.val = torch.zeros(B, K, device=dev) if policy.value_head is not None else None
        self.stale_base = torch.zeros(B, dtype=torch.int64, device=dev)
        self.decode = torch.zeros((), dtype=torch.bool, device=dev)
        self.heads = torch.arange(K, device=dev)
        self.vision_offsets = torch.arange(P, device=dev)
        self.key_index = torch.arange(self.state.capacity, device=dev)
        self.all_vision = torch.ones(B, P, dtype=torch.bool, device=dev)
        # sampling: the temperature (a buffer, so that graphs replay at any) and the Exp(1) draws of
        # the next step; ones give Gumbel noise 0 (what the capture's warm-up runs on)
        self.sample = sample
        self.temperature = torch.ones((), device=dev)
        self.noise = torch.ones(B, K, V, device=dev) if sample else None
        self._tokens_only = False  # the clip started from given vision tokens: no conv cache kept
        self._num_keys = self.state.capacity
        self._length_bound = 0  # host-side upper bound of every clip's cache length
        fns = {"prefill": self._prefill, "step": self._step}
        self._fns = {k: torch.compile(f) for k, f in fns.items()} if compile else fns
        self._graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] | None = None
        if cuda_graph:
            if dev.type != "cuda":
                raise ValueError(f"cuda_graph=True needs a CUDA model, the policy is on {dev}")
            self._capture()
        self.reset()

    # ---- public ----------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new clip (stale cache slots are never attended: ``visible`` is cleared)."""
        st = self.state
        st.visible.zero_()
        st.length.zero_()
        st.num_attended.zero_()
        st.conv_cache = None
        st.canvas = None
        st.frames_seen = 0
        self._length_bound = 0
        self._tokens_only = False

    @torch.no_grad()
    def generate(
        self,
        video: Tensor | None,
        budgets: Tensor,
        thresholds: Tensor | None = None,
        *,
        tokens: Tensor | None = None,
        temperature: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Gazes:
        """Continue the clips with T more frames.

        Args:
            video: (B, T, 3, S, S) float, preprocessed; None when ``tokens`` are given.
            budgets: (B, T) int64 gaze budgets in [1, max_gazes_per_frame].
            thresholds: (B, T) float task-loss requirements, or None (no early stop).
            tokens: (B, T, P, H) the clips' vision tokens (``AutoGazePolicy.encode``) instead of
                ``video``, e.g. one encoding shared by several rollouts of a clip; only at the start
                of a clip (no conv cache is kept to stream on from), and not for a policy with
                ``canvas_input`` (each frame's tokens depend on the gazes of the frame before:
                frames are encoded one by one, outside the graphs).
            temperature, generator: sampling (``sample=True`` only): temperature > 0 and the
                ``torch.Generator`` (on the model's device) the draws come from.
        """
        cfg, st = self.policy.config, self.state
        K, P = cfg.num_multi_token_pred, cfg.tokens_per_frame
        if (video is None) == (tokens is None):
            raise ValueError("give video or its vision tokens, not both or neither")
        if tokens is not None and cfg.canvas_input:
            raise ValueError("a canvas_input policy encodes every frame with its own canvas: give video, not tokens")
        if tokens is not None and st.frames_seen:
            raise ValueError("vision tokens start a clip: call reset() first")
        if video is not None and self._tokens_only:
            raise ValueError("this clip started from vision tokens and has no conv cache to continue: reset() first")
        if self.sample:
            if temperature is None or temperature <= 0 or generator is None:
                raise ValueError(
                    f"a sampling generator needs temperature > 0 and a torch.Generator, got {temperature}, {generator}"
                )
            self.temperature.fill_(temperature)
        elif temperature or generator is not None:
            raise ValueError("this generator is greedy: build it with sample=True to sample")
        B, T = (video if tokens is None else tokens).shape[:2]
        if B != self.batch_size or tuple(budgets.shape) != (B, T):
            shape = tuple((video if tokens is None else tokens).shape)
            raise ValueError(
                f"this generator runs {self.batch_size} clips; got {'video' if tokens is None else 'tokens'} "
                f"{shape}, budgets {tuple(budgets.shape)}"
            )
        if thresholds is not None and tuple(thresholds.shape) != (B, T):
            raise ValueError(f"thresholds must be ({B}, {T}), got {tuple(thresholds.shape)}")
        if st.frames_seen + T > self.max_frames:
            raise ValueError(
                f"the generator holds {self.max_frames} frames and has seen {st.frames_seen}; {T} more do not fit "
                "(call reset() to start a new clip)"
            )
        low, high = budgets.aminmax()
        if int(low) < 1 or int(high) > self.max_gazes:
            raise ValueError(f"budgets must lie in [1, {self.max_gazes}], got {int(low)}..{int(high)}")
        if cfg.canvas_input:
            video = self.policy.frames(video)
            if st.canvas is None:
                st.canvas = blank_canvas(B, cfg.input_img_size, video.device)
        elif tokens is None:
            tokens, st.conv_cache = self.policy.encode(video, st.conv_cache)  # (B, T, P, H)
        else:
            self._tokens_only = True
        widths = budgets.amax(0).tolist()
        frames = []
        for t in range(T):
            if cfg.canvas_input:
                frame_tokens, st.conv_cache = self.policy.encode(video[:, t : t + 1], st.conv_cache, st.canvas[:, None])
                self.vision.copy_(frame_tokens[:, 0])
            else:
                self.vision.copy_(tokens[:, t])
            self.budget.copy_(budgets[:, t])
            if thresholds is None:
                self.threshold.fill_(float("-inf"))
            else:
                self.threshold.copy_(thresholds[:, t])
            self._length_bound += P + widths[t]
            self._num_keys = min(self._length_bound, st.capacity)
            slot = st.frames_seen + t
            self._run("prefill", slot)
            steps = math.ceil(widths[t] / K)
            for i in range(steps):
                if self.noise is not None:
                    # clamped away from 0: -log E stays finite, masked ids stay -inf
                    self.noise.exponential_(generator=generator).clamp_min_(torch.finfo(self.noise.dtype).tiny)
                self._run("step", slot)
                if thresholds is not None and i + 1 < steps and not bool(self.decode):
                    break
            w = widths[t]
            gazes = Gazes(
                ids=self.ids[:, None, :w].clone(),
                emitted=self.emitted[:, None, :w].clone(),
                log_prob=self.log_prob[:, None, :w].clone(),
                loss_pred=self.loss_pred[:, None, :w].clone(),
                value=None if self.value is None else self.value[:, None, :w].clone(),
                logits=None,
                num_patches=cfg.num_patches,
            )
            if cfg.canvas_input:
                st.canvas = cfg.grid.paste(st.canvas, cfg.grid.views(video[:, t].float()), gazes.gazed_patches()[:, 0])
            frames.append(gazes)
        st.frames_seen += T
        return Gazes.cat(frames)

    # ---- the two replayable functions ----------------------------------------------------------
    def _run(self, name: str, frame: int) -> None:
        if self._graphs is None:
            self._fns[name]()
        else:
            self._graphs[name, frame].replay()

    def _frame_keys(self, frame: int) -> int:
        """Cache slots frame ``frame`` of a clip may read: those of the frames up to it."""
        P = self.policy.config.tokens_per_frame
        return min(self.state.capacity, -(-(frame + 1) * (P + self.max_gazes) // 16) * 16)

    def _capture(self) -> None:
        """Capture both functions once per frame of a clip (attention reads the slots that frame
        may have filled), each after a warm-up on a side stream, as CUDA graph capture requires."""
        dev = self.policy.device
        graphs = {}
        # One memory pool for all graphs: they never run concurrently and keep nothing in it
        # between replays (every result is copied into the buffers allocated above).
        pool = torch.cuda.graph_pool_handle()
        with torch.no_grad():
            for frame in range(self.max_frames):
                self._num_keys = self._frame_keys(frame)
                side = torch.cuda.Stream(dev)
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self.reset()
                        for fn in self._fns.values():
                            fn()
                torch.cuda.current_stream(dev).wait_stream(side)
                self.reset()
                for name, fn in self._fns.items():
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        fn()
                    graphs[name, frame] = graph
        self._graphs = graphs

    def _call(self, embeds: Tensor, write: Tensor, see: Tensor, keep: Tensor, positions: Tensor) -> Tensor:
        """``AutoGazePolicy._decoder_call`` for every clip, reading ``_num_keys`` cache slots."""
        st = self.state
        slot = st.length[:, None] + write.long().cumsum(1) - 1  # (B, Q) own slot (padding: the previous one)
        write_index = torch.where(write, slot, st.capacity)
        st.visible.scatter_(1, write_index, see & write)
        n = self._num_keys
        causal = self.key_index[:n] <= slot[..., None]  # (B, Q, n)
        mask = (st.visible[:, None, :n] & causal)[:, None]  # (B, 1, Q, n)
        cache = KVWrite(st.keys, st.values, None, write_index, n)
        hidden = self.policy.gazing_model.gaze_decoder.model(embeds, positions, mask, cache)
        st.visible.scatter_(1, write_index, keep & write)
        st.length.add_(write.sum(1))
        st.num_attended.add_((keep & write).sum(1))
        return hidden

    def _store_heads(self, hidden: Tensor) -> None:
        logits, loss, val = self.policy._heads(hidden, self.keys, self.used)
        self.logits.copy_(logits)
        self.loss.copy_(loss)
        if self.val is not None:
            self.val.copy_(val)

    def _prefill(self) -> None:
        """Reset the frame's buffers and feed its vision tokens."""
        st, K, STOP = self.state, self.policy.config.num_multi_token_pred, self.policy.config.stop_id
        self.ids.fill_(STOP)
        self.emitted.zero_()
        self.log_prob.zero_()
        self.loss_pred.zero_()
        if self.value is not None:
            self.value.zero_()
        self.used.zero_()
        self.used[:, STOP] = True
        self.done.zero_()
        self.active.fill_(True)
        positions = st.num_attended[:, None] + self.vision_offsets
        everything = self.all_vision
        hidden = self._call(self.vision, everything, everything, everything, positions)
        if self.keys is not None:
            self.keys.copy_(self.policy.pointer.patch_keys(hidden, self.vision))
        self._store_heads(hidden[:, -1])
        self.stale_base.copy_(st.num_attended - K)  # official decode positions: the last K of the prefill

    def _sample(self, take: Tensor) -> tuple[Tensor, Tensor]:
        """``AutoGazePolicy._choose`` at ``self.temperature`` with the Gumbel-max trick: take (B, K)
        bool heads in use -> tokens (B, K) int64, log-probs (B, K) float32 (0 where not taken).

        Head ``i`` picks ``argmax(scores_i / temperature + g_i)``, ``g = -log E`` Gumbel noise,
        ``scores_i`` masked with the frame's gazes and the picks of heads ``< i``: a draw from
        ``softmax(scores_i / temperature)``. As in the greedy path, row ``i`` ends up masked with
        exactly what head ``i`` chose from, so one log-softmax after the loop gives every log-prob.
        """
        K = self.policy.config.num_multi_token_pred
        scores = self.logits.masked_fill(self.used[:, None, :], float("-inf")) / self.temperature  # (B, K, V)
        gumbel = -torch.log(self.noise)  # (B, K, V) finite: the draws are clamped above 0
        picks = []
        for i in range(K):
            tok = (scores[:, i] + gumbel[:, i]).argmax(-1)  # (B,)
            picks.append(tok)
            if i + 1 < K:
                scores[:, i + 1 :].scatter_(2, tok[:, None, None].expand(-1, K - i - 1, 1), float("-inf"))
        tokens = torch.stack(picks, 1)  # (B, K)
        logp = F.log_softmax(torch.where(take[..., None], scores, 0.0), dim=-1)
        return tokens, torch.where(take, logp.gather(-1, tokens[..., None])[..., 0], 0.0)

    def _step(self) -> None:
        """One decode step of ``AutoGazePolicy._gaze_frame`` with masks for the clips that are done."""
        cfg, st = self.policy.config, self.state
        K, STOP, G = cfg.num_multi_token_pred, cfg.stop_id, self.max_gazes
        heads = self.heads
        take = self.active[:, None] & (heads < (self.budget - self.done).clamp(max=K)[:, None])  # (B, K)
        if self.noise is None:
            tokens, logp = self.policy._choose(self.logits, self.used, take, 0.0, None)
        else:
            tokens, logp = self._sample(take)
        slot = self.done[:, None] + heads  # (B, K)
        stop = take & (slot >= self.min_gazes_per_frame) & (self.loss <= self.threshold[:, None])
        emit = take if cfg.stop_per_head else take & (stop.long().cumsum(1) - stop.long() == 0)
        stop = stop & emit
        step_ids = torch.where(stop, STOP, tokens)
        column = torch.where(emit, slot, G)  # not emitted: the trash column
        self.ids.scatter_(1, column, step_ids)
        self.emitted.scatter_(1, column, emit)
        self.log_prob.scatter_(1, column, torch.where(stop, 0.0, logp))
        self.loss_pred.scatter_(1, column, F.pad(self.loss[:, 1:], (0, 1)))
        if self.value is not None:
            self.value.scatter_(1, column, self.val)
        keep = emit & ~stop
        self.used.scatter_(1, torch.where(keep, step_ids, STOP), True)  # STOP is used already
        self.done.add_(emit.sum(1))
        cont = self.active & ~stop.any(1) & (self.done < self.budget)  # (B,)
        decode = cont.any()
        correct = st.num_attended[:, None] + keep.long().cumsum(1) - 1
        if cfg.official_decode_quirks:
            positions = torch.where(decode, self.stale_base[:, None] + heads, correct)
            see = torch.where(decode, emit, keep)
        else:
            positions, see = correct, keep
        embeds = self.policy.gazing_model.gaze_decoder.model.embed_tokens(step_ids)
        out = self._call(embeds, emit, see, keep, positions)
        self._store_heads(out[:, K - 1])
        last = emit[:, K - 1]  # the loss after a head-(K-1) slot is head 0's prediction at its row
        self.loss_pred.scatter_(1, torch.where(last, slot[:, K - 1], G)[:, None], self.loss[:, :1])
        self.active.copy_(cont)
        self.decode.copy_(decode)


class _ReferenceRunner:
    """``AutoGazePolicy.generate`` behind the :class:`StaticGenerator` interface."""

    def __init__(self, policy: AutoGazePolicy, batch_size: int, max_gazes_per_frame: int, max_frames: int) -> None:
        self.policy, self.batch_size = policy, batch_size
        self.max_gazes, self.max_frames = max_gazes_per_frame, max_frames
        self.reset()

    def reset(self) -> None:
        self.state = self.policy.new_state(
            self.batch_size, max_frames=self.max_frames, max_gazes_per_frame=self.max_gazes
        )

    def generate(self, video: Tensor, budgets: Tensor, thresholds: Tensor | None = None) -> Gazes:
        return self.policy.generate(video, frame_budgets=budgets, task_loss_requirement=thresholds, state=self.state)


# ---------------------------------------------------------------------------------------------
# tiles
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileLayout:
    """How an ``H x W`` frame is cut into square tiles of ``tile_size`` pixels, and where the
    patches of the gaze vocabulary ``grid`` of every tile fall on the frame.

    Tile ``(ty, tx)`` (index ``ty * cols + tx``) covers pixels ``[ty * tile, (ty + 1) * tile)``
    x ``[tx * tile, ...)``; the part past the frame is padding. At scale ``i`` a tile has
    ``g_i x g_i`` patches (``g_i = scale_i / patch_size``) of ``tile / g_i`` pixels, so the frame
    is a ``(rows * g_i) x (cols * g_i)`` grid of cells of which the first
    ``ceil(H * g_i / tile) x ceil(W * g_i / tile)`` touch the frame (:meth:`cells`).
    """

    height: int
    width: int
    tile_size: int
    grid: PatchGrid

    def __post_init__(self) -> None:
        if min(self.height, self.width, self.tile_size) < 1:
            raise ValueError(f"frame and tile sizes must be positive, got {self.height}x{self.width}, {self.tile_size}")

    @property
    def rows(self) -> int:
        return -(-self.height // self.tile_size)

    @property
    def cols(self) -> int:
        return -(-self.width // self.tile_size)

    @property
    def num_tiles(self) -> int:
        return self.rows * self.cols

    @property
    def origins(self) -> list[tuple[int, int]]:
        """Top-left pixel ``(y, x)`` of every tile."""
        ts = self.tile_size
        return [(ty * ts, tx * ts) for ty in range(self.rows) for tx in range(self.cols)]

    def cells(self, scale: int) -> tuple[int, int]:
        """Rows and columns of scale ``scale``'s cells that touch the frame."""
        g = self.grid.grid_sizes[scale]
        return -(-self.height * g // self.tile_size), -(-self.width * g // self.tile_size)

    def split(self, video: Tensor, fill: Tensor | None = None) -> Tensor:
        """(..., C, H, W) -> (..., num_tiles, C, tile, tile), padded with zeros or with ``fill``
        (C,) (a value per channel)."""
        H, W, ts = self.height, self.width, self.tile_size
        if tuple(video.shape[-2:]) != (H, W):
            raise ValueError(f"frames must be {H}x{W} for this layout, got {tuple(video.shape[-2:])}")
        x = F.pad(video, (0, self.cols * ts - W, 0, self.rows * ts - H))
        if fill is not None and (x.shape[-2] > H or x.shape[-1] > W):
            inside = torch.zeros(x.shape[-2:], dtype=torch.bool, device=x.device)
            inside[:H, :W] = True
            x = torch.where(inside, x, fill.to(x.device, x.dtype).view(-1, 1, 1))
        x = x.unflatten(-2, (self.rows, ts)).unflatten(-1, (self.cols, ts))  # (..., C, nh, ts, nw, ts)
        n = x.dim()
        x = x.permute(*range(n - 5), n - 4, n - 2, n - 5, n - 3, n - 1)  # (..., nh, nw, C, ts, ts)
        return x.flatten(-5, -4)

    @cached_property
    def cell_table(self) -> Tensor:
        """(num_tiles, N, 3) int64: scale, frame-grid row and column of every tile's patches."""
        table = self.grid.table  # (N, 3) scale, row, col inside the tile
        side = torch.tensor(self.grid.grid_sizes)[table[:, 0]]  # (N,)
        ty = torch.arange(self.rows).repeat_interleave(self.cols)[:, None]  # (nT, 1)
        tx = torch.arange(self.cols).repeat(self.rows)[:, None]
        return torch.stack(
            [table[:, 0].expand(self.num_tiles, -1), ty * side + table[:, 1], tx * side + table[:, 2]], dim=-1
        )

    @cached_property
    def in_frame(self) -> Tensor:
        """(num_tiles, N) bool: the patch covers some pixel of the frame (not only padding)."""
        scale, row, col = self.cell_table.unbind(-1)
        cells = torch.tensor([self.cells(k) for k in range(self.grid.num_scales)])  # (k, 2)
        return (row < cells[scale, 0]) & (col < cells[scale, 1])

    def overlap(self, scale: int, rows: int, cols: int) -> tuple[Tensor, Tensor]:
        """Which cells of a ``rows x cols`` grid stretched over the frame each cell of ``scale``
        overlaps with positive area: (cell rows, rows) and (cell cols, cols) bool. Exact in integers:
        cell r spans ``[r * tile / g, (r + 1) * tile / g)`` pixels, target row a ``[a * H / rows, ...)``."""
        g, ts = self.grid.grid_sizes[scale], self.tile_size

        def one(n_cells: int, length: int, n_out: int) -> Tensor:
            r = torch.arange(n_cells)[:, None]
            a = torch.arange(n_out)[None, :]
            return (r * ts * n_out < (a + 1) * length * g) & (a * length * g < (r + 1) * ts * n_out)

        cell_rows, cell_cols = self.cells(scale)
        return one(cell_rows, self.height, rows), one(cell_cols, self.width, cols)


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass
class GazeResult:
    """The gazes of B videos (B = 1 unless a batch was given) of T frames.

    ``chunks`` holds the model's own output, one :class:`Gazes` per clip of at most ``clip_len``
    frames, with ``B * num_tiles`` rows (video-major, tiles row-major: the official
    ``(b nh nw)`` batch layout). Everything else is derived from it. Accessors drop the video
    dimension when the input was a single video (``batched`` False).

    Rules:
    - a gaze is *kept* when it is a real gaze (not STOP / padding) and its patch covers some
      pixel of the frame; ``indices``, ``masks``, ``pixel_masks``, ``token_mask`` and the target
      grid use kept gazes only, ``to_official`` the raw output;
    - :meth:`token_mask` and :meth:`target_masks` select a cell of another grid (stretched over the
      whole frame) when a kept gaze's patch overlaps it with positive area.
    """

    chunks: list[Gazes]
    layout: TileLayout
    batch_size: int
    batched: bool
    clip_len: int
    settings: dict[str, Any] = field(default_factory=dict)
    target_scales: tuple[int, ...] | None = None
    target_patch_size: int | None = None

    # ---- sizes ---------------------------------------------------------------------------------
    @property
    def grid(self) -> PatchGrid:
        return self.layout.grid

    @property
    def num_frames(self) -> int:
        return sum(c.ids.shape[1] for c in self.chunks)

    @property
    def frame_size(self) -> tuple[int, int]:
        return self.layout.height, self.layout.width

    def _out(self, x: Any) -> Any:
        return x if self.batched else x[0]

    # ---- dense views ---------------------------------------------------------------------------
    @cached_property
    def _dense(self) -> tuple[Tensor, Tensor]:
        """ids (B, T, num_tiles, G) int64 per-tile patch ids (N at STOP / padding) and kept (same) bool."""
        B, nT, N = self.batch_size, self.layout.num_tiles, self.grid.num_patches
        G = max(c.ids.shape[2] for c in self.chunks)
        ids, kept = [], []
        for c in self.chunks:
            T = c.ids.shape[1]
            pad = (0, G - c.ids.shape[2])
            ids.append(F.pad(c.ids, pad, value=N).view(B, nT, T, G).transpose(1, 2))
            kept.append(F.pad(c.is_gaze, pad, value=False).view(B, nT, T, G).transpose(1, 2))
        ids_t, kept_t = torch.cat(ids, 1).cpu(), torch.cat(kept, 1).cpu()
        tile = torch.arange(nT)[None, None, :, None].expand_as(ids_t)
        kept_t &= self.layout.in_frame[tile, ids_t.clamp(max=N - 1)]
        return ids_t, kept_t

    @property
    def indices(self) -> list:
        """Kept gazes, ragged: ``[video][frame][tile] -> [patch id, ...]`` in gaze order (per-tile
        ids of the model vocabulary, scale-major, row-major); ``[frame][tile]`` for one video."""
        ids, kept = self._dense
        out = [
            [
                [[i for i, k in zip(slot_ids, slot_kept, strict=True) if k] for slot_ids, slot_kept in zip(fi, fk)]
                for fi, fk in zip(vi, vk)
            ]
            for vi, vk in zip(ids.tolist(), kept.tolist())
        ]
        return self._out(out)

    @property
    def num_gazes(self) -> Tensor:
        """(B?, T) int64 kept gazes per frame (all tiles)."""
        return self._out(self._dense[1].sum((-1, -2)))

    @cached_property
    def _masks(self) -> list[Tensor]:
        ids, kept = self._dense
        B, T, nT, G = ids.shape
        N = self.grid.num_patches
        tile = torch.arange(nT)[None, None, :, None]
        info = self.layout.cell_table[tile.expand_as(ids), ids.clamp(max=N - 1)]  # (B, T, nT, G, 3)
        out = []
        for k in range(self.grid.num_scales):
            rows, cols = self.layout.cells(k)
            sel = kept & (info[..., 0] == k)
            flat = torch.where(sel, info[..., 1] * cols + info[..., 2], rows * cols).view(B, T, nT * G)
            grid = torch.zeros(B, T, rows * cols + 1, dtype=torch.bool).scatter_(-1, flat, True)
            out.append(grid[..., :-1].view(B, T, rows, cols))
        return out

    @property
    def masks(self) -> list[Tensor]:
        """Per scale ``i``: (B?, T, rows_i, cols_i) bool over the whole frame, cell ``(r, c)``
        covering pixels ``[r * tile / g_i, (r + 1) * tile / g_i) x [c * tile / g_i, ...)``
        (clipped to the frame); see :meth:`TileLayout.cells`."""
        return [self._out(m) for m in self._masks]

    def pixel_masks(self, frames: int | slice | None = None) -> Tensor:
        """(B?, T', num_scales, H, W) bool: the pixels each scale's kept gazes cover, for the
        frames selected by ``frames`` (an index keeps a length-1 frame dimension)."""
        sel = slice(None) if frames is None else (slice(frames, frames + 1) if isinstance(frames, int) else frames)
        H, W, ts = self.layout.height, self.layout.width, self.layout.tile_size
        per_scale = []
        for k, mask in enumerate(self._masks):
            g = self.grid.grid_sizes[k]
            row_of = torch.arange(H) * g // ts
            col_of = torch.arange(W) * g // ts
            per_scale.append(mask[:, sel][:, :, row_of][:, :, :, col_of])
        return self._out(torch.stack(per_scale, 2))

    def _project(self, scale_masks: list[tuple[int, Tensor]], rows: int, cols: int) -> Tensor:
        """OR of the masks (B, T, cells) of the given scales projected onto a rows x cols grid."""
        B, T = self._masks[0].shape[:2]
        out = torch.zeros(B, T, rows, cols)
        for k, mask in scale_masks:
            oy, ox = self.layout.overlap(k, rows, cols)
            out += oy.T.float() @ mask.float() @ ox.float()
        return out > 0

    def token_mask(self, patch_size: int, image_size: int) -> Tensor:
        """(B?, T, (image_size / patch_size)^2) bool: the tokens of a ViT that sees each frame
        resized to ``image_size x image_size`` and cut into ``patch_size`` patches (row-major) that
        a kept gaze touches: token kept when some gazed patch overlaps it with positive area, at
        any scale. A coarse gaze thus keeps every token inside its square, a fine gaze smaller than
        a token keeps the token it lies in."""
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"patch_size must divide image_size, got {patch_size} and {image_size}")
        n = image_size // patch_size
        return self._out(self._project(list(enumerate(self._masks)), n, n).flatten(-2))

    def _target(self, scales: Sequence[int] | None, patch_size: int | None) -> tuple[tuple[int, ...], int]:
        scales = self.target_scales if scales is None else scales
        patch_size = self.target_patch_size if patch_size is None else patch_size
        if scales is None or patch_size is None:
            raise ValueError("give target_scales and target_patch_size (here or when gazing)")
        return check_target_grid(self.grid, scales, patch_size)

    def target_masks(
        self, target_scales: Sequence[int] | None = None, target_patch_size: int | None = None
    ) -> list[Tensor]:
        """The gazes on another encoder's multi-scale grid: per scale ``j`` (B?, T, g'_j, g'_j) bool,
        ``g'_j = target_scales[j] / target_patch_size``, the grid stretched over the frame.

        Gaze scale ``j`` maps to target scale ``j``: a target patch is selected when a kept gaze
        of that scale overlaps it with positive area, i.e. the gaze positions are rescaled to the
        target grid. When each target grid is a whole number of tiles' gaze grids, as in the
        official resolution adaptation (e.g. a 392-pixel frame, target scales 56 / 112 / 196 / 392
        with 14-pixel patches and 196-pixel tiles), every gaze selects exactly its one patch."""
        scales, p = self._target(target_scales, target_patch_size)
        return [self._out(self._project([(k, m)], s // p, s // p)) for k, (m, s) in enumerate(zip(self._masks, scales))]

    def target_indices(self, target_scales: Sequence[int] | None = None, target_patch_size: int | None = None) -> list:
        """Selected target patches, ragged ``[video][frame] -> sorted flat ids`` of the target
        vocabulary (scale-major, row-major); ``[frame]`` for one video."""
        flat = self._target_flat(target_scales, target_patch_size)
        out = [[torch.nonzero(f)[:, 0].tolist() for f in video] for video in flat]
        return self._out(out)

    def _target_flat(self, target_scales: Sequence[int] | None, target_patch_size: int | None) -> Tensor:
        masks = self.target_masks(target_scales, target_patch_size)
        if not self.batched:
            masks = [m[None] for m in masks]
        return torch.cat([m.flatten(-2) for m in masks], -1)  # (B, T, N')

    def to_official(self) -> list[dict[str, Tensor]]:
        """Per clip, the model's raw output in official conventions (rows ``(b nh nw)``):
        ``gazing_pos`` (rows, S) ``local + N * t`` with ``N + N * t`` at STOP / padding,
        ``if_padded_gazing`` (rows, S), ``num_gazing_each_frame`` (T_clip,)."""
        return [c.to_official() for c in self.chunks]

    def target_official(
        self, target_scales: Sequence[int] | None = None, target_patch_size: int | None = None
    ) -> list[dict[str, Tensor]]:
        """Per clip, the target-grid gazes in official conventions (as the official resolution
        adaptation rebuilds them from masks: ids ascending, gaze order lost), rows = videos."""
        flat = self._target_flat(target_scales, target_patch_size)  # (B, T, N')
        n_target = flat.shape[-1]
        out, first = [], 0
        for c in self.chunks:
            T = c.ids.shape[1]
            part = flat[:, first : first + T]
            counts = part.sum(-1).amax(0)  # (T,)
            pos, padded = [], []
            for t in range(T):
                order = torch.sort((~part[:, t]).to(torch.uint8), dim=-1, stable=True).indices[:, : int(counts[t])]
                real = part[:, t].gather(-1, order)
                pos.append(torch.where(real, order, n_target) + n_target * t)
                padded.append(~real)
            out.append(
                {
                    "gazing_pos": torch.cat(pos, 1),
                    "if_padded_gazing": torch.cat(padded, 1),
                    "num_gazing_each_frame": counts,
                }
            )
            first += T
        return out

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary: geometry, vocabulary, settings and the ragged kept gazes."""
        g = self.grid
        out: dict[str, Any] = {
            "format": RESULT_FORMAT,
            "frame_size": list(self.frame_size),
            "num_frames": self.num_frames,
            "num_videos": self.batch_size,
            "clip_len": self.clip_len,
            "tile_size": self.layout.tile_size,
            "tiles": [self.layout.rows, self.layout.cols],
            "tile_origins": [list(o) for o in self.layout.origins],
            "vocabulary": {
                "scales": list(g.scales),
                "patch_size": g.patch_size,
                "grid_sizes": list(g.grid_sizes),
                "num_patches": g.num_patches,
                "order": "per frame and tile: scale-major (coarsest first), row-major inside a scale",
            },
            **self.settings,
            "num_gazes": self.num_gazes.tolist(),
            "gazes": self.indices,
        }
        if self.target_scales is not None and self.target_patch_size is not None:
            out["target"] = {
                "scales": list(self.target_scales),
                "patch_size": self.target_patch_size,
                "grid_sizes": [s // self.target_patch_size for s in self.target_scales],
                "gazes": self.target_indices(),
            }
        return out

    def to_json(self, **kwargs: Any) -> str:
        """:meth:`to_dict` as a JSON string (``kwargs`` go to ``json.dumps``)."""
        return json.dumps(self.to_dict(), **kwargs)


def check_target_grid(grid: PatchGrid, scales: Sequence[int], patch_size: int) -> tuple[tuple[int, ...], int]:
    """Validate a target multi-scale grid for ``grid``'s gazes: one ascending scale per gaze
    scale, each a multiple of ``patch_size``. Returns (scales, patch_size) as ints."""
    scales, patch_size = tuple(int(s) for s in scales), int(patch_size)
    if len(scales) != grid.num_scales:
        raise ValueError(f"target_scales needs one scale per gaze scale ({grid.num_scales}), got {scales}")
    if patch_size < 1 or any(s % patch_size for s in scales) or sorted(set(scales)) != list(scales):
        raise ValueError(f"target_scales must be ascending multiples of target_patch_size={patch_size}: {scales}")
    return scales, patch_size


def _cat_rows(parts: list[Gazes]) -> Gazes:
    """Concatenate Gazes of the same frames along the batch (rows), padding slots to the widest."""
    if len(parts) == 1:
        return parts[0]
    G, N = max(p.ids.shape[2] for p in parts), parts[0].num_patches

    def cat(name: str, value: float) -> Tensor | None:
        if getattr(parts[0], name) is None:
            return None
        return torch.cat([F.pad(getattr(p, name), (0, G - p.ids.shape[2]), value=value) for p in parts])

    return Gazes(
        ids=cat("ids", N),
        emitted=cat("emitted", False),
        log_prob=cat("log_prob", 0.0),
        loss_pred=cat("loss_pred", 0.0),
        value=cat("value", 0.0),
        logits=None,
        num_patches=N,
    )


# ---------------------------------------------------------------------------------------------
# the gazer
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Request:
    """What one gazing call or stream was asked for."""

    gazing_ratio: float | None
    task_loss_requirement: float | None
    tile_size: int
    preprocessed: bool
    target_scales: tuple[int, ...] | None
    target_patch_size: int | None

    def settings(self) -> dict[str, Any]:
        return {"gazing_ratio": self.gazing_ratio, "task_loss_requirement": self.task_loss_requirement}


class Gazer:
    """A gaze policy ready to gaze at videos (see the module docstring).

    Args:
        policy: an :class:`AutoGazePolicy` (put in eval mode, moved to ``device`` / ``dtype``).
        device / dtype: where and in which precision to run (default: where it is, float32).
        batch_size: tiles x videos gazed together (rows of one generator). Rows do not affect
            each other, except with official checkpoints (``official_decode_quirks``): as in the
            official batched generation, a row's last gazes of a frame are cached with stale
            positions while another row of its batch goes on, which moves later predictions at
            floating-point level; the official output of a batch needs all its rows in one batch.
        engine: ``static`` (:class:`StaticGenerator`) or ``reference`` (``policy.generate``).
        cuda_graph: replay CUDA graphs (static engine on CUDA only); None = on CUDA.
        compile: ``torch.compile`` the static engine's two functions first.
    """

    def __init__(
        self,
        policy: AutoGazePolicy,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 64,
        engine: Engine = "static",
        cuda_graph: bool | None = None,
        compile: bool = False,
    ) -> None:
        if engine not in ("static", "reference"):
            raise ValueError(f"engine must be 'static' or 'reference', got {engine!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.policy = policy.eval().to(device=device, dtype=dtype)
        self.dtype = self.policy.gazing_model.gaze_decoder.lm_head.weight.dtype
        self.batch_size, self.engine = batch_size, engine
        on_cuda = self.policy.device.type == "cuda"
        self.cuda_graph = on_cuda if cuda_graph is None else cuda_graph
        if self.cuda_graph and (engine != "static" or not on_cuda):
            raise ValueError("cuda_graph needs engine='static' and a CUDA device")
        self.compile = compile
        self._runners: dict[tuple[int, int], StaticGenerator | _ReferenceRunner] = {}

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike[str], *, device: str | torch.device = "cpu", **kwargs: Any
    ) -> Gazer:
        """Load a folder written by ``AutoGazePolicy.save_pretrained`` or an official AutoGaze
        checkpoint folder (told apart by its ``config.json``); ``kwargs`` go to :class:`Gazer`."""
        folder = Path(folder)
        try:
            raw = json.loads((folder / "config.json").read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{folder} has no config.json; expected a gazer checkpoint folder") from None
        if raw.get("format") == CONFIG_FORMAT:
            policy = AutoGazePolicy.from_pretrained(folder, device=device)
        elif "gaze_model_config" in raw:
            policy = AutoGazePolicy.load_official(folder, device=device)
        else:
            raise ValueError(
                f"{folder / 'config.json'} is neither a {CONFIG_FORMAT} config nor an official AutoGaze config "
                "(no 'gaze_model_config')"
            )
        return cls(policy, device=device, **kwargs)

    @property
    def config(self) -> PolicyConfig:
        return self.policy.config

    @property
    def grid(self) -> PatchGrid:
        return self.config.grid

    @property
    def clip_len(self) -> int:
        """Frames per clip: the model's ``max_num_frames``."""
        return self.config.max_num_frames

    # ---- calls ---------------------------------------------------------------------------------
    def __call__(
        self,
        video: str | os.PathLike[str] | Tensor,
        *,
        gazing_ratio: float | None = 0.75,
        task_loss_requirement: float | None = 0.7,
        target_scales: Sequence[int] | None = None,
        target_patch_size: int | None = None,
        tile_size: int | None = None,
        preprocessed: bool = False,
        start: int = 0,
        stride: int = 1,
        max_frames: int | None = None,
        progress: bool = False,
    ) -> GazeResult:
        """Gaze at a video; see the module docstring for inputs, tiles and clips.

        Args:
            video: a video file, uint8 ``(T, 3, H, W)`` / ``(B, T, 3, H, W)``, or preprocessed float.
            gazing_ratio: per-frame cap ``max(1, int(ratio * N))`` gazes per tile; None = N.
            task_loss_requirement: stop a tile's frame once the predicted loss is at or below it;
                None = always use the whole budget.
            target_scales / target_patch_size: a downstream encoder's multi-scale grid the result
                maps the gazes onto (:meth:`GazeResult.target_masks`); both or neither.
            tile_size: tile side in input pixels (default: the model's frame size).
            preprocessed: ``video`` is float model input (``agents.policy.preprocess`` applied).
            start / stride / max_frames: frames ``start, start + stride, ...``, at most ``max_frames``.
            progress: show a progress bar over clips.
        """
        request = self._request(
            gazing_ratio, task_loss_requirement, tile_size, preprocessed, target_scales, target_patch_size
        )
        batched, B, T_total, H, W, clips = self._clips(video, preprocessed, start, stride, max_frames)
        layout = TileLayout(H, W, request.tile_size, self.grid)
        chunks = []
        for clip in tqdm(clips, total=-(-T_total // self.clip_len), disable=not progress, unit="clip", desc="gazing"):
            rows = self._rows(clip, layout, preprocessed)  # (B * tiles, T, 3, S, S)
            parts = []
            for first in range(0, rows.shape[0], self.batch_size):
                batch = rows[first : first + self.batch_size]
                runner = self._runner(batch.shape[0], request)
                runner.reset()
                parts.append(runner.generate(batch, *self._budgets(batch.shape[0], batch.shape[1], request)))
            chunks.append(_cat_rows(parts))
        return self._result(chunks, layout, B, batched, request)

    def stream(
        self,
        *,
        gazing_ratio: float | None = 0.75,
        task_loss_requirement: float | None = 0.7,
        target_scales: Sequence[int] | None = None,
        target_patch_size: int | None = None,
        tile_size: int | None = None,
        preprocessed: bool = False,
    ) -> GazeStream:
        """A stream taking one frame at a time (KV + conv caches) with the arguments of a call;
        its :meth:`GazeStream.result` equals the whole-video call on the same frames."""
        request = self._request(
            gazing_ratio, task_loss_requirement, tile_size, preprocessed, target_scales, target_patch_size
        )
        return GazeStream(self, request)

    # ---- internals -----------------------------------------------------------------------------
    def _request(
        self,
        gazing_ratio: float | None,
        task_loss_requirement: float | None,
        tile_size: int | None,
        preprocessed: bool,
        target_scales: Sequence[int] | None,
        target_patch_size: int | None,
    ) -> _Request:
        if (target_scales is None) != (target_patch_size is None):
            raise ValueError("give both target_scales and target_patch_size, or neither")
        tile = self.config.input_img_size if tile_size is None else int(tile_size)
        if tile < 1:
            raise ValueError(f"tile_size must be >= 1, got {tile}")
        self.policy.frame_budgets(1, 1, gazing_ratio, None, task_loss_requirement)  # validates
        target = (None, None)
        if target_scales is not None and target_patch_size is not None:
            target = check_target_grid(self.grid, target_scales, target_patch_size)
        return _Request(
            None if gazing_ratio is None else float(gazing_ratio),
            None if task_loss_requirement is None else float(task_loss_requirement),
            tile,
            preprocessed,
            *target,
        )

    def _budgets(self, rows: int, frames: int, request: _Request) -> tuple[Tensor, Tensor | None]:
        budgets = self.policy.frame_budgets(rows, frames, request.gazing_ratio, None, request.task_loss_requirement)
        if request.task_loss_requirement is None:
            return budgets, None
        return budgets, torch.full((rows, frames), request.task_loss_requirement, device=self.policy.device)

    def _max_gazes(self, request: _Request) -> int:
        return int(self.policy.frame_budgets(1, 1, request.gazing_ratio, None, request.task_loss_requirement).max())

    def _new_runner(self, rows: int, request: _Request) -> StaticGenerator | _ReferenceRunner:
        G = self._max_gazes(request)
        if self.engine == "reference":
            return _ReferenceRunner(self.policy, rows, G, self.clip_len)
        return StaticGenerator(
            self.policy, rows, G, max_frames=self.clip_len, cuda_graph=self.cuda_graph, compile=self.compile
        )

    def _runner(self, rows: int, request: _Request) -> StaticGenerator | _ReferenceRunner:
        key = (rows, self._max_gazes(request))
        if key not in self._runners:
            self._runners[key] = self._new_runner(rows, request)
        return self._runners[key]

    def _clips(
        self,
        video: str | os.PathLike[str] | Tensor,
        preprocessed: bool,
        start: int,
        stride: int,
        max_frames: int | None,
    ) -> tuple[bool, int, int, int, int, Iterator[Tensor]]:
        """(batched, B, T, H, W, iterator over (B, T_clip, 3, H, W) clips)."""
        T_clip = self.clip_len
        if isinstance(video, str | os.PathLike):
            if preprocessed:
                raise ValueError("preprocessed=True needs a float tensor, not a file")
            file = _VideoFile.open(video, start, stride, max_frames)
            clips = (file.frames(f, min(T_clip, file.num_frames - f))[None] for f in range(0, file.num_frames, T_clip))
            return False, 1, file.num_frames, file.height, file.width, clips
        if not isinstance(video, Tensor):
            raise TypeError(f"video must be a path or a tensor, got {type(video).__name__}")
        if video.dim() not in (4, 5) or video.shape[-3] != 3:
            raise ValueError(f"video must be (T, 3, H, W) or (B, T, 3, H, W), got {tuple(video.shape)}")
        _check_dtype(video, preprocessed)
        batched = video.dim() == 5
        video = (video if batched else video[None])[:, start::stride]
        if max_frames is not None:
            video = video[:, :max_frames]
        B, T, _, H, W = video.shape
        if T == 0:
            raise ValueError("no frames selected (check start / max_frames)")
        return batched, B, T, H, W, (video[:, f : f + T_clip] for f in range(0, T, T_clip))

    def _rows(self, clip: Tensor, layout: TileLayout, preprocessed: bool) -> Tensor:
        """(B, T, 3, H, W) frames -> (B * tiles, T, 3, S, S) model input on the model's device."""
        cfg, S = self.config, self.config.input_img_size
        B, T = clip.shape[:2]
        fill = None
        if cfg.canvas_input:  # pad with the grey the policy's canvas starts from: padding then holds no error
            grey = torch.full((3, 1, 1), 128, dtype=torch.uint8)
            fill = (preprocess(grey) if preprocessed else grey).view(3)
        tiles = layout.split(clip.to(self.policy.device), fill)  # (B, T, nT, 3, ts, ts)
        ts = layout.tile_size
        rows = tiles.transpose(1, 2).reshape(B * layout.num_tiles * T, 3, ts, ts)
        if ts != S and not cfg.resize_input:
            if preprocessed:
                rows = F.interpolate(rows, size=(S, S), mode="bilinear", align_corners=False, antialias=S < ts)
            else:
                rows = resize_frames(rows, S, fit="stretch")
        if not preprocessed:
            rows = preprocess(rows)
        size = rows.shape[-1]
        return rows.to(self.dtype).view(B * layout.num_tiles, T, 3, size, size)

    def _result(self, chunks: list[Gazes], layout: TileLayout, B: int, batched: bool, request: _Request) -> GazeResult:
        return GazeResult(
            chunks,
            layout,
            B,
            batched,
            self.clip_len,
            request.settings(),
            request.target_scales,
            request.target_patch_size,
        )


def _check_dtype(video: Tensor, preprocessed: bool) -> None:
    if preprocessed != video.is_floating_point() or (not preprocessed and video.dtype != torch.uint8):
        raise TypeError(f"video is {video.dtype}: give uint8 frames, or float model input with preprocessed=True")


class GazeStream:
    """Frame-by-frame gazing (from :meth:`Gazer.stream`): ``stream(frame)`` gazes at one frame,
    uint8 ``(3, H, W)`` or ``(B, 3, H, W)`` (float with ``preprocessed``), and returns its
    :class:`GazeResult` (one frame). Every ``clip_len`` frames a new clip starts, as in a
    whole-video call; :meth:`result` gives all frames so far."""

    def __init__(self, gazer: Gazer, request: _Request) -> None:
        self.gazer, self.request = gazer, request
        self.layout: TileLayout | None = None
        self.batch_size, self.batched = 0, False
        self._runners: list[StaticGenerator | _ReferenceRunner] = []
        self._done: list[Gazes] = []  # finished clips
        self._current: list[Gazes] = []  # frames of the clip in progress

    def __call__(self, frame: Tensor) -> GazeResult:
        if not isinstance(frame, Tensor) or frame.dim() not in (3, 4) or frame.shape[-3] != 3:
            shape = tuple(frame.shape) if isinstance(frame, Tensor) else type(frame).__name__
            raise ValueError(f"a frame must be a (3, H, W) or (B, 3, H, W) tensor, got {shape}")
        _check_dtype(frame, self.request.preprocessed)
        batched = frame.dim() == 4
        frame = frame if batched else frame[None]
        gazer, request = self.gazer, self.request
        if self.layout is None:
            self.layout = TileLayout(frame.shape[-2], frame.shape[-1], request.tile_size, gazer.grid)
            self.batch_size, self.batched = frame.shape[0], batched
            rows = self.batch_size * self.layout.num_tiles
            self._runners = [
                gazer._new_runner(min(gazer.batch_size, rows - first), request)
                for first in range(0, rows, gazer.batch_size)
            ]
        elif frame.shape[0] != self.batch_size or tuple(frame.shape[-2:]) != self.frame_size or batched != self.batched:
            want = ((self.batch_size,) if self.batched else ()) + (3, *self.frame_size)
            got = tuple(frame.shape if batched else frame.shape[1:])
            raise ValueError(f"this stream takes frames of shape {want}, got {got}")
        if len(self._current) == gazer.clip_len:
            self._done.append(Gazes.cat(self._current))
            self._current = []
            for runner in self._runners:
                runner.reset()
        rows = gazer._rows(frame[:, None], self.layout, request.preprocessed)  # (rows, 1, 3, S, S)
        parts, first = [], 0
        for runner in self._runners:
            batch = rows[first : first + runner.batch_size]
            parts.append(runner.generate(batch, *gazer._budgets(batch.shape[0], 1, request)))
            first += runner.batch_size
        gazes = _cat_rows(parts)
        self._current.append(gazes)
        return gazer._result([gazes], self.layout, self.batch_size, self.batched, request)

    @property
    def frame_size(self) -> tuple[int, int]:
        if self.layout is None:
            raise ValueError("no frame yet")
        return self.layout.height, self.layout.width

    def result(self) -> GazeResult:
        """All frames so far, as the whole-video call returns them."""
        if self.layout is None:
            raise ValueError("no frame yet")
        chunks = self._done + ([Gazes.cat(self._current)] if self._current else [])
        return self.gazer._result(chunks, self.layout, self.batch_size, self.batched, self.request)


# ---------------------------------------------------------------------------------------------
# pictures
# ---------------------------------------------------------------------------------------------
def render_frame(frame: Tensor, result: GazeResult, t: int, video: int = 0, gap: int = 4) -> Tensor:
    """(H, 2W + gap, 3) uint8 HWC: frame ``t`` | its kept gazes coloured by scale
    (``gaze_env.render.gaze_overlay`` per tile, tiles resized to the model frame and back)."""
    layout, grid = result.layout, result.grid
    S, ts, N = grid.frame_size, layout.tile_size, grid.num_patches
    ids, kept = result._dense
    tiles = layout.split(frame)  # (nT, 3, ts, ts)
    painted = []
    for i in range(layout.num_tiles):
        gazed = torch.zeros(N, dtype=torch.bool)
        gazed[ids[video, t, i][kept[video, t, i]]] = True
        tile = tiles[i] if ts == S else resize_frames(tiles[i][None], S, fit="stretch")[0]
        over = gaze_overlay(tile, gazed, grid)
        painted.append(over if ts == S else resize_frames(over[None], ts, fit="stretch")[0])
    canvas = torch.stack(painted).view(layout.rows, layout.cols, 3, ts, ts).permute(2, 0, 3, 1, 4)
    canvas = canvas.reshape(3, layout.rows * ts, layout.cols * ts)[:, : layout.height, : layout.width]
    white = torch.full((3, layout.height, gap), 255, dtype=torch.uint8)
    return torch.cat([frame, white, canvas], dim=2).permute(1, 2, 0).contiguous()


def _write_animation(images: list[np.ndarray], path: Path, fps: float) -> None:
    """Write HWC uint8 images as an animated GIF (Pillow) or, with ffmpeg on PATH, an MP4."""
    if path.suffix.lower() == ".gif":
        from PIL import Image

        pictures = [Image.fromarray(img) for img in images]
        pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=max(1, round(1000 / fps)), loop=0)
        return
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"--viz must end in .gif or .mp4, got {path}")
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise RuntimeError("writing .mp4 needs the ffmpeg program on PATH; write a .gif instead")
    h, w = images[0].shape[:2]
    cmd = [
        ffmpeg,
        "-y",
        "-loglevel",
        "error",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-s",
        f"{w}x{h}",
        "-r",
        str(fps),
        "-i",
        "-",
        "-vf",
        "pad=ceil(iw/2)*2:ceil(ih/2)*2",
        "-pix_fmt",
        "yuv420p",
        str(path),
    ]
    subprocess.run(cmd, input=b"".join(np.ascontiguousarray(img).tobytes() for img in images), check=True)


def _visualise(video: str | os.PathLike[str], result: GazeResult, path: Path, args: argparse.Namespace) -> None:
    file = _VideoFile.open(video, args.start, args.stride, args.max_frames)
    fps = args.fps or (file.fps / args.stride if file.fps > 0 else 8.0)
    images = []
    for first in range(0, file.num_frames, result.clip_len):
        frames = file.frames(first, min(result.clip_len, file.num_frames - first))
        for i, frame in enumerate(frames):
            panel = render_frame(frame, result, first + i)  # (h, w, 3)
            if panel.shape[1] > args.viz_width:
                h = max(1, round(panel.shape[0] * args.viz_width / panel.shape[1]))
                small = F.interpolate(
                    panel.permute(2, 0, 1)[None].float(), size=(h, args.viz_width), mode="bilinear", antialias=True
                )
                panel = small[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
            images.append(panel.numpy())
    _write_animation(images, path, fps)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agents.gazer",
        description="Gaze at a video with a trained gazer and write the gazes as JSON (optionally a picture).",
    )
    parser.add_argument("video", help="a video file (any resolution and length)")
    parser.add_argument("--checkpoint", required=True, help="gazer folder: ours (save_pretrained) or official AutoGaze")
    parser.add_argument(
        "--gazing-ratio",
        type=_optional_float,
        default=0.75,
        help="per-frame cap: max(1, int(ratio * N)) gazes per tile; 'none' for N (default: 0.75)",
    )
    parser.add_argument(
        "--task-loss-requirement",
        type=_optional_float,
        default=0.7,
        help="stop a frame once the predicted loss is <= this; 'none' to use the whole cap (default: 0.7)",
    )
    parser.add_argument("--out", type=Path, default=Path("gazes.json"), help="JSON output (default: gazes.json)")
    parser.add_argument("--viz", type=Path, help="also write frame | gazes coloured by scale, as .gif or .mp4 (ffmpeg)")
    parser.add_argument("--tile-size", type=int, help="tile side in pixels (default: the model's frame size)")
    parser.add_argument("--start", type=int, default=0, help="first frame (default: 0)")
    parser.add_argument("--stride", type=int, default=1, help="take every stride-th frame (default: 1)")
    parser.add_argument("--max-frames", type=int, help="at most this many frames (default: all)")
    parser.add_argument(
        "--target-scales", type=int, nargs="+", help="map gazes onto this encoder grid's scales (pixels)"
    )
    parser.add_argument("--target-patch-size", type=int, help="patch size of the target encoder grid")
    parser.add_argument("--batch-size", type=int, default=64, help="tiles gazed together (default: 64)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="model precision (default: fp32)")
    parser.add_argument("--fps", type=float, help="frame rate of the picture (default: the video's)")
    parser.add_argument("--viz-width", type=int, default=960, help="the picture's width at most (default: 960)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.viz is not None and args.viz.suffix.lower() not in (".gif", ".mp4"):
        parser.error(f"--viz must end in .gif or .mp4, got {args.viz}")
    if args.viz is not None and args.viz.suffix.lower() == ".mp4" and shutil.which("ffmpeg") is None:
        parser.error("--viz .mp4 needs the ffmpeg program on PATH; write a .gif instead")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    gazer = Gazer.from_pretrained(args.checkpoint, device=device, dtype=dtype, batch_size=args.batch_size)
    result = gazer(
        args.video,
        gazing_ratio=args.gazing_ratio,
        task_loss_requirement=args.task_loss_requirement,
        target_scales=args.target_scales,
        target_patch_size=args.target_patch_size,
        tile_size=args.tile_size,
        start=args.start,
        stride=args.stride,
        max_frames=args.max_frames,
        progress=not args.no_progress,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = result.to_json()
    _atomic_write(args.out, lambda path: Path(path).write_text(text))
    H, W = result.frame_size
    total = result.num_frames * result.layout.num_tiles * result.grid.num_patches
    ratio = float(result.num_gazes.sum()) / total
    print(
        f"{result.num_frames} frames of {W}x{H} in {result.layout.rows}x{result.layout.cols} tiles: "
        f"{int(result.num_gazes.sum())} gazes, gazing ratio {ratio:.3f} -> {args.out}"
    )
    if args.viz is not None:
        _visualise(args.video, result, args.viz, args)
        print(f"picture -> {args.viz}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
