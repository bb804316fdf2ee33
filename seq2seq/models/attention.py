"""Attention over encoder states for all decoder steps at once (one batched matmul)."""
from __future__ import annotations

import torch
from torch import nn

from seq2seq.errors import UserError

ATTENTIONS = ("dot", "general", "additive")


class Attention(nn.Module):
    """Luong dot / general and Bahdanau additive scores; padded source positions are masked.

    `keys` depends only on the source, so search computes it once per sentence, not per step.
    """

    def __init__(self, kind: str, query_size: int, memory_size: int, additive_size: int = 256):
        super().__init__()
        if kind not in ATTENTIONS:
            raise UserError(f"model.attention must be one of {', '.join(ATTENTIONS)}, got {kind!r}")
        if kind == "dot" and query_size != memory_size:
            raise UserError(f"dot attention needs dec_hidden ({query_size}) == 2 * enc_hidden ({memory_size})")
        self.kind = kind
        if kind == "general":
            self.key_proj = nn.Linear(memory_size, query_size, bias=False)
        elif kind == "additive":
            self.key_proj = nn.Linear(memory_size, additive_size, bias=False)
            self.query_proj = nn.Linear(query_size, additive_size, bias=False)
            self.energy = nn.Linear(additive_size, 1, bias=False)

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        return memory if self.kind == "dot" else self.key_proj(memory)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query (B, T, Q), keys (B, S, K), memory (B, S, M), mask (B, S) true at real tokens
        -> context (B, T, M), weights (B, T, S)."""
        if self.kind == "additive":
            scores = self.energy(torch.tanh(self.query_proj(query).unsqueeze(2) + keys.unsqueeze(1))).squeeze(-1)
        else:
            scores = torch.bmm(query, keys.transpose(1, 2))
        scores = scores.float().masked_fill(~mask.unsqueeze(1), float("-inf"))
        weights = scores.softmax(-1)
        context = torch.bmm(weights.to(memory.dtype), memory)
        return context, weights
