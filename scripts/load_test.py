"""Load test of `seq2seq serve`, batched against the same server with batching off, side by side.

  python scripts/load_test.py                      # translate at 1/8/32 clients, streams at 1/4/16
  python scripts/load_test.py --soak 10000         # also 10,000 mixed requests: statuses, memory growth

It starts two servers on 127.0.0.1 (the released models, or -m/--lm): one as configured, one with
`--max-batch 1`, and measures each in turn with closed-loop clients (asyncio + httpx; each client
sends its next request when the last is answered), bounded by --requests and --seconds per level.
Translation: one sentence a request, greedy and beam 5: requests/s, p50 and p99 latency.
Generation: N concurrent streams: time to first character (p50/p99) and total characters/s.
Prints one JSON object (and writes it to --output).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = ["Two dogs play in the snow.", "I would like a cup of coffee, please.", "Where is the train station?",
             "She reads a book every evening.", "The children are playing in the park.", "We have no time left.",
             "A man in a red shirt is riding a bicycle.", "Tom doesn't know what to do.", "It is raining again.",
             "My brother lives in a small town near the sea."]


def relative(path: Path) -> str:
    """A path inside the repository as it is named from the root: the JSON names no machine's folders."""
    return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def start(args, extra: list[str], folder: Path) -> tuple[subprocess.Popen, str]:
    ready = folder / f"port{len(list(folder.iterdir()))}"
    models = ["-m", str(args.model), "--lm", str(args.lm), "--classifier", str(args.classifier)]
    command = [sys.executable, "-m", "seq2seq.cli", "serve", "--port", "0", "--ready-file", str(ready),
               "--max-chars", "100000", "--max-queue", "4096", *models, *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if ready.is_file() and ready.read_text().strip():
            url = f"http://127.0.0.1:{ready.read_text().strip()}"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    return process, url
            except httpx.TransportError:
                pass
        if process.poll() is not None:
            raise SystemExit(f"load_test: the server exited with {process.returncode}: {' '.join(command)}")
        time.sleep(0.2)
    process.kill()
    raise SystemExit("load_test: the server was not ready in 120 s")


async def closed_loop(url: str, clients: int, requests: int, seconds: float, body_of) -> dict:
    """`clients` clients each sending `body_of(i)` to /v1/translate in turn until `requests` are
    answered or `seconds` pass."""
    latencies, statuses, sent = [], {}, 0
    deadline = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient):
        nonlocal sent
        while sent < requests and time.monotonic() < deadline:
            sent += 1
            started = time.perf_counter()
            response = await http.post(url + "/v1/translate", json=body_of(sent))
            latencies.append(time.perf_counter() - started)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await client_warmup(http, url, body_of)
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - started
    return {"clients": clients, "requests": len(latencies), "requests_per_s": round(len(latencies) / wall, 1),
            "p50_ms": round(1000 * percentile(latencies, 0.5), 1), "p99_ms": round(1000 * percentile(latencies, 0.99), 1),
            "statuses": statuses}


async def client_warmup(http: httpx.AsyncClient, url: str, body_of) -> None:
    for i in range(3):
        await http.post(url + "/v1/translate", json=body_of(i))


async def streams(url: str, count: int, max_chars: int) -> dict:
    """`count` concurrent streamed generations: time to first character and characters/s in all."""
    first, chars = [], []

    async def one(http: httpx.AsyncClient, seed: int):
        started, seen = time.perf_counter(), 0
        body = {"prompt": "ROMEO:", "max_chars": max_chars, "temperature": 0.8, "seed": seed, "stream": True}
        async with http.stream("POST", url + "/v1/generate", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and seen == 0:
                    first.append(time.perf_counter() - started)
                if line.startswith("data: "):
                    seen += 1
        chars.append(max_chars)

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=count + 4)) as http:
        await one(http, 0)  # warm-up
        first.clear()
        chars.clear()
        started = time.perf_counter()
        await asyncio.gather(*(one(http, seed) for seed in range(count)))
        wall = time.perf_counter() - started
    return {"streams": count, "chars_per_s": round(sum(chars) / wall, 1),
            "first_char_p50_ms": round(1000 * percentile(first, 0.5), 1),
            "first_char_p99_ms": round(1000 * percentile(first, 0.99), 1)}


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def soak(url: str, pid: int, total: int, clients: int = 8) -> dict:
    """`total` mixed requests (translations, generations, bad and hostile ones) from `clients`
    clients: the statuses seen, and resident memory at the 1,000th request and at the last."""
    kinds = [("/v1/translate", {"texts": ["Where is the station?"], "beam": 2}),
             ("/v1/generate", {"prompt": "KING:", "max_chars": 40, "seed": 1}),
             ("/v1/translate", {"texts": ["a"], "beam": 2, "nbest": 3}),  # 422
             ("/v1/generate", {"prompt": "A", "max_chars": 10 ** 9}),  # 422
             ("/v1/translate", {"texts": ["x" * 3000]}),  # 413
             ("/v1/translate", {"texts": [SENTENCES[3]], "beam": 5, "nbest": 2}),
             ("/v1/classify", {"texts": ["great fun"]}),
             ("/v1/translate", {"texts": ["\u200b", SENTENCES[1]], "attention": True}),  # 200, attention null
             ("/v1/translate", {"texts": ["bad \ud800"]}),  # 422
             ("/v1/generate", {"prompt": "KING:", "max_chars": 40, "temperature": 1e-300, "top_p": 1e-300}),
             ("/v1/classify", {"texts": ["\udfff"]}),  # 422
             ("/v1/nowhere", {})]  # 404
    statuses, sent, memory = {}, 0, {}

    async def client(http: httpx.AsyncClient):
        nonlocal sent
        while sent < total:
            sent += 1
            number = sent
            path, body = kinds[number % len(kinds)]
            response = await http.post(url + path, content=json.dumps(body).encode(),  # a lone surrogate as its escape
                                       headers={"content-type": "application/json"})
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if number in (1000, total):
                memory[number] = resident_mb(pid)

    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    memory[total] = resident_mb(pid)
    growth = (memory[total] - memory[1000]) / memory[1000] if 1000 in memory else float("nan")
    return {"requests": total, "statuses": statuses, "rss_mb_at_1000": round(memory.get(1000, float("nan")), 1),
            "rss_mb_at_end": round(memory[total], 1), "rss_growth": round(growth, 4),
            "server_errors": sum(n for status, n in statuses.items() if status >= 500 and status not in (504,))}


def measure(url: str, args) -> dict:
    out = {"translate_greedy": [], "translate_beam5": [], "generate": []}
    for clients in args.clients:
        for name, beam in (("translate_greedy", 1), ("translate_beam5", 5)):
            body = lambda i, beam=beam: {"texts": [SENTENCES[i % len(SENTENCES)]], "beam": beam}  # noqa: E731
            out[name].append(asyncio.run(closed_loop(url, clients, args.requests, args.seconds, body)))
    for count in args.streams:
        out["generate"].append(asyncio.run(streams(url, count, args.stream_chars)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", type=Path, default=ROOT / "checkpoints" / "en-fr",
                   help="translator folder (default: the released en-fr)")
    p.add_argument("--lm", type=Path, default=ROOT / "checkpoints" / "shakespeare",
                   help="character model folder (default: the released shakespeare)")
    p.add_argument("--classifier", type=Path, default=ROOT / "checkpoints" / "sst2",
                   help="classifier folder, for the soak (default: the released sst2)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=960, help="requests a level, at most (default 960)")
    p.add_argument("--seconds", type=float, default=30, help="seconds a level, at most (default 30)")
    p.add_argument("--stream-chars", type=int, default=300, help="characters a stream (default 300)")
    p.add_argument("--soak", type=int, default=0, help="then this many mixed requests on the batched server")
    p.add_argument("--output", type=Path, help="also write the JSON here")
    args = p.parse_args()
    result = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
              "settings": {k: relative(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as folder:
        for name, extra in (("batched", []), ("unbatched", ["--max-batch", "1"])):
            process, url = start(args, extra, Path(folder))
            try:
                result[name] = measure(url, args)
                if args.soak and name == "batched":
                    result["soak"] = asyncio.run(soak(url, process.pid, args.soak))
            finally:
                process.terminate()
                process.wait(60)
    for kind in ("translate_greedy", "translate_beam5"):
        result[f"{kind}_speedup"] = [round(b["requests_per_s"] / u["requests_per_s"], 2)
                                     for b, u in zip(result["batched"][kind], result["unbatched"][kind])]
    result["generate_speedup_vs_one_stream"] = [round(g["chars_per_s"] / result["batched"]["generate"][0]["chars_per_s"], 2)
                                                for g in result["batched"]["generate"]]
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
