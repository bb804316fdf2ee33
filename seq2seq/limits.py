"""The largest sizes a caller may ask for (beam, batch, lengths, samples), checked before any
work: beyond them a request would only exhaust memory. The command line, the Python API and any
server read this one table."""
from __future__ import annotations

from seq2seq.errors import UserError

LIMITS = {"beam": 64, "nbest": 64, "batch_size": 4096, "rows": 16384, "max_len_ratio": 10.0,
          "max_chars": 1_000_000, "num_samples": 1024, "total_chars": 10_000_000, "top_k": 100_000,
          "sentences": 256}  # sentences: of one line, split for translation


def check_limits(**sizes) -> None:
    """One-line errors for sizes outside 1..LIMITS[name] (max_len_ratio: above 0), and for
    batch_size x beam rows or num_samples x max_chars characters past their limits."""
    for name, value in sizes.items():
        if value is None:
            continue
        low = 0 if name == "top_k" else 1
        if name == "max_len_ratio":
            if not 0 < value <= LIMITS[name]:
                raise UserError(f"{name} must be above 0 and at most {LIMITS[name]:g}, got {value:g}")
        elif not low <= value <= LIMITS[name]:
            raise UserError(f"{name} must be between {low} and {LIMITS[name]:,}, got {value:,}")
    if sizes.get("nbest") and sizes.get("beam") and sizes["nbest"] > sizes["beam"]:
        raise UserError(f"nbest {sizes['nbest']} needs a beam of at least {sizes['nbest']}")
    if sizes.get("batch_size") and (sizes.get("beam") or 1) * sizes["batch_size"] > LIMITS["rows"]:
        raise UserError(f"batch_size x beam must be at most {LIMITS['rows']:,} decoder rows, got "
                        f"{sizes['batch_size']} x {sizes.get('beam') or 1}")
    if sizes.get("max_chars") and (sizes.get("num_samples") or 1) * sizes["max_chars"] > LIMITS["total_chars"]:
        raise UserError(f"num_samples x max_chars must be at most {LIMITS['total_chars']:,} characters, got "
                        f"{sizes.get('num_samples') or 1} x {sizes['max_chars']:,}")




def decoder_cells(beam: int, source_lengths: list[int], max_len_ratio: float = 2.0) -> int:
    """The most work a translation can take, in decoder rows x output steps x source positions
    attended, summed over its sentences (of `source_lengths` pieces): what a server caps per request."""
    import torch

    from seq2seq.inference import max_output_lengths  # here: inference imports this module

    if not source_lengths:
        return 0
    lengths = torch.tensor(source_lengths)
    steps = max_output_lengths(lengths, max_len_ratio)
    return int((beam * steps * (lengths + 1) * (lengths > 0)).sum())
