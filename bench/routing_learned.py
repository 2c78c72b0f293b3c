"""The learned router replayed on MMLU (bench/routing_replay.py prints it after the rule policies):
strong-call share needed for 95% of all-strong accuracy, fitted within the same domains (k-fold over
questions) and across domains (leave-domains-out), with the decision threshold chosen by `router fit`'s
own procedure on the training folds only; which estimator earns its place; dollar cost vs all-strong.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from bench.routing_data import Question
from proxy.config.router_file import CurvePoint, threshold_for
from proxy.services.routers.estimators import KnnProbe, LogisticProbe
from proxy.services.routers.features import feature_matrix
from proxy.services.routers.fit import Labels, evaluate, fit_router, kfold, routing_curve

TARGET = 0.95
OUTER_FOLDS = 5
SEED = 13


def labels_of(questions: list[Question]) -> Labels:
    return Labels(
        [q.prompt for q in questions],
        np.asarray([q.weak_ok for q in questions], float),
        np.asarray([q.strong_ok for q in questions], float),
        "correctness",
    )


def share_for(curve: list[CurvePoint], target: float = TARGET) -> float:
    """Strong share at which quality first stays ≥ target (the curve read with its own data: CPT)."""
    return threshold_for(curve, target).strong_share


@dataclass
class Outcome:
    name: str
    test_scores: np.ndarray  # out-of-fold: every question scored by a probe that never saw it
    routed: np.ndarray  # routed to weak by the threshold chosen on its training folds
    fold_quality: list[float]
    fold_share: list[float]
    seconds: float


def cross_fit(x: np.ndarray, labels: Labels, parts: list[np.ndarray], name: str) -> Outcome:
    started = time.perf_counter()
    n = len(labels.prompts)
    scores = np.zeros(n)
    routed = np.zeros(n, bool)
    fold_q, fold_s = [], []
    for test in parts:
        train = np.setdiff1d(np.arange(n), test, assume_unique=True)
        fitted = fit_router(x[train], labels.subset(train), TARGET, folds=5, seed=SEED)
        scores[test] = fitted.probe.predict(x[test])
        t = fitted.chosen.threshold
        routed[test] = np.zeros(len(test), bool) if t is None else scores[test] >= t
        share, quality = evaluate(scores[test], labels.subset(test), t)
        fold_q.append(quality)
        fold_s.append(share)
    return Outcome(name, scores, routed, fold_q, fold_s, time.perf_counter() - started)


def oof_scores(make, x: np.ndarray, y: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    scores = np.zeros(len(y))
    for test in parts:
        train = np.setdiff1d(np.arange(len(y)), test, assume_unique=True)
        scores[test] = make(x[train], y[train]).predict(x[test])
    return scores


class _Gbm:
    def __init__(self, x: np.ndarray, y: np.ndarray):
        from sklearn.ensemble import HistGradientBoostingClassifier

        self._m = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, early_stopping=True, random_state=0)
        self._m.fit(x, y)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self._m.predict_proba(x)[:, 1]


def bootstrap_quality(served: np.ndarray, strong: np.ndarray, draws: int = 1000) -> tuple[float, float]:
    """95% percentile interval of sum(served)/sum(strong) over resampled questions."""
    rng = np.random.default_rng(SEED)
    idx = rng.integers(0, len(served), size=(draws, len(served)))
    ratios = served[idx].sum(axis=1) / strong[idx].sum(axis=1)
    return float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))


def learned_section(
    questions: list[Question], vectors: np.ndarray, identity: str, costs: dict[str, tuple[np.ndarray, np.ndarray]]
) -> list[str]:
    """costs: price pair name -> (cost per question if weak, if strong)."""
    labels = labels_of(questions)
    n = len(questions)
    weak_acc, strong_acc = labels.weak_value.mean(), labels.strong_value.mean()
    random_share = (TARGET * strong_acc - weak_acc) / (strong_acc - weak_acc)
    oracle_share = max(0.0, (TARGET * strong_acc - weak_acc)) / 1.0
    x = feature_matrix(vectors, labels.prompts)
    domains = np.asarray([q.domain for q in questions])
    within = kfold(n, OUTER_FOLDS, SEED)
    across = kfold(n, OUTER_FOLDS, SEED, groups=domains)
    lengths = np.asarray([len(q.prompt) for q in questions], float)
    rule_share = share_for(routing_curve(-lengths, labels))  # short prompts → weak, swept over the threshold

    lines = [
        f"Learned router on MMLU (29 domains, decontaminated, n={n}), embedder {identity}; quality = accuracy / "
        f"all-strong accuracy ({strong_acc:.1%}); target {TARGET:.0%}. Within domains: {OUTER_FOLDS}-fold over "
        f"questions; across domains: {OUTER_FOLDS} folds of whole domains (each test domain unseen in training). "
        "Each test fold is routed by a probe fitted on the other folds, with its threshold chosen by `router fit`'s "
        "procedure (inner 5-fold out-of-fold curve, L2 by held-out log loss) on those training folds only.",
        "",
        "**Which estimator earns its place** (within domains, out-of-fold scores, strong share needed for 95% read "
        "off the pooled test curve, lower is better; random needs "
        f"{random_share:.1%}):",
        "",
        "| estimator | features | strong share for 95% | × random | fit+predict s |",
        "|---|---|---|---|---|",
    ]
    y = labels.weak_ok
    emb = np.asarray(vectors, float)
    cheap = x[:, emb.shape[1] :]
    candidates = [
        ("logistic probe (L2=30)", "embedding + cheap", lambda a, b: LogisticProbe.fit(a, b, 30.0), x),
        ("logistic probe (L2=3000)", "embedding + cheap", lambda a, b: LogisticProbe.fit(a, b, 3000.0), x),
        ("logistic probe (L2=300)", "embedding + cheap", lambda a, b: LogisticProbe.fit(a, b, 300.0), x),
        ("logistic probe (L2=3000)", "embedding only", lambda a, b: LogisticProbe.fit(a, b, 3000.0), emb),
        ("logistic probe (L2=1)", "cheap only", lambda a, b: LogisticProbe.fit(a, b, 1.0), cheap),
        ("kNN cosine, k=25", "embedding", lambda a, b: KnnProbe.fit(a, b, 25), emb),
        ("kNN cosine, k=100", "embedding", lambda a, b: KnnProbe.fit(a, b, 100), emb),
    ]
    try:
        import sklearn  # noqa: F401

        candidates.append(("gradient boosting (sklearn HistGB)", "embedding + cheap", _Gbm, x))
    except ImportError:
        lines.insert(-2, "(scikit-learn not installed: gradient boosting skipped)")
    for name, feats, make, data in candidates:
        started = time.perf_counter()
        scores = oof_scores(make, data, y, within)
        share = share_for(routing_curve(scores, labels))
        lines.append(
            f"| {name} | {feats} | {share:.1%} | {share / random_share:.2f}× | {time.perf_counter() - started:.1f} |"
        )

    lines += [
        "",
        "**Strong-call share for 95% of all-strong accuracy** (the learned router: logistic probe over embedding + "
        "cheap features, as `router fit` builds it):",
        "",
        "| router | strong share for 95% (test curve) | × random | threshold chosen on training folds: strong share "
        "| its test quality [bootstrap 95%] | worst fold quality | cost vs all-strong: " + " | ".join(costs) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(costs),
    ]

    def cost_ratio(routed: np.ndarray) -> list[str]:
        out = []
        for weak_cost, strong_cost in costs.values():
            out.append(f"{(weak_cost[routed].sum() + strong_cost[~routed].sum()) / strong_cost.sum():.1%}")
        return out

    def analytic_cost(share: float) -> list[str]:
        return [f"{(share * s.sum() + (1 - share) * w.sum()) / s.sum():.1%}" for w, s in costs.values()]

    lines.append(
        f"| random | {random_share:.1%} | 1.00× | — | 95.0% (by construction) | — | "
        + " | ".join(analytic_cost(random_share))
        + " |"
    )
    lines.append(
        f"| oracle (strong only where weak is wrong and strong right) | {oracle_share:.1%} | "
        f"{oracle_share / random_share:.2f}× | — | — | — | " + " | ".join(analytic_cost(oracle_share)) + " |"
    )
    order = np.argsort(lengths)
    rule_routed = np.zeros(n, bool)
    rule_routed[order[: round((1 - rule_share) * n)]] = True
    lines.append(
        f"| best rule: short prompts → weak (length threshold swept on all data: optimistic) | {rule_share:.1%} | "
        f"{rule_share / random_share:.2f}× | — | — | — | " + " | ".join(cost_ratio(rule_routed)) + " |"
    )
    results = {}
    for label, parts in (("within domains", within), ("across domains (unseen domains)", across)):
        out = cross_fit(x, labels, parts, label)
        results[label] = out
        curve_share = share_for(routing_curve(out.test_scores, labels))
        served = np.where(out.routed, labels.weak_value, labels.strong_value)
        quality = served.sum() / labels.all_strong
        lo, hi = bootstrap_quality(served, labels.strong_value)
        lines.append(
            f"| learned router, {label} | {curve_share:.1%} | {curve_share / random_share:.2f}× | "
            f"{1 - out.routed.mean():.1%} ({(1 - out.routed.mean()) / random_share:.2f}× random) | {quality:.1%} "
            f"[{lo:.1%}, {hi:.1%}] | {min(out.fold_quality):.1%} | " + " | ".join(cost_ratio(out.routed)) + " |"
        )
    lines += [
        "",
        f"Random needs {random_share:.1%} strong calls, the oracle {oracle_share:.1%}. Per test fold, learned within "
        "domains: strong share "
        + ", ".join(f"{s:.1%}" for s in results["within domains"].fold_share)
        + "; quality "
        + ", ".join(f"{q:.1%}" for q in results["within domains"].fold_quality)
        + ". Across domains: strong share "
        + ", ".join(f"{s:.1%}" for s in results["across domains (unseen domains)"].fold_share)
        + "; quality "
        + ", ".join(f"{q:.1%}" for q in results["across domains (unseen domains)"].fold_quality)
        + ".",
    ]
    return lines
