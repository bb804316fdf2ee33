"""The token cache: corpora tokenized once into Arrow tables, reused, rebuilt when the data change."""
import json
import logging
import random

import numpy as np
import pytest

from seq2seq.config import TranslatorData
from seq2seq.corpus import TokenizedCorpus
from seq2seq.data import token_batches
from conftest import run_cli

WORDS = "the a dog cat child man woman red blue big small runs eats sees plays with in on garden street ball".split()
FRENCH = dict(zip(WORDS, "le un chien chat enfant homme femme rouge bleu grand petit court mange voit joue avec dans "
                        "sur jardin rue balle".split()))


def synthetic_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        words = rng.choices(WORDS, k=rng.randint(2, 9))
        pairs.append((" ".join(words).capitalize() + ".", " ".join(FRENCH[w] for w in words).capitalize() + "."))
    return pairs


def write_tsv(path, pairs):
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQ2SEQ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_rows_hold_the_tokenized_pairs_and_a_second_build_reuses_the_cache(tmp_path, cache, caplog):
    pairs = synthetic_pairs(300)
    write_tsv(tmp_path / "train.tsv", pairs)
    cfg = TranslatorData(format="tsv", train="train.tsv", vocab_size=60)
    first = TokenizedCorpus.build(cfg, tmp_path, None)
    rows = np.array([5, 0, 299])
    src, tgt = first.rows(rows)
    assert src == first.tokenizer.encode([pairs[i][0] for i in rows])
    assert tgt == first.tokenizer.encode([pairs[i][1] for i in rows])
    assert first.src_len.tolist() == [len(s) for s in first.tokenizer.encode([s for s, _ in pairs])]
    with caplog.at_level(logging.INFO, logger="seq2seq"):
        second = TokenizedCorpus.build(cfg, tmp_path, None)
    assert "SentencePiece model from the cache" in caplog.text
    assert second.ids.cache_files == first.ids.cache_files  # the same ids file, not tokenized again
    assert second.tokenizer.sp.serialized_model_proto() == first.tokenizer.sp.serialized_model_proto()
    batches = token_batches(second.src_len + 1, second.tgt_len + 1, 200, seed=3)
    assert [b.tolist() for b in batches] == [b.tolist() for b in token_batches(first.src_len + 1, first.tgt_len + 1, 200, 3)]


def test_a_changed_corpus_is_read_again(tmp_path, cache):
    write_tsv(tmp_path / "train.tsv", synthetic_pairs(50))
    cfg = TranslatorData(format="tsv", train="train.tsv", vocab_size=60)
    assert len(TokenizedCorpus.build(cfg, tmp_path, None)) == 50
    write_tsv(tmp_path / "train.tsv", synthetic_pairs(70))
    assert len(TokenizedCorpus.build(cfg, tmp_path, None)) == 70


def test_empty_pairs_are_not_kept(tmp_path, cache):
    write_tsv(tmp_path / "train.tsv", [("A dog.", "Un chien."), (" ", "Vide."), ("Hi.", "")])
    corpus = TokenizedCorpus.build(TranslatorData(format="tsv", train="train.tsv", vocab_size=30), tmp_path, None)
    assert len(corpus) == 1 and corpus.text[0] == {"src": "A dog.", "tgt": "Un chien."}


def test_token_batches_take_numpy_lengths_and_every_row_once():
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(1, 40, 5000), rng.integers(1, 40, 5000)
    batches = token_batches(src, tgt, 800, seed=1)
    assert sorted(np.concatenate(batches).tolist()) == list(range(5000))
    assert all((src[b].max() + tgt[b].max()) * len(b) <= 800 for b in batches)


def test_wmt14_preset_trains_from_a_local_datasets_folder(tmp_path, cache):
    """The wmt14-en-fr preset's code path (format hf, translation.en/fr rows), on local JSON files:
    two runs of their own (the second reads the token cache the first wrote)."""
    folder = tmp_path / "wmt"
    folder.mkdir()
    for split, count in (("train", 3000), ("validation", 40), ("test", 40)):
        rows = [{"translation": {"en": s, "fr": t}} for s, t in synthetic_pairs(count, seed=len(split))]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    small = ["model.emb_dim=16", "model.enc_hidden=16", "model.enc_layers=1", "model.dec_hidden=32",
             "model.dec_layers=1", "data.vocab_size=60", "train.max_steps=6", "train.batch_tokens=600",
             "train.warmup_steps=2", "train.bf16=false", "train.eval_every=6"]
    # the data files a user names with --set are found from the current folder
    local = ["data.hf_path=json", "data.hf_name=''", "data.hf_data_files=wmt/{split}.jsonl"]
    args = ["train", "translator", "--preset", "wmt14-en-fr", "--data-dir", tmp_path, "--device", "cpu"]
    for i, out in enumerate(("first", "second")):
        result = run_cli(*args, "--output", tmp_path / out, *[x for item in small + local for x in ("--set", item)],
                         cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "train: 3000 pairs" in result.stderr
        assert ("SentencePiece model from the cache" in result.stderr) == (i == 1)
    assert (tmp_path / "second" / "model.safetensors").is_file()
    assert (tmp_path / "first" / "spm.model").read_bytes() == (tmp_path / "second" / "spm.model").read_bytes()


def test_an_empty_corpus_is_one_line_and_not_cached(tmp_path, cache):
    from seq2seq.errors import UserError

    write_tsv(tmp_path / "train.tsv", [(" ", "Vide."), ("Hi.", " ")])
    cfg = TranslatorData(format="tsv", train="train.tsv", vocab_size=30)
    for _ in range(2):  # the second attempt reads the file again rather than a cached empty table
        with pytest.raises(UserError, match=r"data.train 'train.tsv': no sentence pairs"):
            TokenizedCorpus.build(cfg, tmp_path, None)


def test_what_reading_said_is_said_again_on_a_cache_hit(tmp_path, cache, caplog):
    write_tsv(tmp_path / "train.tsv", synthetic_pairs(40) + [("", "Vide.")])
    (tmp_path / "train.tsv").write_text((tmp_path / "train.tsv").read_text() + "no tab here\n", encoding="utf-8")
    cfg = TranslatorData(format="tsv", train="train.tsv", vocab_size=60, skip_bad_lines=True)
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="seq2seq"):
            assert len(TokenizedCorpus.build(cfg, tmp_path, None)) == 40
        assert "skipped 1 bad line(s) (not source<TAB>target): line 42" in caplog.text
        assert "train: dropped 1 empty pair(s) of 41" in caplog.text
