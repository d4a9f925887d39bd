"""Beam-search summaries and their ROUGE scores (``rouge-score``, with stemming)."""

from __future__ import annotations

import re
from contextlib import nullcontext

import torch
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentence_lines(text: str) -> str:
    """One sentence a line: ROUGE-Lsum compares summaries sentence by sentence."""
    return "\n".join(s for s in _SENTENCE_END.split(" ".join(text.split())) if s)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE F1 (×100) of each type over the pairs; texts one sentence a line."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references, got {len(predictions)} and {len(references)}")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        for kind, score in scorer.score(reference, prediction).items():
            totals[kind] += score.fmeasure
    return {kind: 100 * total / len(predictions) for kind, total in totals.items()}


def repeated_phrase(summary: str, times: int = 3, longest: int = 8) -> str | None:
    """The first phrase (1 to ``longest`` words) that ``summary`` repeats ``times`` times in a row, or None.

    Such loops (``cep cep cep``, ``the cells of the cells of the cells of``) mark a degenerate summary.
    """
    words = summary.split()
    for n in range(1, longest + 1):
        for i in range(len(words) - n * times + 1):
            phrase = words[i : i + n]
            if all(words[i + k * n : i + (k + 1) * n] == phrase for k in range(1, times)):
                return " ".join(phrase)
    return None


@torch.no_grad()
def summarize(
    model,
    tokenizer,
    texts: list[str],
    *,
    device: torch.device,
    batch_size: int = 8,
    max_source_length: int = 512,
    max_new_tokens: int = 128,
    num_beams: int = 4,
    no_repeat_ngram_size: int = 3,
    min_new_tokens: int = 0,
    length_penalty: float = 1.0,
    progress=None,
) -> list[str]:
    """Beam-search summaries of ``texts``, one sentence a line.

    ``no_repeat_ngram_size``, ``min_new_tokens`` and ``length_penalty`` are the settings BART's
    summarization configs use against repetition and too-short summaries (0: off).
    """
    was_training = model.training
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    summaries = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size], max_length=max_source_length, truncation=True, padding=True,
            return_tensors="pt",
        ).to(device)  # fmt: skip
        with autocast:
            output = model.generate(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=num_beams,
                max_new_tokens=max_new_tokens, early_stopping=True, no_repeat_ngram_size=no_repeat_ngram_size,
                min_new_tokens=min_new_tokens, length_penalty=length_penalty,
            )  # fmt: skip
        summaries += [sentence_lines(s) for s in tokenizer.batch_decode(output, skip_special_tokens=True)]
        if progress is not None:
            progress.update(len(batch["input_ids"]))
    model.train(was_training)
    return summaries
