#!/usr/bin/env python
"""Decoding and generation speed of several checkouts, side by side on this machine.

  git worktree add /tmp/base 44b81fb
  python scripts/decode_side_by_side.py . /tmp/base [--rounds 2]

Each checkout's own `seq2seq` package (its search, models and inference code) decodes the same
sentences with this checkout's released models (or those in `--models DIR`, say copies whose
configs keep only the keys an older checkout knows): Multi30k test_2016_flickr.en greedy and
beam 5 in bf16 (and int8 where the checkout offers it), and 500 characters from "ROMEO:" in 1 and
32 streams (likewise; fp32 where the checkout's `generate` takes no `bf16`). Each checkout runs
in a fresh process, in turn, round after round, so that the machine's drift falls on all of them
alike. One JSON line per run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RUN = """
import inspect, json, statistics, sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from seq2seq import checkpoint, inference
lines = Path({src!r}).read_text(encoding="utf-8").splitlines()
out = {{"repo": {repo!r}}}

def rate(fn, units, repeats=3):
    fn()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        rates.append(units / (time.perf_counter() - start))
    return round(statistics.median(rates), 1)

if "precision" in inspect.signature(inference.translate).parameters:  # one resolved precision argument
    modes = [("bf16", {{"precision": "bf16"}}), ("int8", {{"precision": "int8"}})]
else:
    modes = [("bf16", {{"bf16": True}})]
    if "int8" in inspect.signature(inference.translate).parameters:
        modes.append(("int8", {{"bf16": True, "int8": True}}))
_, model, tokenizer = checkpoint.load({translator!r})[:3]
for beam in (1, 5):
    for mode, kwargs in modes:
        out[f"beam{{beam}}_{{mode}}_sentences_per_s"] = rate(
            lambda: inference.translate(model, tokenizer, lines, beam=beam, **kwargs), len(lines))
_, model, vocab = checkpoint.load({charlm!r})[:3]
if "precision" in inspect.signature(inference.generate).parameters:
    modes = [("bf16", {{"precision": "bf16"}}), ("int8", {{"precision": "int8"}})]
elif "bf16" not in inspect.signature(inference.generate).parameters:
    modes = [("fp32", {{}})]
for streams in (1, 32):
    for mode, kwargs in modes:
        out[f"{{streams}}_streams_{{mode}}_chars_per_s"] = rate(
            lambda: inference.generate(model, vocab, ["ROMEO:"] * streams, 500, temperature=0.8, seed=1, **kwargs),
            streams * 500)
print(json.dumps(out))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repos", nargs="+", type=Path, help="checkouts to compare (their repository roots)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--models", type=Path, default=ROOT / "checkpoints",
                   help="folder with en-fr/ and shakespeare/ (an older checkout may need their configs "
                        "cut to the keys it knows)")
    args = p.parse_args()
    src = args.data_dir / "multi30k-en-fr" / "test_2016_flickr.en"
    if not src.is_file():
        sys.exit(f"decode_side_by_side: {src}: file not found (pass --data-dir)")
    for _ in range(args.rounds):
        for repo in args.repos:
            code = RUN.format(repo=str(repo.resolve()), src=str(src), translator=str(args.models / "en-fr"),
                              charlm=str(args.models / "shakespeare"))
            result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if result.returncode:
                sys.exit(f"decode_side_by_side: {repo}: {result.stderr.strip().splitlines()[-1]}")
            print(json.dumps(json.loads(result.stdout.strip().splitlines()[-1])), flush=True)


if __name__ == "__main__":
    main()
