"""Property tests: the readers, the tokenizers and the translate path take any text."""
import io
import sys
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seq2seq.cli import read_inputs
from seq2seq.data import read_lines, read_tsv
from seq2seq.inference import translate
from seq2seq.tokenizer import CharVocab, SubwordTokenizer
from conftest import SAMPLE_DIR, small_translator

# A line: any text without the line break the files are split on (\r is kept mid-line).
line = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=60)
field = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\t\r"), max_size=30)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(st.lists(line.filter(lambda s: not s.endswith("\r")), max_size=20))
def test_read_lines_returns_the_lines_written(tmp_path, lines):
    path = tmp_path / "lines.txt"
    path.write_bytes("".join(x + "\n" for x in lines).encode("utf-8"))
    assert read_lines(path) == lines
    path.write_bytes("".join(x + "\r\n" for x in lines).encode("utf-8"))  # Windows line ends
    assert read_lines(path) == lines


@SETTINGS
@given(st.lists(st.tuples(field, field), max_size=20))
def test_read_tsv_returns_the_pairs_written(tmp_path, pairs):
    path = tmp_path / "pairs.tsv"
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    assert read_tsv(path) == pairs


@pytest.fixture(scope="module")
def subwords():
    texts = (SAMPLE_DIR / "sample" / "everyday.en").read_text(encoding="utf-8").splitlines()
    texts += (SAMPLE_DIR / "sample" / "everyday.fr").read_text(encoding="utf-8").splitlines()
    return SubwordTokenizer.train(texts, 300), sorted(set("".join(texts)) - {" "})


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_subword_round_trip_on_the_training_alphabet(subwords, data):
    tokenizer, alphabet = subwords
    words = data.draw(st.lists(st.text(st.sampled_from(alphabet), min_size=1, max_size=8), max_size=8))
    text = " ".join(words)  # SentencePiece normalises runs of spaces: single spaces round-trip exactly
    assert tokenizer.decode(tokenizer.encode([text])) == [text]


@settings(max_examples=100, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=80), st.text(max_size=80))
def test_char_vocab_round_trip(known, other):
    vocab = CharVocab.build(known or "a")
    text = "".join(c for c in other if c in vocab.index) + known
    assert vocab.decode(vocab.encode(text)) == text
    assert len(vocab.encode(other)) == len(other)  # unseen characters still take one id each


@pytest.fixture(scope="module")
def translator(subwords):
    tokenizer, _ = subwords
    return small_translator(vocab=len(tokenizer)), tokenizer


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(line, min_size=1, max_size=6), st.integers(1, 3))
def test_translate_gives_one_line_per_line_for_any_text(translator, lines, beam):
    model, tokenizer = translator
    stdin = "".join(x + "\n" for x in lines).encode("utf-8")
    read = read_stdin(stdin)
    assert len(read) == len(lines)
    out = translate(model, tokenizer, read, beam=beam, max_len_ratio=0.5)
    assert len(out) == len(lines)
    for text_in, hyps in zip(read, out):
        (text, score), = hyps
        assert "\n" not in text and "\r" not in text
        if not text_in.strip():
            assert text == ""


def read_stdin(data: bytes) -> list[str]:
    """The CLI's reading of standard input, on the given bytes."""
    saved = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
    try:
        return read_inputs(SimpleNamespace(text=[], input=None))
    finally:
        sys.stdin = saved
