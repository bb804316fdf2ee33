#!/usr/bin/env python
"""What a checkout's code produces, written to files so two checkouts can be compared byte by byte.

  git worktree add /tmp/base <commit>
  python scripts/same_behaviour.py /tmp/base /tmp/same/base
  python scripts/same_behaviour.py . /tmp/same/now
  diff -r /tmp/same/base /tmp/same/now

Each checkout's own `seq2seq` runs through its command line (in a fresh process, the checkout
first on the path), with this checkout's released models: Multi30k test_2016 translated greedy and
beam 5 in int8, bf16 and fp32; 400 characters from "ROMEO:" with seed 1 in each precision; and 300
training steps of each kind (translator: the multi30k-en-fr preset; character model: the
tinyshakespeare preset), every step's loss logged.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def seq2seq(repo: Path, *args: str, stdout=None) -> None:
    env = dict(os.environ, PYTHONPATH=str(repo.resolve()), SEQ2SEQ_LOG="WARNING")
    result = subprocess.run([sys.executable, "-m", "seq2seq", *args], env=env, stdout=stdout,
                            stderr=subprocess.PIPE, text=True)
    if result.returncode:
        sys.exit(f"same_behaviour: {' '.join(args[:3])}: {result.stderr.strip()[-500:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repo", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--only", choices=["decode", "train"])
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data, models = args.data_dir.resolve(), ROOT / "checkpoints"
    if args.only != "train":
        src = data / "multi30k-en-fr" / "test_2016_flickr.en"
        for precision in ("int8", "bf16", "fp32"):
            for beam in (1, 5):
                with open(args.out / f"translate_beam{beam}_{precision}.txt", "w") as f:
                    seq2seq(args.repo, "translate", "-m", str(models / "en-fr"), "-i", str(src), "--beam", str(beam),
                            "--precision", precision, stdout=f)
            with open(args.out / f"generate_{precision}.txt", "w") as f:
                seq2seq(args.repo, "generate", "-m", str(models / "shakespeare"), "--prompt", "ROMEO:",
                        "--max-chars", "400", "--temperature", "0.8", "--seed", "1",
                        "--precision", "bf16" if precision == "int8" else precision, stdout=f)
    if args.only != "decode":
        for kind, preset in (("translator", "multi30k-en-fr"), ("charlm", "tinyshakespeare")):
            run = Path(tempfile.mkdtemp()) / "run"
            seq2seq(args.repo, "train", kind, "--preset", preset, "--data-dir", str(data), "--output", str(run),
                    "--device", "cpu", "--set", f"train.max_steps={args.steps}", "--set", "train.log_every=1",
                    "--set", f"train.eval_every={args.steps}", stdout=subprocess.DEVNULL)
            losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            kept = [{k: r[k] for k in ("step", "loss", "grad_norm") if k in r} for r in losses if r["type"] == "train"]
            evals = [{k: v for k, v in r.items() if k.startswith(("dev_", "valid_"))} for r in losses if r["type"] == "eval"]
            (args.out / f"train_{kind}.json").write_text(json.dumps({"train": kept, "eval": evals}, indent=0) + "\n")


if __name__ == "__main__":
    main()
