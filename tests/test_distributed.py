"""DistributedDataParallel on CPU (gloo), two processes under torchrun, against one process.

The runs here train their own models: a run under torchrun, and its one-process twin, are the subject."""
import json
import subprocess
import sys

import pytest
import numpy as np
import torch
from safetensors.torch import load_file

from seq2seq import checkpoint
from seq2seq.config import load_preset
from seq2seq.tokenizer import SubwordTokenizer
from seq2seq.training import train
from seq2seq.training.tasks import TASKS, TranslationTask
from conftest import SAMPLE_DIR, assert_one_line_error

SETTINGS = ["train.batch_tokens=150", "train.eval_every=10", "train.log_every=1", "model.dropout=0.0"]


def torchrun(*args, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "seq2seq", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def train_args(kind, out, *settings):
    preset = "tiny-en-fr" if kind == "translator" else "tiny-charlm"
    sets = [arg for item in settings for arg in ("--set", item)]
    return ["train", kind, "--preset", preset, "--data-dir", SAMPLE_DIR, "--output", out, "--device", "cpu", *sets]


def test_one_distributed_step_equals_one_step_on_the_union_of_the_ranks_batches(tmp_path, monkeypatch):
    result = torchrun(*train_args("translator", tmp_path / "ddp", *SETTINGS, "train.max_steps=1"))
    assert result.returncode == 0, result.stderr

    # one process, the same tokenizer and seed, whose first batch is rank 0's first plus rank 1's
    tokenizer = SubwordTokenizer.load(tmp_path / "ddp")
    monkeypatch.setattr(SubwordTokenizer, "train", classmethod(lambda cls, *a, **k: tokenizer))
    original = TranslationTask.batches

    def union_first(task, epoch):
        order = original(task, epoch)  # one process: the epoch's whole order; rank r took order[r::2]
        return [(order[0][0], np.concatenate([order[0][1], order[1][1]]))] + order[2:]

    monkeypatch.setattr(TranslationTask, "batches", union_first)
    cfg = load_preset("tiny-en-fr", "translator", [*SETTINGS, "train.max_steps=1"])
    train(cfg, SAMPLE_DIR, tmp_path / "single", device="cpu")

    # The gradients, as Adam's first moments after one step (0.1 g): the weights themselves moved
    # by lr * g / |g| per element, which turns float noise in a near-zero gradient into a full step.
    moments = [[s["exp_avg"] for s in torch.load(run / checkpoint.STATE, weights_only=True)["optimizer"]["state"].values()]
               for run in (tmp_path / "ddp", tmp_path / "single")]
    assert len(moments[0]) == len(moments[1]) > 10
    for ddp, single in zip(*moments):
        torch.testing.assert_close(ddp, single, rtol=1e-4, atol=1e-8)
    ddp_weights, single_weights = (load_file(run / checkpoint.LAST) for run in (tmp_path / "ddp", tmp_path / "single"))
    for name in ddp_weights:  # within one learning rate (0.01) of each other
        assert (ddp_weights[name] - single_weights[name]).abs().max() <= 0.0201, name
    log, single_log = ([r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]
                       for run in (tmp_path / "ddp", tmp_path / "single"))
    assert log[0]["loss"] == pytest.approx(single_log[0]["loss"], rel=1e-5)  # the loss over both ranks' tokens


@pytest.mark.parametrize("kind", ["translator", "charlm"])
def test_a_distributed_run_writes_one_folder_and_resumes(kind, tmp_path):
    out = tmp_path / "run"
    first = torchrun(*train_args(kind, out, *SETTINGS, "train.max_steps=20"))
    assert first.returncode == 0, first.stderr
    assert first.stdout.count('"output"') == 1  # one answer for the run, from rank 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "resume.safetensors", "train_state.pt", "metrics.jsonl"} <= names
    state = torch.load(out / checkpoint.STATE, weights_only=True)
    assert len(state["rank_states"]) == 2

    again = torchrun("train", kind, "--resume", "--output", out, "--device", "cpu", "--set", "train.max_steps=30")
    assert again.returncode == 0, again.stderr
    evals = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "eval"]
    assert evals == [10, 20, 30]
    checkpoint.load(out)  # the folder is an ordinary model folder

    alone = subprocess.run([sys.executable, "-m", "seq2seq", "train", kind, "--resume", "--output", out,
                            "--set", "train.max_steps=40"], capture_output=True, text=True, timeout=600)
    # refused once the resume state is read, after the data and model were (and were logged)
    assert_one_line_error(alone, "the run used 2 process(es); resume it with as many", after_log=True)


def test_batches_are_split_evenly_and_deterministically():
    cfg = load_preset("tiny-en-fr", "translator", SETTINGS)
    task = TASKS["translator"](cfg, SAMPLE_DIR)
    def batches():
        return [(seed, rows.tolist()) for seed, rows in task.batches(3)]

    whole = batches()
    shards = []
    for rank in range(2):
        task.shard(rank, 2)
        shards.append(batches())
        assert batches() == shards[-1]  # deterministic per (seed, epoch, rank)
    assert len(shards[0]) == len(shards[1]) == len(whole) // 2
    assert shards[0] == whole[0::2][: len(whole) // 2] and shards[1] == whole[1::2][: len(whole) // 2]


def test_a_language_model_trains_under_torchrun(tmp_path):
    result = torchrun("train", "classifier", "--preset", "tiny-classifier", "--data-dir", SAMPLE_DIR,
                      "--set", "model.head=lm", "--set", "train.batch_tokens=40", "--set", "train.max_epochs=2",
                      "--device", "cpu", "--output", tmp_path / "ddp")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["best"]["dev_ppl"] > 1
