"""The command line as a user meets it: one-line errors with exit codes, and the main workflows."""
import json

import pytest
import torch

from conftest import SAMPLE_DIR, run_cli, train_tiny, write_tsv_preset


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("seq2seq: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The tiny preset trained on the 20 shipped pairs (the README's main job, made small)."""
    return train_tiny(tmp_path_factory, "translator", "train.max_epochs=120")


def test_tiny_model_overfits_twenty_pairs_to_bleu_95(tiny_model):
    result = run_cli("evaluate", "-m", tiny_model, "--src", SAMPLE_DIR / "sample/tiny.en", "--ref",
                     SAMPLE_DIR / "sample/tiny.fr", "--beam", "5", "--json")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert scores["bleu"] >= 95, scores
    assert scores["sentences"] == 20
    assert scores["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert {"chrf", "seconds"} <= scores.keys()


def test_translate_arguments_stdin_and_files_keep_one_line_per_input(tiny_model, tmp_path):
    args = run_cli("translate", "-m", tiny_model, "Two dogs play in the snow.", "The sun is shining over the sea.")
    assert args.returncode == 0, args.stderr
    assert args.stdout == "Deux chiens jouent dans la neige.\nLe soleil brille sur la mer.\n"
    piped = run_cli("translate", "-m", tiny_model, input="Two dogs play in the snow.\n\nI like green apples.\n")
    assert piped.stdout == "Deux chiens jouent dans la neige.\n\nJ'aime les pommes vertes.\n"
    src = tmp_path / "in.en"
    src.write_text("A dog runs in the park.\nThe baby is sleeping in his bed.\n", encoding="utf-8")
    files = run_cli("translate", "-m", tiny_model, "-i", src, "-o", tmp_path / "out.fr", "--beam", "5")
    assert files.returncode == 0, files.stderr
    assert (tmp_path / "out.fr").read_text(encoding="utf-8").splitlines() == [
        "Un chien court dans le parc.", "Le bébé dort dans son lit."]
    nbest = run_cli("translate", "-m", tiny_model, "-i", src, "--beam", "4", "--nbest", "3", "--scores")
    rows = [line.split("\t") for line in nbest.stdout.splitlines()]
    assert [r[0] for r in rows] == ["0"] * 3 + ["1"] * 3
    assert float(rows[0][1]) >= float(rows[1][1]) >= float(rows[2][1])


def test_script_wrapper_translates(tiny_model):
    import subprocess
    import sys

    from conftest import ROOT

    result = subprocess.run([sys.executable, str(ROOT / "scripts/translate.py"), "-m", str(tiny_model),
                             "I like green apples."], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "J'aime les pommes vertes.\n"


def test_mismatched_counts_is_an_error_naming_both_files(tiny_model, tmp_path):
    (tmp_path / "a.en").write_text("one\ntwo\nthree\n", encoding="utf-8")
    (tmp_path / "a.fr").write_text("un\ndeux\n", encoding="utf-8")
    result = run_cli("evaluate", "-m", tiny_model, "--src", tmp_path / "a.en", "--ref", tmp_path / "a.fr")
    assert_one_line_error(result, "a.en has 3 lines", "a.fr has 2")


def test_invalid_utf8_in_training_data(tmp_path):
    (tmp_path / "bad.tsv").write_bytes(b"Hello.\tBonjour.\nCaf\xe9.\tCaf\xc3\xa9.\n")
    result = run_cli("train", "translator", "--preset", write_tsv_preset(tmp_path, "bad.tsv"), "--data-dir", tmp_path,
                     "--output", tmp_path / "out")
    assert_one_line_error(result, "bad.tsv:2: invalid UTF-8")
    assert not (tmp_path / "out" / "config.json").exists()


def test_invalid_utf8_on_stdin(tiny_model):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "seq2seq.cli", "translate", "-m", str(tiny_model)],
                            input=b"fine\nab\xffc\n", capture_output=True)
    assert result.returncode == 2
    assert result.stderr.decode().strip() == "seq2seq: error: <stdin>:2: invalid UTF-8 (byte 0xff at column 3)"


def test_empty_and_overlong_pairs_are_dropped_and_counted(tmp_path):
    lines = ["Hello.\tBonjour.", "\tVide.", "Empty.\t", "A cat.\tUn chat.",
             " ".join(["word"] * 300) + "\t" + " ".join(["mot"] * 300)] + ["A dog.\tUn chien."] * 5
    (tmp_path / "mixed.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run_cli("train", "translator", "--preset", write_tsv_preset(tmp_path, "mixed.tsv"), "--data-dir", tmp_path,
                     "--output", tmp_path / "out", "--set", "data.vocab_size=60", "--set", "data.max_tokens=50")
    assert result.returncode == 0, result.stderr
    assert "train: dropped 2 empty pair(s) of 10" in result.stderr
    assert "train: dropped 1 pair(s) longer than 50 tokens" in result.stderr


def test_training_on_two_corpora_of_different_formats(tmp_path):
    en = (SAMPLE_DIR / "sample/tiny.en").read_text(encoding="utf-8").splitlines()
    fr = (SAMPLE_DIR / "sample/tiny.fr").read_text(encoding="utf-8").splitlines()
    (tmp_path / "a.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in zip(en[:12], fr[:12])), encoding="utf-8")
    (tmp_path / "b.en").write_text("".join(s + "\n" for s in en[12:]), encoding="utf-8")
    (tmp_path / "b.fr").write_text("".join(t + "\n" for t in fr[12:]), encoding="utf-8")
    preset = tmp_path / "two.toml"
    preset.write_text('kind = "translator"\n[data]\nformat = "parallel"\n'
                      'train = [{ path = "a.tsv", format = "tsv" }, { path = "b" }]\n'
                      'dev = [{ path = "a.tsv", format = "tsv", max_sentences = 3 },\n'
                      '       { path = "b", max_sentences = 3 }]\n'
                      'vocab_size = 100\n[model]\nemb_dim = 8\nenc_hidden = 8\nenc_layers = 1\ndec_hidden = 8\n'
                      '[train]\nbf16 = false\n', encoding="utf-8")
    result = run_cli("train", "translator", "--preset", preset, "--data-dir", tmp_path, "--output", tmp_path / "out",
                     "--set", "train.max_epochs=1")
    assert result.returncode == 0, result.stderr
    for line in ("train: 12 pairs from a.tsv (tsv)", "train: 8 pairs from b (parallel)",
                 "dev: 3 pairs from a.tsv (tsv, the first of 12)", "dev: 3 pairs from b (parallel, the first of 8)",
                 "train: 20 pairs"):
        assert line in result.stderr, result.stderr
    saved = json.loads((tmp_path / "out" / "config.json").read_text(encoding="utf-8"))
    assert saved["data"]["train"] == [{"path": "a.tsv", "format": "tsv"}, {"path": "b"}]
    bad = run_cli("train", "translator", "--preset", preset, "--set", 'data.dev=[{ path = "b", max = 3 }]')
    assert_one_line_error(bad, "[data] dev[0]: unknown key(s) max; known: path, format, max_sentences")


def test_missing_file_unknown_preset_and_bad_settings(tiny_model, tmp_path):
    assert_one_line_error(run_cli("translate", "-m", tiny_model, "-i", tmp_path / "nope.en"), "nope.en: file not found")
    assert_one_line_error(run_cli("train", "translator", "--preset", "nope"), "unknown preset 'nope'", "multi30k-en-fr")
    assert_one_line_error(run_cli("train", "translator", "--preset", "tiny-en-fr", "--set", "model.size=3"),
                          "unknown key(s) size")
    assert_one_line_error(run_cli("train", "translator", "--preset", "tiny-en-fr", "--set", "train.lr=fast"),
                          "train] lr: expected float")
    assert_one_line_error(run_cli("train", "charlm", "--preset", "tiny-en-fr"), "not a charlm")
    assert_one_line_error(run_cli("translate", "-m", tmp_path, "hi"), "config.json: not found")
    assert_one_line_error(run_cli("translate", "-m", tiny_model, "--beam", "2", "--nbest", "3", "hi"), "--nbest 3")


def test_training_refuses_to_overwrite_a_model(tiny_model):
    result = run_cli("train", "translator", "--preset", "tiny-en-fr", "--data-dir", SAMPLE_DIR, "--output", tiny_model)
    assert_one_line_error(result, "already holds a model", "--resume")


def test_reader_errors_in_training_runs(tmp_path):
    (tmp_path / "notab.tsv").write_text("Hello.\tBonjour.\nNo tab at all\n", encoding="utf-8")
    result = run_cli("train", "translator", "--preset", write_tsv_preset(tmp_path, "notab.tsv"), "--data-dir", tmp_path,
                     "--output", tmp_path / "o1")
    assert_one_line_error(result, "notab.tsv:2: expected source<TAB>target")
    (tmp_path / "p.en").write_text("a\nb\nc\n", encoding="utf-8")
    (tmp_path / "p.fr").write_text("a\nb\n", encoding="utf-8")
    result = run_cli("train", "translator", "--preset", "tiny-en-fr", "--data-dir", tmp_path, "--output", tmp_path / "o2",
                     "--set", "data.train=p", "--set", "data.dev=p")
    assert_one_line_error(result, "p.en has 3 lines", "p.fr has 2")


def test_empty_stdin_and_unwritable_output(tiny_model, tmp_path):
    empty = run_cli("translate", "-m", tiny_model, input="")
    assert empty.returncode == 0 and empty.stdout == ""
    result = run_cli("translate", "-m", tiny_model, "-o", tmp_path / "missing" / "out.fr", "Hello.")
    assert_one_line_error(result, "missing/out.fr")


def test_resume_keeps_data_dir_and_new_train_settings(tmp_path):
    out = tmp_path / "lm"
    first = run_cli("train", "charlm", "--preset", "tiny-charlm", "--data-dir", SAMPLE_DIR, "--output", out,
                    "--set", "train.max_steps=4")
    assert first.returncode == 0, first.stderr
    again = run_cli("train", "charlm", "--resume", "--output", out, "--set", "train.max_steps=8")
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr and json.loads(again.stdout)["best"] is not None
    assert json.loads((out / "config.json").read_text())["train"]["max_steps"] == 8
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "eval"]
    assert steps[-1] == 8
    assert_one_line_error(run_cli("train", "charlm", "--resume", "--output", out, "--set", "model.hidden=8"),
                          "train.* settings only")
    assert_one_line_error(run_cli("generate", "-m", out, "--beam", "3", "--num-samples", "2"), "--num-samples")


def test_fine_tuning_starts_from_a_models_weights_and_tokenizer(tiny_model, tmp_path):
    from seq2seq import checkpoint
    from seq2seq.config import load_preset
    from seq2seq.distributed import Cluster
    from seq2seq.training import build_task
    from seq2seq.training.run_folder import RunFolder

    # a preset asking for other sizes still builds the folder's model, from its weights
    init_cfg, init_model, _ = checkpoint.load(tiny_model)
    cfg = load_preset("tiny-en-fr", "translator", ["model.dec_hidden=8"])
    cfg.model = init_cfg.model
    folder = RunFolder(tmp_path / "tuned")
    folder.check(resume=False)
    task = build_task(cfg, SAMPLE_DIR, Cluster(), folder, False, tiny_model)
    saved = init_model.state_dict()
    for name, tensor in task.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert (tmp_path / "tuned" / "spm.model").read_bytes() == (tiny_model / "spm.model").read_bytes()

    common = ("train", "translator", "--preset", "tiny-en-fr", "--data-dir", SAMPLE_DIR)
    result = run_cli(*common, "--output", tmp_path / "cli", "--init-from", tiny_model, "--set", "train.max_epochs=1")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["best"]["dev_bleu"] > 50  # a model trained from scratch for one epoch: ~0
    first = json.loads((tmp_path / "cli" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert first == {"type": "init", "step": 0, "from": str(tiny_model.resolve())}
    assert_one_line_error(run_cli(*common, "--output", tmp_path / "x", "--init-from", tiny_model,
                                  "--set", "model.dropout=0.1"), "--init-from", "drop the --set model.*")
    assert_one_line_error(run_cli("train", "charlm", "--preset", "tiny-charlm", "--data-dir", SAMPLE_DIR, "--output",
                                  tmp_path / "y", "--init-from", tiny_model), "holds a translator model, not a charlm")
    assert_one_line_error(run_cli(*common, "--output", tmp_path / "z", "--init-from", tmp_path / "nowhere"),
                          "not a model folder")
