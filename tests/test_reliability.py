"""Bad input, hostile model folders and crashes: one-line errors, no code run, nothing lost.

Each test runs the `seq2seq` command as a user would, except where a fault has to be injected
inside the training loop. The trained models are the test run's shared tiny ones (conftest.py);
a test that changes a model folder works on a copy.
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
from conftest import ROOT, SAMPLE_DIR, assert_one_line_error, run_cli, write_tsv_preset


# -- bad input: one table -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """The files the table's commands are given (read only: every command here fails)."""
    folder = tmp_path_factory.mktemp("bad-inputs")
    (folder / "empty.en").write_text("", encoding="utf-8")
    (folder / "empty.fr").write_text("", encoding="utf-8")
    (folder / "a.en").write_text("one\ntwo\nthree\n", encoding="utf-8")
    (folder / "a.fr").write_text("un\ndeux\n", encoding="utf-8")
    good = "".join(f"Sentence {i}.\tPhrase {i}.\n" for i in range(30))
    (folder / "bad.tsv").write_text(good + "one\ttwo\tthree\nno tab here\n", encoding="utf-8")
    (folder / "notab.tsv").write_text("Hello.\tBonjour.\nNo tab at all\n", encoding="utf-8")
    (folder / "badutf8.tsv").write_bytes(b"Hello.\tBonjour.\nCaf\xe9.\tCaf\xc3\xa9.\n")
    for name in ("bad", "notab", "badutf8"):
        write_tsv_preset(folder, f"{name}.tsv", name=f"{name}.toml")
    (folder / "a-file").write_text("", encoding="utf-8")
    (folder / "secret.en").write_text("Hello.\n", encoding="utf-8")
    (folder / "secret.en").chmod(0)
    return folder


def expand(text: str, paths: dict) -> str:
    for name, path in paths.items():
        text = text.replace("{" + name + "}", str(path))
    return text


TINY_RUN = ("--preset", "tiny-en-fr", "--data-dir", "{data}", "--output", "{out}")


def error(*fragments: str, parser_of: str | None = None) -> tuple:
    """An expected error line: its start, "seq2seq: error: " ("seq2seq COMMAND: error: " from the
    argument parser of COMMAND), then the fragments it holds."""
    return (f"seq2seq {parser_of}: error: " if parser_of else "seq2seq: error: ", *fragments)


# args: the command line ({translator} and {charlm}: the shared tiny models, {inputs}: the files
# above, {out}: a new folder, {data}: data/); stdin: its standard input; expected: the error line.
BAD_INPUT = [
    # inputs: missing, unreadable, not text, not UTF-8, not what the format says, empty
    pytest.param(("translate", "-m", "{translator}", "-i", "{inputs}/nope.en"), None,
                 error("{inputs}/nope.en: file not found"), id="missing-input"),
    pytest.param(("translate", "-m", "{translator}", "-i", "{inputs}"), None,
                 error("is a directory"), id="input-is-a-directory"),
    pytest.param(("translate", "-m", "{translator}", "-i", "{inputs}/secret.en"), None,
                 error("secret.en", "ermission denied"), id="unreadable-input",
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")),
    pytest.param(("translate", "-m", "{translator}"), b"fine\nab\xffc\n",
                 error("<stdin>:2: invalid UTF-8 (byte 0xff at column 3)"), id="stdin-not-utf8"),
    pytest.param(("evaluate", "-m", "{translator}", "--src", "{inputs}/a.en", "--ref", "{inputs}/a.fr"), None,
                 error("a.en has 3 lines", "a.fr has 2"), id="evaluate-line-counts-differ"),
    pytest.param(("evaluate", "-m", "{translator}", "--tsv", "{inputs}/bad.tsv"), None,
                 error("bad.tsv:31", "found 3 columns"), id="evaluate-tsv-three-columns"),
    pytest.param(("evaluate", "-m", "{translator}", "--src", "{inputs}/empty.en", "--ref", "{inputs}/empty.fr"), None,
                 error("empty.en: no sentence pairs to evaluate"), id="evaluate-empty-pairs"),
    pytest.param(("evaluate", "-m", str(ROOT / "checkpoints" / "shakespeare"), "--text", "{inputs}/empty.en"), None,
                 error("no text to score"), id="evaluate-empty-text"),
    # outputs: checked before the model is loaded or anything translated
    pytest.param(("translate", "-m", "{inputs}/no-model", "-o", "{inputs}", "Hi."), None,
                 error("is a directory"), id="output-is-a-directory"),
    pytest.param(("translate", "-m", "{translator}", "-o", "{inputs}/missing/out.fr", "Hi."), None,
                 error("missing/out.fr", "folder", "does not exist"), id="output-folder-missing"),
    pytest.param(("evaluate", "-m", "{inputs}/no-model", "--tsv", "{inputs}/x.tsv", "--hyp-output",
                  "{inputs}/no/hyp.fr"), None, error("does not exist"), id="hyp-output-folder-missing"),
    # training data and settings: refused before a run folder holds anything
    pytest.param(("train", "translator", "--preset", "{inputs}/badutf8.toml", "--data-dir", "{inputs}", "--output", "{out}"),
                 None, error("badutf8.tsv:2: invalid UTF-8"), id="train-not-utf8"),
    pytest.param(("train", "translator", "--preset", "{inputs}/bad.toml", "--data-dir", "{inputs}", "--output", "{out}"),
                 None, error("bad.tsv:31: expected source<TAB>target, found 3 columns", "--skip-bad-lines"),
                 id="train-tsv-three-columns"),
    pytest.param(("train", "translator", "--preset", "{inputs}/notab.toml", "--data-dir", "{inputs}", "--output", "{out}"),
                 None, error("notab.tsv:2: expected source<TAB>target"), id="train-tsv-no-tab"),
    pytest.param(("train", "translator", *TINY_RUN, "--set", "data.train={inputs}/a", "--set", "data.dev={inputs}/a"),
                 None, error("a.en has 3 lines", "a.fr has 2"), id="train-line-counts-differ"),
    pytest.param(("train", "translator", "--preset", "nope"), None,
                 error("unknown preset 'nope'", "multi30k-en-fr"), id="unknown-preset"),
    pytest.param(("train", "translator", "--preset", "tiny-en-fr", "--set", "model.size=3"), None,
                 error("unknown key(s) size"), id="unknown-setting"),
    pytest.param(("train", "translator", "--preset", "tiny-en-fr", "--set", "train.lr=fast"), None,
                 error("train] lr: expected float"), id="setting-of-the-wrong-type"),
    pytest.param(("train", "translator", *TINY_RUN, "--set", 'data.dev=[{ path = "b", max = 3 }]'), None,
                 error("[data] dev[0]: unknown key(s) max; known: path, format, max_sentences"),
                 id="bad-corpus-table"),
    pytest.param(("train", "charlm", "--preset", "tiny-en-fr"), None, error("not a charlm"),
                 id="preset-of-another-kind"),
    pytest.param(("train", "translator", "--preset", "tiny-en-fr", "--data-dir", "{data}", "--output", "{translator}"),
                 None, error("already holds a model", "--resume"), id="train-over-a-model"),
    pytest.param(("train", "charlm", "--resume", "--output", "{charlm}", "--set", "model.hidden=8"), None,
                 error("train.* settings only"), id="resume-with-model-settings"),
    pytest.param(("train", "translator", *TINY_RUN, "--init-from", "{translator}", "--set", "model.dropout=0.1"), None,
                 error("--init-from", "drop the --set model.*"), id="init-from-with-model-settings"),
    pytest.param(("train", "charlm", "--preset", "tiny-charlm", "--data-dir", "{data}", "--output", "{out}",
                  "--init-from", "{translator}"), None,
                 error("holds a translator model, not a charlm"), id="init-from-another-kind"),
    pytest.param(("train", "translator", *TINY_RUN, "--init-from", "{inputs}/nowhere"), None,
                 error("not a model folder"), id="init-from-no-model"),
    pytest.param(("train", "charlm", "--preset", "tiny-charlm", "--data-dir", "{inputs}/nowhere", "--output",
                  "{inputs}/a-file/run"), None, error("cannot write the run's files there"),
                 id="run-folder-cannot-be-made"),
    # models: a folder without a model, a model of the other kind
    pytest.param(("translate", "-m", "{inputs}", "hi"), None, error("config.json: not found"),
                 id="no-model-in-folder"),
    pytest.param(("translate", "-m", "{charlm}", "Hi."), None,
                 error("holds a charlm model; this command needs a translator"), id="translate-a-charlm"),
    pytest.param(("generate", "-m", "{translator}"), None,
                 error("holds a translator model; this command needs a charlm"), id="generate-a-translator"),
    # decoding and generation arguments
    pytest.param(("translate", "-m", "{translator}", "--beam", "2", "--nbest", "3", "hi"), None,
                 error("--nbest 3"), id="nbest-above-beam"),
    pytest.param(("translate", "-m", "{translator}", "--beam", "0", "Hi."), None,
                 error("argument --beam: must be between 1 and 64, got 0", parser_of="translate"), id="beam-0"),
    pytest.param(("translate", "--nonsense"), None,
                 error("unrecognized arguments: --nonsense"), id="unknown-flag"),
    pytest.param(("generate", "-m", "{charlm}", "--prompt", "\u6f22\u5b57"), None,
                 error("seen none of its characters"), id="prompt-of-unseen-characters"),
    pytest.param(("generate", "-m", "{charlm}", "--max-chars", "0"), None,
                 error("argument --max-chars: must be between 1 and 1,000,000, got 0", parser_of="generate"),
                 id="max-chars-0"),
    pytest.param(("generate", "-m", "{charlm}", "--temperature", "-0.5"), None,
                 error("argument --temperature: must be 0 or more, got -0.5", parser_of="generate"),
                 id="temperature-negative"),
    pytest.param(("generate", "-m", "{charlm}", "--top-k", "-1"), None,
                 error("argument --top-k: must be between 0 and 100,000, got -1", parser_of="generate"),
                 id="top-k-negative"),
    pytest.param(("generate", "-m", "{charlm}", "--beam", "-1"), None,
                 error("argument --beam: must be between 0 and 64, got -1", parser_of="generate"), id="beam-negative"),
    pytest.param(("generate", "-m", "{charlm}", "--top-p", "0"), None,
                 error("--top-p must be in (0, 1], got 0"), id="top-p-0"),
    pytest.param(("generate", "-m", "{charlm}", "--top-p", "1.5"), None,
                 error("--top-p must be in (0, 1], got 1.5"), id="top-p-above-1"),
    pytest.param(("generate", "-m", "{charlm}", "--beam", "3", "--num-samples", "2"), None,
                 error("--num-samples"), id="beam-with-samples"),
]


@pytest.mark.parametrize("args, stdin, expected", BAD_INPUT)
def test_bad_input_is_one_line_naming_the_problem(args, stdin, expected, bad_inputs, tiny_translator_folder,
                                                   tiny_charlm_folder, tmp_path):
    paths = dict(translator=tiny_translator_folder, charlm=tiny_charlm_folder, inputs=bad_inputs,
                 out=tmp_path / "out", data=SAMPLE_DIR)
    result = run_cli(*(expand(arg, paths) for arg in args), input=stdin)
    start, *fragments = (expand(text, paths) for text in expected)
    assert_one_line_error(result, *fragments, prefix=start)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # a refused run writes nothing


def test_bad_lines_are_skipped_and_counted_when_asked(bad_inputs, tiny_translator_folder, tmp_path):
    # its own one-epoch training: a run on data with bad lines is the subject
    shutil.copy(bad_inputs / "bad.tsv", tmp_path / "bad.tsv")
    skipped = run_cli("train", "translator", "--preset", write_tsv_preset(tmp_path, "bad.tsv"), "--data-dir", tmp_path,
                      "--output", tmp_path / "b", "--skip-bad-lines")
    assert skipped.returncode == 0, skipped.stderr
    assert "skipped 2 bad line(s) (not source<TAB>target): line 31, 32" in skipped.stderr
    assert json.loads((tmp_path / "b" / "config.json").read_text())["data"]["skip_bad_lines"] is True
    scored = run_cli("evaluate", "-m", tiny_translator_folder, "--tsv", tmp_path / "bad.tsv", "--skip-bad-lines",
                     "--json", "--beam", "1")
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["sentences"] == 30


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
    "Two dogs play in the snow.",  # a sentence the model knows, among them
]


def test_hostile_translation_input_keeps_one_line_per_line(tiny_translator_folder, tmp_path):
    path = tmp_path / "hostile.en"
    path.write_text("\n".join(HOSTILE_LINES) + "\n", encoding="utf-8")
    result = run_cli("translate", "-m", tiny_translator_folder, "-i", path, "--beam", "2")
    assert result.returncode == 0, result.stderr
    out = result.stdout.split("\n")
    assert out[-1] == "" and len(out) - 1 == len(HOSTILE_LINES)
    for line_in, line_out in zip(HOSTILE_LINES, out):
        if not line_in.strip():
            assert line_out == ""  # blank in, blank out
    assert out[-2] == "Deux chiens jouent dans la neige."  # hostile neighbours leave a known sentence alone


# -- model folders --------------------------------------------------------------------------------

def write_weights(data: bytes):
    return lambda folder: (folder / "model.safetensors").write_bytes(data)


def truncate_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def set_format_version(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, format_version=99)))


def other_tokenizer(folder):
    from seq2seq.tokenizer import SubwordTokenizer

    SubwordTokenizer.train(["a small other corpus", "with a smaller vocabulary"] * 5, 40).save(folder)


# kind: the shared model copied; damage: what is done to the copy; expected: fragments of the error line
BROKEN_FOLDERS = [
    pytest.param("translator", lambda folder: (folder / "model.safetensors").unlink(), ("model.safetensors: not found",),
                 id="weights-missing"),
    pytest.param("translator", truncate_weights, ("model.safetensors: not a readable safetensors file", "truncated"),
                 id="weights-truncated"),
    pytest.param("translator", write_weights(b"\x00" * 7), ("not a readable safetensors file",), id="weights-7-zeros"),
    pytest.param("translator", write_weights(os.urandom(4096)), ("not a readable safetensors file",),
                 id="weights-random-bytes"),
    pytest.param("translator", set_format_version, ("format_version 99 is not supported",), id="format-version-99"),
    pytest.param("translator", lambda folder: (folder / "config.json").write_text("{ not json"),
                 ("config.json:1: invalid JSON",), id="config-not-json"),
    pytest.param("translator", other_tokenizer, ("the tokenizer has", "the weights' embedding has"),
                 id="tokenizer-of-another-model"),
    pytest.param("translator", lambda folder: (folder / "spm.model").write_bytes(b"garbage"),
                 ("spm.model: not a readable SentencePiece model",), id="tokenizer-garbage"),
    pytest.param("charlm", lambda folder: (folder / "vocab.json").write_text('{"chars": 5}'),
                 ("vocab.json", "list of single characters"), id="vocab-not-a-list"),
]


@pytest.mark.parametrize("kind, damage, expected", BROKEN_FOLDERS)
def test_a_broken_model_folder_is_one_line_naming_the_file(kind, damage, expected, tiny_translator_folder,
                                                           tiny_charlm_folder, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_translator_folder if kind == "translator" else tiny_charlm_folder, folder)
    damage(folder)
    command = ("translate", "-m", folder, "Hi.") if kind == "translator" else ("generate", "-m", folder)
    assert_one_line_error(run_cli(*command), *expected)


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_resume_state_built_to_run_code_is_refused_and_never_runs(tiny_charlm_folder, tmp_path):
    folder = tmp_path / "hostile"
    shutil.copytree(tiny_charlm_folder, folder)
    marker = tmp_path / "payload-ran"
    state = torch.load(folder / checkpoint.STATE, weights_only=True)
    state["progress"] = Payload(marker)
    torch.save(state, folder / checkpoint.STATE)
    line = assert_one_line_error(run_cli("train", "charlm", "--resume", "--output", folder), "train_state.pt: refused",
                                 "crafted")
    assert "Payload" in line or "open" in line
    assert not marker.exists()
    (folder / checkpoint.STATE).write_bytes((folder / checkpoint.STATE).read_bytes()[:100])
    assert_one_line_error(run_cli("train", "charlm", "--resume", "--output", folder), "not a readable resume state")
    assert not marker.exists()


# -- crashes and interruptions ----------------------------------------------------------------------
# These tests train models of their own: a run is interrupted at a chosen step and compared with
# an uninterrupted run of the same settings (dropout on, so that the random state must resume too),
# or a fault is injected into its steps. The shared tiny models cannot stand in for them.

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


def test_readers_never_see_half_a_file_while_a_run_writes_a_new_best(tiny_translator_folder, tmp_path):
    folder = tmp_path / "live"
    shutil.copytree(tiny_translator_folder, folder)
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
