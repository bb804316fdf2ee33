"""Config.validate: every setting checked when a config is read, the error naming section and key."""
import pytest

from seq2seq.config import load_preset, preset_names
from seq2seq.errors import UserError


def test_every_shipped_preset_is_valid():
    for name in preset_names():
        kind = ("charlm" if name in ("tiny-charlm", "tinyshakespeare") else
                "classifier" if name in ("tiny-classifier", "sst2", "sst2-lm") else "translator")
        assert load_preset(name, kind).kind == kind


@pytest.mark.parametrize("override, message", [
    ("model.cell=lstmm", "[model] cell: must be one of lstm, gru, rnn, got 'lstmm'"),
    ("model.attention=luong", "[model] attention: must be one of dot, general, additive, got 'luong'"),
    ("model.dropout=1.0", "[model] dropout: must be in [0.0, 1.0), got 1.0"),
    ("model.enc_layers=0", "[model] enc_layers: must be at least 1, got 0"),
    ("model.dec_hidden=100", None),  # general attention: any sizes
    ("data.format=csv", "[data] format: a translator reads parallel, tsv, hf, got 'csv'"),
    ("data.format=xml", "[data] format: must be one of parallel, tsv, csv, jsonl, hf, got 'xml'"),
    ("data.vocab_size=2", "[data] vocab_size: must be at least 8, got 2"),
    ("train.lr_schedule=linear", "[train] lr_schedule: must be one of cosine, plateau, constant, got 'linear'"),
    ("train.label_smoothing=-0.1", "[train] label_smoothing: must be in [0.0, 1.0), got -0.1"),
    ("train.max_epochs=0", "[train] max_epochs: must be at least 1, got 0"),
    ("train.dev_beam=100", "[train] dev_beam: must be in [1, 64], got 100"),
])
def test_a_bad_setting_is_refused_when_the_config_is_read(override, message):
    if message is None:
        assert load_preset("tiny-en-fr", "translator", [override]).model.dec_hidden == 100
        return
    with pytest.raises(UserError) as error:
        load_preset("tiny-en-fr", "translator", [override])
    assert str(error.value) == f"preset tiny-en-fr {message}"


def test_dot_attention_needs_matching_sizes():
    with pytest.raises(UserError, match=r"dot attention needs dec_hidden \(100\) == 2 \* enc_hidden \(128\)"):
        load_preset("tiny-en-fr", "translator", ["model.attention=dot", "model.dec_hidden=100"])
