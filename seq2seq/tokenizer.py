"""Tokenizers: a joint SentencePiece model for translation, a character vocabulary for the LM."""
from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import sentencepiece as spm

from seq2seq.files import atomic_path, write_text_atomic
from seq2seq.errors import UserError

log = logging.getLogger("seq2seq")

PAD, UNK, BOS, EOS = 0, 1, 2, 3


class SubwordTokenizer:
    """SentencePiece with fixed special ids: pad 0, unk 1, bos 2, eos 3."""

    file_name = "spm.model"

    def __init__(self, processor: spm.SentencePieceProcessor):
        self.sp = processor

    @classmethod
    def train(cls, texts: list[str], vocab_size: int, model_type: str = "unigram") -> "SubwordTokenizer":
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            character_coverage=1.0, pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
            hard_vocab_limit=False,  # a small corpus gets a smaller vocabulary instead of an error
            input_sentence_size=2_000_000, shuffle_input_sentence=True,
            num_threads=2, minloglevel=2)
        return cls(spm.SentencePieceProcessor(model_proto=model.getvalue()))

    @classmethod
    def load(cls, folder: Path) -> "SubwordTokenizer":
        path = Path(folder) / cls.file_name
        if not path.is_file():
            raise UserError(f"{path}: not found (is this a translator model folder?)")
        return cls.load_file(path)

    @classmethod
    def load_file(cls, path: Path) -> "SubwordTokenizer":
        try:
            return cls(spm.SentencePieceProcessor(model_file=str(path)))
        except (OSError, RuntimeError) as e:  # truncated or not a SentencePiece model
            raise UserError(f"{path}: not a readable SentencePiece model ({str(e).splitlines()[0][:120]})") from None

    def save(self, folder: Path) -> None:
        with atomic_path(Path(folder) / self.file_name) as tmp:
            tmp.write_bytes(self.sp.serialized_model_proto())

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, texts: list[str], sample_alpha: float = 0.0) -> list[list[int]]:
        if sample_alpha > 0:
            # one thread: SentencePiece's per-thread generators make threaded sampling unrepeatable
            return self.sp.encode(texts, enable_sampling=True, alpha=sample_alpha, nbest_size=-1, num_threads=1)
        return self.sp.encode(texts)

    def decode(self, ids: list[list[int]]) -> list[str]:
        return self.sp.decode(ids)


class CharVocab:
    """Characters of the training text, id 0 for unknown characters."""

    file_name = "vocab.json"
    unk = "\ufffd"

    def __init__(self, chars: list[str]):
        self.chars = [self.unk] + [c for c in chars if c != self.unk]
        self.index = {c: i for i, c in enumerate(self.chars)}
        self._warned = False

    @classmethod
    def build(cls, text: str) -> "CharVocab":
        return cls(sorted(set(text)))

    @classmethod
    def load(cls, folder: Path) -> "CharVocab":
        path = Path(folder) / cls.file_name
        if not path.is_file():
            raise UserError(f"{path}: not found (is this a character model folder?)")
        try:
            chars = json.loads(path.read_text(encoding="utf-8"))["chars"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path}: not a character vocabulary ({type(e).__name__}: {e})") from None
        if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise UserError(f"{path}: \"chars\" must be a list of single characters")
        return cls(chars[1:])

    def save(self, folder: Path) -> None:
        write_text_atomic(Path(folder) / self.file_name, json.dumps({"chars": self.chars}, ensure_ascii=False) + "\n")

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str, warn: bool = False) -> list[int]:
        ids = [self.index.get(c, 0) for c in text]
        if warn and not self._warned and 0 in ids:
            unseen = sorted({c for c in text if c not in self.index})
            print(f"seq2seq: note: {len(unseen)} character(s) not seen in training are read as unknown: "
                  f"{''.join(unseen)!r}", file=sys.stderr)
            self._warned = True
        return ids

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)


class LabelledTokenizer(SubwordTokenizer):
    """A classifier's tokenizer: SentencePiece for its text, and its labels in order (the
    model's output i is label i), saved beside spm.model as labels.json with how each is shown."""

    labels_file = "labels.json"

    def __init__(self, processor: spm.SentencePieceProcessor, labels: list[str] | None = None,
                 names: dict[str, str] | None = None):
        super().__init__(processor)
        self.labels, self.names = list(labels or []), dict(names or {})

    def shown(self, index: int) -> str:
        label = self.labels[index]
        return self.names.get(label, label)

    @classmethod
    def load(cls, folder: Path) -> "LabelledTokenizer":
        tokenizer = cls(SubwordTokenizer.load(folder).sp)
        path = Path(folder) / cls.labels_file
        if path.is_file():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                tokenizer.labels, tokenizer.names = [str(x) for x in raw["labels"]], dict(raw.get("names", {}))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{path}: not a label list ({type(e).__name__}: {e})") from None
        return tokenizer

    def save(self, folder: Path) -> None:
        super().save(folder)
        write_text_atomic(Path(folder) / self.labels_file,
                          json.dumps({"labels": self.labels, "names": self.names}, ensure_ascii=False, indent=1) + "\n")
