"""What one request may ask for, and how long the server waits; each a `seq2seq serve` option."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Limits:
    """Defaults for a two-core CPU serving the released models."""
    max_body_bytes: int = 1_000_000
    max_line_chars: int = 2_000
    max_texts: int = 64
    max_beam: int = 16
    max_work: int = 20_000_000  # beam x output steps x source pieces of a request (`decoder_cells`)
    max_chars: int = 2_000
    max_batch: int = 64  # texts (or streams) decoded together; 1 turns batching off
    batch_wait_ms: float = 5.0
    max_queue: int = 256
    max_streams: int = 64
    timeout_s: float = 30.0
    read_timeout_s: float = 5.0  # a request's headers, then its body, must arrive within this
