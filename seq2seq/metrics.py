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


def classification_scores(gold: list[int], predicted: list[int], labels: list[str]) -> dict:
    """Accuracy, macro F1 and the confusion matrix (rows gold, columns predicted, in label order);
    with two classes also the precision, recall and F1 of the second label (the positive class of a
    0/1 data set)."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    if not gold:
        raise UserError("no labelled examples to score")
    classes = len(labels)
    confusion = [[0] * classes for _ in range(classes)]
    for g, p in zip(gold, predicted):
        confusion[g][p] += 1

    def f1(c: int) -> tuple[float, float, float]:
        true_pos = confusion[c][c]
        predicted_c, gold_c = sum(row[c] for row in confusion), sum(confusion[c])
        precision = true_pos / predicted_c if predicted_c else 0.0
        recall = true_pos / gold_c if gold_c else 0.0
        return precision, recall, (2 * precision * recall / (precision + recall) if precision + recall else 0.0)

    scores = {"accuracy": round(sum(confusion[c][c] for c in range(classes)) / len(gold), 4),
              "macro_f1": round(sum(f1(c)[2] for c in range(classes)) / classes, 4),
              "examples": len(gold), "labels": labels, "confusion": confusion}
    if classes == 2:
        precision, recall, f = f1(1)
        scores.update(positive=labels[1], positive_precision=round(precision, 4), positive_recall=round(recall, 4),
                      f1=round(f, 4))
    return scores
