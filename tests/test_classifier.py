"""The many-to-one classifier: pooling, data columns, normalisation, training, classify, evaluate,
and transfer from a translator's encoder."""
import json
import shutil

import pytest
import torch

from seq2seq import checkpoint
from seq2seq.config import ClassifierData, ClassifierModel, load_preset
from seq2seq.data import iter_labelled, load_labelled, normalize_text
from seq2seq.errors import UserError
from seq2seq.inference import classify
from seq2seq.metrics import classification_scores
from seq2seq.models.classifier import Classifier
from seq2seq.training import train
from conftest import SAMPLE_DIR, assert_one_line_error, random_batch, run_cli, shared_corpus


@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
@pytest.mark.parametrize("cell,bidirectional,layers", [("lstm", True, 2), ("gru", False, 1), ("rnn", True, 1)])
def test_pooling_of_a_padded_batch_equals_one_by_one(pooling, cell, bidirectional, layers):
    torch.manual_seed(0)
    cfg = ClassifierModel(cell=cell, emb_dim=8, hidden=6, layers=layers, bidirectional=bidirectional,
                          pooling=pooling, dropout=0.0)
    model = Classifier(cfg, 40, 3).eval()
    ids, lengths = random_batch(1, batch=6, vocab=40, min_len=1, max_len=9)
    with torch.no_grad():
        batched = model(ids, lengths)
        for row in range(6):
            alone = model(ids[row : row + 1, : lengths[row]], lengths[row : row + 1])
            torch.testing.assert_close(batched[row : row + 1], alone, rtol=1e-5, atol=1e-6)
        padding = torch.arange(ids.size(1)) >= lengths[:, None]  # never reaches a result: other ids there, same output
        torch.testing.assert_close(model(ids.masked_fill(padding, 7), lengths), batched)


def test_max_and_mean_pooling_are_over_the_real_steps():
    torch.manual_seed(0)
    model = Classifier(ClassifierModel(emb_dim=4, hidden=3, bidirectional=False, dropout=0.0, pooling="mean"), 10, 2)
    ids, lengths = torch.tensor([[4, 5, 6, 0, 0]]), torch.tensor([3])
    with torch.no_grad():
        outputs, _ = model.encoder(model.embed(ids[:, :3]))
        torch.testing.assert_close(model.features(ids, lengths), outputs.mean(1))
        model.cfg.pooling = "max"
        torch.testing.assert_close(model.features(ids, lengths), outputs.amax(1))


def test_the_text_column_is_found_by_name_position_or_the_usual_names(tmp_path):
    (tmp_path / "a.tsv").write_text("label\tsentence\n1\tgood fun\n0\tdull\n", encoding="utf-8")
    (tmp_path / "b.tsv").write_text("content\tlabel\nawful\t0\n", encoding="utf-8")
    (tmp_path / "c.csv").write_text('id,stars,review\n7,pos,"great, really"\n', encoding="utf-8")
    (tmp_path / "d.jsonl").write_text('{"label": 1, "text": "fine"}\n\n{"label": 0, "text": "meh"}\n', encoding="utf-8")
    assert list(iter_labelled(tmp_path / "a.tsv", "tsv", "label", "")) == [("1", "good fun", 2), ("0", "dull", 3)]
    assert list(iter_labelled(tmp_path / "b.tsv", "tsv", "label", "")) == [("0", "awful", 2)]
    assert list(iter_labelled(tmp_path / "b.tsv", "tsv", "1", "0")) == [("0", "awful", 2)]
    assert list(iter_labelled(tmp_path / "c.csv", "csv", "stars", "")) == [("pos", "great, really", 2)]
    assert list(iter_labelled(tmp_path / "d.jsonl", "jsonl", "label", "")) == [("1", "fine", 1), ("0", "meh", 3)]
    with pytest.raises(UserError, match=r"a.tsv:1: no label column 'stars' in the header \(columns: label, sentence\)"):
        list(iter_labelled(tmp_path / "a.tsv", "tsv", "stars", ""))
    (tmp_path / "f.csv").write_text("id,stars,comment\n1,pos,good\n", encoding="utf-8")
    with pytest.raises(UserError, match="which column is the text"):
        list(iter_labelled(tmp_path / "f.csv", "csv", "stars", ""))
    (tmp_path / "e.tsv").write_text("label\tsentence\n1\tok\n0\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"e.tsv:3: 1 column\(s\), expected 2"):
        list(iter_labelled(tmp_path / "e.tsv", "tsv", "label", ""))


def test_sst2s_two_files_are_read_from_their_own_text_columns(caplog):
    folder = shared_corpus("sst2")
    caplog.set_level("INFO", "seq2seq")
    cfg = load_preset("sst2", "classifier").data
    dev, train = load_labelled(cfg, folder.parent, "dev"), load_labelled(cfg, folder.parent, "train")
    assert len(dev) == 872 and len(train) == 67_349
    assert dev[0] == ("0", "one long string of cliches .", 2)
    assert "text from column 'content'" in caplog.text and "text from column 'sentence'" in caplog.text


def test_a_local_datasets_folder_reads_as_a_hub_dataset(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "train.jsonl").write_text('{"label": 1, "sentence": "lovely"}\n{"label": 0, "sentence": "grim"}\n',
                                          encoding="utf-8")
    cfg = ClassifierData(format="hf", hf_path="json", hf_data_files="{split}.jsonl", train="train")
    assert load_labelled(cfg, tmp_path, "train") == [("1", "lovely", 1), ("0", "grim", 2)]


@pytest.mark.parametrize("raw,prepared", [
    ("This movie was absolutely fantastic! The acting was brilliant.",
     "this movie was absolutely fantastic ! the acting was brilliant ."),
    ("Isn't it GREAT, Mr. Smith? It's 10,000 times better...", "is n't it great , mr. smith ? it 's 10,000 times better ..."),
    ("“Quoted” -- and (bracketed);", '" quoted " -- and ( bracketed ) ;'),
])
def test_raw_text_is_prepared_as_sst2s(raw, prepared):
    assert normalize_text(raw, "lower-split") == prepared
    assert normalize_text(prepared, "lower-split") == prepared  # SST-2's own text is left as it is


def test_sst2_text_is_nearly_all_left_as_it_is():
    folder = shared_corpus("sst2")
    lines = (folder / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    texts = [line.split("\t")[1] for line in lines]
    assert sum(normalize_text(t, "lower-split") != " ".join(t.split()) for t in texts) <= 3


def test_a_tiny_classifier_learns_its_training_set(tiny_classifier_folder):
    metrics = [json.loads(line) for line in (tiny_classifier_folder / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in metrics if r["type"] == "eval"]
    assert evals[-1]["train_accuracy"] == 1.0 and evals[0]["train_accuracy"] < 0.9
    labels = json.loads((tiny_classifier_folder / "labels.json").read_text())
    assert labels == {"labels": ["0", "1"], "names": {"0": "negative", "1": "positive"}}


def test_classify_keeps_line_order_and_count(tiny_classifier_folder):
    cfg, model, tokenizer = checkpoint.load(tiny_classifier_folder)
    train = (SAMPLE_DIR / "sample" / "reviews-train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    lines = [line.split("\t")[1] for line in train]
    gold = ["positive" if line[0] == "1" else "negative" for line in train]
    mixed = lines[:5] + [""] + lines[5:] + ["", "   "]
    results = classify(model, tokenizer, mixed, batch_size=3)
    assert len(results) == len(mixed) and results[5] is None and results[-2:] == [None, None]
    labels = [r[0] for r in results if r is not None]
    assert labels == gold  # learnt by heart, in input order whatever the batching
    one_by_one = [classify(model, tokenizer, [line])[0] for line in lines[:6]]
    assert [r[0] for r in one_by_one] == gold[:6]
    for (_, p), (_, q) in zip(one_by_one, results[:5]):
        assert p == pytest.approx(q, abs=1e-5) and 0.5 <= p <= 1


def test_classify_cli_writes_one_line_per_input(tiny_classifier_folder, tmp_path):
    out = tmp_path / "labels.tsv"
    source = tmp_path / "in.txt"
    train = (SAMPLE_DIR / "sample" / "reviews-train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    negative, positive = (next(line.split("\t")[1] for line in train if line[0] == k) for k in "01")
    source.write_text(f"{negative}\n\n{positive}\n", encoding="utf-8")
    result = run_cli("classify", "-m", tiny_classifier_folder, "-i", source, "-o", out)
    assert result.returncode == 0, result.stderr
    rows = out.read_text(encoding="utf-8").split("\n")
    assert rows[1] == "" and rows[0].split("\t")[0] == "negative" and rows[2].split("\t")[0] == "positive"
    assert len(rows) == 4 and 0.5 <= float(rows[0].split("\t")[1]) <= 1


def test_evaluate_reports_accuracy_f1_and_confusion(tiny_classifier_folder):
    result = run_cli("evaluate", "-m", tiny_classifier_folder, "--tsv", SAMPLE_DIR / "sample" / "reviews-train.tsv",
                     "--json")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert scores["accuracy"] == 1.0 and scores["f1"] == 1.0 and scores["examples"] == 32
    assert scores["positive_precision"] == 1.0 and scores["precision"] in ("fp32", "bf16")
    assert sum(map(sum, scores["confusion"])) == 32 and scores["labels"] == ["negative", "positive"]


def test_evaluate_names_the_line_of_an_unknown_label(tiny_classifier_folder, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("label\ttext\n1\tfine\nneutral\tso so\n", encoding="utf-8")
    result = run_cli("evaluate", "-m", tiny_classifier_folder, "--tsv", bad)
    assert_one_line_error(result, f"{bad}:3: label 'neutral' is not one the model knows", after_log=True)


def test_classification_scores_know_their_answers():
    scores = classification_scores([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], ["neg", "pos"])
    assert scores["accuracy"] == 0.6 and scores["confusion"] == [[1, 1], [1, 2]]
    assert scores["positive_precision"] == pytest.approx(2 / 3, abs=1e-4)
    assert scores["positive_recall"] == pytest.approx(2 / 3, abs=1e-4)
    assert scores["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2, abs=1e-4)
    three = classification_scores([0, 1, 2], [0, 2, 2], ["a", "b", "c"])
    assert "f1" not in three and three["accuracy"] == pytest.approx(0.6667)


def test_more_than_two_classes_train_and_classify(tmp_path):
    rows = ["label\ttext"] + [f"{k}\t{word} {word} film" for k, word in (("red", "scarlet"), ("green", "emerald"),
                                                                          ("blue", "azure"))] * 6
    (tmp_path / "three.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    cfg = load_preset("tiny-classifier", "classifier", ["data.train=three.tsv", "data.dev=three.tsv",
                                                          "data.label_names=", "data.vocab_size=30"])
    best = train(cfg, tmp_path, tmp_path / "run")
    assert best["dev_accuracy"] == 1.0 and "dev_f1" not in best
    _, model, tokenizer = checkpoint.load(tmp_path / "run")
    assert tokenizer.labels == ["blue", "green", "red"] and model.out.out_features == 3
    assert [r[0] for r in classify(model, tokenizer, ["Azure AZURE film", "Scarlet scarlet  Film"])] == ["blue", "red"]


def test_a_classifier_starts_from_a_translators_encoder(tiny_translator_folder, tmp_path):
    translator = load_file_weights(tiny_translator_folder)
    result = run_cli("train", "classifier", "--preset", "tiny-classifier", "--data-dir", SAMPLE_DIR,
                     "--init-from", tiny_translator_folder, "--set", "model.freeze_encoder=true",
                     "--set", "train.max_epochs=3", "--output", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert "embedding and encoder from the translator" in result.stderr
    cfg, model, tokenizer = checkpoint.load(tmp_path / "run")
    t_cfg, _, t_tokenizer = checkpoint.load(tiny_translator_folder)
    assert cfg.model.hidden == t_cfg.model.enc_hidden and cfg.model.layers == t_cfg.model.enc_layers
    assert tokenizer.sp.serialized_model_proto() == t_tokenizer.sp.serialized_model_proto()
    weights = model.state_dict()
    for name in [n for n in weights if n.startswith(("embed.", "encoder."))]:
        assert torch.equal(weights[name], translator[name]), name  # frozen: still the translator's
    assert not torch.equal(weights["out.weight"], Classifier(cfg.model, len(tokenizer), 2).out.weight)
    again = run_cli("train", "classifier", "--preset", "tiny-classifier", "--data-dir", SAMPLE_DIR,
                    "--init-from", tiny_translator_folder, "--set", "model.hidden=7", "--output", tmp_path / "x")
    assert_one_line_error(again, "sets the encoder's shape: drop --set model.hidden")


def load_file_weights(folder):
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(folder / checkpoint.BEST)).items()}


def test_resume_and_fine_tuning_keep_the_labels(tiny_classifier_folder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_classifier_folder, copy)
    result = run_cli("train", "classifier", "--preset", "tiny-classifier", "--data-dir", SAMPLE_DIR,
                     "--init-from", copy, "--set", "train.max_epochs=1", "--output", tmp_path / "tuned")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "tuned" / "labels.json").read_text())["labels"] == ["0", "1"]


# ----- the encoder pretrained as a language model (model.head = "lm") --------------------------------

def reference_lm_nats(model, seq: list[int]) -> float:
    """One sentence's summed negative log-likelihood, from two one-direction LSTMs that hold the
    encoder's weights: the forward reads left to right and predicts each next piece, the backward
    reads the reversed sentence and predicts each piece before."""
    enc, h = model.encoder, model.cfg.hidden
    total, x = 0.0, model.embed(torch.tensor([seq]))
    for suffix, inputs, targets in (("", x[:, :-1], seq[1:]), ("_reverse", x.flip(1)[:, :-1], seq[::-1][1:])):
        one_way = torch.nn.LSTM(model.cfg.emb_dim, h, batch_first=True)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(one_way, f"{name}_l0").data.copy_(getattr(enc, f"{name}_l0{suffix}"))
        states, _ = one_way(inputs)
        log_probs = model.lm.log_prob(states[0])
        total -= float(log_probs[torch.arange(len(targets)), torch.tensor(targets)].sum())
    return total


def test_the_language_models_loss_equals_two_one_way_lstms_sentence_by_sentence():
    from seq2seq.models.classifier import EncoderLM

    torch.manual_seed(0)
    model = EncoderLM(ClassifierModel(emb_dim=6, hidden=5, head="lm"), vocab_size=40).eval()
    seqs = [[5, 9, 3, 17, 22, 8], [30, 2], [7, 7, 12, 39]]  # padded to 6: padding must change nothing
    batch = torch.zeros(3, 6, dtype=torch.long)
    for row, seq in enumerate(seqs):
        batch[row, : len(seq)] = torch.tensor(seq)
    with torch.no_grad():
        loss, count = model(batch, torch.tensor([len(s) for s in seqs]))
        expected = sum(reference_lm_nats(model, seq) for seq in seqs)
    assert int(count) == 2 * sum(len(s) - 1 for s in seqs)  # both directions, every piece but the end one
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_every_parameter_gets_a_gradient_when_no_target_falls_in_a_softmax_tail():
    """Several processes (DistributedDataParallel) expect a gradient for every parameter at every step."""
    from seq2seq.models.classifier import EncoderLM

    model = EncoderLM(ClassifierModel(emb_dim=16, hidden=16, head="lm"), vocab_size=80)  # head: pieces 0-9
    loss, _ = model(torch.tensor([[4, 5, 6, 7]]), torch.tensor([4]))
    loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("settings, message", [
    (["model.head=lm", "model.layers=2"], "a bidirectional language model has one layer"),
    (["data.unlabelled=sample/reviews.txt"], "read only when pretraining"),
])
def test_language_model_settings_that_cannot_work_are_refused(settings, message):
    with pytest.raises(UserError, match=message):
        load_preset("tiny-classifier", "classifier", settings)


def test_unlabelled_text_reads_a_tsvs_first_column_once_per_sentence(tmp_path):
    from seq2seq.data import read_sentences

    (tmp_path / "pairs.tsv").write_text("Go.\tVa !\nGo.\tMarche.\n\nHi.\tSalut.\n", encoding="utf-8")
    (tmp_path / "plain.en").write_text("A dog runs.\tnot a column\nHi.\n", encoding="utf-8")
    assert read_sentences(tmp_path, "pairs.tsv, plain.en") == ["Go.", "Hi.", "A dog runs.\tnot a column"]
    with pytest.raises(UserError, match="missing.txt: file not found"):
        read_sentences(tmp_path, "missing.txt")


def test_a_classifier_starts_from_a_pretrained_encoder(tmp_path):
    (tmp_path / "pairs.tsv").write_text("A quiet, moving film.\tUn film calme.\nDull and slow.\tLent.\n"
                                        "Dull and slow.\tTrop lent.\n", encoding="utf-8")  # one English side twice
    (tmp_path / "more.txt").write_text("The plot was thrilling.\nI liked the actors.\n", encoding="utf-8")
    pretrain = run_cli("train", "classifier", "--preset", "tiny-classifier", "--data-dir", SAMPLE_DIR,
                       "--set", "model.head=lm", "--set", "data.unlabelled=pairs.tsv,more.txt",  # read from the cwd
                       "--set", "train.max_epochs=4", "--output", tmp_path / "lm", cwd=tmp_path)
    assert pretrain.returncode == 0, pretrain.stderr
    assert "(4 from data.unlabelled)" in pretrain.stderr
    curve = [json.loads(line) for line in (tmp_path / "lm" / "metrics.jsonl").read_text().splitlines()]
    dev_loss = [r["dev_loss"] for r in curve if r["type"] == "eval"]
    assert len(dev_loss) == 4 and dev_loss[-1] < dev_loss[0]  # the language model learns
    assert_one_line_error(run_cli("classify", "-m", tmp_path / "lm", "Great."), "a pretrained encoder",
                          "--preset PRESET --init-from")
    lm = load_file_weights(tmp_path / "lm")
    result = run_cli("train", "classifier", "--preset", "tiny-classifier", "--data-dir", SAMPLE_DIR,
                     "--init-from", tmp_path / "lm", "--set", "model.freeze_encoder=true",
                     "--set", "train.max_epochs=3", "--output", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert "embedding and encoder from the pretrained encoder" in result.stderr
    cfg, model, _ = checkpoint.load(tmp_path / "run")
    assert cfg.model.head == "classes" and cfg.model.dropout == 0.0  # the preset's, not the pretraining's
    assert (tmp_path / "run" / "spm.model").read_bytes() == (tmp_path / "lm" / "spm.model").read_bytes()
    weights = model.state_dict()
    for name in [n for n in weights if n.startswith(("embed.", "encoder."))]:
        assert torch.equal(weights[name], lm[name]), name  # frozen: still the pretrained encoder's
    assert not any(name.startswith("lm.") for name in weights)


def test_a_language_model_cannot_take_a_two_layer_encoder(tiny_translator_folder, tmp_path):
    two_layers = tmp_path / "two-layers"
    shutil.copytree(tiny_translator_folder, two_layers)
    config = json.loads((two_layers / "config.json").read_text())
    config["model"]["enc_layers"] = 2
    (two_layers / "config.json").write_text(json.dumps(config))
    result = run_cli("train", "classifier", "--preset", "tiny-classifier", "--data-dir", SAMPLE_DIR,
                     "--set", "model.head=lm", "--init-from", two_layers, "--output", tmp_path / "run")
    assert_one_line_error(result, f"--init-from {two_layers} [model] head", "has one layer")
