"""The in-process vector index of one collection: exact search while a partition is small, an HNSW
index (usearch, int8) for candidates once it is large, every candidate rescored exactly in float32.

Rows of a partition are vectors of unit length; similarity is the dot product (cosine). A partition
is one (team scope, conversation context) pair, so an entry is never a candidate for a request it
may not answer, and the best and second-best are compared among the entries that may.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("llm_proxy.retrieval")

ANN_MIN_ROWS = 4096  # below this an exact scan is faster than an approximate one
_ANN_CANDIDATES = 32
_REBUILD_FRACTION = 0.2  # rebuild the ANN once this share of rows changed since it was built


@dataclass(eq=False)
class _Ann:
    index: object  # usearch.index.Index
    built_rows: int


@dataclass(eq=False)
class Partition:
    dim: int
    vectors: np.ndarray = field(init=False)
    alive: np.ndarray = field(init=False)
    size: int = 0  # rows in use or freed (the high-water mark)
    count: int = 0  # rows alive
    free: list[int] = field(default_factory=list)
    ann: _Ann | None = None
    changed: set[int] = field(default_factory=set)  # rows written since the ANN was built: scanned exactly
    build_log: set[int] | None = None  # rows written while a new ANN is being built
    building: bool = False

    def __post_init__(self) -> None:
        self.vectors = np.zeros((16, self.dim), dtype=np.float32)
        self.alive = np.zeros(16, dtype=bool)

    def add(self, vector: np.ndarray) -> int:
        if self.free:
            row = self.free.pop()
        else:
            row = self.size
            self.size += 1
            if row >= len(self.vectors):
                grow = max(16, len(self.vectors))
                self.vectors = np.concatenate([self.vectors, np.zeros((grow, self.dim), np.float32)])
                self.alive = np.concatenate([self.alive, np.zeros(grow, dtype=bool)])
        self.vectors[row] = vector
        self.alive[row] = True
        self.count += 1
        if self.ann is not None:
            self.changed.add(row)
        if self.build_log is not None:
            self.build_log.add(row)
        return row

    def remove(self, row: int) -> None:
        if self.alive[row]:
            self.alive[row] = False
            self.count -= 1
            self.free.append(row)

    def needs_ann(self) -> bool:
        if self.building or self.count < ANN_MIN_ROWS:
            return False
        return self.ann is None or len(self.changed) > _REBUILD_FRACTION * max(1, self.ann.built_rows)

    async def refresh_ann(self) -> bool:
        """Build a new ANN from the rows as they are now, on a worker thread; searches keep using the
        old one (or exact scans) until it is swapped in. False when usearch is not installed."""
        self.building = True
        self.build_log = set()
        rows, vectors = self.snapshot()
        try:
            index = await asyncio.to_thread(build_ann, self.dim, rows, vectors)
        finally:
            self.building = False
        log_, self.build_log = self.build_log, None
        if index is None:
            return False
        self.ann = _Ann(index, len(rows))
        self.changed = log_
        return True

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The k most similar alive rows, best first, as (row, similarity)."""
        if self.count == 0:
            return []
        if self.ann is None:
            sims = self.vectors[: self.size] @ query
            sims[~self.alive[: self.size]] = -np.inf
            rows = np.arange(self.size)
        else:
            found = self.ann.index.search(query, _ANN_CANDIDATES)
            candidates = {int(r) for r in found.keys if r < self.size} | self.changed
            rows = np.fromiter((r for r in candidates if self.alive[r]), dtype=np.int64)
            if len(rows) == 0:
                return []
            sims = self.vectors[rows] @ query
        take = min(k, len(sims))
        top = np.argpartition(-sims, take - 1)[:take]
        top = top[np.argsort(-sims[top])]
        return [(int(rows[i]), float(sims[i])) for i in top if sims[i] > -np.inf]

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        rows = np.flatnonzero(self.alive[: self.size])
        return rows, self.vectors[rows].copy()


def build_ann(dim: int, rows: np.ndarray, vectors: np.ndarray) -> object | None:
    """An HNSW index over the given rows (run on a worker thread); None without usearch."""
    try:
        from usearch.index import Index
    except ImportError:
        return None
    index = Index(ndim=dim, metric="ip", dtype="i8", connectivity=16, expansion_add=64, expansion_search=128)
    # One thread: usearch's concurrent inserts leave ~0.1-0.2% of near-duplicate queries unable to reach
    # their row (bench/ann_recall.py); one thread loses none, at ~1.5x the build time, off the request path.
    index.add(rows.astype(np.uint64), vectors, threads=1)
    return index


class VectorIndex:
    """All partitions of one collection, for one embedder identity (one dimension)."""

    def __init__(self, identity: str, dim: int):
        self.identity = identity
        self.dim = dim
        self.partitions: dict[tuple[str, str], Partition] = {}

    def add(self, key: tuple[str, str], vector: np.ndarray) -> int:
        part = self.partitions.get(key)
        if part is None:
            part = self.partitions[key] = Partition(self.dim)
        return part.add(vector)

    def remove(self, key: tuple[str, str], row: int) -> None:
        part = self.partitions.get(key)
        if part is not None:
            part.remove(row)
            if part.count == 0:
                del self.partitions[key]

    def search(
        self, keys: list[tuple[str, str]], query: np.ndarray, k: int
    ) -> list[tuple[tuple[str, str], int, float]]:
        out: list[tuple[tuple[str, str], int, float]] = []
        for key in keys:
            part = self.partitions.get(key)
            if part is not None:
                out += [(key, row, sim) for row, sim in part.search(query, k)]
        out.sort(key=lambda t: -t[2])
        return out[:k]

    def rows(self) -> int:
        return sum(p.count for p in self.partitions.values())
