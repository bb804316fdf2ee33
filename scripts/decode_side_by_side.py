#!/usr/bin/env python
"""Decoding, generation and classification speed of several checkouts, side by side on this machine.

  git worktree add /tmp/base <commit>
  python scripts/decode_side_by_side.py . /tmp/base [--rounds 2] [--precisions fp32,int8]
  ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python scripts/decode_side_by_side.py . /tmp/base

Each checkout's own `seq2seq` package decodes the same inputs with this checkout's released models
(or those in `--models DIR`): Multi30k test_2016_flickr.en greedy and beam 5 in batches (sentences/s),
the first `--one` of those sentences one call each (ms a sentence: what a lone server client and a
one-sentence CLI call pay), 500 characters from "ROMEO:" in 1 and 32 streams (characters/s), and
the SST-2 dev sentences classified (sentences/s), in each precision of `--precisions`. A precision
a checkout cannot run on this CPU reads as its error's first line. Each checkout runs in a fresh
process, in turn, round after round, so that the machine's drift falls on all of them alike. One
JSON line per run, with the machine as the checkout's process sees it (`device.describe`).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RUN = """
import json, statistics, sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
import torch
from seq2seq import checkpoint, device, inference
lines = Path({src!r}).read_text(encoding="utf-8").splitlines()
sst = [l.split("\\t")[-1] for l in Path({sst!r}).read_text(encoding="utf-8").splitlines()[1:]]
out = {{"repo": {repo!r}, "machine": device.describe()}}

def median_of(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)

def measure(key, fn, scale):
    try:
        out[key] = round(scale(median_of(fn)), 2)
    except Exception as e:  # a precision this CPU cannot run: its error, not a number
        out[key] = (str(e).splitlines() or [type(e).__name__])[0][:160]

_, model, tokenizer = checkpoint.load({translator!r})
for precision in {precisions!r}:
    for beam in (1, 5):
        measure(f"beam{{beam}}_{{precision}}_sentences_per_s",
                lambda: inference.translate(model, tokenizer, lines, beam=beam, precision=precision),
                lambda s: len(lines) / s)
        one = lines[: {one}]
        measure(f"one_sentence_beam{{beam}}_{{precision}}_ms",
                lambda: [inference.translate(model, tokenizer, [line], beam=beam, precision=precision) for line in one],
                lambda s: 1000 * s / len(one))
_, model, vocab = checkpoint.load({charlm!r})
for precision in {precisions!r}:
    for streams in (1, 32):
        measure(f"{{streams}}_streams_{{precision}}_chars_per_s",
                lambda: inference.generate(model, vocab, ["ROMEO:"] * streams, 500, temperature=0.8, seed=1,
                                           precision=precision),
                lambda s: streams * 500 / s)
_, model, tokenizer = checkpoint.load({classifier!r})
for precision in {precisions!r}:
    measure(f"classify_{{precision}}_sentences_per_s",
            lambda: inference.classify(model, tokenizer, sst, precision=precision), lambda s: len(sst) / s)
print(json.dumps(out))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repos", nargs="+", type=Path, help="checkouts to compare (their repository roots)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--precisions", default="auto,fp32,int8,bf16", help="comma-separated, each as --precision takes it")
    p.add_argument("--one", type=int, default=100, help="sentences translated one call each")
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--models", type=Path, default=ROOT / "checkpoints",
                   help="folder with en-fr/, shakespeare/ and sst2/ (an older checkout may need their configs "
                        "cut to the keys it knows)")
    args = p.parse_args()
    src, sst = args.data_dir / "multi30k-en-fr" / "test_2016_flickr.en", args.data_dir / "sst2" / "dev.tsv"
    for path in (src, sst):
        if not path.is_file():
            sys.exit(f"decode_side_by_side: {path}: file not found (pass --data-dir)")
    for _ in range(args.rounds):
        for repo in args.repos:
            code = RUN.format(repo=str(repo.resolve()), src=str(src), sst=str(sst), one=args.one,
                              precisions=args.precisions.split(","), translator=str(args.models / "en-fr"),
                              charlm=str(args.models / "shakespeare"), classifier=str(args.models / "sst2"))
            result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if result.returncode:
                sys.exit(f"decode_side_by_side: {repo}: {result.stderr.strip().splitlines()[-1]}")
            print(json.dumps(json.loads(result.stdout.strip().splitlines()[-1])), flush=True)


if __name__ == "__main__":
    main()
