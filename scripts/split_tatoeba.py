#!/usr/bin/env python
"""Split a Tatoeba export (manythings.org/anki: `fra.txt`, English<TAB>French<TAB>attribution) into
train, dev and test TSV files so that no sentence, English or French, is in two splits:

  python scripts/split_tatoeba.py fra.txt --output data/tatoeba-en-fr --dev 2000 --test 2000

Pairs that share a side (one English sentence with several translations, or one French sentence
for several English ones) are joined into groups, transitively; whole groups are shuffled with
`--seed` and dealt to test, then dev, until each holds at least its count of pairs; the rest is
train. Exact duplicate pairs are kept once; lines without two non-empty columns are skipped and
counted. The same export, counts and seed give the same files.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from seq2seq.data import iter_lines  # noqa: E402
from seq2seq.errors import UserError  # noqa: E402


def read_pairs(path: Path) -> tuple[list[tuple[str, str]], int]:
    """The distinct (English, French) pairs in file order, and how many lines were skipped."""
    pairs, skipped = {}, 0
    for line in iter_lines(path):
        columns = line.split("\t")
        if len(columns) < 2 or not columns[0].strip() or not columns[1].strip():
            skipped += 1
            continue
        pairs.setdefault((columns[0].strip(), columns[1].strip()), None)
    return list(pairs), skipped


def groups_of(pairs: list[tuple[str, str]]) -> list[list[int]]:
    """Indices of `pairs` joined where they share an English or a French sentence (union-find)."""
    parent = list(range(len(pairs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[tuple[int, str], int] = {}
    for i, (english, french) in enumerate(pairs):
        for side in ((0, english), (1, french)):
            j = first_with.setdefault(side, i)
            parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(pairs)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def split(pairs: list[tuple[str, str]], dev: int, test: int, seed: int) -> dict[str, list[tuple[str, str]]]:
    groups = groups_of(pairs)
    random.Random(seed).shuffle(groups)
    splits = {"test": [], "dev": [], "train": []}
    wanted = {"test": test, "dev": dev}
    for group in groups:
        name = next((n for n in ("test", "dev") if len(splits[n]) < wanted[n]), "train")
        splits[name].extend(sorted(group))
    return {name: [pairs[i] for i in sorted(indices)] for name, indices in splits.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path, help="the export: English<TAB>French[<TAB>...] lines")
    p.add_argument("--output", type=Path, required=True, help="folder for train.tsv, dev.tsv, test.tsv")
    p.add_argument("--dev", type=int, default=2000, help="pairs in dev, at least (default 2000)")
    p.add_argument("--test", type=int, default=2000, help="pairs in test, at least (default 2000)")
    p.add_argument("--seed", type=int, default=1, help="shuffles the groups (default 1)")
    args = p.parse_args()
    try:
        pairs, skipped = read_pairs(args.export)
        if len(pairs) <= args.dev + args.test:
            raise UserError(f"{args.export}: {len(pairs)} distinct pairs, too few for dev {args.dev} and test "
                            f"{args.test}")
        splits = split(pairs, args.dev, args.test, args.seed)
        args.output.mkdir(parents=True, exist_ok=True)
        for name, rows in splits.items():
            (args.output / f"{name}.tsv").write_text("".join(f"{en}\t{fr}\n" for en, fr in rows), encoding="utf-8")
    except UserError as e:
        sys.exit(f"split_tatoeba: {e}")
    sizes = ", ".join(f"{name} {len(splits[name]):,}" for name in ("train", "dev", "test"))
    print(f"{args.output}: {sizes} pairs ({skipped} lines skipped)")


if __name__ == "__main__":
    main()
