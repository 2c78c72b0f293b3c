"""The learned router learning online, on MMLU questions in random order: it starts untrained (routes
nothing); a sampled fraction of requests is labelled (both models' answers compared: the dataset's
correctness stands in for the judge, and the counterfactual call is counted as measurement spend); the
router is refitted every N labels with `router fit`'s procedure on the labels so far.

Reports cumulative cost and quality vs all-strong over time (table and PNG), and the worst quality of any
window of 500 consecutive requests. Data: ../shared/data/routellm_mmlu_dev (decontaminated), prices of
GPT-4-1106 / Mixtral-8x7B from the price book.
Usage: .venv/bin/python -m bench.routing_online [--write] [--label-rate 0.2] [--refit-every 250] [--target 0.97]
       [--model DIR]   (a `router embedder` folder instead of MiniLM)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.routing_data import ROOT, embed_questions, load_questions, results_heading
from bench.routing_learned import labels_of
from bench.routing_replay import _costs
from proxy.services.routers.features import feature_matrix
from proxy.services.routers.fit import fit_router

WINDOW = 500


def simulate(args: argparse.Namespace) -> dict:
    questions = load_questions()
    if args.model:  # a folder from `router embedder` (its vectors cached as bench.routing_llm_embedder keeps them)
        from bench.routing_data import embed_with_folder

        vectors = embed_with_folder(Path(args.model), [q.prompt for q in questions])
    else:
        vectors, _ = embed_questions(questions)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(questions))
    questions = [questions[i] for i in order]
    vectors = vectors[order]
    labels = labels_of(questions)
    x = feature_matrix(vectors, labels.prompts)
    weak_cost, strong_cost = next(iter(_costs(questions).values()))
    n = len(questions)
    labelled = rng.random(n) < args.label_rate
    routed = np.zeros(n, bool)
    probe = threshold = None
    seen: list[int] = []
    refits = []
    since_fit = 0
    for i in range(n):
        # Decide first (the router as it stands), label afterwards (the shadow runs after the answer).
        if probe is not None and threshold is not None:
            routed[i] = probe.predict(x[i : i + 1])[0] >= threshold
        if labelled[i]:
            seen.append(i)
            since_fit += 1
            if len(seen) >= args.min_labels and since_fit >= args.refit_every:
                rows = np.asarray(seen)
                fitted = fit_router(x[rows], labels.subset(rows), args.target, folds=5, seed=args.seed)
                probe, threshold = fitted.probe, fitted.chosen.threshold
                refits.append((i + 1, len(seen), fitted.chosen.strong_share, fitted.chosen.quality))
                since_fit = 0
    served_ok = np.where(routed, labels.weak_value, labels.strong_value)
    cost = np.where(routed, weak_cost, strong_cost)
    # Measurement spend: the counterfactual call of each labelled request (the other model).
    shadow = np.where(labelled, np.where(routed, strong_cost, weak_cost), 0.0)
    return {
        "n": n,
        "served_ok": served_ok,
        "strong_ok": labels.strong_value,
        "routed": routed,
        "cost": cost,
        "shadow": shadow,
        "strong_cost": strong_cost,
        "labelled": labelled,
        "refits": refits,
    }


def window_quality(served_ok: np.ndarray, strong_ok: np.ndarray, window: int = WINDOW) -> np.ndarray:
    a = np.concatenate([[0.0], np.cumsum(served_ok)])
    b = np.concatenate([[0.0], np.cumsum(strong_ok)])
    return (a[window:] - a[:-window]) / (b[window:] - b[:-window])


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.arange(1, r["n"] + 1)
    cum_strong = np.cumsum(r["strong_cost"])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    ax1.plot(t, np.cumsum(r["cost"]) / cum_strong, label="cumulative cost / all-strong")
    ax1.plot(t, np.cumsum(r["cost"] + r["shadow"]) / cum_strong, label="… plus measurement (shadow) spend", ls="--")
    wq_cost = window_quality(r["cost"], r["strong_cost"])
    ax1.plot(t[WINDOW - 1 :], wq_cost, label=f"cost / all-strong, last {WINDOW} requests", alpha=0.7)
    ax1.set_ylabel("cost vs all-strong")
    ax1.set_ylim(0, 1.1)
    ax1.legend(loc="lower left")
    ax1.grid(alpha=0.3)
    wq = window_quality(r["served_ok"], r["strong_ok"])
    ax2.plot(t[WINDOW - 1 :], wq, label=f"quality, last {WINDOW} requests")
    ax2.plot(t, np.cumsum(r["served_ok"]) / np.cumsum(r["strong_ok"]).clip(1), label="cumulative quality")
    ax2.plot(
        t[WINDOW - 1 :],
        1 - window_quality(r["routed"].astype(float), np.ones(r["n"])),
        label=f"strong share, last {WINDOW}",
        alpha=0.7,
    )
    ax2.axhline(0.95, color="red", lw=1, ls=":", label="95% of all-strong")
    for at, *_ in r["refits"]:
        ax2.axvline(at, color="grey", lw=0.5, alpha=0.5)
    ax2.set_xlabel("requests (grey lines: refits)")
    ax2.set_ylabel("vs all-strong")
    ax2.set_ylim(0.4, 1.05)
    ax2.legend(loc="lower left")
    ax2.grid(alpha=0.3)
    fig.suptitle(f"Learned router online on MMLU (n={r['n']}, random order)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def table(r: dict, args: argparse.Namespace) -> list[str]:
    n = r["n"]
    wq = window_quality(r["served_ok"], r["strong_ok"])
    lines = [
        f"MMLU (decontaminated, n={n}) in random order (seed {args.seed}), embedder "
        f"{Path(args.model).name if args.model else 'all-MiniLM-L6-v2'}; {args.label_rate:.0%} of requests labelled "
        f"({int(r['labelled'].sum())} labels), refit every {args.refit_every} labels from {args.min_labels}, "
        f"threshold for target quality {args.target:.2f} on the labels' out-of-fold curve. Prices GPT-4-1106 / "
        "Mixtral-8x7B. Measurement spend = the counterfactual call of each labelled request (judge cost not counted: "
        "the dataset's correctness stands in for it).",
        "",
        f"| requests | labels | cumulative cost vs all-strong | … with measurement spend | cumulative quality | "
        f"last {WINDOW}: strong share | last {WINDOW}: cost | last {WINDOW}: quality | worst {WINDOW}-window so far |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    checkpoints = sorted({500, 1000, 1500, 2000, 3000, 4000, 5000, 6000, 7000, n})
    for c in (c for c in checkpoints if c <= n):
        s = slice(0, c)
        w = slice(max(0, c - WINDOW), c)
        cost = r["cost"][s].sum() / r["strong_cost"][s].sum()
        with_shadow = (r["cost"][s] + r["shadow"][s]).sum() / r["strong_cost"][s].sum()
        quality = r["served_ok"][s].sum() / r["strong_ok"][s].sum()
        lines.append(
            f"| {c} | {int(r['labelled'][s].sum())} | {cost:.1%} | {with_shadow:.1%} | {quality:.1%} | "
            f"{1 - r['routed'][w].mean():.1%} | {r['cost'][w].sum() / r['strong_cost'][w].sum():.1%} | "
            f"{r['served_ok'][w].sum() / r['strong_ok'][w].sum():.1%} | {wq[: max(1, c - WINDOW + 1)].min():.1%} |"
        )
    worst = int(np.argmin(wq))
    lines += [
        "",
        f"Worst window of {WINDOW} consecutive requests: quality {wq.min():.1%} "
        f"(requests {worst + 1}–{worst + WINDOW}); "
        f"windows below 95%: {int((wq < 0.95).sum())} of {len(wq)}. Refits (request, labels, held-out strong share, "
        "held-out quality): " + "; ".join(f"{a}, {b}, {c:.1%}, {d:.1%}" for a, b, c, d in r["refits"]) + ".",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label-rate", type=float, default=0.2)
    ap.add_argument("--refit-every", type=int, default=250)
    ap.add_argument("--min-labels", type=int, default=250)
    ap.add_argument("--target", type=float, default=0.97)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--other-seeds", type=int, default=4, help="also report the worst window for this many orders")
    ap.add_argument("--model", metavar="DIR", help="embed with a `router embedder` folder (default: MiniLM)")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    r = simulate(args)
    lines = table(r, args)
    if args.other_seeds:
        lines += [
            "",
            f"Other arrival orders (seed: worst {WINDOW}-window quality, windows below 95%, final cost vs "
            "all-strong with measurement spend): ",
        ]
        parts = []
        for seed in range(1, args.other_seeds + 1):
            other = simulate(argparse.Namespace(**{**vars(args), "seed": seed + 100}))
            wq = window_quality(other["served_ok"], other["strong_ok"])
            cost = (other["cost"] + other["shadow"]).sum() / other["strong_cost"].sum()
            parts.append(f"{seed + 100}: {wq.min():.1%}, {int((wq < 0.95).sum())}, {cost:.1%}")
        lines[-1] += "; ".join(parts) + "."
    text = "\n".join(lines)
    print(text)
    if args.write:
        png = f"routing_online_t{args.target:.2f}{'_' + Path(args.model).name if args.model else ''}.png"
        plot(r, ROOT / "bench" / png)
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(
                results_heading(
                    f"Learned router online on MMLU, target quality {args.target:.2f}",
                    f"python -m bench.routing_online --target {args.target:.2f}"
                    + (f" --model {args.model}" if args.model else "")
                    + " --write",
                )
                + text
                + f"\n\n![learned router online]({png})\n"
            )


if __name__ == "__main__":
    main()
