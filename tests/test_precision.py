"""What the machine offers, and the one decision that turns `--precision` into what decoding runs."""
import pytest

from seq2seq import device
from seq2seq.device import Precision, resolve_precision
from seq2seq.errors import UserError

pytestmark = pytest.mark.every_cpu  # run again by CI under emulated older CPUs


AVX2 = {"sse4_1", "avx", "avx2", "fma"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
ZEN4 = AVX512 | {"avx512_vnni", "avx512_bf16", "avx_vnni"}


@pytest.fixture
def x86(monkeypatch):
    """An x86 machine whose flags a test sets, with no ONEDNN_MAX_CPU_ISA of the shell's."""
    monkeypatch.setattr(device, "is_arm", lambda: False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    return lambda flags: monkeypatch.setattr(device, "cpu_flags", lambda: frozenset(flags))


def test_the_onednn_level_follows_the_flags_and_the_isa_cap(x86, monkeypatch):
    for flags, level in ((AVX2 - {"avx2", "fma"}, "AVX"), (AVX2, "AVX2"), (AVX2 | {"avx_vnni"}, "AVX2_VNNI"),
                         (AVX512, "AVX512_CORE"), (AVX512 | {"avx512_vnni"}, "AVX512_CORE_VNNI"), (ZEN4, "AVX512_CORE_BF16"),
                         (ZEN4 | {"avx512_fp16", "amx_tile", "amx_int8", "amx_bf16"}, "AVX10_1_512_AMX")):
        x86(flags)
        assert device.cpu_isa() == level, flags
    x86(ZEN4)
    for cap, level in (("AVX2", "AVX2"), ("avx512_core", "AVX512_CORE"), ("AVX", "AVX"), ("ALL", "AVX512_CORE_BF16")):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert device.cpu_isa() == level, cap


def test_native_bf16_needs_the_instructions_and_a_working_primitive(x86, monkeypatch):
    monkeypatch.setattr(device, "bf16_runs", lambda: True)
    x86(ZEN4)
    assert device.native_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # an emulated AVX2 machine, as a real one
    assert not device.native_bf16()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    x86(AVX512 | {"avx512_vnni"})
    assert not device.native_bf16()  # AVX-512 without BF16: oneDNN emulates it
    x86(ZEN4)
    monkeypatch.setattr(device, "bf16_runs", lambda: False)
    assert not device.native_bf16()  # the flags say yes, but the installed oneDNN cannot
    monkeypatch.setattr(device, "is_arm", lambda: True)
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"fp", "asimd", "bf16"}))  # /proc/cpuinfo "Features"
    monkeypatch.setattr(device, "bf16_runs", lambda: True)
    assert device.native_bf16() and device.cpu_isa() == "aarch64" and device.int8_weight_max() == 127


def test_int8_weights_take_7_bits_where_sums_saturate(x86, monkeypatch):
    for flags, weight_max in ((AVX2, 63), (AVX2 | {"avx_vnni"}, 127), (AVX512, 63), (ZEN4, 127)):
        x86(flags)
        assert device.int8_weight_max() == weight_max, flags
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert device.int8_weight_max() == 63  # VNNI is above the cap


def test_bf16_asked_where_it_cannot_run(x86, monkeypatch, caplog):
    """Training falls back to fp32 in one line; an explicit --precision bf16 is a one-line error
    where oneDNN has no bf16, a warning where it only emulates it."""
    x86(AVX2)
    monkeypatch.setattr(device, "bf16_runs", lambda: False)
    with caplog.at_level("INFO", logger="seq2seq"):
        assert device.training_bf16(True) is False and device.training_bf16(False) is False
    assert "computes no bf16 natively; training in fp32" in caplog.text
    with pytest.raises(UserError, match=r"--precision bf16: PyTorch's oneDNN runs no bf16 on this CPU "
                                        r"\(oneDNN at AVX2\).*use --precision fp32 or int8"):
        resolve_precision("bf16", "cpu")
    x86(AVX512)
    monkeypatch.setattr(device, "bf16_runs", lambda: True)
    caplog.clear()
    with caplog.at_level("WARNING", logger="seq2seq"):
        assert resolve_precision("bf16", "cpu") == Precision(True, False)
    assert "oneDNN emulates them, slower than fp32" in caplog.text
    x86(ZEN4)
    assert device.training_bf16(True) is True


@pytest.mark.parametrize("bf16", [False, True])
def test_precision_auto_is_the_native_one_and_a_choice_is_obeyed(monkeypatch, bf16):
    """auto: bf16 where native, else fp32, never int8 (it moved BLEU by more than the bar); bf16 and
    fp32 are what they say; int8 keeps auto's choice for the rest."""
    monkeypatch.setattr(device, "native_bf16", lambda d="cpu": bf16)
    monkeypatch.setattr(device, "int8_available", lambda: True)
    monkeypatch.setattr(device, "bf16_runs", lambda: True)
    for kind in ("translator", "charlm", "classifier"):
        assert resolve_precision("auto", "cpu", kind) == Precision(bf16, False)
    assert resolve_precision("bf16", "cpu") == Precision(True, False)
    assert resolve_precision("fp32", "cpu") == Precision(False, False)
    assert resolve_precision("int8", "cpu", "charlm") == Precision(bf16, True)


def test_precision_errors_say_what_is_wrong(monkeypatch):
    with pytest.raises(UserError, match="--precision must be one of auto, bf16, fp32, int8, got 'fp16'"):
        resolve_precision("fp16")
    monkeypatch.setattr(device, "int8_available", lambda: False)
    with pytest.raises(UserError, match="--precision int8 needs a CPU with PyTorch's oneDNN quantized engine"):
        resolve_precision("int8", "cpu")


def test_describe_names_the_machine():
    facts = device.describe()
    assert facts["threads"] >= 1 and facts["torch"].startswith("2.")
    assert set(facts) >= {"cpu", "onednn_isa", "aten_capability", "native_bf16", "int8_engine"}


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


def test_a_bf16_preset_trains_in_fp32_where_bf16_is_not_native(tmp_path, monkeypatch, caplog):
    """The run says so in one line and metrics.jsonl records what ran."""
    import json

    from seq2seq.config import load_preset
    from seq2seq.training import train
    from conftest import SAMPLE_DIR

    monkeypatch.setattr(device, "native_bf16", lambda d="cpu": False)
    cfg = load_preset("tiny-charlm", "charlm", ["train.max_steps=4", "train.eval_every=4", "train.bf16=true"])
    with caplog.at_level("INFO", logger="seq2seq"):
        train(cfg, SAMPLE_DIR, tmp_path / "run")
    assert "computes no bf16 natively; training in fp32" in caplog.text
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["type"] == "precision" and records[0]["train"] == "fp32"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["bf16"] is False
