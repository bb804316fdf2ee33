"""What the `seq2seq` command and `seq2seq serve` share, below both: argument types, the
--device / --precision arguments, the released models and loading a model of a kind. (serve/
imports this module, never cli.py, which imports serve/.)"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from seq2seq.device import DEVICES, PRECISIONS
from seq2seq.errors import UserError


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where to run: auto (the GPU where CUDA is present, else the CPU), cpu or cuda")


def add_precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="decoding arithmetic; auto: bf16 where the device computes it natively (AVX-512 BF16 or "
                        "AMX CPUs, Arm BF16, Ampere and later GPUs), else fp32; int8 (CPU from AVX2): the linear "
                        "layers in int8, the rest as auto (faster in batches, about 0.2 BLEU lower)")
    add_device_arg(p)


RELEASED = {"translator": "en-fr", "charlm": "shakespeare", "classifier": "sst2"}


def released_model(kind: str) -> Path:
    """The model shipped in the project's checkpoints/ folder (or $SEQ2SEQ_MODELS) for `kind`."""
    root = Path(os.environ.get("SEQ2SEQ_MODELS", Path(__file__).resolve().parent.parent / "checkpoints"))
    folder = root / RELEASED[kind]
    if not (folder / "config.json").is_file():
        what = {"translator": "translator", "charlm": "character model", "classifier": "classifier"}[kind]
        raise UserError(f"no -m given and no released {what} at {folder}: set SEQ2SEQ_MODELS to the folder "
                        "holding en-fr/, shakespeare/ and sst2/ (a clone's checkpoints/; `pip install .` copies "
                        "only the code), or pass -m MODEL_FOLDER")
    return folder


def load_kind(folder: Path | None, kind: str, device: str = "cpu"):
    from seq2seq import checkpoint

    folder = folder or released_model(kind)
    cfg, model, tokenizer = checkpoint.load(folder, device=device)
    if kind and cfg.kind != kind:
        raise UserError(f"{folder} holds a {cfg.kind} model; this command needs a {kind}")
    return cfg, model, tokenizer


def add_test_set_args(p: argparse.ArgumentParser) -> None:
    """A translator and a test set, for the scripts that measure one: -m, --src/--ref or --tsv, --beam."""
    p.add_argument("-m", "--model", type=Path, help="translator folder (default: the released en-fr)")
    p.add_argument("--src", type=Path, help="source sentences, one a line")
    p.add_argument("--ref", type=Path, help="their reference translations")
    p.add_argument("--tsv", type=Path, help="source<TAB>reference lines instead")
    p.add_argument("--beam", type=positive_int, default=5, help="beam size (default 5)")


def read_test_pairs(tsv: Path | None, src: Path | None, ref: Path | None,
                    skip_bad_lines: bool = False) -> list[tuple[str, str]]:
    """A translation test set given as --tsv, or as --src and --ref; one-line errors otherwise."""
    from seq2seq.data import read_parallel_files, read_tsv

    if tsv and (src or ref):
        raise UserError("give a test set as --tsv or as --src and --ref, not both")
    if tsv:
        pairs = read_tsv(tsv, skip_bad_lines)
    elif src and ref:
        pairs = read_parallel_files(src, ref)
    else:
        raise UserError("evaluating a translator needs --src and --ref, or --tsv")
    if not pairs:
        raise UserError(f"{tsv or src}: no sentence pairs to evaluate")
    return pairs


def load_test_set(args, program: str):
    """(config, model, tokenizer, pairs) of `add_test_set_args`' arguments; a bad one ends the
    program with one line."""
    import sys

    from seq2seq import checkpoint

    try:
        pairs = read_test_pairs(args.tsv, args.src, args.ref)
        return (*checkpoint.load(args.model or released_model("translator")), pairs)
    except UserError as e:
        sys.exit(f"{program}: {e}")
