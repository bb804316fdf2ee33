"""The recurrent cell choice shared by both models: lstm | gru | rnn."""
from __future__ import annotations

import torch
from torch import nn

from seq2seq.errors import UserError

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}

Hidden = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def make_rnn(cell: str, input_size: int, hidden_size: int, layers: int, dropout: float,
             bidirectional: bool = False) -> nn.RNNBase:
    if cell not in CELLS:
        raise UserError(f"model.cell must be one of {', '.join(CELLS)}, got {cell!r}")
    return CELLS[cell](input_size, hidden_size, num_layers=layers, batch_first=True,
                       dropout=dropout if layers > 1 else 0.0, bidirectional=bidirectional)


def select_rows(hidden: Hidden, index: torch.Tensor) -> Hidden:
    """Pick batch rows of an RNN state ((layers, batch, size), or an LSTM's pair of them)."""
    if isinstance(hidden, tuple):
        return tuple(h.index_select(1, index) for h in hidden)
    return hidden.index_select(1, index)


def detach(hidden: Hidden) -> Hidden:
    if isinstance(hidden, tuple):
        return tuple(h.detach() for h in hidden)
    return hidden.detach()


class Dropout(nn.Module):
    """Inverted dropout whose mask comes from rand_like: on CPU about twice as fast as
    nn.Dropout's bernoulli_, and dropout masks were a tenth of a training step."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * ((torch.rand_like(x) >= self.p) * (1 / (1 - self.p))).to(x.dtype)
