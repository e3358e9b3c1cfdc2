"""Gazer: official fixtures through the front-end, the static engine, tiles, clips, streaming,
masks and target grids, and the command line."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from agents.gazer import Gazer, GazeResult, StaticGenerator, TileLayout, main, read_video
from agents.policy import AutoGazePolicy, Gazes, preprocess
from gaze_env.video import SyntheticSource, sample_video_dir
from tests.agents.test_policy import (
    FIXTURES,
    OFFICIAL_KEYS,
    THRESHOLDS,
    VARIANTS,
    draw_budgets,
    random_model,
    random_video,
    threshold_for,
)
from tests.conftest import OFFICIAL_PARTS


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is faster and does not fight other processes for cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def spread_policy(seed: int, **overrides) -> AutoGazePolicy:
    """The tiny preset (64 px frames, N = 84, T = 8) with weights large enough that gazes differ
    between tiles and the loss predictions spread over about [-2, 3]."""
    torch.manual_seed(seed)
    policy = AutoGazePolicy.from_preset("tiny", **overrides).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name.endswith("norm.weight") else 0.0))
    return policy


def smooth_video(seed: int, T: int, H: int, W: int, B: int | None = None) -> torch.Tensor:
    """uint8 (T, 3, H, W) (or (B, T, 3, H, W)) smooth random content that moves a little."""
    g = torch.Generator().manual_seed(seed)
    n = 1 if B is None else B
    base = torch.randint(0, 256, (n, 3, H // 8 + 1, W // 8 + 1), generator=g).float()
    base = torch.nn.functional.interpolate(base, size=(H, W), mode="bilinear", align_corners=False)
    frames = [torch.roll(base, shifts=(t, 2 * t), dims=(-2, -1)) for t in range(T)]
    video = torch.stack(frames, 1).round().clamp(0, 255).to(torch.uint8)
    return video[0] if B is None else video


def fixture_inputs(name: str):
    folder = FIXTURES / name
    return folder, load_file(folder / "inputs.safetensors")["video"], load_file(folder / "outputs.safetensors")


# ---- official fixtures through the Gazer -------------------------------------------------------
@pytest.mark.parametrize("name", ["small_k1", "small_k3"])
def test_gazer__reproduces_official_fixture_greedy_and_early_stop(name):
    folder, video, expected = fixture_inputs(name)
    gazer = Gazer.from_pretrained(folder)  # official config.json -> load_official
    assert gazer.config.official_decode_quirks and gazer.engine == "static"
    for prefix, thr in (("a", None), ("b", THRESHOLDS[name])):
        # the fixture's 64x64 input is already preprocessed; one 64-pixel tile, resized by the model
        result = gazer(video, gazing_ratio=0.1, task_loss_requirement=thr, preprocessed=True, tile_size=64)
        (official,) = result.to_official()
        for key in OFFICIAL_KEYS:
            assert torch.equal(official[key], expected[f"{prefix}_{key}"]), f"{prefix}_{key}"


def test_gaze_result__official_conventions_and_ragged_indices_on_fixture():
    folder, video, expected = fixture_inputs("small_k3")
    result = Gazer.from_pretrained(folder)(
        video, gazing_ratio=0.1, task_loss_requirement=THRESHOLDS["small_k3"], preprocessed=True, tile_size=64
    )
    (official,) = result.to_official()
    pos, padded, counts = official["gazing_pos"], official["if_padded_gazing"], official["num_gazing_each_frame"]
    assert counts.tolist() == [26, 12, 15, 26] and int(counts.sum()) == pos.shape[1]
    frame = torch.arange(4).repeat_interleave(counts)
    local = pos - 265 * frame  # offsets are frame * 265
    assert bool(((local >= 0) & (local <= 265)).all())
    assert torch.equal(padded, local == 265)  # STOP and padding hold 265 + 265 * t, flagged
    # ragged indices: the real gazes of each frame in order, no padding (one tile per frame)
    assert result.batched and result.num_gazes.tolist() == [[26, 11, 8, 26], [26, 11, 14, 11]]
    for b in range(2):
        for t in range(4):
            sel = (frame == t) & ~padded[b]
            assert result.indices[b][t] == [local[b, sel].tolist()]
    # masks: one cell per real gaze (64x64 frame = one tile), 2x2 / 4x4 / 7x7 / 14x14 grids
    assert [tuple(m.shape) for m in result.masks] == [(2, 4, g, g) for g in (2, 4, 7, 14)]
    assert torch.equal(sum(m.flatten(2).sum(-1) for m in result.masks), result.num_gazes)


def test_gazer__stream_reproduces_official_fixture_early_stop():
    folder, video, expected = fixture_inputs("small_k3")
    stream = Gazer.from_pretrained(folder).stream(
        gazing_ratio=0.1, task_loss_requirement=THRESHOLDS["small_k3"], preprocessed=True, tile_size=64
    )
    per_frame = [stream(video[:, t]) for t in range(4)]
    assert all(r.num_frames == 1 for r in per_frame)
    (official,) = stream.result().to_official()
    for key in OFFICIAL_KEYS:
        assert torch.equal(official[key], expected[f"b_{key}"]), key


# ---- the static engine ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(12))
def test_static_generator__equals_policy_generate(seed):
    k = (1, 2, 3, 5)[seed % 4]
    model = random_model(
        seed,
        num_multi_token_pred=k,
        stop_per_head=seed % 3 == 0,
        official_decode_quirks=seed % 2 == 1,
        value_head=True,
        **VARIANTS[sorted(VARIANTS)[seed % 4]],
    )
    B, T = 1 + seed % 3, 1 + seed % 4
    video = random_video(seed, B, T)
    budgets = draw_budgets(seed, B, T, ragged=seed % 2 == 0)
    thr = threshold_for(model, video, budgets, seed) if seed % 4 else None
    reference = model.generate(video, frame_budgets=budgets, task_loss_requirement=thr)
    engine = StaticGenerator(model, B, int(budgets.max()) + seed % 2, max_frames=T + 1)
    ours = engine.generate(video, budgets, None if thr is None else thr.expand(B, T))
    assert torch.equal(ours.ids, reference.ids) and torch.equal(ours.emitted, reference.emitted)
    for key in ("log_prob", "loss_pred", "value"):
        torch.testing.assert_close(getattr(ours, key), getattr(reference, key), atol=1e-4, rtol=1e-4, msg=key)
    # streaming: the same clips one frame at a time after a reset
    engine.reset()
    frames = [
        engine.generate(video[:, t : t + 1], budgets[:, t : t + 1], None if thr is None else thr.expand(B, 1))
        for t in range(T)
    ]
    streamed = Gazes.cat(frames)
    assert torch.equal(streamed.ids, reference.ids) and torch.equal(streamed.emitted, reference.emitted)


class ReplayOnCPU:
    """Stands in for a CUDA graph captured for one frame slot: runs the function with the key
    count fixed at capture time (``StaticGenerator._frame_keys``), as the graph would."""

    def __init__(self, engine: StaticGenerator, fn, keys: int) -> None:
        self.engine, self.fn, self.keys = engine, fn, keys

    def replay(self) -> None:
        self.engine._num_keys = self.keys
        self.fn()


def test_static_generator__per_frame_graph_key_bounds_give_the_same_gazes():
    model = random_model(11, num_multi_token_pred=3, official_decode_quirks=True)
    video = random_video(11, 2, 4)
    budgets = draw_budgets(11, 2, 4, ragged=True)
    thr = threshold_for(model, video, budgets, 11)
    reference = model.generate(video, frame_budgets=budgets, task_loss_requirement=thr)
    engine = StaticGenerator(model, 2, 9, max_frames=4)
    engine._graphs = {
        (name, t): ReplayOnCPU(engine, fn, engine._frame_keys(t)) for name, fn in engine._fns.items() for t in range(4)
    }
    assert engine._frame_keys(0) < engine._frame_keys(3) == engine.state.capacity
    streamed = Gazes.cat(
        [engine.generate(video[:, :1], budgets[:, :1], thr.expand(2, 1))]
        + [engine.generate(video[:, 1:], budgets[:, 1:], thr.expand(2, 3))]
    )
    assert torch.equal(streamed.ids, reference.ids) and torch.equal(streamed.emitted, reference.emitted)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(4))
def test_static_generator__cuda_graphs_give_the_gazes_of_generate(seed):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = random_model(
        seed, num_multi_token_pred=(1, 3)[seed % 2], official_decode_quirks=seed % 2 == 1,
        **VARIANTS[sorted(VARIANTS)[seed % 4]],
    ).cuda()
    video = random_video(seed, 3, 4).cuda()
    budgets = draw_budgets(seed, 3, 4, ragged=True).cuda()
    thr = threshold_for(model, video, budgets, seed) if seed >= 2 else None
    thresholds = None if thr is None else thr.expand(3, 4)
    reference = model.generate(video, frame_budgets=budgets, task_loss_requirement=thr)
    engine = StaticGenerator(model, 3, 8, max_frames=4, cuda_graph=True)
    for _ in range(2):  # the graphs replay on new inputs after a reset
        engine.reset()
        ours = engine.generate(video, budgets, thresholds)
        assert torch.equal(ours.ids, reference.ids) and torch.equal(ours.emitted, reference.emitted)
        torch.testing.assert_close(ours.loss_pred, reference.loss_pred, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["small_k1", "small_k3"])
def test_gazer__reproduces_official_fixture_on_cuda_with_graphs(name):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    folder, video, expected = fixture_inputs(name)
    gazer = Gazer.from_pretrained(folder, device="cuda")
    assert gazer.cuda_graph
    for prefix, thr in (("a", None), ("b", THRESHOLDS[name])):
        result = gazer(video.cuda(), gazing_ratio=0.1, task_loss_requirement=thr, preprocessed=True, tile_size=64)
        (official,) = result.to_official()
        for key in OFFICIAL_KEYS:
            assert torch.equal(official[key].cpu(), expected[f"{prefix}_{key}"]), f"{prefix}_{key}"


# ---- sampling in the static engine ----------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_static_generator__sampled_log_probs_are_what_score_gives_back(seed):
    model = random_model(
        seed, num_multi_token_pred=(1, 3)[seed % 2], value_head=seed % 2 == 0, **VARIANTS[sorted(VARIANTS)[seed % 4]]
    )
    B, T = 3, 3
    video = random_video(seed, B, T)
    budgets = draw_budgets(seed, B, T, ragged=True)
    thr = threshold_for(model, video, budgets, seed) if seed >= 2 else None
    engine = StaticGenerator(model, B, 8, max_frames=T, sample=True)
    draws = []
    for _ in range(2):  # the same seed draws the same gazes
        engine.reset()
        draws.append(engine.generate(video, budgets, None if thr is None else thr.expand(B, T), temperature=0.7,
                                     generator=torch.Generator().manual_seed(seed)))
    ours = draws[0]
    assert torch.equal(draws[1].ids, ours.ids) and torch.equal(draws[1].emitted, ours.emitted)
    assert torch.equal(ours.emitted.sum(-1), budgets) or thr is not None
    traj = ours.to_trajectory()
    scored = model.score(video, traj["action"], traj["frame_id"], traj["valid"], temperature=0.7)
    torch.testing.assert_close(traj["log_prob"], scored["log_prob"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(traj["loss_pred"], scored["loss_pred"], atol=1e-5, rtol=1e-5)
    engine.reset()
    other = engine.generate(video, budgets, temperature=0.7, generator=torch.Generator().manual_seed(seed + 100))
    assert not torch.equal(other.ids, ours.ids)


def test_static_generator__samples_the_distribution_generate_samples():
    """One step of K = 2 heads on one frame, 3000 clips: the first pick follows softmax(logits /
    temperature) over the patches, the second the same over what the first left, as generate's."""
    model = random_model(5, num_multi_token_pred=2)
    N, B, temp = model.config.num_patches, 3000, 0.8
    video = random_video(5, 1, 1).expand(B, -1, -1, -1, -1)
    budgets = torch.full((B, 1), 2)
    engine = StaticGenerator(model, B, 2, max_frames=1, sample=True)
    ours = engine.generate(video, budgets, temperature=temp, generator=torch.Generator().manual_seed(0))
    reference = model.generate(
        video, frame_budgets=budgets, temperature=temp, generator=torch.Generator().manual_seed(0)
    )
    logits = model.generate(video[:1], frame_budgets=budgets[:1], return_logits=True).logits[0, 0, :, :N]  # (2, N)
    p1 = torch.softmax(logits[0].double() / temp, 0)  # (N,)
    second = (logits[1].double() / temp).expand(N, N).clone()  # row a: head 1 after head 0 took a
    second.diagonal().fill_(float("-inf"))
    p2 = p1 @ torch.softmax(second, 1)  # (N,)
    for gazes in (ours, reference):
        for head, p in ((0, p1), (1, p2)):
            freq = torch.bincount(gazes.ids[:, 0, head], minlength=N).double() / B
            assert 0.5 * (freq - p).abs().sum() < 0.05, (head, 0.5 * (freq - p).abs().sum())
    assert bool((ours.ids[:, 0, 0] != ours.ids[:, 0, 1]).all())
    with pytest.raises(ValueError, match="temperature > 0"):
        engine.generate(video, budgets, temperature=0.0, generator=torch.Generator())
    with pytest.raises(ValueError, match="greedy"):
        StaticGenerator(model, B, 2, max_frames=1).generate(video, budgets, temperature=1.0)


def test_static_generator__vision_tokens_instead_of_video_give_the_same_gazes():
    model = random_model(2, num_multi_token_pred=3)
    video = random_video(2, 2, 3)
    budgets = draw_budgets(2, 2, 3, ragged=True)
    engine = StaticGenerator(model, 2, 8, max_frames=3)
    from_video = engine.generate(video, budgets)
    engine.reset()
    tokens, _ = model.encode(video)
    from_tokens = engine.generate(None, budgets, tokens=tokens)
    assert torch.equal(from_tokens.ids, from_video.ids)
    with pytest.raises(ValueError, match="reset"):
        engine.generate(None, budgets, tokens=tokens)
    engine.reset()
    engine.generate(None, budgets[:, :1], tokens=tokens[:, :1])
    with pytest.raises(ValueError, match="conv cache"):
        engine.generate(video[:, 1:], budgets[:, 1:])
    with pytest.raises(ValueError, match="canvas_input"):  # its frames' tokens depend on its own gazes
        StaticGenerator(random_model(2, canvas_input=True), 2, 8, max_frames=3).generate(None, budgets, tokens=tokens)


@pytest.mark.gpu
def test_static_generator__sampling_graphs_draw_what_the_eager_engine_draws():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = random_model(7, num_multi_token_pred=3, **VARIANTS["both"]).cuda()
    video = random_video(7, 4, 4).cuda()
    budgets = draw_budgets(7, 4, 4, ragged=True).cuda()
    runs = []
    for graph in (False, True):
        engine = StaticGenerator(model, 4, 8, max_frames=4, sample=True, cuda_graph=graph)
        for seed in (0, 1):  # graphs replay new draws and temperatures
            engine.reset()
            g = torch.Generator(device="cuda").manual_seed(seed)
            runs.append(engine.generate(video, budgets, temperature=0.5 + seed, generator=g))
    assert torch.equal(runs[0].ids, runs[2].ids) and torch.equal(runs[1].ids, runs[3].ids)
    assert not torch.equal(runs[0].ids, runs[1].ids)
    traj = runs[3].to_trajectory()
    scored = model.score(video, traj["action"], traj["frame_id"], traj["valid"], temperature=1.5)
    torch.testing.assert_close(traj["log_prob"], scored["log_prob"], atol=1e-4, rtol=1e-4)


def test_static_generator__rejects_what_does_not_fit():
    model = random_model(0)
    engine = StaticGenerator(model, 2, 4, max_frames=2)
    video = random_video(0, 2, 2)
    with pytest.raises(ValueError, match=r"budgets must lie in \[1, 4\]"):
        engine.generate(video, torch.full((2, 2), 5))
    engine.generate(video, torch.full((2, 2), 3))
    with pytest.raises(ValueError, match="reset"):
        engine.generate(video[:, :1], torch.full((2, 1), 3))
    with pytest.raises(ValueError, match="runs 2 clips"):
        engine.generate(video[:1], torch.full((1, 2), 3))


# ---- tiles, clips, streaming ---------------------------------------------------------------------
def test_gazer__tiles_equal_separate_runs_of_each_tile():
    gazer = Gazer(spread_policy(1))
    video = smooth_video(0, 3, 128, 128)
    thr = 0.0
    whole = gazer(video, gazing_ratio=0.5, task_loss_requirement=thr)
    assert (whole.layout.rows, whole.layout.cols) == (2, 2) and whole.num_frames == 3
    for i, (y, x) in enumerate(whole.layout.origins):
        alone = gazer(video[..., y : y + 64, x : x + 64], gazing_ratio=0.5, task_loss_requirement=thr)
        assert [frame[i] for frame in whole.indices] == [frame[0] for frame in alone.indices]
    counts = torch.tensor([[len(tile) for tile in frame] for frame in whole.indices])
    assert len(set(counts.flatten().tolist())) > 1  # early stops differ between tiles
    # the official form keeps the tiles as batch rows (tiles row-major)
    assert whole.to_official()[0]["gazing_pos"].shape[0] == 4


def test_gazer__non_square_frames_map_back_and_drop_padding_gazes():
    gazer = Gazer(spread_policy(2))
    video = smooth_video(1, 2, 64, 96)  # 1 x 2 tiles, the second half padding
    result = gazer(video, gazing_ratio=1.0, task_loss_requirement=None)  # every patch of every tile
    assert (result.layout.rows, result.layout.cols) == (1, 2)
    # tile 1 covers x in [64, 128): cells of 32 / 16 / 8 px touch the frame (x < 96) in 1 / 2 / 4 columns
    kept_tile1 = 2 * 1 + 4 * 2 + 8 * 4
    assert result.num_gazes.tolist() == [84 + kept_tile1] * 2
    assert all(len(frame[0]) == 84 and len(frame[1]) == kept_tile1 for frame in result.indices)
    assert result.to_official()[0]["num_gazing_each_frame"].tolist() == [84, 84]  # raw model output
    assert [tuple(m.shape) for m in result.masks] == [(2, 2, 3), (2, 4, 6), (2, 8, 12)]
    assert all(bool(m.all()) for m in result.masks)
    assert tuple(result.pixel_masks().shape) == (2, 3, 64, 96) and bool(result.pixel_masks().all())
    assert tuple(result.pixel_masks(1).shape) == (1, 3, 64, 96)
    assert tuple(result.token_mask(16, 64).shape) == (2, 16)


@pytest.mark.parametrize("preprocessed", [False, True])
def test_gazer__pads_tiles_black_for_official_models_and_with_the_canvas_grey_for_ours(preprocessed):
    video = smooth_video(1, 2, 64, 96)  # 1 x 2 tiles, the second half padding
    if preprocessed:
        video = preprocess(video)
    layout = TileLayout(64, 96, 64, AutoGazePolicy.from_preset("tiny").config.grid)
    grey = preprocess(torch.full((3, 1, 1), 128, dtype=torch.uint8)).view(3)
    for parts, pad in ((OFFICIAL_PARTS, torch.zeros(3)), ({}, grey if preprocessed else torch.full((3,), 128.0))):
        gazer = Gazer(spread_policy(2, **parts))
        rows = gazer._rows(video[None], layout, preprocessed)  # (tiles, T, 3, 64, 64) model input
        expected = pad if preprocessed else preprocess(pad.to(torch.uint8).view(3, 1, 1)).view(3)
        torch.testing.assert_close(rows[1, :, :, :, 32:], expected.view(1, 3, 1, 1).expand(2, 3, 64, 32))
        torch.testing.assert_close(rows[1, :, :, :, :32], (video if preprocessed else preprocess(video))[:, :, :, 64:])


def test_gazer__chunks_of_a_long_video_equal_separate_clip_runs():
    gazer = Gazer(spread_policy(3))
    video = smooth_video(2, 40, 64, 64)
    assert gazer.clip_len == 8
    result = gazer(video, gazing_ratio=0.25, task_loss_requirement=None)
    assert len(result.chunks) == 5 and result.num_frames == 40
    for c in range(5):
        alone = gazer(video[8 * c : 8 * c + 8], gazing_ratio=0.25, task_loss_requirement=None)
        for key in OFFICIAL_KEYS:
            assert torch.equal(result.to_official()[c][key], alone.to_official()[0][key]), (c, key)
        assert result.indices[8 * c : 8 * c + 8] == alone.indices
    short = gazer(video[:11], gazing_ratio=0.25, task_loss_requirement=None)  # the last clip is shorter
    assert [c.ids.shape[1] for c in short.chunks] == [8, 3]


def test_gaze_stream__equals_the_whole_video_across_clips_and_videos():
    gazer = Gazer(spread_policy(4), batch_size=3)  # 2 videos x 2 tiles = 4 rows: two generators
    video = smooth_video(3, 10, 64, 96, B=2)
    kwargs = dict(gazing_ratio=0.4, task_loss_requirement=0.0)
    whole = gazer(video, **kwargs)
    stream = gazer.stream(**kwargs)
    frames = [stream(video[:, t]) for t in range(10)]
    assert frames[0].batched and frames[0].indices[1][0] == whole.indices[1][0]
    streamed = stream.result()
    assert len(streamed.chunks) == 2 and streamed.indices == whole.indices
    for a, b in zip(streamed.to_official(), whole.to_official(), strict=True):
        for key in OFFICIAL_KEYS:
            assert torch.equal(a[key], b[key]), key
    with pytest.raises(ValueError, match="frames of shape"):
        stream(video[0, 0])


def test_gazer__reference_engine_gives_the_same_gazes():
    policy = spread_policy(5)
    video = smooth_video(4, 5, 64, 64, B=2)
    kwargs = dict(gazing_ratio=0.3, task_loss_requirement=0.5)
    static = Gazer(policy)(video, **kwargs)
    reference = Gazer(policy, engine="reference")(video, **kwargs)
    assert static.indices == reference.indices


# ---- masks and grids -----------------------------------------------------------------------------
def hand_result(frame_gazes: list[list[int]], height: int = 64, width: int = 64) -> GazeResult:
    """A one-tile tiny-grid result whose frame t gazed ``frame_gazes[t]`` (per-frame ids)."""
    grid = AutoGazePolicy.from_preset("tiny").config.grid
    T, G = len(frame_gazes), max(len(g) for g in frame_gazes)
    ids = torch.full((1, T, G), grid.num_patches)
    for t, gz in enumerate(frame_gazes):
        ids[0, t, : len(gz)] = torch.tensor(gz)
    emitted = ids != grid.num_patches
    zeros = torch.zeros(1, T, G)
    gazes = Gazes(
        ids=ids, emitted=emitted, log_prob=zeros, loss_pred=zeros, value=None, logits=None, num_patches=grid.num_patches
    )
    return GazeResult([gazes], TileLayout(height, width, 64, grid), 1, False, 8)


def test_gaze_result__token_mask_keeps_tokens_a_gaze_overlaps():
    grid = AutoGazePolicy.from_preset("tiny").config.grid  # 2x2 / 4x4 / 8x8 patches over 64 px
    coarse = 0  # scale 0, (0, 0): pixels [0, 32) x [0, 32)
    fine = int(grid.flatten(torch.tensor(2), torch.tensor(3), torch.tensor(5)))  # y [24, 32), x [40, 48)
    result = hand_result([[coarse], [fine]])
    mask = result.token_mask(16, 64)  # 4x4 tokens of 16 px
    assert mask.shape == (2, 16)
    assert torch.nonzero(mask[0])[:, 0].tolist() == [0, 1, 4, 5]  # the coarse gaze covers 2x2 tokens
    assert torch.nonzero(mask[1])[:, 0].tolist() == [6]  # a fine gaze keeps the token it lies in
    assert torch.nonzero(result.token_mask(32, 64)[1])[:, 0].tolist() == [1]
    # 6x6 tokens of 64/6 px: rows [21.3, 32) only (row 3 starts at 32: touching is no overlap), cols 3 and 4
    assert torch.nonzero(result.token_mask(16, 96)[1])[:, 0].tolist() == [2 * 6 + 3, 2 * 6 + 4]
    with pytest.raises(ValueError, match="divide"):
        result.token_mask(10, 64)


def test_gaze_result__target_grid_rescales_gazes():
    gazer = Gazer(spread_policy(6))
    aligned = gazer(
        smooth_video(5, 2, 128, 128),
        gazing_ratio=0.3,
        task_loss_requirement=None,
        target_scales=(32, 64, 128),
        target_patch_size=8,
    )
    # 2x2 tiles of 2x2 / 4x4 / 8x8 patches = target grids 4x4 / 8x8 / 16x16: one target patch per gaze
    for ours, target in zip(aligned.masks, aligned.target_masks(), strict=True):
        assert torch.equal(ours, target)
    # not aligned: 120 px frame, 10-px target patches (cells of 40 / 20 / 10 px), gaze cells of 32 / 16 / 8 px
    result = gazer(smooth_video(6, 2, 120, 120), gazing_ratio=0.3, task_loss_requirement=None)
    pixels = result.pixel_masks()  # (T, 3, 120, 120)
    targets = result.target_masks((30, 60, 120), 10)
    for k, target in enumerate(targets):
        n = target.shape[-1]
        side = 120 // n
        brute = pixels[:, k].view(2, n, side, n, side).any(-1).any(-2)  # a gazed pixel inside the cell
        assert torch.equal(target, brute), k
    flat_ids = result.target_indices((30, 60, 120), 10)
    (official,) = result.target_official((30, 60, 120), 10)
    n_target = 9 + 36 + 144
    counts = official["num_gazing_each_frame"]
    frame = torch.arange(2).repeat_interleave(counts)
    real = (
        official["gazing_pos"][0][~official["if_padded_gazing"][0]] - n_target * frame[~official["if_padded_gazing"][0]]
    )
    assert real.tolist() == flat_ids[0] + flat_ids[1]
    with pytest.raises(ValueError, match="one scale per gaze scale"):
        result.target_masks((30, 60), 10)
    with pytest.raises(ValueError, match="both"):
        gazer(smooth_video(6, 1, 64, 64), target_scales=(16, 32, 64))


# ---- loading, input and the command line ---------------------------------------------------------
def test_gazer__from_pretrained_reads_both_checkpoint_formats(tmp_path):
    policy = spread_policy(7)
    policy.save_pretrained(tmp_path / "ours")
    ours = Gazer.from_pretrained(tmp_path / "ours")
    assert ours.config == policy.config and not ours.config.official_decode_quirks
    official = Gazer.from_pretrained(FIXTURES / "small_k1")
    assert official.config.num_patches == 265 and official.config.resize_input
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="neither"):
        Gazer.from_pretrained(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="config.json"):
        Gazer.from_pretrained(tmp_path)


def test_gazer__rejects_bad_input():
    gazer = Gazer(spread_policy(8))
    with pytest.raises(TypeError, match="preprocessed=True"):
        gazer(torch.zeros(2, 3, 64, 64))
    with pytest.raises(TypeError, match="uint8"):
        gazer(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), preprocessed=True)
    with pytest.raises(ValueError, match=r"\(T, 3, H, W\)"):
        gazer(torch.zeros(2, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="gazing_ratio"):
        gazer(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), gazing_ratio=1.5)


def test_gazer__gazes_at_video_source_clips():
    source = SyntheticSource(8, 64, num_clips=3, seed=1)
    gazer = Gazer(spread_policy(10))
    one = gazer(source.clip(2), gazing_ratio=0.2, task_loss_requirement=None)
    both = gazer(source.clips([0, 2]), gazing_ratio=0.2, task_loss_requirement=None)
    assert not one.batched and both.batched and both.num_gazes.shape == (2, 8)
    assert both.indices[1] == one.indices and torch.equal(both.token_mask(16, 64)[1], one.token_mask(16, 64))


def test_read_video__keeps_native_resolution():
    video = read_video(sample_video_dir() / "bikes.mp4", start=5, stride=3, max_frames=4)
    assert video.dtype == torch.uint8 and tuple(video.shape) == (4, 3, 272, 640)
    assert torch.equal(video[1], read_video(sample_video_dir() / "bikes.mp4", start=8, max_frames=1)[0])


def test_cli__writes_json_and_gif_for_a_sample_clip(tmp_path, capsys):
    spread_policy(9, **OFFICIAL_PARTS).save_pretrained(tmp_path / "ckpt")  # random weights: no reason to
    clip = sample_video_dir() / "bigbuckbunny.mp4"  # 1280x720; a random canvas model may pick padding patches
    out, gif = tmp_path / "gazes.json", tmp_path / "gazes.gif"
    argv = [str(clip), "--checkpoint", str(tmp_path / "ckpt"), "--gazing-ratio", "0.1", "--task-loss-requirement"]
    argv += ["0.7", "--tile-size", "128", "--max-frames", "3", "--out", str(out), "--viz", str(gif), "--no-progress"]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["format"] == "autogaze-gym/gazes-v1" and data["frame_size"] == [720, 1280]
    assert data["tiles"] == [6, 10] and data["num_frames"] == 3 and len(data["gazes"]) == 3
    assert all(len(frame) == 60 and all(1 <= len(tile) <= 8 for tile in frame) for frame in data["gazes"])
    assert data["num_gazes"] == [sum(len(tile) for tile in frame) for frame in data["gazes"]]
    with Image.open(gif) as picture:
        assert picture.n_frames == 3 and picture.size[0] == 960
    assert "3 frames of 1280x720" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


def test_cli__mp4_needs_ffmpeg(tmp_path, monkeypatch):
    import agents.gazer as gazer_module

    monkeypatch.setattr(gazer_module.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="ffmpeg"):
        gazer_module._write_animation([torch.zeros(4, 4, 3, dtype=torch.uint8).numpy()], Path(tmp_path / "x.mp4"), 8.0)


def test_bench_gazer__times_every_engine_on_cpu_and_appends_markdown(tmp_path):
    from experiments.bench_gazer import main as bench_main

    out, md = tmp_path / "gazer.json", tmp_path / "benchmarks.md"
    md.write_text("earlier content\n")
    argv = ["--device", "cpu", "--dtype", "fp32", "--preset", "tiny", "--frames", "3", "--k", "2", "--ratios", "0.1"]
    argv += ["--batch-sizes", "2", "--all", "--repeats", "1", "--warmup", "0", "--out", str(out), "--markdown", str(md)]
    result = bench_main(argv)
    rows = json.loads(out.read_text())["rows"]
    assert [r["engine"] for r in rows] == ["reference", "static"]  # no CUDA graphs on CPU
    assert all(r["ms"] > 0 and r["same"] == 1.0 and r["official_ms"] is None for r in rows)
    assert rows[1]["speedup_vs_reference"] == pytest.approx(rows[0]["ms"] / rows[1]["ms"])
    assert result["dtype"] == "fp32"
    text = md.read_text()
    assert text.startswith("earlier content\n") and "## gazer" in text and "| 2 | 0.1 | 2 | static |" in text
