"""seq2seq serve, in process: every route and error status, results equal to the library's,
batching across requests."""
import asyncio
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
from fastapi.testclient import TestClient  # noqa: E402

from seq2seq import checkpoint, inference  # noqa: E402
from seq2seq.serve.app import Gate, create_app  # noqa: E402
from seq2seq.serve.limits import Limits  # noqa: E402
from seq2seq.serve.models import Models  # noqa: E402
from seq2seq.serve.workers import BatchWorker  # noqa: E402
from conftest import ROOT  # noqa: E402

RELEASED = {"translator": ROOT / "checkpoints" / "en-fr", "charlm": ROOT / "checkpoints" / "shakespeare",
            "classifier": ROOT / "checkpoints" / "sst2"}


def loaded(limits: Limits, folders=RELEASED) -> Models:
    models = Models(folders, limits, Gate())
    models.start().join()
    assert models.gate.ready.is_set(), models.gate.failed
    return models


@pytest.fixture(scope="module")
def served():
    models = loaded(Limits(max_texts=4, max_chars=300, max_line_chars=200, max_body_bytes=5_000))
    yield models
    models.stop()


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served, served.limits)) as c:
        yield c


def test_health_and_models_list_the_served_models_and_limits(client):
    assert client.get("/health").json()["status"] == "ok"
    listed = client.get("/v1/models").json()
    assert [m["kind"] for m in listed["models"]] == ["translator", "charlm", "classifier"]
    assert [m["name"] for m in listed["models"]] == ["en-fr", "shakespeare", "sst2"]
    assert all(m["parameters"] > 1_000_000 for m in listed["models"])
    assert listed["models"][2]["scores"]["dev_accuracy"] > 0.8
    assert listed["limits"]["max_texts"] == 4
    assert "/v1/translate" in client.get("/openapi.json").json()["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "<canvas id=\"heatmap\"" in page.text and "http" not in page.text.split(
        "<script>")[0].replace("http-equiv", "")  # nothing loaded from outside the server


def test_translate_nbest_and_scores_equal_the_library_and_attention_rows_sum_to_one(client):
    cfg, model, tokenizer = checkpoint.load(RELEASED["translator"])
    texts = ["Two dogs play in the snow.", "", "I like cheese."]
    response = client.post("/v1/translate", json={"texts": texts, "beam": 4, "nbest": 3, "attention": True})
    assert response.status_code == 200, response.text
    got = response.json()["translations"]
    expected = inference.translate(model, tokenizer, texts, beam=4, nbest=3)
    for translation, hyps in zip(got, expected):
        assert [(h["text"], h["score"]) for h in translation["nbest"]] == hyps
        assert translation["text"] == hyps[0][0]
    scores = [h["score"] for h in got[0]["nbest"]]
    assert scores == sorted(scores, reverse=True) and got[0]["text"].startswith("Deux chiens")
    attention = got[0]["attention"]
    assert got[1]["attention"] is None  # an empty line has nothing to attend to
    weights = torch.tensor(attention["weights"])
    assert weights.shape == (len(attention["target"]), len(attention["source"]))
    assert torch.allclose(weights.sum(1), torch.ones(len(weights)), atol=1e-3)
    assert attention["source"][-1] == attention["target"][-1] == "</s>"


def test_classify_equals_the_library_and_keeps_empty_lines(client):
    cfg, model, tokenizer = checkpoint.load(RELEASED["classifier"])
    texts = ["This movie was absolutely fantastic!", "", "Dull and boring."]
    got = client.post("/v1/classify", json={"texts": texts}).json()["labels"]
    expected = inference.classify(model, tokenizer, texts, cfg.data.normalize, cfg.data.max_tokens)
    assert got[1] is None and expected[1] is None
    assert [(g["label"], g["probability"]) for g in (got[0], got[2])] == [expected[0], expected[2]]
    assert [g["label"] for g in (got[0], got[2])] == ["positive", "negative"]


def test_generate_with_a_seed_equals_the_library(client):
    cfg, model, vocab = checkpoint.load(RELEASED["charlm"])
    body = {"prompt": "ROMEO:", "max_chars": 80, "temperature": 0.8, "top_k": 20, "seed": 7}
    got = client.post("/v1/generate", json=body).json()
    expected = inference.generate(model, vocab, ["ROMEO:"], 80, temperature=0.8, top_k=20, seed=7)[0]
    assert got["text"] == expected and len(expected) == 80
    assert client.post("/v1/generate", json=body).json()["text"] == expected  # repeatable


@pytest.mark.parametrize("body,status,words", [
    ({"texts": ["a"], "beam": 2, "nbest": 3}, 422, "nbest (3) cannot exceed beam (2)"),
    ({"texts": ["a"], "bean": 2}, 422, "bean"),
    ({"texts": []}, 422, "texts"),
    ({"texts": ["a"] * 5}, 422, "texts: 5 texts; the limit is 4"),
    ({"texts": ["a"], "beam": 17}, 422, "beam: 17; the limit is 16"),
    ({"texts": ["a", "b" * 201]}, 413, "texts[1]: 201 characters; the limit is 200"),
    ({"texts": ["a" * 190] * 30}, 413, "the limit is 5000"),
    ({"texts": "a"}, 422, "texts"),
])
def test_bad_translate_requests_get_a_json_error_naming_the_field(client, body, status, words):
    response = client.post("/v1/translate", json=body)
    assert response.status_code == status
    assert set(response.json()) == {"error", "type"} and words in response.json()["error"]


def test_bad_generate_and_body_errors(client):
    over = client.post("/v1/generate", json={"prompt": "A", "max_chars": 301})
    assert over.status_code == 422 and "max_chars: 301; the limit is 300" in over.json()["error"]
    assert client.post("/v1/generate", json={"prompt": "A", "temperature": -1}).status_code == 422
    broken = client.post("/v1/translate", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 422 and broken.json()["type"] == "invalid_request"
    assert client.get("/v1/nothing").status_code == 404


class Blocked:
    """A stand-in for `Models` whose translator worker waits for `release` before each batch."""

    def __init__(self, limits: Limits):
        self.limits, self.gate, self.release, self.started = limits, Gate(), threading.Event(), threading.Event()
        self.gate.ready.set()

        def run(jobs):
            self.started.set()
            self.release.wait(10)
            return [[{"text": t, "score": 0.0, "nbest": []} for t in job.inputs.texts] for job in jobs]

        worker = BatchWorker("translator", run, limits.max_batch, limits.batch_wait_ms / 1000, limits.max_queue)
        worker.start()
        pieces = type("Pieces", (), {"encode": lambda self, texts: [list(text) for text in texts]})()
        self.served = {"translator": type("Served", (), {"worker": worker, "name": "blocked", "tokenizer": pieces,
                                                         "max_len_ratio": 2.0, "describe": lambda self: {}})()}

    def live_streams(self):
        return 0

    def queued(self):
        return self.served["translator"].worker.jobs.qsize()


def test_a_full_queue_gets_429_with_retry_after_and_a_late_result_504():
    fake = Blocked(Limits(max_queue=1, timeout_s=0.5, max_batch=1, batch_wait_ms=0))
    with TestClient(create_app(fake, fake.limits, gate=fake.gate)) as client:
        results = {}

        def ask(name):
            results[name] = client.post("/v1/translate", json={"texts": ["a"]})

        first = threading.Thread(target=ask, args=("first",))
        first.start()
        assert fake.started.wait(5)  # the worker took it, and blocks
        second = threading.Thread(target=ask, args=("second",))
        second.start()
        for _ in range(500):  # until it waits in the queue's one place
            if fake.queued() == 1:
                break
            threading.Event().wait(0.01)
        third = client.post("/v1/translate", json={"texts": ["a"]})
        assert third.status_code == 429 and third.headers["retry-after"] == "1"
        assert third.json()["type"] == "overloaded"
        first.join()
        second.join()
        assert results["first"].status_code == 504 and "no result within 0.5 s" in results["first"].json()["error"]
        fake.release.set()


def test_api_keys_are_required_when_given(served, tmp_path):
    with TestClient(create_app(served, served.limits, api_keys=["s3cret-s3cret-s3cret", "other"])) as client:
        assert client.post("/v1/classify", json={"texts": ["good"]}).status_code == 401
        wrong = client.post("/v1/classify", json={"texts": ["good"]}, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        ok = client.post("/v1/classify", json={"texts": ["good"]}, headers={"authorization": "Bearer other"})
        assert ok.status_code == 200
        assert client.get("/health").status_code == 200  # health and the page stay open
        assert client.get("/").status_code == 200


def test_loading_and_draining_answer_503(served):
    gate = Gate()
    with TestClient(create_app(served, served.limits, gate=gate)) as client:
        assert client.get("/health").status_code == 503
        loading = client.post("/v1/classify", json={"texts": ["good"]})
        assert loading.status_code == 503 and "loading" in loading.json()["error"]
        gate.ready.set()
        assert client.post("/v1/classify", json={"texts": ["good"]}).status_code == 200
        gate.draining = True
        assert client.get("/health").json() == {"status": "draining"}
        assert client.post("/v1/classify", json={"texts": ["good"]}).status_code == 503


def test_a_server_without_a_kind_answers_404(tmp_path):
    models = loaded(Limits(), {"classifier": RELEASED["classifier"]})
    try:
        with TestClient(create_app(models, models.limits)) as client:
            response = client.post("/v1/translate", json={"texts": ["a"]})
            assert response.status_code == 404 and "no translator model" in response.json()["error"]
    finally:
        models.stop()


def test_batch_worker_gathers_concurrent_requests_up_to_its_batch():
    seen = []
    def run(jobs):
        seen.append([job.inputs for job in jobs])
        return [job.inputs for job in jobs]

    worker = BatchWorker("test", run, max_batch=3, wait_s=0.2, max_queue=16)
    worker.start()

    async def main():
        jobs = [worker.submit(i) for i in range(7)]
        return [await job.future for job in jobs]

    assert asyncio.run(main()) == list(range(7))
    assert seen == [[0, 1, 2], [3, 4, 5], [6]]
    worker.stop()


def test_serve_refuses_a_missing_model_folder_a_busy_port_and_a_bad_key_file_in_one_line(tmp_path):
    import socket

    from conftest import assert_one_line_error, run_cli

    result = run_cli("serve", "-m", tmp_path / "none", "--port", "0")
    assert_one_line_error(result, f"{tmp_path / 'none'}: not a model folder")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--classifier", RELEASED["classifier"], "--port", port)
        assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}", "in use")
    keys = tmp_path / "keys.txt"
    keys.write_text("# no key here\n\n")
    keys.chmod(0o644)
    result = run_cli("serve", "--classifier", RELEASED["classifier"], "--port", "0", "--api-key-file", keys)
    assert_one_line_error(result, "keys.txt: readable by others (mode 644); run chmod 600")
    keys.chmod(0o600)
    result = run_cli("serve", "--classifier", RELEASED["classifier"], "--port", "0", "--api-key-file", keys)
    assert_one_line_error(result, "keys.txt: no API key in the file")
    keys.write_text("# a short key\nshort-key\n")
    result = run_cli("serve", "--classifier", RELEASED["classifier"], "--port", "0", "--api-key-file", keys)
    assert_one_line_error(result, "keys.txt, line 2: a key of 9 characters; keys need at least 16")


def documented_requests():
    """(doc, path, body) of each `curl ... localhost:PORT/PATH ... -d 'JSON'` in the README and docs/serve.md."""
    import re
    import shlex

    for doc in (ROOT / "README.md", ROOT / "docs" / "serve.md"):
        text = doc.read_text(encoding="utf-8").replace("\\\n", " ")
        for line in text.splitlines():
            if line.lstrip().startswith("curl "):
                words = shlex.split(line)
                path = re.search(r"localhost:\d+(/\S*)", line).group(1)
                yield doc.name, path, words[words.index("-d") + 1]


@pytest.mark.parametrize("doc,path,body", list(documented_requests()))
def test_documented_curl_requests_succeed(served, doc, path, body):
    import json

    with TestClient(create_app(served, Limits())) as client:  # the default limits, as documented
        response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, (doc, response.text)
    if json.loads(body).get("stream"):
        assert response.text.startswith("event: text") and "event: done" in response.text


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_streams_decoded_together_each_equal_their_own_generation(cell):
    """Continuous batching on a small random model (fp32): streams with different prompts,
    lengths and seeds, joining one batch, each come out as `inference.generate` makes them alone;
    the batch takes as many steps as its longest stream, not the sum."""
    from seq2seq.config import CharLMModel
    from seq2seq.device import FP32
    from seq2seq.models.charlm import CharLM
    from seq2seq.serve.workers import Stream, StreamWorker
    from seq2seq.tokenizer import CharVocab

    torch.manual_seed(0)
    vocab = CharVocab.build("abcdefgh ROME:\n")
    model = CharLM(CharLMModel(cell=cell, emb_dim=16, hidden=24, layers=2, dropout=0.0), len(vocab.chars)).eval()
    asks = [("ROMEO:", 40, 0.0, 1), ("a", 25, 1.0, 7), ("", 33, 0.8, 3), ("bad cafe", 12, 1.0, 11)]
    worker = StreamWorker(model, vocab, FP32, max_streams=8, max_queue=16)

    async def main():
        loop = asyncio.get_running_loop()
        texts = {i: [] for i in range(len(asks))}
        finished = {i: loop.create_future() for i in range(len(asks))}

        def deliver_to(i):
            def deliver(piece, done):
                texts[i].append(piece)
                if done:
                    finished[i].set_result("".join(texts[i]))
            return deliver

        for i, (prompt, chars, temperature, seed) in enumerate(asks):  # queued before the worker starts
            worker.submit(Stream(prompt, chars, temperature, 0, 1.0, seed, deliver_to(i), loop))
        worker.start()
        return [await finished[i] for i in range(len(asks))]

    results = asyncio.run(main())
    worker.stop()
    for (prompt, chars, temperature, seed), text in zip(asks, results):
        alone = inference.generate(model, vocab, [prompt], chars, temperature=temperature, seed=seed, precision=FP32)[0]
        assert text == alone and len(text) == chars
    assert worker.steps == max(chars for _, chars, _, _ in asks)


def test_a_batch_that_fails_is_rerun_job_by_job_so_only_the_culprit_fails():
    batches = []

    def run(jobs):
        batches.append([job.inputs for job in jobs])
        if "poison" in [job.inputs for job in jobs]:
            raise ValueError("poisoned")
        return [job.inputs.upper() for job in jobs]

    worker = BatchWorker("test", run, max_batch=8, wait_s=0.2, max_queue=16)
    worker.start()

    async def main():
        jobs = [worker.submit(text) for text in ("a", "poison", "b", "c")]
        return await asyncio.gather(*(job.future for job in jobs), return_exceptions=True)

    results = asyncio.run(main())
    worker.stop()
    assert results[0] == "A" and results[2:] == ["B", "C"]
    assert isinstance(results[1], ValueError)
    assert batches == [["a", "poison", "b", "c"], ["a"], ["poison"], ["b"], ["c"]]


def test_a_stream_group_whose_sampling_fails_fails_alone(monkeypatch):
    from seq2seq import search
    from seq2seq.config import CharLMModel
    from seq2seq.device import FP32
    from seq2seq.models.charlm import CharLM
    from seq2seq.serve.workers import Stream, StreamWorker
    from seq2seq.tokenizer import CharVocab

    real = search.sampling_probs

    def fragile(log_probs, temperature, top_k=0, top_p=1.0):
        if top_k == 13:
            raise RuntimeError("this group's arithmetic failed")
        return real(log_probs, temperature, top_k, top_p)

    monkeypatch.setattr(search, "sampling_probs", fragile)
    torch.manual_seed(0)
    vocab = CharVocab.build("abcdefgh \n")
    model = CharLM(CharLMModel(cell="lstm", emb_dim=8, hidden=12, layers=1, dropout=0.0), len(vocab.chars)).eval()
    worker = StreamWorker(model, vocab, FP32, max_streams=8, max_queue=16)

    async def main():
        loop = asyncio.get_running_loop()
        outcomes = [loop.create_future() for _ in range(3)]

        def deliver_to(i):
            return lambda piece, done: done and not outcomes[i].done() and outcomes[i].set_result(piece)
        for i, top_k in enumerate((0, 13, 5)):
            worker.submit(Stream("ab", 30, 1.0, top_k, 1.0, i, deliver_to(i), loop, pieces=False))
        worker.start()
        return await asyncio.gather(*outcomes)

    results = asyncio.run(main())
    worker.stop()
    assert isinstance(results[1], RuntimeError)
    assert len(results[0]) == len(results[2]) == 30


def test_the_key_is_checked_before_the_body_is_read(served):
    with TestClient(create_app(served, served.limits, api_keys=["a-key-of-twenty-chars"])) as client:
        anonymous = client.post("/v1/translate", content=b"{not json", headers={"content-type": "application/json"})
        assert anonymous.status_code == 401 and set(anonymous.json()) == {"error", "type"}
        short = client.post("/v1/translate", json={"texts": ["a"]}, headers={"authorization": "Bearer a-key"})
        assert short.status_code == 401  # a prefix of the key is no key


def test_models_are_described_once_and_a_nan_score_is_null(tmp_path):
    import json
    import shutil

    folder = tmp_path / "sst2"
    shutil.copytree(RELEASED["classifier"], folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["best"]["dev_accuracy"] = float("nan")
    (folder / "metrics.json").write_text(json.dumps(metrics))
    models = loaded(Limits(), {"classifier": folder})
    try:
        with TestClient(create_app(models, models.limits)) as client:
            (folder / "metrics.json").write_text("{broken")  # read at start, not at each request
            listed = client.get("/v1/models")
            assert listed.status_code == 200 and listed.json()["models"][0]["scores"]["dev_accuracy"] is None
    finally:
        models.stop()


def test_a_failed_load_shows_no_paths_on_health(tmp_path):
    folder = tmp_path / "secret-place" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    models = Models({"classifier": folder}, Limits(), Gate())
    models.start().join()
    with TestClient(create_app(models, models.limits)) as client:
        response = client.get("/health")
        assert response.status_code == 503 and "secret-place" not in response.text
        assert response.json() == {"error": "loading the models failed; the server's log says why",
                                   "type": "unavailable"}


def test_translate_splits_paragraphs_takes_prefixes_and_returns_alignments(client):
    paragraph = "Two dogs play in the snow. A man in a red shirt rides a bicycle. The children are laughing."
    got = client.post("/v1/translate", json={"texts": [paragraph, "The red car is fast."], "beam": 5,
                                             "attention": True, "prefix": ["", "Une voit"]}).json()["translations"]
    assert got[0]["text"].startswith("Deux chiens") and got[0]["text"].count(".") == 3
    assert got[1]["text"].startswith("Une voiture")
    assert "0-0" in got[0]["alignments"] and len(got[0]["attention"]["target"]) > 8
    whole = client.post("/v1/translate", json={"texts": [paragraph], "split": False}).json()["translations"]
    assert whole[0]["text"].count(".") == 2  # whole, the model stops after two sentences
    one = client.post("/v1/translate", json={"texts": ["Two dogs.", "A cat."], "prefix": "Un"}).json()
    assert all(t["text"].startswith("Un") for t in one["translations"])
    wrong = client.post("/v1/translate", json={"texts": ["a", "b"], "prefix": ["x"]})
    assert wrong.status_code == 422 and "prefix: 1 prefixes for 2 texts" in wrong.json()["error"]
    long = client.post("/v1/translate", json={"texts": ["a"], "prefix": "x" * 201})
    assert long.status_code == 413 and "prefix[0]: 201 characters" in long.json()["error"]


def test_translate_takes_constraints_bounded_like_every_field(client):
    got = client.post("/v1/translate", json={"texts": ["A man rides a bicycle.", "Two dogs play."], "beam": 4,
                                             "constraints": {"bicycle": "bicyclette"}}).json()["translations"]
    assert "bicyclette" in got[0]["text"] and "bicyclette" not in got[1]["text"]
    many = client.post("/v1/translate", json={"texts": ["a"], "constraints": {str(i): "x" for i in range(17)}})
    assert many.status_code == 422 and "constraints: 17 terms; the limit is 16" in many.json()["error"]
    empty = client.post("/v1/translate", json={"texts": ["a"], "constraints": {"a": " "}})
    assert empty.status_code == 422 and "each is 1 to 100" in empty.json()["error"]
