"""Resident memory and start-up of the local embedder (all-MiniLM-L6-v2, the packaged model): the proxy's
torch path (sentence-transformers, `LocalModel`) against ONNX Runtime with the same weights exported once to
ONNX (tokenizers + onnxruntime + mean pooling in numpy: torch is never imported in that process).

Each variant runs in a fresh process: RSS after the interpreter and numpy (baseline), start-up (imports,
load, one warm-up encode) and RSS after it, then RSS after encoding --texts short texts in batches of 32,
and the embeddings' agreement with the torch path (min cosine over the texts).

sentence-transformers' own `backend="onnx"` needs optimum-onnx, whose only release (0.1.0) does not import
with transformers 5 (`is_offline_mode` moved), so it is not a variant here.

onnxruntime is not a dependency of the package: install it beside the venv first, e.g.
  pip install --target bench/.peers/onnx-site --no-deps onnxruntime onnx flatbuffers ml_dtypes
Usage: PYTHONPATH=bench/.peers/onnx-site .venv/bin/python -m bench.embedder_memory [--texts 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ONNX_PATH = ROOT / "bench" / ".cache" / "minilm-onnx" / "model.onnx"

_EXPORT = """
import os, sys, torch
from transformers import AutoModel
from proxy.retrieval.embedders import packaged_model_dir
path = str(packaged_model_dir())
model = AutoModel.from_pretrained(path, local_files_only=True).eval()
class Hidden(torch.nn.Module):
    def __init__(self, m):
        super().__init__(); self.m = m
    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.last_hidden_state
ids = torch.ones((2, 8), dtype=torch.long)
axes = {n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask", "token_type_ids", "hidden")}
torch.onnx.export(Hidden(model).eval(), (ids, ids, torch.zeros_like(ids)), sys.argv[1], dynamo=False,
                  input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["hidden"],
                  dynamic_axes=axes, opset_version=17)
"""

_MEASURE = """
import json, os, sys, time
t_start = time.perf_counter()
import numpy as np, psutil
me = psutil.Process()
rss = lambda: me.memory_info().rss / 2**20
variant, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
base = rss()
texts = [f"question {i}: what does the proxy do with request number {i} and its tokens?" for i in range(n)]
t0 = time.perf_counter()
if variant == "torch":
    from proxy.retrieval.embedders import LocalModel
    model = LocalModel()
    model.load_blocking()
    encode = model.encode_blocking
else:
    import onnxruntime as ort
    from tokenizers import Tokenizer
    from proxy.retrieval.embedders import packaged_model_dir
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1  # as LocalModel's torch threads
    session = ort.InferenceSession(sys.argv[4], opts, providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(str(packaged_model_dir() / "tokenizer.json"))
    tok.enable_truncation(256)
    tok.enable_padding()
    def encode(batch):
        out = []
        for i in range(0, len(batch), 32):
            enc = tok.encode_batch(batch[i : i + 32])
            ids = np.array([e.ids for e in enc], dtype=np.int64)
            mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            hidden = session.run(None, feed)[0]
            pooled = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
            out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
        return np.concatenate(out).astype(np.float32)
    encode(["warm up"])
startup = time.perf_counter() - t0
loaded = rss()
t1 = time.perf_counter()
vectors = np.concatenate([encode(texts[i : i + 32]) for i in range(0, n, 32)])
encode_s = time.perf_counter() - t1
np.save(out, vectors)
print(json.dumps({"base": base, "loaded": loaded, "after": rss(), "startup_s": startup,
                  "encode_ms": encode_s / n * 1000, "torch_imported": "torch" in sys.modules}))
"""


def _export() -> None:
    if ONNX_PATH.is_file():
        return
    ONNX_PATH.parent.mkdir(parents=True, exist_ok=True)
    print(f"exporting the packaged model to {ONNX_PATH} (once) ...", file=sys.stderr)
    subprocess.run([sys.executable, "-c", _EXPORT, str(ONNX_PATH)], cwd=ROOT, check=True, capture_output=True)


def _measure(variant: str, n: int, tmp: Path) -> tuple[dict, Path]:
    out = tmp / f"{variant}.npy"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = [sys.executable, "-c", _MEASURE, variant, str(n), str(out), str(ONNX_PATH)]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1]), out


def main() -> None:
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per variant, alternating")
    args = ap.parse_args()
    _export()
    results: dict[str, list[dict]] = {"torch": [], "onnx": []}
    agreement = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for rnd in range(args.rounds):
            order = ("torch", "onnx") if rnd % 2 == 0 else ("onnx", "torch")
            paths = {}
            for variant in order:
                res, paths[variant] = _measure(variant, args.texts, tmp)
                results[variant].append(res)
                print(variant, res, file=sys.stderr)
            a, b = np.load(paths["torch"]), np.load(paths["onnx"])
            agreement.append(float((a * b).sum(1).min()))
    med = statistics.median
    print("| embedder | RSS MiB: baseline → loaded → after encoding | start-up s | encode ms/text | torch imported |")
    print("|---|---|---|---|---|")
    for variant, rs in results.items():
        print(
            f"| {variant} | {med(r['base'] for r in rs):.0f} → {med(r['loaded'] for r in rs):.0f} → "
            f"{med(r['after'] for r in rs):.0f} | {med(r['startup_s'] for r in rs):.2f} "
            f"(samples {', '.join(format(r['startup_s'], '.2f') for r in rs)}) | {med(r['encode_ms'] for r in rs):.2f} "
            f"| {rs[0]['torch_imported']} |"
        )
    print(f"\nmin cosine(torch, onnx) over {args.texts} texts: {min(agreement):.6f}")


if __name__ == "__main__":
    main()
