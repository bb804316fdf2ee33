"""Configuration: dataclasses filled from a TOML preset, then from `--set key=value` overrides.

One `Config` flows through data loading, model construction, training and the checkpoint's
config.json, so a trained model carries everything needed to rebuild it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from seq2seq.errors import UserError
from seq2seq.files import write_text_atomic

FORMAT_VERSION = 1
KINDS = ("translator", "charlm", "classifier")


@dataclass
class TranslatorData:
    # "parallel": <prefix>.<src_lang> + <prefix>.<tgt_lang>; "tsv": src<TAB>tgt per line;
    # "hf": a Hugging Face dataset (hub name or a local loader such as "json").
    format: str = "parallel"
    # A split is one corpus (a path, or the split name for "hf") or a list of corpora read in order
    # and concatenated: [{ path = "a.tsv", format = "tsv" }, { path = "b", max_sentences = 500 }]
    # (format defaults to the one above; max_sentences keeps the first N pairs, 0 = all).
    train: str | list = ""
    dev: str | list = ""
    test: str | list = ""
    src_lang: str = "en"
    tgt_lang: str = "fr"
    hf_path: str = ""
    hf_name: str = ""
    hf_data_files: str = ""  # for local files through `datasets` (json/csv/parquet loaders)
    hf_src_field: str = "translation.en"
    hf_tgt_field: str = "translation.fr"
    max_tokens: int = 100  # pairs longer than this (in subwords, either side) are dropped
    dev_max_sentences: int = 0  # 0 = the whole dev set for dev BLEU
    vocab_size: int = 8000
    spm_model_type: str = "unigram"
    # > 0: subword regularization, each training batch segmented afresh by SentencePiece sampling
    # (batches are planned on the plain segmentation's lengths; sampled ones run a little longer)
    sample_alpha: float = 0.0
    skip_bad_lines: bool = False  # TSV lines without exactly one tab: skipped and counted, not an error


@dataclass
class TranslatorModel:
    cell: str = "lstm"  # lstm | gru | rnn
    emb_dim: int = 256
    enc_hidden: int = 256  # per direction
    enc_layers: int = 2
    dec_hidden: int = 512
    dec_layers: int = 1
    attention: str = "general"  # dot | general | additive
    dropout: float = 0.3
    input_feeding: bool = False
    tie_embeddings: bool = True
    forget_bias: float = 0.0  # LSTM forget-gate bias at init; 0 = PyTorch's default (near 0)
    # chrono initialisation (Tallec & Ollivier 2018) of LSTM/GRU gates for dependencies up to
    # this many steps, in place of forget_bias; 0 = off
    chrono_horizon: int = 0


@dataclass
class CharLMData:
    text: str = ""
    valid_fraction: float = 0.1  # the last fraction of the text is the validation split


@dataclass
class CharLMModel:
    cell: str = "lstm"
    emb_dim: int = 512
    hidden: int = 512
    layers: int = 2
    dropout: float = 0.2
    tie_embeddings: bool = True
    forget_bias: float = 0.0  # LSTM forget-gate bias at init; 0 = PyTorch's default (near 0)
    # chrono initialisation (Tallec & Ollivier 2018) of LSTM/GRU gates for dependencies up to
    # this many steps, in place of forget_bias; 0 = off
    chrono_horizon: int = 0


@dataclass
class ClassifierData:
    # tsv | csv: a header line, then one example a line; jsonl: one JSON object a line;
    # hf: a Hugging Face dataset (a hub name such as "stanfordnlp/sst2", or a local loader such as "json")
    format: str = "tsv"
    train: str = ""
    dev: str = ""
    test: str = ""
    label_column: str = "label"  # a header name or field, or a column number counted from 0
    # the same; "" = the first of sentence, text, content, review present, else the one other column
    text_column: str = ""
    label_names: str = ""  # e.g. "0=negative,1=positive": how labels are shown; "" = as in the data
    hf_path: str = ""
    hf_name: str = ""
    hf_data_files: str = ""
    # lower-split: lower-case and split punctuation and clitics off words ("isn't!" -> "is n't !"),
    # as SST-2's text is; applied to training text and to every input classified | none
    normalize: str = "lower-split"
    max_tokens: int = 128  # longer inputs keep their first max_tokens subwords
    vocab_size: int = 8000
    spm_model_type: str = "unigram"
    # model.head = "lm" only: more text to learn from besides the training split's, comma-separated
    # files of one sentence a line (a .tsv file: its first column; a header line is read as text)
    unlabelled: str = ""


@dataclass
class ClassifierModel:
    cell: str = "lstm"
    emb_dim: int = 256
    hidden: int = 256  # per direction
    layers: int = 1
    bidirectional: bool = True
    pooling: str = "max"  # over time: last (state) | mean | max
    dropout: float = 0.5
    freeze_encoder: bool = False  # keep the embedding and the recurrent encoder as initialised (--init-from)
    forget_bias: float = 0.0
    chrono_horizon: int = 0
    # classes: pooling -> dropout -> linear, the classifier | lm: the embedding and encoder trained
    # as a language model (models.classifier.EncoderLM), for a classifier's --init-from
    head: str = "classes"


@dataclass
class TrainConfig:
    seed: int = 1
    lr: float = 2e-3
    # cosine (to max_steps, else max_epochs; a budget run: to its planned step) | plateau (halve on
    # no dev gain) | constant
    lr_schedule: str = "cosine"
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0  # decoupled (AdamW): each step shrinks weights by lr * weight_decay
    clip_norm: float = 1.0
    # > 0: evaluations and the best model use an exponential moving average of the weights, this
    # decay per update (0.999 averages over about the last 1,000 updates)
    ema_decay: float = 0.0
    label_smoothing: float = 0.1
    max_epochs: int = 20
    max_steps: int = 0  # 0 = no limit
    eval_every: int = 0  # steps between evaluations; 0 = once per epoch
    patience: int = 5  # evaluations without improvement before stopping
    log_every: int = 50
    bf16: bool = True  # bf16 autocast for matmuls (fp32 master weights)
    threads: int = 0  # 0 = all cores
    # translator
    batch_tokens: int = 3000  # target+source token budget per batch (padded)
    teacher_forcing: float = 1.0  # < 1: scheduled sampling (needs the step loop)
    dev_beam: int = 1
    # charlm
    batch_size: int = 64  # parallel streams
    bptt: int = 128  # window length


@dataclass
class Config:
    kind: str
    data: Any
    model: Any
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = ""

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "kind": self.kind, "preset": self.preset,
                "data": dataclasses.asdict(self.data), "model": dataclasses.asdict(self.model),
                "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "Config":
        kind = raw.get("kind")
        if kind not in KINDS:
            raise UserError(f"{source}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        data_cls, model_cls = _SECTIONS[kind]
        cfg = cls(kind=kind, preset=raw.get("preset", ""),
                  data=_build(data_cls, raw.get("data", {}), f"{source} [data]"),
                  model=_build(model_cls, raw.get("model", {}), f"{source} [model]"),
                  train=_build(TrainConfig, raw.get("train", {}), f"{source} [train]"))
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        """Every setting checked against `RULES` at once, so a bad value fails when the config is
        read, naming its section and key, not deep in a run."""
        for section in ("data", "model", "train"):
            values = getattr(self, section)
            for key, rule in RULES.get(section, {}).items():
                if hasattr(values, key):
                    problem = rule(getattr(values, key))
                    if problem:
                        raise UserError(f"{source} [{section}] {key}: {problem}, got {getattr(values, key)!r}")
        formats = {"translator": ("parallel", "tsv", "hf"), "classifier": ("tsv", "csv", "jsonl", "hf")}.get(self.kind)
        if formats and self.data.format not in formats:
            raise UserError(f"{source} [data] format: a {self.kind} reads {', '.join(formats)}, got {self.data.format!r}")
        m = self.model
        if m.chrono_horizon and m.forget_bias:
            raise UserError(f"{source} [model] chrono_horizon: the chrono initialisation sets the forget bias itself; "
                            f"leave forget_bias at 0 (got {m.forget_bias})")
        if self.kind == "classifier":
            self._validate_head(source)
        if self.kind == "translator" and m.attention == "dot" and m.dec_hidden != 2 * m.enc_hidden:
            raise UserError(f"{source} [model] attention: dot attention needs dec_hidden ({m.dec_hidden}) == "
                            f"2 * enc_hidden ({2 * m.enc_hidden})")

    def _validate_head(self, source: str) -> None:
        m = self.model
        if m.head == "lm" and m.bidirectional and m.layers > 1:
            raise UserError(f"{source} [model] head: a bidirectional language model has one layer (a second would "
                            f"read the word it predicts from the backward direction), got layers = {m.layers}")
        if m.head != "lm" and self.data.unlabelled:
            raise UserError(f"{source} [data] unlabelled: read only when pretraining (model.head = \"lm\")")

    def save(self, path: Path) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Config":
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: not found (is this a model folder?)") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise UserError(f"{path}: format_version {version} is not supported (expected {FORMAT_VERSION})")
        return cls.from_dict(raw, str(path))


_SECTIONS = {"translator": (TranslatorData, TranslatorModel), "charlm": (CharLMData, CharLMModel),
             "classifier": (ClassifierData, ClassifierModel)}


def _one_of(*choices):
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


def _at_least(low):
    return lambda value: None if value >= low else f"must be at least {low}"


def _between(low, high, high_open: bool = False):
    def check(value):
        ok = low <= value < high if high_open else low <= value <= high
        return None if ok else f"must be in [{low}, {high}{')' if high_open else ']'}"
    return check


# What each setting may be; the classes above give their meaning and defaults.
RULES = {
    "data": {"normalize": _one_of("lower-split", "none"), "max_tokens": _at_least(1),
             "format": _one_of("parallel", "tsv", "csv", "jsonl", "hf"),
             "dev_max_sentences": _at_least(0), "vocab_size": _at_least(8),
             "spm_model_type": _one_of("unigram", "bpe", "char", "word"), "sample_alpha": _between(0.0, 1.0),
             "valid_fraction": _between(0.0, 1.0, high_open=True)},
    "model": {"cell": _one_of("lstm", "gru", "rnn"), "attention": _one_of("dot", "general", "additive"),
              "emb_dim": _at_least(1), "enc_hidden": _at_least(1), "enc_layers": _at_least(1), "dec_hidden": _at_least(1),
              "dec_layers": _at_least(1), "hidden": _at_least(1), "layers": _at_least(1),
              "dropout": _between(0.0, 1.0, high_open=True), "pooling": _one_of("last", "mean", "max"),
              "head": _one_of("classes", "lm"),
              "chrono_horizon": lambda v: None if v == 0 or v >= 3 else "must be 0 (off) or at least 3"},
    "train": {"lr": _between(0.0, 10.0), "lr_schedule": _one_of("cosine", "plateau", "constant"),
              "warmup_steps": _at_least(0), "min_lr_ratio": _between(0.0, 1.0), "weight_decay": _at_least(0.0),
              "clip_norm": _at_least(0.0), "ema_decay": _between(0.0, 1.0, high_open=True),
              "label_smoothing": _between(0.0, 1.0, high_open=True),
              "max_epochs": _at_least(1), "max_steps": _at_least(0), "eval_every": _at_least(0), "patience": _at_least(1),
              "log_every": _at_least(1), "threads": _at_least(0), "batch_tokens": _at_least(1),
              "teacher_forcing": _between(0.0, 1.0), "dev_beam": _between(1, 64), "batch_size": _at_least(1),
              "bptt": _at_least(1)},
}


def _build(cls, values: dict, where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    obj = cls()
    for key, value in values.items():
        kind = type(getattr(obj, key))
        if str(known[key].type) == "str | list" and isinstance(value, (list, dict)):  # a list of corpora
            kind = list
        setattr(obj, key, _coerce(value, kind, f"{where} {key}"))
    return obj


CORPUS_KEYS = ("path", "format", "max_sentences")
FORMATS = ("parallel", "tsv", "hf")


def _corpus(item, where: str) -> dict:
    """One corpus table of a list-valued data.train/dev/test, checked and normalised."""
    if not isinstance(item, dict):
        raise UserError(f"{where}: expected a table such as {{ path = \"...\" }}, got {item!r}")
    unknown = sorted(set(item) - set(CORPUS_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(CORPUS_KEYS)}")
    if not isinstance(item.get("path"), str) or not item["path"]:
        raise UserError(f"{where}: path must be set to a string (the corpus file, prefix or split)")
    corpus = {"path": item["path"]}
    if "format" in item:
        if item["format"] not in FORMATS:
            raise UserError(f"{where} format: expected one of {', '.join(FORMATS)}, got {item['format']!r}")
        corpus["format"] = item["format"]
    if "max_sentences" in item:
        corpus["max_sentences"] = _coerce(item["max_sentences"], int, f"{where} max_sentences")
        if corpus["max_sentences"] < 0:
            raise UserError(f"{where} max_sentences: expected 0 (all) or more, got {corpus['max_sentences']}")
    return corpus


def _coerce(value, kind: type, where: str):
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if kind is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a path or a list of {{ path = ... }} tables, got {value!r}")
        return [_corpus(item, f"{where}[{i}]") for i, item in enumerate(value)]
    try:
        if kind is float and isinstance(value, (int, float, str)):
            return float(value)
        if kind is int and not isinstance(value, float):
            return int(value)
        if kind is str:
            return str(value)
    except ValueError:
        pass
    raise UserError(f"{where}: expected {kind.__name__}, got {value!r}")


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("seq2seq.presets").iterdir() if p.name.endswith(".toml"))


def load_preset(name: str, kind: str, overrides: list[str] = ()) -> Config:
    """The preset `name` (shipped in seq2seq/presets, or a path to a TOML file) plus overrides."""
    if name.endswith(".toml"):
        path = Path(name)
        if not path.is_file():
            raise UserError(f"{name}: preset file not found")
        text, source = path.read_text(encoding="utf-8"), name
    else:
        if name not in preset_names():
            raise UserError(f"unknown preset {name!r}; shipped presets: {', '.join(preset_names())}")
        text = resources.files("seq2seq.presets").joinpath(name + ".toml").read_text(encoding="utf-8")
        source = f"preset {name}"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{source}: invalid TOML: {e}") from None
    if raw.get("kind") != kind:
        raise UserError(f"{source} is a {raw.get('kind')} preset, not a {kind} one")
    raw["preset"] = Path(name).stem
    return Config.from_dict(apply_overrides(raw, overrides), source)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `--set SECTION.KEY=VALUE` items (VALUE in TOML syntax, or a bare word) to a raw config."""
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, leaf = key.strip().partition(".")
        if not sep or not dot or section not in ("data", "model", "train"):
            raise UserError(f"--set {item!r}: expected SECTION.KEY=VALUE with SECTION one of data, model, train")
        raw.setdefault(section, {})[leaf] = _parse_value(value.strip())
    return raw


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: keep it as a string


def default_data_dir() -> Path:
    """Where a preset's corpus names are read from: $SEQ2SEQ_DATA, else `data` in the current folder."""
    return Path(os.environ.get("SEQ2SEQ_DATA", "data"))


USER_PATH_KEYS = ("data.train", "data.dev", "data.test", "data.text", "data.hf_data_files", "data.unlabelled")


def anchor_user_paths(cfg: Config, overrides: list[str], cwd: Path | None = None) -> None:
    """Make the corpus paths a user typed with --set absolute against the current folder, so that
    they are not read from the data folder as a preset's names are (a Hugging Face split name
    stays a name)."""
    cwd = Path.cwd() if cwd is None else cwd
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key not in USER_PATH_KEYS:
            continue
        leaf = key.split(".", 1)[1]
        value = getattr(cfg.data, leaf)
        if isinstance(value, list):
            for corpus in value:
                if corpus.get("format", getattr(cfg.data, "format", "")) != "hf":
                    corpus["path"] = str(cwd / corpus["path"])
        elif leaf == "unlabelled":
            setattr(cfg.data, leaf, ",".join(str(cwd / name.strip()) for name in value.split(",") if name.strip()))
        elif value and (leaf in ("text", "hf_data_files") or cfg.data.format != "hf"):
            setattr(cfg.data, leaf, str(cwd / value))
