"""What the CPU offers: the bf16 decision the CLI and the Python API take by default."""
from seq2seq import cpu
from seq2seq.inference import decoding_bf16


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


def test_describe_names_the_machine():
    facts = cpu.describe()
    assert facts["threads"] >= 1 and facts["torch"].startswith("2.")
    assert set(facts) >= {"cpu", "avx512_bf16", "amx_bf16", "avx512_vnni", "native_bf16"}
