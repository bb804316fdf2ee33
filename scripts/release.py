#!/usr/bin/env python
"""Make a released model folder from a training run: weights in fp16, no resume state.

  python scripts/release.py runs/en-fr checkpoints/en-fr

Copies config.json, the tokenizer, the vocabulary shortlist, metrics.json and metrics.jsonl (paths
under the current folder made relative: a release names no folder of the machine that made it),
and writes model.safetensors with fp16 weights (half the size; the model loads them into fp32). fp16 rather than bf16: its
10-bit mantissa keeps weights of this size 8x more precisely, and none comes near its range limit.
The model card (README.md) is written by hand: data, licence, command, machine, scores.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from seq2seq import checkpoint  # noqa: E402

COPIED = ("config.json", "spm.model", "vocab.json", "labels.json", "shortlist.safetensors", "metrics.json",
          "metrics.jsonl")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("output", type=Path)
    args = p.parse_args()
    _, model, _ = checkpoint.load(args.run)
    args.output.mkdir(parents=True, exist_ok=True)
    here = str(Path.cwd().resolve()) + "/"
    for name in COPIED:
        if not (args.run / name).is_file():
            continue
        if name.endswith((".json", ".jsonl")):
            text = (args.run / name).read_text(encoding="utf-8")
            (args.output / name).write_text(text.replace(here, ""), encoding="utf-8")
        else:
            shutil.copy2(args.run / name, args.output / name)
    checkpoint.save_weights(model.to(torch.float16), args.output / checkpoint.BEST)
    size = sum(f.stat().st_size for f in args.output.iterdir()) / 1e6
    print(f"{args.output}: {size:.1f} MB")


if __name__ == "__main__":
    main()
