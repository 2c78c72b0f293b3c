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

import numpy as np
import orjson

from proxy.retrieval.guards import analyse, disagreement
from proxy.retrieval.query import normalize

MARGINS = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08)
MIN_HITS = 10  # a threshold judged on fewer hits than this says nothing


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
    hits: int


def quality(scores: Scores, threshold: float | None, guarded: bool) -> Quality:
    if threshold is None:
        return Quality(None, float("nan"), 0.0, 0.0, 0)
    hit = scores.cosine >= threshold
    if guarded:
        hit &= scores.agree
    y = scores.equivalent
    tp, fp = int((hit & y).sum()), int((hit & ~y).sum())
    return Quality(
        threshold,
        tp / (tp + fp) if tp + fp else float("nan"),
        tp / max(1, int(y.sum())),
        fp / max(1, int((~y).sum())),
        tp + fp,
    )


def pick_threshold(scores: Scores, target: float, guarded: bool) -> float | None:
    """The lowest threshold whose hits, and the hits of every higher threshold, meet the target
    precision (a monotone envelope: one lucky band of hits does not count)."""
    ok = scores.agree if guarded else np.ones_like(scores.agree)
    order = np.argsort(-scores.cosine)
    cos, y, usable = scores.cosine[order], scores.equivalent[order], ok[order]
    tp = np.cumsum(usable & y)
    hits = np.cumsum(usable)
    best = None
    for i in range(len(cos)):
        if not usable[i] or (i + 1 < len(cos) and cos[i + 1] == cos[i]):
            continue
        if hits[i] < MIN_HITS:
            continue
        if tp[i] / hits[i] >= target:
            best = float(cos[i])
        else:
            break
    return best


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
) -> CacheOutcome:
    """Insert the first text of every pair into a cache, query with the second: a hit is correct
    when it returns the pair's own first text and the pair is equivalent (or a text equal to the
    query, or another text labelled equivalent to it); wrong when the pair it returns is labelled
    not equivalent."""
    if threshold is None:
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
        hit = row[best] >= threshold and row[best] - runner_up >= margin
        if hit and guarded:
            hit = disagreement(analyse(p.b), facts[best]) is None
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
    target_precision: float
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
    pairs: Sequence[Pair], embed: Callable[[list[str]], np.ndarray], target_precision: float
) -> tuple[Calibration, np.ndarray, np.ndarray]:
    """Pick the threshold for a plain cosine matcher and for the guarded one, then the smallest
    margin that keeps the guarded matcher at the target in a cache simulation."""
    vectors_a = embed([p.a for p in pairs])
    vectors_b = embed([p.b for p in pairs])
    scores = score_pairs(pairs, vectors_a, vectors_b)
    plain = pick_threshold(scores, target_precision, guarded=False)
    guarded = pick_threshold(scores, target_precision, guarded=True)
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
