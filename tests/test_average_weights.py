"""scripts/average_weights.py: checkpoint averaging of models that share a tokenizer."""
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from conftest import ROOT, assert_one_line_error

SCRIPT = ROOT / "scripts" / "average_weights.py"
TRANSLATOR, CHARLM = ROOT / "checkpoints" / "en-fr", ROOT / "checkpoints" / "shakespeare"


def average(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_the_mean_of_w_and_3w_is_2w_and_the_last_weights_file_can_be_named(tmp_path):
    tripled = tmp_path / "tripled"
    shutil.copytree(CHARLM, tripled)
    weights = load_file(CHARLM / "model.safetensors")
    save_file({k: (3 * v.float()).contiguous() for k, v in weights.items()}, tripled / "resume.safetensors")
    result = average(CHARLM, tripled / "resume.safetensors", "--output", tmp_path / "mean")
    assert result.returncode == 0, result.stderr
    mean = load_file(tmp_path / "mean" / "model.safetensors")
    assert mean.keys() == weights.keys()
    for key, value in weights.items():
        assert mean[key].dtype == value.float().dtype
        assert (mean[key] - 2 * value.float()).abs().max() <= 1e-6 * max(1.0, float(value.float().abs().max()))
    assert (tmp_path / "mean" / "vocab.json").read_bytes() == (CHARLM / "vocab.json").read_bytes()


def test_models_of_different_tokenizers_are_refused_in_one_line(tmp_path):
    result = average(TRANSLATOR, CHARLM, "--output", tmp_path / "mean")
    line = assert_one_line_error(result, code=1, prefix="average_weights: ")
    assert line == f"average_weights: {CHARLM}: its tokenizer differs from {TRANSLATOR}'s; only one tokenizer's models combine"
    assert not (tmp_path / "mean").exists()


def test_an_ensemble_averages_its_members_probabilities(tmp_path):
    import torch

    from seq2seq import checkpoint, inference

    classifier = ROOT / "checkpoints" / "sst2"
    other = tmp_path / "other"
    shutil.copytree(classifier, other)
    weights = load_file(classifier / "model.safetensors")
    weights["out.weight"] = (weights["out.weight"].float() * 0.3).contiguous()  # a less confident model
    save_file(weights, other / "model.safetensors")
    result = average(classifier, other, "--ensemble", "--output", tmp_path / "ens")
    assert result.returncode == 0, result.stderr
    cfg, model, tokenizer = checkpoint.load(tmp_path / "ens")
    assert cfg.model.members == 2 and len(model.members) == 2
    texts = ["This movie was absolutely fantastic!", "Dull and boring.", "An odd film, neither here nor there."]
    ids = tokenizer.encode([t.lower() for t in texts])
    probabilities = [inference.class_probabilities(checkpoint.load(folder)[1], ids, precision="fp32")
                     for folder in (classifier, other)]
    combined = inference.class_probabilities(model, ids, precision="fp32")
    assert torch.allclose(combined, (probabilities[0] + probabilities[1]) / 2, atol=1e-6)
    assert not torch.allclose(probabilities[0], probabilities[1], atol=1e-3)
    labelled = inference.classify(model, tokenizer, texts)  # the commands' path reads it like any classifier
    assert [label for label, _ in labelled[:2]] == ["positive", "negative"]


def test_an_ensemble_needs_classifiers_of_one_tokenizer_and_is_never_trained(tmp_path):
    from seq2seq.config import load_preset
    from seq2seq.errors import UserError
    from seq2seq.training.tasks import TASKS

    result = average(ROOT / "checkpoints" / "sst2", TRANSLATOR, "--ensemble", "--output", tmp_path / "ens")
    assert result.returncode != 0 and "its tokenizer differs" in result.stderr and "Traceback" not in result.stderr
    cfg = load_preset("tiny-classifier", "classifier", ["model.members=2"])
    with pytest.raises(UserError, match="model.members: an ensemble is made from trained runs"):
        TASKS["classifier"](cfg, ROOT / "data")
