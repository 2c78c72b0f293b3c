"""Routing policies replayed on MMLU: what quality each cost level buys, against the random line
and the oracle.

Data: ../shared/data/routellm_mmlu_dev (lm-sys/RouteLLM, 29 of 57 MMLU domains): per question,
whether Mixtral-8x7B (weak) and GPT-4-1106 (strong) answered correctly; contaminated prompts are
dropped. Every question is sent as a request for the strong model through the proxy's real policy
engine (explain: no upstream call) with a policy file that may route it to the weak model; the
answer's correctness is then looked up for the model chosen. Prices come from the price book
(gpt-4-1106-preview; Mixtral-8x7B-Instruct as together_ai sells it).

The rule policies are the ones the YAML can express without a router (prompt length, regex task
patterns), and the table is honest about how little they beat random. The learned router follows
(bench/routing_learned.py): fitted within the same domains and across domains, threshold chosen on
training folds only, with the dollar cost of each against all-strong at real prices.
Usage: .venv/bin/python -m bench.routing_replay [--write] [--skip-rules]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import platform
import sys
import time
from pathlib import Path

import orjson

from proxy.config import parse_policy_text
from proxy.pipeline.explain import explain
from proxy.pipeline.runtime import Runtime
from proxy.store.memory import MemoryStore

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("LLM_PROXY_DATA", ROOT.parent / "shared" / "data")) / "routellm_mmlu_dev"
WEAK_COL, STRONG_COL = "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"
ANSWER_TOKENS = 1  # an MMLU answer is one letter

BASE = """\
version: 1
models:
  strong: {provider: openai, upstream_model: gpt-4-1106-preview}
  weak: {provider: together_ai, upstream_model: mistralai/Mixtral-8x7B-Instruct-v0.1}
  gpt-4o: {provider: openai}
  gpt-4o-mini: {provider: openai}
teams:
  eval: {keys: [sk-eval]}
tasks:
  # No digits, formulas or math words: verbal knowledge questions.
  verbal: {patterns: ['(?s)^(?!.*([0-9=^+×÷√∫∑]|\\b(calculate|compute|solve|equation|integral|probability)\\b)).*$']}
"""


def _load() -> list[tuple[str, bool, bool]]:
    contaminated = set()
    with (DATA / "mmlu_contaminated_prompts.jsonl").open() as f:
        for line in f:
            contaminated.add(orjson.loads(line)["eval_prompt"])
    rows = []
    for path in sorted(DATA.glob("mmlu_*.csv")):
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row["prompt"] in contaminated:
                    continue
                rows.append((row["prompt"], row[WEAK_COL] == "True", row[STRONG_COL] == "True"))
    return rows


async def _replay(policy_text: str, rows: list[tuple[str, bool, bool]]) -> tuple[float, float, float]:
    """(share of strong calls, accuracy, cost) of one policy over every question."""
    runtime = Runtime(parse_policy_text(policy_text, "routing.yaml", {}), MemoryStore(), None)
    strong = correct = 0
    cost = 0.0
    for prompt, weak_ok, strong_ok in rows:
        body = {"model": "strong", "messages": [{"role": "user", "content": prompt}]}
        out = await explain(runtime, body, team="eval", output_tokens=ANSWER_TOKENS)
        chose_strong = out["model"] == "strong"
        strong += chose_strong
        correct += strong_ok if chose_strong else weak_ok
        cost += out["projected_cost_usd"]
    n = len(rows)
    return strong / n, correct / n, cost


def _costs(questions) -> dict[str, tuple]:
    """Per question, the cost of the answer from each model of a price pair (prompt tokens + one letter)."""
    import numpy as np

    from proxy.services.tokens import counter_for

    prices = Runtime(parse_policy_text(BASE, "routing.yaml", {}), MemoryStore(), None).prices
    tokens = [counter_for("gpt-4").text(q.prompt) for q in questions]
    out = {}
    for label, strong, weak in (
        ("GPT-4-1106 / Mixtral-8x7B (the data's models)", "strong", "weak"),
        ("gpt-4o / gpt-4o-mini", "gpt-4o", "gpt-4o-mini"),
    ):
        out[label] = (
            np.asarray([prices.cost(weak, t, ANSWER_TOKENS) for t in tokens]),
            np.asarray([prices.cost(strong, t, ANSWER_TOKENS) for t in tokens]),
        )
    return out


def learned_main(write: bool) -> None:
    from bench.routing_data import embed_questions, load_questions, results_heading
    from bench.routing_learned import learned_section

    questions = load_questions()
    vectors, identity = embed_questions(questions)
    table = "\n".join(learned_section(questions, vectors, identity, _costs(questions)))
    print(table)
    if write:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(results_heading("Learned router on MMLU", "python -m bench.routing_replay") + table + "\n")


async def main_async(write: bool) -> None:
    if not DATA.is_dir():
        sys.exit(f"no data at {DATA}")
    rows = _load()
    n = len(rows)
    weak_acc = sum(r[1] for r in rows) / n
    strong_acc = sum(r[2] for r in rows) / n
    _, _, all_strong_cost = await _replay(BASE, rows)
    policies: list[tuple[str, str]] = []
    runtime = Runtime(parse_policy_text(BASE, "routing.yaml", {}), MemoryStore(), None)
    lengths = sorted(
        [
            (await explain(runtime, {"model": "strong", "messages": [{"role": "user", "content": p}]}, team="eval"))[
                "prompt_tokens"
            ]
            for p, _, _ in rows
        ]
    )
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        t = lengths[int(q * (n - 1))]
        policies.append(
            (
                f"short prompts (≤ {t} tokens, p{int(q * 100)}) → weak",
                f"policies:\n  - name: short\n    when: {{prompt_tokens: {{max: {t}}}}}\n    route: {{to: weak}}\n",
            )
        )
    policies.append(
        (
            "verbal questions (regex) → weak",
            "policies:\n  - name: verbal\n    when: {task: verbal}\n    route: {to: weak}\n",
        )
    )
    policies.append(("all → weak", "policies:\n  - name: all\n    route: {to: weak}\n"))
    lines = [
        f"MMLU (29 domains, decontaminated, n={n}): strong (GPT-4-1106) {strong_acc:.1%}, weak (Mixtral-8x7B) "
        f"{weak_acc:.1%}; all-strong cost ${all_strong_cost:.2f}.",
        "",
        "| policy | strong calls | accuracy | % of strong accuracy | cost vs all-strong | random router at same "
        "strong share | oracle strong share for same accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    # The oracle calls strong only where weak is wrong and strong right.
    oracle_needed = sum(1 for _, w, s in rows if s and not w)
    for name, text in policies:
        share, acc, cost = await _replay(BASE + text, rows)
        random_acc = share * strong_acc + (1 - share) * weak_acc
        gain_needed = max(0.0, acc - weak_acc) * n
        oracle_share = min(gain_needed, oracle_needed) / n
        lines.append(
            f"| {name} | {share:.1%} | {acc:.1%} | {acc / strong_acc:.1%} | {cost / all_strong_cost:.1%} "
            f"| {random_acc:.1%} | {oracle_share:.1%} |"
        )
    target = 0.95 * strong_acc
    random_share = (target - weak_acc) / (strong_acc - weak_acc)
    oracle_share = (target - weak_acc) * n / n
    lines += [
        "",
        f"To reach 95% of the strong model's accuracy ({target:.1%}): a random router needs {random_share:.1%} "
        f"strong calls, an oracle {max(0.0, oracle_share):.1%}.",
    ]
    table = "\n".join(lines)
    print(table)
    if write:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(
                f"\n## Routing policies on MMLU — {time.strftime('%Y-%m-%d')} — {platform.machine()}, "
                f"{os.cpu_count()} cores (`python -m bench.routing_replay`)\n\n" + table + "\n"
            )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--skip-rules", action="store_true", help="only the learned router")
    args = ap.parse_args()
    if not args.skip_rules:
        asyncio.run(main_async(args.write))
    learned_main(args.write)
