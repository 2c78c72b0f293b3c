"""The file of a learned router (`llm-numbers-proxy router fit` writes it, `route.learned.router` names it):
JSON with the embedder it was fitted for, the data it saw, its estimator, and the held-out curve its
decision threshold is read from. Reading validates everything, so `check`, `serve` and a reload refuse
a missing, corrupt or mismatched file with one clear message.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "llm-numbers-proxy/router"
VERSION = 1
PACKAGED_LOCAL_MODEL = "all-MiniLM-L6-v2"  # proxy.retrieval.embedders.PACKAGED_MODEL (config cannot import it)
ESTIMATORS = ("logistic",)


class RouterFileError(Exception):
    """The router file cannot be used: the message says why, in words for the policy file's author."""


@dataclass(frozen=True, slots=True)
class CurvePoint:
    """Held-out: routing every prompt whose prediction is ≥ threshold gives this strong share and quality."""

    threshold: float | None  # None: route nothing (the all-strong end of the curve)
    strong_share: float
    quality: float


@dataclass(frozen=True)
class RouterFile:
    path: str
    embedder: str  # identity of the embedder the router was fitted on: "local:all-MiniLM-L6-v2:384"
    dim: int
    features: tuple[str, ...]  # cheap features after the embedding, in order
    estimator: str
    weights: tuple[float, ...]
    bias: float
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    n_labels: int
    label_format: str  # correctness ({weak_ok, strong_ok}) or pairwise ({winner})
    target_quality: float
    threshold: float | None
    curve: tuple[CurvePoint, ...]  # by strong share, from 1.0 (route nothing) down
    meta: dict[str, Any]

    def threshold_for(self, target_quality: float) -> CurvePoint:
        return threshold_for(self.curve, target_quality)


def threshold_for(curve: Sequence[CurvePoint], target_quality: float) -> CurvePoint:
    """The lowest strong share at which held-out quality stays ≥ target all the way down from all-strong
    (the curve starts there), so one lucky point past a dip is never chosen."""
    chosen = curve[0]
    for point in curve:
        if point.quality < target_quality:
            break
        chosen = point
    return chosen


def expected_embedder(embedder: str, local_model: str | None, models: dict[str, Any]) -> str:
    """The identity, without its dimension, that a policy file's embedder gives: `local:<model>` or
    `model:<name>:<upstream model>`."""
    if embedder == "local":
        return f"local:{Path(local_model).name if local_model else PACKAGED_LOCAL_MODEL}"
    cfg = models.get(embedder)
    upstream = getattr(cfg, "upstream_model", None) or embedder
    return f"model:{embedder}:{upstream}"


def _number(doc: dict[str, Any], key: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RouterFileError(f"`{key}` must be a finite number")
    if not lo <= value <= hi:
        raise RouterFileError(f"`{key}` must be between {lo} and {hi}, got {value}")
    return float(value)


def _vector(doc: dict[str, Any], key: str, length: int) -> tuple[float, ...]:
    values = doc.get(key)
    if not isinstance(values, list) or len(values) != length:
        got = len(values) if isinstance(values, list) else type(values).__name__
        raise RouterFileError(
            f"`estimator.{key}` must hold {length} numbers (embedding dimension + features), got {got}"
        )
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise RouterFileError(f"`estimator.{key}` holds a value that is not a finite number")
        out.append(float(v))
    return tuple(out)


def _parse(doc: Any, path: str) -> RouterFile:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise RouterFileError(f'not a router file (no "format": "{FORMAT}"); write one with `router fit`')
    if doc.get("version") != VERSION:
        raise RouterFileError(
            f"router file version {doc.get('version')!r} is not supported (this proxy reads {VERSION})"
        )
    embedder = doc.get("embedder")
    if not isinstance(embedder, dict) or not isinstance(embedder.get("identity"), str):
        raise RouterFileError("`embedder.identity` is missing")
    dim = embedder.get("dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise RouterFileError("`embedder.dim` must be a positive integer")
    if not embedder["identity"].endswith(f":{dim}"):
        raise RouterFileError(f"`embedder.identity` {embedder['identity']!r} does not end in its dimension {dim}")
    features = doc.get("features")
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise RouterFileError("`features` must be a list of feature names")
    est = doc.get("estimator")
    if not isinstance(est, dict) or est.get("kind") not in ESTIMATORS:
        kind = est.get("kind") if isinstance(est, dict) else None
        raise RouterFileError(f"unknown estimator {kind!r} (this proxy runs {', '.join(ESTIMATORS)})")
    width = dim + len(features)
    weights, mean, scale = (_vector(est, k, width) for k in ("weights", "mean", "scale"))
    if any(s <= 0 for s in scale):
        raise RouterFileError("`estimator.scale` must be positive")
    labels = doc.get("labels")
    if not isinstance(labels, dict) or labels.get("format") not in ("correctness", "pairwise"):
        raise RouterFileError("`labels.format` must be correctness or pairwise")
    n_labels = int(_number(labels, "n", 1))
    raw_curve = doc.get("curve")
    if not isinstance(raw_curve, list) or not raw_curve:
        raise RouterFileError("`curve` (the held-out strong share and quality by threshold) is missing")
    curve = []
    for point in raw_curve:
        if not isinstance(point, dict):
            raise RouterFileError("`curve` entries must be objects")
        t = point.get("threshold")
        if t is not None:
            t = _number(point, "threshold", 0.0, 1.0)
        curve.append(CurvePoint(t, _number(point, "strong_share", 0.0, 1.0), _number(point, "quality", 0.0, 10.0)))
    if curve[0].threshold is not None or curve[0].strong_share != 1.0:
        raise RouterFileError("`curve` must start at the all-strong point (threshold null, strong_share 1)")
    threshold = doc.get("threshold")
    if threshold is not None:
        threshold = _number(doc, "threshold", 0.0, 1.0)
    return RouterFile(
        path=path,
        embedder=embedder["identity"],
        dim=dim,
        features=tuple(features),
        estimator=est["kind"],
        weights=weights,
        bias=_number(est, "bias"),
        mean=mean,
        scale=scale,
        n_labels=n_labels,
        label_format=labels["format"],
        target_quality=_number(doc, "target_quality", 0.0, 1.0),
        threshold=threshold,
        curve=tuple(curve),
        meta={k: doc[k] for k in ("fitted_at", "folds", "labels", "estimator_choice") if k in doc},
    )


def read_router_file(path: str | os.PathLike[str]) -> RouterFile:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RouterFileError(f"router file {p} does not exist (fit one with `llm-numbers-proxy router fit`)") from None
    except OSError as e:
        raise RouterFileError(f"cannot read router file {p}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise RouterFileError(f"router file {p} is not UTF-8 JSON") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise RouterFileError(f"router file {p} is corrupt: invalid JSON at line {e.lineno}: {e.msg}") from None
    try:
        return _parse(doc, str(p))
    except RouterFileError as e:
        raise RouterFileError(f"router file {p}: {e}") from None


def write_router_file(path: str | os.PathLike[str], doc: dict[str, Any]) -> None:
    """Write atomically (a reload never reads half a file), after checking the document reads back."""
    p = Path(path)
    _parse(doc, str(p))
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, p)
