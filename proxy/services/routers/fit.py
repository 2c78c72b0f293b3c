"""Fitting a learned router from labelled prompts (the RouteLLM formats): out-of-fold predictions give
the held-out curve of strong share against quality, the decision threshold is read off that curve for
the target quality, and the estimator is then refitted on every label.

Quality is measured against all-strong: for correctness labels (`{prompt, weak_ok, strong_ok}`) it is
the accuracy of the routed answers over the strong model's accuracy; for pairwise labels (`{prompt,
winner: weak|strong|tie}`) it is the share of answers at least as good as the strong model's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from proxy.config.router_file import FORMAT, VERSION, CurvePoint, threshold_for
from proxy.services.routers.estimators import LogisticProbe

L2_GRID = (300.0, 3000.0, 10000.0)  # on MMLU (bench/RESULTS.md) held-out log loss falls up to ~3000
CURVE_POINTS = 201  # strong share in steps of 0.5%
_MIN_LABELS = 20
_TRUE = (True, 1, "true", "True")
_FALSE = (False, 0, "false", "False")


class LabelsError(Exception):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Labels:
    """Labelled prompts. Per prompt, what the served answer is worth when it comes from the weak or the
    strong model, on the quality scale of the label format; `all_strong` is the total of all-strong."""

    prompts: list[str]
    weak_value: np.ndarray
    strong_value: np.ndarray
    format: str

    @property
    def weak_ok(self) -> np.ndarray:
        """The class the router predicts: the weak answer is at least as good as the strong one."""
        return (self.weak_value >= self.strong_value).astype(np.float64)

    @property
    def all_strong(self) -> float:
        return float(self.strong_value.sum())

    def subset(self, rows: np.ndarray) -> Labels:
        return Labels([self.prompts[i] for i in rows], self.weak_value[rows], self.strong_value[rows], self.format)


def _flag(value: Any) -> bool | None:
    if value in _TRUE and not isinstance(value, float):
        return True
    if value in _FALSE and not isinstance(value, float):
        return False
    return None


def read_labels(path: str | Path) -> Labels:
    """JSONL, one labelled prompt per line; every problem reported as `file:line: message`."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise LabelsError([f"{p}: cannot read labels: {e.strerror}"]) from None
    except UnicodeDecodeError:
        raise LabelsError([f"{p}: labels are not UTF-8 text"]) from None
    return parse_labels(lines, str(p))


def parse_labels(lines: list[str], source: str) -> Labels:
    """Labels from JSONL lines; problems as `source:line: message`."""
    p = source
    prompts: list[str] = []
    weak: list[float] = []
    strong: list[float] = []
    problems: list[str] = []
    fmt: str | None = None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: invalid JSON: {e.msg}")
            continue
        if not isinstance(obj, dict):
            problems.append(f"{where}: a label must be a JSON object")
            continue
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(f"{where}: missing field 'prompt' (a non-empty string)")
            continue
        if "winner" in obj:
            line_fmt = "pairwise"
            winner = obj["winner"]
            if winner not in ("weak", "strong", "tie"):
                problems.append(f"{where}: 'winner' must be weak, strong or tie, got {winner!r}")
                continue
            # Pairwise: strong is the reference (1); a weak answer is worth 1 when at least as good.
            w, s = (0.0 if winner == "strong" else 1.0), 1.0
        else:
            line_fmt = "correctness"
            missing = [k for k in ("weak_ok", "strong_ok") if k not in obj]
            if missing:
                problems.append(f"{where}: missing field '{missing[0]}' (give weak_ok and strong_ok, or winner)")
                continue
            flags = [_flag(obj["weak_ok"]), _flag(obj["strong_ok"])]
            if None in flags:
                bad = "weak_ok" if flags[0] is None else "strong_ok"
                problems.append(f"{where}: '{bad}' must be true or false, got {obj[bad]!r}")
                continue
            w, s = float(flags[0]), float(flags[1])
        if fmt is None:
            fmt = line_fmt
        elif line_fmt != fmt:
            problems.append(f"{where}: a {line_fmt} label in a file of {fmt} labels (use one format per file)")
            continue
        prompts.append(prompt)
        weak.append(w)
        strong.append(s)
    if not problems and len(prompts) < _MIN_LABELS:
        problems.append(f"{p}: {len(prompts)} labels; a router needs at least {_MIN_LABELS}")
    if not problems and strong and sum(strong) == 0:
        problems.append(f"{p}: the strong model is never right: there is no quality to keep")
    if not problems:
        ok = {w >= s for w, s in zip(weak, strong, strict=True)}
        if len(ok) == 1:
            said = "at least as good as" if ok.pop() else "worse than"
            problems.append(
                f"{p}: every label says the cheap answer is {said} the strong one: a router learns nothing "
                "from one class"
            )
    if problems:
        raise LabelsError(problems)
    return Labels(prompts, np.asarray(weak), np.asarray(strong), fmt or "correctness")


# -- the held-out curve --------------------------------------------------------------------------------


def routing_curve(scores: np.ndarray, labels: Labels, points: int = CURVE_POINTS) -> list[CurvePoint]:
    """Route the prompts with the highest scores to the weak model: the quality at each strong share,
    from all-strong (nothing routed) to all-weak."""
    order = np.argsort(-scores, kind="stable")
    gain = np.concatenate([[0.0], np.cumsum(labels.weak_value[order] - labels.strong_value[order])])
    total = labels.all_strong
    n = len(scores)
    out = [CurvePoint(None, 1.0, 1.0)]
    for i in range(1, points):
        routed = round(i * n / (points - 1))
        if routed == 0:
            continue
        out.append(CurvePoint(float(scores[order[routed - 1]]), 1 - routed / n, float((total + gain[routed]) / total)))
    return out


def evaluate(scores: np.ndarray, labels: Labels, threshold: float | None) -> tuple[float, float]:
    """(strong share, quality) of routing the prompts scoring ≥ threshold."""
    routed = np.zeros(len(scores), bool) if threshold is None else scores >= threshold
    served = np.where(routed, labels.weak_value, labels.strong_value).sum()
    return 1 - float(routed.mean()), float(served / labels.all_strong)


def kfold(n: int, folds: int, seed: int, groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Test rows of each fold: shuffled rows, or whole groups together (no group in two folds)."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return [np.sort(f) for f in np.array_split(rng.permutation(n), folds)]
    names = rng.permutation(np.unique(groups))
    return [np.flatnonzero(np.isin(groups, part)) for part in np.array_split(names, folds)]


@dataclass(frozen=True)
class FittedRouter:
    probe: LogisticProbe
    l2: float
    oof_scores: np.ndarray  # out-of-fold predictions, one per label
    curve: list[CurvePoint]
    chosen: CurvePoint
    target_quality: float
    folds: int


def fit_router(
    x: np.ndarray,
    labels: Labels,
    target_quality: float = 0.95,
    folds: int = 5,
    seed: int = 0,
    l2_grid: tuple[float, ...] = L2_GRID,
) -> FittedRouter:
    """Out-of-fold predictions for each L2 strength; the strength with the best held-out log loss gives
    the curve and the threshold; the final probe is fitted on every row."""
    y = labels.weak_ok
    parts = kfold(len(y), folds, seed)
    best: tuple[float, float, np.ndarray] | None = None
    for l2 in l2_grid:
        oof = np.zeros(len(y))
        for test in parts:
            train = np.setdiff1d(np.arange(len(y)), test, assume_unique=True)
            oof[test] = LogisticProbe.fit(x[train], y[train], l2).predict(x[test])
        p = np.clip(oof, 1e-6, 1 - 1e-6)
        loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
        if best is None or loss < best[0]:
            best = (loss, l2, oof)
    assert best is not None
    _, l2, oof = best
    curve = routing_curve(oof, labels)
    return FittedRouter(
        LogisticProbe.fit(x, y, l2), l2, oof, curve, threshold_for(curve, target_quality), target_quality, folds
    )


def _digits(values: np.ndarray) -> list[float]:
    return [float(f"{v:.8g}") for v in values]  # 8 significant digits: a readable file, the same predictions


def router_document(fitted: FittedRouter, labels: Labels, embedder: str, dim: int, features: list[str]) -> dict:
    """The JSON of a router file (proxy.config.router_file reads it)."""
    probe = fitted.probe
    return {
        "format": FORMAT,
        "version": VERSION,
        "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "embedder": {"identity": embedder, "dim": dim},
        "features": features,
        "estimator": {
            "kind": "logistic",
            "l2": fitted.l2,
            "weights": _digits(probe.weights),
            "bias": float(probe.bias),
            "mean": _digits(probe.mean),
            "scale": _digits(probe.scale),
        },
        "labels": {
            "n": len(labels.prompts),
            "format": labels.format,
            "weak_ok_share": float(labels.weak_ok.mean()),
            "all_weak_quality": float(labels.weak_value.sum() / labels.all_strong),
        },
        "folds": fitted.folds,
        "target_quality": fitted.target_quality,
        "threshold": fitted.chosen.threshold,
        "held_out": {"strong_share": fitted.chosen.strong_share, "quality": fitted.chosen.quality},
        "curve": [
            {"threshold": p.threshold, "strong_share": round(p.strong_share, 6), "quality": round(p.quality, 6)}
            for p in fitted.curve
        ],
    }
