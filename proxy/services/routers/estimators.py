"""Estimators of P(the cheap model's answer is at least as good), fitted in numpy so the proxy needs no
machine-learning library at run time: an L2-regularised logistic probe (Newton's method) over
standardised features, and k nearest neighbours by cosine (measured against it in bench/routing_replay)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # never overflows


@dataclass(frozen=True)
class LogisticProbe:
    weights: np.ndarray  # (d,)
    bias: float
    mean: np.ndarray  # (d,) feature standardisation learnt from the training rows
    scale: np.ndarray
    l2: float

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, l2: float, sample_weight: np.ndarray | None = None) -> LogisticProbe:
        mean = x.mean(axis=0)
        scale = x.std(axis=0)
        scale[scale < 1e-12] = 1.0
        z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
        w = np.zeros(z.shape[1])
        sw = np.ones(len(x)) if sample_weight is None else sample_weight
        penalty = np.full(z.shape[1], float(l2))
        penalty[-1] = 0.0  # the bias is not shrunk
        for _ in range(30):
            p = _sigmoid(z @ w)
            grad = z.T @ (sw * (p - y)) + penalty * w
            hess = (z * (sw * p * (1 - p))[:, None]).T @ z + np.diag(penalty) + 1e-9 * np.eye(len(w))
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.max(np.abs(step)) < 1e-5:
                break
        return cls(w[:-1].copy(), float(w[-1]), mean, scale, float(l2))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return _sigmoid(((x - self.mean) / self.scale) @ self.weights + self.bias)


@dataclass(frozen=True)
class KnnProbe:
    vectors: np.ndarray  # unit rows
    labels: np.ndarray
    k: int

    @classmethod
    def fit(cls, vectors: np.ndarray, y: np.ndarray, k: int) -> KnnProbe:
        return cls(np.asarray(vectors, dtype=np.float32), y.astype(np.float64), k)

    def predict(self, vectors: np.ndarray) -> np.ndarray:
        sims = np.asarray(vectors, dtype=np.float32) @ self.vectors.T
        k = min(self.k, sims.shape[1])
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        prior = self.labels.mean()
        return (self.labels[top].sum(axis=1) + prior) / (k + 1)  # one pseudo-count of the base rate
