"""Bad input, hostile model folders and crashes: one-line errors, no code run, nothing lost.

Each test runs the `seq2seq` command as a user would, except where a fault has to be injected
inside the training loop.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from seq2seq import checkpoint
from seq2seq.config import load_preset
from seq2seq.errors import UserError
from seq2seq.training import train
from seq2seq.training.tasks import TASKS
from seq2seq.training.trainer import MAX_NONFINITE_IN_ROW
from conftest import ROOT, SAMPLE_DIR, run_cli, train_tiny, write_tsv_preset


def one_line_error(result, *fragments, prefix="seq2seq"):
    """Exit status 2, no traceback, and one stderr line naming what is wrong."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def translator(tmp_path_factory):
    return train_tiny(tmp_path_factory, "translator", "train.max_epochs=30")


@pytest.fixture(scope="module")
def charlm(tmp_path_factory):
    return train_tiny(tmp_path_factory, "charlm", "train.max_steps=10", "train.eval_every=5")


# -- bad input ----------------------------------------------------------------------------------

def test_tsv_lines_with_a_wrong_column_count_are_named_or_skipped(tmp_path, translator):
    good = "".join(f"Sentence {i}.\tPhrase {i}.\n" for i in range(30))
    (tmp_path / "bad.tsv").write_text(good + "one\ttwo\tthree\nno tab here\n", encoding="utf-8")
    preset = write_tsv_preset(tmp_path, "bad.tsv")
    one_line_error(run_cli("train", "translator", "--preset", preset, "--data-dir", tmp_path, "--output", tmp_path / "a"),
                   "bad.tsv:31: expected source<TAB>target, found 3 columns", "--skip-bad-lines")
    skipped = run_cli("train", "translator", "--preset", preset, "--data-dir", tmp_path, "--output", tmp_path / "b",
                      "--skip-bad-lines")
    assert skipped.returncode == 0, skipped.stderr
    assert "skipped 2 bad line(s) (not source<TAB>target): line 31, 32" in skipped.stderr
    assert json.loads((tmp_path / "b" / "config.json").read_text())["data"]["skip_bad_lines"] is True

    one_line_error(run_cli("evaluate", "-m", translator, "--tsv", tmp_path / "bad.tsv"), "bad.tsv:31", "found 3 columns")
    scored = run_cli("evaluate", "-m", translator, "--tsv", tmp_path / "bad.tsv", "--skip-bad-lines", "--json",
                     "--beam", "1")
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["sentences"] == 30


def test_missing_empty_directory_and_unwritable_paths(tmp_path, translator):
    (tmp_path / "empty.en").write_text("", encoding="utf-8")
    (tmp_path / "empty.fr").write_text("", encoding="utf-8")
    one_line_error(run_cli("translate", "-m", translator, "-i", tmp_path), "is a directory")
    one_line_error(run_cli("translate", "-m", translator, "-i", tmp_path / "none.en"), "none.en: file not found")
    empty = run_cli("translate", "-m", translator, "-i", tmp_path / "empty.en")
    assert empty.returncode == 0 and empty.stdout == ""  # no line in, no line out
    one_line_error(run_cli("evaluate", "-m", translator, "--src", tmp_path / "empty.en", "--ref", tmp_path / "empty.fr"),
                   "empty.en: no sentence pairs to evaluate")
    one_line_error(run_cli("evaluate", "-m", ROOT / "checkpoints" / "shakespeare", "--text", tmp_path / "empty.en"),
                   "no text to score")
    # outputs are checked before the model is loaded or anything translated
    one_line_error(run_cli("translate", "-m", tmp_path / "no-model", "-o", tmp_path, "Hi."), "is a directory")
    one_line_error(run_cli("translate", "-m", translator, "-o", tmp_path / "no" / "out.fr", "Hi."),
                   "folder", "does not exist")
    one_line_error(run_cli("evaluate", "-m", tmp_path / "no-model", "--tsv", tmp_path / "x.tsv", "--hyp-output",
                           tmp_path / "no" / "hyp.fr"), "does not exist")
    # a run folder that cannot be created: reported before any data is read
    (tmp_path / "a-file").write_text("", encoding="utf-8")
    one_line_error(run_cli("train", "charlm", "--preset", "tiny-charlm", "--data-dir", tmp_path / "nowhere",
                           "--output", tmp_path / "a-file" / "run"), "cannot write the run's files there")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_input(tmp_path, translator):
    path = tmp_path / "secret.en"
    path.write_text("Hello.\n", encoding="utf-8")
    path.chmod(0)
    one_line_error(run_cli("translate", "-m", translator, "-i", path), "secret.en", "ermission denied")


def test_a_full_disk_is_reported_before_training(tmp_path, monkeypatch):
    import shutil as shutil_module

    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: shutil_module._ntuple_diskusage(10**9, 10**9, 2**20))
    cfg = load_preset("tiny-charlm", "charlm", [])
    with pytest.raises(UserError, match="1 MiB free on its disk, the run's files need about"):
        train(cfg, SAMPLE_DIR, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


HOSTILE_LINES = [
    "", "   ", "\t", "Hello.", "x" * 20_000, "bell\x07 escape\x1b[31m red \x00nul", "zero\u200bwidth\ufeffbom\u200d",
    "Good morning \U0001F600\U0001F468\u200d\U0001F469\u200d\U0001F467!", "\u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd",
    "<b>bold</b> &amp; <script>alert(1)</script>", "\u6f22\u5b57\u304b\u306a\u4ea4\u3058\u308a", "form\x0cfeed\x0bvtab",
    "line\u2028separator\u2029paragraph\x85next", "carriage\rreturn", "  padded  ",
]


def test_hostile_translation_input_keeps_one_line_per_line(translator, tmp_path):
    path = tmp_path / "hostile.en"
    path.write_text("\n".join(HOSTILE_LINES) + "\n", encoding="utf-8")
    result = run_cli("translate", "-m", translator, "-i", path, "--beam", "2")
    assert result.returncode == 0, result.stderr
    out = result.stdout.split("\n")
    assert out[-1] == "" and len(out) - 1 == len(HOSTILE_LINES)
    for line_in, line_out in zip(HOSTILE_LINES, out):
        if not line_in.strip():
            assert line_out == ""  # blank in, blank out


def test_bad_generation_and_decoding_arguments(charlm, translator):
    one_line_error(run_cli("generate", "-m", charlm, "--prompt", "\u6f22\u5b57"), "seen none of its characters")
    for flag, value, message in (("--max-chars", "0", "must be at least 1, got 0"),
                                 ("--temperature", "-0.5", "must be 0 or more, got -0.5"),
                                 ("--top-k", "-1", "must be 0 or more, got -1"),
                                 ("--beam", "-1", "must be 0 or more, got -1")):
        one_line_error(run_cli("generate", "-m", charlm, flag, value), f"argument {flag}: {message}",
                       prefix="seq2seq generate: error")
    for value in ("0", "1.5"):
        one_line_error(run_cli("generate", "-m", charlm, "--top-p", value), f"--top-p must be in (0, 1], got {value}")
    one_line_error(run_cli("translate", "-m", translator, "--beam", "0", "Hi."), "argument --beam: must be at least 1",
                   prefix="seq2seq translate: error")
    one_line_error(run_cli("translate", "--nonsense"), "unrecognized arguments: --nonsense", prefix="seq2seq: error")


# -- model folders --------------------------------------------------------------------------------

def broken_copy(src, tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(src, folder)
    return folder


def test_broken_model_folders_get_one_line_each(translator, charlm, tmp_path):
    from seq2seq.tokenizer import SubwordTokenizer

    folder = broken_copy(translator, tmp_path, "missing")
    (folder / "model.safetensors").unlink()
    one_line_error(run_cli("translate", "-m", folder, "Hi."), "model.safetensors: not found")

    folder = broken_copy(translator, tmp_path, "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    one_line_error(run_cli("translate", "-m", folder, "Hi."), "model.safetensors: not a readable safetensors file",
                   "truncated")
    weights.write_bytes(b"\x00" * 7)
    one_line_error(run_cli("translate", "-m", folder, "Hi."), "not a readable safetensors file")
    weights.write_bytes(os.urandom(4096))
    one_line_error(run_cli("translate", "-m", folder, "Hi."), "not a readable safetensors file")

    folder = broken_copy(translator, tmp_path, "version")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, format_version=99)))
    one_line_error(run_cli("translate", "-m", folder, "Hi."), "format_version 99 is not supported")
    (folder / "config.json").write_text("{ not json")
    one_line_error(run_cli("translate", "-m", folder, "Hi."), "config.json:1: invalid JSON")

    one_line_error(run_cli("translate", "-m", charlm, "Hi."), "holds a charlm model; this command needs a translator")
    one_line_error(run_cli("generate", "-m", translator), "holds a translator model; this command needs a charlm")

    folder = broken_copy(translator, tmp_path, "tokenizer")
    SubwordTokenizer.train(["a small other corpus", "with a smaller vocabulary"] * 5, 40).save(folder)
    one_line_error(run_cli("translate", "-m", folder, "Hi."), "the tokenizer has", "the weights' embedding has")
    (folder / "spm.model").write_bytes(b"garbage")
    one_line_error(run_cli("translate", "-m", folder, "Hi."), "spm.model: not a readable SentencePiece model")

    folder = broken_copy(charlm, tmp_path, "vocab")
    (folder / "vocab.json").write_text('{"chars": 5}')
    one_line_error(run_cli("generate", "-m", folder), "vocab.json", "list of single characters")


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_resume_state_built_to_run_code_is_refused_and_never_runs(charlm, tmp_path):
    folder = broken_copy(charlm, tmp_path, "hostile")
    marker = tmp_path / "payload-ran"
    state = torch.load(folder / checkpoint.STATE, weights_only=True)
    state["progress"] = Payload(marker)
    torch.save(state, folder / checkpoint.STATE)
    line = one_line_error(run_cli("train", "charlm", "--resume", "--output", folder), "train_state.pt: refused",
                          "crafted")
    assert "Payload" in line or "open" in line
    assert not marker.exists()
    (folder / checkpoint.STATE).write_bytes((folder / checkpoint.STATE).read_bytes()[:100])
    one_line_error(run_cli("train", "charlm", "--resume", "--output", folder), "not a readable resume state")
    assert not marker.exists()


# -- crashes and interruptions ----------------------------------------------------------------------

KILL_RUNS = {
    "charlm": ("tiny-charlm", ["train.max_steps=240", "train.eval_every=35", "model.dropout=0.2"]),
    "translator": ("tiny-en-fr", ["train.max_steps=200", "train.eval_every=35", "train.batch_tokens=150",
                                  "model.dropout=0.2", "train.max_epochs=1000"]),
}


def train_args(kind, out):
    preset, overrides = KILL_RUNS[kind]
    sets = [arg for item in overrides for arg in ("--set", item)]
    return [sys.executable, "-m", "seq2seq.cli", "train", kind, "--preset", preset, "--data-dir", str(SAMPLE_DIR),
            "--output", str(out), *sets]


def wait_for_step(out, step, process, timeout=300):
    """Block until the run's log shows a train record at or after `step`."""
    deadline = time.monotonic() + timeout
    log = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if log.is_file():
            steps = [json.loads(line)["step"] for line in log.read_text().splitlines()[:-1] if line.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")


def without_timing(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        for key in ("elapsed_s", "eval_s", "tokens_per_s"):
            record.pop(key, None)
    return records


@pytest.mark.parametrize("kind", ["charlm", "translator"])
def test_sigkill_mid_epoch_then_resume_gives_the_same_weights_and_metrics(kind, tmp_path):
    straight = subprocess.run(train_args(kind, tmp_path / "straight"), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr

    run = subprocess.Popen(train_args(kind, tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_step(tmp_path / "killed", 110, run)  # after the save at step 105, before the next at 140
    run.kill()  # SIGKILL: no handler runs
    run.wait()
    assert run.returncode == -signal.SIGKILL
    progress = json.loads(torch.load(tmp_path / "killed" / checkpoint.STATE, weights_only=True)["progress"])
    assert progress["step"] % 35 == 0 and 0 < progress["step"] < 200 and progress["batch"] > 0  # a mid-epoch state
    checkpoint.load(tmp_path / "killed")  # the last good model loads as it is

    resumed = run_cli("train", kind, "--resume", "--output", tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr
    for name in (checkpoint.LAST, checkpoint.BEST):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "killed" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert without_timing(tmp_path / "killed") == without_timing(tmp_path / "straight")


def test_sigterm_saves_a_resumable_state_and_says_so(tmp_path):
    out = tmp_path / "run"
    run = subprocess.Popen(train_args("charlm", out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(out, 50, run)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 128 + signal.SIGTERM, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("seq2seq: SIGTERM: state saved at step ") and last.endswith("continue with --resume")
    step = int(last.split("step ")[1].split(";")[0])
    assert json.loads(torch.load(out / checkpoint.STATE, weights_only=True)["progress"])["step"] == step
    resumed = run_cli("train", "charlm", "--resume", "--output", out)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(torch.load(out / checkpoint.STATE, weights_only=True)["progress"])["step"] == 240


def nan_from(steps, monkeypatch, kind="charlm"):
    original, calls = TASKS[kind].loss, []

    def loss(task, batch, *args, **kwargs):
        value, count = original(task, batch, *args, **kwargs)
        if task.model.training:
            calls.append(1)
            if len(calls) in steps:
                value = value * float("nan")
        return value, count

    monkeypatch.setattr(TASKS[kind], "loss", loss)


def test_non_finite_steps_are_skipped_counted_and_logged(tmp_path, monkeypatch):
    cfg = load_preset("tiny-charlm", "charlm", ["train.max_steps=20", "train.eval_every=10", "train.log_every=1"])
    nan_from({5, 6, 12}, monkeypatch)
    train(cfg, SAMPLE_DIR, tmp_path)
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "skip"] == [5, 6, 12]
    assert [r for r in log if r["type"] == "train"][-1]["skipped_steps"] == 3
    weights = load_file(tmp_path / checkpoint.LAST)
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert math.isfinite([r for r in log if r["type"] == "eval"][-1]["valid_nats_per_char"])


def test_a_diverged_run_stops_with_a_message_and_keeps_the_last_good_model(tmp_path, monkeypatch):
    cfg = load_preset("tiny-charlm", "charlm", ["train.max_steps=100", "train.eval_every=10"])
    nan_from(set(range(15, 1000)), monkeypatch)
    with pytest.raises(UserError, match=f"training diverged: {MAX_NONFINITE_IN_ROW} steps in a row .* best model"):
        train(cfg, SAMPLE_DIR, tmp_path)
    monkeypatch.undo()
    _, model, _ = checkpoint.load(tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    progress = json.loads(torch.load(tmp_path / checkpoint.STATE, weights_only=True)["progress"])
    assert progress["step"] == 14 + MAX_NONFINITE_IN_ROW and progress["skipped_steps"] == MAX_NONFINITE_IN_ROW


WRITER = """
import sys, time, torch
sys.path.insert(0, {root!r})
from seq2seq import checkpoint
cfg, model, _ = checkpoint.load({folder!r})
variants = [{{k: v.clone() for k, v in model.state_dict().items()}}, {{k: v + 1 for k, v in model.state_dict().items()}}]
end = time.monotonic() + 4
i = 0
while time.monotonic() < end:
    model.load_state_dict(variants[i % 2])
    checkpoint.save_weights(model, checkpoint.Path({folder!r}) / checkpoint.BEST)
    i += 1
print(i)
"""


def test_readers_never_see_half_a_file_while_a_run_writes_a_new_best(translator, tmp_path):
    folder = broken_copy(translator, tmp_path, "live")
    _, model, _ = checkpoint.load(folder)
    first = model.embed.weight.detach().clone()
    writer = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT), folder=str(folder))],
                              stdout=subprocess.PIPE, text=True)
    loads = 0
    while writer.poll() is None:
        _, model, _ = checkpoint.load(folder)  # raises on a half-written file
        weight = model.embed.weight.detach()
        assert torch.equal(weight, first) or torch.equal(weight, first + 1)
        loads += 1
    writes = int(writer.communicate()[0])
    assert writer.returncode == 0 and writes > 10 and loads > 10
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
