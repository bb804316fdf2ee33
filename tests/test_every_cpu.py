"""Every command on whatever CPU runs the tests: each tiny preset trains with train.bf16 = true, and
its model translates, generates, classifies, evaluates and serves in every --precision, bf16
being either run or refused in one line. CI runs this file again under emulated older CPUs
(`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`, and `AVX` / `default`), where the shipped
presets once crashed on a bf16 LSTM."""
import json

import pytest

from seq2seq.device import bf16_runs, describe, native_bf16
from conftest import ROOT, SAMPLE_DIR, assert_one_line_error, run_cli

pytestmark = pytest.mark.every_cpu

PRECISIONS = ("auto", "fp32", "int8", "bf16")


@pytest.fixture(scope="module", params=["translator", "charlm", "classifier"])
def bf16_model(request, tmp_path_factory):
    """A tiny preset of each kind trained with bf16 asked for: bf16 where native, else fp32."""
    kind = request.param
    out = tmp_path_factory.mktemp("every-cpu") / kind
    preset = {"translator": "tiny-en-fr", "charlm": "tiny-charlm", "classifier": "tiny-classifier"}[kind]
    result = run_cli("train", kind, "--preset", preset, "--data-dir", SAMPLE_DIR, "--output", out,
                     "--set", "train.bf16=true", "--set", "train.max_epochs=3")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    ran = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["type"] == "precision")
    assert ran["train"] == ("bf16" if native_bf16() else "fp32"), describe()
    return kind, out


def use(kind, folder, precision):
    if kind == "translator":
        return run_cli("translate", "-m", folder, "--precision", precision, "--beam", "3", "A dog runs.")
    if kind == "charlm":
        return run_cli("generate", "-m", folder, "--precision", precision, "--prompt", "the", "--max-chars", "20")
    return run_cli("classify", "-m", folder, "--precision", precision, "a good film")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_each_kind_runs_in_every_precision_or_refuses_bf16_in_one_line(bf16_model, precision):
    kind, folder = bf16_model
    result = use(kind, folder, precision)
    if precision == "bf16" and not bf16_runs():
        assert_one_line_error(result, "--precision bf16: PyTorch's oneDNN runs no bf16", "use --precision fp32")
        return
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "Traceback" not in result.stderr


@pytest.mark.parametrize("precision", ["auto", "int8"])
def test_evaluate_in_auto_and_int8(precision):
    """The released translator scored on the shipped sample pairs, with its shortlist."""
    result = run_cli("evaluate", "-m", ROOT / "checkpoints" / "en-fr", "--src", SAMPLE_DIR / "sample" / "tiny.en",
                     "--ref", SAMPLE_DIR / "sample" / "tiny.fr", "--beam", "2", "--precision", precision, "--json")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert scores["sentences"] == 20 and scores["bleu"] > 20


def test_serve_answers_in_auto_precision(tmp_path):
    pytest.importorskip("uvicorn", reason="the [serve] extra is not installed")
    import signal

    import httpx
    from test_serve_live import start_server

    process, url = start_server(tmp_path, "-m", ROOT / "checkpoints" / "en-fr", "--lm",
                                ROOT / "checkpoints" / "shakespeare")
    try:
        models = httpx.get(url + "/v1/models", timeout=30).json()["models"]
        assert {m["kind"] for m in models} == {"translator", "charlm"}
        reply = httpx.post(url + "/v1/translate", json={"texts": ["A dog runs."]}, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["translations"][0]["text"].startswith("Un chien")
        streamed = httpx.post(url + "/v1/generate", json={"prompt": "ROMEO:", "max_chars": 40, "seed": 1}, timeout=60)
        assert streamed.status_code == 200 and len(streamed.json()["text"]) == 40
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def test_serve_device_auto_takes_the_gpu_where_cuda_is_present(monkeypatch):
    """As --help says; the server itself is replaced, so no GPU is needed to check the choice."""
    pytest.importorskip("uvicorn", reason="the [serve] extra is not installed")
    import torch

    import seq2seq.serve.server
    from seq2seq.cli import parser
    from seq2seq.serve.command import cmd_serve

    chosen = []
    monkeypatch.setattr(seq2seq.serve.server, "serve", lambda *args: chosen.append(args[7]))
    args = parser().parse_args(["serve", "--port", "0", "--lm", str(ROOT / "checkpoints" / "shakespeare")])
    for cuda in (True, False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        cmd_serve(args)
    assert chosen == ["cuda", "cpu"]
