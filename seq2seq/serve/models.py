"""The models a server holds: each loaded once at start, with the worker that runs it."""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from seq2seq import inference
from seq2seq.device import resolve_precision
from seq2seq.serve.workers import BatchWorker, StreamWorker

log = logging.getLogger("seq2seq.serve")


@dataclass
class ServedModel:
    name: str
    kind: str
    folder: Path
    parameters: int
    worker: BatchWorker | StreamWorker
    precision: str

    def describe(self) -> dict:
        metrics_file = self.folder / "metrics.json"
        metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else {}
        scores = {k: v for k, v in (metrics.get("best") or {}).items() if k.startswith(("dev_", "valid_"))}
        scores.update({f"test_{k}": v for k, v in (metrics.get("test") or {}).items()})
        card = self.folder / "README.md"
        return {"name": self.name, "kind": self.kind, "parameters": self.parameters, "precision": self.precision,
                "scores": scores, "model_card": card.name if card.is_file() else None}


def translate_batch(model, tokenizer, precision):
    """A `BatchWorker` call: translation requests (with their own beam, n-best and attention) as
    few decodes as their beam sizes allow."""
    def run(requests: list) -> list:
        results: list = [None] * len(requests)
        for beam in sorted({r.beam for r in requests}):
            group = [i for i, r in enumerate(requests) if r.beam == beam]
            for penalty in sorted({requests[i].length_penalty for i in group}):
                chosen = [i for i in group if requests[i].length_penalty == penalty]
                texts = [text for i in chosen for text in requests[i].texts]
                nbest = max(requests[i].nbest for i in chosen)
                hyps = iter(inference.translate(model, tokenizer, texts, beam=beam, nbest=nbest,
                                                length_penalty=penalty, precision=precision))
                for i in chosen:
                    results[i] = [_translation(next(hyps)[: requests[i].nbest]) for _ in requests[i].texts]
        for request, translations in zip(requests, results):
            if request.attention:
                for text, translation in zip(request.texts, translations):
                    translation["attention"] = _attention(model, tokenizer, text, request, precision)
        return results
    return run


def _translation(hyps: list[tuple[str, float]]) -> dict:
    return {"text": hyps[0][0], "score": hyps[0][1], "nbest": [{"text": t, "score": s} for t, s in hyps]}


def _attention(model, tokenizer, text: str, request, precision) -> dict | None:
    if not text.strip():
        return None
    weights, source, target = inference.attention_map(model, tokenizer, text, beam=request.beam,
                                                      length_penalty=request.length_penalty, precision=precision)
    return {"source": source, "target": target, "weights": [[round(w, 5) for w in row] for row in weights.tolist()]}


def classify_batch(model, tokenizer, cfg, precision):
    def run(requests: list[list[str]]) -> list:
        texts = [text for texts in requests for text in texts]
        labels = iter(inference.classify(model, tokenizer, texts, cfg.data.normalize, cfg.data.max_tokens,
                                         precision=precision))
        out = []
        for texts in requests:
            out.append([None if (r := next(labels)) is None else {"label": r[0], "probability": r[1]} for _ in texts])
        return out
    return run


class Models:
    """The served models by kind, loaded in a background thread so that /health answers
    (503) while they load; `gate.ready` is set once all are."""

    def __init__(self, folders: dict[str, Path], limits, gate, precision: str = "auto", device: str = "cpu"):
        self.folders, self.limits, self.gate = folders, limits, gate
        self.precision, self.device = precision, device
        self.served: dict[str, ServedModel] = {}

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._load_all, name="model-loader", daemon=True)
        thread.start()
        return thread

    def _load_all(self) -> None:
        try:
            for kind, folder in self.folders.items():
                self.served[kind] = self.load(kind, folder)
                log.info("serving %s %s (%s)", kind, folder, self.served[kind].precision)
        except Exception as e:  # the server stays up and says so: /health 503 with the reason
            log.exception("loading the models failed")
            self.gate.failed = f"loading the models failed: {e}"
            return
        self.gate.ready.set()

    def load(self, kind: str, folder: Path) -> ServedModel:
        from seq2seq.commands import load_kind

        cfg, model, tokenizer = load_kind(folder, kind, self.device)
        limits = self.limits
        precision = resolve_precision(self.precision, torch.device(self.device), kind)
        if kind == "charlm":
            worker = StreamWorker(model, tokenizer, precision, limits.max_streams if limits.max_batch > 1 else 1,
                                  limits.max_queue)
        else:
            run = translate_batch(model, tokenizer, precision) if kind == "translator" else \
                classify_batch(model, tokenizer, cfg, precision)
            worker = BatchWorker(kind, run, limits.max_batch, limits.batch_wait_ms / 1000, limits.max_queue)
        worker.start()
        return ServedModel(Path(folder).name, kind, Path(folder), sum(p.numel() for p in model.parameters()),
                           worker, precision.name)

    def live_streams(self) -> int:
        served = self.served.get("charlm")
        return len(served.worker.live) if served else 0

    def queued(self) -> int:
        return sum(s.worker.jobs.qsize() if isinstance(s.worker, BatchWorker) else s.worker.waiting.qsize()
                   for s in self.served.values())

    def statistics(self) -> dict:
        """Per model: batched calls (or steps) made, texts (or characters) in them, seconds busy."""
        out = {}
        for kind, served in self.served.items():
            w = served.worker
            out[kind] = ({"batches": w.batches, "texts": w.texts, "busy_s": round(w.busy_s, 3)}
                         if isinstance(w, BatchWorker) else {"steps": w.steps, "live_streams": len(w.live)})
        return out

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the workers and wait for them: a worker thread still inside PyTorch when the
        interpreter exits can abort the process ("terminate called without an active exception")."""
        for served in self.served.values():
            served.worker.stop()
        for served in self.served.values():
            served.worker.join(timeout_s)
