"""The learned verifier: a logistic regression over cheap features of a (query, entry) pair — cosine,
margin to the best entry with another answer, lexical overlap, each decisive-token disagreement,
argument order, length ratio, question type — that says how likely the entry answers the query.

Trained by `llm-numbers-proxy kb calibrate --write-verifier FILE` on labelled pairs (STS-B train and
dev in bench/), shipped as a small JSON file that a `retrieve:` policy names (`verifier: FILE`). The
file records the embedder its cosines came from: a verifier is meaningless with another embedder, and
`check` refuses that. numpy only: a few hundred multiplications per lookup.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from proxy.retrieval.guards import REASONS, TextFacts, disagreements

FORMAT = "llm-numbers-proxy/verifier@1"
MARGIN_CAP = 0.3  # no runner-up at all counts as this margin
FEATURES = (
    "cosine",
    "closeness",  # -log(1 - cosine): spreads the last hundredths where decisions happen
    "margin",
    "word_overlap",
    "content_overlap",
    "length_ratio",
    "agree",
    *(f"disagree_{r}" for r in REASONS),
    "same_question_word",
    "both_questions",
    "agree_x_closeness",
)


class VerifierError(ValueError):
    """A verifier file that cannot be used; the message says why."""


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def pair_features(similarity: float, margin: float, query: TextFacts, entry: TextFacts) -> np.ndarray:
    """The feature vector of one (query, entry) pair, in FEATURES order."""
    kinds = disagreements(query, entry)
    cos = min(max(similarity, -1.0), 1.0)
    closeness = -math.log(max(1.0 - cos, 1e-3))
    margin = MARGIN_CAP if not math.isfinite(margin) else min(max(margin, -MARGIN_CAP), MARGIN_CAP)
    lq, le = max(1, len(query.sequence)), max(1, len(entry.sequence))
    agree = 0.0 if kinds else 1.0
    return np.array(
        [
            cos,
            closeness,
            margin,
            _jaccard(query.words, entry.words),
            _jaccard(query.content, entry.content),
            min(lq, le) / max(lq, le),
            agree,
            *(1.0 if r in kinds else 0.0 for r in REASONS),
            1.0 if query.question_words == entry.question_words else 0.0,
            1.0 if query.mood == "?" and entry.mood == "?" else 0.0,
            agree * closeness,
        ],
        dtype=np.float64,
    )


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, steps: int = 50) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression by Newton's method (IRLS) on standardised features."""
    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    w = np.zeros(d + 1)
    reg = np.full(d + 1, l2)
    reg[-1] = 0.0  # the intercept is not shrunk
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(xb @ w)))
        grad = xb.T @ (p - y) + reg * w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(reg) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return w[:-1], float(w[-1])


@dataclass(frozen=True, slots=True)
class Verifier:
    embedder: str  # e.g. "local:all-MiniLM-L6-v2": the embedder whose cosines it was trained on
    weights: np.ndarray
    bias: float
    mean: np.ndarray
    scale: np.ndarray
    threshold: float  # the probability at or above which a pair is a hit
    min_similarity: float  # below this cosine it never looks (the cost of the features is not spent)
    trained_on: str = ""
    target_precision: float | None = None
    hits: int = 0  # how many hits of the threshold's held-out predictions its precision rests on

    def probability(self, features: np.ndarray) -> np.ndarray:
        z = ((features - self.mean) / self.scale) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-z))

    def score(self, similarity: float, margin: float, query: TextFacts, entry: TextFacts) -> float:
        return float(self.probability(pair_features(similarity, margin, query, entry)))

    def accepts(self, similarity: float, margin: float, query: TextFacts, entry: TextFacts) -> bool:
        if similarity < self.min_similarity:
            return False
        return self.score(similarity, margin, query, entry) >= self.threshold

    def dump(self) -> bytes:
        return orjson.dumps(
            {
                "format": FORMAT,
                "embedder": self.embedder,
                "features": list(FEATURES),
                "weights": self.weights.tolist(),
                "bias": self.bias,
                "mean": self.mean.tolist(),
                "scale": self.scale.tolist(),
                "threshold": self.threshold,
                "min_similarity": self.min_similarity,
                "trained_on": self.trained_on,
                "target_precision": self.target_precision,
                "hits": self.hits,
            },
            option=orjson.OPT_INDENT_2,
        )


def train_verifier(
    features: np.ndarray,
    labels: np.ndarray,
    embedder: str,
    threshold: float,
    min_similarity: float,
    trained_on: str = "",
    target_precision: float | None = None,
    hits: int = 0,
    l2: float = 1.0,
) -> Verifier:
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale[scale < 1e-9] = 1.0
    weights, bias = fit_logistic((features - mean) / scale, labels.astype(np.float64), l2)
    return Verifier(embedder, weights, bias, mean, scale, threshold, min_similarity, trained_on, target_precision, hits)


def cross_fitted_probabilities(features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Each pair's probability from a model that did not see it: a threshold chosen on these is
    chosen on predictions as they will be made on new pairs."""
    rng = np.random.default_rng(seed)
    fold = rng.integers(0, folds, len(labels))
    out = np.empty(len(labels))
    for k in range(folds):
        train, held = fold != k, fold == k
        v = train_verifier(features[train], labels[train], "", 0.5, -1.0)
        out[held] = v.probability(features[held])
    return out


def load_verifier(path: str | Path) -> Verifier:
    p = Path(path)
    try:
        data = orjson.loads(p.read_bytes())
    except OSError as e:
        raise VerifierError(f"cannot read the verifier file {p}: {e.strerror}") from None
    except orjson.JSONDecodeError:
        raise VerifierError(f"{p} is not a verifier file (invalid JSON)") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise VerifierError(f"{p} is not a verifier file (format is not {FORMAT})")
    if data.get("features") != list(FEATURES):
        raise VerifierError(f"{p} was trained on other features than this proxy computes: retrain it (kb calibrate)")
    try:
        d = len(FEATURES)
        weights, mean, scale = (np.array(data[k], dtype=np.float64) for k in ("weights", "mean", "scale"))
        if weights.shape != (d,) or mean.shape != (d,) or scale.shape != (d,) or np.any(scale <= 0):
            raise ValueError
        verifier = Verifier(
            embedder=str(data["embedder"]),
            weights=weights,
            bias=float(data["bias"]),
            mean=mean,
            scale=scale,
            threshold=float(data["threshold"]),
            min_similarity=float(data["min_similarity"]),
            trained_on=str(data.get("trained_on") or ""),
            target_precision=data.get("target_precision"),
            hits=int(data.get("hits") or 0),
        )
    except (KeyError, TypeError, ValueError):
        raise VerifierError(f"{p} is not a complete verifier file (weights, mean, scale, threshold)") from None
    if not 0.0 <= verifier.threshold <= 1.0:
        raise VerifierError(f"{p}: threshold must be a probability")
    return verifier


def verifier_features(
    similarities: Sequence[float], margins: Sequence[float], queries: Sequence[TextFacts], entries: Sequence[TextFacts]
) -> np.ndarray:
    return np.stack(
        [pair_features(s, m, q, e) for s, m, q, e in zip(similarities, margins, queries, entries, strict=True)]
    )
