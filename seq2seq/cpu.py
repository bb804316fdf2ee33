"""What the CPU offers, and the process settings that make PyTorch fast on it."""
from __future__ import annotations

import ctypes
import functools
import platform
from pathlib import Path

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_INT_MAX = 2**31 - 1


@functools.cache
def tune_allocator() -> bool:
    """Keep freed memory in the process instead of handing it back to the kernel.

    glibc serves blocks above its mmap threshold (at most 32 MB, the size of one step's logits)
    with fresh mmap'd pages and returns them on free, and trims the heap's free top likewise, so
    every training step and decoding step page-faults its largest tensors anew. Measured: about
    6% of a translator training step; beam-5 decoding of 1,000 sentences 1.6M page faults and 4.2 s
    of system time before, 1,700 faults after. mallopt takes a C int: a value of 2**32 would be
    masked to 0, which trims at every free. Only glibc on Linux."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    except (OSError, AttributeError):
        return False


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


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def native_bf16() -> bool:
    """True where the CPU computes bf16 matrix products natively (AVX-512 BF16, AMX, or Arm's
    BF16 extension). Elsewhere oneDNN emulates them and bf16 autocast can be slower than fp32."""
    flags = cpu_flags()
    arm = "bf16" in flags and platform.machine() in ("aarch64", "arm64")
    return "avx512_bf16" in flags or "amx_bf16" in flags or arm


def int8_available() -> bool:
    """Whether PyTorch has oneDNN's quantized engine, which `Int8Linear` runs on."""
    return "onednn" in torch.backends.quantized.supported_engines


def native_int8() -> bool:
    """True where the CPU has int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX) and
    PyTorch has oneDNN's quantized engine, so that int8 products are the fast choice."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}) and int8_available()


def describe() -> dict:
    flags = cpu_flags()
    return {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "avx512_vnni": "avx512_vnni" in flags or "avx_vnni" in flags, "native_bf16": native_bf16(),
            "native_int8": native_int8()}
