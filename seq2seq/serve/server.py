"""Running the app on uvicorn. SIGTERM (or Ctrl-C) drains: new API requests get 503, those in
flight finish, then the server exits 0; a second signal stops at once."""
from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import uvicorn

from seq2seq.serve.app import LOOPBACK_HOSTS, Gate, create_app
from seq2seq.serve.limits import Limits
from seq2seq.serve.models import Models
from seq2seq.serve.protocol import guarded_protocol

log = logging.getLogger("seq2seq.serve")

DRAIN_TIMEOUT_S = 60.0
SWITCH_INTERVAL_S = 0.0005


def serve(folders: dict[str, Path], host: str, port: int, limits: Limits, api_keys: list[str] | None = None,
          cors_origins: list[str] | None = None, precision: str = "auto", device: str = "cpu",
          ready_file: Path | None = None, allowed_hosts: list[str] | None = None) -> None:
    """Serve `folders` ({kind: model folder}) until a signal has drained the server.
    `ready_file`: where the bound port is written once listening (useful with port 0).
    `allowed_hosts`: Host names answered besides loopback's and `host`'s own."""
    # The event loop and the workers share the GIL; at Python's default switch interval a
    # request's parsing or a response's write can wait a whole interval behind a decoding step.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    gate = Gate()
    models = Models(folders, limits, gate, precision, device)
    hosts = answered_hosts(host, allowed_hosts or [])
    if host not in LOOPBACK_HOSTS and not api_keys:
        log.warning("listening on %s without --api-key-file: anyone who can reach it can use it", host)
    app = create_app(models, limits, api_keys, cors_origins, gate, hosts)
    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False,
                                           timeout_graceful_shutdown=5, http=guarded_protocol(limits.read_timeout_s)),
                            gate, ready_file)
    models.start()
    try:
        server.run()
    finally:
        models.stop()


def answered_hosts(host: str, allowed: list[str]) -> list[str] | None:
    """The Host names the server answers to: loopback's, the address it listens on and `allowed`;
    None (any) when it listens on every address and `allowed` names none."""
    if host in ("0.0.0.0", "::", "") and not allowed:
        return None
    return [*LOOPBACK_HOSTS, host, *allowed]


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose first signal drains before it stops."""

    def __init__(self, config: uvicorn.Config, gate: Gate, ready_file: Path | None = None):
        super().__init__(config)
        self.gate, self.ready_file = gate, ready_file

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        port = self.servers[0].sockets[0].getsockname()[1] if self.servers else self.config.port
        log.info("listening on http://%s:%d", self.config.host, port)
        if self.ready_file is not None:
            Path(self.ready_file).write_text(f"{port}\n", encoding="utf-8")

    def handle_exit(self, sig, frame) -> None:
        if self.gate.draining:
            return super().handle_exit(sig, frame)
        log.info("draining: %d request(s) in flight, new ones get 503", self.gate.in_flight)
        self.gate.draining = True

        def drain():
            if not self.gate.wait_idle(DRAIN_TIMEOUT_S):
                log.warning("drain: %d request(s) still in flight after %g s", self.gate.in_flight, DRAIN_TIMEOUT_S)
            self.should_exit = True

        threading.Thread(target=drain, name="drain", daemon=True).start()
