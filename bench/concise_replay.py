"""Replay the published "Be concise." experiment through the proxy's hold-out estimator.

Data: ../shared/data/concise_cot (matthewrenze/jhu-concise-cot): per question and prompt
(chain_of_thought vs concise), on GPT-3.5 and GPT-4, the output tokens (summed over 10 samples) and
the score. The exams with both arms for a model are used (10 × 100 questions, the comprehensive
set excluded as it repeats them).

Two views per model:
  * full arms: every question in both arms, through proxy.services.holdout_stats.realised_saving — the estimate
    must contain the paired reduction (ratio of totals over the same questions) in its 95% CI;
  * the proxy's own mechanism: each question lands in the hold-out arm with probability 5% (by a
    hash of its id, as requests are split), so only 5% of the CoT answers are observed.
Accuracy per exam shows where brevity costs correctness (math).
Usage: .venv/bin/python -m bench.concise_replay [--write]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

from proxy.services.holdout_stats import ArmStats, holdout_bucket, realised_saving

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "concise_cot" / "details"
PUBLISHED = {"gpt-35-turbo": -0.476, "gpt-4": -0.498}

csv.field_size_limit(sys.maxsize)


def _load() -> dict[tuple[str, str, str], dict[str, tuple[float, float]]]:
    """(model, prompt, exam) -> question id -> (output tokens, score)."""
    out: dict[tuple[str, str, str], dict[str, tuple[float, float]]] = {}
    for path in sorted(DATA.glob("*.csv")):
        _, model, prompt, exam = path.stem.split(" - ")
        exam = exam.removesuffix("-100")
        if exam == "comprehensive":
            continue
        rows: dict[str, tuple[float, float]] = {}
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                rows[row["Problem Id"]] = (float(row["Output Tokens"]), float(row["Score"]))
        out[(model, prompt, exam)] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--holdout", type=float, default=0.05)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"no data at {DATA}")
    data = _load()
    lines = [
        "| model | questions | paired reduction (ratio of totals) | published | estimator, full arms [95% CI] "
        f"| estimator, {args.holdout:.0%} hold-out [95% CI] (n hold-out) | CIs hold the paired value? |",
        "|---|---|---|---|---|---|---|",
    ]
    accuracy_rows = []
    for model in ("gpt-35-turbo", "gpt-4"):
        exams = sorted(e for (m, p, e) in data if m == model and p == "concise" and (m, "chain_of_thought", e) in data)
        cot_all, concise_all, paired_cot, paired_concise = [], [], 0.0, 0.0
        held, treated = [], []
        for exam in exams:
            cot, concise = data[(model, "chain_of_thought", exam)], data[(model, "concise", exam)]
            common = sorted(set(cot) & set(concise))
            acc_cot = sum(cot[q][1] for q in common) / len(common)
            acc_con = sum(concise[q][1] for q in common) / len(common)
            accuracy_rows.append((model, exam, len(common), acc_cot, acc_con))
            for q in common:
                cot_all.append(cot[q][0])
                concise_all.append(concise[q][0])
                paired_cot += cot[q][0]
                paired_concise += concise[q][0]
                # The proxy's split: a hash of the request id decides the arm.
                if holdout_bucket(f"{model}/{exam}/{q}") < args.holdout:
                    held.append(cot[q][0])
                else:
                    treated.append(concise[q][0])
        paired = paired_concise / paired_cot - 1
        full = realised_saving(ArmStats.of(concise_all), ArmStats.of(cot_all))
        sampled = realised_saving(ArmStats.of(treated), ArmStats.of(held))
        holds = [-est.ci_high <= paired <= -est.ci_low for est in (full, sampled)]
        verdict = " / ".join("yes" if h else "NO" for h in holds)
        lines.append(
            f"| {model} | {len(cot_all)} | {paired:+.1%} | {PUBLISHED[model]:+.1%} | {-full.saving:+.1%} "
            f"[{-full.ci_high:+.1%}, {-full.ci_low:+.1%}] | {-sampled.saving:+.1%} [{-sampled.ci_high:+.1%}, "
            f"{-sampled.ci_low:+.1%}] (n={len(held)}) | {verdict} |"
        )
    lines += ["", "| model | exam | questions | accuracy CoT | accuracy concise | delta |", "|---|---|---|---|---|---|"]
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for model, exam, n, a_cot, a_con in accuracy_rows:
        lines.append(f"| {model} | {exam} | {n} | {a_cot:.1%} | {a_con:.1%} | {a_con - a_cot:+.1%} |")
        t = totals[model]
        t[0] += n
        t[1] += a_cot * n
        t[2] += a_con * n
    for model, (n, c, k) in totals.items():
        lines.append(f"| {model} | **all** | {n:.0f} | {c / n:.1%} | {k / n:.1%} | {(k - c) / n:+.1%} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(
                f"\n## Conciseness hold-out estimator on the published experiment — {time.strftime('%Y-%m-%d')} — "
                f"{platform.machine()}, {os.cpu_count()} cores (`python -m bench.concise_replay`)\n\n"
                'Output tokens of the chain-of-thought (hold-out) and "Be concise." (treated) arms from '
                "../shared/data/concise_cot; reduction = treated/hold-out − 1.\n\n" + table + "\n"
            )


if __name__ == "__main__":
    main()
