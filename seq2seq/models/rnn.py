"""The recurrent cell choice shared by both models: lstm | gru | rnn; and the one-step kernels
that decoding runs."""
from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from seq2seq.device import of as device_of
from seq2seq.errors import UserError

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}

Hidden = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def make_rnn(cell: str, input_size: int, hidden_size: int, layers: int, dropout: float,
             bidirectional: bool = False, forget_bias: float = 0.0) -> nn.RNNBase:
    """forget_bias 0 keeps PyTorch's initialisation; otherwise an LSTM's forget gates start with
    that total bias (see `set_forget_bias`)."""
    if cell not in CELLS:
        raise UserError(f"model.cell must be one of {', '.join(CELLS)}, got {cell!r}")
    rnn = CELLS[cell](input_size, hidden_size, num_layers=layers, batch_first=True,
                      dropout=dropout if layers > 1 else 0.0, bidirectional=bidirectional)
    if forget_bias:
        set_forget_bias(rnn, forget_bias)
    return rnn


def set_forget_bias(rnn: nn.RNNBase, value: float) -> None:
    """Give an LSTM's forget gates a total bias of `value` (Jozefowicz et al. 2015 use 1). PyTorch
    draws both biases near 0, so the gate starts near 0.5 and the cell state halves each step.
    Gate order is i, f, g, o; bias_ih and bias_hh add up, so one carries the value, the other 0.
    Other cells have no forget gate and are left as they are."""
    if not isinstance(rnn, nn.LSTM):
        return
    size = rnn.hidden_size
    with torch.no_grad():
        for name, param in rnn.named_parameters():
            if name.startswith("bias_ih"):
                param[size : 2 * size] = value
            elif name.startswith("bias_hh"):
                param[size : 2 * size] = 0.0


_SEQUENCE_KERNELS = {nn.LSTM: torch._VF.lstm, nn.GRU: torch._VF.gru, nn.RNN: torch._VF.rnn_tanh}


def run_rnn(rnn: nn.RNNBase, x: torch.Tensor | PackedSequence, hidden: Hidden | None = None):
    """`rnn(x, hidden)`, but in training with dropout between layers, one layer at a time with
    `keep_mask`'s dropout in between: nn.LSTM draws that mask with bernoulli_, about four times
    the cost (9.5 against 2.2 ms on 1.65M values), on every layer's whole output. A bidirectional
    LSTM packed for decoding reads a packed sequence with `_packed_bidirectional_lstm`."""
    if getattr(rnn, "packed_layers", None) is not None and rnn.bidirectional and isinstance(x, PackedSequence) \
            and hidden is None:
        return _packed_bidirectional_lstm(rnn.packed_layers, x)
    if not (rnn.training and rnn.dropout and rnn.num_layers > 1) or getattr(rnn, "proj_size", 0) \
            or (isinstance(rnn, nn.RNN) and rnn.nonlinearity != "tanh"):
        return rnn(x, hidden)
    kernel, lstm = _SEQUENCE_KERNELS[type(rnn)], isinstance(rnn, nn.LSTM)
    dirs = 2 if rnn.bidirectional else 1
    packed = isinstance(x, PackedSequence)
    data = x.data if packed else x
    batch = int(x.batch_sizes[0]) if packed else data.size(0 if rnn.batch_first else 1)
    if hidden is None:
        zeros = data.new_zeros(rnn.num_layers * dirs, batch, rnn.hidden_size)
        hidden = (zeros, zeros) if lstm else zeros
    elif packed and x.sorted_indices is not None:
        hidden = select_rows(hidden, x.sorted_indices)
    weights = rnn._flat_weights
    per_layer = len(weights) // rnn.num_layers
    finals = []
    for layer in range(rnn.num_layers):
        if layer:
            data = data * keep_mask(data, rnn.dropout)
        rows = slice(layer * dirs, (layer + 1) * dirs)
        hx = (hidden[0][rows], hidden[1][rows]) if lstm else hidden[rows]
        params = weights[layer * per_layer : (layer + 1) * per_layer]
        if packed:
            result = kernel(data, x.batch_sizes, hx, params, rnn.bias, 1, 0.0, True, rnn.bidirectional)
        else:
            result = kernel(data, hx, params, rnn.bias, 1, 0.0, True, rnn.bidirectional, rnn.batch_first)
        data, finals = result[0], finals + [result[1:]]
    final = tuple(torch.cat([f[i] for f in finals]) for i in range(2)) if lstm else torch.cat([f[0] for f in finals])
    if packed:
        if x.unsorted_indices is not None:
            final = select_rows(final, x.unsorted_indices)
        return PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices), final
    return data, final


_CELL_KERNELS = {nn.LSTM: torch._VF.lstm_cell, nn.GRU: torch._VF.gru_cell, nn.RNN: torch._VF.rnn_tanh_cell}


def rnn_step(rnn: nn.RNNBase, x: torch.Tensor, hidden: Hidden | None) -> tuple[torch.Tensor, Hidden]:
    """One time step, x (B, input) -> output (B, hidden), through every layer of `rnn` with the
    cell kernels. The same function as `rnn(x.unsqueeze(1), hidden)`, but a one-step nn.LSTM call
    pays oneDNN's weight reordering each time: 5.1 ms against 0.8 ms a step for the 2x512
    character model on this 2-core machine, which is most of the cost of decoding."""
    kernel = _CELL_KERNELS[type(rnn)]
    lstm = isinstance(rnn, nn.LSTM)
    if hidden is None:
        zeros = x.new_zeros(rnn.num_layers, x.size(0), rnn.hidden_size, dtype=torch.float32)
        hidden = (zeros, zeros) if lstm else zeros
    if getattr(rnn, "packed_layers", None) is not None:
        return _packed_lstm_step(rnn.packed_layers, x, hidden)
    h_out, c_out, out = [], [], x
    for layer in range(rnn.num_layers):
        weights = [getattr(rnn, f"{name}_l{layer}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        if lstm:
            h, c = kernel(out, (hidden[0][layer], hidden[1][layer]), *weights)
            c_out.append(c)
        else:
            h = kernel(out, hidden[layer], *weights)
        h_out.append(h)
        out = h
        if rnn.training and rnn.dropout and layer < rnn.num_layers - 1:
            out = out * keep_mask(out, rnn.dropout)
    h_stack = torch.stack(h_out)
    return out, ((h_stack, torch.stack(c_out)) if lstm else h_stack)


class PackedLinear:
    """x W^T + b with W cast to the compute dtype and reordered into oneDNN's blocked layout once.
    F.linear (and autocast's cached cast) reorders the weight at every call, which is most of the
    cost of the small products decoding makes: a 1 x 512 by 512 x 2048 bf16 product takes 75 us
    through F.linear and 34 us packed on this 2-core machine (M = 32: 228 -> 179 us)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        self.dtype = dtype
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype))
        self.bias = None if bias is None else bias.detach().to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.weight, self.bias, "none", [], "")


class Int8Linear:
    """x W^T + b in int8: W quantized once with a scale per output row, x at each call with one
    scale for the call (dynamic quantization), the product in oneDNN's int8 kernels (VNNI where
    the CPU has it), the result in fp32. On a 2-core Zen 5, decoding the released en-fr with it
    runs 1.37x (greedy) and 1.24x (beam 5) as fast as with packed bf16 weights (`benchmark.py
    translator-decode`): translation's default where the CPU has VNNI or AMX."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        weight = weight.detach().float()
        scales = (weight.abs().amax(1) / 127).clamp_min(1e-12).double()
        zero_points = torch.zeros(weight.size(0), dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are deprecated, and still the API of these kernels in 2.13
            warnings.simplefilter("ignore")
            quantized = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        engine = torch.backends.quantized.engine
        torch.backends.quantized.engine = "onednn"  # fbgemm's kernel took about 3x as long on the output layer
        try:
            self.packed = torch.ops.quantized.linear_prepack(quantized, None if bias is None else bias.detach().float())
        finally:
            torch.backends.quantized.engine = engine

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, False)


# Packed weights outlive a decoding region, so that a caller translating batch after batch packs
# once (int8: 40 ms a call for the released en-fr, 5% of greedy on test_2016). An entry is reused
# while its module's weights equal a copy kept with it (2.6 ms for the en-fr's 10M values):
# version counters cannot tell, as a fused optimizer step leaves them as they were.
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _packed(module: nn.Module, key: tuple, build):
    weights = [p.detach() for p in module.parameters(recurse=False)]
    cached = _PACKED.get(module)
    if cached is None or cached[0] != key or not all(torch.equal(a, b) for a, b in zip(weights, cached[1])):
        cached = _PACKED[module] = (key, [w.clone() for w in weights], build())
    return cached[2]


def _gate_weights(lstm: nn.LSTM, layer: int, suffix: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W_ih, W_hh and b_ih + b_hh of a layer's direction ("" or "_reverse"), the cell-input (g)
    gate's rows doubled, so that one sigmoid gives all four gates (see `_lstm_cell`)."""
    w_ih, w_hh = (getattr(lstm, f"weight_{kind}_l{layer}{suffix}").detach() for kind in ("ih", "hh"))
    bias = (getattr(lstm, f"bias_ih_l{layer}{suffix}") + getattr(lstm, f"bias_hh_l{layer}{suffix}")).detach()
    scale = torch.ones(w_ih.size(0), dtype=w_ih.dtype, device=w_ih.device)
    scale[2 * lstm.hidden_size : 3 * lstm.hidden_size] = 2.0
    return w_ih * scale.unsqueeze(1), w_hh * scale.unsqueeze(1), bias * scale


def _pack_lstm(lstm: nn.LSTM, pack) -> list:
    """A one-way LSTM: per layer [W_ih | W_hh] packed, for `_packed_lstm_step`. A bidirectional
    one: per layer both directions' W_ih stacked (all time steps' input gates in one product) and
    each direction's W_hh, for `_packed_bidirectional_lstm`."""
    layers = []
    for layer in range(lstm.num_layers):
        w_ih, w_hh, bias = _gate_weights(lstm, layer)
        if not lstm.bidirectional:
            layers.append(pack(torch.cat([w_ih, w_hh], 1), bias))
            continue
        r_ih, r_hh, r_bias = _gate_weights(lstm, layer, "_reverse")
        layers.append((pack(torch.cat([w_ih, r_ih]), torch.cat([bias, r_bias])), pack(w_hh, None), pack(r_hh, None)))
    return layers


@contextmanager
def packed_for_decoding(model: nn.Module, dtype: torch.dtype, int8: bool = False):
    """Within the block, the model's linear layers and its LSTMs (the one-way ones' step, the
    bidirectional ones over a packed sequence) use weights packed once (see PackedLinear), or quantized to int8 (see Int8Linear), and kept for the next
    block while the weights stay as they are; weights must not change inside it. Elsewhere (not a
    CPU, no oneDNN) nothing changes."""
    patched: list[tuple[nn.Module, str]] = []
    if device_of(model).type == "cpu" and torch.backends.mkldnn.is_available():
        pack = Int8Linear if int8 else (lambda w, b: PackedLinear(w, b, dtype))
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.forward = _packed(module, (dtype, int8), lambda m=module: pack(m.weight, m.bias))
                patched.append((module, "forward"))
            elif isinstance(module, nn.LSTM) and module.proj_size == 0:
                module.packed_layers = _packed(module, (dtype, int8), lambda m=module: _pack_lstm(m, pack))
                patched.append((module, "packed_layers"))
    try:
        yield
    finally:
        for module, name in patched:
            delattr(module, name)


def tanh(x: torch.Tensor) -> torch.Tensor:
    """torch.tanh(x) as 2 sigmoid(2x) - 1 (within 1e-7 in fp32): this CPU build's tanh is not
    vectorized like its sigmoid, 243 against 25 us on 320 x 640 fp32 values (2-core Zen 5)."""
    return torch.sigmoid(x * 2).mul(2).sub_(1)


def _lstm_cell(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h and c from fp32 gate pre-activations whose g part is doubled (`_gate_weights`); `gates`
    is overwritten. tanh(g) = 2 sigmoid(2g) - 1, so one sigmoid takes all four gates."""
    i, f, g, o = torch.sigmoid_(gates).chunk(4, 1)
    c = torch.addcmul(f * c, i, g, value=2).sub_(i)  # f c + i (2 sigmoid(2g) - 1)
    return o * tanh(c), c


def _packed_lstm_step(layers: list, x: torch.Tensor, hidden: Hidden) -> tuple[torch.Tensor, Hidden]:
    """An LSTM step in eval mode on `_pack_lstm`'s weights: one product and one sigmoid per
    layer, gates and cell state in fp32."""
    h_out, c_out, out = [], [], x
    for layer, gates_of in enumerate(layers):
        out, c = _lstm_cell(gates_of(torch.cat([out, hidden[0][layer]], 1)).float(), hidden[1][layer].float())
        h_out.append(out)
        c_out.append(c)
    return out, (torch.stack(h_out), torch.stack(c_out))


def _packed_bidirectional_lstm(layers: list, x: PackedSequence) -> tuple[PackedSequence, Hidden]:
    """A bidirectional LSTM over a packed sequence in eval mode from zero states, on `_pack_lstm`'s
    weights: per layer one product gives both directions' input gates for every time step, then
    each step one recurrent product and one sigmoid. The released en-fr's encoder on Multi30k
    test_2016 (2-core Zen 5, medians of 5, alternating): 241 ms in int8 and 255 in bf16, against
    nn.LSTM's 310 in bf16, whose tanh takes ten times a sigmoid's time."""
    sizes = x.batch_sizes.tolist()
    starts = [sum(sizes[:t]) for t in range(len(sizes))]
    data, h_n, c_n = x.data, [], []
    for inputs, *recurrent in layers:
        gates_in = inputs(data)
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
        final = select_rows(final, x.unsorted_indices)
    return PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices), final


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
    """Inverted dropout whose mask comes from 16 random bits an element, drawn as int64s: on CPU
    the generator's cost is per draw, so a quarter of the draws rand_like makes. 230 x 14 x 512:
    2.2 ms against 4.3-5.2 ms with rand_like, and 9.5 ms with nn.Dropout's bernoulli_ (dropout
    masks were a tenth of a training step). The rate is p rounded to a multiple of 1/65536, and
    the kept values are scaled by the inverse of that rounded keep rate, which keeps the mean."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * keep_mask(x, self.p)


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A dropout mask for x in x's dtype: 0 with probability p (rounded to a multiple of 1/65536),
    else 1 / (1 - that p)."""
    dropped = round(p * 65536)
    if dropped >= 65536:
        return torch.zeros_like(x)
    n = x.numel()
    bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    keep = bits.view(torch.int16)[:n].view(x.shape) >= dropped - 32768
    return keep.to(x.dtype) * (65536 / (65536 - dropped))
