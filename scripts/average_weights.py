#!/usr/bin/env python
"""Average the weights of model folders of one architecture and tokenizer (checkpoint averaging),
or, with --ensemble, keep every classifier and average their probabilities.

  python scripts/average_weights.py runs/enfr_ft3 runs/enfr_ft4 runs/enfr_ft4/resume.safetensors \
      --output runs/enfr_avg
  python scripts/average_weights.py runs/sst2 runs/sst2-seed2 runs/sst2-seed3 --ensemble --output runs/sst2-ens

Each parameter becomes the mean of the folders' best weights (`model.safetensors`), or of the
weights file named (`resume.safetensors`: a run's last weights), in fp32. The
output takes the first folder's config and tokenizer, and records its sources in metrics.json;
the folders must share the tokenizer, or the averaged embeddings would mean nothing. Pick the
average on a dev set, against each folder alone: it does not always win.

--ensemble (classifiers of one configuration): a folder whose `model.members` models each keep
their own weights; `classify` and `evaluate` average their class probabilities. Separately trained
runs cannot share one set of weights, but they can vote.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seq2seq import checkpoint  # noqa: E402
from seq2seq.errors import UserError  # noqa: E402

TOKENIZER = ("spm.model", "vocab.json", "labels.json")


def load_sharing_tokenizer(paths: list[Path]) -> tuple[list[Path], list]:
    """The folders and their loaded (config, model, tokenizer), refused unless one tokenizer serves all."""
    folders = [path.parent if path.is_file() else path for path in paths]
    loaded = [checkpoint.load(folder, path.name if path.is_file() else checkpoint.BEST)
              for folder, path in zip(folders, paths)]
    for folder in folders[1:]:
        for first, other in ((folders[0] / name, folder / name) for name in TOKENIZER):
            if first.is_file() != other.is_file() or first.is_file() and not filecmp.cmp(first, other, shallow=False):
                raise UserError(f"{folder}: its tokenizer differs from {folders[0]}'s; only one tokenizer's models combine")
    return folders, loaded


def average(paths: list[Path], output: Path) -> None:
    folders, loaded = load_sharing_tokenizer(paths)
    models = [model for _, model, _ in loaded]
    states = [model.state_dict() for model in models]
    mean = {key: sum(state[key].float() for state in states) / len(states) for key in states[0]}
    models[0].load_state_dict(mean)
    write(folders, paths, output, folders[0] / "config.json", models[0], "averaged")


def ensemble(paths: list[Path], output: Path) -> None:
    folders, loaded = load_sharing_tokenizer(paths)
    cfg, _, tokenizer = loaded[0]
    if cfg.kind != "classifier":
        raise UserError(f"{folders[0]}: holds a {cfg.kind}; --ensemble combines classifiers")
    for folder, (other, _, _) in zip(folders[1:], loaded[1:]):
        if other.model != cfg.model:
            raise UserError(f"{folder}: its model settings differ from {folders[0]}'s; an ensemble's members share them")
    cfg.model.members = len(loaded)
    combined = checkpoint.build(cfg, tokenizer)
    for member, (_, model, _) in zip(combined.members, loaded):
        member.load_state_dict(model.state_dict())
    output.mkdir(parents=True, exist_ok=True)
    cfg.save(output / "config.json")
    write(folders, paths, output, None, combined, "members")


def write(folders: list[Path], paths: list[Path], output: Path, config: Path | None, model, record: str) -> None:
    """The weights, the tokenizer, the config (when `config` names one to copy) and the sources."""
    output.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER if config is None else ("config.json", *TOKENIZER):
        if (folders[0] / name).is_file():
            shutil.copy2(folders[0] / name, output / name)
    checkpoint.save_weights(model, output / checkpoint.BEST)
    sources = {str(path): json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file()
               else None for folder, path in zip(folders, paths)}
    checkpoint.save_json({record: sources}, output / "metrics.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", type=Path, nargs="+")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--ensemble", action="store_true", help="classifiers: keep each model, average their probabilities")
    args = p.parse_args()
    try:
        if len(args.folders) < 2:
            raise UserError("give at least two model folders to combine")
        (ensemble if args.ensemble else average)(args.folders, args.output)
    except UserError as e:
        sys.exit(f"average_weights: {e}")
    what = "an ensemble" if args.ensemble else "the mean of the weights"
    print(f"{args.output}: {what} of {len(args.folders)} models")


if __name__ == "__main__":
    main()
