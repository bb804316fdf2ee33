#!/usr/bin/env python
"""BLEU of a translator on paragraphs: a test set's consecutive sentences grouped into paragraphs
of 3, 4, 5, 3, 4, 5, ... sentences (a fixed grouping), translated whole with and without sentence
splitting, against the same sentences translated one per line (whose outputs are joined the same
way, so all three are scored on identical paragraph references); each also on the paragraphs whose
sentences all end in . ! or ? (where a splitter can find every boundary). One JSON object.

  python scripts/paragraph_bleu.py --src "$SEQ2SEQ_DATA/multi30k-en-fr/test_2016_flickr.en" \\
      --ref "$SEQ2SEQ_DATA/multi30k-en-fr/test_2016_flickr.fr"
  python scripts/paragraph_bleu.py --tsv "$SEQ2SEQ_DATA/tatoeba-en-fr/test.tsv"
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from seq2seq.commands import add_test_set_args, load_test_set  # noqa: E402
from seq2seq.inference import translate  # noqa: E402
from seq2seq.metrics import bleu_chrf  # noqa: E402

SIZES = (3, 4, 5)


def paragraphs(items: list[str]) -> list[list[str]]:
    """`items` cut into consecutive groups of 3, 4, 5, 3, ... (the last may be shorter)."""
    out, start = [], 0
    for size in itertools.cycle(SIZES):
        if start >= len(items):
            return out
        out.append(items[start : start + size])
        start += size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_test_set_args(p)
    args = p.parse_args()
    cfg, model, tokenizer, pairs = load_test_set(args, Path(__file__).stem)
    sources = paragraphs([s.strip() for s, _ in pairs])
    references = [" ".join(group) for group in paragraphs([r.strip() for _, r in pairs])]
    lang = cfg.data.src_lang
    result = {"test_set": str(args.tsv or args.src), "sentences": len(pairs), "paragraphs": len(sources),
              "beam": args.beam}
    runs = {"sentences_one_per_line": lambda: [" ".join(g) for g in paragraphs(
                [h[0][0] for h in translate(model, tokenizer, [s for s, _ in pairs], beam=args.beam)])],
            "paragraphs_split": lambda: [h[0][0] for h in translate(
                model, tokenizer, [" ".join(g) for g in sources], beam=args.beam, split=lang)],
            "paragraphs_unsplit": lambda: [h[0][0] for h in translate(
                model, tokenizer, [" ".join(g) for g in sources], beam=args.beam)]}
    punctuated = [i for i, group in enumerate(sources) if all(s[-1:] in ".!?" for s in group)]
    result["punctuated_paragraphs"] = len(punctuated)
    for name, run in runs.items():
        started = time.perf_counter()
        hypotheses = run()
        seconds = round(time.perf_counter() - started, 1)
        scores = bleu_chrf(hypotheses, references)
        subset = bleu_chrf([hypotheses[i] for i in punctuated], [references[i] for i in punctuated])
        result[name] = {"bleu": scores["bleu"], "chrf": scores["chrf"], "bleu_punctuated": subset["bleu"],
                        "seconds": seconds,
                        "words_per_paragraph": round(sum(len(h.split()) for h in hypotheses) / len(hypotheses), 1)}
    result["reference_words_per_paragraph"] = round(sum(len(r.split()) for r in references) / len(references), 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
