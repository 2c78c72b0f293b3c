"""The RouteLLM MMLU questions for the routing benchmarks: rows with their domain and both models'
correctness, and their MiniLM embeddings, cached under bench/.cache/ keyed by the data's hash
(embedding ~7.7k prompts on a shared 2-core machine takes minutes).

Data: ../shared/data/routellm_mmlu_dev (lm-sys/RouteLLM @ 0b64fda, 29 of 57 MMLU domains); prompts in
mmlu_contaminated_prompts.jsonl are dropped.
"""

from __future__ import annotations

import csv
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("LLM_PROXY_DATA", ROOT.parent / "shared" / "data")) / "routellm_mmlu_dev"
CACHE = ROOT / "bench" / ".cache"
WEAK_COL, STRONG_COL = "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"


@dataclass(frozen=True)
class Question:
    prompt: str
    domain: str
    weak_ok: bool
    strong_ok: bool


def load_questions() -> list[Question]:
    if not DATA.is_dir():
        sys.exit(f"no data at {DATA}")
    contaminated = set()
    with (DATA / "mmlu_contaminated_prompts.jsonl").open() as f:
        for line in f:
            contaminated.add(orjson.loads(line)["eval_prompt"])
    rows = []
    for path in sorted(DATA.glob("mmlu_*.csv")):
        domain = path.stem.removeprefix("mmlu_")
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row["prompt"] in contaminated:
                    continue
                rows.append(Question(row["prompt"], domain, row[WEAK_COL] == "True", row[STRONG_COL] == "True"))
    return rows


def embed_questions(questions: list[Question], threads: int = 2) -> tuple[np.ndarray, str]:
    """(n, dim) unit vectors by the packaged all-MiniLM-L6-v2 and the embedder's identity, from the cache
    when the prompts are unchanged."""
    from proxy.retrieval.embedders import LocalModel

    digest = hashlib.sha256("\x00".join(q.prompt for q in questions).encode()).hexdigest()[:16]
    path = CACHE / f"mmlu-minilm-{digest}.npz"
    if path.is_file():
        cached = np.load(path)
        return cached["vectors"], str(cached["identity"])
    model = LocalModel(None, threads)
    model.load_blocking()
    started = time.perf_counter()
    vectors = model.encode_blocking([q.prompt for q in questions])
    identity = f"local:{model.label}:{model.dim}"
    print(f"embedded {len(questions)} prompts in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, vectors=vectors, identity=np.array(identity))
    return vectors, identity


def embed_with_folder(folder: Path, prompts: list[str]) -> np.ndarray:
    """(n, dim) vectors of `prompts` by a sentence-transformers folder (e.g. from `router embedder`), cached
    under bench/.cache keyed by the folder, its weights file and the prompts."""
    from proxy.retrieval.embedders import LocalModel

    weights = (folder / "model.safetensors").stat()
    digest = hashlib.sha256(
        f"{folder.resolve()}\x00{weights.st_size}\x00{weights.st_mtime_ns}\x00".encode() + "\x00".join(prompts).encode()
    ).hexdigest()[:16]
    path = CACHE / f"mmlu-{folder.name}-{digest}.npy"
    if path.is_file():
        return np.load(path)
    model = LocalModel(str(folder), 2)
    model.load_blocking()
    started = time.perf_counter()
    vectors = model.encode_blocking(prompts)
    took = time.perf_counter() - started
    print(f"embedded {len(prompts)} prompts with {folder.name} in {took:.0f}s", file=sys.stderr)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


if __name__ == "__main__":
    qs = load_questions()
    v, ident = embed_questions(qs)
    print(len(qs), v.shape, ident)


def results_heading(title: str, command: str) -> str:
    """A bench/RESULTS.md section heading: what, date, machine, commit and the command that made it."""
    import os
    import platform
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return (
        f"\n## {title} — {time.strftime('%Y-%m-%d')} — {platform.machine()}, {os.cpu_count()} cores shared, loaded, "
        f"commit {commit.stdout.strip()} (`{command}`)\n\n"
    )
