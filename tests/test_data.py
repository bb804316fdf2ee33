"""Corpus readers, validation and batching."""
import pytest

from seq2seq.config import Config, TranslatorData, load_preset
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
    relative = TranslatorData(format="hf", hf_path="json", hf_data_files="{split}.jsonl", train="train")
    assert load_pairs(relative, tmp_path, "train") == load_pairs(cfg, tmp_path, "train")  # from data_dir, not the cwd
    cfg.hf_src_field = "translation.de"
    with pytest.raises(UserError, match="no field 'translation.de'"):
        load_pairs(cfg, tmp_path, "train")


def write_two_corpora(tmp_path):
    """a.tsv (2 pairs) and the parallel pair b.en/b.fr (3 pairs)."""
    (tmp_path / "a.tsv").write_text("One.\tUn.\nTwo.\tDeux.\n", encoding="utf-8")
    (tmp_path / "b.en").write_text("Three.\nFour.\nFive.\n", encoding="utf-8")
    (tmp_path / "b.fr").write_text("Trois.\nQuatre.\nCinq.\n", encoding="utf-8")


def corpora_preset(tmp_path, data: str) -> Config:
    path = tmp_path / "p.toml"
    path.write_text(f'kind = "translator"\n[data]\nformat = "parallel"\n{data}\n', encoding="utf-8")
    return load_preset(str(path), "translator")


def test_a_list_of_corpora_loads_as_their_concatenation_in_order(tmp_path, caplog):
    write_two_corpora(tmp_path)
    cfg = corpora_preset(tmp_path, 'train = [{ path = "a.tsv", format = "tsv" }, { path = "b" }]\n'
                                   'dev = [{ path = "b", max_sentences = 2 },\n'
                                   '       { path = "a.tsv", format = "tsv", max_sentences = 0 }]')
    with caplog.at_level("INFO", logger="seq2seq"):
        assert load_pairs(cfg.data, tmp_path, "train") == [
            ("One.", "Un."), ("Two.", "Deux."), ("Three.", "Trois."), ("Four.", "Quatre."), ("Five.", "Cinq.")]
        assert load_pairs(cfg.data, tmp_path, "dev") == [
            ("Three.", "Trois."), ("Four.", "Quatre."), ("One.", "Un."), ("Two.", "Deux.")]
    assert caplog.messages == ["train: 2 pairs from a.tsv (tsv)", "train: 3 pairs from b (parallel)",
                               "dev: 2 pairs from b (parallel, the first of 3)", "dev: 2 pairs from a.tsv (tsv)"]
    cfg.data.train.append({"path": "missing.tsv", "format": "tsv"})
    with pytest.raises(UserError, match="missing.tsv: file not found"):
        load_pairs(cfg.data, tmp_path, "train")


@pytest.mark.parametrize("table, message", [
    ('{ path = "a.tsv", fromat = "tsv" }', "[data] train[1]: unknown key(s) fromat; known: path, format, max_"),
    ('{ format = "tsv" }', "[data] train[1]: path must be set"),
    ('{ path = "a.tsv", format = "csv" }', "[data] train[1] format: expected one of parallel, tsv, hf, got 'csv'"),
    ('{ path = "a.tsv", max_sentences = -1 }', "[data] train[1] max_sentences: expected 0 (all) or more"),
    ('"a.tsv"', "[data] train[1]: expected a table"),
])
def test_a_bad_corpus_table_is_a_one_line_error_naming_the_problem(tmp_path, table, message):
    with pytest.raises(UserError) as e:
        corpora_preset(tmp_path, f'train = [{{ path = "b" }}, {table}]')
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_config_with_corpus_lists_survives_config_json(tmp_path):
    import json

    cfg = corpora_preset(tmp_path, 'train = [{ path = "a.tsv", format = "tsv" }, { path = "b" }]\n'
                                   'dev = [{ path = "b", max_sentences = 2 }]\ntest = "b"')
    cfg.save(tmp_path / "config.json")
    loaded = Config.load(tmp_path / "config.json")
    assert loaded.data.train == [{"path": "a.tsv", "format": "tsv"}, {"path": "b"}]
    assert loaded.data.dev == [{"path": "b", "max_sentences": 2}] and loaded.data.test == "b"
    assert json.loads((tmp_path / "config.json").read_text())["data"] == cfg.to_dict()["data"]
    # strings still work, also through --set
    assert load_preset("tiny-en-fr", "translator", ["data.train=other/x"]).data.train == "other/x"


def test_the_en_fr_preset_trains_on_tatoeba_and_multi30k():
    cfg = load_preset("en-fr", "translator")
    assert [c["path"] for c in cfg.data.train] == ["tatoeba-en-fr/train.tsv", "multi30k-en-fr/train"]
    assert [c.get("format", cfg.data.format) for c in cfg.data.dev] == ["tsv", "parallel"]
    assert cfg.data.test == "tatoeba-en-fr/test.tsv" and cfg.data.format == "tsv"


def test_token_batches_cover_every_pair_once_within_budget():
    import random

    rng = random.Random(0)
    src = [rng.randint(1, 40) for _ in range(3000)]
    tgt = [max(1, s + rng.randint(-5, 5)) for s in src]
    batches = token_batches(src, tgt, 1500, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(3000))
    for b in batches:
        assert len(b) == 1 or (max(src[i] for i in b) + max(tgt[i] for i in b)) * len(b) <= 1500
    as_lists = [b.tolist() for b in batches]
    assert [b.tolist() for b in token_batches(src, tgt, 1500, seed=1)] == as_lists
    assert [b.tolist() for b in token_batches(src, tgt, 1500, seed=2)] != as_lists


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
