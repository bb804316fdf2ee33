"""Bounds on every size a user can type, checked before work starts; a closed pipe; the data
folder and the test split of a run; a run that cannot train; --precision in scoring."""
import json
import subprocess
import sys

import pytest

from seq2seq.device import bf16_runs
from seq2seq.errors import UserError
from seq2seq.limits import LIMITS, check_limits
from conftest import ROOT, SAMPLE_DIR, assert_one_line_error, run_cli


@pytest.mark.parametrize("args, fragment", [
    (["translate", "--beam", "100000", "Hi."], f"between 1 and {LIMITS['beam']}"),
    (["translate", "--beam", "5", "--nbest", "6", "Hi."], "--nbest 6 needs --beam of at least 6"),
    (["translate", "--batch-size", "4096", "--beam", "64", "Hi."], "decoder rows"),
    (["translate", "--max-len-ratio", "1e9", "Hi."], "max_len_ratio must be above 0 and at most 10"),
    (["generate", "--max-chars", "100000000"], f"between 1 and {LIMITS['max_chars']:,}"),
    (["generate", "--num-samples", "100", "--max-chars", "1000000"], "num_samples x max_chars"),
    (["evaluate", "--tsv", "x.tsv", "--beam", "1000"], "--beam"),
], ids=["beam", "nbest", "rows", "max-len-ratio", "max-chars", "total-chars", "evaluate-beam"])
def test_sizes_past_their_bounds_are_refused_in_one_line_before_any_work(args, fragment, capsys):
    """`translate --beam 100000` grew to 24 GB and was killed; every size is bounded now, and the
    answer comes before a model is even loaded (so the command runs in this process)."""
    from seq2seq.cli import run

    try:
        code = run(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert_one_line_error(subprocess.CompletedProcess(args, code, "", capsys.readouterr().err), fragment,
                          prefix="seq2seq")


def test_the_api_checks_the_same_bounds():
    from seq2seq import checkpoint
    from seq2seq.inference import generate, translate

    with pytest.raises(UserError, match="beam must be between 1 and 64, got 100,000"):
        check_limits(beam=100_000)
    _, model, tokenizer = checkpoint.load(ROOT / "checkpoints" / "en-fr")
    with pytest.raises(UserError, match="beam must be between"):
        translate(model, tokenizer, ["Hi."], beam=100_000)
    _, lm, vocab = checkpoint.load(ROOT / "checkpoints" / "shakespeare")
    with pytest.raises(UserError, match="max_chars must be between"):
        generate(lm, vocab, ["A"], 10**9)


def test_a_closed_pipe_ends_generation_quietly_with_status_0():
    """`generate ... | head -c 100` ended with "seq2seq: error: Broken pipe" and status 2."""
    command = (f"{sys.executable} -m seq2seq generate --prompt A --max-chars {LIMITS['max_chars']} | head -c 100; "
               "echo; echo status ${PIPESTATUS[0]}")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.stdout.strip().endswith("status 0"), result.stdout[-200:] + result.stderr
    assert "error" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_paths_typed_with_set_are_read_from_the_current_folder(tmp_path):
    """A new user's folder holding mine.tsv and mydev.tsv: the paths they type are theirs, not the
    data folder's; a preset's corpus names are read from the data folder, and the error says where
    it looked and how to point it elsewhere."""
    pairs = (SAMPLE_DIR / "sample" / "tiny.en").read_text().splitlines(), (SAMPLE_DIR / "sample" / "tiny.fr").read_text().splitlines()
    tsv = "".join(f"{en}\t{fr}\n" for en, fr in zip(*pairs))
    (tmp_path / "mine.tsv").write_text(tsv, encoding="utf-8")
    (tmp_path / "mydev.tsv").write_text(tsv, encoding="utf-8")
    result = run_cli("train", "translator", "--preset", "tiny-en-fr", "--set", "data.format=tsv", "--set", "data.train=mine.tsv",
                     "--set", "data.dev=mydev.tsv", "--set", "data.test=mydev.tsv", "--set", "train.max_epochs=1",
                     "--output", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["train"] == str(tmp_path / "mine.tsv")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]["test_sentences"] == 20

    missing = run_cli("train", "translator", "--preset", "tiny-en-fr", "--output", tmp_path / "other", cwd=tmp_path)
    assert_one_line_error(missing, "data/sample/tiny.en: file not found",
                   f"data folder {tmp_path / 'data'}", "--data-dir or $SEQ2SEQ_DATA")
    from_repo = run_cli("train", "translator", "--preset", "tiny-en-fr", "--output", tmp_path / "repo",
                        "--set", "train.max_epochs=1", cwd=ROOT)  # ./data is the default data folder
    assert from_repo.returncode == 0, from_repo.stderr


def test_a_run_with_fewer_batches_than_processes_says_so():
    """Under torchrun with 2 processes the 20 sample pairs made one batch, every rank got none,
    and the run "finished" with no model; now the task refuses in one line."""
    from seq2seq.config import load_preset
    from seq2seq.training.tasks import TranslationTask

    task = TranslationTask(load_preset("tiny-en-fr", "translator", ["train.batch_tokens=100000"]), SAMPLE_DIR)
    assert len(task.batches(0)) == 1
    task.shard(1, 2)
    with pytest.raises(UserError, match="1 batch\\(es\\) an epoch cannot be shared by 2 processes"):
        task.batches(0)


@pytest.mark.every_cpu
def test_evaluate_text_honours_precision(tmp_path):
    """`evaluate --text --precision bf16` scored in fp32 all the same; now it scores as asked and
    says so, and auto keeps fp32, the reference number."""
    text = tmp_path / "held-out.txt"
    text.write_text("ROMEO:\nWhat light through yonder window breaks? It is the east.\n" * 20, encoding="utf-8")
    scores = {}
    for precision in ("auto", "fp32", "bf16"):
        result = run_cli("evaluate", "--text", text, "--precision", precision, "--json")
        if precision == "bf16" and not bf16_runs():  # below AVX-512: one line, no traceback
            assert_one_line_error(result, "--precision bf16: PyTorch's oneDNN runs no bf16", "use --precision fp32")
            continue
        assert result.returncode == 0, result.stderr
        scores[precision] = json.loads(result.stdout)
    assert scores["auto"]["precision"] == "fp32" and scores["auto"]["bits_per_char"] == scores["fp32"]["bits_per_char"]
    if "bf16" not in scores:
        return
    assert scores["bf16"]["precision"] == "bf16"
    assert scores["bf16"]["bits_per_char"] != scores["fp32"]["bits_per_char"]
    assert abs(scores["bf16"]["bits_per_char"] - scores["fp32"]["bits_per_char"]) < 0.05
