"""The main job, one command: data -> expert gazes -> behaviour cloning -> RL -> evaluation.

    python -m experiments.pipeline                 # what `make train` runs (tiny preset, this CPU)
    python -m experiments.pipeline --force rl      # redo RL (and everything after it)

Each stage is its own entry point (run with its defaults, progress bars included) and is skipped
when its output exists and is newer than its inputs, so an interrupted pipeline resumes where it
stopped. At the end the evaluation's headline table and the paths of its plots are printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from experiments.evaluate import headline_table
from experiments.prepare_data import default_data_path

STAGES = ("data", "expert", "bc", "rl", "eval")


@dataclass(frozen=True)
class Stage:
    name: str
    argv: list[str]  # python -m ... arguments
    output: Path  # exists once the stage has finished
    inputs: tuple[Path, ...]  # outputs of earlier stages it reads
    run_dir: Path | None = None  # a trainer's run folder: resumed when it holds checkpoints

    def up_to_date(self) -> bool:
        if not self.output.exists():
            return False
        mtime = self.output.stat().st_mtime
        return all(p.exists() and p.stat().st_mtime <= mtime for p in self.inputs)


def stages(preset: str, algo: str) -> list[Stage]:
    train_data = default_data_path("train", preset)
    val_data = default_data_path("val", preset)
    expert = Path("data/expert") / preset / "manifest.json"
    bc = Path("runs/bc") / preset / "final" / "model.safetensors"
    rl = Path("runs/rl") / preset / algo / "final" / "model.safetensors"
    report = Path("runs/eval") / preset / "report.json"
    py = [sys.executable, "-m"]
    return [
        Stage("data", py + ["experiments.prepare_data", "--preset", preset], val_data, ()),
        Stage("expert", py + ["experiments.collect_expert", "--preset", preset], expert, (train_data,)),
        Stage("bc", py + ["experiments.train_bc", "--preset", preset], bc, (expert,), bc.parent.parent),
        Stage("rl", py + ["experiments.train_rl", "--preset", preset, "--algo", algo], rl, (bc,), rl.parent.parent),
        Stage(
            "eval",
            py + ["experiments.evaluate", "--preset", preset,
                  "--policy", f"bc={bc.parent}", f"{algo}={rl.parent}"],
            report,
            (bc, rl, val_data),
        ),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="geometry preset: tiny (default), small, paper")
    ap.add_argument("--algo", default="grpo", choices=["grpo", "ppo"], help="RL algorithm (default grpo)")
    ap.add_argument("--force", choices=STAGES, help="rerun this stage and every later one")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    forced = False
    for stage in stages(args.preset, args.algo):
        forced = forced or stage.name == args.force
        if not forced and stage.up_to_date():
            print(f"[{stage.name}] up to date ({stage.output})", flush=True)
            continue
        argv = list(stage.argv)
        if stage.run_dir is not None and stage.run_dir.exists():
            if forced or not any(stage.run_dir.glob("step_*")):
                shutil.rmtree(stage.run_dir)  # stale inputs or nothing to resume: start over
            else:
                argv.append("--resume")  # an interrupted run continues exactly
        print(f"[{stage.name}] {' '.join(argv[1:])}", flush=True)
        t = time.perf_counter()
        result = subprocess.run(argv)
        if result.returncode:
            sys.exit(f"[{stage.name}] failed with exit code {result.returncode}; fix it and rerun: "
                     "finished stages are skipped")
        forced = True  # everything after a rerun stage is stale
        print(f"[{stage.name}] done in {time.perf_counter() - t:.0f} s", flush=True)
    report_dir = Path("runs/eval") / args.preset
    report = json.loads((report_dir / "report.json").read_text())
    print(f"\nfull report: {report_dir / 'report.md'}")
    print("plots:", *sorted(str(p) for p in report_dir.glob("*.png")), sep="\n  ")
    print("videos:", *sorted(str(p) for p in report_dir.glob("**/*.gif")), sep="\n  ")
    print(headline_table(report))
    print(f"pipeline finished in {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
