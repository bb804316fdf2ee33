"""Where the work runs and in what arithmetic: `--device auto|cpu|cuda` and
`--precision auto|bf16|fp32|int8`, each resolved once, here, into what the code below runs.

What a CPU runs is what PyTorch's oneDNN runs on it: the instruction set oneDNN uses (the CPU's
flags, capped by `ONEDNN_MAX_CPU_ISA` as oneDNN caps itself, so that an emulated older CPU takes
the same path as a real one), and for bf16 a probe that builds a tiny bf16 product and LSTM once.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from seq2seq.errors import UserError

log = logging.getLogger("seq2seq")

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32", "int8")

# oneDNN's x86 instruction-set levels, lowest first, as ONEDNN_MAX_CPU_ISA names them, with the
# /proc/cpuinfo flags each needs.
_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
ISA_LEVELS = (
    ("SSE41", {"sse4_1"}),
    ("AVX", {"avx"}),
    ("AVX2", {"avx2", "fma"}),
    ("AVX2_VNNI", {"avx2", "fma", "avx_vnni"}),
    ("AVX2_VNNI_2", {"avx2", "fma", "avx_vnni", "avx_vnni_int8", "avx_ne_convert"}),
    ("AVX512_CORE", _AVX512),
    ("AVX512_CORE_VNNI", _AVX512 | {"avx512_vnni"}),
    ("AVX512_CORE_BF16", _AVX512 | {"avx512_vnni", "avx512_bf16"}),
    ("AVX10_1_512", _AVX512 | {"avx512_vnni", "avx512_bf16", "avx512_fp16"}),
    ("AVX10_1_512_AMX", _AVX512 | {"avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16"}),
)
_ISA_ALIASES = {"AVX512_CORE_FP16": "AVX10_1_512", "AVX512_CORE_AMX": "AVX10_1_512_AMX",
                "AVX512_CORE_AMX_FP16": "AVX10_1_512_AMX"}
_LEVEL = {name: rank for rank, (name, _) in enumerate(ISA_LEVELS)}


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
    natively, else fp32 (emulated bf16 is slower), for every kind. int8: the linear layers in int8,
    the rest as auto; faster in batches, but not in auto, as with the vocabulary shortlist it moved
    BLEU past the quality bar on both VNNI and AVX2 CPUs (docs/performance.md). bf16 where oneDNN
    cannot run it is a one-line error; where it only emulates it, a warning."""
    if isinstance(choice, Precision):
        return choice
    if choice not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {choice!r}")
    device = torch.device(device)
    if choice == "int8":
        if device.type != "cpu" or not int8_available():
            raise UserError("--precision int8 needs a CPU with PyTorch's oneDNN quantized engine")
        return Precision(bf16=native_bf16(device), int8=True)
    if choice == "bf16":
        check_bf16(device, "--precision bf16")
        return Precision(bf16=True)
    if choice == "fp32":
        return FP32
    return Precision(bf16=native_bf16(device))


def training_bf16(asked: bool, device: torch.device | str = "cpu") -> bool:
    """`train.bf16` as it runs: true means bf16 where the device computes it natively; elsewhere the
    run trains in fp32 and says so in one line (emulated bf16 is slower than fp32, and on CPUs
    below AVX-512 oneDNN has no bf16 LSTM at all)."""
    if not asked or native_bf16(device):
        return asked
    log.info("train.bf16: %s computes no bf16 natively; training in fp32", machine_name(device))
    return False


def check_bf16(device: torch.device, what: str) -> None:
    """A one-line error where `device` cannot run bf16 at all; a warning where it only emulates it."""
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise UserError(f"{what}: {torch.cuda.get_device_name(device)} has no bf16; use --precision fp32")
        return
    if not bf16_runs():
        raise UserError(f"{what}: PyTorch's oneDNN runs no bf16 on {machine_name(device)}, which lacks AVX-512 "
                        f"(or Arm BF16); use --precision fp32 or int8 (auto picks the fastest)")
    if not native_bf16(device):
        log.warning("%s: %s has no bf16 instructions; oneDNN emulates them, slower than fp32", what,
                    machine_name(device))


def autocast(enabled: bool, device: torch.device | str = "cpu"):
    """bf16 autocast on the device's own engine (matmuls and RNNs in bf16, fp32 master weights)."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16) if enabled else nullcontext()


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether the device computes bf16 natively: Ampere and later GPUs; CPUs with AVX-512 BF16 or
    AMX in oneDNN's reach, or Arm's BF16 extension, where the probe's bf16 primitives build."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    if is_arm():
        return "bf16" in cpu_flags() and bf16_runs()
    return isa_at_least("AVX512_CORE_BF16") and bf16_runs()


def int8_weight_max() -> int:
    """The largest int8 weight: 127 where the CPU has int8 dot-product instructions (VNNI, AMX, Arm).
    Without them oneDNN sums pairs of u8 x s8 products in saturating 16-bit lanes, which
    255 * 127 * 2 overflows; 63 keeps every pair in range at 7 bits of weight."""
    if is_arm() or isa_at_least("AVX512_CORE_VNNI") or cpu_isa() in ("AVX2_VNNI", "AVX2_VNNI_2"):
        return 127
    return 63


def int8_available() -> bool:
    """Whether PyTorch has oneDNN's quantized engine, which int8 decoding runs on."""
    return "onednn" in torch.backends.quantized.supported_engines


def is_arm() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


def cpu_isa() -> str:
    """The instruction-set level oneDNN runs at on this CPU: the highest of ISA_LEVELS whose flags
    the CPU has, at most ONEDNN_MAX_CPU_ISA (or its old name DNNL_MAX_CPU_ISA). "aarch64" on Arm."""
    if is_arm():
        return "aarch64"
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    cap = _ISA_ALIASES.get(cap, cap)
    top = _LEVEL.get(cap, len(ISA_LEVELS) - 1)
    flags = cpu_flags()
    if not flags:  # no /proc/cpuinfo: oneDNN's own dispatch is the only judge, and the probes decide
        return ISA_LEVELS[top][0]
    level = "none"
    for name, needs in ISA_LEVELS[: top + 1]:
        if needs <= flags:
            level = name
    return level


def isa_at_least(name: str) -> bool:
    return _LEVEL.get(cpu_isa(), -1) >= _LEVEL[name]


@functools.cache
def bf16_runs() -> bool:
    """Whether this PyTorch's oneDNN builds and runs bf16 on this CPU: a packed bf16 product, as
    fast decoding makes, and a bf16 LSTM under autocast, as training and decoding make. Built once."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=torch.bfloat16))
            torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8, dtype=torch.bfloat16), weight, None, "none", [], "")
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                torch.nn.LSTM(8, 8)(torch.ones(3, 2, 8))
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def machine_name(device: torch.device | str = "cpu") -> str:
    """The device in a few words for a log line: "this CPU (oneDNN at AVX2)", or the GPU's name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "this Arm CPU" if is_arm() else f"this CPU (oneDNN at {cpu_isa()})"


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
    """The CPU's feature flags: x86 "flags", Arm "Features" (lower case)."""
    return frozenset((_cpuinfo("flags") or _cpuinfo("Features")).lower().split())


def describe() -> dict:
    """The machine, for benchmark reports: oneDNN's level as capped by ONEDNN_MAX_CPU_ISA, and
    ATen's vector kernels as capped by ATEN_CPU_CAPABILITY."""
    flags = cpu_flags()
    return {"cpu": _cpuinfo("model name") or platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "onednn_isa": cpu_isa(), "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "emulated": bool(os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("ATEN_CPU_CAPABILITY")),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "avx512_vnni": "avx512_vnni" in flags or "avx_vnni" in flags, "native_bf16": native_bf16(),
            "int8_engine": int8_available(), "int8_weight_max": int8_weight_max()}
