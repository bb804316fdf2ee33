"""The server's inference workers: one thread per model, fed by a bounded queue, so that the event
loop never runs a model and requests that arrive together share one batched call.

`BatchWorker` gathers the jobs that arrive within `wait_s` of the first (up to `max_batch` texts)
into one call; `StreamWorker` decodes every live generation as one batch, one character a step,
admitting new streams and dropping finished or abandoned ones between steps (continuous batching).

One request fails only itself: a batch that fails is run again one job at a time, and streams are
sampled in groups of like settings, each group on its own. Nobody's work outlives its client: a
job is abandoned when its client leaves or its deadline passes, and a batch whose jobs are all
abandoned stops at its next decoding step.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from seq2seq import inference, search
from seq2seq.models.rnn import select_rows

log = logging.getLogger("seq2seq.serve")


class QueueFull(Exception):
    """The worker's queue holds its maximum: the client should retry later (429)."""


@dataclass
class Job:
    """One request's work: its inputs, the future its result goes to, and whether anyone still
    waits for it (a request past its deadline or whose client left is skipped, not decoded)."""
    inputs: Any
    size: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    abandoned: bool = False

    def resolve(self, result=None, error: BaseException | None = None) -> None:
        def settle():
            if not self.future.done():
                if error is not None:
                    self.future.set_exception(error)
                else:
                    self.future.set_result(result)
        self.loop.call_soon_threadsafe(settle)


class BatchWorker(threading.Thread):
    """Runs `run_batch(jobs) -> results` (one per job) on the jobs gathered from its queue; it may
    raise `search.Stopped` once every job is abandoned."""

    def __init__(self, name: str, run_batch: Callable[[list], list], max_batch: int, wait_s: float, max_queue: int):
        super().__init__(name=f"{name}-worker", daemon=True)
        self.run_batch, self.max_batch, self.wait_s = run_batch, max_batch, wait_s
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.held: Job | None = None  # a job that did not fit the last batch: it leads the next
        self.batches, self.texts, self.busy_s = 0, 0, 0.0  # for /health: how well requests batch

    def submit(self, inputs, size: int = 1) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(inputs, size, loop.create_future(), loop)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job

    def stop(self) -> None:
        self.jobs.put(None)

    def gather(self, first: Job, backlog: bool) -> list[Job]:
        """`first` and the jobs that arrive within the wait, while the batch has room. With a
        backlog (jobs queued while the last batch ran) the batch takes those and goes: waiting
        would only idle a busy worker."""
        jobs, size, until = [first], first.size, time.monotonic() + (0.0 if backlog else self.wait_s)
        while size < self.max_batch:
            try:
                job = self.jobs.get(timeout=max(0.0, until - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self.jobs.put(None)
                break
            if size + job.size > self.max_batch:
                self.held = job
                break
            jobs.append(job)
            size += job.size
        return jobs

    def run(self) -> None:
        while True:
            backlog = self.held is not None or not self.jobs.empty()
            first, self.held = self.held or self.jobs.get(), None
            if first is None:
                return
            jobs = [job for job in self.gather(first, backlog) if not job.abandoned]
            if jobs:
                self.run_jobs(jobs)

    def run_jobs(self, jobs: list[Job]) -> None:
        """One call for `jobs`; where it fails, one call per job, so that a request that breaks
        the batch fails alone and the others get their results."""
        started = time.perf_counter()
        try:
            results = self.run_batch(jobs)
        except search.Stopped:  # every client has gone: nobody to answer
            return
        except Exception as e:
            if len(jobs) > 1:
                log.warning("%s: a batch of %d requests failed (%s); running them one at a time", self.name,
                            len(jobs), e)
                for job in jobs:
                    self.run_jobs([job])
                return
            log.exception("%s: a request failed", self.name)
            jobs[0].resolve(error=e)
            return
        self.batches += 1
        self.texts += sum(job.size for job in jobs)
        self.busy_s += time.perf_counter() - started
        for job, result in zip(jobs, results):
            job.resolve(result)


@dataclass
class Stream:
    """One generation: its prompt and sampling settings, and where its characters go:
    `deliver(text, done)` is called on the event loop's thread (`text` is the exception where
    the step failed)."""
    prompt: str
    max_chars: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    deliver: Callable[[str, bool], None]
    loop: asyncio.AbstractEventLoop
    pieces: bool = True  # deliver each step's character; False: the whole text once, at the end
    abandoned: bool = False
    text: list[str] = field(default_factory=list, repr=False)
    produced: int = 0
    generator: torch.Generator | None = field(default=None, repr=False)


class StreamWorker(threading.Thread):
    """Continuous batching of character-model generations."""

    def __init__(self, model, vocab, precision, max_streams: int, max_queue: int):
        super().__init__(name="generate-worker", daemon=True)
        self.model, self.vocab, self.precision = model, vocab, precision
        self.max_streams = max_streams
        self.waiting: queue.Queue[Stream | None] = queue.Queue(maxsize=max_queue)
        self.live: list[Stream] = []
        self.steps = 0  # batched steps taken, for the tests
        self.stopped = False

    def submit(self, stream: Stream) -> None:
        try:
            self.waiting.put_nowait(stream)
        except queue.Full:
            raise QueueFull from None

    def stop(self) -> None:
        self.stopped = True
        self.waiting.put(None)

    def run(self) -> None:
        with inference.decoding(self.model, self.precision) as decoder:
            state, tokens = None, None
            while not self.stopped:
                first = None if self.live else self.waiting.get()  # idle: wait for a stream
                try:
                    state, tokens = self.admit(decoder, state, tokens, first)
                    if self.live:
                        state, tokens = self.step(decoder, state, tokens)
                except Exception as e:  # the live streams fail; the worker serves the next ones
                    log.exception("generate: step failed")
                    failed, self.live, state, tokens = self.live, [], None, None
                    if failed:
                        failed[0].loop.call_soon_threadsafe(_deliver_all, [(s, e, True) for s in failed])

    def admit(self, decoder, state, tokens, first: Stream | None = None):
        """Start `first` and the waiting streams (each reads its prompt alone) and add them to the batch."""
        while len(self.live) < self.max_streams:
            try:
                stream, first = first or self.waiting.get_nowait(), None
            except queue.Empty:
                break
            if stream is None:
                self.stopped = True
                break
            if stream.abandoned:
                continue
            try:
                own, last = self.prompt_state(decoder, stream)
            except Exception as e:  # this stream fails alone
                log.exception("generate: a stream failed to start")
                stream.loop.call_soon_threadsafe(_deliver_all, [(stream, e, True)])
                continue
            state = own if state is None else _concat(state, own)
            tokens = last if tokens is None else torch.cat([tokens, last])
            self.live.append(stream)
        return state, tokens

    def prompt_state(self, decoder, stream: Stream):
        """The state after `stream`'s prompt and its last character, read alone."""
        prompt = stream.prompt or "\n"  # an empty prompt starts as after a line break
        ids = torch.tensor([self.vocab.encode(prompt, warn=False)], dtype=torch.long)
        own = decoder.start(ids)["hidden"]
        if own is None:  # a one-character prompt: the zero state the model starts from
            own = _zero_state(self.model)
        stream.generator = torch.Generator().manual_seed(stream.seed if stream.seed is not None
                                                         else int(torch.randint(2**62, ())))
        return own, ids[:, -1]

    def step(self, decoder, state, tokens):
        logits, after = decoder.step(tokens, {"hidden": state})
        chosen, failed = self.sample(search.log_probs(logits))
        pieces = [self.vocab.chars[t] for t in chosen.tolist()]
        self.steps += 1
        updates, keep = [], []
        for i, (stream, piece) in enumerate(zip(self.live, pieces)):
            if i in failed:
                updates.append((stream, failed[i], True))
                continue
            stream.produced += 1
            done = stream.produced >= stream.max_chars
            if not stream.pieces:
                stream.text.append(piece)
                piece = "".join(stream.text) if done else None
            if not stream.abandoned and piece is not None:
                updates.append((stream, piece, done))
            if not (done or stream.abandoned):
                keep.append(i)
        if updates:
            updates[0][0].loop.call_soon_threadsafe(_deliver_all, updates)
        hidden = after["hidden"]
        if len(keep) < len(self.live):
            index = torch.tensor(keep, dtype=torch.long)
            self.live = [self.live[i] for i in keep]
            if not keep:
                return None, None
            return select_rows(hidden, index), chosen.index_select(0, index)
        return hidden, chosen

    def sample(self, log_probs: torch.Tensor) -> tuple[torch.Tensor, dict[int, Exception]]:
        """Each stream's next token, drawn with its own generator as `search.sample` draws it;
        streams that sample alike share one pass over their rows, and a group whose draw fails
        fails alone: {row: error} for its rows."""
        groups: dict[tuple, list[int]] = {}
        for i, stream in enumerate(self.live):
            groups.setdefault((stream.temperature, stream.top_k, stream.top_p), []).append(i)
        chosen = torch.zeros(len(self.live), dtype=torch.long)
        failed: dict[int, Exception] = {}
        for (temperature, top_k, top_p), rows in groups.items():
            try:
                if temperature < search.GREEDY_BELOW:
                    chosen[rows] = search.sampler(0.0)(log_probs[rows])
                    continue
                probs = search.sampling_probs(log_probs[rows], temperature, top_k, top_p)
                for j, i in enumerate(rows):
                    chosen[i] = torch.multinomial(probs[j : j + 1], 1, generator=self.live[i].generator)[0, 0]
            except Exception as e:
                log.exception("generate: sampling failed for %d stream(s)", len(rows))
                failed.update((i, e) for i in rows)
        return chosen, failed


def _deliver_all(updates: list) -> None:
    for stream, piece, done in updates:
        stream.deliver(piece, done)


def _concat(a, b):
    """Two RNN states ((layers, batch, size), or an LSTM's pair) as one batch."""
    if isinstance(a, tuple):
        return tuple(torch.cat([x, y.to(x.dtype)], 1) for x, y in zip(a, b))
    return torch.cat([a, b.to(a.dtype)], 1)


def _zero_state(model):
    cfg = model.cfg
    zeros = torch.zeros(cfg.layers, 1, cfg.hidden)
    return (zeros, zeros.clone()) if cfg.cell == "lstm" else zeros
