"""A reference self-hosted backend: an OpenAI-compatible server around Hugging Face transformers and
sentence-transformers that is deliberately naive — one forward batch per HTTP call, one call at a time.

Many simple model servers behave like this; it is what the proxy's micro-batcher is for, and what the
batching tests and `bench/batching.py` run against. It serves `/v1/completions` (prompt lists),
`/v1/embeddings` (input lists), `/v1/chat/completions` and the batch endpoint
`POST /v1/batch/chat/completions` (docs/batching.md). Usage comes per input (`usage_per_input`) unless
`--usage aggregate` asks for the whole call only. `GET /stats` counts calls and forward batches.

torch, transformers and sentence-transformers are imported only here, and only when a server starts:
the proxy itself never loads them (`pip install 'llm-numbers-proxy[backend]'`).
"""

from proxy.fakes.reference_backend.models import Embedder, Generator, minilm_path, tiny_causal_lm
from proxy.fakes.reference_backend.server import ReferenceBackend, build_backend, run

__all__ = ["Embedder", "Generator", "ReferenceBackend", "build_backend", "minilm_path", "run", "tiny_causal_lm"]
