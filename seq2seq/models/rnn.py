"""The recurrent layers both models are built from: lstm | gru | rnn, with our dropout between
layers in training, and a one-step call for decoding."""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from seq2seq.errors import UserError

Hidden = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class Stacked:
    """What our recurrent layers add to PyTorch's nn.LSTM / nn.GRU / nn.RNN (same weights, same
    parameter names, so checkpoints are plain PyTorch state dicts):

    - in training with dropout between layers, `forward` runs one layer at a time with
      `keep_mask`'s dropout in between, instead of the module's own, which draws each mask with
      bernoulli_ (several times the cost of `keep_mask`);
    - `step(x, hidden)` runs one time step through every layer with the cell kernels, which
      a one-step call of the whole module would run through its sequence kernel at a higher cost.

    Both run one-layer modules and cells (`layer_modules`, `layer_cells`) that share this
    module's parameters: they hold the same Parameter objects, so training, `.to()` and loading
    weights reach them too. They are built on the meta device, so building them draws no random
    numbers and the weights initialise as in a plain PyTorch module.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        dirs = ("", "_reverse") if self.bidirectional else ("",)
        layer_class = next(c for c in (nn.LSTM, nn.GRU, nn.RNN) if isinstance(self, c))
        cell_class = {nn.LSTM: nn.LSTMCell, nn.GRU: nn.GRUCell, nn.RNN: nn.RNNCell}[layer_class]
        extra = {"nonlinearity": self.nonlinearity} if isinstance(self, nn.RNN) else {}
        # plain lists, not submodules: the parameters belong to this module alone
        self.layer_modules, self.layer_cells = [], []
        for layer in range(self.num_layers):
            size_in = self.input_size if layer == 0 else self.hidden_size * len(dirs)
            module = layer_class(size_in, self.hidden_size, 1, bias=self.bias, batch_first=self.batch_first,
                                 bidirectional=self.bidirectional, device="meta", **extra)
            for suffix in dirs:
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")[: 4 if self.bias else 2]:
                    setattr(module, f"{name}_l0{suffix}", getattr(self, f"{name}_l{layer}{suffix}"))
            self.layer_modules.append(module)
            cell = cell_class(size_in, self.hidden_size, bias=self.bias, device="meta", **extra)
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")[: 4 if self.bias else 2]:
                setattr(cell, name, getattr(self, f"{name}_l{layer}"))
            self.layer_cells.append(cell)

    def forward(self, x: torch.Tensor | PackedSequence, hidden: Hidden | None = None):
        if not (self.training and self.dropout and self.num_layers > 1):
            return super().forward(x, hidden)
        lstm, dirs = isinstance(self, nn.LSTM), 2 if self.bidirectional else 1
        finals = []
        for layer, module in enumerate(self.layer_modules):
            if layer:
                x = (PackedSequence(x.data * keep_mask(x.data, self.dropout), *x[1:]) if isinstance(x, PackedSequence)
                     else x * keep_mask(x, self.dropout))
            rows = slice(layer * dirs, (layer + 1) * dirs)
            hx = None if hidden is None else ((hidden[0][rows], hidden[1][rows]) if lstm else hidden[rows])
            with warnings.catch_warnings():  # on CUDA: a layer's weights are not one flat buffer
                warnings.filterwarnings("ignore", "RNN module weights are not part")
                x, final = module(x, hx)
            finals.append(final)
        if lstm:
            return x, (torch.cat([f[0] for f in finals]), torch.cat([f[1] for f in finals]))
        return x, torch.cat(finals)

    def step(self, x: torch.Tensor, hidden: Hidden | None) -> tuple[torch.Tensor, Hidden]:
        """One time step, x (B, input) -> output (B, hidden), through every layer: the same function
        as `self(x.unsqueeze(1), hidden)` with its time dimension dropped. A None `hidden` is zeros."""
        lstm = isinstance(self, nn.LSTM)
        if hidden is None:
            zeros = x.new_zeros(self.num_layers, x.size(0), self.hidden_size, dtype=torch.float32)
            hidden = (zeros, zeros) if lstm else zeros
        h_out, c_out, out = [], [], x
        for layer, cell in enumerate(self.layer_cells):
            if lstm:
                h, c = cell(out, (hidden[0][layer], hidden[1][layer]))
                c_out.append(c)
            else:
                h = cell(out, hidden[layer])
            h_out.append(h)
            out = h
            if self.training and self.dropout and layer < self.num_layers - 1:
                out = out * keep_mask(out, self.dropout)
        h_stack = torch.stack(h_out)
        return out, ((h_stack, torch.stack(c_out)) if lstm else h_stack)


class LSTM(Stacked, nn.LSTM):
    pass


class GRU(Stacked, nn.GRU):
    pass


class RNN(Stacked, nn.RNN):
    pass


CELLS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}


def make_rnn(cell: str, input_size: int, hidden_size: int, layers: int, dropout: float,
             bidirectional: bool = False, forget_bias: float = 0.0, chrono_horizon: int = 0) -> nn.RNNBase:
    """forget_bias 0 and chrono_horizon 0 keep PyTorch's initialisation; otherwise an LSTM's
    forget gates start with that total bias (`set_forget_bias`), or the gates of an LSTM or GRU
    with the chrono initialisation for that horizon (`set_chrono_init`)."""
    if cell not in CELLS:
        raise UserError(f"model.cell must be one of {', '.join(CELLS)}, got {cell!r}")
    rnn = CELLS[cell](input_size, hidden_size, num_layers=layers, batch_first=True,
                      dropout=dropout if layers > 1 else 0.0, bidirectional=bidirectional)
    if forget_bias:
        set_forget_bias(rnn, forget_bias)
    if chrono_horizon:
        set_chrono_init(rnn, chrono_horizon)
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
    """Inverted dropout with `keep_mask`'s masks. The rate is p rounded to a multiple of 1/65536,
    and the kept values are scaled by the inverse of that rounded keep rate, which keeps the mean."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * keep_mask(x, self.p)


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A dropout mask for x in x's dtype: 0 with probability p (rounded to a multiple of 1/65536),
    else 1 / (1 - that p). 16 random bits an element, drawn as int64s: on a CPU the generator's
    cost is per draw, so this makes a quarter of the draws rand_like would."""
    dropped = round(p * 65536)
    if dropped >= 65536:
        return torch.zeros_like(x)
    n = x.numel()
    bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    keep = bits.view(torch.int16)[:n].view(x.shape) >= dropped - 32768
    return keep.to(x.dtype) * (65536 / (65536 - dropped))


def set_chrono_init(rnn: nn.RNNBase, horizon: int, generator: torch.Generator | None = None) -> None:
    """The chrono initialisation of Tallec & Ollivier (2018) for dependencies up to `horizon`
    steps: each unit's keep-gate bias drawn as log U(1, horizon - 1), so its memory spans from one
    step to the horizon. An LSTM's forget bias takes that value and its input bias the negative
    (the cell starts closed to new input as well as open to the old); a GRU's update gate, which
    keeps the old state, takes it alone. A plain RNN has no gate and is left as it is."""
    if horizon < 3:
        raise UserError(f"the chrono initialisation needs a horizon of at least 3 steps, got {horizon}")
    if not isinstance(rnn, (nn.LSTM, nn.GRU)):
        return
    size = rnn.hidden_size
    with torch.no_grad():
        for name, param in rnn.named_parameters():
            if not name.startswith(("bias_ih", "bias_hh")):
                continue
            param[: 2 * size] = 0.0
            if name.startswith("bias_ih"):
                keep = torch.log(1 + torch.rand(size, generator=generator) * (horizon - 2))
                if isinstance(rnn, nn.LSTM):
                    param[:size], param[size : 2 * size] = -keep, keep
                else:
                    param[size : 2 * size] = keep
