"""The HTTP API and the page: FastAPI routes over the workers of `seq2seq.serve.workers`.

Every error is JSON `{"error": ..., "type": ...}` with its status; a traceback only reaches the
server's log. Models are chosen when the server starts, never by a request. `Guard` checks what
can be checked before a request is parsed (host, key, size, how fast the body comes); a request
whose client leaves, or whose deadline passes, abandons its work (see `seq2seq.serve.workers`).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import threading
import time
from dataclasses import asdict
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException

from seq2seq.limits import decoder_cells
from seq2seq.serve.limits import Limits
from seq2seq.serve.workers import QueueFull, Stream

log = logging.getLogger("seq2seq.serve")

STREAM_FLUSH_S = 0.02
MAX_CONSTRAINTS, MAX_TERM_CHARS = 16, 100  # a request's terminology: each term costs the search a bank


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def valid_unicode(text: str) -> str:
    """JSON may carry a lone surrogate (\\ud800, or bytes ED A0 80), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode: a lone surrogate U+{ord(text[e.start]):04X} at character {e.start}") \
            from None
    return text


Text = Annotated[str, AfterValidator(valid_unicode)]


class TranslateRequest(Strict):
    texts: list[Text] = Field(min_length=1)
    beam: int = Field(5, ge=1)
    nbest: int = Field(1, ge=1)
    attention: bool = False
    length_penalty: float = Field(1.0, ge=0.0, le=5.0)
    split: bool = True  # a text of several sentences: each translated, joined back
    prefix: Text | list[Text] | None = None  # what each translation starts with: one for all, or one a text
    constraints: dict[Text, Text] | None = None  # {source term: target term}, applied where the source occurs

    @model_validator(mode="after")
    def nbest_within_beam(self):
        if self.nbest > self.beam:
            raise ValueError(f"nbest ({self.nbest}) cannot exceed beam ({self.beam})")
        if isinstance(self.prefix, list) and len(self.prefix) != len(self.texts):
            raise ValueError(f"prefix: {len(self.prefix)} prefixes for {len(self.texts)} texts (one a text, "
                             "or one string for all)")
        return self

    def prefixes(self) -> list[str] | None:
        if self.prefix is None:
            return None
        return [self.prefix] * len(self.texts) if isinstance(self.prefix, str) else self.prefix


class GenerateRequest(Strict):
    prompt: Text = ""
    max_chars: int = Field(200, ge=1)
    temperature: float = Field(0.8, ge=0.0, le=10.0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False


class ClassifyRequest(Strict):
    texts: list[Text] = Field(min_length=1)


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


# on every response: no MIME sniffing, no framing by other sites, no referrer sent on
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer")]
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class Guard:
    """ASGI middleware, before any parsing: a Host header this server does not answer to is 421
    (a page elsewhere cannot reach a loopback server through DNS rebinding); API requests are
    refused with 503 while loading or draining, 401 without a valid key, 413 past the body limit
    and 408 when the body does not arrive within `read_timeout_s`; those in flight are counted."""

    def __init__(self, app, gate: Gate, limits: Limits, keys: list[str], hosts: list[str] | None):
        self.app, self.gate, self.limits = app, gate, limits
        self.digests = [hashlib.sha256(key.encode()).digest() for key in keys]
        self.hosts = None if hosts is None else {host.lower().strip("[]") for host in hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def secured(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        headers = dict(scope["headers"])
        host = host_name(headers.get(b"host", b"").decode("latin-1"))
        if self.hosts is not None and host and host not in self.hosts:
            return await error(421, "misdirected", f"this server does not answer to host {host[:100]!r}")(
                scope, receive, secured)
        if not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, secured)
        try:
            self.check(headers)
        except ApiError as e:
            return await error(e.status, e.kind, e.message, e.headers)(scope, receive, secured)
        self.gate.enter()
        try:
            try:
                body = await self.read_body(receive)
            except ApiError as e:
                return await error(e.status, e.kind, e.message, e.headers)(scope, receive, secured)
            if body is None:  # the client left before its body was in
                return
            await self.app(scope, replay(body, receive), secured)
        finally:
            self.gate.leave()

    def check(self, headers: dict) -> None:
        if self.gate.draining or not self.gate.ready.is_set():
            state = "draining" if self.gate.draining else self.gate.failed or "loading"
            raise ApiError(503, "unavailable", f"the server is {state}", {"Retry-After": "1"})
        if self.digests and not self.authorised(headers.get(b"authorization", b"")):
            raise ApiError(401, "unauthorized", "a valid API key is needed: Authorization: Bearer KEY",
                           {"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_body_bytes:
            raise ApiError(413, "too_large", f"request body of {int(length)} bytes; the limit is "
                                             f"{self.limits.max_body_bytes}")

    def authorised(self, header: bytes) -> bool:
        scheme, _, given = header.partition(b" ")
        # digests of equal length, each compared in constant time: timing tells neither which key
        # matched nor how long the keys are
        digest = hashlib.sha256(given.strip()).digest()
        matched = [hmac.compare_digest(digest, key) for key in self.digests]
        return scheme.lower() == b"bearer" and any(matched)

    async def read_body(self, receive) -> bytes | None:
        """The whole body (None if the client left), within the size limit and the read timeout."""
        body, limit = bytearray(), self.limits.max_body_bytes
        deadline = time.monotonic() + self.limits.read_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:  # the rest of the body may still come: the connection is closed
                raise ApiError(408, "timeout", f"the request body did not arrive within "
                                               f"{self.limits.read_timeout_s:g} s", {"Connection": "close"}) from None
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > limit:
                raise ApiError(413, "too_large", f"request body over {limit} bytes", {"Connection": "close"})
            if not message.get("more_body", False):
                return bytes(body)


def replay(body: bytes, receive):
    """An ASGI receive that gives `body` once, then waits on the connection (for its end)."""
    given = False

    async def again():
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}
    return again


def host_name(host: str) -> str:
    """A Host header's name without its port, lower-case: `[::1]:8000` -> `::1`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def create_app(models, limits: Limits, api_keys: list[str] | None = None, cors_origins: list[str] | None = None,
               gate: Gate | None = None, hosts: list[str] | None = None) -> FastAPI:
    """The app over `models` (a `seq2seq.serve.models.Models`, loaded or loading). `hosts`: the
    Host names it answers to (None: any)."""
    # /openapi.json describes the API; no /docs page, whose Swagger UI would load from a CDN
    app = FastAPI(title="seq2seq", version="1", summary="Translation, generation and classification with "
                  "recurrent models, batched across requests.", docs_url=None, redoc_url=None)
    gate = gate or models.gate
    app.state.models, app.state.limits, app.state.gate = models, limits, gate
    app.add_exception_handler(ApiError, lambda request, e: error(e.status, e.kind, e.message, e.headers))
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(ClientGone, lambda request, e: error(499, "client_closed", "the client left"))
    app.add_exception_handler(Exception, internal_error)
    app.include_router(router)
    app.add_middleware(Guard, gate=gate, limits=limits, keys=api_keys or [], hosts=hosts)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    return app


async def invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0]
    where = ".".join(str(part) for part in first["loc"] if part != "body")
    message = first["msg"].removeprefix("Value error, ")  # a check across fields names them itself
    return error(422, "invalid_request", f"{where}: {message}" if where else message)


HTTP_KINDS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}


async def http_error(request: Request, e: HTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own errors (no route, wrong method, a body that is not JSON) in
    the one shape."""
    if e.status_code == 404:
        message = f"no route {request.url.path[:200]}"
    elif e.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path[:200]}"
    elif e.status_code == 400 and e.__cause__ is not None:
        message = f"the body is not JSON that can be read: {str(e.__cause__)[:200]}"
    else:
        message = str(e.detail)
    return error(e.status_code, HTTP_KINDS.get(e.status_code, "http_error"), message, e.headers)


async def internal_error(request: Request, e: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path, exc_info=e)
    return error(500, "internal", "internal error; the server's log has the details")


def check_texts(texts: list[str], limits: Limits) -> None:
    if len(texts) > limits.max_texts:
        raise ApiError(422, "invalid_request", f"texts: {len(texts)} texts; the limit is {limits.max_texts}")
    for i, text in enumerate(texts):
        if len(text) > limits.max_line_chars:
            raise ApiError(413, "too_large", f"texts[{i}]: {len(text)} characters; the limit is {limits.max_line_chars}")


def served_model(request: Request, kind: str):
    served = request.app.state.models.served.get(kind)
    if served is None:
        raise ApiError(404, "not_found", f"this server has no {kind} model")
    return served


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


async def client_left(request: Request) -> None:
    """Returns when the client closes the connection (its body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def answer(request: Request, future: asyncio.Future, timeout_s: float):
    """`future`'s result; 504 past `timeout_s`; `ClientGone` when the client leaves first."""
    gone = asyncio.ensure_future(client_left(request))
    try:
        done, _ = await asyncio.wait({future, gone}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if future in done:
        return future.result()
    if gone in done:
        raise ClientGone
    raise ApiError(504, "timeout", f"no result within {timeout_s:g} s")


async def result_of(request: Request, worker, inputs, size: int, timeout_s: float):
    """The worker's result for `inputs`: 429 when its queue is full, 504 past the deadline."""
    try:
        job = worker.submit(inputs, size)
    except QueueFull:
        raise ApiError(429, "overloaded", "the queue is full; retry later", {"Retry-After": "1"}) from None
    try:
        return await answer(request, job.future, timeout_s)
    finally:
        job.abandoned = True  # answered, timed out or the client left: the worker skips or stops it


router = APIRouter()


@cache
def page_and_policy() -> tuple[str, str]:
    """The page, and a Content-Security-Policy that lets only its own inline script and style run
    and its scripts reach only this server."""
    html = resources.files("seq2seq.serve").joinpath("page.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        found = re.findall(f"<{tag}>(.*?)</{tag}>", html, re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(x.encode()).digest()).decode()}'" for x in found)
    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
              "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, policy


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page():
    html, policy = page_and_policy()
    return HTMLResponse(html, headers={"Content-Security-Policy": policy})


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
    state = request.app.state
    return {"models": [served.describe() for served in state.models.served.values()], "limits": asdict(state.limits)}


@router.post("/v1/translate")
async def translate(body: TranslateRequest, request: Request):
    served, limits = served_model(request, "translator"), request.app.state.limits
    if body.beam > limits.max_beam:
        raise ApiError(422, "invalid_request", f"beam: {body.beam}; the limit is {limits.max_beam}")
    check_texts(body.texts, limits)
    if body.constraints and len(body.constraints) > MAX_CONSTRAINTS:
        raise ApiError(422, "invalid_request", f"constraints: {len(body.constraints)} terms; the limit is "
                                               f"{MAX_CONSTRAINTS}")
    for term in [*(body.constraints or {}).keys(), *(body.constraints or {}).values()]:
        if not term.strip() or len(term) > MAX_TERM_CHARS:
            raise ApiError(422, "invalid_request", f"constraints: a term of {len(term)} characters; each is 1 "
                                                   f"to {MAX_TERM_CHARS}")
    for i, prefix in enumerate(body.prefixes() or []):
        if len(prefix) > limits.max_line_chars:
            raise ApiError(413, "too_large", f"prefix[{i}]: {len(prefix)} characters; the limit is "
                                             f"{limits.max_line_chars}")
    lengths = [len(ids) for ids in served.tokenizer.encode([text.strip() for text in body.texts])]
    cells = decoder_cells(body.beam, lengths, served.max_len_ratio)
    if cells > limits.max_work:
        raise ApiError(413, "too_large", f"texts: beam x output steps x source pieces comes to {cells:,} for this "
                                         f"request; the limit is {limits.max_work:,} (fewer or shorter texts, or "
                                         "a smaller beam)")
    translations = await result_of(request, served.worker, body, len(body.texts), limits.timeout_s)
    return JSONResponse({"model": served.name, "translations": translations})  # plain JSON: no encoder pass


@router.post("/v1/classify")
async def classify(body: ClassifyRequest, request: Request):
    served, limits = served_model(request, "classifier"), request.app.state.limits
    check_texts(body.texts, limits)
    labels = await result_of(request, served.worker, body.texts, len(body.texts), limits.timeout_s)
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
    whole = asyncio.get_running_loop().create_future()

    def deliver(piece, done):
        if body.stream:
            pieces.put_nowait((piece, done))
        elif done and not whole.done():
            whole.set_result(piece)  # unstreamed: the whole text (or the error), once
    stream = Stream(body.prompt, body.max_chars, body.temperature, body.top_k, body.top_p, body.seed, deliver,
                    asyncio.get_running_loop(), pieces=body.stream)
    try:
        served.worker.submit(stream)
    except QueueFull:
        raise ApiError(429, "overloaded", "the queue is full; retry later", {"Retry-After": "1"}) from None
    if body.stream:
        return StreamingResponse(events(stream, pieces, limits.timeout_s), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        text = await answer(request, whole, limits.timeout_s)
    finally:
        stream.abandoned = True  # answered, timed out or the client left: the stream leaves the batch
    if isinstance(text, Exception):
        raise text
    return JSONResponse({"model": served.name, "prompt": body.prompt, "text": text})


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


MIN_KEY_CHARS = 16


def read_api_keys(path: Path) -> list[str]:
    """One key a line; blank lines and lines starting with # are skipped. The file must be readable
    by its owner only, and each key at least MIN_KEY_CHARS long."""
    import os
    import stat

    from seq2seq.errors import UserError

    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the API keys ({e})") from None
    if mode & 0o077:
        raise UserError(f"{path}: readable by others (mode {mode:o}); run chmod 600 {path}")
    keys = []
    for number, line in enumerate(lines, 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if len(key) < MIN_KEY_CHARS:
            raise UserError(f"{path}, line {number}: a key of {len(key)} characters; keys need at least "
                            f"{MIN_KEY_CHARS} (python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        keys.append(key)
    if not keys:
        raise UserError(f"{path}: no API key in the file (one a line)")
    return keys
