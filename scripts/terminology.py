#!/usr/bin/env python
"""A terminology test set built from a test set, and what lexically constrained decoding does on it.
One JSON object (and the glossary as TSV with --glossary-output).

  python scripts/terminology.py --src "$SEQ2SEQ_DATA/multi30k-en-fr/test_2016_flickr.en" \\
      --ref "$SEQ2SEQ_DATA/multi30k-en-fr/test_2016_flickr.fr"
  python scripts/terminology.py --tsv "$SEQ2SEQ_DATA/tatoeba-en-fr/test.tsv"

The rule: each sentence is translated without constraints (beam 5); the reference's content words
(4 letters or more, not a French function word) that the translation lacks are its candidates, and
the first two become its terms, each paired with the source word the reference's own attention
aligns it to (the reference read back teacher-forced). Then every sentence with terms is decoded
with them as its glossary. Reported: term coverage (the share of terms whose target word the
constrained output holds), BLEU of the whole test set without and with the constraints, and the
seconds of the constrained sentences both ways, and the share of terms whose target word the
output's word alignments (`inference.word_alignments`) link to the term's source word.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from seq2seq import inference  # noqa: E402
from seq2seq.commands import add_test_set_args, load_test_set  # noqa: E402
from seq2seq.metrics import bleu_chrf  # noqa: E402

FUNCTION_WORDS = set("""avec dans pour sous sur vers chez entre leur leurs cette celui celle ceux elles nous vous
ils elle mais donc puis très plus moins tout tous toute toutes être avoir sont était fait font peut veux
suis avez avons sera était étaient quand comme aussi encore alors""".split())
WORD = re.compile(r"[\w'’-]+")


def words(text: str) -> list[str]:
    return [w.strip("'’-") for w in text.split()]


def candidates(reference: str, hypothesis: str) -> list[int]:
    """Indices (whitespace words of the reference) of content words the hypothesis lacks."""
    held = {w.lower() for w in WORD.findall(hypothesis)}
    out = []
    for i, raw in enumerate(reference.split()):
        word = WORD.search(raw)
        if word and len(word.group()) >= 4 and word.group().lower() not in FUNCTION_WORDS and \
                word.group().lower() not in held and word.group().isalpha():
            out.append(i)
    return out


def aligned_terms(model, tokenizer, sources: list[str], glossaries: list[dict[str, str]], beam: int) -> int:
    """How many terms' target words the constrained output aligns to their source words."""
    linked = 0
    for source, glossary in zip(sources, glossaries):
        found = inference.translations(model, tokenizer, [source], beam=beam, attention=True, glossary=glossary)[0]
        if found.attention is None:
            continue
        pairs = set(inference.word_alignments(found.attention))
        source_words, output_words = source.split(), found.nbest[0][0].split()
        for source_term, target_term in glossary.items():
            at_source = [i for i, w in enumerate(source_words) if WORD.search(w) and WORD.search(w).group() == source_term]
            at_target = [j for j, w in enumerate(output_words)
                         if re.search(rf"(?<!\w){re.escape(target_term)}(?!\w)", w, re.I)]
            linked += any((i, j) in pairs for i in at_source for j in at_target)
    return linked


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_test_set_args(p)
    p.add_argument("--glossary-output", type=Path, help="write the terms here: line<TAB>source<TAB>target")
    args = p.parse_args()
    _, model, tokenizer, pairs = load_test_set(args, Path(__file__).stem)
    sources, references = [s.strip() for s, _ in pairs], [r.strip() for _, r in pairs]
    plain = [h[0][0] for h in inference.translate(model, tokenizer, sources, beam=args.beam)]
    glossaries: dict[int, dict[str, str]] = {}
    missed = {n: candidates(references[n], plain[n])[:2] for n in range(len(pairs))}
    missed = {n: js for n, js in missed.items() if js and tokenizer.encode([references[n]])[0]}
    readings = inference.read_back(model, tokenizer, [sources[n] for n in missed], [references[n] for n in missed])
    for (n, js), reading in zip(missed.items(), readings):  # the reference's own attention: its words' sources
        alignment = {j: i for i, j in inference.word_alignments(reading)}
        source_words, reference_words = sources[n].split(), references[n].split()
        terms = {}
        for j in js:
            if j in alignment and alignment[j] < len(source_words):
                source_word = WORD.search(source_words[alignment[j]])
                if source_word:
                    terms[source_word.group()] = WORD.search(reference_words[j]).group()
        if terms:
            glossaries[n] = terms
    chosen = sorted(glossaries)
    started = time.perf_counter()
    for n in chosen:  # the same sentences one call each, as the constrained ones run
        inference.translate(model, tokenizer, [sources[n]], beam=args.beam)
    plain_seconds = time.perf_counter() - started
    started = time.perf_counter()
    constrained = [inference.translate(model, tokenizer, [sources[n]], beam=args.beam, glossary=glossaries[n])[0][0][0]
                   for n in chosen]
    constrained_seconds = time.perf_counter() - started
    steered = list(plain)
    for n, text in zip(chosen, constrained):
        steered[n] = text
    terms = [(n, target) for n in chosen for target in glossaries[n].values()]
    covered = sum(bool(re.search(rf"(?<!\w){re.escape(target)}(?!\w)", steered[n], re.I)) for n, target in terms)
    linked = aligned_terms(model, tokenizer, [sources[n] for n in chosen], [glossaries[n] for n in chosen], args.beam)
    if args.glossary_output:
        args.glossary_output.write_text("".join(f"{n + 1}\t{s}\t{t}\n" for n in chosen for s, t in glossaries[n].items()),
                                        encoding="utf-8")
    missed = [(n + 1, target, steered[n]) for n, target in terms
              if not re.search(rf"(?<!\w){re.escape(target)}(?!\w)", steered[n], re.I)]
    print(json.dumps({"missed": missed[:5],
        "test_set": str(args.tsv or args.src), "sentences": len(pairs), "sentences_with_terms": len(chosen),
        "terms": len(terms), "term_coverage": round(covered / max(len(terms), 1), 4),
        "bleu_unconstrained": bleu_chrf(plain, references)["bleu"], "bleu_constrained": bleu_chrf(steered, references)["bleu"],
        "seconds_unconstrained": round(plain_seconds, 2), "seconds_constrained": round(constrained_seconds, 2),
        "ms_per_term": round(1000 * (constrained_seconds - plain_seconds) / max(len(terms), 1), 2),
        "terms_aligned": round(linked / max(len(terms), 1), 4)}))


if __name__ == "__main__":
    main()
