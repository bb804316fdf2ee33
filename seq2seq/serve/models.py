"""The models a server holds: each loaded once at start, with the worker that runs it."""
from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from seq2seq import inference, search
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
    tokenizer: object = None
    max_len_ratio: float = 2.0
    description: dict | None = None

    def describe(self) -> dict:
        """Name, kind, size, precision and scores, read from the folder once: a request never
        touches the disk, and a non-finite score (which JSON cannot hold) is null."""
        if self.description is None:
            metrics_file = self.folder / "metrics.json"
            try:
                metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else {}
            except (OSError, ValueError) as e:
                log.warning("%s: scores not read (%s)", metrics_file, e)
                metrics = {}
            metrics = metrics if isinstance(metrics, dict) else {}
            scores = {k: v for k, v in (metrics.get("best") or {}).items() if k.startswith(("dev_", "valid_"))}
            scores.update({f"test_{k}": v for k, v in (metrics.get("test") or {}).items()})
            scores = {k: v if isinstance(v, (int, float)) and math.isfinite(v) else None for k, v in scores.items()}
            card = self.folder / "README.md"
            self.description = {"name": self.name, "kind": self.kind, "parameters": self.parameters,
                                "precision": self.precision, "scores": scores,
                                "model_card": card.name if card.is_file() else None}
        return self.description


def translate_batch(model, tokenizer, precision, lang: str = "en"):
    """A `BatchWorker` call: translation requests (with their own beam, n-best and attention) as
    few decodes as their settings allow. A group whose clients have all gone is skipped, and a
    decode stops at the step after its last client leaves."""
    def run(jobs: list) -> list:
        requests = [job.inputs for job in jobs]
        results: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            terms = tuple(sorted((r.constraints or {}).items()))
            groups.setdefault((r.beam, r.length_penalty, r.attention, r.split, terms), []).append(i)
        for (beam, penalty, attention, split, terms), chosen in sorted(groups.items()):
            if all(jobs[i].abandoned for i in chosen):
                continue
            texts = [text for i in chosen for text in requests[i].texts]
            prefixes = [p for i in chosen for p in requests[i].prefixes() or [""] * len(requests[i].texts)]
            prefixes = prefixes if any(prefixes) else None
            nbest = max(requests[i].nbest for i in chosen)
            done = iter(inference.translations(model, tokenizer, texts, beam=beam, nbest=nbest,
                                               length_penalty=penalty, precision=precision, attention=attention,
                                               stop=lambda: all(jobs[i].abandoned for i in chosen),
                                               split=lang if split else None, prefixes=prefixes,
                                               glossary=dict(terms) or None))
            for i in chosen:
                results[i] = [_translation(next(done), requests[i].nbest, attention) for _ in requests[i].texts]
        if all(result is None for result in results):
            raise search.Stopped
        return results
    return run


def _translation(found: inference.Translation, nbest: int, attention: bool) -> dict:
    hyps = found.nbest[:nbest]
    out = {"text": hyps[0][0], "score": hyps[0][1], "nbest": [{"text": t, "score": s} for t, s in hyps]}
    if attention:
        a = found.attention
        out["attention"] = None if a is None else {
            "source": a.source, "target": a.target, "weights": [[round(w, 5) for w in row] for row in a.weights.tolist()]}
        out["alignments"] = "" if a is None else " ".join(f"{i}-{j}" for i, j in inference.word_alignments(a))
    return out


def classify_batch(model, tokenizer, cfg, precision):
    def run(jobs: list) -> list:
        requests = [job.inputs for job in jobs]
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
        except Exception:  # the server stays up and says so: /health 503, the reason in the log only
            log.exception("loading the models failed")
            self.gate.failed = "loading the models failed; the server's log says why"
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
            run = translate_batch(model, tokenizer, precision, cfg.data.src_lang) if kind == "translator" else \
                classify_batch(model, tokenizer, cfg, precision)
            worker = BatchWorker(kind, run, limits.max_batch, limits.batch_wait_ms / 1000, limits.max_queue)
        worker.start()
        served = ServedModel(Path(folder).name, kind, Path(folder), sum(p.numel() for p in model.parameters()),
                             worker, precision.name, tokenizer)
        served.describe()
        return served

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
