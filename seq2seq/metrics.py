"""Scores: sacreBLEU BLEU and chrF (with signatures), bits per character and perplexity."""
from __future__ import annotations

import math

from seq2seq.errors import UserError


def bleu_chrf(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU (13a, cased) and chrF of detokenized hypotheses against raw references."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise UserError("no sentences to score")
    from sacrebleu.metrics import BLEU, CHRF  # here: translating alone need not pay for its import

    bleu, chrf = BLEU(), CHRF()
    return {"bleu": round(bleu.corpus_score(hypotheses, [references]).score, 2),
            "chrf": round(chrf.corpus_score(hypotheses, [references]).score, 2),
            "signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature()),
            "sentences": len(hypotheses)}


def char_scores(total_nats: float, characters: int) -> dict:
    if characters < 1:
        raise UserError("no characters to score: the text needs at least two")
    nats = total_nats / characters
    return {"nats_per_char": nats, "bits_per_char": nats / math.log(2), "perplexity": math.exp(nats),
            "characters": characters}
