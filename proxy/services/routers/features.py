"""What a learned router sees of a prompt: its embedding, plus cheap features of the text that an
embedding of the first 256 word pieces misses (how long it is, how much of it is digits and symbols)."""

from __future__ import annotations

import math
import re

import numpy as np

CHEAP_FEATURES = ("log_chars", "log_lines", "digit_share", "symbol_share")
_SYMBOLS = re.compile(r"[=+\-*/^<>()\[\]{}|\\_√∫∑πθ×÷]")


def cheap_features(text: str) -> list[float]:
    chars = max(1, len(text))
    return [
        math.log1p(len(text)),
        math.log1p(text.count("\n")),
        sum(c.isdigit() for c in text) / chars,
        len(_SYMBOLS.findall(text)) / chars,
    ]


def feature_matrix(vectors: np.ndarray, texts: list[str]) -> np.ndarray:
    """(n, dim + cheap) rows: each prompt's embedding and its cheap features."""
    cheap = np.asarray([cheap_features(t) for t in texts], dtype=np.float64).reshape(len(texts), len(CHEAP_FEATURES))
    return np.hstack([np.asarray(vectors, dtype=np.float64), cheap])
