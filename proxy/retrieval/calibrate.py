"""Calibration: the similarity threshold (and margin) that meets a target hit precision on labelled
pairs, and the recall that costs. Used by `llm-numbers-proxy kb calibrate` and bench/retrieval_eval.py.

Pairs files: CSV `text1,text2,score` (STS-B), TSV `score<TAB>text1<TAB>text2` (SemEval STS; lines
without a score are skipped), or JSONL `{"a": ..., "b": ..., "label": true|false}` (or `"score"`).
A pair is equivalent when its label is true or its score is at least `min_score`.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from proxy.retrieval.guards import analyse, disagreement
from proxy.retrieval.intervals import clopper_pearson, meets_precision
from proxy.retrieval.query import normalize

MARGINS = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08)
MIN_HITS = 10  # a threshold judged on fewer hits than this says nothing
CONFIDENCE = 0.95  # of the one-sided lower bound on precision a threshold must meet


@dataclass(frozen=True, slots=True)
class Pair:
    a: str
    b: str
    equivalent: bool


class PairsError(ValueError):
    pass


def read_pairs(path: str | Path, min_score: float = 4.0) -> list[Pair]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PairsError(f"{p}: cannot read: {e}") from None
    pairs: list[Pair] = []
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
                a, b = row.get("a", row.get("query")), row.get("b", row.get("candidate"))
                label = row["label"] if "label" in row else float(row["score"]) >= min_score
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                raise PairsError(f'{p}:{n}: expected {{"a": ..., "b": ..., "label": true|false}}') from None
            if not isinstance(a, str) or not isinstance(b, str):
                raise PairsError(f"{p}:{n}: 'a' and 'b' must be strings")
            pairs.append(Pair(a, b, bool(label)))
    elif suffix == ".tsv":
        for n, line in enumerate(text.splitlines(), 1):
            cols = line.split("\t")
            if len(cols) < 3 or not cols[0].strip():
                continue
            try:
                pairs.append(Pair(cols[1], cols[2], float(cols[0]) >= min_score))
            except ValueError:
                raise PairsError(f"{p}:{n}: the first column must be a score") from None
    else:
        for n, row in enumerate(csv.reader(text.splitlines()), 1):
            if not row:
                continue
            try:
                pairs.append(Pair(row[0], row[1], float(row[2]) >= min_score))
            except (IndexError, ValueError):
                raise PairsError(f"{p}:{n}: expected text1,text2,score") from None
    if not pairs:
        raise PairsError(f"{p}: no labelled pairs")
    return pairs


@dataclass(frozen=True, slots=True)
class Scores:
    """Per pair: cosine similarity, whether the decisive tokens agree, the label."""

    cosine: np.ndarray
    agree: np.ndarray
    equivalent: np.ndarray


def score_pairs(pairs: Sequence[Pair], vectors_a: np.ndarray, vectors_b: np.ndarray) -> Scores:
    return Scores(
        cosine=np.einsum("ij,ij->i", vectors_a, vectors_b),
        agree=np.array([disagreement(analyse(p.a), analyse(p.b)) is None for p in pairs]),
        equivalent=np.array([p.equivalent for p in pairs]),
    )


@dataclass(frozen=True, slots=True)
class Quality:
    threshold: float | None
    precision: float
    recall: float
    false_hit_rate: float
    hits: int  # how many hits the precision rests on
    precision_low: float = 0.0  # its two-sided 95% Clopper–Pearson interval
    precision_high: float = 1.0


def quality_of(hit: np.ndarray, y: np.ndarray, threshold: float | None) -> Quality:
    """Precision (with its interval), recall and false-hit rate of a boolean hit mask against labels."""
    tp, fp = int((hit & y).sum()), int((hit & ~y).sum())
    low, high = clopper_pearson(tp, tp + fp)
    return Quality(
        threshold,
        tp / (tp + fp) if tp + fp else float("nan"),
        tp / max(1, int(y.sum())),
        fp / max(1, int((~y).sum())),
        tp + fp,
        low,
        high,
    )


def quality(scores: Scores, threshold: float | None, guarded: bool) -> Quality:
    if threshold is None:
        return Quality(None, float("nan"), 0.0, 0.0, 0)
    hit = scores.cosine >= threshold
    if guarded:
        hit &= scores.agree
    return quality_of(hit, scores.equivalent, threshold)


def pick_by_lower_bound(
    values: np.ndarray, usable: np.ndarray, y: np.ndarray, target: float, confidence: float = CONFIDENCE
) -> float | None:
    """The lowest threshold on `values` whose hits (usable pairs at or above it) have a one-sided
    Clopper–Pearson lower bound of precision at least `target`. A few lucky hits at the top cannot
    pass (16 right of 16 bound 0.83), and one wrong hit among many does not veto every threshold."""
    order = np.argsort(-values, kind="stable")
    v, ok, yy = values[order], usable[order], y[order]
    tp = np.cumsum(ok & yy)
    hits = np.cumsum(ok)
    for i in range(len(v) - 1, -1, -1):  # from the lowest threshold up: the first that passes has most recall
        if not ok[i] or (i + 1 < len(v) and v[i + 1] == v[i]) or hits[i] < MIN_HITS:
            continue
        if meets_precision(int(tp[i]), int(hits[i]), target, confidence):
            return float(v[i])
    return None


def pick_threshold(scores: Scores, target: float, guarded: bool, confidence: float = CONFIDENCE) -> float | None:
    """The lowest cosine threshold whose hits' precision has a lower confidence bound >= target."""
    usable = scores.agree if guarded else np.ones_like(scores.agree)
    return pick_by_lower_bound(scores.cosine, usable, scores.equivalent, target, confidence)


@dataclass(frozen=True, slots=True)
class CacheOutcome:
    correct: int
    wrong: int
    unlabelled: int  # a hit on another entry with no gold label for the pair (reported apart)
    misses: int

    @property
    def precision(self) -> float:
        labelled = self.correct + self.wrong
        return self.correct / labelled if labelled else float("nan")


def simulate_cache(
    pairs: Sequence[Pair],
    vectors_a: np.ndarray,
    vectors_b: np.ndarray,
    threshold: float | None,
    margin: float,
    guarded: bool,
    verifier: Any = None,  # proxy.retrieval.verifier.Verifier: a hit also needs its probability
) -> CacheOutcome:
    """Insert the first text of every pair into a cache, query with the second: a hit is correct
    when it returns the pair's own first text and the pair is equivalent (or a text equal to the
    query, or another text labelled equivalent to it); wrong when the pair it returns is labelled
    not equivalent."""
    if threshold is None and verifier is None:
        return CacheOutcome(0, 0, 0, len(pairs))
    labels: dict[tuple[str, str], bool] = {}
    for p in pairs:
        labels[(p.a, p.b)] = labels[(p.b, p.a)] = p.equivalent
    first: dict[str, int] = {}
    for i, p in enumerate(pairs):
        first.setdefault(p.a, i)
    texts = list(first)
    entries = vectors_a[[first[t] for t in texts]]
    facts = [analyse(t) for t in texts]
    sims = vectors_b @ entries.T
    correct = wrong = unlabelled = misses = 0
    for i, p in enumerate(pairs):
        row = sims[i]
        top = np.argpartition(-row, 1)[:2] if len(row) > 1 else np.array([0])
        top = top[np.argsort(-row[top])]
        best = int(top[0])
        runner_up = float(row[top[1]]) if len(top) > 1 else -1.0
        hit = (threshold is None or row[best] >= threshold) and row[best] - runner_up >= margin
        query = analyse(p.b) if hit else None
        if hit and guarded:
            hit = disagreement(query, facts[best]) is None
        if hit and verifier is not None:
            hit = verifier.accepts(float(row[best]), float(row[best] - runner_up), query, facts[best])
        if not hit:
            misses += 1
            continue
        entry = texts[best]
        if normalize(entry) == normalize(p.b):
            correct += 1
        elif (p.b, entry) in labels:
            correct += labels[(p.b, entry)]
            wrong += not labels[(p.b, entry)]
        else:
            unlabelled += 1
    return CacheOutcome(correct, wrong, unlabelled, misses)


@dataclass(frozen=True, slots=True)
class Calibration:
    target_precision: float  # of the one-sided lower confidence bound on precision
    pairs: int
    equivalent: int
    threshold_only: Quality
    guarded: Quality
    margin: float
    cache: CacheOutcome

    def as_dict(self) -> dict:
        out = asdict(self)
        out["cache"]["precision"] = self.cache.precision
        out["recall_cost"] = 1.0 - self.guarded.recall
        return out


def calibrate(
    pairs: Sequence[Pair],
    embed: Callable[[list[str]], np.ndarray],
    target_precision: float,
    confidence: float = CONFIDENCE,
) -> tuple[Calibration, np.ndarray, np.ndarray]:
    """Pick the threshold for a plain cosine matcher and for the guarded one (the lowest whose hits'
    precision has a lower confidence bound at the target), then the smallest margin that keeps the
    guarded matcher at the target in a cache simulation."""
    vectors_a = embed([p.a for p in pairs])
    vectors_b = embed([p.b for p in pairs])
    scores = score_pairs(pairs, vectors_a, vectors_b)
    plain = pick_threshold(scores, target_precision, guarded=False, confidence=confidence)
    guarded = pick_threshold(scores, target_precision, guarded=True, confidence=confidence)
    margin, outcome = MARGINS[-1], CacheOutcome(0, 0, 0, len(pairs))
    for m in MARGINS:
        outcome = simulate_cache(pairs, vectors_a, vectors_b, guarded, m, guarded=True)
        if not outcome.correct + outcome.wrong or outcome.precision >= target_precision:
            margin = m
            break
    result = Calibration(
        target_precision=target_precision,
        pairs=len(pairs),
        equivalent=int(scores.equivalent.sum()),
        threshold_only=quality(scores, plain, guarded=False),
        guarded=quality(scores, guarded, guarded=True),
        margin=margin,
        cache=outcome,
    )
    return result, vectors_a, vectors_b


def pool_margins(vectors_a: np.ndarray, vectors_b: np.ndarray, texts_a: Sequence[str]) -> np.ndarray:
    """Per pair, the margin a lookup of its second text would see with every first text in one
    collection: its own entry's cosine minus the best cosine of an entry with another text."""
    keys = np.array([normalize(t) for t in texts_a])
    own = np.einsum("ij,ij->i", vectors_a, vectors_b)
    margins = np.empty(len(own))
    for start in range(0, len(own), 1024):
        sims = vectors_b[start : start + 1024] @ vectors_a.T
        same = keys[None, :] == keys[start : start + 1024, None]
        sims[same] = -2.0
        margins[start : start + 1024] = own[start : start + 1024] - sims.max(axis=1)
    return margins


VERIFIER_FLOOR = 0.8  # below this cosine the verifier never answers (all-MiniLM-L6-v2: precision < 0.7 there)


def verifier_inputs(
    pairs: Sequence[Pair], vectors_a: np.ndarray, vectors_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (query: the second text, entry: the first), cosines and labels of labelled pairs."""
    from proxy.retrieval.verifier import verifier_features

    cos = np.einsum("ij,ij->i", vectors_a, vectors_b)
    margins = pool_margins(vectors_a, vectors_b, [p.a for p in pairs])
    facts_a = [analyse(p.a) for p in pairs]
    facts_b = [analyse(p.b) for p in pairs]
    return verifier_features(cos, margins, facts_b, facts_a), cos, np.array([p.equivalent for p in pairs])


def calibrate_verifier(
    pairs: Sequence[Pair],
    vectors_a: np.ndarray,
    vectors_b: np.ndarray,
    embedder: str,
    target_precision: float,
    confidence: float = CONFIDENCE,
    trained_on: str = "",
    floor: float = VERIFIER_FLOOR,
):
    """Train the verifier on all pairs; choose its probability threshold on cross-fitted predictions
    (each pair scored by a model that did not see it) by the lower confidence bound of precision."""
    from proxy.retrieval.verifier import cross_fitted_probabilities, train_verifier

    x, cos, y = verifier_inputs(pairs, vectors_a, vectors_b)
    held_out = cross_fitted_probabilities(x, y)
    usable = cos >= floor
    threshold = pick_by_lower_bound(held_out, usable, y, target_precision, confidence)
    hits = int((usable & (held_out >= threshold)).sum()) if threshold is not None else 0
    verifier = train_verifier(
        x, y, embedder, 1.0 if threshold is None else threshold, floor, trained_on, target_precision, hits
    )
    return verifier, quality_of(usable & (held_out >= (threshold if threshold is not None else 2.0)), y, threshold)
