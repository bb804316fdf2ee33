"""Where the work runs and in what arithmetic: `--device auto|cpu|cuda` and
`--precision auto|bf16|fp32|int8`, each resolved once, here, into what the code below runs."""
from __future__ import annotations

import functools
import platform
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from seq2seq.errors import UserError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32", "int8")


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


@dataclass(frozen=True)
class Precision:
    """What decoding runs in: bf16 autocast (fp32 master weights) or fp32, and on a CPU
    optionally the linear layers' products in dynamic int8."""
    bf16: bool
    int8: bool = False

    @property
    def name(self) -> str:
        return "int8" if self.int8 else "bf16" if self.bf16 else "fp32"


FP32 = Precision(bf16=False)


def resolve_precision(choice: str | Precision, device: torch.device | str = "cpu",
                      kind: str = "translator") -> Precision:
    """`--precision` for a model `kind` on `device`. auto: bf16 where the device computes it
    natively, else fp32 (emulated bf16 is slower); for translation, also int8 products on CPUs
    with int8 dot-product instructions (its quality stays within 0.1 BLEU of fp32: see
    docs/performance.md). Generation keeps int8 off under auto: a character step's products are
    a few rows, and quantizing them at each call loses to bf16. int8: the linear layers in int8,
    the rest as auto."""
    if isinstance(choice, Precision):
        return choice
    if choice not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {choice!r}")
    device = torch.device(device)
    if choice == "int8":
        if device.type != "cpu" or not int8_available():
            raise UserError("--precision int8 needs a CPU with PyTorch's oneDNN quantized engine")
        return Precision(bf16=native_bf16(device), int8=True)
    if choice in ("bf16", "fp32"):
        return Precision(bf16=choice == "bf16")
    return Precision(bf16=native_bf16(device), int8=kind == "translator" and native_int8(device))


def autocast(enabled: bool, device: torch.device | str = "cpu"):
    """bf16 autocast on the device's own engine (matmuls and RNNs in bf16, fp32 master weights)."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16) if enabled else nullcontext()


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether the device computes bf16 natively: Ampere and later GPUs; CPUs with AVX-512 BF16,
    AMX or Arm's BF16 extension (elsewhere oneDNN emulates bf16, slower than fp32)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    flags = cpu_flags()
    arm = "bf16" in flags and platform.machine() in ("aarch64", "arm64")
    return "avx512_bf16" in flags or "amx_bf16" in flags or arm


def native_int8(device: torch.device | str = "cpu") -> bool:
    """Whether the device runs dynamic int8 products natively: a CPU with int8 dot-product
    instructions (AVX-512 VNNI, AVX-VNNI or AMX) and PyTorch's oneDNN quantized engine."""
    if torch.device(device).type != "cpu":
        return False
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}) and int8_available()


def int8_available() -> bool:
    """Whether PyTorch has oneDNN's quantized engine, which int8 decoding runs on."""
    return "onednn" in torch.backends.quantized.supported_engines


@functools.cache
def _cpuinfo(field: str) -> str:
    """The first `field` line of /proc/cpuinfo (Linux), or ""."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo("flags").split())


def describe() -> dict:
    """The machine, for benchmark reports."""
    flags = cpu_flags()
    return {"cpu": _cpuinfo("model name") or platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "avx512_vnni": "avx512_vnni" in flags or "avx_vnni" in flags, "native_bf16": native_bf16(),
            "native_int8": native_int8()}
