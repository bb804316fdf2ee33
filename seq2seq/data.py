"""Corpora: readers with validation, length-bucketed token-budget batches, character streams."""
from __future__ import annotations

import csv
import glob
import itertools
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

import torch

from seq2seq.config import TranslatorData
from seq2seq.errors import UserError

log = logging.getLogger("seq2seq")


def iter_lines(path: str | Path) -> Iterator[str]:
    """The lines of a UTF-8 file, without line ends, read one at a time (a corpus need not fit in
    memory); invalid UTF-8 is an error naming the line and column."""
    path = Path(path)
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a text file") from None
    with handle:
        for number, raw in enumerate(handle, 1):
            yield decode_line(raw, path, number)


def decode_line(raw: bytes, where, number: int) -> str:
    """Line `number` of `where` from UTF-8, without its line end; invalid UTF-8 is an error naming
    the line and column."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}:{number}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    return line.removesuffix("\n").removesuffix("\r")


def read_lines(path: str | Path) -> list[str]:
    return list(iter_lines(path))


def read_text(path: str | Path) -> str:
    return "\n".join(read_lines(path)) + "\n"


def read_parallel(prefix: str | Path, src_lang: str, tgt_lang: str) -> list[tuple[str, str]]:
    return list(iter_parallel(prefix, src_lang, tgt_lang))


def iter_parallel(prefix: str | Path, src_lang: str, tgt_lang: str) -> Iterator[tuple[str, str]]:
    return iter_parallel_files(Path(f"{prefix}.{src_lang}"), Path(f"{prefix}.{tgt_lang}"))


def read_parallel_files(src_path: Path, tgt_path: Path) -> list[tuple[str, str]]:
    return list(iter_parallel_files(src_path, tgt_path))


def iter_parallel_files(src_path: Path, tgt_path: Path) -> Iterator[tuple[str, str]]:
    src_count = tgt_count = 0
    for src, tgt in itertools.zip_longest(iter_lines(src_path), iter_lines(tgt_path)):
        src_count, tgt_count = src_count + (src is not None), tgt_count + (tgt is not None)
        if src is not None and tgt is not None:
            yield src, tgt
    if src_count != tgt_count:
        raise UserError(f"line counts differ: {src_path} has {src_count} lines, {tgt_path} has {tgt_count}")


def read_tsv(path: str | Path, skip_bad_lines: bool = False) -> list[tuple[str, str]]:
    return list(iter_tsv(path, skip_bad_lines))


def iter_tsv(path: str | Path, skip_bad_lines: bool = False) -> Iterator[tuple[str, str]]:
    """source<TAB>target lines. A line with no tab or with extra columns is an error naming it,
    or, with `skip_bad_lines`, skipped and counted in the log."""
    bad = []
    for number, line in enumerate(iter_lines(path), 1):
        fields = line.split("\t")
        if len(fields) == 2:
            yield fields[0], fields[1]
            continue
        problem = "no tab" if len(fields) < 2 else f"{len(fields)} columns"
        if not skip_bad_lines:
            raise UserError(f"{path}:{number}: expected source<TAB>target, found {problem} "
                            "(--skip-bad-lines skips such lines)")
        bad.append(number)
    if bad:
        log.warning("%s: skipped %d bad line(s) (not source<TAB>target): line %s", path, len(bad),
                    ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else ""))


def iter_hf(cfg: TranslatorData, split: str, data_dir: Path = Path(".")) -> Iterator[tuple[str, str]]:
    """A split of a Hugging Face dataset: a hub name (needs internet) or a local loader + files
    (a relative data.hf_data_files starts at data_dir, as every other data path does). The table is
    memory-mapped Arrow; rows are read a batch at a time."""
    table = load_hf_split(cfg, split, data_dir)
    index = 0
    for rows in table.iter(batch_size=10_000):  # columns of 10,000 rows
        for values in zip(*rows.values()):
            row = dict(zip(rows, values))
            yield _field(row, cfg.hf_src_field, cfg.hf_path, index), _field(row, cfg.hf_tgt_field, cfg.hf_path, index)
            index += 1


def load_hf_split(cfg, split: str, data_dir: Path):
    """One split of the dataset a data config names (data.hf_path, hf_name, hf_data_files)."""
    import datasets

    kwargs = {"split": split, **({"name": cfg.hf_name} if cfg.hf_name else {})}
    if cfg.hf_data_files:
        kwargs["data_files"] = {split: hf_files(cfg, split, data_dir)}
    try:
        return datasets.load_dataset(cfg.hf_path, **kwargs)
    except Exception as e:  # datasets raises many types; all mean "could not load this"
        raise UserError(f"dataset {cfg.hf_path!r} split {split!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def hf_files(cfg: TranslatorData, split: str, data_dir: Path) -> str:
    files = cfg.hf_data_files.format(split=split)
    return files if "://" in files else str(resolve(data_dir, files))


def _field(row: dict, dotted: str, source: str, index: int) -> str:
    value = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise UserError(f"dataset {source!r} row {index}: no field {dotted!r} (fields: {', '.join(row)})")
        value = value[part]
    return "" if value is None else str(value)  # a missing value is an empty side: dropped and counted


def resolve(data_dir: Path, name: str) -> Path:
    """A corpus name of a config: an absolute path as it is (paths a user types on the command line
    are made absolute there), a preset's relative name read from the data folder."""
    path = Path(name)
    return path if path.is_absolute() else Path(data_dir) / path


def corpus_file(data_dir: Path, name: str, suffix: str = "") -> Path:
    """`resolve`, and a missing preset corpus (`name` + `suffix`) an error that says where it looked."""
    path = resolve(data_dir, name)
    if not Path(f"{path}{suffix}").exists() and not Path(name).is_absolute():
        raise UserError(f"{path}{suffix}: file not found; a preset's corpus names are read from the data folder "
                        f"{Path(data_dir).resolve()} (set it with --data-dir or $SEQ2SEQ_DATA)")
    return path


def load_pairs(cfg: TranslatorData, data_dir: Path, split: str) -> list[tuple[str, str]]:
    return list(iter_pairs(cfg, data_dir, split))


def iter_pairs(cfg: TranslatorData, data_dir: Path, split: str) -> Iterator[tuple[str, str]]:
    """The pairs of split 'train', 'dev' or 'test' as the data config describes them: one corpus,
    or the corpora of a list concatenated in order (each cut to its max_sentences, if set)."""
    spec = getattr(cfg, split)
    if not spec:
        raise UserError(f"data.{split} is not set in the config")
    if isinstance(spec, str):
        yield from iter_corpus(cfg, data_dir, spec, cfg.format)
        return
    for corpus in spec:
        fmt = corpus.get("format", cfg.format)
        pairs, count = iter_corpus(cfg, data_dir, corpus["path"], fmt), 0
        for pair in itertools.islice(pairs, corpus.get("max_sentences") or None):
            count += 1
            yield pair
        rest = sum(1 for _ in pairs)
        log.info("%s: %d pairs from %s (%s%s)", split, count, corpus["path"], fmt,
                 f", the first of {count + rest}" if rest else "")


def corpus_files(cfg: TranslatorData, data_dir: Path, split: str) -> list[Path]:
    """The local files a split reads (for telling whether a cache built from them is still current)."""
    spec = getattr(cfg, split)
    corpora = [{"path": spec}] if isinstance(spec, str) else spec
    files = []
    for corpus in corpora:
        fmt = corpus.get("format", cfg.format)
        if fmt == "tsv":
            files.append(resolve(data_dir, corpus["path"]))
        elif fmt == "parallel":
            files += [Path(f"{resolve(data_dir, corpus['path'])}.{lang}") for lang in (cfg.src_lang, cfg.tgt_lang)]
        elif cfg.hf_data_files and "://" not in cfg.hf_data_files:
            files += sorted(Path(p) for p in glob.glob(hf_files(cfg, corpus["path"], data_dir), recursive=True))
        elif resolve(data_dir, cfg.hf_path).exists():  # a local dataset folder or loader script
            local = resolve(data_dir, cfg.hf_path)
            files += sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
    return files


def iter_corpus(cfg: TranslatorData, data_dir: Path, name: str, fmt: str) -> Iterator[tuple[str, str]]:
    if fmt == "hf":
        return iter_hf(cfg, name, data_dir)
    if fmt == "tsv":
        return iter_tsv(corpus_file(data_dir, name), cfg.skip_bad_lines)
    if fmt == "parallel":
        return iter_parallel(corpus_file(data_dir, name, f".{cfg.src_lang}"), cfg.src_lang, cfg.tgt_lang)
    raise UserError(f"data.format must be parallel, tsv or hf, got {fmt!r}")


def non_empty(pairs, what: str) -> Iterator[tuple[str, str]]:
    """The pairs stripped, those with an empty side left out and counted in the log at the end."""
    read = kept = 0
    for src, tgt in pairs:
        read += 1
        src, tgt = src.strip(), tgt.strip()
        if src and tgt:
            kept += 1
            yield src, tgt
    if kept < read:
        log.info("%s: dropped %d empty pair(s) of %d", what, read - kept, read)


def within_length(src_ids: list, tgt_ids: list, max_tokens: int, what: str) -> list[int]:
    """Indices of the pairs whose sides both fit in `max_tokens`; the others are counted in the log."""
    keep = [i for i in range(len(src_ids)) if len(src_ids[i]) <= max_tokens and len(tgt_ids[i]) <= max_tokens]
    if len(keep) < len(src_ids):
        log.info("%s: dropped %d pair(s) longer than %d tokens", what, len(src_ids) - len(keep), max_tokens)
    return keep


def token_batches(src_lens, tgt_lens, batch_tokens: int, seed: int) -> list[np.ndarray]:
    """Length-bucketed batches (arrays of row numbers) whose padded size (max source + max target
    length, times rows) stays within `batch_tokens`. Order is shuffled within equal lengths and
    across batches, from `seed`. Lengths may be lists or numpy arrays; memory is a few bytes a pair."""
    src_lens, tgt_lens = np.asarray(src_lens, dtype=np.int64), np.asarray(tgt_lens, dtype=np.int64)
    rng = np.random.default_rng(seed % 2**64)  # numpy takes no negative seed
    # coarse target buckets, then source length: less padding than sorting on either length alone
    order = np.lexsort((rng.random(len(src_lens)), tgt_lens, src_lens, tgt_lens // 3))
    ends, max_src, max_tgt, rows = [], 0, 0, 0
    for start in range(0, len(order), 1 << 20):  # Python ints a slice at a time: memory stays flat
        chunk = order[start : start + (1 << 20)]
        for position, s, t in zip(range(start, start + len(chunk)), src_lens[chunk].tolist(), tgt_lens[chunk].tolist()):
            new_src, new_tgt = max(max_src, s), max(max_tgt, t)
            if rows and (new_src + new_tgt) * (rows + 1) > batch_tokens:
                ends.append(position)
                rows, new_src, new_tgt = 0, s, t
            rows += 1
            max_src, max_tgt = new_src, new_tgt
    batches = np.split(order, ends) if len(order) else []
    return [batches[i] for i in rng.permutation(len(batches))]


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


# ----- labelled text (the classifier) -------------------------------------------------------------

TEXT_COLUMNS = ("sentence", "text", "content", "review")
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_PUNCTUATION = re.compile(r"""(\.\.\.|--|[!?;:()"]|,(?=\s|$)|(?<!\b[a-z])(?<!\bmr)(?<!\bmrs)(?<!\bms)(?<!\bdr)(?<!\bst)(?<!\bjr)(?<!\bvs)\.(?=\s|$))""")


def normalize_text(text: str, style: str) -> str:
    """Text as the training data was prepared. lower-split: lower-cased, clitics and punctuation
    split off words, spaces collapsed ("Isn't it GREAT!" -> "is n't it great !"), as SST-2 is;
    text already in that form comes back as it was."""
    if style == "none":
        return " ".join(text.split())
    text = text.lower().replace("\u2019", "'").replace("\u201c", '"').replace("\u201d", '"')
    text = _PUNCTUATION.sub(r" \1 ", _CLITIC.sub(r" \1", text))
    return " ".join(text.split())


def column_index(header: list[str], wanted: str, what: str, where, default: tuple[str, ...] = (),
                 exclude: int | None = None) -> int:
    """The position of a column named `wanted` (or numbered, from 0); `wanted` "" takes the first
    of `default` present, else the one column other than `exclude`."""
    if wanted.isdigit():
        if int(wanted) >= len(header):
            raise UserError(f"{where}: {what} column {wanted} does not exist (the header has {len(header)} columns)")
        return int(wanted)
    names = [name.strip() for name in header]
    if wanted:
        if wanted not in names:
            raise UserError(f"{where}: no {what} column {wanted!r} in the header (columns: {', '.join(names)})")
        return names.index(wanted)
    found = [i for i, name in enumerate(names) if name in default]
    others = [i for i in range(len(names)) if i != exclude]
    if found or len(others) == 1:
        return (found or others)[0]
    raise UserError(f"{where}: which column is the {what}? none is named {', '.join(default)}; set "
                    f"data.text_column (columns: {', '.join(names)})")


def iter_labelled(path: Path, fmt: str, label_column: str, text_column: str) -> Iterator[tuple[str, str, int]]:
    """(label, text, line number) of a tsv/csv file with a header line, or of a JSON-lines file.
    Which columns were read is logged; a line without them is an error naming it."""
    if fmt == "jsonl":
        yield from _iter_jsonl(path, label_column, text_column)
        return
    lines = iter_lines(path)
    rows = csv.reader(lines, delimiter="\t" if fmt == "tsv" else ",",
                      quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL)
    header = next(rows, None)
    if header is None:
        return
    label = column_index(header, label_column, "label", f"{path}:1")
    text = column_index(header, text_column, "text", f"{path}:1", TEXT_COLUMNS, exclude=label)
    log.info("%s: labels from column %r, text from column %r", path, header[label], header[text])
    for number, row in enumerate(rows, 2):
        if not row or row == [""]:
            continue
        if max(label, text) >= len(row):
            raise UserError(f"{path}:{number}: {len(row)} column(s), expected {len(header)} as in the header")
        yield row[label].strip(), row[text], number


def _iter_jsonl(path: Path, label_field: str, text_field: str) -> Iterator[tuple[str, str, int]]:
    for number, line in enumerate(iter_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: invalid JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number}: expected a JSON object")
        text_key = text_field or next((k for k in TEXT_COLUMNS if k in row), "")
        for key, what in ((label_field, "label"), (text_key, "text")):
            if key not in row:
                raise UserError(f"{path}:{number}: no {what} field {key!r} (fields: {', '.join(row)})")
        yield str(row[label_field]).strip(), str(row[text_key]), number


def iter_labelled_hf(cfg, split: str, data_dir: Path) -> Iterator[tuple[str, str, int]]:
    """A split of a Hugging Face dataset (hub name or local loader + files); row numbers from 1."""
    table = load_hf_split(cfg, split, data_dir)
    label = column_index(table.column_names, cfg.label_column, "label", f"dataset {cfg.hf_path!r}")
    text = column_index(table.column_names, cfg.text_column, "text", f"dataset {cfg.hf_path!r}", TEXT_COLUMNS, label)
    label, text = table.column_names[label], table.column_names[text]
    log.info("dataset %s split %s: labels from %r, text from %r", cfg.hf_path, split, label, text)
    number = 0
    for rows in table.iter(batch_size=10_000):
        for value, sentence in zip(rows[label], rows[text]):
            number += 1
            yield str(value).strip(), "" if sentence is None else str(sentence), number


def read_sentences(data_dir: Path, names: str) -> list[str]:
    """data.unlabelled: the lines of comma-separated files, a .tsv file's first column, each
    sentence once in the order first seen (Tatoeba repeats an English side per translation)."""
    lines = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        path = corpus_file(data_dir, name)
        tsv = path.suffix == ".tsv"
        lines += [line.split("\t", 1)[0] if tsv else line for line in iter_lines(path)]
    return list(dict.fromkeys(line for line in lines if line.strip()))


def load_labelled(cfg, data_dir: Path, split: str) -> list[tuple[str, str, int]]:
    """The labelled examples of split 'train', 'dev' or 'test' as the data config describes them."""
    name = getattr(cfg, split)
    if not name:
        raise UserError(f"data.{split} is not set in the config")
    if cfg.format == "hf":
        return list(iter_labelled_hf(cfg, name, data_dir))
    return list(iter_labelled(corpus_file(data_dir, name), cfg.format, cfg.label_column, cfg.text_column))
