"""CPU decoding kernels: linear layers on weights packed once for oneDNN (or quantized to int8),
computing in their dtype and returning fp32,
and an LSTM whose step takes one product and one sigmoid per layer. Each is checked against the
plain PyTorch module it stands in for (tests/test_fast.py); the speed they give is measured in
docs/performance.md."""
from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from seq2seq.device import int8_weight_max

Hidden = tuple[torch.Tensor, torch.Tensor]


class PackedLinear:
    """x W^T + b with W cast to the compute dtype and reordered into oneDNN's blocked layout once:
    F.linear (and autocast's cached cast) reorders the weight at every call, which is most of the
    cost of the small products decoding makes."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        self.dtype = dtype
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype))
        self.bias = None if bias is None else bias.detach().to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """In fp32, whatever the compute dtype: the twin's other operations run in fp32."""
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.weight, self.bias, "none", [], "").float()


class Int8Linear:
    """x W^T + b in int8: W quantized once with a scale per output row, x at each call with one
    scale for the call (dynamic quantization), the product in oneDNN's int8 kernels (VNNI where
    the CPU has it), the result in fp32. Without VNNI the weights take 7 bits, which keeps AVX2's
    saturating 16-bit sums exact (`device.int8_weight_max`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        weight = weight.detach().float()
        scales = (weight.abs().amax(1) / int8_weight_max()).clamp_min(1e-12).double()
        zero_points = torch.zeros(weight.size(0), dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are deprecated, and still the API of these kernels
            warnings.simplefilter("ignore")
            quantized = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        engine = torch.backends.quantized.engine
        torch.backends.quantized.engine = "onednn"  # fbgemm's kernel is the slower one on the output layer
        try:
            self.packed = torch.ops.quantized.linear_prepack(quantized, None if bias is None else bias.detach().float())
        finally:
            torch.backends.quantized.engine = engine

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, False)


# Packed weights outlive a decoding call, so that a caller translating batch after batch packs
# once. An entry is reused while its module's weights are as they were: frozen weights (a model
# loaded for use) by their version counters and storage, which every in-place write moves;
# trainable ones by a copy kept with them, as a fused optimizer step leaves version counters be.
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def packed(module: nn.Module, key: tuple, build):
    """`build()`'s result for `module` under `key`, kept while the module's weights stay as they are."""
    weights = [p.detach() for p in module.parameters(recurse=False)]
    frozen = not any(p.requires_grad for p in module.parameters(recurse=False))
    stamp = (key, tuple((w._version, w.data_ptr()) for w in weights))
    cached = _PACKED.get(module)
    if cached is not None and cached[0] == stamp and (frozen or all(map(torch.equal, weights, cached[1]))):
        return cached[2]
    cached = _PACKED[module] = (stamp, [] if frozen else [w.clone() for w in weights], build())
    return cached[2]


def sigmoid_tanh(x: torch.Tensor) -> torch.Tensor:
    """torch.tanh(x) as 2 sigmoid(2x) - 1 (within 1e-7 in fp32): this CPU build's tanh is not
    vectorized like its sigmoid."""
    return torch.sigmoid(x * 2).mul(2).sub_(1)


def _gate_weights(lstm: nn.LSTM, layer: int, suffix: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W_ih, W_hh and b_ih + b_hh of a layer's direction ("" or "_reverse"), the cell-input (g)
    gate's rows doubled, so that one sigmoid gives all four gates (see `_lstm_cell`)."""
    w_ih, w_hh = (getattr(lstm, f"weight_{kind}_l{layer}{suffix}").detach() for kind in ("ih", "hh"))
    bias = (getattr(lstm, f"bias_ih_l{layer}{suffix}") + getattr(lstm, f"bias_hh_l{layer}{suffix}")).detach()
    scale = torch.ones(w_ih.size(0), dtype=w_ih.dtype, device=w_ih.device)
    scale[2 * lstm.hidden_size : 3 * lstm.hidden_size] = 2.0
    return w_ih * scale.unsqueeze(1), w_hh * scale.unsqueeze(1), bias * scale


def pack_lstm(lstm: nn.LSTM, pack) -> list:
    """A one-way LSTM: per layer [W_ih | W_hh] packed, for `packed_lstm_step`. A bidirectional
    one: per layer both directions' W_ih stacked (all time steps' input gates in one product) and
    each direction's W_hh, for `packed_bidirectional_lstm`."""
    layers = []
    for layer in range(lstm.num_layers):
        w_ih, w_hh, bias = _gate_weights(lstm, layer)
        if not lstm.bidirectional:
            layers.append(pack(torch.cat([w_ih, w_hh], 1), bias))
            continue
        r_ih, r_hh, r_bias = _gate_weights(lstm, layer, "_reverse")
        layers.append((pack(torch.cat([w_ih, r_ih]), torch.cat([bias, r_bias])), pack(w_hh, None), pack(r_hh, None)))
    return layers


def _lstm_cell(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h and c from fp32 gate pre-activations whose g part is doubled (`_gate_weights`); `gates`
    is overwritten. tanh(g) = 2 sigmoid(2g) - 1, so one sigmoid takes all four gates."""
    i, f, g, o = torch.sigmoid_(gates).chunk(4, 1)
    c = torch.addcmul(f * c, i, g, value=2).sub_(i)  # f c + i (2 sigmoid(2g) - 1)
    return o * sigmoid_tanh(c), c


def packed_lstm_step(layers: list, x: torch.Tensor, hidden: Hidden) -> tuple[torch.Tensor, Hidden]:
    """An LSTM step in eval mode on `pack_lstm`'s weights: one product and one sigmoid per
    layer, gates and cell state in fp32."""
    h_out, c_out, out = [], [], x
    for layer, gates_of in enumerate(layers):
        out, c = _lstm_cell(gates_of(torch.cat([out, hidden[0][layer]], 1)).float(), hidden[1][layer].float())
        h_out.append(out)
        c_out.append(c)
    return out, (torch.stack(h_out), torch.stack(c_out))


def packed_bidirectional_lstm(layers: list, x: PackedSequence) -> tuple[PackedSequence, Hidden]:
    """A bidirectional LSTM over a packed sequence in eval mode from zero states, on `pack_lstm`'s
    weights: per layer one product gives both directions' input gates for every time step, then
    each step one recurrent product and one sigmoid."""
    sizes = x.batch_sizes.tolist()
    starts = [sum(sizes[:t]) for t in range(len(sizes))]
    data, h_n, c_n = x.data, [], []
    for inputs, *recurrent in layers:
        gates_in = inputs(data).float()  # once here, not a slice at every step
        size = gates_in.size(1) // 8
        out = data.new_empty(data.size(0), 2 * size, dtype=torch.float32)
        for direction, times in enumerate((range(len(sizes)), reversed(range(len(sizes))))):
            # the batch is sorted longest first: going forward rows drop off the end, keeping their
            # final state in h and c; going backward rows join at the end, from zero states
            h, c = (data.new_zeros(sizes[0], size, dtype=torch.float32) for _ in range(2))
            gate_cols = slice(4 * size * direction, 4 * size * (direction + 1))
            for t in times:
                b, rows = sizes[t], slice(starts[t], starts[t] + sizes[t])
                h_t, c[:b] = _lstm_cell(recurrent[direction](h[:b]).float().add_(gates_in[rows, gate_cols]), c[:b])
                h[:b] = out[rows, size * direction : size * (direction + 1)] = h_t
            h_n.append(h)
            c_n.append(c)
        data = out
    final = (torch.stack(h_n), torch.stack(c_n))
    if x.unsorted_indices is not None:
        final = tuple(h.index_select(1, x.unsorted_indices) for h in final)
    return PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices), final
