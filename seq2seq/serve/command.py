"""The `seq2seq serve` command line: its options and the checks made before anything starts.
FastAPI and uvicorn are imported only when the command runs (the `[serve]` extra)."""
from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from seq2seq.errors import UserError

OPTION_HELP = {
    "max_body_bytes": "request bodies over this are refused with 413",
    "max_line_chars": "a text (or prompt) over this many characters is refused with 413",
    "max_texts": "texts in one request (422 past it)",
    "max_beam": "the largest beam a request may ask for (422 past it)",
    "max_work": "a translate request's beam x output steps x source pieces, over all its texts (413 past it)",
    "max_chars": "the most characters a generation may ask for (422 past it)",
    "max_batch": "texts (or streams) decoded together; 1 turns batching across requests off",
    "batch_wait_ms": "how long a batch waits for more requests after its first",
    "max_queue": "requests waiting per model before new ones get 429",
    "max_streams": "generations decoded together; more wait their turn",
    "timeout_s": "a request without its result after this gets 504; its work stops",
    "read_timeout_s": "a request's headers, and then its body, must arrive within this (408 past it)",
}


def add_serve_parser(sub) -> None:
    from seq2seq.commands import add_precision_arg, nonnegative_float, positive_int

    p = sub.add_parser("serve", help="serve models over HTTP with a page to try them (needs the [serve] extra)",
                       description="Without -m/--lm/--classifier: the released models. With any of them: those only.")
    p.add_argument("-m", "--model", type=Path, help="a translator's folder")
    p.add_argument("--lm", type=Path, help="a character model's folder")
    p.add_argument("--classifier", type=Path, help="a classifier's folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--api-key-file", type=Path, help="require `Authorization: Bearer KEY` with a key of this file "
                                                     "(one a line, 16 characters or more; the file readable by "
                                                     "its owner only)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name to answer besides loopback's and --host's (repeatable; with --host 0.0.0.0 "
                        "and none given: any)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN to call the API (repeatable; default: none)")
    p.add_argument("--threads", type=int, default=0,
                   help="threads for the models' arithmetic (default 0: all cores but one, which the HTTP "
                        "server keeps for parsing and writing)")
    p.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)  # the bound port, for tests and scripts
    from seq2seq.serve.limits import Limits

    for f in fields(Limits):
        kind = nonnegative_float if f.type in ("float", float) else positive_int
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                       help=f"{OPTION_HELP[f.name]} (default {f.default})")
    add_precision_arg(p)


def cmd_serve(args) -> None:
    from seq2seq.commands import RELEASED, released_model
    from seq2seq.serve.limits import Limits

    given = {"translator": args.model, "charlm": args.lm, "classifier": args.classifier}
    if any(given.values()):
        folders = {kind: folder for kind, folder in given.items() if folder is not None}
    else:
        folders = {kind: released_model(kind) for kind in RELEASED}
    for kind, folder in folders.items():
        if not (Path(folder) / "config.json").is_file():
            raise UserError(f"{folder}: not a model folder (config.json not found)")
    check_address(args.host, args.port)
    limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})
    try:
        from seq2seq.serve.app import read_api_keys
        from seq2seq.serve.server import serve
    except ImportError as e:
        raise UserError(f"seq2seq serve needs the [serve] extra: pip install -e \".[serve]\" ({e.name} is missing)") \
            from None
    keys = read_api_keys(args.api_key_file) if args.api_key_file else None
    import os

    import torch

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    from seq2seq.device import resolve

    device = resolve(args.device).type  # auto: the GPU where CUDA is present, as --help says
    serve(folders, args.host, args.port, limits, keys, args.cors_origin, args.precision, device, args.ready_file,
          args.allowed_host)


def check_address(host: str, port: int) -> None:
    """A port in use or a host that is not this machine's fails here in one line, before the
    models load (uvicorn would log it in several and exit 3)."""
    import socket

    if not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {port}")
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserError(f"--host {host}: {e.strerror}") from None
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
