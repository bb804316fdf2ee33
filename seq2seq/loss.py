"""Label-smoothed cross-entropy, computed with its gradient in row chunks.

The (tokens x vocabulary) logits dominate a translator step on a CPU: PyTorch's log_softmax +
nll_loss chain makes several full-size fp32 copies and passes, all memory-bound. Here the
forward pass walks the logits in chunks of rows that fit in L2 cache, computing the loss and,
since a backward pass always follows in training, the gradient softmax - (1 - eps) * onehot -
eps / V at once (docs/performance.md has the measurement).
A caller that knows the factor its backward pass will bring (1 / tokens, for a mean) passes it
as `grad_scale`: it is folded into the forward pass's mask multiply, and the backward pass hands
the saved gradient on without another logits-sized pass.
"""
from __future__ import annotations

import torch

# values per chunk (2 MB of fp32): 64 rows of an 8k vocabulary, 8k rows of a character one
CHUNK_ELEMENTS = 1 << 19


class _SmoothedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, smoothing: float, ignore_index: int,
                grad_scale: float):
        dtype = torch.promote_types(logits.dtype, torch.float32)
        keep = target != ignore_index
        safe_target = target.masked_fill(~keep, 0).unsqueeze(1)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits) if want_grad else None
        vocab = logits.size(-1)
        total = torch.zeros((), dtype=dtype, device=logits.device)
        chunk = max(1, CHUNK_ELEMENTS // vocab)
        for start in range(0, logits.size(0), chunk):
            rows = slice(start, start + chunk)
            # softmax, and the log-partition from the row's largest logit and probability:
            # (one exp pass fewer than log_softmax then exp_: exp is slow on a CPU)
            x = logits[rows].to(dtype)
            probs = torch.softmax(x, dim=-1)
            log_z = x.amax(dim=-1) - probs.amax(dim=-1).log()
            mask = keep[rows].to(dtype)
            nll = log_z - x.gather(1, safe_target[rows]).squeeze(1)
            if smoothing > 0:
                nll = (1 - smoothing) * nll - smoothing * (x.mean(dim=-1) - log_z)
            total += (nll * mask).sum()
            if want_grad:
                if smoothing > 0:
                    probs.sub_(smoothing / vocab)
                probs.scatter_add_(1, safe_target[rows], torch.full_like(mask, smoothing - 1).unsqueeze(1))
                grad[rows] = probs.mul_(mask.mul_(grad_scale).unsqueeze(1))
        ctx.save_for_backward(grad)
        ctx.grad_scale = grad_scale
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        factor = float(grad_output) / ctx.grad_scale
        if abs(factor - 1) < 1e-6:  # the expected factor, up to its fp32 rounding
            return grad, None, None, None, None
        return grad * factor, None, None, None, None


def smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0,
                           ignore_index: int = -100, grad_scale: float = 1.0) -> torch.Tensor:
    """Summed label-smoothed cross-entropy of logits (N, V) against target (N,), as
    F.cross_entropy(..., label_smoothing=smoothing, ignore_index=ignore_index, reduction="sum").
    `grad_scale` is only a hint of the backward pass's incoming gradient: results never depend on it.
    The chunked kernel is for CPUs (caches); a GPU runs PyTorch's own fused one."""
    if logits.device.type != "cpu":
        return torch.nn.functional.cross_entropy(logits.float(), target, label_smoothing=smoothing,
                                                 ignore_index=ignore_index, reduction="sum")
    return _SmoothedCrossEntropy.apply(logits, target, smoothing, ignore_index, grad_scale)
