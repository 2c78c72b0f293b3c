"""Would a cross-encoder reach the retrieval recall target? A small one, made here: the packaged
all-MiniLM-L6-v2 weights with a regression head, fine-tuned on STS-B train only (score / 5, MSE), its
threshold chosen on STS-B dev by the shipped rule (the lowest whose hits' one-sided 95% Clopper–Pearson lower
bound of precision is ≥ the target), reported on STS-B test and SemEval-2016 QQ (never seen in training or
threshold choice), with its CPU cost per pair. A measurement, not a shipped feature.

    LLM_PROXY_DATA=../shared/data python -m bench.retrieval_cross_encoder [--epochs 2] [--write]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bench.results import report, short_commit
from bench.retrieval_eval import DATA, _ceiling, _semeval_qq, _stsb
from bench.training import minilm_with_head, shuffled_batches
from bench.training import train as train_loop
from proxy.retrieval.calibrate import Pair, pick_by_lower_bound
from proxy.retrieval.intervals import clopper_pearson, wilson


def _scores_of(path: str) -> list[float]:
    import csv

    with open(DATA / "stsb_en" / f"stsb-en-{path}.csv", encoding="utf-8") as f:
        return [float(r[2]) / 5.0 for r in csv.reader(f) if r]


def train(pairs: list[Pair], targets: list[float], epochs: int, threads: int, seed: int = 13):
    import torch

    tok, model = minilm_with_head(threads, seed)

    def loss_of(idx: list[int]):
        both = [(pairs[j].a, pairs[j].b) for j in idx] + [(pairs[j].b, pairs[j].a) for j in idx]  # both orders
        batch = tok([a for a, _ in both], [b for _, b in both], padding=True, truncation=True, max_length=128)
        batch = {k: torch.tensor(v) for k, v in batch.items()}
        y = torch.tensor([targets[j] for j in idx] * 2, dtype=torch.float32)
        return torch.nn.functional.mse_loss(torch.sigmoid(model(**batch).logits.squeeze(-1)), y)

    steps = epochs * ((len(pairs) + 15) // 16)
    train_loop(model, shuffled_batches(len(pairs), 16), loss_of, epochs=epochs, steps=steps, lr=4e-5, seed=seed)
    return tok, model


def score(tok, model, pairs: list[Pair]) -> np.ndarray:
    """Symmetric: the mean of both orders."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(pairs), 64):
            chunk = pairs[i : i + 64]
            per_order = []
            for a, b in (([p.a for p in chunk], [p.b for p in chunk]), ([p.b for p in chunk], [p.a for p in chunk])):
                batch = tok(a, b, padding=True, truncation=True, max_length=128, return_tensors="pt")
                per_order.append(torch.sigmoid(model(**batch).logits.squeeze(-1)).numpy())
            out.append((per_order[0] + per_order[1]) / 2)
    return np.concatenate(out)


def _cell(s: np.ndarray, y: np.ndarray, threshold: float | None) -> str:
    hit = s >= (threshold if threshold is not None else 2.0)
    tp, n, pos = int((hit & y).sum()), int(hit.sum()), int(y.sum())
    lo, hi = clopper_pearson(tp, n) if n else (float("nan"), float("nan"))
    rlo, rhi = wilson(tp, pos)
    precision = f"{tp / n:.3f} [{lo:.3f}, {hi:.3f}]" if n else "— (no hits)"
    return f"{precision} | {tp / pos:.3f} [{rlo:.3f}, {rhi:.3f}] ({n}) | {_ceiling(s, y)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target-precision", type=float, default=0.93)
    ap.add_argument("--write", action="store_true", help="append the section to bench/RESULTS.md")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    train_pairs = _stsb("train")
    tok, model = train(train_pairs, _scores_of("train"), args.epochs, args.threads)
    trained_s = time.perf_counter() - started
    dev = _stsb("dev")
    dev_s, dev_y = score(tok, model, dev), np.array([p.equivalent for p in dev])
    threshold = pick_by_lower_bound(dev_s, np.ones(len(dev), bool), dev_y, args.target_precision)
    rows = []
    for name, pairs in (("STS-B test", _stsb("test")), ("SemEval-2016 QQ", _semeval_qq())):
        s, y = score(tok, model, pairs), np.array([p.equivalent for p in pairs])
        rows.append(f"| {name} ({len(pairs)}, {int(y.sum())} eq.) | {_cell(s, y, threshold)} |")
    import torch

    torch.set_num_threads(1)
    one = [Pair("How do I reset my password on the website?", "How can I reset the password of my account?", True)]
    score(tok, model, one)
    t = time.perf_counter()
    for _ in range(20):
        score(tok, model, one)
    per_pair_ms = (time.perf_counter() - t) / 20 * 1000 / 2  # score() runs both orders
    flags = f"--epochs {args.epochs} --target-precision {args.target_precision:g}"
    command = f"python -m bench.retrieval_cross_encoder {flags}"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = "\n".join(
        [
            f"## Retrieval recall: a cross-encoder fine-tuned here — {when}"
            f" — 2-core shared VM (x86_64); Python 3.11.7; commit {short_commit()} (`{command}`, "
            f"{time.perf_counter() - started:.0f} s)",
            "",
            f"all-MiniLM-L6-v2's weights plus a regression head, fine-tuned on STS-B train only ({len(train_pairs)} "
            f"pairs, both orders, {args.epochs} epochs, {trained_s:.0f} s on {args.threads} threads); threshold "
            f"{'none' if threshold is None else f'{threshold:.3f}'} chosen on STS-B dev ({len(dev)} pairs, "
            f"{int(dev_y.sum())} equivalent) as the lowest whose one-sided 95% Clopper–Pearson lower bound of "
            f"precision is ≥ {args.target_precision}. Scores: the mean of both orders. Precision [95% "
            "Clopper–Pearson], recall [95% Wilson] (hits); ceiling = the most recall at held-out precision ≥ 0.95 "
            "with the threshold tuned on the held-out set itself (not a result). CPU per pair, one thread: "
            f"{per_pair_ms:.1f} ms.",
            "",
            "| held-out set | precision | recall (hits) | ceiling |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    report(text, args.write)


if __name__ == "__main__":
    main()
