"""The checkpoint folder, one format for both models.

  config.json         Config (versioned) - enough to rebuild the model
  model.safetensors   weights of the best model (no pickle: loading runs no code)
  spm.model | vocab.json   the tokenizer
  metrics.json        the best model's scores
  resume.safetensors + train_state.pt   the latest weights and optimizer/RNG/step state, for --resume
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from seq2seq.config import Config, write_text_atomic
from seq2seq.errors import UserError

BEST, LAST, STATE = "model.safetensors", "resume.safetensors", "train_state.pt"


def save_weights(model: torch.nn.Module, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_model(model, str(tmp))  # handles tied (shared) weights, unlike save_file
    os.replace(tmp, path)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path}: not found")
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except RuntimeError as e:  # shapes differ: the weights belong to another configuration
        raise UserError(f"{path}: weights do not match config.json ({str(e).splitlines()[0][:200]})") from None
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the config (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")


def save_state(state: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def save_json(obj: dict, path: Path) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def build(cfg: Config, tokenizer):
    from seq2seq.models.charlm import CharLM
    from seq2seq.models.translator import Translator

    model_cls = Translator if cfg.kind == "translator" else CharLM
    return model_cls(cfg.model, len(tokenizer))


def load(folder: str | Path, weights: str = BEST):
    """(config, model in eval mode, tokenizer) of a model folder."""
    from seq2seq.tokenizer import CharVocab, SubwordTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: model folder not found")
    cfg = Config.load(folder / "config.json")
    tokenizer = (SubwordTokenizer if cfg.kind == "translator" else CharVocab).load(folder)
    model = build(cfg, tokenizer)
    load_weights(model, folder / weights)
    model.eval()
    return cfg, model, tokenizer
