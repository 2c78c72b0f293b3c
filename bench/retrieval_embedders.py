"""Retrieval recall with another embedder: the shipped verifier's procedure (train on STS-B train + dev,
threshold by the lower confidence bound of cross-fitted precision) over the packaged MiniLM, over another
sentence-transformers folder (`--model PATH`, e.g. all-mpnet-base-v2), and over MiniLM's features plus the
other model's cosine and margin (a second embedder as a cross-check). Held out: STS-B test, SemEval QQ.

    LLM_PROXY_DATA=../shared/data python -m bench.retrieval_embedders --model /path/to/all-mpnet-base-v2 --write
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.results import report, short_commit
from bench.retrieval_eval import CachedEmbedder, _ceiling, _semeval_qq, _stsb
from proxy.retrieval.calibrate import VERIFIER_FLOOR, Pair, pick_by_lower_bound, verifier_inputs
from proxy.retrieval.embedders import LocalModel
from proxy.retrieval.intervals import clopper_pearson, wilson
from proxy.retrieval.verifier import cross_fitted_probabilities, train_verifier


def _features(pairs: list[Pair], embedders: list[CachedEmbedder]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The verifier's features over the first embedder; a second one adds its cosine and margin."""
    parts = []
    for e in embedders:
        va, vb = e([p.a for p in pairs]), e([p.b for p in pairs])
        parts.append(verifier_inputs(pairs, va, vb))
    x = parts[0][0] if len(parts) == 1 else np.hstack([parts[0][0], parts[1][0][:, :2]])
    return x, parts[0][1], parts[0][2]


def _arm(name: str, embedders: list[CachedEmbedder], cal: list[Pair], held: dict[str, list[Pair]], target: float):
    x, cos, y = _features(cal, embedders)
    usable = cos >= VERIFIER_FLOOR
    threshold = pick_by_lower_bound(cross_fitted_probabilities(x, y), usable, y, target)
    verifier = train_verifier(x, y, "", threshold if threshold is not None else 1.0, VERIFIER_FLOOR)
    cells = [name, "none" if threshold is None else f"{threshold:.3f}"]
    for pairs in held.values():
        xh, cosh, yh = _features(pairs, embedders)
        p = np.where(cosh >= VERIFIER_FLOOR, verifier.probability(xh), -3.0)
        hit = p >= (threshold if threshold is not None else 2.0)
        tp, n, pos = int((hit & yh).sum()), int(hit.sum()), int(yh.sum())
        lo, hi = clopper_pearson(tp, n) if n else (float("nan"), float("nan"))
        rlo, rhi = wilson(tp, pos)
        precision = f"{tp / n:.3f} [{lo:.3f}, {hi:.3f}]" if n else "— (no hits)"
        cells += [precision, f"{tp / pos:.3f} [{rlo:.3f}, {rhi:.3f}] ({n})", _ceiling(p, yh)]
    return "| " + " | ".join(cells) + " |"


HEADER = """\
| verifier | threshold | STS-B test precision | recall (hits) | ceiling | SemEval QQ precision | recall (hits) | ceil. |
|---|---|---|---|---|---|---|---|"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a sentence-transformers folder to compare with MiniLM")
    ap.add_argument("--target-precision", type=float, default=0.93)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="append the section to bench/RESULTS.md")
    args = ap.parse_args()
    started = time.perf_counter()
    models = {}
    for path in (None, args.model):
        model = LocalModel(path, threads=args.threads)
        model.load_blocking()
        models[model.label] = CachedEmbedder(model)  # vectors kept in /tmp between runs
    (mini_label, mini), (other_label, other) = models.items()
    single = []
    for label, e in models.items():
        t = time.perf_counter()
        for _ in range(20):
            e.model.encode_blocking([f"How do I reset my password on the website, take {time.time()}?"])
        single.append(f"{label} {(time.perf_counter() - t) / 20 * 1000:.0f} ms")
    cal = _stsb("train") + _stsb("dev")
    held = {"STS-B test": _stsb("test"), "SemEval-2016 QQ": _semeval_qq()}
    arms = {
        f"verifier over {mini_label}": [mini],
        f"verifier over {other_label}": [other],
        f"{mini_label} verifier + {other_label} cosine and margin": [mini, other],
    }
    rows = [_arm(name, embedders, cal, held, args.target_precision) for name, embedders in arms.items()]
    for e in models.values():
        e.save()
    command = f"python -m bench.retrieval_embedders --model {other_label} --target-precision {args.target_precision}"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = f"""
## Retrieval recall: another embedder — {when} — 2-core shared VM (x86_64); Python 3.11.7; commit {short_commit()} \
(`{command}`, {time.perf_counter() - started:.0f} s)

Trained and cross-fitted (5 folds) on STS-B train + dev only ({len(cal)} pairs); threshold = the lowest whose
cross-fitted hits' one-sided 95% Clopper–Pearson lower bound of precision is ≥ {args.target_precision}, cosine floor
{VERIFIER_FLOOR} (on the first embedder). Held out: STS-B test ({len(held["STS-B test"])} pairs), SemEval-2016 QQ
({len(held["SemEval-2016 QQ"])}). Precision [95% Clopper–Pearson], recall [95% Wilson] (hits). Ceiling = the most recall
at held-out precision ≥ 0.95 with the threshold tuned on the held-out set itself (not a result). One query's
embedding on this CPU (one at a time, mean of 20): {", ".join(single)}.

{HEADER}
""" + "\n".join(rows)
    report(text, args.write)


if __name__ == "__main__":
    main()
