"""BART's denoising corruption: sentence permutation and text infilling with Poisson span lengths.

Lewis et al. (2020), section 2.2: the document's sentences are shuffled, then spans whose lengths are
drawn from Poisson(λ=3) are each replaced by one ``<mask>`` token (a span of length 0 inserts a mask)
until 30 % of the tokens are masked. The model learns to restore the original text.
"""

from __future__ import annotations

import numpy as np

MASK_RATIO = 0.3
POISSON_LAMBDA = 3.0


def permute_sentences(sentences: list, rng: np.random.Generator) -> list:
    """The sentences in a random order (every sentence kept once)."""
    return [sentences[i] for i in rng.permutation(len(sentences))]


def span_lengths(masked_tokens: int, rng: np.random.Generator, poisson_lambda: float = POISSON_LAMBDA) -> list[int]:
    """Poisson span lengths adding up to exactly ``masked_tokens`` (the last one cut to fit)."""
    lengths, total = [], 0
    while total < masked_tokens:
        length = int(rng.poisson(poisson_lambda))
        lengths.append(min(length, masked_tokens - total))
        total += lengths[-1]
    return lengths


def infill_spans(
    ids: list[int],
    mask_id: int,
    rng: np.random.Generator,
    mask_ratio: float = MASK_RATIO,
    poisson_lambda: float = POISSON_LAMBDA,
) -> list[int]:
    """Text infilling: ``round(mask_ratio·len(ids))`` tokens in non-adjacent spans, each span one ``mask_id``.

    Args:
        ids: (n,) token ids of the text alone (no ``<s>``/``</s>``).
    Returns:
        (n − masked + spans,) ids: the unmasked tokens in their order, a mask where each span was.
    """
    if not 0 <= mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    n = len(ids)
    lengths = span_lengths(round(mask_ratio * n), rng, poisson_lambda)
    kept = n - sum(lengths)
    lengths = lengths[: kept + 1]  # at most one span per gap between kept tokens
    # Each span sits in its own gap between kept tokens (gap g: after the g-th kept token), so no two
    # spans touch and every span becomes exactly one mask.
    gaps = np.sort(rng.choice(kept + 1, size=len(lengths), replace=False)) if lengths else []
    out, position, seen = [], 0, 0
    for gap, length in zip(gaps, lengths):
        out += ids[position : position + gap - seen]
        position += gap - seen
        seen = gap
        out.append(mask_id)
        position += length
    return out + ids[position:]


def denoising_pair(
    sentences: list[list[int]],
    rng: np.random.Generator,
    *,
    mask_id: int,
    bos_id: int,
    eos_id: int,
    mask_ratio: float = MASK_RATIO,
    poisson_lambda: float = POISSON_LAMBDA,
) -> tuple[list[int], list[int]]:
    """``(source, target)`` for one passage given as token ids, one list per sentence.

    The target is the passage as it is; the source is its sentences permuted, then infilled.
    Both are wrapped in ``<s> ... </s>``.
    """
    original = [t for sentence in sentences for t in sentence]
    shuffled = [t for sentence in permute_sentences(sentences, rng) for t in sentence]
    source = infill_spans(shuffled, mask_id, rng, mask_ratio, poisson_lambda)
    return [bos_id, *source, eos_id], [bos_id, *original, eos_id]


def passage(sentences: list[list[int]], start: int, max_tokens: int) -> list[list[int]]:
    """Consecutive sentences from ``start`` while they fit in ``max_tokens`` (a longer first one is cut)."""
    chosen, total = [], 0
    for sentence in sentences[start:]:
        if total + len(sentence) > max_tokens:
            if not chosen:
                chosen.append(sentence[:max_tokens])
            break
        chosen.append(sentence)
        total += len(sentence)
    return chosen
