"""A paragraph as sentences and back, so that a line of several sentences is translated sentence by
sentence (a model trained on sentences stops after the first one or two otherwise).

Splitting is sentencex's (Wikimedia's multilingual segmenter: rules for some 250 languages, no
model to download, maintained); its segments cover the line exactly, so the whitespace around each
sentence (line breaks, blank lines, the line's own leading and trailing spaces) is kept and put
back around its translation.
"""
from __future__ import annotations

from dataclasses import dataclass

from seq2seq.errors import UserError
from seq2seq.limits import LIMITS


@dataclass
class Part:
    lead: str  # whitespace before the sentence
    text: str  # the sentence, stripped; empty only for a line with no sentence
    trail: str  # whitespace after it


def split(line: str, lang: str = "en") -> list[Part]:
    """The sentences of `line`, at most LIMITS["sentences"]; a line with none is one empty part."""
    from sentencex import segment

    parts: list[Part] = []
    for piece in segment(lang, line):
        text = piece.strip()
        if not text:  # whitespace between sentences belongs to the one before
            if parts:
                parts[-1].trail += piece
            continue
        start = len(piece) - len(piece.lstrip())
        parts.append(Part(piece[:start], text, piece[start + len(text):]))
    if len(parts) > LIMITS["sentences"]:
        raise UserError(f"a line of {len(parts):,} sentences; the limit is {LIMITS['sentences']:,}")
    return parts or [Part("", "", "")]


def join(parts: list[Part], texts: list[str]) -> str:
    """The translated sentences in their places, whitespace as it was; a line with no sentence
    stays empty."""
    if len(parts) == 1 and not parts[0].text:
        return ""
    return "".join(part.lead + text + part.trail for part, text in zip(parts, texts))
