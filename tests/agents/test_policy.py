"""AutoGazePolicy: equivalence with the official fixtures, masks, caching, scoring and persistence."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from agents.policy import PRESETS, AutoGazePolicy, Gazes, PolicyConfig, preprocess, rope_inv_freq

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official_autogaze"
THRESHOLDS = {"small_k1": -0.2412, "small_k3": -0.2066}  # outputs.json -> b.task_loss_requirement
OFFICIAL_KEYS = ("gazing_pos", "if_padded_gazing", "num_gazing_each_frame")


# ---- helpers ----------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is faster and does not fight other processes for cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_fixture(name: str):
    folder = FIXTURES / name
    model = AutoGazePolicy.load_official(folder).eval()
    video = load_file(folder / "inputs.safetensors")["video"]
    expected = load_file(folder / "outputs.safetensors")
    trace = json.loads((folder / "outputs.json").read_text())
    return model, video, expected, trace


@pytest.fixture(scope="module", params=["small_k1", "small_k3"])
def fixture(request):
    return (request.param, *load_fixture(request.param))


def official_calls(trace: dict, key: str) -> dict[int, list[int]]:
    """frame -> indices of its decoder calls (step s of the frame is the s-th call)."""
    calls: dict[int, list[int]] = {}
    for c in trace[key]["decoder_calls"]:
        calls.setdefault(c["frame"], []).append(c["call"])
    return calls


def assert_official_equal(out: dict, expected: dict, prefix: str) -> None:
    for k in OFFICIAL_KEYS:
        assert torch.equal(out[k], expected[f"{prefix}_{k}"]), f"{prefix}_{k} differs"


def small_config(**kw) -> PolicyConfig:
    """N = 1 + 4 + 16 = 21 patches, P = 16 vision tokens: fast random models."""
    base = dict(
        input_img_size=32,
        scales=(8, 16, 32),
        patch_size=8,
        encoder_patch_size=8,
        encoder_hidden_size=8,
        hidden_size=16,
        intermediate_size=32,
        num_layers=2,
        num_heads=2,
        num_multi_token_pred=1,
        max_num_frames=4,
    )
    base.update(kw)
    return PolicyConfig(**base)


def random_model(seed: int, **kw) -> AutoGazePolicy:
    """A model whose logits and loss predictions are spread out (no near-ties in greedy choices)."""
    torch.manual_seed(seed)
    model = AutoGazePolicy(small_config(**kw)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # our parts feed the logits more directly (a product of two projections; a wide canvas embedding)
            std = 0.05 if name.startswith(("pointer.", "canvas_embed.")) else 0.5
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if name.endswith("norm.weight") else 0.0))
    return model


def random_video(seed: int, B: int, T: int, size: int = 32) -> torch.Tensor:
    return torch.randn(B, T, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))


@torch.no_grad()
def naive_greedy(
    model: AutoGazePolicy, video, budgets, thresholds, min_gazes_per_frame: int
) -> list[list[tuple[int, int]]]:
    """Reference generation without any cache: every step re-scores the whole trajectory so far
    (plus K placeholder steps whose logits / loss predictions come from the current last row)."""
    cfg = model.config
    K, N = cfg.num_multi_token_pred, cfg.num_patches
    out = []
    for b in range(video.shape[0]):
        steps: list[tuple[int, int]] = []  # (action, frame)
        for t in range(video.shape[1]):
            g, used, finished = 0, {N}, False
            while not finished:
                acts = [a for a, _ in steps] + [0] * K
                frames = [f for _, f in steps] + [t] * K
                td = model.score(
                    video[b : b + 1],
                    torch.tensor([acts]),
                    torch.tensor([frames]),
                    torch.ones(1, len(acts), dtype=torch.bool),
                    masked=False,
                    return_logits=True,
                )
                n0 = len(steps)
                logits = td["logits"][0, n0:].clone()  # (K, V): heads 0..K-1 at the last real row
                # the loss before slot g + i is the loss after the previous slot (unused for slot 0)
                before = [float(td["loss_pred"][0, n0 + i - 1]) if n0 + i >= 1 else float("nan") for i in range(K)]
                logits[:, sorted(used)] = float("-inf")
                n_take = min(K, int(budgets[b, t]) - g)
                for i in range(n_take):
                    tok = int(logits[i].argmax())
                    logits[i + 1 :, tok] = float("-inf")
                    stop = (
                        thresholds is not None and g + i >= min_gazes_per_frame and before[i] <= float(thresholds[b, t])
                    )
                    steps.append((N if stop else tok, t))
                    finished |= stop
                    if not stop:
                        used.add(tok)
                    if stop and not cfg.stop_per_head:
                        break
                g += sum(1 for _, f in steps[n0:])
                finished |= g >= int(budgets[b, t])
        out.append(steps)
    return out


def follows_stop_in_frame(traj, stop: int) -> torch.Tensor:
    """(B, L) bool: a valid step after a STOP of the same frame."""
    out = torch.zeros_like(traj["valid"])
    for b in range(out.shape[0]):
        stopped = set()
        n = int(traj["valid"][b].sum())
        for step, (a, f) in enumerate(zip(traj["action"][b, :n].tolist(), traj["frame_id"][b, :n].tolist())):
            out[b, step] = f in stopped
            if a == stop:
                stopped.add(f)
    return out


# ---- official fixtures -------------------------------------------------------------------------
def test_load_official__config_and_debug_tensors(fixture):
    name, model, video, expected, _ = fixture
    cfg = model.config
    assert (cfg.num_patches, cfg.tokens_per_frame, cfg.patch_size, cfg.scales) == (265, 196, 16, (32, 64, 112, 224))
    assert cfg.num_multi_token_pred == {"small_k1": 1, "small_k3": 3}[name]
    assert cfg.official_decode_quirks and cfg.stop_per_head and cfg.resize_input and not cfg.value_head
    assert model.num_parameters == {"small_k1": 97376, "small_k3": 114464}[name]
    assert torch.equal(rope_inv_freq(cfg), expected["dbg_rope_inv_freq"])
    with torch.no_grad():
        tokens, _ = model.encode(video)
    torch.testing.assert_close(tokens[0], expected["dbg_vision_features_clip0"], atol=1e-6, rtol=0)


def test_generate__greedy_matches_official_gazes_logits_and_loss_predictions(fixture):
    name, model, video, expected, trace = fixture
    for prefix, thr in (("a", None), ("b", THRESHOLDS[name])):
        gazes = model.generate(video, gazing_ratio=0.1, task_loss_requirement=thr, return_logits=True)
        assert_official_equal(gazes.to_official(), expected, prefix)
        # every emitted slot's head logits and the loss predictions of the official decoder calls
        K, V = model.config.num_multi_token_pred, model.config.vocab_size
        step_logits = expected[f"{prefix}_step_logits"].view(-1, 2, K, V)  # (S, B, K, V)
        step_loss = expected[f"{prefix}_step_task_loss_prediction"]  # (S, B, K)
        calls = official_calls(trace, prefix)
        ours, theirs, ours_loss, theirs_loss = [], [], [], []
        for b, t, j in gazes.emitted.nonzero().tolist():
            s, i = divmod(j, K)
            ours.append(gazes.logits[b, t, j])
            theirs.append(step_logits[calls[t][s], b, i])
            nxt = (s, i + 1) if i + 1 < K else (s + 1, 0)
            if nxt[0] < len(calls[t]):
                ours_loss.append(gazes.loss_pred[b, t, j])
                theirs_loss.append(step_loss[calls[t][nxt[0]], b, nxt[1]])
        assert len(ours) == int(gazes.emitted.sum()) and len(ours_loss) > len(ours) // 2
        torch.testing.assert_close(torch.stack(ours), torch.stack(theirs), atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.stack(ours_loss), torch.stack(theirs_loss), atol=1e-6, rtol=0)


def test_generate__early_stop_counts_match_official(fixture):
    name, model, video, expected, trace = fixture
    gazes = model.generate(video, gazing_ratio=0.1, task_loss_requirement=THRESHOLDS[name])
    assert gazes.num_gazes.tolist() == trace["b"]["real_gazes_per_clip_frame"]
    after_stop = (gazes.ids == 265).long().cummax(-1).values.bool() & gazes.is_gaze
    assert bool(after_stop.any()) == (name == "small_k3")  # per-head stop: gazes may follow a STOP


def test_generate__correct_positions_differ_slightly_but_pick_the_same_gazes(fixture):
    name, model, video, expected, _ = fixture
    fixed = AutoGazePolicy(replace(model.config, official_decode_quirks=False)).eval()
    fixed.load_state_dict(model.state_dict())
    gazes = fixed.generate(video, gazing_ratio=0.1, return_logits=True)
    assert_official_equal(gazes.to_official(), expected, "a")
    stale = model.generate(video, gazing_ratio=0.1, return_logits=True)
    diff = (gazes.logits - stale.logits).abs().max()
    assert 1e-6 < diff < 1e-3  # positions matter a little (README: up to 2.5e-4)


def test_score__teacher_forced_probs_and_loss_predictions_match_official(fixture):
    name, model, video, expected, _ = fixture
    K, V = model.config.num_multi_token_pred, model.config.vocab_size
    for prefix in ("c", "c2"):
        src = "a" if prefix == "c" else "b"
        with torch.no_grad():
            out = model.score_official(video, *(expected[f"{src}_{k}"] for k in OFFICIAL_KEYS))
        torch.testing.assert_close(out["gaze_probs"], expected[f"{prefix}_gaze_probs"], atol=1e-6, rtol=0)
        torch.testing.assert_close(
            out["task_loss_prediction"], expected[f"{prefix}_task_loss_prediction"], atol=1e-6, rtol=0
        )
    # the logits rows: slot j of a frame is predicted by head j % K at row pos - j % K - 1
    counts = expected["a_num_gazing_each_frame"].tolist()
    frame_id = torch.arange(4).repeat_interleave(torch.tensor(counts)).expand(2, -1)
    action = torch.where(expected["a_if_padded_gazing"], 265, expected["a_gazing_pos"] - 265 * frame_id)
    with torch.no_grad():
        td = model.score(
            video, action, frame_id, torch.ones_like(action, dtype=torch.bool), masked=False, return_logits=True
        )
    row_of = {r: i for i, r in enumerate(expected["c_logits_row_index"].tolist())}
    rows = expected["c_logits_rows"].view(2, -1, K, V)
    ours, theirs, n = [], [], 0
    for t, count in enumerate(counts):
        for j in range(count):
            pos = (t + 1) * 196 + sum(counts[:t]) + j
            ours.append(td["logits"][:, n])
            theirs.append(rows[:, row_of[pos - j % K - 1], j % K])
            n += 1
    torch.testing.assert_close(torch.stack(ours), torch.stack(theirs), atol=1e-6, rtol=0)


def test_generate__streaming_one_frame_at_a_time_equals_whole_clip(fixture):
    name, model, video, expected, _ = fixture
    for prefix, thr in (("a", None), ("b", THRESHOLDS[name])):
        whole = model.generate(video, gazing_ratio=0.1, task_loss_requirement=thr)
        state = model.new_state(2, max_frames=4, max_gazes_per_frame=26)
        parts = [
            model.generate(video[:, t : t + 1], gazing_ratio=0.1, task_loss_requirement=thr, state=state)
            for t in range(4)
        ]
        streamed = Gazes.cat(parts)
        assert state.frames_seen == 4
        assert_official_equal(streamed.to_official(), expected, prefix)
        torch.testing.assert_close(streamed.loss_pred, whole.loss_pred, atol=1e-6, rtol=0)
        torch.testing.assert_close(streamed.log_prob, whole.log_prob, atol=1e-6, rtol=0)
        # official per-frame ids offset by 265 * t when each frame is converted on its own
        first = parts[2].to_official(frame_offset=2)["gazing_pos"]
        assert int(first.min()) >= 2 * 265


def test_load_official__our_optional_parts_are_the_only_keys_allowed_missing(tmp_path):
    model = AutoGazePolicy.load_official(FIXTURES / "small_k1", value_head=True)
    assert model.value_head is not None
    ours = AutoGazePolicy.load_official(FIXTURES / "small_k1", canvas_input=True, pointer_head=True)
    official = AutoGazePolicy.load_official(FIXTURES / "small_k1")
    assert {k.split(".")[0] for k in set(ours.state_dict()) - set(official.state_dict())} == {"canvas_embed", "pointer"}
    for k, v in official.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((FIXTURES / "small_k1" / "config.json").read_text())
    state = load_file(FIXTURES / "small_k1" / "model.safetensors")
    del state["gazing_model.connector.pos_embed"]
    save_file(state, broken / "model.safetensors")
    with pytest.raises(ValueError, match="pos_embed"):
        AutoGazePolicy.load_official(broken)


# ---- paper configuration -----------------------------------------------------------------------
@pytest.mark.parametrize("k", [10, 1])
def test_paper_preset__state_dict_equals_official_manifest(k):
    manifest = json.loads((FIXTURES / "paper_manifest.json").read_text())["configs"][f"K{k}"]
    model = AutoGazePolicy.from_preset("paper", num_multi_token_pred=k)
    ours = {name: list(t.shape) for name, t in model.state_dict().items()}
    theirs = {e["key"]: e["shape"] for e in manifest["state_dict"]}
    assert ours == theirs
    assert model.num_parameters == manifest["total_parameters"] == {10: 3_258_240, 1: 2_796_864}[k]
    torch.testing.assert_close(rope_inv_freq(model.config), torch.tensor(manifest["rope_inv_freq"]), atol=0, rtol=0)


def test_presets__geometry_and_value_head():
    assert {n: (c.num_patches, c.tokens_per_frame, c.max_num_frames) for n, c in PRESETS.items()} == {
        "tiny": (84, 64, 8),
        "small": (265, 196, 16),
        "paper": (265, 196, 16),
    }
    plain = AutoGazePolicy.from_preset("tiny")
    critic = AutoGazePolicy.from_preset("tiny", value_head=True)
    assert set(critic.state_dict()) - set(plain.state_dict()) == {"value_head.weight", "value_head.bias"}
    with pytest.raises(ValueError, match="unknown policy preset"):
        AutoGazePolicy.from_preset("huge")


def test_encode__takes_a_canvas_exactly_when_the_config_says_so():
    video = random_video(0, 2, 3)
    plain, canvas = random_model(0), random_model(0, canvas_input=True)
    with pytest.raises(ValueError, match="takes no canvas"):
        plain.encode(video, canvas=video)
    with pytest.raises(ValueError, match="needs the canvases"):
        canvas.encode(video)
    with pytest.raises(ValueError, match="shaped like the frames"):
        canvas.encode(video, canvas=video[:, :1])
    # the canvas changes the tokens; the frames' own embedding is the official one
    a, _ = canvas.encode(video, canvas=video)
    b, _ = canvas.encode(video, canvas=torch.zeros_like(video))
    assert not torch.allclose(a, b)


def test_start_canvases__are_the_environments_paste_canvas_at_each_frame_start():
    """The policy's own canvas (preprocessed floats, unrounded views) follows the env's uint8
    paste canvas to within the env's rounding, over random gazes with ragged budgets."""
    from agents.baselines import make_baseline, run_episodes
    from agents.policy import start_canvases
    from gaze_env import core
    from gaze_env.builder import build
    from tests.conftest import random_clips

    built = build("tiny", reward="frame")
    video = random_clips(3, seed=4)
    budgets = torch.tensor([[3, 1, 8, 2, 5, 4, 1, 6]]).expand(3, -1)
    td = run_episodes(make_baseline("random"), built.params, video, budgets, generator=torch.Generator().manual_seed(0))
    state = core.reset(built.params, video, budgets=budgets)
    starts = [state.canvas.clone()]
    for step in range(td["action"].shape[1]):
        t = state.t.clone()
        core.step(built.params, state, torch.where(td["valid"][:, step], td["action"][:, step], 84))
        if bool((state.t != t).any()) and len(starts) < 8:
            assert bool((state.t != t).all())  # budgets shared by the rows: frames end together
            starts.append(state.canvas.clone())
    env = preprocess(torch.stack(starts, 1))  # (B, T, 3, H, W)
    ours = start_canvases(PRESETS["tiny"].grid, preprocess(video), td["action"], td["frame_id"], td["valid"])
    assert ours.dtype == torch.float32 and ours.shape == env.shape
    rounding = 0.5 / 127.5 / 0.224  # half a uint8 step, preprocessed (the smallest std)
    assert float((ours - env).abs().max()) <= rounding * 1.01
    assert float((ours[:, 1:] - ours[:, :-1]).abs().max()) > 1.0  # the canvas does change


def test_pool_matrix__rows_are_the_area_fractions_of_tokens_in_a_patch():
    from agents.policy import pool_matrix

    tiny = pool_matrix(PRESETS["tiny"])  # (84, 64): 8 px tokens, patches of 32, 16, 8 px
    torch.testing.assert_close(tiny.sum(1), torch.ones(84))
    assert torch.equal(tiny[20:], torch.eye(64))  # a finest patch is one token
    quarter = torch.zeros(8, 8, dtype=torch.bool)
    quarter[:4, :4] = True  # the first coarse patch: the top-left 4 x 4 tokens
    assert torch.equal((tiny[0] > 0).view(8, 8), quarter)
    paper = pool_matrix(PRESETS["paper"])  # 16 px tokens; scale 64 patches cover 56 px: 3.5 tokens a side
    torch.testing.assert_close(paper.sum(1), torch.ones(265))
    first = paper[4].view(14, 14)  # scale 64, patch (0, 0): pixels [0, 56)
    torch.testing.assert_close(first[3, 3], torch.tensor(0.5 * 0.5 * 16 * 16 / 56**2))
    assert float(first[:4, :4].sum()) == pytest.approx(1.0) and float(first[4:].sum() + first[:, 4:].sum()) == 0


def test_pointer_head__adds_the_pooled_query_key_match_to_the_patch_logits():
    model = random_model(3, pointer_head=True, pointer_dim=4, num_multi_token_pred=2)
    cfg, ptr = model.config, model.pointer
    vision = torch.randn(2, cfg.tokens_per_frame, cfg.hidden_size)  # (B, P, H) final hidden states
    tokens = torch.randn(2, cfg.tokens_per_frame, cfg.hidden_size)  # (B, P, H) encoder tokens
    hidden = torch.randn(2, cfg.hidden_size)
    with torch.no_grad():
        keys = ptr.patch_keys(vision, tokens)  # (B, N, d)
        nothing = torch.zeros(2, cfg.num_patches, dtype=torch.bool)  # no gaze yet: every square uncovered
        got = model._heads(hidden, keys, nothing)[0] - model.gazing_model.gaze_decoder.lm_head(hidden).view(2, 2, -1)
        q = ptr.query(hidden).view(2, 2, 4)
        k_tok = (ptr.key(vision) + ptr.token_key(tokens)).view(2, cfg.tokens_per_frame, 3, 4)  # one per scale
    grid, side = cfg.grid, cfg.input_img_size // cfg.encoder_patch_size
    for v in (0, 3, 7, 20):  # patches of every scale
        y0, x0, y1, x1 = (int(c) // cfg.encoder_patch_size for c in grid.regions[v])
        inside = [r * side + c for r in range(y0, y1) for c in range(x0, x1)]
        want = (q[:, :, None] * k_tok[:, inside, int(grid.patch_scale[v])][:, None]).sum(-1).mean(-1) / 2
        torch.testing.assert_close(got[:, :, v], want, atol=1e-5, rtol=1e-5)
    assert float(got[:, :, -1].abs().max()) == 0  # STOP gets nothing from the pointer


def test_preprocess__rescales_then_imagenet_normalises():
    video = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    out = preprocess(video)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(out[0, :, 0, 0], (-1 - mean) / std)
    torch.testing.assert_close(out[1, :, 0, 0], (1 - mean) / std)
    with pytest.raises(TypeError, match="uint8"):
        preprocess(video.float())


# ---- generation invariants on random models ----------------------------------------------------
VARIANTS = {  # the optional architecture parts, off (the official model) and on
    "official": {},
    "canvas": {"canvas_input": True},
    "pointer": {"pointer_head": True, "pointer_dim": 4},
    "both": {"canvas_input": True, "pointer_head": True, "pointer_dim": 4, "pointer_coverage": True},  # as the presets
}
CASE = dict(
    variant=st.sampled_from(sorted(VARIANTS)),
    seed=st.integers(0, 10_000),
    k=st.sampled_from([1, 2, 3, 5]),
    batch=st.integers(1, 3),
    frames=st.integers(1, 3),
    temperature=st.sampled_from([0.0, 0.7, 1.5]),
    stop_per_head=st.booleans(),
    use_threshold=st.booleans(),
    ragged=st.booleans(),
    min_gazes_per_frame=st.sampled_from([0, 1, 2]),
)


def draw_budgets(seed: int, B: int, T: int, ragged: bool, N: int = 21) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 2)
    if ragged:
        return torch.randint(1, 9, (B, T), generator=g)
    return torch.randint(1, 9, (1, T), generator=g).expand(B, T)


def threshold_for(model, video, budgets, seed: int) -> torch.Tensor:
    """A threshold between two of the model's loss predictions, so that some frames stop."""
    out = model.generate(video, frame_budgets=budgets)
    preds = out.loss_pred[out.emitted].unique()  # sorted
    if preds.numel() < 2:
        return preds[0] + 1e-3
    q = torch.rand(1, generator=torch.Generator().manual_seed(seed + 3)).item() * 0.6 + 0.2
    i = int(q * (preds.numel() - 1))
    return (preds[i] + preds[i + 1]) / 2


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**CASE)
def test_generate__masks_budgets_and_stop_rule_hold(
    variant, seed, k, batch, frames, temperature, stop_per_head, use_threshold, ragged, min_gazes_per_frame
):
    model = random_model(seed, num_multi_token_pred=k, stop_per_head=stop_per_head, **VARIANTS[variant])
    N = model.config.num_patches
    video = random_video(seed, batch, frames)
    budgets = draw_budgets(seed, batch, frames, ragged)
    thr = threshold_for(model, video, budgets, seed) if use_threshold else None
    gen = torch.Generator().manual_seed(seed)
    out = model.generate(
        video,
        frame_budgets=budgets,
        task_loss_requirement=thr,
        temperature=temperature,
        generator=gen,
        min_gazes_per_frame=min_gazes_per_frame,
    )
    count = out.emitted.sum(-1)
    assert bool((count <= budgets).all()) and bool((count >= 1).all())
    for b in range(batch):
        for t in range(frames):
            n = int(count[b, t])
            assert bool(out.emitted[b, t, :n].all()) and not bool(out.emitted[b, t, n:].any())  # contiguous
            ids = out.ids[b, t, :n].tolist()
            gazes = [i for i in ids if i != N]
            assert len(set(gazes)) == len(gazes) and all(0 <= i < N for i in gazes)  # no repeats, in range
            stops = [j for j, i in enumerate(ids) if i == N]
            if thr is None:
                assert not stops and n == int(budgets[b, t])
            for j in stops:
                assert j >= min_gazes_per_frame
                if j >= 1:
                    assert float(out.loss_pred[b, t, j - 1]) <= float(thr)  # stop only when the loss is met
            for j, i in enumerate(ids):
                if i != N and thr is not None and j >= max(1, min_gazes_per_frame):
                    assert float(out.loss_pred[b, t, j - 1]) > float(thr)  # a real gaze only when it is not
            if stops and not stop_per_head:
                assert stops == [n - 1]  # STOP ends the frame
            if not stops:
                assert n == int(budgets[b, t])
    assert bool((out.log_prob[out.is_gaze] < 0).all()) and bool((out.log_prob[~out.is_gaze] == 0).all())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    variant=st.sampled_from(sorted(VARIANTS)),
    seed=st.integers(0, 10_000),
    k=st.sampled_from([1, 2, 3]),
    batch=st.integers(1, 3),
    frames=st.integers(1, 3),
    stop_per_head=st.booleans(),
    use_threshold=st.booleans(),
    ragged=st.booleans(),
    min_gazes_per_frame=st.sampled_from([1, 2]),
)
def test_generate__cached_equals_recomputing_the_full_sequence(
    variant, seed, k, batch, frames, stop_per_head, use_threshold, ragged, min_gazes_per_frame
):
    model = random_model(seed, num_multi_token_pred=k, stop_per_head=stop_per_head, **VARIANTS[variant])
    video = random_video(seed, batch, frames)
    budgets = draw_budgets(seed, batch, frames, ragged)
    thr = threshold_for(model, video, budgets, seed) if use_threshold else None
    out = model.generate(
        video, frame_budgets=budgets, task_loss_requirement=thr, min_gazes_per_frame=min_gazes_per_frame
    )
    if thr is not None:  # keep away from fp ties with the threshold
        assume(bool(((out.loss_pred - thr).abs() > 1e-4)[out.emitted].all()))
    traj = out.to_trajectory()
    reference = naive_greedy(
        model, video, budgets, None if thr is None else thr.expand(batch, frames), min_gazes_per_frame
    )
    for b in range(batch):
        n = int(traj["valid"][b].sum())
        assert list(zip(traj["action"][b, :n].tolist(), traj["frame_id"][b, :n].tolist())) == reference[b]
    # each clip alone gives what it gives in the batch (ragged budgets, no cross-clip effects)
    alone = model.generate(
        video[-1:], frame_budgets=budgets[-1:], task_loss_requirement=thr, min_gazes_per_frame=min_gazes_per_frame
    )
    G = alone.ids.shape[-1]
    assert torch.equal(alone.ids, out.ids[-1:, :, :G]) and torch.equal(alone.emitted, out.emitted[-1:, :, :G])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**CASE)
def test_generate__log_probs_loss_and_values_equal_teacher_forced_scores(
    variant, seed, k, batch, frames, temperature, stop_per_head, use_threshold, ragged, min_gazes_per_frame
):
    model = random_model(
        seed, num_multi_token_pred=k, stop_per_head=stop_per_head, value_head=True, **VARIANTS[variant]
    )
    video = random_video(seed, batch, frames)
    budgets = draw_budgets(seed, batch, frames, ragged)
    thr = threshold_for(model, video, budgets, seed) if use_threshold else None
    gen = torch.Generator().manual_seed(seed)
    out = model.generate(
        video,
        frame_budgets=budgets,
        task_loss_requirement=thr,
        temperature=temperature,
        generator=gen,
        min_gazes_per_frame=min_gazes_per_frame,
    )
    traj = out.to_trajectory()
    scored = model.score(
        video, traj["action"], traj["frame_id"], traj["valid"], masked=True, temperature=temperature or 1.0
    )
    for key in ("loss_pred", "value"):
        torch.testing.assert_close(scored[key], traj[key], atol=1e-4, rtol=1e-4, msg=key)
    # with the per-head stop, a gaze after a STOP of the same step was also masked from the pick the
    # STOP replaced, which the trajectory does not record: those log-probs are not reproducible
    comparable = ~follows_stop_in_frame(traj, 21)
    assert stop_per_head or bool(comparable.all())
    torch.testing.assert_close(scored["log_prob"][comparable], traj["log_prob"][comparable], atol=1e-4, rtol=1e-4)
    # the masked distribution never gives mass to STOP or to a patch gazed earlier in the frame
    assert bool((scored["entropy"][traj["valid"] & (traj["action"] != 21)] > 0).all())


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    variant=st.sampled_from(sorted(VARIANTS)),
    seed=st.integers(0, 10_000),
    k=st.sampled_from([1, 3]),
    temperature=st.sampled_from([0.0, 1.0]),
)
def test_generate__streaming_equals_whole_clip_on_random_models(variant, seed, k, temperature):
    model = random_model(seed, num_multi_token_pred=k, value_head=True, **VARIANTS[variant])
    video = random_video(seed, 2, 3)
    budgets = draw_budgets(seed, 2, 3, ragged=True)
    thr = threshold_for(model, video, budgets, seed)
    whole = model.generate(
        video,
        frame_budgets=budgets,
        task_loss_requirement=thr,
        temperature=temperature,
        generator=torch.Generator().manual_seed(seed),
    )
    gen = torch.Generator().manual_seed(seed)
    state = model.new_state(2, max_frames=3, max_gazes_per_frame=8)
    streamed = Gazes.cat(
        [
            model.generate(
                video[:, t : t + 1],
                frame_budgets=budgets[:, t : t + 1],
                task_loss_requirement=thr,
                temperature=temperature,
                generator=gen,
                state=state,
            )
            for t in range(3)
        ]
    )
    G = streamed.ids.shape[-1]
    assert torch.equal(streamed.ids, whole.ids[..., :G]) and torch.equal(streamed.emitted, whole.emitted[..., :G])
    for key in ("log_prob", "loss_pred", "value"):
        torch.testing.assert_close(getattr(streamed, key), getattr(whole, key)[..., :G], atol=1e-4, rtol=1e-4)


def test_generate__multi_token_output_has_the_same_form_as_single_token():
    video = random_video(0, 2, 3)
    outs = {}
    for k in (1, 10):
        model = random_model(1, num_multi_token_pred=k, value_head=True)
        outs[k] = model.generate(video, gazing_ratio=0.5, return_logits=True)
    one, ten = outs[1], outs[10]
    for name in ("ids", "emitted", "log_prob", "loss_pred", "value", "logits"):
        a, b = getattr(one, name), getattr(ten, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
    assert torch.equal(one.emitted, ten.emitted) and bool((ten.num_gazes == 10).all())
    for key, value in one.to_official().items():
        assert ten.to_official()[key].shape == value.shape and ten.to_official()[key].dtype == value.dtype
    assert set(one.to_trajectory().keys()) == set(ten.to_trajectory().keys())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_generate__a_bf16_copy_generates_valid_gazes_close_to_float32(variant):
    model = random_model(2, num_multi_token_pred=3, **VARIANTS[variant])
    copy = AutoGazePolicy(model.config).to(torch.bfloat16).eval()  # what train_bc --bench times on CUDA
    copy.load_state_dict(model.state_dict())
    video = random_video(2, 2, 3)
    out = copy.generate(video.to(torch.bfloat16), gazing_ratio=0.5)
    ref = model.generate(video, gazing_ratio=0.5)
    assert torch.equal(out.num_gazes, ref.num_gazes) and out.log_prob.dtype == torch.float32
    N = model.config.num_patches
    for b in range(2):  # distinct real patches within each frame
        ids = out.ids[b][out.emitted[b]].view(3, -1)
        assert bool((ids < N).all()) and all(len(set(row.tolist())) == row.numel() for row in ids)
    if model.config.pointer_coverage:  # the coverage fractions stay exact in the bf16 copy
        gazed = torch.rand(4, N, generator=torch.Generator().manual_seed(0)) < 0.3
        assert torch.equal(copy.pointer.coverage(gazed), model.pointer.coverage(gazed))


def test_generate__rejects_bad_arguments():
    model = random_model(0)
    video = random_video(0, 1, 2)
    with pytest.raises(ValueError, match="torch.Generator"):
        model.generate(video, gazing_ratio=0.5, temperature=1.0)
    with pytest.raises(ValueError, match=r"budgets must lie in \[1, 21\]"):
        model.generate(video, frame_budgets=torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match="gazing_ratio, frame_budgets or task_loss_requirement"):
        model.generate(video)
    with pytest.raises(ValueError, match="free cache slots"):
        model.generate(video, gazing_ratio=0.5, state=model.new_state(1, max_frames=1, max_gazes_per_frame=2))
    with pytest.raises(ValueError, match="32x32"):
        model.generate(random_video(0, 1, 2, size=64), gazing_ratio=0.5)


def test_score__masked_and_unmasked_agree_on_first_gazes_and_differentiate():
    model = random_model(3, num_multi_token_pred=2)
    video = random_video(3, 2, 2)
    out = model.generate(video, frame_budgets=torch.tensor([[4, 2], [3, 5]]))
    traj = out.to_trajectory()
    masked = model.score(video, traj["action"], traj["frame_id"], traj["valid"])
    plain = model.score(video, traj["action"], traj["frame_id"], traj["valid"], masked=False)
    assert bool((masked["log_prob"] >= plain["log_prob"] - 1e-6).all())  # renormalised over fewer ids
    masked["log_prob"].sum().backward()
    assert model.gazing_model.gaze_decoder.lm_head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="non-decreasing"):
        model.score(video, traj["action"], traj["frame_id"].flip(1), traj["valid"])


# ---- persistence -------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["official", "both"])
def test_save_pretrained__round_trip_is_bit_exact(tmp_path, variant):
    model = random_model(5, num_multi_token_pred=3, value_head=True, **VARIANTS[variant])
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = AutoGazePolicy.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    for (n1, a), (n2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(a, b)
    video = random_video(5, 2, 2)
    a, b = model.generate(video, gazing_ratio=0.3), loaded.generate(video, gazing_ratio=0.3)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.log_prob, b.log_prob) and torch.equal(a.value, b.value)
    with pytest.raises(ValueError, match="load_official"):
        AutoGazePolicy.from_pretrained(FIXTURES / "small_k1")
