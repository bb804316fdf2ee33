"""Corpus readers, validation and batching."""
import pytest

from seq2seq.config import TranslatorData
from seq2seq.data import load_pairs, read_lines, read_parallel, read_tsv, token_batches
from seq2seq.errors import UserError
from conftest import shared_corpus


def test_parallel_files_pair_up_lines(tmp_path):
    (tmp_path / "x.en").write_text("Hello.\nA cat.\n", encoding="utf-8")
    (tmp_path / "x.fr").write_text("Bonjour.\nUn chat.\n", encoding="utf-8")
    assert read_parallel(tmp_path / "x", "en", "fr") == [("Hello.", "Bonjour."), ("A cat.", "Un chat.")]


def test_mismatched_line_counts_name_both_files(tmp_path):
    (tmp_path / "x.en").write_text("a\nb\nc\n", encoding="utf-8")
    (tmp_path / "x.fr").write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_parallel(tmp_path / "x", "en", "fr")
    assert str(e.value) == f"line counts differ: {tmp_path / 'x.en'} has 3 lines, {tmp_path / 'x.fr'} has 2"


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_bytes("one\tun\ntwo\tdeux\n".encode() + b"thr\xffee\ttrois\n")
    with pytest.raises(UserError, match=r"bad.tsv:3: invalid UTF-8 \(byte 0xff at column 4\)"):
        read_tsv(path)


def test_tsv_without_tab_names_the_line(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("Hello.\tBonjour.\nno tab here\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"pairs.tsv:2: expected source<TAB>target"):
        read_tsv(path)


def test_crlf_and_missing_final_newline(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"a\r\nb")
    assert read_lines(path) == ["a", "b"]


def test_hugging_face_reader_on_local_json(tmp_path):
    import json

    rows = [{"translation": {"en": "A dog.", "fr": "Un chien."}}, {"translation": {"en": "Hi.", "fr": "Salut."}}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    cfg = TranslatorData(format="hf", hf_path="json", hf_data_files=str(tmp_path / "{split}.jsonl"), train="train")
    assert load_pairs(cfg, tmp_path, "train") == [("A dog.", "Un chien."), ("Hi.", "Salut.")]
    cfg.hf_src_field = "translation.de"
    with pytest.raises(UserError, match="no field 'translation.de'"):
        load_pairs(cfg, tmp_path, "train")


def test_token_batches_cover_every_pair_once_within_budget():
    import random

    rng = random.Random(0)
    src = [rng.randint(1, 40) for _ in range(3000)]
    tgt = [max(1, s + rng.randint(-5, 5)) for s in src]
    batches = token_batches(src, tgt, 1500, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(3000))
    for b in batches:
        assert len(b) == 1 or (max(src[i] for i in b) + max(tgt[i] for i in b)) * len(b) <= 1500
    assert token_batches(src, tgt, 1500, seed=1) == batches
    assert token_batches(src, tgt, 1500, seed=2) != batches


def test_padding_waste_is_under_ten_percent_on_multi30k():
    from seq2seq.tokenizer import SubwordTokenizer

    folder = shared_corpus("multi30k-en-fr")
    pairs = read_parallel(folder / "train", "en", "fr")
    tok = SubwordTokenizer.train([s for s, _ in pairs] + [t for _, t in pairs], 8000)
    src = [len(x) + 1 for x in tok.encode([s for s, _ in pairs])]
    tgt = [len(x) + 1 for x in tok.encode([t for _, t in pairs])]
    batches = token_batches(src, tgt, 6000, seed=1)
    real = sum(src) + sum(tgt)
    padded = sum((max(src[i] for i in b) + max(tgt[i] for i in b)) * len(b) for b in batches)
    assert padded / real < 1.10, padded / real
