"""scripts/split_tatoeba.py: no English or French sentence in two splits, the counts asked for,
the same files from the same seed; and the shared Tatoeba splits keep the rule it states."""
import subprocess
import sys

from conftest import ROOT, shared_corpus

sys.path.insert(0, str(ROOT / "scripts"))
from split_tatoeba import split  # noqa: E402


def sides(rows):
    return {en for en, _ in rows}, {fr for _, fr in rows}


def assert_disjoint(splits: dict) -> None:
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (en_a, fr_a), (en_b, fr_b) = sides(splits[a]), sides(splits[b])
            assert not en_a & en_b and not fr_a & fr_b, (a, b)


def test_pairs_that_share_a_side_stay_in_one_split_and_the_counts_hold():
    pairs = [(f"e{i}", f"f{i}") for i in range(300)]
    pairs += [("e1", "f-other"), ("e-other", "f-other"), ("e-other", "f7"), ("e2", "f3")]  # chains of shared sides
    splits = split(pairs, dev=40, test=30, seed=5)
    assert_disjoint(splits)
    assert sorted(p for rows in splits.values() for p in rows) == sorted(pairs)
    assert 30 <= len(splits["test"]) < 30 + 6 and 40 <= len(splits["dev"]) < 40 + 6
    chain = {"e1", "e7", "e-other"}  # e1-f-other-e-other-f7-e7: one group
    assert sum(bool(chain & sides(rows)[0]) for rows in splits.values()) == 1
    assert split(pairs, dev=40, test=30, seed=5) == splits != split(pairs, dev=40, test=30, seed=6)


def test_the_command_writes_three_files_and_refuses_a_small_export(tmp_path):
    export = tmp_path / "fra.txt"
    export.write_text("".join(f"Sentence {i}.\tPhrase {i}.\tCC-BY 2.0 (France) Attribution\n" for i in range(50))
                      + "no tab here\n" + "Sentence 1.\tPhrase 1.\tduplicate\n", encoding="utf-8")
    run = [sys.executable, ROOT / "scripts" / "split_tatoeba.py", export, "--output", tmp_path / "out"]
    result = subprocess.run([*map(str, run), "--dev", "5", "--test", "5"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "train 40, dev 5, test 5 pairs (1 lines skipped)" in result.stdout
    rows = {n: (tmp_path / "out" / f"{n}.tsv").read_text().splitlines() for n in ("train", "dev", "test")}
    assert [len(r) for r in rows.values()] == [40, 5, 5] and all(line.count("\t") == 1 for line in rows["dev"])
    small = subprocess.run([*map(str, run), "--dev", "30", "--test", "30"], capture_output=True, text=True)
    assert small.returncode == 1 and small.stderr.strip() == (
        f"split_tatoeba: {export}: 50 distinct pairs, too few for dev 30 and test 30")


def test_the_shared_tatoeba_splits_share_no_sentence():
    folder = shared_corpus("tatoeba-en-fr")
    splits = {}
    for name in ("train", "dev", "test"):
        lines = (folder / f"{name}.tsv").read_text(encoding="utf-8").splitlines()
        splits[name] = [tuple(line.split("\t")[:2]) for line in lines if "\t" in line]
    assert_disjoint(splits)
