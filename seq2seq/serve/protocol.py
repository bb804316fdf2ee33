"""uvicorn's HTTP protocol (httptools), guarded where the ASGI app cannot see: a request's
headers must arrive within `read_timeout_s` of its first byte, and their count and size are
capped. A connection that trickles its headers a byte at a time, or sends megabytes of them, is
answered in the API's error shape and closed instead of held open."""
from __future__ import annotations

import json

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from seq2seq.serve.app import SECURITY_HEADERS

MAX_HEADERS = 100
MAX_HEADER_BYTES = 32_768  # the request line and every header, names and values


class Refused(Exception):
    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


class GuardedHttp(HttpToolsProtocol):
    read_timeout_s = 5.0  # set per server by `guarded_protocol`

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.header_deadline = None
        self.header_bytes = 0
        self.arm()

    def connection_lost(self, exc) -> None:
        self.disarm()
        super().connection_lost(exc)

    def arm(self) -> None:
        if self.header_deadline is None:
            self.header_deadline = self.loop.call_later(self.read_timeout_s, self.headers_too_slow)

    def disarm(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def headers_too_slow(self) -> None:
        self.header_deadline = None
        self.refuse(Refused(408, "timeout", f"the request's headers did not arrive within {self.read_timeout_s:g} s"))

    def data_received(self, data: bytes) -> None:
        """uvicorn's, with the deadline armed when a request starts and refusals in JSON."""
        if self.cycle is None or self.cycle.response_complete:  # these bytes start a request
            self.arm()
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            self.refuse(e.__context__ if isinstance(e.__context__, Refused) else
                        Refused(400, "bad_request", "invalid HTTP request"))
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            self.refuse(Refused(400, "bad_request", "invalid HTTP request"))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.count(len(name) + len(value))
        if len(self.headers) >= MAX_HEADERS:
            raise Refused(431, "too_large", f"more than {MAX_HEADERS} headers")
        super().on_header(name, value)

    def count(self, size: int) -> None:
        self.header_bytes += size
        if self.header_bytes > MAX_HEADER_BYTES:
            raise Refused(431, "too_large", f"request line and headers over {MAX_HEADER_BYTES} bytes")

    def on_headers_complete(self) -> None:
        self.disarm()
        super().on_headers_complete()

    def refuse(self, refused: Refused) -> None:
        if self.transport.is_closing():
            return
        body = json.dumps({"error": refused.message, "type": refused.kind}).encode()
        head = [STATUS_LINE[refused.status], b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body), b"connection: close\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in SECURITY_HEADERS]
        self.transport.write(b"".join(head) + b"\r\n" + body)
        self.transport.close()


def guarded_protocol(read_timeout_s: float) -> type[GuardedHttp]:
    return type("GuardedHttp", (GuardedHttp,), {"read_timeout_s": read_timeout_s})
