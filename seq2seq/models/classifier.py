"""Many-to-one: a recurrent encoder read into one vector by pooling over time, then a class."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seq2seq.config import ClassifierModel
from seq2seq.models.rnn import Dropout, make_rnn
from seq2seq.tokenizer import PAD


class Classifier(nn.Module):
    """embedding -> dropout -> (bi)directional recurrent encoder -> pooling -> dropout -> linear.
    The embedding and encoder carry the translator's names (`embed`, `encoder`), so a
    translator's encoder loads into them."""

    def __init__(self, cfg: ClassifierModel, vocab_size: int, classes: int):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(vocab_size, cfg.emb_dim, padding_idx=PAD)
        self.encoder = make_rnn(cfg.cell, cfg.emb_dim, cfg.hidden, cfg.layers, cfg.dropout,
                                bidirectional=cfg.bidirectional, forget_bias=cfg.forget_bias,
                                chrono_horizon=cfg.chrono_horizon)
        self.dropout = Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.hidden * (2 if cfg.bidirectional else 1), classes)
        if cfg.freeze_encoder:  # features from a translator's encoder, as CoVe uses them
            self.embed.requires_grad_(False)
            self.encoder.requires_grad_(False)

    def features(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T) padded ids and their lengths -> (B, F) pooled features. Padding never reaches
        a result: the encoder reads packed sequences and pooling masks the padded steps."""
        packed = pack_padded_sequence(self.dropout(self.embed(ids)), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        outputs, hidden = self.encoder(packed)
        if self.cfg.pooling == "last":
            h = hidden[0] if isinstance(hidden, tuple) else hidden  # (layers * directions, B, H)
            directions = 2 if self.cfg.bidirectional else 1
            return torch.cat(list(h[-directions:]), dim=-1)  # the last layer: forward's end, backward's start
        outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=ids.size(1))
        valid = (torch.arange(ids.size(1), device=ids.device) < lengths.to(ids.device)[:, None]).unsqueeze(-1)
        if self.cfg.pooling == "mean":
            return (outputs * valid).sum(1) / lengths.to(outputs.device, outputs.dtype)[:, None]
        return outputs.masked_fill(~valid, float("-inf")).amax(1)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(self.features(ids, lengths)))
