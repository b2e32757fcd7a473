"""CIDEr-D (Vedantam et al. 2015), the captioning metric of the paper's Table 1.

This is a line-for-line port of the scorer in ``pycocoevalcap`` (``cider_scorer.py``, the
code COCO papers report), so the numbers are comparable; the package itself is a 104 MB
wheel (it bundles Stanford CoreNLP for its Java tokenizer), last released in 2020, which is
a lot to install for ~80 lines. ``tests/evaluation/test_cider.py`` pins values computed with
pycocoevalcap 1.2 on fixed inputs.

Two conventions to know when reading the numbers:
  * the scorer returns values around 0..10 (identical captions with informative n-grams
    score ~10); papers, and this project's reports, print **100x** that (COCO CIDEr 38.3 is
    a raw score of 0.383);
  * IDF is computed over the evaluated set's references, so a score needs a corpus of
    several images (with one image every n-gram has IDF 0 and every score is 0).

Tokenisation is deliberately simple (lowercase, punctuation removed, split on whitespace)
instead of the Java PTB tokenizer, which only matters for punctuation-heavy text.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Mapping, Sequence

_PUNCTUATION = re.compile(r"[^\w\s]")


def simple_tokenize(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace: ``"A red, Circle." -> "a red circle"``."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def _ngram_counts(sentence: str, n: int) -> dict[tuple[str, ...], int]:
    words = sentence.split()
    counts: dict[tuple[str, ...], int] = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


class _Vector:
    """TF-IDF weights per n-gram order, their norms, and the length CIDEr-D's penalty uses."""

    def __init__(self, counts: Mapping[tuple[str, ...], int], doc_freq: Mapping, log_n_docs: float, n: int):
        self.weights = [dict() for _ in range(n)]
        self.norms = [0.0] * n
        # pycocoevalcap counts *bigrams* here (``if n == 1``), not words; kept for comparability.
        self.length = 0
        for ngram, tf in counts.items():
            order = len(ngram) - 1
            weight = float(tf) * (log_n_docs - math.log(max(1.0, doc_freq.get(ngram, 0.0))))
            self.weights[order][ngram] = weight
            self.norms[order] += weight * weight
            if order == 1:
                self.length += tf
        self.norms = [math.sqrt(value) for value in self.norms]


def _similarity(hyp: _Vector, ref: _Vector, n: int, sigma: float) -> list[float]:
    """Clipped cosine per n-gram order times a Gaussian penalty on the length difference."""
    delta = float(hyp.length - ref.length)
    penalty = math.exp(-(delta**2) / (2 * sigma**2))
    values = []
    for order in range(n):
        ref_weights = ref.weights[order]
        value = sum(min(w, ref_weights.get(g, 0.0)) * ref_weights.get(g, 0.0) for g, w in hyp.weights[order].items())
        if hyp.norms[order] != 0 and ref.norms[order] != 0:
            value /= hyp.norms[order] * ref.norms[order]
        values.append(value * penalty)
    return values


def cider_d(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    n: int = 4,
    sigma: float = 6.0,
    tokenize: bool = True,
) -> tuple[float, list[float]]:
    """Corpus CIDEr-D (raw scale, ~0..10) and the per-image scores.

    ``candidates[i]`` is the generated caption of image i, ``references[i]`` its reference
    captions (one or more).
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("CIDEr needs at least one caption")
    if any(not refs for refs in references):
        raise ValueError("every image needs at least one reference caption")
    prep = simple_tokenize if tokenize else (lambda s: s)
    test = [_ngram_counts(prep(c), n) for c in candidates]
    refs = [[_ngram_counts(prep(r), n) for r in rs] for rs in references]

    doc_freq: dict[tuple[str, ...], float] = defaultdict(float)
    for image_refs in refs:
        for ngram in {g for ref in image_refs for g in ref}:
            doc_freq[ngram] += 1
    log_n_docs = math.log(float(len(refs)))

    scores = []
    for counts, image_refs in zip(test, refs):
        hyp = _Vector(counts, doc_freq, log_n_docs, n)
        total = [0.0] * n
        for ref_counts in image_refs:
            sims = _similarity(hyp, _Vector(ref_counts, doc_freq, log_n_docs, n), n, sigma)
            total = [a + b for a, b in zip(total, sims)]
        scores.append(10.0 * (sum(total) / n) / len(image_refs))
    return sum(scores) / len(scores), scores


def exact_match(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Fraction of candidates equal (after simple tokenisation) to one of their references."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        return 0.0
    hits = sum(simple_tokenize(c) in {simple_tokenize(r) for r in refs} for c, refs in zip(candidates, references))
    return hits / len(candidates)
