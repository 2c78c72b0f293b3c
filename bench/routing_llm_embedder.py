"""Issue 13: does a router fitted on a small language model's hidden states need fewer strong calls than one
fitted on MiniLM? The embedder is what `llm-numbers-proxy router embedder` builds (the first layers of
gemma-3-270m, mean-pooled); both routers are fitted by `router fit`'s own procedure (logistic probe over the
embedding and the cheap features, L2 by inner log loss, threshold off the inner out-of-fold curve) on the
training folds only, on RouteLLM's MMLU questions (../shared/data/routellm_mmlu_dev).

Reports, for each embedder: the strong share for 95% of all-strong accuracy off the pooled test curve
(three fold seeds), the share and test quality of the threshold chosen on training folds (bootstrap 95%
interval), within domains (5-fold over questions) and across domains (5 folds of whole domains); and the
CPU time to embed one prompt, both embedders in the same run.

Usage: python -m bench.routing_llm_embedder [--model DIR] [--layers 6] [--write]
       python -m bench.routing_llm_embedder --screen 2,6,12,18 [--write]   (the screening that chose 6 layers)
       (without --model the folder is built under bench/.cache; embedding 7655 prompts takes ~10 min here)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.results import report, short_commit
from bench.routing_data import CACHE, embed_questions, embed_with_folder, load_questions
from bench.routing_estimators import random_share
from bench.routing_learned import SEED, TARGET, bootstrap_quality, cross_fit, labels_of, share_for
from proxy.retrieval.embedders import LocalModel
from proxy.services.routers.features import feature_matrix
from proxy.services.routers.fit import kfold, routing_curve

FOLD_SEEDS = (SEED, 1, 2)


def _folder(model: str | None, layers: int) -> Path:
    """`model`, or a folder of the first `layers` layers built as `router embedder` builds it (once)."""
    if model:
        return Path(model)
    from proxy.services.routers.llm_embedder import build_embedder, packaged_gguf

    out = CACHE / f"gemma-l{layers}"
    if not (out / "modules.json").is_file():
        build_embedder(packaged_gguf(CACHE), layers, out)
    return out


def _latency(folder: Path | None, prompts: list[str]) -> tuple[float, float]:
    """p50 and p95 ms to embed one prompt on one thread (the proxy's default `local_threads`)."""
    model = LocalModel(str(folder) if folder else None, 1)
    model.load_blocking()
    for p in prompts[:5]:
        model.encode_blocking([p])
    times = []
    for p in prompts:
        started = time.perf_counter()
        model.encode_blocking([p])
        times.append((time.perf_counter() - started) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def screen(labels, minilm: np.ndarray, layers: tuple[int, ...]) -> list[str]:
    """The screening that chose the layers: pooled test curves (fold seeds 13 / 1 / 2) of a logistic probe at a
    fixed L2, per embedder folder built with that many layers. Read off test folds: a design choice, not a result."""
    from proxy.services.routers.estimators import LogisticProbe

    rnd = random_share(labels)
    n, y = len(labels.prompts), labels.weak_ok
    arms = {"all-MiniLM-L6-v2": feature_matrix(minilm, labels.prompts)}
    for k in layers:
        vectors = embed_with_folder(_folder(None, k), labels.prompts)
        arms[f"gemma-3-270m, first {k} layers"] = feature_matrix(vectors, labels.prompts)
    lines = ["| embedder | L2 | × random, fold seeds 13 / 1 / 2 | mean |", "|---|---|---|---|"]
    for name, x in arms.items():
        for l2 in (1000.0, 3000.0):
            r = []
            for fold_seed in FOLD_SEEDS:
                scores = np.zeros(n)
                for test in kfold(n, 5, fold_seed):
                    train = np.setdiff1d(np.arange(n), test, assume_unique=True)
                    scores[test] = LogisticProbe.fit(x[train], y[train], l2).predict(x[test])
                r.append(share_for(routing_curve(scores, labels)) / rnd)
            lines.append(f"| {name} | {l2:g} | {' / '.join(f'{v:.3f}' for v in r)} | {np.mean(r):.3f}× |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="a folder from `llm-numbers-proxy router embedder` (default: build one)")
    ap.add_argument("--layers", type=int, default=6, help="when building: decoder layers to keep")
    ap.add_argument("--latency-prompts", type=int, default=200)
    ap.add_argument("--screen", metavar="LAYERS", help="only the layer screening, e.g. 2,6,12,18")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    started = time.perf_counter()
    questions = load_questions()
    labels = labels_of(questions)
    n = len(questions)
    if args.screen:
        minilm, _ = embed_questions(questions, threads=2)
        text = "\n".join(
            [
                f"MMLU (29 domains, decontaminated, n={n}); within domains, 5-fold over questions; strong share "
                "for 95% of all-strong accuracy off the pooled test curve, × random. Each gemma folder as "
                "`router embedder --layers K` builds it.",
                "",
                *screen(labels, minilm, tuple(int(k) for k in args.screen.split(","))),
                "",
                f"({time.perf_counter() - started:.0f} s on this machine, embedding included.)",
            ]
        )
        heading = (
            f"## Learned router on MMLU: which layers of gemma-3-270m (issue 13) — {time.strftime('%Y-%m-%d')} — "
            f"2-core shared VM (x86_64), commit {short_commit()} (`python -m bench.routing_llm_embedder --screen "
            f"{args.screen}`)"
        )
        report(heading + "\n\n" + text, args.write)
        return
    folder = _folder(args.model, args.layers)
    minilm, identity = embed_questions(questions, threads=2)
    arms = {identity: feature_matrix(minilm, labels.prompts)}
    llm = embed_with_folder(folder, labels.prompts)
    llm_identity = f"local:{folder.name}:{llm.shape[1]}"
    arms[llm_identity] = feature_matrix(llm, labels.prompts)
    rnd = random_share(labels)
    domains = np.asarray([q.domain for q in questions])
    rng = np.random.default_rng(SEED)
    sample = [labels.prompts[i] for i in rng.choice(n, args.latency_prompts, replace=False)]
    latency = {identity: _latency(None, sample), llm_identity: _latency(folder, sample)}

    lines = [
        f"MMLU (29 domains, decontaminated, n={n}); target {TARGET:.0%} of all-strong accuracy; random needs "
        f"{rnd:.1%} strong calls, the issue asks ≤ 0.7× ({0.7 * rnd:.1%}). Each router: `router fit`'s procedure "
        "on the training folds only (logistic probe over the embedding + cheap features, L2 by inner log loss, "
        "threshold off the inner out-of-fold curve). Pooled test curve: the strong share read off all test folds' "
        "scores (three fold seeds). Chosen: the share and quality of the threshold chosen on the training folds "
        "(seed 13; quality interval: 1000 bootstrap draws of questions). Latency: one prompt at a time on one "
        f"thread, {len(sample)} random prompts, both embedders in this run.",
        "",
        "| embedder | split | pooled test curve, seeds 13 / 1 / 2 | mean × random | chosen on training folds: strong "
        "share (× random) | its test quality [95%] | worst fold quality | embed one prompt p50 / p95 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, x in arms.items():
        for split in ("within domains", "across domains"):
            shares, outcome = [], None
            for fold_seed in FOLD_SEEDS:
                groups = domains if split == "across domains" else None
                out = cross_fit(x, labels, kfold(n, 5, fold_seed, groups=groups), split)
                shares.append(share_for(routing_curve(out.test_scores, labels)))
                outcome = outcome or out
            assert outcome is not None
            served = np.where(outcome.routed, labels.weak_value, labels.strong_value)
            lo, hi = bootstrap_quality(served, labels.strong_value)
            chosen = 1 - outcome.routed.mean()
            p50, p95 = latency[name]
            lines.append(
                f"| {name} | {split} | {' / '.join(f'{s:.1%}' for s in shares)} | {np.mean(shares) / rnd:.3f}× | "
                f"{chosen:.1%} ({chosen / rnd:.3f}×) | {served.sum() / labels.all_strong:.1%} [{lo:.1%}, {hi:.1%}] | "
                f"{min(outcome.fold_quality):.1%} | {p50:.1f} / {p95:.1f} |"
            )
    lines += ["", f"({time.perf_counter() - started:.0f} s on this machine.)"]
    heading = (
        f"## Learned router on MMLU: a language-model embedder (issue 13) — {time.strftime('%Y-%m-%d')} — 2-core "
        f"shared VM (x86_64, AVX-512 BF16/AMX), commit {short_commit()} (`python -m bench.routing_llm_embedder "
        f"{f'--model {args.model}' if args.model else f'--layers {args.layers}'}{' --write' if args.write else ''}`)"
    )
    report(heading + "\n\n" + "\n".join(lines), args.write)


if __name__ == "__main__":
    main()
