"""The vocabulary shortlist: what it keeps for a corpus, and decoding over it."""
from pathlib import Path

import pytest
import torch

from seq2seq import checkpoint, inference, search
from seq2seq.device import Precision
from seq2seq.fast import for_decoding
from seq2seq.models.translator import SHORTLIST_ROWS_BELOW
from seq2seq.shortlist import FILE, Shortlist
from conftest import random_batch, small_translator
from test_search import EOS, translator_start

pytestmark = pytest.mark.every_cpu  # run again by CI under emulated older CPUs


def test_each_source_piece_keeps_its_target_pieces_by_dice():
    """Piece 5 occurs in two pairs, both with 10 (Dice 1) and one with 11 (2 * 1 / (2 + 1)), never
    with 12; the frequent list holds the specials and the target pieces in the most pairs."""
    src = [[5, 6], [5, 7], [8], [9]]
    tgt = [[10, 11], [10], [12], [12, 12]]
    shortlist = Shortlist.build(src, tgt, vocab_size=13, specials=[3], per_piece=3, frequent=1)
    assert shortlist.candidates[5].tolist() == [10, 11, -1]
    assert shortlist.candidates[8].tolist() == [12, -1, -1]
    assert shortlist.candidates[4].tolist() == [-1, -1, -1]  # never seen
    assert shortlist.frequent.tolist() == [3, 10]  # 10 and 12 in two pairs each: the first kept
    # a sentence's list: the frequent, its own pieces (copied names and numbers) and their candidates
    assert [ids.tolist() for ids in shortlist.ids(torch.tensor([[5, 8, 0], [9, 0, 0]]))] == \
           [[3, 5, 8, 10, 11, 12], [3, 9, 10, 12]]  # padding is no piece of the sentence


def test_a_shortlist_round_trips_through_its_file(tmp_path):
    shortlist = Shortlist.build([[4, 5], [6]], [[7], [8, 9]], vocab_size=10, specials=[3], per_piece=2, frequent=2)
    shortlist.save(tmp_path)
    again = Shortlist.load(tmp_path)
    assert torch.equal(again.candidates, shortlist.candidates) and torch.equal(again.frequent, shortlist.frequent)
    assert Shortlist.load(tmp_path / "elsewhere") is None


def whole_vocabulary(vocab: int) -> Shortlist:
    return Shortlist(torch.full((vocab, 1), -1), torch.arange(vocab))


@pytest.mark.parametrize("precision", [None, Precision(bf16=False)])
def test_a_shortlist_of_the_whole_vocabulary_decodes_as_none(precision):
    """The masking and the column-to-token mapping change nothing when every piece is listed:
    greedy and beam search give the same tokens and scores, on the model and its decoding twin."""
    model = small_translator(seed=41)
    src, src_len = random_batch(seed=42, batch=9)
    net = model if precision is None else for_decoding(model, precision)
    with torch.no_grad():
        plain_greedy = search.greedy(net, *translator_start(net, src, src_len), eos=EOS)
        plain_beam = search.beam_search(net, *translator_start(net, src, src_len), beam_size=3, eos=EOS, nbest=2)
        model.shortlist = whole_vocabulary(40)
        greedy = search.greedy(net, *translator_start(net, src, src_len), eos=EOS)
        beam = search.beam_search(net, *translator_start(net, src, src_len), beam_size=3, eos=EOS, nbest=2)
    assert [(h.tokens, round(h.score, 4)) for h in greedy] == [(h.tokens, round(h.score, 4)) for h in plain_greedy]
    assert [[(h.tokens, round(h.score, 4)) for h in hyps] for hyps in beam] == \
           [[(h.tokens, round(h.score, 4)) for h in hyps] for hyps in plain_beam]


def test_each_sentence_decodes_over_its_own_list_alone_or_batched():
    """Outputs hold only the sentence's own pieces, and a sentence translates alike alone and
    batched with others (whose lists widen the batch's union)."""
    model = small_translator(seed=43)
    g = torch.Generator().manual_seed(44)
    model.shortlist = Shortlist(torch.randint(4, 40, (40, 3), generator=g), torch.tensor([3]))
    src, src_len = random_batch(seed=45, batch=8)
    allowed = model.shortlist.ids(src)
    with torch.no_grad():
        batched = search.beam_search(model, *translator_start(model, src, src_len), beam_size=3, eos=EOS)
        few = search.beam_search(model, *translator_start(model, src[:3], src_len[:3]), beam_size=3, eos=EOS)
        greedy = search.greedy(model, *translator_start(model, src, src_len), eos=EOS)
        alone = [search.beam_search(model, *translator_start(model, src[i : i + 1, : src_len[i]], src_len[i : i + 1]),
                                    beam_size=3, eos=EOS)[0] for i in range(8)]
    # 8 sentences compute the whole layer, 3 the union of their lists, 1 its own list
    assert SHORTLIST_ROWS_BELOW in (4, 5, 6, 7, 8)
    for i in range(8):
        assert set(batched[i][0].tokens) <= set(allowed[i].tolist()) and set(greedy[i].tokens) <= set(allowed[i].tolist())
        assert batched[i][0].tokens == alone[i][0].tokens
        assert batched[i][0].score == pytest.approx(alone[i][0].score, abs=1e-4)
        if i < 3:
            assert few[i][0].tokens == alone[i][0].tokens and few[i][0].score == pytest.approx(alone[i][0].score, abs=1e-4)
    model.shortlist = None
    with torch.no_grad():
        unlisted = search.greedy(model, *translator_start(model, src, src_len), eos=EOS)
    assert any(set(h.tokens) - set(allowed[i].tolist()) for i, h in enumerate(unlisted))  # the lists bind


def test_the_released_translator_carries_its_shortlist():
    """checkpoints/en-fr ships a shortlist; a one-sentence call decodes over a fraction of the vocabulary."""
    folder = Path(__file__).resolve().parent.parent / "checkpoints" / "en-fr"
    _, model, tokenizer = checkpoint.load(folder)
    assert (folder / FILE).is_file() and model.shortlist is not None
    src = torch.tensor(tokenizer.encode(["A man rides a bicycle down the street."]))
    ids = model.shortlist.ids(src)[0]
    assert 500 < ids.numel() < len(tokenizer) / 3
    assert inference.translate(model, tokenizer, ["A man rides a bicycle."], beam=5)[0][0][0].startswith("Un homme")


def test_a_shortlist_of_another_vocabulary_is_refused_in_one_line(tiny_translator_folder, tmp_path):
    import shutil

    from seq2seq.errors import UserError

    folder = tmp_path / "model"
    shutil.copytree(tiny_translator_folder, folder)
    assert (folder / FILE).is_file()  # training wrote the folder's own
    checkpoint.load(folder)
    Shortlist(torch.full((7, 2), -1), torch.tensor([3])).save(folder)
    with pytest.raises(UserError, match=r"shortlist.safetensors: built for a vocabulary of 7 pieces, the model has \d+"):
        checkpoint.load(folder)
