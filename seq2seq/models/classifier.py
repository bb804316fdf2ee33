"""Many-to-one: a recurrent encoder read into one vector by pooling over time, then a class; and
the same embedding and encoder pretrained as a language model (`EncoderLM`) to start one from."""
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
        self.embed, self.encoder = embedding_and_encoder(cfg, vocab_size)
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


def embedding_and_encoder(cfg: ClassifierModel, vocab_size: int) -> tuple[nn.Embedding, nn.Module]:
    embed = nn.Embedding(vocab_size, cfg.emb_dim, padding_idx=PAD)
    encoder = make_rnn(cfg.cell, cfg.emb_dim, cfg.hidden, cfg.layers, cfg.dropout, bidirectional=cfg.bidirectional,
                       forget_bias=cfg.forget_bias, chrono_horizon=cfg.chrono_horizon)
    return embed, encoder


class EncoderLM(nn.Module):
    """The classifier's embedding and encoder trained as a language model (`model.head = "lm"`):
    the forward direction's state at each word predicts the next word, the backward direction's
    the word before, as ELMo's and ULMFiT's encoders are pretrained; `--init-from` then hands
    them to a classifier. One layer when bidirectional: a second would read both directions'
    states, the next word among them. The softmax is adaptive (Grave et al. 2017): the most
    frequent eighth of the pieces at full width, the rest in two narrower clusters, since a full
    softmax over the vocabulary costs several times the recurrent layer."""

    def __init__(self, cfg: ClassifierModel, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.embed, self.encoder = embedding_and_encoder(cfg, vocab_size)
        self.dropout = Dropout(cfg.dropout)
        # SentencePiece numbers pieces by score, so the low ids are the frequent ones; the clusters
        # are a quarter and a sixteenth as wide, where that leaves them a width at all
        self.lm = nn.AdaptiveLogSoftmaxWithLoss(cfg.hidden, vocab_size, [vocab_size // 8, vocab_size * 3 // 8],
                                                div_value=4.0 if cfg.hidden >= 16 else 1.0)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) padded ids and their lengths -> (summed negative log-likelihood in nats, words
        predicted): each direction predicts every word but its first."""
        packed = pack_padded_sequence(self.dropout(self.embed(ids)), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        outputs, _ = self.encoder(packed)
        outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=ids.size(1))
        outputs, h = self.dropout(outputs), self.cfg.hidden
        has_next = torch.arange(1, ids.size(1), device=ids.device) < lengths.to(ids.device)[:, None]
        states, targets = [outputs[:, :-1, :h][has_next]], [ids[:, 1:][has_next]]
        if self.cfg.bidirectional:  # the backward state at word t + 1 has read from the end back to it
            states.append(outputs[:, 1:, h:][has_next])
            targets.append(ids[:, :-1][has_next])
        states, targets = torch.cat(states).float(), torch.cat(targets)
        loss = self.lm(states, targets).loss * len(targets)
        # a tail cluster no target of the batch falls in gets no gradient, and several processes
        # (DistributedDataParallel) expect one for every parameter: a zero one keeps them in step
        loss = loss + 0.0 * sum(p.sum() for p in self.lm.tail.parameters())
        return loss, torch.tensor(len(targets))
