import atexit
import hashlib
import os
import re
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


def run_cli(*args, cwd=None, input=None, env=None) -> subprocess.CompletedProcess:
    """Run the `seq2seq` command as a user would, in a subprocess. `input`: standard input, text
    or raw bytes (for input that is not UTF-8); stdout and stderr come back as text either way."""
    command = [sys.executable, "-m", "seq2seq.cli", *map(str, args)]
    if isinstance(input, bytes):
        result = subprocess.run(command, capture_output=True, cwd=cwd, input=input, env=env, timeout=600)
        result.stdout, result.stderr = (b.decode("utf-8", errors="replace") for b in (result.stdout, result.stderr))
        return result
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, input=input, env=env, timeout=600)


LOG_RECORD = re.compile(r"\d\d:\d\d:\d\d ")  # the CLI's logging format: "%H:%M:%S message"


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str, code: int = 2,
                          prefix: str = "seq2seq: error: ", after_log: bool = False) -> str:
    """`result` failed as a user's mistake should: exit status `code`, no traceback, and stderr
    exactly one line, starting with `prefix` and holding every fragment. `after_log`: a command
    that logs its progress (training reads its data first) may have logged before it failed; every
    line before the error must then be a log record. Returns the error line."""
    stderr = result.stderr
    assert result.returncode == code, (result.returncode, stderr)
    assert "Traceback" not in stderr, stderr
    assert stderr.endswith("\n") and stderr.count("\n") >= 1, repr(stderr)
    *before, line = stderr[:-1].split("\n")
    if after_log:
        assert all(LOG_RECORD.match(earlier) for earlier in before), stderr
    else:
        assert not before, stderr
    assert line.startswith(prefix), stderr
    for fragment in fragments:
        assert fragment in line, line
    return line


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


def write_tsv_preset(tmp_path, train_file: str, name: str = "p.toml") -> str:
    """A preset (the file `name` in `tmp_path`) of a small translator trained one epoch on `train_file`."""
    preset = tmp_path / name
    preset.write_text(f'kind = "translator"\n[data]\nformat = "tsv"\ntrain = "{train_file}"\ndev = "{train_file}"\n'
                      '[model]\nemb_dim = 8\nenc_hidden = 8\nenc_layers = 1\ndec_hidden = 8\n'
                      '[train]\nmax_epochs = 1\nbf16 = false\n', encoding="utf-8")
    return str(preset)


def train_tiny(tmp_path_factory, kind: str, *settings: str) -> Path:
    """A model folder of the tiny preset of `kind` trained on the shipped samples, with --set `settings`.
    Most tests need no training of their own: they take `tiny_translator_folder` or `tiny_charlm_folder`."""
    out = tmp_path_factory.mktemp("models") / f"tiny-{kind}"
    preset = {"translator": "tiny-en-fr", "charlm": "tiny-charlm", "classifier": "tiny-classifier"}[kind]
    sets = [arg for item in settings for arg in ("--set", item)]
    result = run_cli("train", kind, "--preset", preset, "--data-dir", SAMPLE_DIR, "--output", out, *sets)
    assert result.returncode == 0, result.stderr
    return out


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def shared_model(tmp_path_factory, kind: str):
    """Train the tiny preset of `kind` once, hand the folder out, and check at the end of the run
    that no test wrote into it (a test that resumes or changes a model works on a copy:
    shutil.copytree(folder, tmp_path / ...))."""
    folder = train_tiny(tmp_path_factory, kind)
    before = folder_digest(folder)
    yield folder
    assert folder_digest(folder) == before, f"a test wrote into the shared {kind} folder {folder}"


@pytest.fixture(scope="session")
def tiny_translator_folder(tmp_path_factory):
    """The tiny-en-fr preset as shipped (150 epochs on the 20 pairs of data/sample/tiny.*, learnt by
    heart), trained once per test run for every test that needs a trained translator. Read-only."""
    yield from shared_model(tmp_path_factory, "translator")


@pytest.fixture(scope="session")
def tiny_classifier_folder(tmp_path_factory):
    """The tiny-classifier preset as shipped (30 epochs on data/sample/reviews-train.tsv, learnt by
    heart), trained once per test run. Read-only."""
    yield from shared_model(tmp_path_factory, "classifier")


@pytest.fixture(scope="session")
def tiny_charlm_folder(tmp_path_factory):
    """The tiny-charlm preset as shipped (60 epochs on data/sample/tiny.txt, learnt by heart),
    trained once per test run for every test that needs a trained character model. Read-only."""
    yield from shared_model(tmp_path_factory, "charlm")
