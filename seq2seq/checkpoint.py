"""The checkpoint folder, one format for every model kind.

  config.json         Config (versioned) - enough to rebuild the model
  model.safetensors   weights of the best model (no pickle: loading runs no code)
  spm.model | vocab.json   the tokenizer (a classifier's: spm.model and labels.json)
  metrics.json        the best model's scores
  resume.safetensors + train_state.pt   the latest weights and optimizer/RNG/step state, for --resume
"""
from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from seq2seq.config import Config
from seq2seq.device import resolve as resolve_device
from seq2seq.files import atomic_path, write_text_atomic
from seq2seq.errors import UserError

BEST, LAST, STATE = "model.safetensors", "resume.safetensors", "train_state.pt"


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """The weights as safetensors, from any device. Each tensor is copied to its own CPU storage:
    cuDNN keeps an LSTM's weights as views of one flat buffer, which safetensors refuses, and
    tied weights (the output layer sharing the embedding) are stored once, under the first name."""
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key not in seen:
            seen.add(key)
            tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        except SafetensorError as e:  # safetensors reports a failed write (folder gone, disk full) as its own error
            raise OSError(f"{tmp}: could not write the weights ({(str(e).splitlines() or ['?'])[0][:160]})") from None


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Copy saved weights into `model`, on whatever device and in whatever dtype it has (a
    release's fp16 weights into an fp32 model, CPU files into a CUDA model)."""
    if not path.is_file():
        raise UserError(f"{path}: not found")
    try:
        saved = load_file(str(path))
    except SafetensorError as e:  # cut short (a broken download) or not safetensors at all
        raise UserError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:160]}); "
                        "it may be truncated: copy or download it again") from None
    own = model.state_dict()
    tied: dict[tuple, list[str]] = {}  # names that share one tensor (tied weights): saved once
    for name, tensor in own.items():
        tied.setdefault((tensor.data_ptr(), tuple(tensor.shape)), []).append(name)
    missing = [names[0] for names in tied.values() if not any(n in saved for n in names)]
    unexpected = sorted(set(saved) - set(own))
    if missing or unexpected:
        raise UserError(f"{path}: {_mismatch(model, path) or 'weights do not match the config'} "
                        f"(missing {sorted(missing)[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for names in tied.values():
            name = next(n for n in names if n in saved)
            if saved[name].shape != own[name].shape:
                raise UserError(f"{path}: {_mismatch(model, path) or 'weights do not match config.json'} "
                                f"({name}: saved {tuple(saved[name].shape)}, config {tuple(own[name].shape)})")
            own[name].copy_(saved[name])


def takes_encoder_only(cfg: Config, init: Config) -> bool:
    """Whether a run of `cfg` started from a model of `init` takes only its embedding and encoder:
    a classifier from a translator, or from a pretrained encoder (model.head lm), or the reverse."""
    return cfg.kind == "classifier" and (init.kind == "translator"
                                         or init.kind == cfg.kind and init.model.head != cfg.model.head)


def load_encoder(model: torch.nn.Module, path: Path) -> None:
    """A translator's or a pretrained encoder's embedding and encoder (`embed.*`, `encoder.*`)
    into a model with parts of the same names and shapes (a classifier); the rest of the model
    keeps its initialisation."""
    if not path.is_file():
        raise UserError(f"{path}: not found")
    try:
        saved = load_file(str(path))
    except SafetensorError as e:
        raise UserError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:160]})") from None
    own = model.state_dict()
    names = [n for n in own if n.startswith(("embed.", "encoder."))]
    with torch.no_grad():
        for name in names:
            if name not in saved or saved[name].shape != own[name].shape:
                found = tuple(saved[name].shape) if name in saved else "nothing"
                raise UserError(f"{path}: {name} is {found}, the model needs {tuple(own[name].shape)}")
            own[name].copy_(saved[name])


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
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is damaged or foreign
        raise UserError(f"{path}: not a readable resume state (not a torch checkpoint: cut short, or "
                        "another kind of file)")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        found = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:120]
        raise UserError(f"{path}: refused: it holds more than tensors and numbers ({found}); a resume state "
                        "written by seq2seq never does, so this file is damaged or was crafted; "
                        "delete it and start a new run in another --output") from None
    except Exception as e:  # a damaged archive fails in many ways, all meaning "cannot read this"
        raise UserError(f"{path}: not a readable resume state ({str(e).splitlines()[0][:160]})") from None


def save_json(obj: dict, path: Path) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def kind_classes(kind: str) -> tuple[type, type]:
    """The model class and the tokenizer class of a model kind: the one place that maps a kind to them."""
    from seq2seq.models.charlm import CharLM
    from seq2seq.models.classifier import Classifier
    from seq2seq.models.translator import Translator
    from seq2seq.tokenizer import CharVocab, LabelledTokenizer, SubwordTokenizer

    return {"translator": (Translator, SubwordTokenizer), "charlm": (CharLM, CharVocab),
            "classifier": (Classifier, LabelledTokenizer)}[kind]


def build(cfg: Config, tokenizer):
    model_class = kind_classes(cfg.kind)[0]
    if cfg.kind == "classifier":  # its output size is the number of labels, which the tokenizer holds
        if cfg.model.head == "lm":
            from seq2seq.models.classifier import EncoderLM

            return EncoderLM(cfg.model, len(tokenizer))
        return model_class(cfg.model, len(tokenizer), len(tokenizer.labels))
    return model_class(cfg.model, len(tokenizer))


def load(folder: str | Path, weights: str = BEST, device: str = "cpu"):
    """(config, model on `device`, tokenizer) of a model folder, for use: in eval mode and frozen
    (no gradients), so that decoding keeps its packed weights without comparing them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: model folder not found")
    cfg = Config.load(folder / "config.json")
    if cfg.kind == "classifier" and cfg.model.head == "lm":
        raise UserError(f"{folder}: a pretrained encoder (model.head = \"lm\"), not a classifier: "
                        f"train one from it with `seq2seq train classifier --preset PRESET --init-from {folder}`")
    tokenizer = kind_classes(cfg.kind)[1].load(folder)
    model = build(cfg, tokenizer).to(resolve_device(device))
    load_weights(model, folder / weights)
    model.eval().requires_grad_(False)
    if cfg.kind == "translator":
        from seq2seq.shortlist import Shortlist

        model.shortlist = Shortlist.load(folder)
        if model.shortlist is not None and len(model.shortlist.candidates) != len(tokenizer):
            raise UserError(f"{folder / 'shortlist.safetensors'}: built for a vocabulary of "
                            f"{len(model.shortlist.candidates)} pieces, the model has {len(tokenizer)}; "
                            f"rebuild it with scripts/build_shortlist.py or delete it")
    return cfg, model, tokenizer
