"""Retrieval recall with the bi-encoder itself fine-tuned here: all-MiniLM-L6-v2 trained on STS-B train
(CoSENT loss on the gold scores), then the shipped verifier's procedure on top of its vectors. Because
STS-B train has shaped the embedder, the verifier and its threshold are fitted on STS-B dev only (cross-fitted,
lowest threshold whose one-sided 95% Clopper–Pearson lower bound of precision meets the target); the packaged
MiniLM is run through the same dev-only procedure beside it, and through the shipped one (train + dev), so the
three rows differ only where they must. Held out: STS-B test and SemEval-2016 QQ.

    LLM_PROXY_DATA=../shared/data python -m bench.retrieval_finetune --epochs 2 [--write]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

from bench.results import report, short_commit
from bench.retrieval_embedders import HEADER, _arm
from bench.retrieval_eval import DATA, CachedEmbedder, _semeval_qq, _stsb
from bench.training import shuffled_batches
from bench.training import train as train_loop
from proxy.retrieval.calibrate import VERIFIER_FLOOR
from proxy.retrieval.embedders import LocalModel, packaged_model_dir


def _gold(name: str) -> list[tuple[str, str, float]]:
    with open(DATA / "stsb_en" / f"stsb-en-{name}.csv", encoding="utf-8") as f:
        return [(r[0], r[1], float(r[2])) for r in csv.reader(f) if r]


def fine_tune(out: Path, epochs: int, threads: int, batch: int = 32, lr: float = 2e-5, seed: int = 13) -> float:
    """Train the packaged MiniLM on STS-B train with the CoSENT loss (Su 2022: every pair whose gold score is
    higher should have the higher cosine, scale 20) and save it as a sentence-transformers folder; the
    seconds it took."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    model = SentenceTransformer(str(packaged_model_dir()), device="cpu", local_files_only=True)
    rows = _gold("train")

    def loss_of(idx: list[int]):
        chunk = [rows[j] for j in idx]
        emb = []
        for texts in ([a for a, _, _ in chunk], [b for _, b, _ in chunk]):
            emb.append(torch.nn.functional.normalize(model(model.tokenize(texts))["sentence_embedding"], dim=-1))
        cos = (emb[0] * emb[1]).sum(-1) * 20.0
        gold = torch.tensor([s for _, _, s in chunk])
        diff = cos[None, :] - cos[:, None]  # diff[i, j] = cos_j - cos_i, penalised where gold_i > gold_j
        return torch.logsumexp(torch.cat([torch.zeros(1), diff[gold[:, None] > gold[None, :]]]), dim=0)

    steps = epochs * ((len(rows) + batch - 1) // batch)
    batches = shuffled_batches(len(rows), batch)
    seconds = train_loop(model, batches, loss_of, epochs=epochs, steps=steps, lr=lr, seed=seed)
    model.save(str(out))
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target-precision", type=float, default=0.93)
    ap.add_argument("--out", help="where the fine-tuned folder goes (default: a temp folder named by the epochs)")
    ap.add_argument("--write", action="store_true", help="append the section to bench/RESULTS.md")
    args = ap.parse_args()
    started = time.perf_counter()
    out = Path(args.out or Path(tempfile.gettempdir()) / f"minilm-stsb-cosent-e{args.epochs}")
    trained_s = fine_tune(out, args.epochs, args.threads) if not (out / "modules.json").is_file() else float("nan")
    embedders = {}
    for path in (None, str(out)):
        model = LocalModel(path, threads=args.threads)
        model.load_blocking()
        embedders[path] = CachedEmbedder(model)
    base, tuned = embedders[None], embedders[str(out)]
    held = {"STS-B test": _stsb("test"), "SemEval-2016 QQ": _semeval_qq()}
    dev, train_dev, target = _stsb("dev"), _stsb("train") + _stsb("dev"), args.target_precision
    rows = [
        _arm("packaged MiniLM, verifier on STS-B train + dev (shipped)", [base], train_dev, held, target),
        _arm("packaged MiniLM, verifier on STS-B dev", [base], dev, held, target),
        _arm(
            f"MiniLM fine-tuned on STS-B train ({args.epochs} epochs), verifier on STS-B dev",
            [tuned],
            dev,
            held,
            args.target_precision,
        ),
    ]
    for e in embedders.values():
        e.save()
    command = f"python -m bench.retrieval_finetune --epochs {args.epochs} --target-precision {args.target_precision}"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = f"""
## Retrieval recall: the embedder fine-tuned on STS-B train — {when} — 2-core shared VM (x86_64); Python 3.11.7; \
commit {short_commit()} (`{command}`, {time.perf_counter() - started:.0f} s, of which training {trained_s:.0f} s)

all-MiniLM-L6-v2 fine-tuned here on STS-B train only ({len(_gold("train"))} pairs, CoSENT loss, batch 32, lr 2e-5,
{args.epochs} epochs, {args.threads} threads). Its verifier is cross-fitted on STS-B dev only ({len(dev)} pairs,
{sum(p.equivalent for p in dev)} equivalent); threshold = the lowest whose one-sided 95% Clopper–Pearson lower bound of
precision is ≥ {args.target_precision}, cosine floor {VERIFIER_FLOOR}. Held out: STS-B test ({len(held["STS-B test"])}
pairs), SemEval-2016 QQ ({len(held["SemEval-2016 QQ"])}). Precision [95% Clopper–Pearson], recall [95% Wilson]
(hits); ceiling = the most recall at held-out precision ≥ 0.95 with the threshold tuned on the held-out set
itself (not a result).

{HEADER}
""" + "\n".join(rows)
    report(text, args.write)


if __name__ == "__main__":
    main()
