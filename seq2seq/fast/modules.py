"""The modules a decoding twin is made of, and the function that builds the twin."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from seq2seq.fast.kernels import (Int8Linear, PackedLinear, pack_lstm, packed, packed_bidirectional_lstm,
                                  packed_lstm_step, sigmoid_tanh)


class FastLinear(nn.Module):
    """An nn.Linear on packed (or int8) weights."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, int8: bool):
        super().__init__()
        pack = Int8Linear if int8 else (lambda w, b: PackedLinear(w, b, dtype))
        self.plain = [linear]  # a list: the twin holds no parameters of its own
        self.kernel = packed(linear, (dtype, int8), lambda: pack(linear.weight, linear.bias))

    @property
    def weight(self) -> torch.Tensor:  # the module's own, for a caller that selects rows (a shortlist)
        return self.plain[0].weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.plain[0].bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x)


class FastLSTM(nn.Module):
    """An LSTM whose step (one-way) or whole packed sequence from zero states (bidirectional) runs
    on packed weights; anything else runs the plain module."""

    def __init__(self, lstm: nn.LSTM, dtype: torch.dtype, int8: bool):
        super().__init__()
        pack = Int8Linear if int8 else (lambda w, b: PackedLinear(w, b, dtype))
        self.plain = [lstm]  # a list: the twin holds no parameters of its own
        self.bf16, self.int8 = dtype == torch.bfloat16, int8
        self.layers = packed(lstm, (dtype, int8), lambda: pack_lstm(lstm, pack))

    def forward(self, x, hidden=None):
        lstm = self.plain[0]
        if lstm.bidirectional and isinstance(x, PackedSequence) and hidden is None and self.loop(x):
            return packed_bidirectional_lstm(self.layers, x)
        # else the plain module, in bf16 where the twin is
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out, hidden = lstm(x, hidden)
        out = out._replace(data=out.data.float()) if isinstance(out, PackedSequence) else out.float()
        return out, tuple(h.float() for h in hidden)

    def loop(self, x: PackedSequence) -> bool:
        """Whether a packed batch runs the step loop on packed weights rather than oneDNN's LSTM
        primitive: always in int8; in fp32 from two sequences (one runs whole in the primitive,
        faster than the loop); never in bf16, where the primitive is as fast for a large batch and
        faster for one, and a sentence then reads alike alone and batched (docs/performance.md)."""
        return self.int8 or (not self.bf16 and int(x.batch_sizes[0]) > 1)

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
