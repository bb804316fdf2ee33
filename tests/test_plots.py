"""seq2seq plot and --attention-png: PNGs of the expected size, one-line errors without data."""
import json

import pytest

from conftest import SAMPLE_DIR, assert_one_line_error, run_cli

plt = pytest.importorskip("matplotlib.pyplot", reason="plots need the [plot] extra")
np = pytest.importorskip("numpy")

TRAIN_COLOUR, SCORE_COLOUR = (0x1F, 0x77, 0xB4), (0x2C, 0xA0, 0x2C)  # tab:blue, the dev score's tab:green


def pixels_of(image, colour) -> int:
    return int((np.abs(image[..., :3] - np.array(colour) / 255).max(-1) < 0.02).sum())


def test_plot_draws_the_runs_curves(tiny_translator_folder, tmp_path):
    out = tmp_path / "curves.png"
    result = run_cli("plot", tiny_translator_folder, "-o", out)
    assert result.returncode == 0, result.stderr
    image = plt.imread(out)
    assert image.shape[:2] == (700, 1000)  # figsize 10 x 7 inches at 100 dpi
    assert pixels_of(image, TRAIN_COLOUR) > 200 and pixels_of(image, SCORE_COLOUR) > 200
    # the same run without its evaluations: the train curves stay, the dev score's curve goes
    from seq2seq.plots import training_curves

    records = (tiny_translator_folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in records if json.loads(line)["type"] == "train"), encoding="utf-8")
    training_curves(tmp_path / "run", tmp_path / "train-only.png")
    image = plt.imread(tmp_path / "train-only.png")
    assert pixels_of(image, TRAIN_COLOUR) > 200 and pixels_of(image, SCORE_COLOUR) == 0


def test_plot_of_a_pretrained_encoder_draws_its_dev_perplexity(tiny_translator_folder, tmp_path):
    from seq2seq.plots import training_curves

    (tmp_path / "run").mkdir()  # the translator's log without BLEU: loss and perplexity, as an encoder LM logs
    lines = []
    for line in (tiny_translator_folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        record.pop("dev_bleu", None)
        lines.append(json.dumps(record) + "\n")
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(lines), encoding="utf-8")
    training_curves(tmp_path / "run", tmp_path / "lm.png")
    assert pixels_of(plt.imread(tmp_path / "lm.png"), SCORE_COLOUR) > 200


@pytest.mark.parametrize("metrics, message", [
    (None, "metrics.jsonl: not found"),
    ("", "no train or eval records"),
    ('{"type": "train"\n', "metrics.jsonl:1: invalid JSON"),
], ids=["no-metrics", "empty-metrics", "invalid-json"])
def test_plot_of_a_run_without_metrics_is_a_one_line_error(metrics, message, tmp_path):
    if metrics is not None:
        (tmp_path / "metrics.jsonl").write_text(metrics, encoding="utf-8")
    assert_one_line_error(run_cli("plot", tmp_path), message)


def test_plot_of_no_folder_is_a_one_line_error(tmp_path):
    assert_one_line_error(run_cli("plot", tmp_path / "nowhere"), "run folder not found")


def test_attention_png_labels_source_and_target_subwords(tiny_translator_folder, tmp_path):
    from seq2seq import checkpoint
    from seq2seq.inference import attention_map

    out = tmp_path / "att.png"
    sentence = (SAMPLE_DIR / "sample" / "tiny.en").read_text(encoding="utf-8").splitlines()[0]
    result = run_cli("translate", "-m", tiny_translator_folder, "--attention-png", out, sentence)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Le chat dort sur la chaise rouge.\n"
    _, model, tokenizer = checkpoint.load(tiny_translator_folder)
    weights, source, target = attention_map(model, tokenizer, sentence)
    assert weights.shape == (len(target), len(source)) and source[-1] == target[-1] == "</s>"
    assert weights.sum(-1).sub(1).abs().max() < 1e-3  # each row is a distribution over the source
    assert "".join(source[:-1]).replace("\u2581", " ").strip() == sentence
    assert "".join(target[:-1]).replace("\u2581", " ").strip() == result.stdout.strip()
    height, width = plt.imread(out).shape[:2]
    assert width == round(100 * max(4, 0.45 * len(source) + 2)) and height == round(100 * max(3, 0.4 * len(target) + 1.5))
    assert_one_line_error(run_cli("translate", "-m", tiny_translator_folder, "--attention-png", out, ""), "there is none")
