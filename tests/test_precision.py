"""What the machine offers, and the one decision that turns `--precision` into what decoding runs."""
import pytest

from seq2seq import device
from seq2seq.device import Precision, resolve_precision
from seq2seq.errors import UserError


def test_native_bf16_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert device.native_bf16()
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert device.native_bf16()
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_vnni"}))
    assert not device.native_bf16()


def test_native_int8_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(device, "int8_available", lambda: True)
    for flags in ({"avx2", "avx512f", "avx512_vnni"}, {"avx2", "avx_vnni"}, {"avx2", "amx_int8"}):
        monkeypatch.setattr(device, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert device.native_int8(), flags
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert not device.native_int8()
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    monkeypatch.setattr(device, "int8_available", lambda: False)
    assert not device.native_int8()  # no oneDNN quantized engine: Int8Linear cannot run
    assert not device.native_int8("cuda")


@pytest.mark.parametrize("bf16, int8", [(False, False), (True, False), (True, True), (False, True)])
def test_precision_auto_is_the_native_one_and_a_choice_is_obeyed(monkeypatch, bf16, int8):
    """auto: bf16 where native, else fp32; int8 products for translation only, where native.
    bf16 and fp32 are what they say (no int8); int8 keeps auto's choice for the rest."""
    monkeypatch.setattr(device, "native_bf16", lambda d="cpu": bf16)
    monkeypatch.setattr(device, "native_int8", lambda d="cpu": int8)
    monkeypatch.setattr(device, "int8_available", lambda: True)
    assert resolve_precision("auto", "cpu", "translator") == Precision(bf16, int8)
    assert resolve_precision("auto", "cpu", "charlm") == Precision(bf16, False)
    assert resolve_precision("bf16", "cpu") == Precision(True, False)
    assert resolve_precision("fp32", "cpu") == Precision(False, False)
    assert resolve_precision("int8", "cpu", "charlm") == Precision(bf16, True)
    assert Precision(bf16, int8).name == ("int8" if int8 else "bf16" if bf16 else "fp32")


def test_precision_errors_say_what_is_wrong(monkeypatch):
    with pytest.raises(UserError, match="--precision must be one of auto, bf16, fp32, int8, got 'fp16'"):
        resolve_precision("fp16")
    monkeypatch.setattr(device, "int8_available", lambda: False)
    with pytest.raises(UserError, match="--precision int8 needs a CPU with PyTorch's oneDNN quantized engine"):
        resolve_precision("int8", "cpu")


def test_describe_names_the_machine():
    facts = device.describe()
    assert facts["threads"] >= 1 and facts["torch"].startswith("2.")
    assert set(facts) >= {"cpu", "avx512_bf16", "amx_bf16", "avx512_vnni", "native_bf16", "native_int8"}


def test_kept_freed_memory_is_reused_without_page_faults():
    """After the process settings, a large tensor freed and allocated again reuses the same pages;
    the setting they replaced (a trim threshold masked to 0) page-faulted every allocation anew.
    In a fresh process: the test process's heap is not this test's to settle."""
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux":
        pytest.skip("glibc's mallopt is only on Linux")
    script = """
import resource, sys, torch
from seq2seq import fast
tuned = fast._keep_freed_memory()
size = 8 * 2**20  # 32 MB of fp32, above glibc's default mmap threshold
for _ in range(10):  # the heap settles
    torch.ones(size)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(size)
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    tuned, faults = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    if tuned != "True":
        pytest.skip("this libc has no mallopt")
    assert int(faults) < 8 * 2**20 * 4 // 4096  # fewer than one allocation's worth of 4 KB pages
