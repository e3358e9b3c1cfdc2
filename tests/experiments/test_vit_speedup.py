"""The ViT speed-up experiment: tokens, masking, and a tiny end-to-end run on CPU."""

import json

import pytest
import torch
import torch.nn.functional as F

from experiments.vit_speedup import MultiScaleViT, main
from gaze_env.patches import PatchGrid

TINY_GRID = PatchGrid((16, 32, 64), 8)  # 2x2 + 4x4 + 8x8 = 84 patches


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_vit(**kw) -> MultiScaleViT:
    torch.manual_seed(0)
    args = dict(grid=TINY_GRID, patch_size=8, dim=32, depth=2, heads=2, mlp_ratio=2.0, max_frames=3)
    args.update(kw)
    return MultiScaleViT(**args).eval()


def test_multi_scale_vit__tokens_are_patches_resized_to_the_vit_patch():
    frames = torch.rand(1, 2, 3, 64, 64)
    patches = tiny_vit().patches(frames)  # (1, 2, 84, 3 * 8 * 8)
    assert patches.shape == (1, 2, 84, 192)
    coarse = F.interpolate(frames[0, 1:2], size=(16, 16), mode="bilinear", antialias=True)  # scale 16: 2x2
    torch.testing.assert_close(patches[0, 1, 3], coarse[0, :, 8:, 8:].reshape(-1))  # patch (1, 1) of scale 0
    finest = int(TINY_GRID.flatten(torch.tensor(2), torch.tensor(5), torch.tensor(2)))
    torch.testing.assert_close(patches[0, 0, finest], frames[0, 0, :, 40:48, 16:24].reshape(-1))
    # a ViT patch of 4 px: every patch resized to 4x4
    assert tiny_vit(patch_size=4).patches(frames).shape == (1, 2, 84, 48)


def test_multi_scale_vit__full_baseline_is_every_finest_patch_and_padding_is_masked():
    vit = tiny_vit()
    frames = torch.rand(2, 3, 3, 64, 64)
    finest = torch.arange(3)[:, None] * 84 + torch.arange(20, 84)
    with torch.no_grad():
        torch.testing.assert_close(vit(frames), vit(frames, finest.flatten().expand(2, -1)))
        index = torch.tensor([[0, 5, 84 + 30, 168 + 83], [7, 90, 0, 0]])
        valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
        padded = vit(frames, index, valid)
        alone = vit(frames[1:], index[1:, :2])
    torch.testing.assert_close(padded[1, :2], alone[0], atol=1e-5, rtol=1e-5)


def test_vit_speedup__runs_on_cpu_with_a_tiny_config_and_appends_markdown(tmp_path):
    out, md = tmp_path / "vit.json", tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n\nearlier content\n")
    argv = ["--device", "cpu", "--dtype", "fp32", "--preset", "tiny", "--frames", "2", "--dim", "32", "--depth"]
    argv += ["1", "--heads", "2", "--ratios", "0.05", "0.25", "--repeats", "1", "--warmup", "0", "--batch-size", "2"]
    result = main([*argv, "--out", str(out), "--markdown", str(md)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    tokens = [row["tokens"] for row in saved["rows"]]
    assert tokens == [2 * 64, 2 * 4, 2 * 21]  # full finest grid; int(ratio * 84) gazes per frame
    assert all(row["ms"] > 0 for row in saved["rows"]) and "speedup" in saved["rows"][1]
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nearlier content\n") and "## ViT speed-up" in text
    assert "| 0.25 | 42 |" in text
