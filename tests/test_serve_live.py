"""seq2seq serve as a process on 127.0.0.1 (port 0), read with httpx: streaming, continuous
batching of streams, disconnects, and the drain on SIGTERM."""
import json
import signal
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx", reason="the [serve] extra is not installed")
pytest.importorskip("uvicorn", reason="the [serve] extra is not installed")

from conftest import ROOT  # noqa: E402

LM = ROOT / "checkpoints" / "shakespeare"


def start_server(tmp_path, *args) -> tuple[subprocess.Popen, str]:
    ready = tmp_path / "port"
    process = subprocess.Popen([sys.executable, "-m", "seq2seq.cli", "serve", "--port", "0", "--ready-file", ready,
                                *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited {process.returncode}: {process.stdout.read()}")
        if ready.is_file() and ready.read_text().strip():
            url = f"http://127.0.0.1:{ready.read_text().strip()}"
            if httpx.get(url + "/health").status_code == 200:
                return process, url
        time.sleep(0.1)
    process.kill()
    raise AssertionError("the server did not become ready in 120 s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process, url = start_server(tmp_path_factory.mktemp("serve"), "--lm", LM, "--max-chars", 100_000)
    yield url
    process.send_signal(signal.SIGTERM)
    process.wait(30)


def read_events(response):
    """(event, data) pairs of a server-sent event stream, as they arrive."""
    event = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            yield event, json.loads(line[len("data: "):])


def test_a_stream_arrives_before_it_ends_and_equals_the_whole_result(server):
    body = {"prompt": "ROMEO:", "max_chars": 600, "temperature": 0.8, "seed": 3}
    whole = httpx.post(server + "/v1/generate", json=body, timeout=60).json()["text"]
    pieces, first_at, live_after_first = [], None, None
    started = time.monotonic()
    with httpx.stream("POST", server + "/v1/generate", json={**body, "stream": True}, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for event, data in read_events(response):
            if event == "text":
                if first_at is None:
                    first_at = time.monotonic() - started
                    live_after_first = httpx.get(server + "/health").json()["live_streams"]
                pieces.append(data["text"])
            elif event == "done":
                done = data
    assert live_after_first == 1  # the first characters came while the rest was still being generated
    assert "".join(pieces) == whole == done["text"] and done["chars"] == 600
    assert first_at < time.monotonic() - started


def test_a_client_that_leaves_is_dropped_from_the_batch(server):
    with httpx.stream("POST", server + "/v1/generate", json={"prompt": "A", "max_chars": 100_000, "stream": True},
                      timeout=60) as response:
        events = read_events(response)  # kept: closing the line iterator would close the response
        assert next(events)[0] == "text"
        assert httpx.get(server + "/health").json()["live_streams"] == 1
    for _ in range(100):  # the server notices at its next write
        if httpx.get(server + "/health").json()["live_streams"] == 0:
            break
        time.sleep(0.05)
    assert httpx.get(server + "/health").json()["live_streams"] == 0


def test_concurrent_streams_share_batched_steps(server):
    results = {}

    def ask(seed):
        body = {"prompt": "KING:", "max_chars": 300, "temperature": 1.0, "seed": seed}
        results[seed] = httpx.post(server + "/v1/generate", json=body, timeout=60).json()["text"]

    threads = [threading.Thread(target=ask, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alone = httpx.post(server + "/v1/generate", json={"prompt": "KING:", "max_chars": 300, "temperature": 1.0,
                                                       "seed": 5}, timeout=60).json()["text"]
    assert len(set(results.values())) == 8 and all(len(text) == 300 for text in results.values())
    # a seed's text does not depend on which streams shared its steps (fp rounding aside: the
    # batched product may round differently, so the check allows a late divergence)
    same = next((i for i, (a, b) in enumerate(zip(alone, results[5])) if a != b), 300)
    assert same >= 50, (alone, results[5])


def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0(tmp_path):
    process, url = start_server(tmp_path, "--lm", LM)
    outcome = {}

    def long_request():
        outcome["response"] = httpx.post(url + "/v1/generate", json={"prompt": "A", "max_chars": 1500, "seed": 1},
                                         timeout=60)

    thread = threading.Thread(target=long_request)
    thread.start()
    for _ in range(200):
        if httpx.get(url + "/health").json().get("live_streams") == 1:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    refused = httpx.post(url + "/v1/generate", json={"prompt": "A", "max_chars": 5}, timeout=10)
    assert refused.status_code == 503 and "draining" in refused.json()["error"]
    assert httpx.get(url + "/health").status_code == 503
    thread.join(60)
    assert outcome["response"].status_code == 200 and len(outcome["response"].json()["text"]) == 1500
    assert process.wait(30) == 0
    log = process.stdout.read()
    assert "draining: 1 request(s) in flight" in log and "Traceback" not in log
