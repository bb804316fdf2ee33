"""How gradients travel back through time in the project's recurrent cells.

The measurements behind `scripts/gradient_flow.py`: a long-range recall task, a small model
built on the same cells as the translator and the character model (`models.rnn.make_rnn`),
and ||dL/dh_t||, the norm of the loss gradient with respect to each hidden state.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from seq2seq.config import CharLMModel
from seq2seq.models.rnn import make_rnn


def recall_batch(length: int, batch: int, symbols: int, distractors: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The recall task: a symbol, `length - 2` distractors, then a query mark; the answer is the
    symbol, seen `length - 1` steps before the model must give it. Token ids: symbols
    0..symbols-1, distractors after them, the query mark last."""
    x = torch.randint(symbols, symbols + distractors, (batch, length), generator=generator)
    y = torch.randint(0, symbols, (batch,), generator=generator)
    x[:, 0] = y
    x[:, -1] = symbols + distractors
    return x, y


class RecallModel(nn.Module):
    """Embedding, one recurrent layer of the given cell, and a classifier on the last state."""

    def __init__(self, cell: str, hidden: int, symbols: int, distractors: int, emb_dim: int = 32,
                 forget_bias: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(symbols + distractors + 1, emb_dim)
        self.rnn = make_rnn(cell, emb_dim, hidden, layers=1, dropout=0.0, forget_bias=forget_bias)
        self.out = nn.Linear(hidden, symbols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.out(out[:, -1])

    def hidden_grad_norms(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """||dL/dh_t|| for t = 1..T (a (T,) float64 tensor; norm over the batch and the units), L
        the mean cross-entropy of the answers. A float64 copy of the model unrolls the same
        weights one step at a time so that each h_t is a tensor of its own: the total derivative
        reaches it through every later step (and, for an LSTM, through the cell state). float64
        because over 100 steps a plain RNN's gradient falls below float32's smallest number."""
        model = copy.deepcopy(self).double()
        emb = model.embed(x)
        zeros = emb.new_zeros(1, x.size(0), model.rnn.hidden_size)
        hidden, states = ((zeros, zeros) if isinstance(model.rnn, nn.LSTM) else zeros), []
        for t in range(x.size(1)):
            out, hidden = model.rnn.step(emb[:, t], hidden)
            out.retain_grad()
            states.append(out)
        loss = nn.functional.cross_entropy(model.out(states[-1]), y)
        loss.backward()
        return torch.stack([h.grad.norm() for h in states]).detach()


def scale_recurrent_weights(rnn: nn.RNNBase, gain: float) -> None:
    """Orthogonal recurrent weights times `gain`: above 1 a tanh RNN's gradients can explode."""
    with torch.no_grad():
        for name, param in rnn.named_parameters():
            if name.startswith("weight_hh"):
                nn.init.orthogonal_(param, gain=gain)


def saved_activation_bytes(fn, model: nn.Module) -> tuple[object, int]:
    """Run fn() and measure the memory autograd keeps alive for the backward pass: each storage
    it saves counted once, the model's own weights not at all. This is what truncated
    backpropagation through time bounds."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(kept.values())


def small_charlm_config(cell: str = "lstm", hidden: int = 256) -> CharLMModel:
    return CharLMModel(cell=cell, emb_dim=64, hidden=hidden, layers=1, dropout=0.0, tie_embeddings=False)
