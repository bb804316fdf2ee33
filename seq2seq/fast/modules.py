"""The modules a decoding twin is made of, and the function that builds the twin."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from seq2seq.fast.kernels import (Int8Linear, PackedLinear, pack_lstm, packed, packed_bidirectional_lstm,
                                  packed_lstm_step, sigmoid_tanh)


PACKED_ROWS_FROM = 8  # sentences in a batch from which a shortlist's output rows are packed


class FastLinear(nn.Module):
    """An nn.Linear on packed (or int8) weights."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, int8: bool):
        super().__init__()
        self.pack = Int8Linear if int8 else (lambda w, b: PackedLinear(w, b, dtype))
        self.plain = [linear]  # a list: the twin holds no parameters of its own
        self.kernel = packed(linear, (dtype, int8), lambda: self.pack(linear.weight, linear.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x)

    def rows(self, ids: torch.Tensor, sentences: int):
        """A kernel for the output rows `ids` alone (a vocabulary shortlist) for a batch of
        `sentences`: packed now where the batch is large enough to repay it (packing the rows costs
        the time of ~10 products of one sentence in fp32, of ~250 in int8), else a plain fp32
        product on the selected rows."""
        linear = self.plain[0]
        weight, bias = linear.weight.index_select(0, ids), None if linear.bias is None else linear.bias[ids]
        if sentences >= PACKED_ROWS_FROM:
            return self.pack(weight, bias)
        return lambda x: nn.functional.linear(x.float(), weight, bias)


class FastLSTM(nn.Module):
    """An LSTM whose step (one-way) or whole packed sequence from zero states (bidirectional) runs
    on packed weights; anything else runs the plain module."""

    def __init__(self, lstm: nn.LSTM, dtype: torch.dtype, int8: bool):
        super().__init__()
        pack = Int8Linear if int8 else (lambda w, b: PackedLinear(w, b, dtype))
        self.plain = [lstm]  # a list: the twin holds no parameters of its own
        self.layers = packed(lstm, (dtype, int8), lambda: pack_lstm(lstm, pack))

    def forward(self, x, hidden=None):
        lstm = self.plain[0]
        # one sequence: oneDNN's LSTM primitive runs it whole, at twice the speed of a step loop
        if lstm.bidirectional and isinstance(x, PackedSequence) and hidden is None and int(x.batch_sizes[0]) > 1:
            return packed_bidirectional_lstm(self.layers, x)
        return lstm(x, hidden)

    def step(self, x: torch.Tensor, hidden):
        lstm = self.plain[0]
        if hidden is None:
            zeros = x.new_zeros(lstm.num_layers, x.size(0), lstm.hidden_size, dtype=torch.float32)
            hidden = (zeros, zeros)
        return packed_lstm_step(self.layers, x, hidden)


class SigmoidTanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sigmoid_tanh(x)


def twin(module: nn.Module, dtype: torch.dtype, int8: bool) -> nn.Module:
    """`module` with its linear layers, LSTMs and tanh modules replaced by the fast ones above:
    a shallow copy of each module on the way to a replaced one, the rest shared."""
    if isinstance(module, nn.Linear):
        return FastLinear(module, dtype, int8)
    if isinstance(module, nn.LSTM) and module.proj_size == 0:
        return FastLSTM(module, dtype, int8)
    if isinstance(module, nn.Tanh):
        return SigmoidTanh()
    children = {name: twin(child, dtype, int8) for name, child in module._modules.items()}
    if all(children[name] is child for name, child in module._modules.items()):
        return module
    copied = copy.copy(module)
    copied._modules = children
    return copied
