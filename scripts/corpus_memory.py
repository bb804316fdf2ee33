"""Peak memory and time of building the token cache and batching from it, for synthetic corpora
of growing size: the numbers behind "memory stays flat as the corpus grows".

    python scripts/corpus_memory.py --pairs 500000 5000000 --work /tmp/corpus_memory

For each size it writes a TSV of that many synthetic pairs (made-up words, deterministic), then,
in a fresh process with an empty cache, builds the text table, trains SentencePiece, tokenizes,
plans one epoch of 3,000-token batches and reads 500 of them; then once more with the cache
warm. It prints one JSON object: per size and phase, seconds and the process's resident memory
(now and peak, from /proc; now split into anonymous memory and mapped file pages), plus the peak
of the tokenizing worker processes.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "da", "ve", "chi", "on", "el", "ur", "ba", "fe"]


def write_corpus(path: Path, pairs: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    words = sorted({"".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(20_000)})
    french = {w: w[::-1] + rng.choice(["e", "es", "x", ""]) for w in words}
    cumulative = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(words))))  # Zipf-like, as real text
    with path.open("w", encoding="utf-8") as f:
        for _ in range(pairs):
            sentence = rng.choices(words, cum_weights=cumulative, k=rng.randint(3, 25))
            f.write(" ".join(sentence).capitalize() + ".\t" + " ".join(french[w] for w in sentence).capitalize() + " .\n")


def rss() -> dict:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    mb = {key: round(int(status[key].split()[0]) / 1024) for key in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}
    # RssFile is pages of the memory-mapped tables: page cache the kernel takes back under pressure
    return {"rss_mb": mb["VmRSS"], "peak_rss_mb": mb["VmHWM"], "anon_mb": mb["RssAnon"], "file_mapped_mb": mb["RssFile"]}


def measure(corpus: Path) -> dict:
    """In this process: build (or reuse) the cache, plan an epoch, read 500 batches."""
    from seq2seq.config import TranslatorData
    from seq2seq.corpus import TokenizedCorpus
    from seq2seq.data import token_batches

    phases = {"start": rss()}
    started = time.monotonic()
    corpus_data = TokenizedCorpus.build(TranslatorData(format="tsv", train=corpus.name, vocab_size=8000),
                                        corpus.parent, None)
    phases["build"] = {"s": round(time.monotonic() - started, 1), **rss()}
    started = time.monotonic()
    batches = token_batches(corpus_data.src_len + 1, corpus_data.tgt_len + 1, 3000, seed=1)
    phases["plan_epoch"] = {"s": round(time.monotonic() - started, 1), "batches": len(batches), **rss()}
    started = time.monotonic()
    tokens = sum(sum(map(len, corpus_data.rows(b)[1])) for b in batches[:500])
    phases["read_500_batches"] = {"s": round(time.monotonic() - started, 2), "target_tokens": tokens, **rss()}
    phases["workers_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    phases["pairs"] = len(corpus_data)
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[500_000, 5_000_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/corpus_memory"))
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child process's job
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    report = {}
    for pairs in args.pairs:
        folder = args.work / str(pairs)
        folder.mkdir(parents=True, exist_ok=True)
        corpus = folder / "train.tsv"
        started = time.monotonic()
        if not corpus.is_file():
            write_corpus(corpus, pairs)
        entry = {"tsv_mb": round(corpus.stat().st_size / 2**20), "write_s": round(time.monotonic() - started, 1)}
        cache = folder / "cache"
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        for run in ("cold", "warm"):
            out = subprocess.run([sys.executable, __file__, "--measure", str(corpus)], capture_output=True, text=True,
                                 env={**__import__("os").environ, "SEQ2SEQ_CACHE": str(cache)})
            if out.returncode:
                sys.exit(out.stderr[-2000:])
            entry[run] = json.loads(out.stdout.strip().splitlines()[-1])
        report[pairs] = entry
        print(json.dumps({pairs: entry}), file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
