"""What the CPU offers: the bf16 and int8 decisions the CLI and the Python API take by default."""
from seq2seq import cpu
from seq2seq.inference import decoding_bf16, decoding_int8


def test_native_bf16_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert cpu.native_bf16()
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert cpu.native_bf16()
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_vnni"}))
    assert not cpu.native_bf16()


def test_decoding_precision_defaults_to_the_native_one_and_obeys_a_choice(monkeypatch):
    monkeypatch.setattr("seq2seq.cpu.native_bf16", lambda: False)
    assert decoding_bf16(None) is False and decoding_bf16(True) is True
    monkeypatch.setattr("seq2seq.cpu.native_bf16", lambda: True)
    assert decoding_bf16(None) is True and decoding_bf16(False) is False


def test_native_int8_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(cpu, "int8_available", lambda: True)
    for flags in ({"avx2", "avx512f", "avx512_vnni"}, {"avx2", "avx_vnni"}, {"avx2", "amx_int8"}):
        monkeypatch.setattr(cpu, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert cpu.native_int8(), flags
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert not cpu.native_int8()
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    monkeypatch.setattr(cpu, "int8_available", lambda: False)
    assert not cpu.native_int8()  # no oneDNN quantized engine: Int8Linear cannot run


def test_int8_decoding_defaults_to_the_native_choice_on_a_cpu_only(monkeypatch):
    monkeypatch.setattr("seq2seq.cpu.native_int8", lambda: True)
    assert decoding_int8(None) is True and decoding_int8(False) is False
    assert decoding_int8(None, bf16=False) is False and decoding_int8(None, bf16=True) is False  # a chosen precision
    assert decoding_int8(None, device="cuda") is False
    monkeypatch.setattr("seq2seq.cpu.native_int8", lambda: False)
    assert decoding_int8(None) is False and decoding_int8(True) is True


def test_describe_names_the_machine():
    facts = cpu.describe()
    assert facts["threads"] >= 1 and facts["torch"].startswith("2.")
    assert set(facts) >= {"cpu", "avx512_bf16", "amx_bf16", "avx512_vnni", "native_bf16", "native_int8"}



def test_tuned_allocator_reuses_freed_memory_without_page_faults():
    """After tune_allocator, a large tensor freed and allocated again reuses the same pages; the
    setting it replaced (a trim threshold masked to 0) page-faulted every allocation anew. In a
    fresh process: the test process's heap is not this test's to settle."""
    import platform
    import subprocess
    import sys

    import pytest

    if platform.system() != "Linux":
        pytest.skip("glibc's mallopt is only on Linux")
    script = """
import resource, sys, torch
from seq2seq import cpu
tuned = cpu.tune_allocator()
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
