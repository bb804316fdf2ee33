"""seq2seq plot and --attention-png: PNGs of the expected size, one-line errors without data."""

import pytest

from conftest import SAMPLE_DIR, run_cli, train_tiny

plt = pytest.importorskip("matplotlib.pyplot", reason="plots need the [plot] extra")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny(tmp_path_factory, "translator", "train.max_epochs=40", "train.log_every=5", "train.eval_every=10")


def test_plot_draws_the_runs_curves(run, tmp_path):
    out = tmp_path / "curves.png"
    result = run_cli("plot", run, "-o", out)
    assert result.returncode == 0, result.stderr
    image = plt.imread(out)
    assert image.shape[:2] == (700, 1000)  # figsize 10 x 7 inches at 100 dpi
    assert image.std() > 0.05  # not a blank canvas


def test_plot_of_a_run_without_metrics_is_a_one_line_error(tmp_path):
    for number, (setup, message) in enumerate(((lambda d: None, "metrics.jsonl: not found"),
                           (lambda d: (d / "metrics.jsonl").write_text(""), "no train or eval records"),
                           (lambda d: (d / "metrics.jsonl").write_text('{"type": "train"\n'), "metrics.jsonl:1: invalid JSON"))):
        folder = tmp_path / f"run{number}"
        folder.mkdir()
        setup(folder)
        result = run_cli("plot", folder)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("seq2seq: error:") and message in result.stderr
    result = run_cli("plot", tmp_path / "nowhere")
    assert result.returncode == 2 and "run folder not found" in result.stderr


def test_attention_png_labels_source_and_target_subwords(run, tmp_path):
    from seq2seq import checkpoint
    from seq2seq.inference import attention_map

    out = tmp_path / "att.png"
    sentence = (SAMPLE_DIR / "sample" / "tiny.en").read_text(encoding="utf-8").splitlines()[0]
    result = run_cli("translate", "-m", run, "--attention-png", out, sentence)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    _, model, tokenizer = checkpoint.load(run)
    weights, source, target = attention_map(model, tokenizer, sentence)
    assert weights.shape == (len(target), len(source)) and source[-1] == target[-1] == "</s>"
    assert weights.sum(-1).sub(1).abs().max() < 1e-3  # each row is a distribution over the source
    assert "".join(target[:-1]).replace("\u2581", " ").strip() == result.stdout.strip()
    height, width = plt.imread(out).shape[:2]
    assert width == round(100 * max(4, 0.45 * len(source) + 2)) and height == round(100 * max(3, 0.4 * len(target) + 1.5))
    result = run_cli("translate", "-m", run, "--attention-png", out, "")
    assert result.returncode == 2 and "there is none" in result.stderr
