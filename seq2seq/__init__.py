"""seq2seq: recurrent sequence models (LSTM translation with attention, character LSTM LM)."""

__version__ = "0.1.0"
