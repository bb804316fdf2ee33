#!/usr/bin/env python
"""Write the vocabulary shortlist (`seq2seq.shortlist`) of a translator model folder from its
training corpus, for a model trained before training wrote one:

  python scripts/build_shortlist.py checkpoints/en-fr --data-dir ../shared/data

The corpus is the folder's config `data.train`, read from `--data-dir` and tokenized with the
folder's own tokenizer, the pairs within `data.max_tokens` as training kept them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from seq2seq.config import Config  # noqa: E402
from seq2seq.corpus import TokenizedCorpus  # noqa: E402
from seq2seq.errors import UserError  # noqa: E402
from seq2seq.shortlist import FILE, Shortlist  # noqa: E402
from seq2seq.tokenizer import SubwordTokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="a translator model folder")
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    args = p.parse_args()
    try:
        cfg = Config.load(args.model / "config.json")
        if cfg.kind != "translator":
            raise UserError(f"{args.model}: a {cfg.kind} model; a shortlist is for a translator's output layer")
        started = time.perf_counter()
        corpus = TokenizedCorpus.build(cfg.data, args.data_dir, SubwordTokenizer.load(args.model))
        fits = (corpus.src_len <= cfg.data.max_tokens) & (corpus.tgt_len <= cfg.data.max_tokens)
        shortlist = Shortlist.of_corpus(corpus, np.flatnonzero(fits), len(corpus.tokenizer))
        shortlist.save(args.model)
    except UserError as e:
        sys.exit(f"build_shortlist: {e}")
    print(f"{args.model / FILE}: {int(fits.sum())} pairs, {len(shortlist.frequent)} frequent pieces, "
          f"{time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
