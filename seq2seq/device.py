"""Where the work runs: `--device auto|cpu|cuda`, and bf16 autocast on that device."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from seq2seq.errors import UserError

DEVICES = ("auto", "cpu", "cuda")


def resolve(name: str = "auto") -> torch.device:
    """auto: the GPU where CUDA is present, else the CPU."""
    if name not in DEVICES:
        raise UserError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to PyTorch (torch.cuda.is_available() is False)")
    return torch.device(name)


def of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast(enabled: bool, device: torch.device | str = "cpu"):
    """bf16 autocast on the device's own engine (matmuls and RNNs in bf16, fp32 master weights)."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16) if enabled else nullcontext()


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether the device computes bf16 natively, so that bf16 is the fast choice."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    from seq2seq.cpu import native_bf16 as cpu_native_bf16
    return cpu_native_bf16()


def native_int8(device: torch.device | str = "cpu") -> bool:
    """Whether the device runs dynamic int8 products natively (CPUs with VNNI or AMX; the int8
    path is CPU-only)."""
    if torch.device(device).type != "cpu":
        return False
    from seq2seq.cpu import native_int8 as cpu_native_int8
    return cpu_native_int8()
