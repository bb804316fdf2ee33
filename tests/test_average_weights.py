"""scripts/average_weights.py: checkpoint averaging of models that share a tokenizer."""
import shutil
import subprocess
import sys

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
    assert line == f"average_weights: {CHARLM}: its tokenizer differs from {TRANSLATOR}'s; only one tokenizer's models average"
    assert not (tmp_path / "mean").exists()
