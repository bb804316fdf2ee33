"""The character language model: truncated BPTT, scoring, learning a text, generation."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from seq2seq.inference import generate, score_text
from seq2seq.models.rnn import detach
from conftest import SAMPLE_DIR, run_cli, small_charlm


def test_carried_state_tbptt_loss_equals_one_pass_over_the_text():
    model = small_charlm(seed=1)
    text = torch.randint(0, 20, (3, 97), generator=torch.Generator().manual_seed(2))
    logits, _ = model(text[:, :-1])
    whole = F.cross_entropy(logits.flatten(0, 1), text[:, 1:].flatten(), reduction="sum")
    windows, hidden = 0.0, None
    for start in range(0, 96, 16):
        x, y = text[:, start : start + 16], text[:, start + 1 : start + 17]
        x = x[:, : y.size(1)]
        logits, hidden = model(x, hidden)
        hidden = detach(hidden)
        windows = windows + F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
    assert torch.allclose(whole, windows, rtol=1e-5)


def test_score_text_scores_every_character_given_all_before_it():
    model = small_charlm(seed=3, cell="gru")
    ids = torch.randint(0, 20, (500,), generator=torch.Generator().manual_seed(4))
    logits, _ = model(ids[:-1].unsqueeze(0))
    reference = F.cross_entropy(logits[0], ids[1:], reduction="sum").item()
    one_stream = score_text(model, ids, streams=1, window=64)
    assert one_stream["characters"] == 499
    assert math.isclose(one_stream["nats_per_char"] * 499, reference, rel_tol=1e-5)
    # several streams, each warmed on the text before its chunk: every character but the first is scored
    many = score_text(model, ids, streams=4, warmup=500, window=37)
    assert many["characters"] == 499
    assert math.isclose(many["nats_per_char"], one_stream["nats_per_char"], rel_tol=1e-4)
    assert math.isclose(many["bits_per_char"], many["nats_per_char"] / math.log(2))
    assert math.isclose(many["perplexity"], math.exp(many["nats_per_char"]))


def test_tiny_model_learns_a_repeating_text_and_regenerates_it(tiny_charlm_folder):
    out = tiny_charlm_folder
    best = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["best"]
    assert best["valid_nats_per_char"] < 0.05, best
    gen = run_cli("generate", "-m", out, "--prompt", "the quick", "--max-chars", "50", "--temperature", "0")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout == "the quick brown fox jumps over the lazy dog.\na stitch in ti\n"
    beam = run_cli("generate", "-m", out, "--prompt", "a stitch", "--max-chars", "20", "--beam", "3")
    assert beam.stdout == "a stitch in time saves nine.\n"
    scores = run_cli("evaluate", "-m", out, "--text", SAMPLE_DIR / "sample/tiny.txt", "--json")
    scores = json.loads(scores.stdout)
    # every character but the first, scored as score_text scores it
    from seq2seq import checkpoint

    text = (SAMPLE_DIR / "sample/tiny.txt").read_text(encoding="utf-8")
    _, model, vocab = checkpoint.load(out)
    reference = score_text(model, torch.tensor(vocab.encode(text), dtype=torch.long))
    assert scores["characters"] == reference["characters"] == len(text) - 1
    assert math.isclose(scores["nats_per_char"], reference["nats_per_char"], abs_tol=1e-4)
    assert scores["bits_per_char"] < 0.1 and scores["precision"] == "fp32"
    assert math.isclose(scores["perplexity"], 2 ** scores["bits_per_char"], rel_tol=1e-3)
    cont = run_cli("evaluate", "-m", out, "--text", SAMPLE_DIR / "sample/tiny.txt", "--continuations", "5",
                   "--prompt-chars", "60", "--max-chars", "40", "--json")
    cont = json.loads(cont.stdout)
    assert cont["bleu"] > 90 and cont["chrf"] > 90 and cont["continuations"] == 5
    assert cont["signature"].startswith("nrefs:1|")
    # sampling: a seed repeats, several samples come back, unseen characters are noted once
    a = run_cli("generate", "-m", out, "--prompt", "the", "--max-chars", "30", "--seed", "7", "--temperature", "1.5")
    b = run_cli("generate", "-m", out, "--prompt", "the", "--max-chars", "30", "--seed", "7", "--temperature", "1.5")
    assert a.stdout == b.stdout and len(a.stdout) == 34
    many = run_cli("generate", "-m", out, "--prompt", "ZZ the", "--max-chars", "20", "--num-samples", "3",
                   "--top-k", "3", "--top-p", "0.9", "--seed", "1")
    assert many.returncode == 0 and many.stdout.count("ZZ the") == 3
    assert many.stderr.count("not seen in training") == 1


def test_generate_streams_characters_in_order():
    model = small_charlm(seed=5)
    from seq2seq.tokenizer import CharVocab

    vocab = CharVocab(list("abcdefghijklmnopqrs"))
    pieces = []
    texts = generate(model, vocab, ["abc"], 25, temperature=0.7, seed=3, on_text=pieces.append)
    assert "".join(pieces) == texts[0] and len(pieces) == 25


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_one_step_decoding_equals_the_sequence_pass(cell):
    """search's `step` runs the cell kernels; it must compute what the whole-sequence RNN computes."""
    model = small_charlm(seed=6, cell=cell)
    text = torch.randint(0, 20, (3, 12), generator=torch.Generator().manual_seed(7))
    expected = torch.log_softmax(model(text)[0], -1)
    state = {"hidden": None}
    for t in range(12):
        logits, state = model.step(text[:, t], state)
        assert torch.allclose(logits.log_softmax(-1), expected[:, t], atol=1e-5)


def test_each_epoch_cuts_the_streams_at_its_own_offset_and_ranks_split_them():
    from seq2seq.config import load_preset
    from seq2seq.training.tasks import CharLMTask

    task = CharLMTask(load_preset("tiny-charlm", "charlm"), SAMPLE_DIR)
    text = task.train_ids.tolist()

    def windows(epoch):
        return [task.epoch_streams(epoch)[:, start : start + 32].tolist() for _, start in task.batches(epoch)]

    first, again, second = windows(0), windows(0), windows(1)
    assert first == again and first != second  # deterministic per (seed, epoch); new windows each epoch
    rows = task.epoch_streams(1).tolist()
    start = next(i for i in range(len(text)) if text[i : i + len(rows[0])] == rows[0])
    assert all(row == text[start + r * len(row) : start + (r + 1) * len(row)] for r, row in enumerate(rows))  # contiguous cuts
    task.shard(1, 2)
    assert task.epoch_streams(1).tolist() == rows[len(rows) // 2 :]  # rank 1 of 2: the second block of streams
