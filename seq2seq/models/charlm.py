"""Character-level recurrent language model."""
from __future__ import annotations

import torch
from torch import nn

from seq2seq.config import CharLMModel
from seq2seq.models.rnn import Dropout, Hidden, make_rnn, select_rows


class CharLM(nn.Module):
    def __init__(self, cfg: CharLMModel, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(vocab_size, cfg.emb_dim)
        self.rnn = make_rnn(cfg.cell, cfg.emb_dim, cfg.hidden, cfg.layers, cfg.dropout, forget_bias=cfg.forget_bias,
                            chrono_horizon=cfg.chrono_horizon)
        # Tying needs the projection's input to have the embedding's size.
        self.bottleneck = nn.Linear(cfg.hidden, cfg.emb_dim) if cfg.tie_embeddings and cfg.hidden != cfg.emb_dim else None
        self.out = nn.Linear(cfg.emb_dim if self.bottleneck else cfg.hidden, vocab_size)
        if cfg.tie_embeddings:
            self.out.weight = self.embed.weight
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, hidden: Hidden | None = None) -> tuple[torch.Tensor, Hidden]:
        """Logits (B, T, V) for inputs (B, T), and the state after the last input."""
        out, hidden = self.rnn(self.dropout(self.embed(x)), hidden)
        out = self.dropout(out)
        if self.bottleneck is not None:
            out = self.bottleneck(out)
        return self.out(out), hidden

    # -- the decoding interface of seq2seq.search ------------------------------------------
    def start(self, prompt: torch.Tensor) -> dict:
        """State after reading all but the last prompt character; that one is the first step's input."""
        hidden = None
        if prompt.size(1) > 1:
            _, hidden = self.forward(prompt[:, :-1])
        return {"hidden": hidden}

    def step(self, tokens: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """Next-character logits (N, V) for tokens (N,)."""
        out, hidden = self.rnn.step(self.dropout(self.embed(tokens)), state["hidden"])
        out = self.dropout(out)
        if self.bottleneck is not None:
            out = self.bottleneck(out)
        return self.out(out), {"hidden": hidden}

    @staticmethod
    def reorder_state(state: dict, rows: torch.Tensor, sentences: torch.Tensor | None = None) -> dict:
        hidden = state["hidden"]
        return {"hidden": None if hidden is None else select_rows(hidden, rows)}
