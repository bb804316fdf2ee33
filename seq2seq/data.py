"""Corpora: readers with validation, length-bucketed token-budget batches, character streams."""
from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from seq2seq.config import TranslatorData
from seq2seq.errors import UserError

log = logging.getLogger("seq2seq")


def read_lines(path: str | Path) -> list[str]:
    """All lines of a UTF-8 file, without line ends; invalid UTF-8 is an error naming the line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a text file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(f"{path}:{line}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {column})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def read_text(path: str | Path) -> str:
    return "\n".join(read_lines(path)) + "\n"


def read_parallel(prefix: str | Path, src_lang: str, tgt_lang: str) -> list[tuple[str, str]]:
    src_path, tgt_path = Path(f"{prefix}.{src_lang}"), Path(f"{prefix}.{tgt_lang}")
    return read_parallel_files(src_path, tgt_path)


def read_parallel_files(src_path: Path, tgt_path: Path) -> list[tuple[str, str]]:
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise UserError(f"line counts differ: {src_path} has {len(src)} lines, {tgt_path} has {len(tgt)}")
    return list(zip(src, tgt))


def read_tsv(path: str | Path, skip_bad_lines: bool = False) -> list[tuple[str, str]]:
    """source<TAB>target lines. A line with no tab or with extra columns is an error naming it,
    or, with `skip_bad_lines`, skipped and counted in the log."""
    pairs, bad = [], []
    for number, line in enumerate(read_lines(path), 1):
        fields = line.split("\t")
        if len(fields) == 2:
            pairs.append((fields[0], fields[1]))
            continue
        problem = "no tab" if len(fields) < 2 else f"{len(fields)} columns"
        if not skip_bad_lines:
            raise UserError(f"{path}:{number}: expected source<TAB>target, found {problem} "
                            "(--skip-bad-lines skips such lines)")
        bad.append(number)
    if bad:
        log.warning("%s: skipped %d bad line(s) (not source<TAB>target): line %s", path, len(bad),
                    ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else ""))
    return pairs


def read_hf(cfg: TranslatorData, split: str, data_dir: Path = Path(".")) -> list[tuple[str, str]]:
    """A split of a Hugging Face dataset: a hub name (needs internet) or a local loader + files
    (a relative data.hf_data_files starts at data_dir, as every other data path does)."""
    import datasets

    kwargs = {"split": split}
    if cfg.hf_name:
        kwargs["name"] = cfg.hf_name
    if cfg.hf_data_files:
        files = cfg.hf_data_files.format(split=split)
        kwargs["data_files"] = {split: files if "://" in files else str(resolve(data_dir, files))}
    try:
        table = datasets.load_dataset(cfg.hf_path, **kwargs)
    except Exception as e:  # datasets raises many types; all mean "could not load this"
        raise UserError(f"dataset {cfg.hf_path!r} split {split!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return [(_field(row, cfg.hf_src_field, cfg.hf_path, i), _field(row, cfg.hf_tgt_field, cfg.hf_path, i))
            for i, row in enumerate(table)]


def _field(row: dict, dotted: str, source: str, index: int) -> str:
    value = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise UserError(f"dataset {source!r} row {index}: no field {dotted!r} (fields: {', '.join(row)})")
        value = value[part]
    return "" if value is None else str(value)  # a missing value is an empty side: dropped and counted


def resolve(data_dir: Path, name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else Path(data_dir) / path


def load_pairs(cfg: TranslatorData, data_dir: Path, split: str) -> list[tuple[str, str]]:
    """The pairs of split 'train', 'dev' or 'test' as the data config describes them: one corpus,
    or the corpora of a list concatenated in order (each cut to its max_sentences, if set)."""
    spec = getattr(cfg, split)
    if not spec:
        raise UserError(f"data.{split} is not set in the config")
    if isinstance(spec, str):
        return read_corpus(cfg, data_dir, spec, cfg.format)
    pairs = []
    for corpus in spec:
        fmt = corpus.get("format", cfg.format)
        read = read_corpus(cfg, data_dir, corpus["path"], fmt)
        part = read[: corpus.get("max_sentences") or None]
        log.info("%s: %d pairs from %s (%s%s)", split, len(part), corpus["path"], fmt,
                 f", the first of {len(read)}" if len(part) < len(read) else "")
        pairs += part
    return pairs


def read_corpus(cfg: TranslatorData, data_dir: Path, name: str, fmt: str) -> list[tuple[str, str]]:
    if fmt == "hf":
        return read_hf(cfg, name, data_dir)
    if fmt == "tsv":
        return read_tsv(resolve(data_dir, name), cfg.skip_bad_lines)
    if fmt == "parallel":
        return read_parallel(resolve(data_dir, name), cfg.src_lang, cfg.tgt_lang)
    raise UserError(f"data.format must be parallel, tsv or hf, got {fmt!r}")


def drop_empty(pairs: list[tuple[str, str]], what: str) -> list[tuple[str, str]]:
    kept = [(s.strip(), t.strip()) for s, t in pairs if s.strip() and t.strip()]
    if len(kept) < len(pairs):
        log.info("%s: dropped %d empty pair(s) of %d", what, len(pairs) - len(kept), len(pairs))
    return kept


def within_length(src_ids: list, tgt_ids: list, max_tokens: int, what: str) -> list[int]:
    """Indices of the pairs whose sides both fit in `max_tokens`; the others are counted in the log."""
    keep = [i for i in range(len(src_ids)) if len(src_ids[i]) <= max_tokens and len(tgt_ids[i]) <= max_tokens]
    if len(keep) < len(src_ids):
        log.info("%s: dropped %d pair(s) longer than %d tokens", what, len(src_ids) - len(keep), max_tokens)
    return keep


def token_batches(src_lens: list[int], tgt_lens: list[int], batch_tokens: int, seed: int) -> list[list[int]]:
    """Length-bucketed batches whose padded size (max source + max target length, times rows)
    stays within `batch_tokens`. Order is shuffled within equal lengths and across batches, from `seed`."""
    rng = random.Random(seed)
    # coarse target buckets, then source length: less padding than sorting on either length alone
    order = sorted(range(len(src_lens)), key=lambda i: (tgt_lens[i] // 3, src_lens[i], tgt_lens[i], rng.random()))
    batches, current, max_src, max_tgt = [], [], 0, 0
    for i in order:
        new_src, new_tgt = max(max_src, src_lens[i]), max(max_tgt, tgt_lens[i])
        if current and (new_src + new_tgt) * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, new_src, new_tgt = [], src_lens[i], tgt_lens[i]
        current.append(i)
        max_src, max_tgt = new_src, new_tgt
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def pad(seqs: list[list[int]], pad_id: int, bos: int | None = None, eos: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, max_len) ids and the lengths, with optional BOS/EOS around each sequence."""
    head, tail = ([bos] if bos is not None else []), ([eos] if eos is not None else [])
    seqs = [head + list(s) + tail for s in seqs]
    width = max(map(len, seqs), default=0)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    return torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], dtype=torch.long).view(len(seqs), width), lengths


def char_streams(ids: torch.Tensor, streams: int) -> torch.Tensor:
    """Cut one long id sequence into `streams` contiguous rows (the tail that does not fit is dropped)."""
    length = ids.numel() // streams
    if length < 2:
        raise UserError(f"text of {ids.numel()} characters is too short for {streams} streams")
    return ids[: length * streams].view(streams, length)
