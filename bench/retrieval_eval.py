"""Retrieval quality and speed with the local all-MiniLM-L6-v2 embedder, on public data.

  * calibrate on STS-B train+dev only ("equivalent" = score >= 4): `min_similarity` for a plain cosine
    and for the guarded matcher, `min_margin`, and the learned verifier (its probability threshold on
    cross-fitted predictions), each by the Clopper-Pearson lower bound of precision;
  * report held-out precision (95% CI) / recall (95% CI) / false-hit rate on STS-B test and on SemEval-2016
    STS question-question (gold lines only): cosine only, guards, verifier, verifier + guards;
  * a cache simulation on each held-out set: insert the first text of every pair, query with the second;
  * adversarial pairs generated from the held-out sentences (argument swaps, changed numbers, changed
    names, names in other scripts): the false-hit rate of each matcher;
  * the error bound (`max_error`) online on held-out traffic with feedback: realised error and interval;
  * a hit end to end through the proxy (memory store, local embedder, embedding included), p50/p95;
  * one index query at 100k entries (HNSW candidates + exact rescoring), p50/p99.

The data is read from ../shared/data (never copied into the repository). STS-B train is subsampled
(seeded) to keep the run to a few minutes on 2 cores; `--train all` uses all of it.

Usage: .venv/bin/python -m bench.retrieval_eval [--train all] [--target-precision 0.93] [--index-size 0] [--write]
(LLM_PROXY_DATA=/path/to/shared/data when the repository is not next to shared/.)
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import numpy as np
import orjson

from bench.results import report, short_commit
from proxy.retrieval.calibrate import (
    Pair,
    calibrate,
    calibrate_verifier,
    quality_of,
    score_pairs,
    simulate_cache,
    verifier_inputs,
)
from proxy.retrieval.embedders import LocalModel
from proxy.retrieval.index import VectorIndex
from proxy.retrieval.intervals import clopper_pearson, wilson
from proxy.steps.retrieve import EXPLORE_BAND

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("LLM_PROXY_DATA", ROOT.parent / "shared" / "data"))
MASTER = "sk-bench-master"
KEY = "sk-bench"


def _stsb(name: str) -> list[Pair]:
    with open(DATA / "stsb_en" / f"stsb-en-{name}.csv", encoding="utf-8") as f:
        return [Pair(r[0], r[1], float(r[2]) >= 4.0) for r in csv.reader(f) if r]


def _semeval_qq() -> list[Pair]:
    pairs = []
    for line in (DATA / "semeval_sts2016_qq" / "question-question.test.tsv").read_text(encoding="utf-8").splitlines():
        cols = line.split("\t")
        if len(cols) >= 3 and cols[0].strip():  # a gold score in the first column
            pairs.append(Pair(cols[1], cols[2], float(cols[0]) >= 4.0))
    return pairs


class CachedEmbedder:
    """The local model, with the vectors of already-seen texts kept in a temp file between runs."""

    def __init__(self, model: LocalModel):
        self.model = model
        self.path = Path(tempfile.gettempdir()) / f"llm-proxy-bench-{model.label}.npz"
        self.known: dict[str, np.ndarray] = {}
        if self.path.exists():
            data = np.load(self.path)
            self.known = dict(zip(data["keys"].tolist(), data["vectors"], strict=True))
        self.seconds = 0.0
        self.embedded = 0
        self.used: set[str] = set()

    @staticmethod
    def _key(text: str) -> str:
        return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.used.update(self._key(t) for t in texts)
        missing = sorted({t for t in texts if self._key(t) not in self.known}, key=len)
        if missing:
            started = time.perf_counter()
            vectors = self.model.encode_blocking(missing)
            self.seconds += time.perf_counter() - started
            self.embedded += len(missing)
            for t, v in zip(missing, vectors, strict=True):
                self.known[self._key(t)] = v
        return np.stack([self.known[self._key(t)] for t in texts])

    def save(self) -> None:
        keys = list(self.known)
        np.savez(self.path, keys=np.array(keys), vectors=np.stack([self.known[k] for k in keys]))


def _ci(q) -> str:
    if not q.hits:
        return "— (no hits)"
    return f"{q.precision:.3f} [{q.precision_low:.3f}, {q.precision_high:.3f}]"


def _row(name: str, q) -> str:
    t = "—" if q.threshold is None else f"{q.threshold:.4f}"
    lo, hi = wilson(round(q.recall * q.positives), q.positives) if q.positives else (0.0, 0.0)
    return f"| {name} | {t} | {_ci(q)} | {q.recall:.3f} [{lo:.3f}, {hi:.3f}] | {q.false_hit_rate:.4f} | {q.hits} |"


@dataclass
class Held:
    """One held-out pair set, embedded and analysed once."""

    name: str
    pairs: list[Pair]
    va: np.ndarray
    vb: np.ndarray
    cos: np.ndarray
    agree: np.ndarray
    y: np.ndarray
    features: np.ndarray


def _held(name: str, pairs: list[Pair], embed) -> Held:
    va, vb = embed([p.a for p in pairs]), embed([p.b for p in pairs])
    x, cos, y = verifier_inputs(pairs, va, vb)
    agree = score_pairs(pairs, va, vb).agree
    return Held(name, pairs, va, vb, cos, agree, y, x)


@dataclass(frozen=True)
class QualityN:
    """calibrate.Quality with the number of equivalent pairs (for recall's interval)."""

    threshold: float | None
    precision: float
    recall: float
    false_hit_rate: float
    hits: int
    precision_low: float
    precision_high: float
    positives: int


def _q(hit: np.ndarray, y: np.ndarray, threshold: float | None) -> QualityN:
    q = quality_of(hit, y, threshold)
    return QualityN(**asdict(q), positives=int(y.sum()))


# -- adversarial pairs: the same sentence with what decides its answer changed ------------------------

_OTHER_SCRIPT_NAMES = [
    "Москва",
    "Киев",
    "東京",
    "大阪",
    "Αθήνα",
    "Σπάρτη",
    "서울",
    "부산",
    "القاهرة",
    "دبي",
    "Zürich",
    "Genève",
]
_RELATION = re.compile(r"(?<![\w'-])([A-Za-z]{3,}) (to|than|of|over|against|into|from) ([A-Za-z]{3,})(?![\w'-])")


def _separated(s: str, names: list[str]) -> tuple[str, str] | None:
    """Two different names, each once in `s`, with at least one word between them."""
    unique = [n for n in dict.fromkeys(names) if len(re.findall(rf"\b{re.escape(n)}\b", s)) == 1]
    for i, a in enumerate(unique):
        for b in unique[i + 1 :]:
            between = (
                s[s.index(a) + len(a) : s.index(b)] if s.index(a) < s.index(b) else s[s.index(b) + len(b) : s.index(a)]
            )
            # "the House and the Senate" / "the Senate and the House" say the same: not a swap
            if {w.lower() for w in re.findall(r"[A-Za-z]{2,}", between)} - {"and", "or", "the", "nor"}:
                return a, b
    return None


def _swappable(a: str, b: str) -> bool:
    from proxy.retrieval.guards import _FUNCTION_WORDS

    return a != b and a.lower() not in _FUNCTION_WORDS and b.lower() not in _FUNCTION_WORDS


def adversarial_pairs(sentences: list[str], rng: random.Random, per_kind: int = 300) -> dict[str, list[Pair]]:
    """Non-equivalent pairs by construction, from the shared sentences: argument swaps, changed numbers,
    changed names, and names in other scripts (or with accents) changed."""
    from proxy.retrieval.guards import analyse

    sentences = sorted(set(sentences))
    rng.shuffle(sentences)
    names_pool = sorted({w for s in sentences for w in re.findall(r"(?<=\s)[A-Z][a-z]{3,}\b", s)})
    out: dict[str, list[Pair]] = {"argument swap": [], "changed number": [], "changed name": [], "other script": []}
    for s in sentences:
        facts = analyse(s)
        names = [w for w in re.findall(r"(?<=\s)[A-Z][a-z]{3,}\b", s) if w.lower() in facts.names]
        if len(out["argument swap"]) < per_kind:
            # Two names with words between them swap roles ("Obama called Putin" / "Putin called Obama");
            # adjacent ones would only garble a compound name ("Michael Jackson" / "Jackson Michael").
            pair = _separated(s, names)
            if pair is not None:
                a, b = pair
                out["argument swap"].append(Pair(s, s.replace(a, "\0").replace(b, a).replace("\0", b), False))
            elif (m := _RELATION.search(s)) and _swappable(m.group(1), m.group(3)):
                swapped = f"{m.group(3)} {m.group(2)} {m.group(1)}"
                out["argument swap"].append(Pair(s, s[: m.start()] + swapped + s[m.end() :], False))
        if len(out["changed number"]) < per_kind and (m := re.search(r"(?<![\d.])\d+(?![\d.])", s)):
            n = int(m.group())
            other = str(n + rng.choice([1, 2, 3, 10]) if n < 1000 else n + 1)
            out["changed number"].append(Pair(s, s[: m.start()] + other + s[m.end() :], False))
        if names and len(out["changed name"]) < per_kind:
            other = rng.choice([n for n in names_pool if n != names[0]])
            out["changed name"].append(Pair(s, s.replace(names[0], other, 1), False))
        if names and len(out["other script"]) < per_kind:
            a, b = rng.sample(_OTHER_SCRIPT_NAMES, 2)
            out["other script"].append(Pair(s.replace(names[0], a, 1), s.replace(names[0], b, 1), False))
    return out


# -- the error bound in a simulated cache with feedback --------------------------------------------------


def simulate_error_bound(
    held: Held, start: float, max_error: float, epochs: int, feedback_rate: float, rng: random.Random, verifier=None
) -> dict:
    """A cache of every first text of a held-out set, asked every second text `epochs` times in random
    order. A lookup the matcher accepts (guards, and the verifier when given) is served when the error
    bound lets its entry answer, else explored (upstream; its re-generation is judged by the pair's label).
    A fraction of served hits gets client feedback (the label). Only labelled (query, entry) pairs count."""
    from proxy.retrieval.error_bound import ErrorBound
    from proxy.retrieval.guards import analyse, disagreement

    floor = start - EXPLORE_BAND
    bound = ErrorBound("sim", "sim", max_error, start, floor)
    first: dict[str, int] = {}
    for i, p in enumerate(held.pairs):
        first.setdefault(p.a, i)
    texts = list(first)
    entries = held.va[[first[t] for t in texts]]
    facts = [analyse(t) for t in texts]
    labels = {(p.b, p.a): p.equivalent for p in held.pairs}
    sims = held.vb @ entries.T
    served_right = served_wrong = static_right = static_wrong = explored = 0
    order = [i for _ in range(epochs) for i in rng.sample(range(len(held.pairs)), len(held.pairs))]
    per_epoch: list[tuple[int, int]] = []
    for step, i in enumerate(order):
        p = held.pairs[i]
        row = sims[i]
        top = np.argsort(-row)[:2]
        best, sim = int(top[0]), float(row[top[0]])
        margin = sim - float(row[top[1]]) if len(top) > 1 else 1.0
        label = labels.get((p.b, texts[best]))
        if label is None or sim < floor:
            continue
        q = analyse(p.b)
        if disagreement(q, facts[best]) is not None:
            continue
        if verifier is not None and not verifier.accepts(sim, margin, q, facts[best]):
            continue
        if sim >= start:  # the static threshold alone, for comparison
            static_right += label
            static_wrong += not label
        if bound.answers(texts[best], sim):
            served_right += label
            served_wrong += not label
            if rng.random() < feedback_rate:
                asyncio.run(bound.record(texts[best], sim, label, served=True))
        elif not bound.stopped:
            explored += 1
            asyncio.run(bound.record(texts[best], sim, label, served=False))
        if (step + 1) % len(held.pairs) == 0:
            per_epoch.append((served_right, served_wrong))
    n = served_right + served_wrong
    lo, hi = clopper_pearson(served_wrong, n)
    return {
        "served": n,
        "wrong": served_wrong,
        "error": served_wrong / n if n else float("nan"),
        "interval": (lo, hi),
        "static_served": static_right + static_wrong,
        "static_wrong": static_wrong,
        "explored": explored,
        "threshold": bound.threshold(),
        "stopped": bound.stopped,
        "queries": len(order),
    }


def evaluate(args: argparse.Namespace, lines: list[str]) -> tuple[float, float, Path | None]:
    model = LocalModel()
    started = time.perf_counter()
    model.load_blocking()
    load_s = time.perf_counter() - started
    embed = CachedEmbedder(model)
    rng = random.Random(13)
    train = _stsb("train")
    if args.train != "all":
        train = rng.sample(train, min(int(args.train), len(train)))
    calibration = train + _stsb("dev")
    target = args.target_precision
    result, ca, cb = calibrate(calibration, embed, target)
    plain_t, guarded_t, margin = result.threshold_only.threshold, result.guarded.threshold, result.margin
    verifier, v_cal = calibrate_verifier(calibration, ca, cb, f"local:{model.label}", target, trained_on="STS-B")
    verifier_path = Path(tempfile.gettempdir()) / "llm-proxy-bench-verifier.json"
    verifier_path.write_bytes(verifier.dump())
    lines += [
        f"Calibration on STS-B train ({len(train)} pairs{'' if args.train == 'all' else ', seeded sample'}) + dev "
        f"(1500): {result.pairs} pairs, {result.equivalent} equivalent (score >= 4). Rule: the lowest threshold whose "
        f"hits' one-sided 95% Clopper-Pearson lower bound of precision is >= {target}. Chosen: cosine-only "
        f"`min_similarity` {_fmt(plain_t)} ({result.threshold_only.hits} hits); guarded `min_similarity` "
        f"{_fmt(guarded_t)} ({result.guarded.hits} hits), `min_margin` {margin}; verifier (logistic regression, "
        f"{len(verifier.weights)} features, cosine floor {verifier.min_similarity}) probability >= "
        f"{_fmt(v_cal.threshold)} on 5-fold cross-fitted predictions ({v_cal.hits} hits).",
        "",
        "Pairwise (is the pair equivalent?), held out; precision with its 95% Clopper-Pearson interval, recall with "
        "its 95% Wilson interval:",
        "",
        "| set · matcher | threshold | precision [95% CI] | recall [95% CI] | false-hit rate | hits |",
        "|---|---|---|---|---|---|",
    ]
    held = [_held("STS-B test", _stsb("test"), embed), _held("SemEval-2016 QQ", _semeval_qq(), embed)]
    vt = v_cal.threshold if v_cal.threshold is not None else 2.0
    matchers = {}
    for h in held:
        p = verifier.probability(h.features)
        v_hit = (h.cos >= verifier.min_similarity) & (p >= vt)
        matchers[h.name] = {
            "cosine only": _q(h.cos >= (plain_t if plain_t is not None else 2.0), h.y, plain_t),
            "guards": _q((h.cos >= (guarded_t if guarded_t is not None else 2.0)) & h.agree, h.y, guarded_t),
            "verifier": _q(v_hit, h.y, v_cal.threshold),
            "verifier + guards": _q(v_hit & h.agree, h.y, v_cal.threshold),
        }
        n_eq = int(h.y.sum())
        for label, q in matchers[h.name].items():
            lines.append(_row(f"{h.name} ({len(h.pairs)}, {n_eq} eq.) · {label}", q))
    lines += [
        "",
        "Ceiling, not a result (each threshold tuned on the held-out set itself): the most recall at held-out "
        "precision >= 0.95, and that precision's 95% lower bound:",
        "",
    ]
    for h in held:
        p = verifier.probability(h.features)
        cells = []
        for label, score in (
            ("cosine", h.cos),
            ("guards", np.where(h.agree, h.cos, -2.0)),
            ("verifier", np.where(h.cos >= verifier.min_similarity, p, -2.0)),
        ):
            cells.append(f"{label} {_ceiling(score, h.y)}")
        lines.append(f"- {h.name}: " + "; ".join(cells))
    lines += [
        "",
        "Cache simulation (insert the first text of each pair, query with the second; `unlabelled` = a hit on "
        "another entry whose pair has no gold label, left out of precision):",
        "",
        "| set · matcher | correct hits | wrong hits | unlabelled | misses | hit precision [95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for h in held:
        for label, o in (
            ("cosine only", simulate_cache(h.pairs, h.va, h.vb, plain_t, 0.0, guarded=False)),
            ("guards", simulate_cache(h.pairs, h.va, h.vb, guarded_t, margin, guarded=True)),
            ("verifier + guards", simulate_cache(h.pairs, h.va, h.vb, None, 0.0, True, verifier=verifier)),
        ):
            lo, hi = clopper_pearson(o.correct, o.correct + o.wrong)
            lines.append(
                f"| {h.name} · {label} | {o.correct} | {o.wrong} | {o.unlabelled} | {o.misses} | "
                + (f"{o.precision:.3f} [{lo:.3f}, {hi:.3f}] |" if o.correct + o.wrong else "— |")
            )
    # Adversarial: from the held-out sentences (both sets), every pair is non-equivalent by construction.
    sentences = [t for h in held for p in h.pairs for t in (p.a, p.b)]
    adversarial = adversarial_pairs(sentences, random.Random(29))
    lines += [
        "",
        "Adversarial pairs generated from the held-out sentences (each pair differs in what decides the answer, so "
        "every hit is false); false-hit rate with its 95% Clopper-Pearson interval:",
        "",
        "| kind (pairs) | cosine only | guards | verifier | verifier + guards |",
        "|---|---|---|---|---|",
    ]
    totals: dict[str, list[int]] = {}
    for kind, pairs in adversarial.items():
        if not pairs:
            continue
        h = _held(kind, pairs, embed)
        p = verifier.probability(h.features)
        v_hit = (h.cos >= verifier.min_similarity) & (p >= vt)
        hits = {
            "cosine only": h.cos >= (plain_t if plain_t is not None else 2.0),
            "guards": (h.cos >= (guarded_t if guarded_t is not None else 2.0)) & h.agree,
            "verifier": v_hit,
            "verifier + guards": v_hit & h.agree,
        }
        cells = []
        for label, hit in hits.items():
            k = int(hit.sum())
            t = totals.setdefault(label, [0, 0])
            t[0] += k
            t[1] += len(pairs)
            cells.append(_rate(k, len(pairs)))
        lines.append(f"| {kind} ({len(pairs)}) | " + " | ".join(cells) + " |")
    lines.append("| all | " + " | ".join(_rate(k, n) for k, n in totals.values()) + " |")
    # The error bound: online, on held-out traffic, starting from the threshold calibrated on STS-B.
    lines += [
        "",
        f"Error bound in a simulated cache with feedback (each held-out set's first texts cached, every second text "
        f"asked {args.epochs}× in random order; start = the guarded threshold calibrated above, explorations "
        f"{EXPLORE_BAND} below it are judged by the pair's label as a re-generation would be, 50% of served hits "
        "get feedback; only lookups whose best entry has a gold label count):",
        "",
        "| set · matcher · max_error | served | wrong | realised error [95% CI] | static threshold: served / wrong | "
        "explored | threshold at end | stopped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    start = guarded_t if guarded_t is not None else 0.96
    for h in held:
        for label, v in (("guards", None), ("verifier + guards", verifier)):
            for max_error in (0.02, 0.05):
                r = simulate_error_bound(h, start, max_error, args.epochs, 0.5, random.Random(41), v)
                err = f"{r['error']:.3f} [{r['interval'][0]:.3f}, {r['interval'][1]:.3f}]" if r["served"] else "—"
                lines.append(
                    f"| {h.name} · {label} · {max_error} | {r['served']} | {r['wrong']} | {err} | "
                    f"{r['static_served']} / {r['static_wrong']} | {r['explored']} | {r['threshold']:.4f} | "
                    f"{'yes' if r['stopped'] else 'no'} |"
                )
    lines += ["", decision_cost(held[0], verifier)]
    embed.save()
    reused = len(embed.used) - embed.embedded
    lines += [
        "",
        f"Model load {load_s:.1f} s; {embed.embedded} texts embedded this run in {embed.seconds:.1f} s"
        + (f", {reused} reused from an earlier run's cache in {embed.path.parent}." if reused else "."),
    ]
    return guarded_t or 0.96, margin, verifier_path if v_cal.threshold is not None else None


def _ceiling(score: np.ndarray, y: np.ndarray, precision: float = 0.95) -> str:
    order = np.argsort(-score, kind="stable")
    tp = np.cumsum(y[order])
    n = np.arange(1, len(y) + 1)
    ok = [i for i in range(9, len(y)) if score[order][i] > -2.0 and tp[i] / n[i] >= precision]
    if not ok:
        return "none"
    i = max(ok)
    low = clopper_pearson(int(tp[i]), int(n[i]))[0]
    return f"recall {tp[i] / y.sum():.3f} at {tp[i] / n[i]:.3f} (lower bound {low:.3f}, {n[i]} hits)"


def decision_cost(h: Held, verifier) -> str:
    """CPU per lookup of the decision alone (analysing the query, guards, verifier), median of 5 passes."""
    from proxy.retrieval.guards import analyse, disagreement
    from proxy.retrieval.verifier import pair_features

    entries = [analyse(p.a) for p in h.pairs]
    guard_s, verifier_s = [], []
    for _ in range(5):
        t = time.perf_counter()
        for p, e in zip(h.pairs, entries, strict=True):
            disagreement(analyse(p.b), e)
        guard_s.append((time.perf_counter() - t) / len(h.pairs))
        t = time.perf_counter()
        for p, e, c in zip(h.pairs, entries, h.cos, strict=True):
            q = analyse(p.b)
            disagreement(q, e)
            verifier.probability(pair_features(float(c), 0.05, q, e))
        verifier_s.append((time.perf_counter() - t) / len(h.pairs))
    return (
        f"Decision cost per lookup on {h.name} texts (CPU, median of 5 passes over {len(h.pairs)} pairs): analyse "
        f"the query + guards {statistics.median(guard_s) * 1e6:.0f} µs; + verifier features and probability "
        f"{statistics.median(verifier_s) * 1e6:.0f} µs."
    )


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:.4f}"


def _rate(k: int, n: int) -> str:
    lo, hi = clopper_pearson(k, n)
    return f"{k / n:.3f} [{lo:.3f}, {hi:.3f}]"


def index_speed(size: int, lines: list[str]) -> None:
    """Index query time at `size` entries: vectors near real sentence embeddings (mixtures of two
    with noise), queries near indexed entries."""
    rng = np.random.default_rng(7)
    base = np.load(Path(tempfile.gettempdir()) / "llm-proxy-bench-all-MiniLM-L6-v2.npz")["vectors"]
    i, j = rng.integers(0, len(base), size), rng.integers(0, len(base), size)
    vectors = base[i] + rng.uniform(0.2, 0.8, (size, 1)).astype(np.float32) * base[j]
    vectors += 0.05 * rng.standard_normal(vectors.shape).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = VectorIndex("bench", vectors.shape[1])
    for v in vectors:
        index.add(("*", ""), v)
    part = index.partitions[("*", "")]
    queries = vectors[rng.integers(0, size, 300)] + 0.02 * rng.standard_normal((300, vectors.shape[1])).astype(
        np.float32
    )
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact_ms, exact_top = [], []
    for q in queries[:100]:
        t = time.perf_counter()
        exact_top.append(part.search(q, 2)[0][0])
        exact_ms.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    built = asyncio.run(part.refresh_ann())
    build_s = time.perf_counter() - t
    if not built:
        lines.append(
            f"Index at {size} entries: usearch not installed; exact scan p50 {statistics.median(exact_ms):.2f} ms."
        )
        return
    ann_ms, agree = [], 0
    for n, q in enumerate(queries):
        t = time.perf_counter()
        top = part.search(q, 8)
        ann_ms.append((time.perf_counter() - t) * 1000)
        agree += n < 100 and top[0][0] == exact_top[n]
    ann_ms.sort()
    lines.append(
        f"Index query at {size} entries (384 dims): HNSW (usearch, int8) candidates + exact float32 rescoring "
        f"p50 {statistics.median(ann_ms):.3f} ms, p99 {ann_ms[int(len(ann_ms) * 0.99)]:.3f} ms, top-1 equal to an "
        f"exact scan in {agree}/100; exact scan p50 {statistics.median(exact_ms):.2f} ms; HNSW build {build_s:.0f} s "
        "(in the background on a worker thread; exact scans serve meanwhile)."
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _hit_latency(url: str, n: int) -> dict[str, list[float]]:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    out: dict[str, list[float]] = {}
    async with aiohttp.ClientSession() as s:
        for label, question in (("embedded", "Who's the author of Hamlet?"), ("exact", "who wrote hamlet")):
            body = orjson.dumps({"model": "big", "messages": [{"role": "user", "content": question}]})
            times = []
            for i in range(n + 10):
                t = time.perf_counter()
                async with s.post(url + "/v1/chat/completions", data=body, headers=headers) as r:
                    await r.read()
                    assert r.headers.get("x-llm-proxy-route") == "retrieval", (label, r.headers)
                if i >= 10:
                    times.append((time.perf_counter() - t) * 1000)
            out[label] = sorted(times)
    return out


def load_faq_when_ready(url: str, timeout_s: float) -> None:
    """Wait until the proxy at `url` has its `faq` collection ready (the model loads in the background),
    then load two entries into it through the admin API."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as r:
                if orjson.loads(r.read()).get("collections", {}).get("faq", {}).get("ready"):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the proxy did not get ready")
        time.sleep(0.1)
    entries = [
        {
            "id": "hamlet",
            "questions": ["Who wrote Hamlet?", "Who is the author of Hamlet?"],
            "answer": "Shakespeare.",
        },
        {"id": "capital-fr", "questions": ["What is the capital of France?"], "answer": "Paris."},
    ]
    req = urllib.request.Request(
        url + "/admin/kb/faq",
        data=orjson.dumps({"entries": entries}),
        headers={"Authorization": f"Bearer {MASTER}", "Content-Type": "application/json"},
    )
    urllib.request.urlopen(req, timeout=60).read()


def faq_policy(mock_port: int, retrieve: str) -> str:
    """The policy of a benchmark proxy: one model on the mock at `mock_port`, one team, the `faq` KB answering
    through a policy `retrieve: {collection: faq, RETRIEVE}`."""
    return textwrap.dedent(
        f"""\
        version: 1
        models:
          big: {{api_base: "http://127.0.0.1:{mock_port}/v1", price: {{input_per_mtok: 2.5, output_per_mtok: 10}}}}
        teams:
          bench: {{keys: [{KEY}]}}
        collections:
          faq: {{kind: kb}}
        policies:
          - name: faq
            retrieve: {{collection: faq, {retrieve}}}
        """
    )


def proxy_latency(n: int, min_similarity: float, margin: float, lines: list[str], verifier: Path | None) -> None:
    tmp = Path(tempfile.mkdtemp())
    mock_port, proxy_port = _free_port(), _free_port()
    policy = tmp / "policy.yaml"
    verifier_key = f", verifier: {verifier}" if verifier is not None else ""
    retrieve = f"min_similarity: {min_similarity:.4f}, min_margin: {margin}{verifier_key}"
    policy.write_text(faq_policy(mock_port, retrieve))
    env = {**os.environ, "LLM_PROXY_MASTER_KEY": MASTER}
    env.pop("LLM_PROXY_REDIS_URL", None)
    procs = [
        subprocess.Popen([sys.executable, "-m", "proxy.cli", "mock-upstream", "--port", str(mock_port)], cwd=ROOT),
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy.cli",
                "serve",
                "--config",
                str(policy),
                "--port",
                str(proxy_port),
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            env=env,
            stderr=subprocess.DEVNULL,
        ),
    ]
    url = f"http://127.0.0.1:{proxy_port}"
    try:
        load_faq_when_ready(url, timeout_s=120)
        times = asyncio.run(_hit_latency(url, n))
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    for label, ts in times.items():
        what = (
            f"a paraphrase (embedding + index + guards{' + verifier' if verifier else ''})"
            if label == "embedded"
            else "an exact-match hit (no embedding)"
        )
        lines.append(
            f"Hit end to end through the proxy, {what}: p50 {statistics.median(ts):.1f} ms, "
            f"p95 {ts[int(len(ts) * 0.95)]:.1f} ms ({len(ts)} sequential requests, client included)."
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", default="2000", help="STS-B train pairs for calibration (a number, or all)")
    ap.add_argument("--target-precision", type=float, default=0.97)
    ap.add_argument("--index-size", type=int, default=100_000, help="0: skip the index speed test")
    ap.add_argument("--epochs", type=int, default=5, help="passes over each held-out set in the error-bound simulation")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--write", action="store_true", help="append the section to bench/RESULTS.md")
    args = ap.parse_args()
    if not (DATA / "stsb_en").is_dir():
        sys.exit(f"no evaluation data at {DATA}")
    started = time.perf_counter()
    lines: list[str] = []
    min_similarity, margin, verifier = evaluate(args, lines)
    lines.append("")
    proxy_latency(args.requests, min_similarity, margin, lines, None)
    if verifier is not None:
        proxy_latency(args.requests, min_similarity, margin, lines, verifier)
    if args.index_size:
        lines.append("")
        index_speed(args.index_size, lines)
    cores = os.cpu_count()
    head = (
        f"## Retrieval error bounds, verifier and guards — {time.strftime('%Y-%m-%d')} — {platform.machine()}, "
        f"{cores} cores shared, loaded; Python {platform.python_version()}; commit {short_commit()} "
        f"(`python -m bench.retrieval_eval {' '.join(sys.argv[1:])}`, {time.perf_counter() - started:.0f} s)"
    )
    text = "\n".join([head, "", *lines, ""])
    report(text, args.write)


if __name__ == "__main__":
    main()
