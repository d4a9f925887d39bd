"""The lead baseline: a text's first sentences, cut to the reference summary's length in words."""

from __future__ import annotations

import summary_scoring


def lead_summary(text: str, reference: str) -> str:
    """The first ``len(reference.split())`` words of ``text``, one sentence a line."""
    return summary_scoring.sentence_lines(" ".join(text.split()[: len(reference.split())]))


def lead_rouge(texts: list[str], references: list[str]) -> dict[str, float]:
    """ROUGE (×100) of the lead summaries of ``texts`` against ``references``."""
    predictions = [lead_summary(t, r) for t, r in zip(texts, references)]
    return summary_scoring.rouge(predictions, [summary_scoring.sentence_lines(r) for r in references])
