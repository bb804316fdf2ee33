"""Training corpora of any size, tokenized once into memory-mapped Arrow tables (Hugging Face
`datasets`) that later runs and every rank of a distributed run reuse.

Three things are cached under $SEQ2SEQ_CACHE (default ~/.cache/seq2seq), each keyed by what made it:
the text pairs (the data config, and each local file's size and modification time), the
SentencePiece model (the text table and the vocabulary settings) and the token ids (the text table
and the tokenizer). Tables stay on disk; a run keeps the pair lengths in memory (8 bytes a pair)
and reads each batch's rows when it trains on them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from seq2seq.config import TranslatorData
from seq2seq.data import corpus_files, iter_pairs, non_empty
from seq2seq.errors import UserError
from seq2seq.files import atomic_path
from seq2seq.tokenizer import SubwordTokenizer

log = logging.getLogger("seq2seq")

# Part of every cache key: a change to how pairs are read, kept or tokenized bumps it.
CACHE_VERSION = 1
# Below this many pairs, worker processes cost more to start than they save.
PARALLEL_FROM = 200_000
TEXT_KEYS = ("format", "train", "src_lang", "tgt_lang", "hf_path", "hf_name", "hf_data_files", "hf_src_field",
             "hf_tgt_field", "skip_bad_lines")


def cache_root() -> Path:
    return Path(os.environ.get("SEQ2SEQ_CACHE") or Path.home() / ".cache" / "seq2seq")


class TokenizedCorpus:
    """The training split: text and ids tables on disk, lengths in memory, rows read per batch."""

    def __init__(self, text, ids, tokenizer: SubwordTokenizer):
        self.text, self.ids, self.tokenizer = text, ids, tokenizer
        self.src_len = ids.data.column("src_len").to_numpy()
        self.tgt_len = ids.data.column("tgt_len").to_numpy()

    @classmethod
    def build(cls, cfg: TranslatorData, data_dir: Path, tokenizer: SubwordTokenizer | None) -> "TokenizedCorpus":
        """The split, read and tokenized now or found in the cache; `tokenizer` None trains one (or
        takes the one cached for this text and these vocabulary settings)."""
        _quiet_datasets()
        text = text_table(cfg, data_dir)
        if tokenizer is None:
            tokenizer = train_tokenizer(text, cfg)
        return cls(text, ids_table(text, tokenizer), tokenizer)

    def __len__(self) -> int:
        return len(self.src_len)

    def rows(self, index: np.ndarray) -> tuple[list[list[int]], list[list[int]]]:
        got = self.ids[index]
        return got["src_ids"], got["tgt_ids"]

    def sampled_rows(self, index: np.ndarray, alpha: float) -> tuple[list[list[int]], list[list[int]]]:
        """The rows segmented afresh by SentencePiece sampling (subword regularization)."""
        got = self.text[index]
        return self.tokenizer.encode(got["src"], alpha), self.tokenizer.encode(got["tgt"], alpha)


def text_table(cfg: TranslatorData, data_dir: Path):
    """The non-empty pairs of the train split, stripped. What the reading logged (pairs per corpus,
    skipped lines, dropped pairs) is kept beside the table and said again when it is reused."""
    import datasets

    data_dir = Path(data_dir).resolve()  # one key whether the folder was named relatively or not
    spec = {key: value for key, value in asdict(cfg).items() if key in TEXT_KEYS}
    stamps = [(str(p.resolve()), *_stamp(p)) for p in corpus_files(cfg, data_dir, "train")]
    started = time.monotonic()
    said = _Recorder()
    log.addHandler(said)
    try:
        table = datasets.Dataset.from_generator(
            _text_rows, gen_kwargs={"spec": json.dumps(spec), "data_dir": str(data_dir), "stamps": json.dumps(stamps),
                                    "version": CACHE_VERSION},
            features=datasets.Features({"src": datasets.Value("string"), "tgt": datasets.Value("string")}),
            cache_dir=str(cache_root() / "text"))
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, (UserError, OSError)):  # raised while reading: keep its one line
            raise e.__cause__ from None
        raise
    finally:
        log.removeHandler(said)
    notes = cache_root() / "text" / f"{table._fingerprint}.log.json"
    if said.lines:
        with atomic_path(notes) as tmp:
            tmp.write_text(json.dumps(said.lines), encoding="utf-8")
    elif notes.is_file():
        for line in json.loads(notes.read_text(encoding="utf-8")):
            log.info("%s (as read when cached)", line)
    log.info("train: %d pairs (text table %s, %.1f s)", len(table), table.cache_files[0]["filename"] if table.cache_files
             else "in memory", time.monotonic() - started)
    return table


class _Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _text_rows(spec: str, data_dir: str, stamps: str, version: int):
    """Non-empty pairs, stripped, as table rows. `stamps` and `version` are not read here: they are
    part of the cache key."""
    cfg = TranslatorData(**json.loads(spec))
    kept = 0
    for src, tgt in non_empty(iter_pairs(cfg, Path(data_dir), "train"), "train"):
        kept += 1
        yield {"src": src, "tgt": tgt}
    if not kept:  # raised, not yielded as an empty table: an empty split is not cached
        raise UserError(f"data.train {cfg.train!r}: no sentence pairs")


def _stamp(path: Path) -> tuple:
    try:
        st = path.stat()
    except OSError:
        return (None, None)  # reading it will say what is wrong
    return (st.st_size, st.st_mtime_ns)


def train_tokenizer(text, cfg: TranslatorData) -> SubwordTokenizer:
    """A SentencePiece model of both sides of the text (2M sentences sampled at most), cached."""
    import sentencepiece

    key = _key(text._fingerprint, cfg.vocab_size, cfg.spm_model_type, sentencepiece.__version__, CACHE_VERSION)
    cached = cache_root() / "spm" / f"{key}.model"
    if cached.is_file():
        log.info("SentencePiece model from the cache (%s)", cached)
        return SubwordTokenizer.load_file(cached)
    log.info("training SentencePiece (%s, vocabulary %d) on %d pairs", cfg.spm_model_type, cfg.vocab_size, len(text))
    tokenizer = SubwordTokenizer.train(_both_sides(text), cfg.vocab_size, cfg.spm_model_type)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cached) as tmp:
        tmp.write_bytes(tokenizer.sp.serialized_model_proto())
    return tokenizer


def _both_sides(text):
    for rows in text.iter(batch_size=10_000):
        yield from rows["src"]
        yield from rows["tgt"]


def ids_table(text, tokenizer: SubwordTokenizer):
    import datasets

    proto = tokenizer.sp.serialized_model_proto()
    ids = datasets.Sequence(datasets.Value("int32"))
    started = time.monotonic()
    table = text.map(
        _encode_rows, batched=True, batch_size=5_000, fn_kwargs={"proto": proto}, remove_columns=["src", "tgt"],
        features=datasets.Features({"src_ids": ids, "tgt_ids": ids, "src_len": datasets.Value("int32"),
                                    "tgt_len": datasets.Value("int32")}),
        num_proc=min(os.cpu_count() or 1, 8) if len(text) >= PARALLEL_FROM else None,
        new_fingerprint=_key(text._fingerprint, hashlib.sha256(proto).hexdigest(), CACHE_VERSION), desc="tokenizing")
    log.info("train: tokenized (%.1f s)", time.monotonic() - started)
    return table


_PROCESSORS: dict = {}


def _encode_rows(rows: dict, proto: bytes) -> dict:
    import sentencepiece as spm

    key = hashlib.sha256(proto).digest()
    if key not in _PROCESSORS:  # once per worker process
        _PROCESSORS[key] = spm.SentencePieceProcessor(model_proto=proto)
    sp = _PROCESSORS[key]
    src, tgt = sp.encode(rows["src"]), sp.encode(rows["tgt"])
    return {"src_ids": src, "tgt_ids": tgt, "src_len": [len(s) for s in src], "tgt_len": [len(t) for t in tgt]}


def _key(*parts) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:24]


def _quiet_datasets() -> None:
    """datasets' own progress bars where a person watches; its notices only when they matter."""
    import datasets

    datasets.utils.logging.set_verbosity_error()
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
