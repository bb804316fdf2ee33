"""Speed for decoding on a CPU, behind one entry point: `for_decoding(model, precision)`.

It returns a decoding twin of the model: a shallow copy whose linear layers, LSTMs and
attentional tanh are replaced by kernels on weights packed once for oneDNN (in int8 where the
precision says so; see `kernels`). The twin computes what the model computes, up to rounding,
and offers the same interface (`start`, `step`, `reorder_state`, `forward`); the model itself is
left as it is. Off a CPU, or without oneDNN, the model is returned unchanged.

`configure_process()` holds the process-wide settings that make PyTorch fast on a CPU; the
command line applies them at start, and `for_decoding` and training apply them too.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import weakref


@functools.cache
def configure_process() -> None:
    """oneDNN keeps 1,024 compiled primitives by default, and a translator epoch's batch shapes
    need thousands (each LSTM layer, product and reorder, per shape): at 1,024 it recompiles at
    every step. It reads the setting when it first compiles; a value the user set wins. And the
    allocator keeps freed memory (`_keep_freed_memory`)."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")
    _keep_freed_memory()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _INT_MAX = -1, -3, 2**31 - 1


def _keep_freed_memory() -> bool:
    """Keep freed memory in the process instead of handing it back to the kernel: glibc serves
    blocks above its mmap threshold (at most 32 MB, the size of one step's logits) with fresh
    mmap'd pages and returns them on free, and trims the heap's free top likewise, so every
    training and decoding step would page-fault its largest tensors anew. mallopt takes a C int:
    a value of 2**32 would be masked to 0, which trims at every free. Only glibc on Linux."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    except (OSError, AttributeError):
        return False


# A frozen model's twins (a model loaded for use), reused while its weights and shortlist stay as
# they were: rebuilding one at every one-sentence call costs more than that call's products.
_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def for_decoding(model, precision):
    """The model's decoding twin for `precision` (a `seq2seq.device.Precision`): see the module's
    docstring. Weights must not change while a twin is in use; a later call packs them afresh."""
    import torch

    configure_process()
    if next(model.parameters()).device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return model
    from seq2seq.fast.modules import twin

    key = (torch.bfloat16 if precision.bf16 else torch.float32, precision.int8)
    params = list(model.parameters())
    if any(p.requires_grad for p in params):
        return twin(model, *key)
    stamp = (getattr(model, "shortlist", None), model.training, tuple((p._version, p.data_ptr()) for p in params))
    kept = _TWINS.setdefault(model, {})
    if key not in kept or kept[key][0] != stamp:
        kept[key] = (stamp, twin(model, *key))
    return kept[key][1]

