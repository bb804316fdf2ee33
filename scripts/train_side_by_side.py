#!/usr/bin/env python
"""Training speed of several checkouts, side by side on this machine.

  git worktree add /tmp/prev HEAD~1
  python scripts/train_side_by_side.py . /tmp/prev [--kind charlm] [--steps 100] [--rounds 4]

Each checkout's own `Trainer.train_step` runs the preset's first `--steps` batches of epoch 2
(after 3 warm-up steps), in a fresh process with the allocator setting training uses, in turn,
round after round, so that the machine's drift falls on all of them alike. One JSON line per run:
target tokens (translator) or characters (char LM) a second.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RUN = """
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from seq2seq.config import load_preset
cfg = load_preset({preset!r}, {kind!r}, [])
try:  # the training package; before it, one module whose Trainer wrote a run folder
    from seq2seq.training import timing_trainer
    trainer = timing_trainer(cfg, Path({data!r}))
except ImportError:
    from seq2seq.cpu import tune_allocator
    from seq2seq.train import Trainer
    tune_allocator()
    trainer = Trainer(cfg, Path({data!r}), Path(tempfile.mkdtemp()) / "run", None, False, "cpu")
trainer.model.train()
batches = trainer.task.batches(1)[: {steps} + 3]
for batch in batches[:3]:
    trainer.train_step(batch)
start = time.perf_counter()
units = sum(trainer.train_step(batch)[1] for batch in batches[3:])
print(json.dumps({{"repo": {repo!r}, "per_s": round(units / (time.perf_counter() - start), 1)}}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repos", nargs="+", type=Path, help="checkouts to compare (their repository roots)")
    p.add_argument("--kind", choices=["translator", "charlm"], default="translator")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    args = p.parse_args()
    preset = "multi30k-en-fr" if args.kind == "translator" else "tinyshakespeare"
    for _ in range(args.rounds):
        for repo in args.repos:
            code = RUN.format(repo=str(repo.resolve()), preset=preset, kind=args.kind, data=str(args.data_dir.resolve()),
                              steps=args.steps)
            result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if result.returncode:
                sys.exit(f"train_side_by_side: {repo}: {result.stderr.strip().splitlines()[-1]}")
            print(result.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
