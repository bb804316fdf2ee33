import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from seq2seq.config import CharLMModel, TranslatorModel
from seq2seq.models.charlm import CharLM
from seq2seq.models.translator import Translator

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIR = ROOT / "data"
SHARED_DATA = Path(os.environ.get("SEQ2SEQ_DATA", ROOT.parent / "shared" / "data"))

torch.set_num_threads(2)
# The token cache of the tests' corpora: theirs alone, not the user's ~/.cache/seq2seq.
os.environ["SEQ2SEQ_CACHE"] = tempfile.mkdtemp(prefix="seq2seq-test-cache-")
atexit.register(shutil.rmtree, os.environ["SEQ2SEQ_CACHE"], ignore_errors=True)


def shared_corpus(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"corpus {path} not found (set SEQ2SEQ_DATA to the folder holding {name}/)")
    return path


def run_cli(*args, cwd=None, input=None) -> subprocess.CompletedProcess:
    """Run the `seq2seq` command as a user would, in a subprocess."""
    return subprocess.run([sys.executable, "-m", "seq2seq.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, input=input, timeout=600)


def small_translator(seed: int = 0, vocab: int = 40, **overrides) -> Translator:
    torch.manual_seed(seed)
    sizes = dict(emb_dim=16, enc_hidden=12, enc_layers=2, dec_hidden=24, dec_layers=2, dropout=0.0)
    cfg = TranslatorModel(**{**sizes, **overrides})
    return Translator(cfg, vocab).eval()


def small_charlm(seed: int = 0, vocab: int = 20, **overrides) -> CharLM:
    torch.manual_seed(seed)
    cfg = CharLMModel(**{**dict(emb_dim=16, hidden=24, layers=2, dropout=0.0), **overrides})
    return CharLM(cfg, vocab).eval()


def random_batch(seed: int, batch: int, vocab: int = 40, min_len: int = 2, max_len: int = 9):
    """Padded source ids (no special ids < 4) with an EOS (3) closing each row, and the lengths."""
    from seq2seq.data import pad

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=g).tolist()
    rows = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]
    return pad(rows, 0, eos=3)


def write_tsv_preset(tmp_path, train_file: str) -> str:
    preset = tmp_path / "p.toml"
    preset.write_text(f'kind = "translator"\n[data]\nformat = "tsv"\ntrain = "{train_file}"\ndev = "{train_file}"\n'
                      '[model]\nemb_dim = 8\nenc_hidden = 8\nenc_layers = 1\ndec_hidden = 8\n'
                      '[train]\nmax_epochs = 1\nbf16 = false\n', encoding="utf-8")
    return str(preset)


def train_tiny(tmp_path_factory, kind: str, *settings: str) -> Path:
    """A model folder of the tiny preset of `kind` trained on the shipped samples, with --set `settings`."""
    out = tmp_path_factory.mktemp("models") / f"tiny-{kind}"
    preset = "tiny-en-fr" if kind == "translator" else "tiny-charlm"
    sets = [arg for item in settings for arg in ("--set", item)]
    result = run_cli("train", kind, "--preset", preset, "--data-dir", SAMPLE_DIR, "--output", out, *sets)
    assert result.returncode == 0, result.stderr
    return out
