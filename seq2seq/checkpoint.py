"""The checkpoint folder, one format for both models.

  config.json         Config (versioned) - enough to rebuild the model
  model.safetensors   weights of the best model (no pickle: loading runs no code)
  spm.model | vocab.json   the tokenizer
  metrics.json        the best model's scores
  resume.safetensors + train_state.pt   the latest weights and optimizer/RNG/step state, for --resume
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from seq2seq.config import Config
from seq2seq.files import atomic_path, write_text_atomic
from seq2seq.errors import UserError

BEST, LAST, STATE = "model.safetensors", "resume.safetensors", "train_state.pt"


def save_weights(model: torch.nn.Module, path: Path) -> None:
    with atomic_path(path) as tmp:
        save_model(model, str(tmp))  # handles tied (shared) weights, unlike save_file


def load_weights(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path}: not found")
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except SafetensorError as e:  # cut short (a broken download) or not safetensors at all
        raise UserError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:160]}); "
                        "it may be truncated: copy or download it again") from None
    except RuntimeError as e:  # shapes differ: the weights belong to another configuration
        raise UserError(f"{path}: {_mismatch(model, path) or 'weights do not match config.json'} "
                        f"({str(e).splitlines()[0][:160]})") from None
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the config (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")


def _mismatch(model: torch.nn.Module, path: Path) -> str | None:
    """Where the usual culprit, a tokenizer of another size than the embedding, explains it."""
    with safe_open(str(path), "pt") as f:
        if "embed.weight" not in f.keys():
            return None
        rows = f.get_slice("embed.weight").get_shape()[0]
    vocab = model.embed.weight.size(0)
    if rows != vocab:
        return f"the tokenizer has {vocab} entries but the weights' embedding has {rows} rows"
    return None


def save_state(state: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict:
    """The resume state, read without running code: tensors, numbers and strings only. Anything
    else (a pickle built to run code on load) is refused before it can run."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        found = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:120]
        raise UserError(f"{path}: refused: it holds more than tensors and numbers ({found}); a resume state "
                        "written by seq2seq never does, so this file is damaged or was crafted; "
                        "delete it and start a new run in another --output") from None
    except (RuntimeError, EOFError, OSError) as e:  # truncated or not a torch file
        raise UserError(f"{path}: not a readable resume state ({str(e).splitlines()[0][:160]})") from None


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
