"""An exponential moving average of a model's trained weights (Polyak averaging): evaluations
and the saved best model read the average, which sits nearer the centre of the region the last
updates wandered over than any one of them does."""
from __future__ import annotations

from contextlib import contextmanager

import torch


class WeightAverage:
    """avg <- d avg + (1 - d) w after every update, with d = min(decay, (1 + n) / (10 + n)) at the
    n-th update, so that the first updates are not outweighed by the random initial weights (the
    warm-up of TensorFlow's ExponentialMovingAverage). Frozen parameters are not averaged. Decay 0
    keeps no average: updates do nothing and the model keeps its own weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad] if decay else []
        self.average = [p.detach().clone() for p in self.params]
        self.updates = 0

    def update(self) -> None:
        if not self.decay:
            return
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():  # the parameters are only read: no per-step list of detached views
            torch._foreach_lerp_(self.average, self.params, 1 - decay)

    @contextmanager
    def swapped_in(self):
        """The model holds the average inside the block, its own weights again after it."""
        if not self.decay:
            yield
            return
        with torch.no_grad():
            own = [p.detach().clone() for p in self.params]
            torch._foreach_copy_(self.params, self.average)
            try:
                yield
            finally:
                torch._foreach_copy_(self.params, own)

    def state(self) -> dict | None:
        return {"average": self.average, "updates": self.updates} if self.decay else None

    def load_state(self, state: dict) -> None:
        if not self.decay:
            return
        if len(state["average"]) != len(self.average):
            raise ValueError(f"{len(state['average'])} averaged tensors for {len(self.average)} parameters")
        with torch.no_grad():
            torch._foreach_copy_(self.average, [t.to(a.device) for t, a in zip(state["average"], self.average)])
        self.updates = int(state["updates"])
