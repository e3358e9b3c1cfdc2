"""Plumbing shared by the entry points in ``experiments/``: typed configs on the command line,
seeding, devices and crash-safe file writes.

A config is a dataclass whose fields carry a docstring each (the string literal right under the
field); ``parse_config`` turns it into an ``argparse`` parser with one ``--field-name`` option
per field and the docstring as its help::

    @dataclass
    class Config:
        preset: str = "tiny"
        \"\"\"Geometry preset: tiny | small | paper.\"\"\"

    cfg = parse_config(Config)  # python -m experiments.x --preset small
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import random
import textwrap
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import numpy as np
import torch

from gaze_env.builder import resolve_source
from gaze_env.config import get_preset
from gaze_env.video import TensorSource, VideoSource, default_source

C = TypeVar("C")

__all__ = [
    "atomic_write_json",
    "atomic_write_text",
    "build_parser",
    "clip_source",
    "commit_dir",
    "config_dict",
    "dir_size",
    "field_docs",
    "parse_config",
    "resolve_device",
    "seed_everything",
]


# ---- configs <-> command line ----------------------------------------------------------------
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (and of its dataclass bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _scalar_parser(tp: Any, name: str, optional: bool):
    """A function str -> value for one field's (element) type."""
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        kind = type(choices[0])
    elif tp in (int, float, str):
        choices, kind = None, tp
    else:
        raise TypeError(
            f"config field {name!r} has type {tp!r}: supported are int, float, str, bool, Literal, "
            "tuple[X, ...] and X | None"
        )

    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if choices is not None and value not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {list(choices)}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse, choices


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """An ``argparse`` parser with one option per field of the dataclass ``cls``.

    ``bool`` fields become ``--flag / --no-flag``; ``tuple[X, ...]`` fields take several values;
    ``X | None`` fields also accept ``none``; ``Literal`` fields list their choices. Both
    ``--field-name`` and ``--field_name`` are accepted.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    parser = argparse.ArgumentParser(
        description=description if description is not None else inspect.getdoc(cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional = _strip_optional(hints[f.name])
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        kwargs: dict[str, Any] = {"dest": f.name}
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default, kwargs["required"] = None, True
        help_text = docs.get(f.name, "")
        if not kwargs.get("required"):
            shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
            help_text = f"{help_text} (default: {shown})".strip()
        kwargs["help"] = help_text.replace("%", "%%")
        if tp is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, **kwargs)
            continue
        if get_origin(tp) is tuple:
            elem = get_args(tp)[0]
            if len(get_args(tp)) != 2 or get_args(tp)[1] is not Ellipsis:
                raise TypeError(f"config field {f.name!r}: only tuple[X, ...] tuples are supported, got {tp!r}")
            kwargs["nargs"] = "+"
            tp = elem
        parse, choices = _scalar_parser(tp, f.name, optional)
        if choices is not None:
            kwargs["metavar"] = "{" + ",".join(map(str, choices)) + "}"
        parser.add_argument(*flags, type=parse, default=default, **kwargs)
    return parser


def parse_config(cls: type[C], argv: Sequence[str] | None = None, description: str | None = None) -> C:
    """Parse ``argv`` (default ``sys.argv[1:]``) into an instance of the dataclass ``cls``."""
    parser = build_parser(cls, description)
    values = vars(parser.parse_args(argv))
    for f in dataclasses.fields(cls):
        if isinstance(values.get(f.name), list):
            values[f.name] = tuple(values[f.name])
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
        raise  # parser.error exits; this keeps type checkers informed


def config_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


# ---- randomness and devices ------------------------------------------------------------------
def seed_everything(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """Seed Python's, NumPy's and torch's global generators (for library code that uses them) and
    return a fresh ``torch.Generator`` on ``device`` seeded with ``seed``, which our own code
    passes around explicitly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator(device=device).manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:<i>``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    return device


# ---- files -----------------------------------------------------------------------------------
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a
    part (temporary file in the same folder, fsync, ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """``atomic_write_text`` of ``obj`` as indented JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def commit_dir(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> Path:
    """Publish a fully written folder ``tmp`` as ``final`` in one rename (same file system):
    its files are fsynced first, so ``final`` exists only complete. ``final`` must not exist."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        raise FileExistsError(f"{final} already exists; refusing to overwrite it")
    for file in tmp.rglob("*"):
        if file.is_file():
            _fsync_path(file)
    os.rename(tmp, final)
    _fsync_path(final.parent)
    return final


def dir_size(path: str | os.PathLike[str]) -> int:
    """Bytes of all files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---- clips -----------------------------------------------------------------------------------
def clip_source(preset: str, videos: str | None, split: str, min_clips: int = 0) -> VideoSource:
    """Where an entry point's clips come from: ``videos`` (a folder or video file, or a ``.pt``
    file written by ``gaze_env.video.materialize``) or, when ``None``, the embedded default data
    of ``split``, with enough synthetic clips for ``min_clips`` (clip ``i`` does not depend on
    how many there are)."""
    p = get_preset(preset)
    if videos is None:
        source = default_source(split, p.num_frames, p.frame_size)
        if len(source) < min_clips:
            source = default_source(split, p.num_frames, p.frame_size, num_synthetic=min_clips)
        return source
    if str(videos).endswith(".pt"):
        source = TensorSource(videos)
        if (source.num_frames, source.size) != (p.num_frames, p.frame_size):
            raise ValueError(
                f"{videos} holds {source.num_frames} x {source.size}px clips; preset {preset!r} needs "
                f"{p.num_frames} x {p.frame_size}px"
            )
        return source
    return resolve_source(videos, p.num_frames, p.frame_size, split)
