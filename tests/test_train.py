"""The training loop: exact resume, time budget, checkpoints, and a real-corpus run."""
import json

import pytest
import torch
from safetensors.torch import load_file

from seq2seq import checkpoint
from seq2seq.config import load_preset
from seq2seq.train import TASKS, train
from conftest import SAMPLE_DIR, run_cli, shared_corpus


@pytest.mark.parametrize("preset,kind,extra", [
    ("tiny-en-fr", "translator", ["model.dropout=0.2", "data.sample_alpha=0.1", "train.teacher_forcing=0.8"]),
    ("tiny-charlm", "charlm", ["model.dropout=0.2"]),
])
def test_resumed_run_continues_exactly(tmp_path, monkeypatch, preset, kind, extra):
    cfg = load_preset(preset, kind, ["train.max_steps=12", "train.eval_every=4", "train.max_epochs=50",
                                     "train.lr_schedule=cosine", *extra])
    train(cfg, SAMPLE_DIR, tmp_path / "straight")

    # Ctrl-C in the 10th training step (the char LM has 6 windows an epoch: mid-epoch, with a
    # carried hidden state), then --resume
    original, calls = TASKS[kind].loss, []

    def interrupted(self, batch, *args, **kwargs):
        if self.model.training:
            calls.append(1)
            if len(calls) == 10:
                raise KeyboardInterrupt
        return original(self, batch, *args, **kwargs)

    monkeypatch.setattr(TASKS[kind], "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, SAMPLE_DIR, tmp_path / "resumed")
    monkeypatch.undo()
    assert json.loads(torch.load(tmp_path / "resumed" / checkpoint.STATE, weights_only=True)["progress"])["step"] == 9
    train(cfg, None, tmp_path / "resumed", resume=True)

    straight = load_file(tmp_path / "straight" / checkpoint.LAST)
    resumed = load_file(tmp_path / "resumed" / checkpoint.LAST)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    log = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "eval"] == [4, 8, 12]


def test_time_budget_stops_cleanly_and_keeps_the_best(tmp_path):
    out = tmp_path / "budget"
    result = run_cli("train", "translator", "--preset", "tiny-en-fr", "--data-dir", SAMPLE_DIR, "--output", out,
                     "--time-budget", "0.05", "--set", "train.max_epochs=100000")
    assert result.returncode == 0, result.stderr
    assert "time budget of 0.05 min used" in result.stderr
    for name in ("config.json", "model.safetensors", "spm.model", "metrics.json", "resume.safetensors",
                 "train_state.pt", "metrics.jsonl"):
        assert (out / name).is_file(), name
    state = torch.load(out / "train_state.pt", weights_only=True)  # no pickle-executed code
    assert json.loads(state["progress"])["step"] > 0
    cfg, model, _ = checkpoint.load(out)
    assert cfg.kind == "translator" and not model.training


def test_short_end_to_end_run_on_multi30k(tmp_path):
    """A slice of the real corpus: train briefly, translate, evaluate with sacreBLEU."""
    corpus = shared_corpus("multi30k-en-fr")
    for split, n in (("train", 3000), ("val", 100), ("test_2016_flickr", 100)):
        for lang in ("en", "fr"):
            lines = (corpus / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()[:n]
            (tmp_path / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "m30k"
    result = run_cli("train", "translator", "--preset", "multi30k-en-fr", "--data-dir", tmp_path, "--output", out,
                     "--set", "data.train='train'", "--set", "data.dev='val'", "--set", "data.vocab_size=1000",
                     "--set", "model.enc_layers=1", "--set", "model.dec_hidden=256", "--set", "train.max_epochs=2")
    assert result.returncode == 0, result.stderr
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in log if r["type"] == "eval"]
    assert len(evals) == 2 and evals[1]["dev_loss"] < evals[0]["dev_loss"]
    assert all(r["grad_norm"] > 0 for r in log if r["type"] == "train")
    scores = run_cli("evaluate", "-m", out, "--src", tmp_path / "test_2016_flickr.en", "--ref",
                     tmp_path / "test_2016_flickr.fr", "--beam", "3", "--json")
    assert scores.returncode == 0, scores.stderr
    scores = json.loads(scores.stdout)
    assert scores["sentences"] == 100 and 0 <= scores["bleu"] <= 100 and scores["chrf"] > 5
    translated = run_cli("translate", "-m", out, "A man is riding a bicycle down the street.")
    assert translated.returncode == 0 and translated.stdout.count("\n") == 1
