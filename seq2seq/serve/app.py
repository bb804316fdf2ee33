"""The HTTP API and the page: FastAPI routes over the workers of `seq2seq.serve.workers`.

Every error is JSON `{"error": ..., "type": ...}` with its status; a traceback only reaches the
server's log. Models are chosen when the server starts, never by a request.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from dataclasses import asdict
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from seq2seq.serve.limits import Limits
from seq2seq.serve.workers import QueueFull, Stream

log = logging.getLogger("seq2seq.serve")

STREAM_FLUSH_S = 0.02


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TranslateRequest(Strict):
    texts: list[str] = Field(min_length=1)
    beam: int = Field(5, ge=1)
    nbest: int = Field(1, ge=1)
    attention: bool = False
    length_penalty: float = Field(1.0, ge=0.0, le=5.0)

    @model_validator(mode="after")
    def nbest_within_beam(self):
        if self.nbest > self.beam:
            raise ValueError(f"nbest ({self.nbest}) cannot exceed beam ({self.beam})")
        return self


class GenerateRequest(Strict):
    prompt: str = ""
    max_chars: int = Field(200, ge=1)
    temperature: float = Field(0.8, ge=0.0, le=10.0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False


class ClassifyRequest(Strict):
    texts: list[str] = Field(min_length=1)


def error(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "type": kind}, status_code=status, headers=headers)


class Gate:
    """The server's state as requests see it: loading, serving or draining, and how many API
    requests are in flight (a drain waits for them)."""

    def __init__(self):
        self.ready = threading.Event()
        self.failed: str | None = None
        self.draining = False
        self.in_flight = 0
        self.idle = threading.Condition()

    def enter(self) -> None:
        with self.idle:
            self.in_flight += 1

    def leave(self) -> None:
        with self.idle:
            self.in_flight -= 1
            self.idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self.idle:
            return self.idle.wait_for(lambda: self.in_flight == 0, timeout)


class ApiGate:
    """ASGI middleware: API requests in flight are counted, refused with 503 while loading or
    draining, and a body past the limit is answered 413 before it is parsed."""

    def __init__(self, app, gate: Gate, limit: int):
        self.app, self.gate, self.limit = app, gate, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        if self.gate.draining or not self.gate.ready.is_set():
            state = "draining" if self.gate.draining else self.gate.failed or "loading"
            return await error(503, "unavailable", f"the server is {state}", {"Retry-After": "1"})(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error(413, "too_large", f"request body of {int(length)} bytes; the limit is {self.limit}")(
                scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, "too_large", f"request body over {self.limit} bytes")
            return message

        self.gate.enter()
        try:
            await self.app(scope, counted, send)
        finally:
            self.gate.leave()


def create_app(models, limits: Limits, api_keys: list[str] | None = None, cors_origins: list[str] | None = None,
               gate: Gate | None = None) -> FastAPI:
    """The app over `models` (a `seq2seq.serve.models.Models`, loaded or loading)."""
    # /openapi.json describes the API; no /docs page, whose Swagger UI would load from a CDN
    app = FastAPI(title="seq2seq", version="1", summary="Translation, generation and classification with "
                  "recurrent models, batched across requests.", docs_url=None, redoc_url=None)
    gate = gate or models.gate
    app.state.models, app.state.limits, app.state.gate = models, limits, gate
    app.state.keys = [k.encode() for k in api_keys or []]
    app.add_exception_handler(ApiError, lambda request, e: error(e.status, e.kind, e.message, e.headers))
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(Exception, internal_error)
    app.include_router(router)
    app.add_middleware(ApiGate, gate=gate, limit=limits.max_body_bytes)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    return app


async def invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0]
    where = ".".join(str(part) for part in first["loc"] if part != "body")
    message = first["msg"].removeprefix("Value error, ")  # a check across fields names them itself
    return error(422, "invalid_request", f"{where}: {message}" if where else message)


async def internal_error(request: Request, e: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path, exc_info=e)
    return error(500, "internal", "internal error; the server's log has the details")


def authorise(request: Request) -> None:
    keys = request.app.state.keys
    if not keys:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # every key is compared, each in constant time, so timing tells nothing of which matched
    matched = [hmac.compare_digest(given.strip().encode(), key) for key in keys]
    if scheme.lower() != "bearer" or not any(matched):
        raise ApiError(401, "unauthorized", "a valid API key is needed: Authorization: Bearer KEY",
                       {"WWW-Authenticate": "Bearer"})


def check_texts(texts: list[str], limits: Limits) -> None:
    if len(texts) > limits.max_texts:
        raise ApiError(422, "invalid_request", f"texts: {len(texts)} texts; the limit is {limits.max_texts}")
    for i, text in enumerate(texts):
        if len(text) > limits.max_line_chars:
            raise ApiError(413, "too_large", f"texts[{i}]: {len(text)} characters; the limit is {limits.max_line_chars}")


def served_model(request: Request, kind: str):
    authorise(request)
    served = request.app.state.models.served.get(kind)
    if served is None:
        raise ApiError(404, "not_found", f"this server has no {kind} model")
    return served


async def result_of(worker, inputs, size: int, timeout_s: float):
    """The worker's result for `inputs`: 429 when its queue is full, 504 past the deadline."""
    try:
        job = worker.submit(inputs, size)
    except QueueFull:
        raise ApiError(429, "overloaded", "the queue is full; retry later", {"Retry-After": "1"}) from None
    try:
        return await asyncio.wait_for(asyncio.shield(job.future), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(504, "timeout", f"no result within {timeout_s:g} s") from None
    finally:
        job.abandoned = True  # done, timed out or the client left: a worker that has not started it skips it


router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page():
    return HTMLResponse(resources.files("seq2seq.serve").joinpath("page.html").read_text(encoding="utf-8"))


@router.get("/health")
async def health(request: Request):
    gate, models = request.app.state.gate, request.app.state.models
    if gate.failed:
        return error(503, "unavailable", gate.failed)
    if gate.draining or not gate.ready.is_set():
        return JSONResponse({"status": "draining" if gate.draining else "loading"}, status_code=503)
    return {"status": "ok", "in_flight": gate.in_flight, "live_streams": models.live_streams(),
            "queued": models.queued(), "workers": models.statistics()}


@router.get("/v1/models")
async def list_models(request: Request):
    authorise(request)
    state = request.app.state
    return {"models": [served.describe() for served in state.models.served.values()], "limits": asdict(state.limits)}


@router.post("/v1/translate")
async def translate(body: TranslateRequest, request: Request):
    served, limits = served_model(request, "translator"), request.app.state.limits
    if body.beam > limits.max_beam:
        raise ApiError(422, "invalid_request", f"beam: {body.beam}; the limit is {limits.max_beam}")
    check_texts(body.texts, limits)
    translations = await result_of(served.worker, body, len(body.texts), limits.timeout_s)
    return JSONResponse({"model": served.name, "translations": translations})  # plain JSON: no encoder pass


@router.post("/v1/classify")
async def classify(body: ClassifyRequest, request: Request):
    served, limits = served_model(request, "classifier"), request.app.state.limits
    check_texts(body.texts, limits)
    labels = await result_of(served.worker, body.texts, len(body.texts), limits.timeout_s)
    return JSONResponse({"model": served.name, "labels": labels})


@router.post("/v1/generate")
async def generate(body: GenerateRequest, request: Request):
    """One JSON with the whole text, or with `stream` server-sent events as it is generated."""
    served, limits = served_model(request, "charlm"), request.app.state.limits
    if body.max_chars > limits.max_chars:
        raise ApiError(422, "invalid_request", f"max_chars: {body.max_chars}; the limit is {limits.max_chars}")
    if len(body.prompt) > limits.max_line_chars:
        raise ApiError(413, "too_large", f"prompt: {len(body.prompt)} characters; the limit is {limits.max_line_chars}")
    pieces: asyncio.Queue = asyncio.Queue()
    stream = Stream(body.prompt, body.max_chars, body.temperature, body.top_k, body.top_p, body.seed,
                    lambda piece, done: pieces.put_nowait((piece, done)), asyncio.get_running_loop(),
                    pieces=body.stream)
    try:
        served.worker.submit(stream)
    except QueueFull:
        raise ApiError(429, "overloaded", "the queue is full; retry later", {"Retry-After": "1"}) from None
    if body.stream:
        return StreamingResponse(events(stream, pieces, limits.timeout_s), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text = []
    try:
        async with asyncio.timeout(limits.timeout_s):
            done = False
            while not done:  # one piece, the whole text, unless the stream was asked for
                piece, done = await pieces.get()
                if isinstance(piece, Exception):
                    raise piece
                text.append(piece)
    except TimeoutError:
        raise ApiError(504, "timeout", f"no result within {limits.timeout_s:g} s") from None
    finally:
        stream.abandoned = True
    return JSONResponse({"model": served.name, "prompt": body.prompt, "text": "".join(text)})


async def events(stream: Stream, pieces: asyncio.Queue, timeout_s: float):
    """Server-sent events: `text` events with what came since the last one, then `done` with the
    whole text. The stream is abandoned however this ends (a client that leaves cancels it)."""
    text = []
    try:
        async with asyncio.timeout(timeout_s):
            done = False
            while not done:
                piece, done = await pieces.get()
                chunk = [piece]
                while not done and not pieces.empty():  # what else came meanwhile goes in the same event
                    piece, done = pieces.get_nowait()
                    chunk.append(piece)
                if isinstance(chunk[-1], Exception):
                    yield f"event: error\ndata: {json.dumps({'error': 'generation failed', 'type': 'internal'})}\n\n"
                    return
                text.extend(chunk)
                yield f"event: text\ndata: {json.dumps({'text': ''.join(chunk)})}\n\n"
                if not done:  # at most one event a STREAM_FLUSH_S: many streams cost few writes
                    await asyncio.sleep(STREAM_FLUSH_S)
        yield f"event: done\ndata: {json.dumps({'text': ''.join(text), 'chars': stream.produced})}\n\n"
    except TimeoutError:
        yield f"event: error\ndata: {json.dumps({'error': f'no result within {timeout_s:g} s', 'type': 'timeout'})}\n\n"
    finally:
        stream.abandoned = True


def read_api_keys(path: Path) -> list[str]:
    """One key a line; blank lines and lines starting with # are skipped."""
    from seq2seq.errors import UserError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the API keys ({e})") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise UserError(f"{path}: no API key in the file (one a line)")
    return keys

