"""Issue 13: does a router that fine-tunes the embedder itself on the labels (RouteLLM's BERT classifier,
here all-MiniLM-L6-v2 with a one-logit head) beat the shipped logistic probe over frozen MiniLM vectors?
Within domains, on the same outer folds as bench/routing_estimators (5-fold over questions, seed 13); each
arm is fitted on the training folds only and read off its own test fold's curve (strong share for 95% of
all-strong accuracy). Fine-tuning costs minutes per fold on this CPU, so `--folds` runs the first N folds.

Usage: LLM_PROXY_DATA=/work/shared/data python -m bench.routing_finetune [--folds 1] [--epochs 2] [--write]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.results import report, short_commit
from bench.routing_data import embed_questions, load_questions
from bench.routing_estimators import random_share
from bench.routing_learned import SEED, labels_of, share_for
from bench.training import minilm_with_head, shuffled_batches
from bench.training import train as train_loop
from proxy.services.routers.estimators import LogisticProbe
from proxy.services.routers.features import feature_matrix
from proxy.services.routers.fit import kfold, routing_curve


def fine_tune(texts: list[str], y: np.ndarray, epochs: int, threads: int, max_len: int, seed: int = SEED):
    """MiniLM's weights plus a one-logit head, trained on P(weak is at least as good) by binary cross-entropy."""
    import torch

    tok, model = minilm_with_head(threads, seed)

    def loss_of(idx: list[int]):
        enc = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        target = torch.tensor(y[idx], dtype=torch.float32)
        return torch.nn.functional.binary_cross_entropy_with_logits(model(**enc).logits.squeeze(-1), target)

    steps = epochs * ((len(texts) + 15) // 16)
    train_loop(model, shuffled_batches(len(texts), 16), loss_of, epochs=epochs, steps=steps, lr=3e-5, seed=seed)
    return tok, model


def predict(tok, model, texts: list[str], max_len: int) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), 64):
            enc = tok(texts[i : i + 64], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            out.append(torch.sigmoid(model(**enc).logits.squeeze(-1)).numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folds", type=int, default=1, help="how many of the 5 outer folds to run")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--write", action="store_true", help="append the section to bench/RESULTS.md")
    args = ap.parse_args()
    started = time.perf_counter()
    questions = load_questions()
    vectors, identity = embed_questions(questions)
    labels = labels_of(questions)
    x, y = feature_matrix(vectors, labels.prompts), labels.weak_ok
    rows = []
    for k, test in enumerate(kfold(len(questions), 5, SEED)[: args.folds]):
        train = np.setdiff1d(np.arange(len(y)), test, assume_unique=True)
        held = labels.subset(test)
        rnd = random_share(held)
        probe = LogisticProbe.fit(x[train], y[train], 3000.0).predict(x[test])
        t = time.perf_counter()
        tok, model = fine_tune([labels.prompts[i] for i in train], y[train], args.epochs, args.threads, args.max_len)
        tuned = predict(tok, model, [labels.prompts[i] for i in test], args.max_len)
        seconds = time.perf_counter() - t
        for name, s in (
            ("logistic probe (L2=3000) over frozen MiniLM + cheap features", probe),
            (f"MiniLM fine-tuned on the labels ({args.epochs} epochs, ≤{args.max_len} tokens; {seconds:.0f} s)", tuned),
            ("mean of the two", (probe + tuned) / 2),
        ):
            share = share_for(routing_curve(s, held))
            rows.append(f"| {k + 1} ({len(test)}) | {name} | {share:.1%} | {share / rnd:.3f}× (random {rnd:.1%}) |")
        print("\n".join(rows[-3:]), flush=True)
    command = f"python -m bench.routing_finetune --folds {args.folds} --epochs {args.epochs} --max-len {args.max_len}"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = f"""
## Learned router on MMLU: MiniLM fine-tuned on the labels (issue 13) — {when} — 2-core shared VM (x86_64); \
commit {short_commit()} (`{command}`, {time.perf_counter() - started:.0f} s)

MMLU (29 domains, decontaminated, n={len(y)}), within domains: outer 5-fold over questions (seed {SEED}), each arm
fitted on the training folds only, strong share for 95% of all-strong accuracy read off the test fold's own curve
(frozen embedder: {identity}). The issue asks ≤ 0.7× random.

| test fold (questions) | router | strong share for 95% | × random |
|---|---|---|---|
""" + "\n".join(rows)
    report(text, args.write)


if __name__ == "__main__":
    main()
