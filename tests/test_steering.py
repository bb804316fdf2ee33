"""Translation people can steer: paragraphs split into sentences and joined back, prefixes the
output must start with (ending inside a word included), word alignments from the attention of the
returned text, terminology through lexically constrained beam search; through the library and the
command line (the server's side is in test_serve.py, the page's in test_serve_page.py)."""
import re

import pytest
import torch

from seq2seq import checkpoint, inference, search, sentences
from seq2seq.errors import UserError
from seq2seq.limits import LIMITS
from conftest import ROOT, assert_one_line_error, run_cli

pytestmark = pytest.mark.every_cpu  # the masks meet the shortlist and each precision's decoder: on every CPU
MODEL = ROOT / "checkpoints" / "en-fr"
SENTENCES = ["Two dogs play in the snow.", "A man in a red shirt rides a bicycle.", "The children are laughing.",
             "Where is the train station?", "A woman reads a book on a bench."]


@pytest.fixture(scope="module")
def released():
    _, model, tokenizer = checkpoint.load(MODEL)
    return model, tokenizer


@pytest.mark.parametrize("line", ["One. Two!  Three?", "  Lead and trail.  ", "Line one.\nLine two.\n\nPara two.",
                                  "No full stop", "", "   ", "Mr. Smith met Dr. Jones. They talked."])
def test_a_line_splits_into_sentences_that_join_back_to_it(line):
    parts = sentences.split(line)
    assert sentences.join(parts, [p.text for p in parts]) == (line if line.strip() else "")
    assert all(p.text == p.text.strip() for p in parts)
    if "Mr. Smith" in line:
        assert [p.text for p in parts] == ["Mr. Smith met Dr. Jones.", "They talked."]


def test_a_line_past_the_sentence_limit_is_refused():
    with pytest.raises(UserError, match=f"the limit is {LIMITS['sentences']}"):
        sentences.split("Go. " * (LIMITS["sentences"] + 1))


@pytest.mark.parametrize("beam", [1, 5])
def test_a_paragraph_translates_as_its_sentences_do_one_per_line(released, beam):
    model, tokenizer = released
    paragraph = " ".join(SENTENCES[:3]) + "\n\n  " + " ".join(SENTENCES[3:]) + " "
    alone = [h[0][0] for h in inference.translate(model, tokenizer, SENTENCES, beam=beam)]
    got = inference.translate(model, tokenizer, [paragraph, SENTENCES[0]], beam=beam, split="en")
    assert got[0][0][0] == " ".join(alone[:3]) + "\n\n  " + " ".join(alone[3:]) + " "
    assert got[1][0][0] == alone[0]
    whole = inference.translate(model, tokenizer, [paragraph], beam=beam)[0][0][0]
    assert len(whole.split()) < len(got[0][0][0].split())  # unsplit, the model stops early


@pytest.mark.parametrize("beam", [1, 5])
def test_every_output_starts_with_its_prefix(released, beam):
    model, tokenizer = released
    prefixes = ["Deux chiens", "Un homme en chemise", "Les enf", "Où se", "Une dame lit"]
    got = inference.translate(model, tokenizer, SENTENCES, beam=beam, nbest=min(beam, 3), prefixes=prefixes)
    for prefix, hyps in zip(prefixes, got):
        assert all(text.startswith(prefix) for text, _ in hyps), (prefix, hyps)
    assert got[2][0][0].startswith("Les enfants")  # a prefix ending inside a word continues the word


@pytest.mark.parametrize("beam", [1, 5])
def test_a_prefix_of_the_unconstrained_output_leaves_the_rest_unchanged(released, beam):
    model, tokenizer = released
    free = inference.translate(model, tokenizer, SENTENCES, beam=beam)
    for k in (1, 3):
        pieces = [tokenizer.encode([h[0][0]])[0][:k] for h in free]
        prefixes = [tokenizer.sp.decode(p) + " " for p in pieces]  # whole pieces: the next word is free
        forced = inference.translate(model, tokenizer, SENTENCES, beam=beam, prefixes=prefixes)
        assert [h[0][0] for h in forced] == [h[0][0] for h in free], k


def test_prefix_steps_force_pieces_and_complete_the_last_word(released):
    _, tokenizer = released
    pieces = tokenizer.sp.id_to_piece
    steps = inference.prefix_steps(tokenizer, "Deux chie")
    assert [pieces(s[0]) for s in steps[:-1]] == ["\u2581Deux"]
    assert {pieces(i) for i in steps[-1]} >= {"\u2581chien", "\u2581chiens"}
    assert all(pieces(i).startswith("\u2581chie") for i in steps[-1])
    assert [len(s) for s in inference.prefix_steps(tokenizer, "Deux chiens ")] == [1, 1]
    assert inference.prefix_steps(tokenizer, "   ") == []


def test_restricted_keeps_the_allowed_tokens_own_log_probabilities():
    log_probs = torch.log_softmax(torch.randn(4, 10), -1)
    allowed = torch.ones(2, 2, 10, dtype=torch.bool)
    allowed[0, 0] = False
    allowed[0, 0, 3] = True
    rows = torch.tensor([0, 0, 1, 1])
    out = search.restricted(log_probs, allowed, rows, 0, None)
    assert torch.equal(out[:2, 3], log_probs[:2, 3]) and torch.isinf(out[:2, torch.arange(10) != 3]).all()
    assert torch.equal(out[2:], log_probs[2:])
    assert search.restricted(log_probs, allowed, rows, 2, None) is log_probs  # past the allowed steps


def test_word_alignments_aggregate_pieces_into_words():
    attention = inference.Attention(
        torch.tensor([[0.9, 0.05, 0.05, 0.0, 0.0],    # ▁La       -> the
                      [0.0, 0.1, 0.1, 0.7, 0.1],     # ▁voit     -> car
                      [0.0, 0.1, 0.0, 0.8, 0.1],     # ure       -> car
                      [0.0, 0.3, 0.4, 0.2, 0.1],     # ▁rouge    -> re + d (red: 0.7)
                      [0.0, 0.0, 0.0, 0.1, 0.9]]),   # </s>
        ["\u2581the", "\u2581re", "d", "\u2581car", "</s>"], ["\u2581La", "\u2581voit", "ure", "\u2581rouge", "</s>"])
    assert inference.word_alignments(attention) == [(0, 0), (2, 1), (1, 2)]


def test_the_released_model_aligns_a_swapped_adjective(released):
    model, tokenizer = released
    found = inference.translations(model, tokenizer, ["The red car is fast."], beam=5, attention=True)[0]
    assert found.nbest[0][0] == "La voiture rouge est rapide."
    assert {(1, 2), (2, 1), (0, 0)} <= set(inference.word_alignments(found.attention))


def test_the_command_line_splits_prefixes_and_aligns(tmp_path):
    source = tmp_path / "in.en"
    source.write_text("Two dogs play in the snow. A man reads a newspaper.\n\n  The red car is fast.  \n")
    out = run_cli("translate", "-i", source, "--alignments", "--beam", "5").stdout.split("\n")
    assert out[0].startswith("Deux chiens jouent dans la neige. ") and out[0].count(".") == 2
    assert out[1] == "\t" and out[2].startswith("  La voiture rouge est rapide.  \t0-0 2-1 1-2")
    unsplit = run_cli("translate", "--no-split", "Two dogs play in the snow. A man reads a newspaper.").stdout
    assert unsplit.count("\n") == 1
    assert run_cli("translate", "--prefix", "Deux chie", "Two dogs play.").stdout.startswith("Deux chie")
    prefixes = tmp_path / "prefixes.txt"
    prefixes.write_text("Deux\n")
    result = run_cli("translate", "-i", source, "--prefix-file", prefixes)
    assert_one_line_error(result, "prefixes.txt: 1 prefixes for 3 input lines")


def contains(sequence: list[int], phrase: list[int]) -> bool:
    return any(sequence[i : i + len(phrase)] == phrase for i in range(len(sequence) - len(phrase) + 1))


@pytest.mark.parametrize("beam", [2, 4])
def test_constrained_search_ends_only_hypotheses_holding_every_constraint(beam):
    from conftest import random_batch, small_translator
    from seq2seq.tokenizer import BOS, EOS

    model = small_translator(seed=3)
    src, src_len = random_batch(seed=4, batch=4)
    constraints = [[[7, 8]], [[9], [12, 13, 14]], [], [[20]]]
    first = torch.full((4,), BOS)
    with torch.no_grad():
        batched = search.constrained_beam_search(model, model.start(src, src_len), first, 30, beam, constraints, EOS,
                                                 nbest=2)
        for i, hyps in enumerate(batched):
            assert hyps and all(all(contains(h.tokens, c) for c in constraints[i]) for h in hyps), (i, hyps)
            alone = search.constrained_beam_search(model, model.start(src[i : i + 1, : src_len[i]], src_len[i : i + 1]),
                                                   first[:1], 30, beam, [constraints[i]], EOS, nbest=2)[0]
            assert [h.tokens for h in alone] == [h.tokens for h in hyps]  # batched equals one by one
        plain = search.beam_search(model, model.start(src, src_len), first, 30, beam, eos=EOS)
    assert batched[2][0].tokens == plain[2][0].tokens  # no constraints: the plain beam search's choice


def test_a_glossary_puts_its_terms_in_fluent_places(released):
    model, tokenizer = released
    lines = ["Two dogs play in the snow.", "A man rides a bicycle down the street.", "The children are playing.",
             "Where is the train station?"]
    glossary = {"play": "s'amusent", "bicycle": "bicyclette", "children": "gamins", "nowhere": "nulle part"}
    got = inference.translate(model, tokenizer, lines, beam=5, nbest=2, glossary=glossary)
    assert got[0][0][0] == "Deux chiens s'amusent dans la neige."
    assert got[1][0][0] == "Un homme fait de la bicyclette dans la rue."
    assert all("gamins" in text for text, _ in got[2])
    assert got[3][0][0] == inference.translate(model, tokenizer, lines[3:], beam=5)[0][0][0]  # no term in it
    composed = inference.translate(model, tokenizer, ["Two dogs play in the snow. The children are playing."], beam=5,
                                   nbest=3, split="en", prefixes=["Deux chiens"], glossary=glossary)[0]
    assert all(t.startswith("Deux chiens") and "s'amusent" in t and "gamins" in t for t, _ in composed)


def test_terms_are_not_glued_onto_longer_words(released):
    model, tokenizer = released
    text = inference.translate(model, tokenizer, ["A man is cutting branches off other trees."], beam=5,
                               glossary={"trees": "arbre"})[0][0][0]
    assert re.search(r"(?<!\w)arbre(?!\w)", text), text


def test_glossary_and_constraints_on_the_command_line(tmp_path):
    glossary = tmp_path / "terms.tsv"
    glossary.write_text("# source<TAB>target\nbicycle\tbicyclette\n")
    out = run_cli("translate", "--glossary", glossary, "--constraint", "play=s'amusent", "--beam", "5",
                  "A man rides a bicycle.", "Two dogs play in the snow.").stdout.splitlines()
    assert "bicyclette" in out[0] and "s'amusent" in out[1]
    glossary.write_text("bicycle bicyclette\n")
    assert_one_line_error(run_cli("translate", "--glossary", glossary, "Hi."), "terms.tsv:1: expected a source term")

