#!/usr/bin/env python
"""Average the weights of model folders of one architecture and tokenizer (checkpoint averaging).

  python scripts/average_weights.py runs/enfr_ft3 runs/enfr_ft4 runs/enfr_ft4/resume.safetensors \
      --output runs/enfr_avg

Each parameter becomes the mean of the folders' best weights (`model.safetensors`), or of the
weights file named (`resume.safetensors`: a run's last weights), in fp32. The
output takes the first folder's config and tokenizer, and records its sources in metrics.json;
the folders must share the tokenizer, or the averaged embeddings would mean nothing. Pick the
average on a dev set, against each folder alone: it does not always win.
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

TOKENIZER = ("spm.model", "vocab.json", "labels.json")  # labels.json: a classifier's


def average(paths: list[Path], output: Path) -> None:
    folders = [path.parent if path.is_file() else path for path in paths]
    models = [checkpoint.load(folder, path.name if path.is_file() else checkpoint.BEST)[1]
              for folder, path in zip(folders, paths)]
    for folder in folders[1:]:
        for first, other in ((folders[0] / name, folder / name) for name in TOKENIZER):
            if first.is_file() != other.is_file() or first.is_file() and not filecmp.cmp(first, other, shallow=False):
                raise UserError(f"{folder}: its tokenizer differs from {folders[0]}'s; only one tokenizer's models average")
    states = [model.state_dict() for model in models]
    mean = {key: sum(state[key].float() for state in states) / len(states) for key in states[0]}
    models[0].load_state_dict(mean)
    output.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", *TOKENIZER):
        if (folders[0] / name).is_file():
            shutil.copy2(folders[0] / name, output / name)
    checkpoint.save_weights(models[0], output / checkpoint.BEST)
    sources = {str(path): json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file()
               else None for folder, path in zip(folders, paths)}
    checkpoint.save_json({"averaged": sources}, output / "metrics.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", type=Path, nargs="+")
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args()
    try:
        if len(args.folders) < 2:
            raise UserError("give at least two model folders to average")
        average(args.folders, args.output)
    except UserError as e:
        sys.exit(f"average_weights: {e}")
    print(f"{args.output}: the mean of {len(args.folders)} models' weights")


if __name__ == "__main__":
    main()
