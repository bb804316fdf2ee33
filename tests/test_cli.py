"""The command line as a user meets it: the main workflows on the shared tiny models (conftest.py).
Its one-line errors are the table of test_reliability.py."""
import json
import shutil
import subprocess
import sys

import torch

from conftest import ROOT, SAMPLE_DIR, run_cli, write_tsv_preset


def test_tiny_model_overfits_twenty_pairs_to_bleu_95(tiny_translator_folder, tmp_path):
    from seq2seq.data import read_lines
    from seq2seq.metrics import bleu_chrf

    result = run_cli("evaluate", "-m", tiny_translator_folder, "--src", SAMPLE_DIR / "sample/tiny.en", "--ref",
                     SAMPLE_DIR / "sample/tiny.fr", "--beam", "5", "--json", "--hyp-output", tmp_path / "hyp.fr")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert scores["bleu"] >= 95, scores
    assert scores["sentences"] == 20
    assert scores["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    # the scores are sacreBLEU's on the translations it wrote, one per source line
    hyps, refs = read_lines(tmp_path / "hyp.fr"), read_lines(SAMPLE_DIR / "sample/tiny.fr")
    assert len(hyps) == 20
    reference = bleu_chrf(hyps, refs)
    assert (scores["bleu"], scores["chrf"]) == (reference["bleu"], reference["chrf"])
    assert "seconds" in scores


def test_translate_arguments_stdin_and_files_keep_one_line_per_input(tiny_translator_folder, tmp_path):
    model = tiny_translator_folder
    args = run_cli("translate", "-m", model, "Two dogs play in the snow.", "The sun is shining over the sea.")
    assert args.returncode == 0, args.stderr
    assert args.stdout == "Deux chiens jouent dans la neige.\nLe soleil brille sur la mer.\n"
    piped = run_cli("translate", "-m", model, input="Two dogs play in the snow.\n\nI like green apples.\n")
    assert piped.stdout == "Deux chiens jouent dans la neige.\n\nJ'aime les pommes vertes.\n"
    src = tmp_path / "in.en"
    src.write_text("A dog runs in the park.\nThe baby is sleeping in his bed.\n", encoding="utf-8")
    files = run_cli("translate", "-m", model, "-i", src, "-o", tmp_path / "out.fr", "--beam", "5")
    assert files.returncode == 0, files.stderr
    assert (tmp_path / "out.fr").read_text(encoding="utf-8").splitlines() == [
        "Un chien court dans le parc.", "Le bébé dort dans son lit."]
    nbest = run_cli("translate", "-m", model, "-i", src, "--beam", "4", "--nbest", "3", "--scores")
    rows = [line.split("\t") for line in nbest.stdout.splitlines()]
    assert [r[0] for r in rows] == ["0"] * 3 + ["1"] * 3
    assert float(rows[0][1]) >= float(rows[1][1]) >= float(rows[2][1])
    assert [rows[0][2], rows[3][2]] == ["Un chien court dans le parc.", "Le bébé dort dans son lit."]  # best first
    # no line in, no line out: from standard input and from a file
    (tmp_path / "empty.en").write_text("", encoding="utf-8")
    for empty in (run_cli("translate", "-m", model, input=""), run_cli("translate", "-m", model, "-i", tmp_path / "empty.en")):
        assert empty.returncode == 0 and empty.stdout == "", empty.stderr


def test_script_wrapper_translates(tiny_translator_folder):
    result = subprocess.run([sys.executable, str(ROOT / "scripts/translate.py"), "-m", str(tiny_translator_folder),
                             "I like green apples."], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "J'aime les pommes vertes.\n"


def test_empty_and_overlong_pairs_are_dropped_and_counted(tmp_path):
    # its own one-epoch training: what the reader drops is the subject
    lines = ["Hello.\tBonjour.", "\tVide.", "Empty.\t", "A cat.\tUn chat.",
             " ".join(["word"] * 300) + "\t" + " ".join(["mot"] * 300)] + ["A dog.\tUn chien."] * 5
    (tmp_path / "mixed.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run_cli("train", "translator", "--preset", write_tsv_preset(tmp_path, "mixed.tsv"), "--data-dir", tmp_path,
                     "--output", tmp_path / "out", "--set", "data.vocab_size=60", "--set", "data.max_tokens=50")
    assert result.returncode == 0, result.stderr
    assert "train: dropped 2 empty pair(s) of 10" in result.stderr
    assert "train: dropped 1 pair(s) longer than 50 tokens" in result.stderr


def test_training_on_two_corpora_of_different_formats(tmp_path):
    # its own one-epoch training: reading two corpora of two formats into one run is the subject
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


def test_resume_keeps_data_dir_and_new_train_settings(tiny_charlm_folder, tmp_path):
    out = tmp_path / "lm"
    shutil.copytree(tiny_charlm_folder, out)  # a finished run of 60 epochs, continued for one more
    before = json.loads(torch.load(out / "train_state.pt", weights_only=True)["progress"])
    assert before["epoch"] == 60 and before["batch"] == 0
    # from a folder without data/: the run's own --data-dir is kept, not the default ./data
    again = run_cli("train", "charlm", "--resume", "--output", out, "--set", "train.max_epochs=61", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"resuming {out} at epoch 61, step {before['step']}" in again.stderr
    assert json.loads((out / "config.json").read_text())["train"]["max_epochs"] == 61
    after = json.loads(torch.load(out / "train_state.pt", weights_only=True)["progress"])
    assert after["step"] > before["step"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # one more epoch trained, then evaluated and saved at its end
    assert records[-1]["type"] == "eval" and records[-1]["step"] == after["step"] and records[-1]["epoch"] == 61.0
    assert json.loads(again.stdout)["best"] == after["best"]


def test_fine_tuning_starts_from_a_models_weights_and_tokenizer(tiny_translator_folder, tmp_path):
    from seq2seq import checkpoint
    from seq2seq.config import load_preset
    from seq2seq.distributed import Cluster
    from seq2seq.training import build_task
    from seq2seq.training.run_folder import RunFolder

    # a preset asking for other sizes still builds the folder's model, from its weights
    tiny_model = tiny_translator_folder
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

    # its own one-epoch training: a run from the shared model's weights
    common = ("train", "translator", "--preset", "tiny-en-fr", "--data-dir", SAMPLE_DIR)
    result = run_cli(*common, "--output", tmp_path / "cli", "--init-from", tiny_model, "--set", "train.max_epochs=1")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["best"]["dev_bleu"] > 50  # a model trained from scratch for one epoch: ~0
    first = json.loads((tmp_path / "cli" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert first == {"type": "init", "step": 0, "from": str(tiny_model.resolve())}


def test_evaluate_without_a_model_picks_the_classifier_for_a_labelled_file_and_refuses_bare_labels(tmp_path):
    import json

    from conftest import assert_one_line_error, run_cli

    labelled = tmp_path / "reviews.tsv"
    labelled.write_text("label\tcontent\n" + "1\ta wonderful, moving film .\n0\ta dull and tedious mess .\n" * 5)
    result = run_cli("evaluate", "--tsv", labelled, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert scores["examples"] == 10 and scores["accuracy"] == 1.0 and "bleu" not in scores
    bare = tmp_path / "bare.tsv"
    bare.write_text("1\ta wonderful, moving film .\n0\ta dull and tedious mess .\n" * 5)
    result = run_cli("evaluate", "--tsv", bare, "--json", cwd=tmp_path)
    assert_one_line_error(result, "bare.tsv: the source side holds only 0, 1: labels, not sentences?")

