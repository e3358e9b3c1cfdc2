import pytest
import torch

from agents.policy import AutoGazePolicy, preprocess
from agents.rollout import RolloutEngine, core_replay, paste_replay, paste_replay_supported, replay, rollout
from gaze_env.builder import build
from tests.conftest import OFFICIAL_PARTS, random_clips


def test_rollout__rewards_and_losses_come_from_the_env_and_log_probs_from_the_policy():
    built = build("tiny", videos=random_clips(1))
    policy = AutoGazePolicy.from_preset("tiny").eval()
    video = random_clips(3, seed=5)
    budgets = torch.tensor([[3, 2, 2, 2, 2, 2, 2, 1]]).expand(3, 8)
    td = rollout(policy, built.params, built.reward, video, budgets=budgets, temperature=1.0,
                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(td["valid"].sum(1), budgets.sum(1))  # budgets used, no STOP needed
    # the frame reward pays -loss once per frame: returns equal minus the summed frame losses
    assert torch.allclose(td["reward"].sum(1), -td["frame_loss"].sum(1), atol=1e-6)
    last = td["valid"].sum(1) - 1
    assert torch.allclose(td["loss_after"].gather(1, last[:, None])[:, 0], td["frame_loss"][:, -1])
    scored = policy.score(preprocess(video), td["action"], td["frame_id"], td["valid"])
    assert torch.allclose(scored["log_prob"][td["valid"]], td["log_prob"][td["valid"]], atol=1e-5)


def test_rollout__task_loss_requirement_stops_frames_with_stop_actions():
    built = build("tiny", videos=random_clips(1))
    policy = AutoGazePolicy.from_preset("tiny").eval()
    video = random_clips(2, seed=1)
    td = rollout(policy, built.params, built.reward, video, task_loss_requirement=1e9, temperature=0.0)
    # a requirement everything meets: one gaze then STOP in every frame
    assert torch.equal(td["valid"].sum(1), torch.full((2,), 16))
    assert bool((td["action"][:, 1::2] == 84).all())


# ---- the batched paste replay equals the core's --------------------------------------------------
def random_trajectories(seed: int, B: int, T: int, N: int, budgets: torch.Tensor, stop_rate: float, min_gazes: int = 1,
                        pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) actions and valid mask that a masked policy could emit under ``budgets`` (B, T):
    distinct patches per frame, a frame ending at its budget or earlier with STOP (after at least
    ``min_gazes`` gazes), rows of different lengths padded with garbage."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(B):
        steps = []
        for t in range(T):
            budget = int(budgets[b, t])
            n = budget
            if torch.rand((), generator=g) < stop_rate and budget > min_gazes:
                n = int(torch.randint(min_gazes, budget, (), generator=g))
            steps += torch.randperm(N, generator=g)[:n].tolist() + ([N] if n < budget else [])
        rows.append(steps)
    L = max(len(r) for r in rows) + pad
    action = torch.randint(0, N + 1, (B, L), generator=g)  # garbage in the padding
    valid = torch.zeros(B, L, dtype=torch.bool)
    for b, r in enumerate(rows):
        action[b, : len(r)] = torch.tensor(r)
        valid[b, : len(r)] = True
    return action, valid


@pytest.mark.parametrize("seed", range(6))
def test_paste_replay__equals_the_core_replay_bit_for_bit_with_l1(seed):
    preset = "small" if seed == 5 else "tiny"
    reconstructor = ("paste", "paste-black")[seed % 2]
    min_gazes = 0 if seed == 3 else 1
    built = build(preset, videos=random_clips(1, preset), reward_frame_rate=(1.0, 0.25)[seed % 2],
                  reconstructor=reconstructor, min_gazes_per_frame=min_gazes)
    G = (1, 2, 3)[seed % 3]
    n = 2
    T, N = built.config.num_frames, built.config.grid.num_patches
    video = random_clips(n, preset, seed=seed).repeat_interleave(G, 0)
    g = torch.Generator().manual_seed(seed)
    budgets = torch.randint(max(1, min_gazes), 12 if preset == "tiny" else 40, (n * G, T), generator=g)
    action, valid = random_trajectories(seed, n * G, T, N, budgets, stop_rate=0.4, min_gazes=min_gazes)
    frames = None if seed % 4 else torch.rand(n * G, T, generator=g) < 0.5
    core_td = core_replay(built.params, built.reward, video, action, valid, budgets,
                          torch.Generator().manual_seed(seed), frames)
    paste_td = replay(built.params, built.reward, video, action, valid, budgets,
                      torch.Generator().manual_seed(seed), frames, group_size=G)
    assert paste_replay_supported(built.params, built.reward)
    for key in ("reward", "loss_after", "frame_loss", "frame_start_loss", "scored"):
        assert torch.equal(paste_td[key], core_td[key]), key
    assert bool((action[valid] == N).any())  # the case had STOPs


@pytest.mark.parametrize("loss", ["mse", "psnr"])
@pytest.mark.parametrize("reward", ["frame", "dense"])
def test_paste_replay__equals_the_core_replay_for_squared_losses_and_the_dense_reward(loss, reward):
    built = build("tiny", videos=random_clips(1), reward=reward, reward_kwargs={"loss": loss},
                  gaze_cost=0.01, loss_threshold=0.001 if loss == "mse" else None)
    video = random_clips(4, seed=7)
    budgets = torch.randint(1, 20, (4, 8), generator=torch.Generator().manual_seed(7))
    action, valid = random_trajectories(7, 4, 8, 84, budgets, stop_rate=0.5)
    core_td = core_replay(built.params, built.reward, video, action, valid, budgets)
    paste_td = paste_replay(built.params, built.reward, video, action, valid, budgets)
    for key in ("reward", "loss_after", "frame_loss", "frame_start_loss"):
        # squared errors are not exact in float64: the sums may round differently in the last bit
        torch.testing.assert_close(paste_td[key], core_td[key], rtol=1e-6, atol=1e-7, msg=key)


def test_paste_replay__rejects_trajectories_that_end_early_and_other_rewards():
    built = build("tiny", videos=random_clips(1))
    video = random_clips(2, seed=1)
    budgets = torch.full((2, 8), 3)
    action, valid = random_trajectories(1, 2, 8, 84, budgets, stop_rate=0.0, pad=0)
    with pytest.raises(ValueError, match="ended before"):
        paste_replay(built.params, built.reward, video, action[:, :-2], valid[:, :-2], budgets)
    # a user's reward may read the state: only the core replays it (auto), and paste refuses it
    custom = build("tiny", videos=random_clips(1), reward="tests.rewards.custom_rewards:minus_gazes")
    assert not paste_replay_supported(custom.params, custom.reward)
    with pytest.raises(ValueError, match="paste replay needs"):
        replay(custom.params, custom.reward, video, action, valid, budgets, method="paste")
    td = replay(custom.params, custom.reward, video, action, valid, budgets)
    assert td["reward"].shape == action.shape


@pytest.mark.parametrize("ours", [False, True])
def test_rollout__groups_share_a_clip_and_the_static_engine_samples_what_score_gives_back(ours):
    built = build("tiny", videos=random_clips(1))
    policy = AutoGazePolicy.from_preset("tiny", **({} if ours else OFFICIAL_PARTS)).eval()
    video = random_clips(2, seed=2)
    budgets = torch.tensor([4, 3, 3, 2, 2, 2, 2, 5]).expand(6, 8)
    for kind in ("reference", "static"):
        engine = RolloutEngine(kind)
        td = rollout(policy, built.params, built.reward, video, budgets=budgets, temperature=0.7, group_size=3,
                     generator=torch.Generator().manual_seed(0), engine=engine)
        assert torch.equal(td["video"], video.repeat_interleave(3, 0))
        assert torch.equal(td["valid"].sum(1), budgets.sum(1))
        assert td["action"].view(2, 3, -1).unique(dim=1).shape[1] > 1  # sampled rollouts differ
        scored = policy.score(preprocess(td["video"]), td["action"], td["frame_id"], td["valid"], temperature=0.7)
        assert torch.allclose(scored["log_prob"], td["log_prob"], atol=1e-5)
        assert torch.allclose(scored["loss_pred"], td["loss_pred"], atol=1e-5)
    # greedy: both engines give the same gazes
    greedy = [rollout(policy, built.params, built.reward, video, budgets=budgets, temperature=0.0, group_size=3,
                      engine=RolloutEngine(kind)) for kind in ("reference", "static")]
    assert torch.equal(greedy[0]["action"], greedy[1]["action"])
    assert torch.equal(greedy[0]["frame_loss"], greedy[1]["frame_loss"])


@pytest.mark.parametrize("kind", ["reference", "static"])
def test_rollout_engine__a_bf16_copy_follows_the_policy_weights(kind):
    built = build("tiny", videos=random_clips(1))
    policy = AutoGazePolicy.from_preset("tiny").eval()
    video = random_clips(2, seed=3)
    budgets = torch.full((4, 8), 3)
    engine = RolloutEngine(kind, dtype=torch.bfloat16)
    for _ in range(2):
        expected = [p.detach().to(torch.bfloat16) for p in policy.parameters()]
        td = rollout(policy, built.params, built.reward, video, budgets=budgets, temperature=1.0, group_size=2,
                     generator=torch.Generator().manual_seed(0), engine=engine)
        (copy,) = [c for _, c in engine._copies.values()]
        assert all(torch.equal(c, e) for c, e in zip(copy.parameters(), expected))  # the current weights
        assert copy.gazing_model.gaze_decoder.model.inv_freq.dtype == torch.float32
        scored = policy.score(preprocess(td["video"]), td["action"], td["frame_id"], td["valid"])
        # the copy samples and scores in bf16: log-probs within its rounding of the policy's
        torch.testing.assert_close(td["log_prob"], scored["log_prob"], atol=0.05, rtol=0.02)
        assert td["log_prob"].dtype == torch.float32 and torch.equal(td["valid"].sum(1), budgets.sum(1))
        with torch.no_grad():  # as a training step would: the next call must use the new weights
            for p in policy.parameters():
                p.add_(0.001)  # small: a larger shift sharpens the pointer logits beyond bf16 tolerances


@pytest.mark.gpu
def test_paste_replay__equals_the_core_replay_on_cuda_at_the_paper_geometry():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    built = build("paper", videos=random_clips(1, "paper"))
    T, N = built.config.num_frames, built.config.grid.num_patches
    video = random_clips(2, "paper", seed=4).repeat_interleave(3, 0).cuda()
    budgets = torch.randint(1, 40, (6, T), generator=torch.Generator().manual_seed(4))
    action, valid = random_trajectories(4, 6, T, N, budgets, stop_rate=0.3)
    args = (built.params, built.reward, video, action.cuda(), valid.cuda(), budgets.cuda())
    core_td = core_replay(*args)
    paste_td = paste_replay(*args, group_size=3)
    for key in ("reward", "loss_after", "frame_loss", "frame_start_loss", "scored"):
        assert torch.equal(paste_td[key], core_td[key]), key


@pytest.mark.gpu
@pytest.mark.parametrize("ours", [False, True])
def test_rollout__static_engine_with_cuda_graphs_on_cuda(ours):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    built = build("tiny", videos=random_clips(1))
    policy = AutoGazePolicy.from_preset("tiny", **({} if ours else OFFICIAL_PARTS)).cuda().eval()
    video = random_clips(2, seed=2).cuda()
    budgets = torch.tensor([4, 3, 3, 2, 2, 2, 2, 5], device="cuda").expand(8, 8)
    engine = RolloutEngine()
    assert engine.resolve(video.device) == "static"
    for seed in (0, 1):  # the second call replays the captured graphs
        td = rollout(policy, built.params, built.reward, video, budgets=budgets, temperature=0.7, group_size=4,
                     generator=torch.Generator(device="cuda").manual_seed(seed), engine=engine)
        scored = policy.score(preprocess(td["video"]), td["action"], td["frame_id"], td["valid"], temperature=0.7)
        torch.testing.assert_close(scored["log_prob"], td["log_prob"], atol=1e-4, rtol=1e-4)
        assert torch.equal(td["valid"].sum(1), budgets.sum(1))
    greedy = [rollout(policy, built.params, built.reward, video, budgets=budgets, temperature=0.0, group_size=4,
                      engine=RolloutEngine(kind)) for kind in ("reference", "static")]
    assert torch.equal(greedy[0]["action"], greedy[1]["action"])
    bf16 = RolloutEngine(dtype=torch.bfloat16)  # what --amp uses: a bf16 copy behind the graphs
    for seed in (0, 1):
        td = rollout(policy, built.params, built.reward, video, budgets=budgets, temperature=0.7, group_size=4,
                     generator=torch.Generator(device="cuda").manual_seed(seed), engine=bf16)
        scored = policy.score(preprocess(td["video"]), td["action"], td["frame_id"], td["valid"], temperature=0.7)
        torch.testing.assert_close(scored["log_prob"], td["log_prob"], atol=0.05, rtol=0.02)
