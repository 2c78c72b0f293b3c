"""The retrieval index's HNSW build (usearch, int8; proxy.retrieval.index.build_ann's settings): how many
near-duplicate queries (a stored unit vector plus 5% noise) miss their row among the 32 candidates, built with one
insert thread and with two, over random unit vectors. Three builds per setting, 1000 queries each.

    python -m bench.ann_recall [--write]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.results import report, short_commit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help="append the section to bench/RESULTS.md")
    args = ap.parse_args()
    from usearch.index import Index

    rng = np.random.default_rng(2)

    def unit(n: int, d: int) -> np.ndarray:
        v = rng.standard_normal((n, d)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    rows = ["| rows × dimensions | insert threads | near-duplicate queries missed | build, mean of 3 |"]
    rows.append("|---|---|---|---|")
    for n, d in ((5000, 32), (20000, 384)):
        vectors = unit(n, d)
        queries = vectors[:1000] + 0.05 * unit(1000, d)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        exact = np.argmax(queries @ vectors.T, axis=1)
        for threads in (1, 2):
            missed, build_s = 0, 0.0
            for _ in range(3):
                index = Index(ndim=d, metric="ip", dtype="i8", connectivity=16, expansion_add=64, expansion_search=128)
                started = time.perf_counter()
                index.add(np.arange(n, dtype=np.uint64), vectors, threads=threads)
                build_s += time.perf_counter() - started
                found = index.search(queries, 32).keys
                missed += sum(int(e) not in set(map(int, row)) for e, row in zip(exact, found, strict=True))
            rows.append(f"| {n} × {d} | {threads} | {missed} of 3000 | {build_s / 3:.2f} s |")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = (
        f"## Retrieval index: HNSW recall by insert threads — {when} — 2-core shared VM (x86_64); Python 3.11.7; "
        f"commit {short_commit()} (`python -m bench.ann_recall`)\n\n" + "\n".join(rows)
    )
    report(text, args.write)


if __name__ == "__main__":
    main()
