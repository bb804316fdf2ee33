"""LSTM encoder-decoder with attention (Luong-style attentional output layer)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seq2seq.config import TranslatorModel
from seq2seq.models.attention import Attention
from seq2seq.models.rnn import Dropout, make_rnn, select_rows
from seq2seq.tokenizer import PAD

# Below this many sentences a shortlist's rows of the output layer are selected for the batch;
# from it the whole packed layer computes, which per-batch packing of the rows would not repay.
SHORTLIST_ROWS_BELOW = 8


class Translator(nn.Module):
    """Embeddings are shared by source and target (the vocabulary is joint) and, with
    `tie_embeddings`, by the output projection: the attentional layer outputs `emb_dim` values
    for that reason."""

    def __init__(self, cfg: TranslatorModel, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        memory_size = 2 * cfg.enc_hidden
        self.embed = nn.Embedding(vocab_size, cfg.emb_dim, padding_idx=PAD)
        self.encoder = make_rnn(cfg.cell, cfg.emb_dim, cfg.enc_hidden, cfg.enc_layers, cfg.dropout, bidirectional=True,
                               forget_bias=cfg.forget_bias, chrono_horizon=cfg.chrono_horizon)
        self.bridge = nn.Linear(memory_size, cfg.dec_layers * cfg.dec_hidden)
        decoder_input = cfg.emb_dim * (2 if cfg.input_feeding else 1)
        self.decoder = make_rnn(cfg.cell, decoder_input, cfg.dec_hidden, cfg.dec_layers, cfg.dropout,
                                forget_bias=cfg.forget_bias, chrono_horizon=cfg.chrono_horizon)
        self.attention = Attention(cfg.attention, cfg.dec_hidden, memory_size)
        self.combine = nn.Linear(memory_size + cfg.dec_hidden, cfg.emb_dim, bias=False)
        self.squash = nn.Tanh()  # the attentional layer's nonlinearity: a module, so fast decoding can swap it
        self.out = nn.Linear(cfg.emb_dim, vocab_size)
        if cfg.tie_embeddings:
            self.out.weight = self.embed.weight
        self.dropout = Dropout(cfg.dropout)
        self.shortlist = None  # a model folder's `seq2seq.shortlist.Shortlist`, which decoding scores over

    # state entries that belong to the whole batch, not to its sentences or rows
    BATCH_KEYS = ("output_ids", "output")

    # -- encoder ---------------------------------------------------------------------------
    def start(self, src: torch.Tensor, src_len: torch.Tensor, keep: torch.Tensor | None = None) -> dict:
        """Encode a padded batch (B, S); the returned state feeds `step` and the search. `keep`
        (B, vocabulary; bool): target pieces a shortlist must leave each sentence."""
        emb = self.dropout(self.embed(src))
        packed = pack_padded_sequence(emb, src_len.cpu(), batch_first=True, enforce_sorted=False)
        packed_out, final = self.encoder(packed)
        memory, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=src.size(1))
        memory = memory.contiguous()  # batch_first here is a transposed view, and bmm prefers rows in order
        final_h = final[0] if isinstance(final, tuple) else final
        last_layer = torch.cat([final_h[-2], final_h[-1]], dim=-1)  # forward and backward of the top layer
        h0 = torch.tanh(self.bridge(last_layer)).view(src.size(0), self.cfg.dec_layers, self.cfg.dec_hidden)
        h0 = h0.transpose(0, 1).contiguous()
        hidden = (h0, h0) if self.cfg.cell == "lstm" else h0
        memory = self.dropout(memory)
        keys = self.attention.keys(memory)
        if torch.is_autocast_enabled(memory.device.type):
            # a packed encoder or int8 key projection returns fp32: cast once here, not in every step's bmm
            dtype = torch.get_autocast_dtype(memory.device.type)
            memory, keys = memory.to(dtype), keys.to(dtype)
        state = {"hidden": hidden, "memory": memory, "keys": keys, "mask": src != PAD}
        if self.cfg.input_feeding:
            state["feed"] = memory.new_zeros(src.size(0), self.cfg.emb_dim)
        if self.shortlist is not None and not self.training:
            ids, bias = self.shortlist.restrict(src, columns=src.size(0) < SHORTLIST_ROWS_BELOW, extra=keep)
            if ids is not None:
                state["output_ids"], state["output"] = ids, self._output_rows(ids)
            if bias is not None:
                state["output_bias"] = bias
        return state

    def _output_rows(self, ids: torch.Tensor):
        """The output layer cut to the target pieces `ids`: a plain fp32 product on the selected rows."""
        weight, bias = self.out.weight.index_select(0, ids), self.out.bias.index_select(0, ids)
        return lambda x: nn.functional.linear(x.float(), weight, bias)

    # -- decoder ---------------------------------------------------------------------------
    def _attend(self, dec_out: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        context, weights = self.attention(dec_out, state["keys"], state["memory"], state["mask"])
        return self.squash(self.combine(torch.cat([context, dec_out], dim=-1))), weights

    def step(self, tokens: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """One decoder step for tokens (B,) -> logits (B, V) and the next state; with a shortlist,
        over `state["output_ids"]` where a few sentences compute only those columns."""
        x = self.dropout(self.embed(tokens))
        if self.cfg.input_feeding:
            x = torch.cat([x, state["feed"].to(x.dtype)], dim=-1)
        dec_out, hidden = self.decoder.step(x, state["hidden"])
        # rows may be a sentence's K beams: they attend to its one copy of the encoder states together
        sentences = state["memory"].size(0)
        attentional, _ = self._attend(dec_out.view(sentences, dec_out.size(0) // sentences, -1), state)
        attentional = attentional.view(dec_out.size(0), -1)
        state = dict(state, hidden=hidden)
        if self.cfg.input_feeding:
            state["feed"] = attentional
        logits = state.get("output", self.out)(self.dropout(attentional))
        if "output_bias" in state:  # each sentence's own shortlist (-inf elsewhere), for all its rows
            bias = state["output_bias"]
            logits = logits.view(sentences, -1, bias.size(1)).add_(bias.unsqueeze(1)).view(dec_out.size(0), -1)
        return logits, state

    @staticmethod
    def reorder_state(state: dict, rows: torch.Tensor, sentences: torch.Tensor | None = None) -> dict:
        """Decoder rows by `rows`; the encoder states, one copy per sentence, by `sentences`
        (None: the sentences are unchanged, as when a sentence's beams are reordered)."""
        out = {}
        for key, value in state.items():
            if key == "hidden":
                out[key] = select_rows(value, rows)
            elif key == "feed":
                out[key] = value.index_select(0, rows)
            elif key in Translator.BATCH_KEYS:
                out[key] = value
            else:
                out[key] = value if sentences is None else value.index_select(0, sentences)
        return out

    def attention_weights(self, state: dict, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced attention weights (B, T, S) for the decoder inputs tgt_in, from a `start`
        state (the one a search began with); without input feeding in one decoder call and
        without the output layer."""
        if not self.cfg.input_feeding:
            dec_out, _ = self.decoder(self.embed(tgt_in), state["hidden"])
            return self._attend(dec_out, state)[1]
        weights = []
        hook = self.attention.register_forward_hook(lambda module, inputs, output: weights.append(output[1]))
        try:
            for t in range(tgt_in.size(1)):
                _, state = self.step(tgt_in[:, t], state)
        finally:
            hook.remove()
        return torch.cat(weights, dim=1)

    def forward(self, src, src_len, tgt_in, teacher_forcing: float = 1.0, step_loop: bool = False) -> torch.Tensor:
        """Teacher-forced logits (B, T, V) for the decoder inputs tgt_in (BOS y1 .. y_{T-1}).

        Without input feeding and with teacher forcing 1.0 the decoder is one RNN call over the
        whole target and attention one batched matmul; otherwise it steps through time.
        """
        state = self.start(src, src_len)
        if not (step_loop or self.cfg.input_feeding or teacher_forcing < 1.0):
            dec_out, _ = self.decoder(self.dropout(self.embed(tgt_in)), state["hidden"])
            attentional, _ = self._attend(dec_out, state)
            return self.out(self.dropout(attentional))
        logits, tokens = [], tgt_in[:, 0]
        for t in range(tgt_in.size(1)):
            if t > 0:
                tokens = tgt_in[:, t]
                if teacher_forcing < 1.0:  # scheduled sampling: the model's own previous guess
                    own = torch.rand(tokens.shape, device=tokens.device) >= teacher_forcing
                    tokens = torch.where(own, logits[-1].argmax(-1), tokens)
            step_logits, state = self.step(tokens, state)
            logits.append(step_logits)
        return torch.stack(logits, dim=1)
