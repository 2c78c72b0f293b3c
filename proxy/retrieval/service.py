"""Retrieval for one proxy process: the loaded local models and the collections (their indexes
survive policy reloads), and per policy file the embedders, collections and task examples the
runtime's steps use."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import numpy as np

from proxy import metrics
from proxy.config.models import PolicyFile
from proxy.config.policies import TaskConfig
from proxy.retrieval.collection import Collection
from proxy.retrieval.embedders import (
    Embedder,
    EmbedderDown,
    EmbeddingClient,
    EmbeddingHolder,
    LocalEmbedder,
    LocalModel,
    ModelEmbedder,
    embed_for_request,
)
from proxy.retrieval.error_bound import ErrorBound, OutcomeLedger
from proxy.retrieval.llm_check import AnswerCheck
from proxy.retrieval.query import query_from_chat
from proxy.services.pricing import PriceBook
from proxy.services.tokens import counter_for
from proxy.store.base import Store, StoreUnavailable
from proxy.store.collections import CollectionStore, MemoryCollectionStore, collection_store

log = logging.getLogger("llm_proxy.retrieval")

BOUND_REFRESH_S = 0.5  # how soon a replica answers by the outcomes another replica recorded


class TaskRequest(EmbeddingHolder, Protocol):
    """What matching a task by its examples reads of a request (the RequestContext)."""

    endpoint: str
    body: dict[str, Any]

    def user_text(self) -> str: ...


def uses_retrieval(policy: PolicyFile) -> bool:
    return bool(policy.collections) or any(t.examples for t in policy.tasks.values())


class Retrieval:
    """Process-wide; built once by the app factory, bound to each policy file it runs."""

    def __init__(self, store: Store, key_prefix: str):
        self.store: CollectionStore = collection_store(store, key_prefix)
        self._local_models: dict[str | None, LocalModel] = {}
        self.collections: dict[str, Collection] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._example_vectors: dict[tuple[str, tuple[str, ...]], tuple[str, np.ndarray]] = {}
        self._tasks: ExampleTasks | None = None
        self.outcomes = OutcomeLedger(self.store)  # retrieval answers by request id, for feedback
        self._bounds: dict[tuple[str, str], ErrorBound] = {}  # the bound runtime's, fresh on every reload
        self._bound_once = False
        self._following_bounds: asyncio.Task[None] | None = None

    def local_model(self, path: str | None, threads: int | None = None) -> LocalModel:
        model = self._local_models.get(path)
        if model is None:
            model = self._local_models[path] = LocalModel(path, threads)
        return model

    def bind(self, policy: PolicyFile, client: EmbeddingClient, prices: PriceBook) -> RetrievalRuntime:
        """The embedders, collections and example tasks of `policy` (collections kept across reloads)."""
        settings = policy.retrieval
        count = counter_for("text-embedding-3-small").text
        embedders: dict[str, Embedder] = {}

        def embedder(name: str) -> Embedder:
            if name not in embedders:
                if name == "local" or name.startswith("local@"):  # `local@FOLDER`: a learned route's own model
                    path = settings.local_model if name == "local" else name.removeprefix("local@")
                    model = self.local_model(path, settings.local_threads)
                    price = settings.local_price.input_per_mtok / 1e6 if settings.local_price else 0.0
                    embedders[name] = LocalEmbedder(model, price, count, settings.embed_timeout_s)
                else:
                    cfg = policy.models[name]
                    embedders[name] = ModelEmbedder(name, cfg.upstream_model or name, client, settings.embed_timeout_s)
            return embedders[name]

        for name in list(self.collections):
            if name not in policy.collections:
                self._stop_later(self.collections.pop(name).stop())
        for name, cfg in policy.collections.items():
            current = self.collections.get(name)
            if current is None:
                self.collections[name] = Collection(name, cfg, embedder(cfg.embedder), self.store)
                self.collections[name].start()
            else:
                current.configure(cfg, embedder(cfg.embedder))
        tasks = {name: t for name, t in policy.tasks.items() if t.examples}
        for t in tasks.values():
            embedder(t.embedder)
        for p in policy.policies:
            if p.route is not None and p.route.learned is not None:
                embedder(p.route.learned.embedder_key)
        for e in embedders.values():
            if isinstance(e, LocalEmbedder):
                e.start_loading()  # on its worker thread: a reload keeps serving meanwhile
        if self._tasks is not None:
            self._stop_later(self._tasks.stop())
        self._tasks = ExampleTasks(tasks, embedders, self._example_vectors)
        self._tasks.start()
        # A reload starts every error bound afresh, in the store too (a stopped collection answers again);
        # the first binding of a process joins the outcomes the other replicas have recorded.
        self._bounds = {}
        runtime = RetrievalRuntime(
            embedders,
            dict(self.collections),
            self._tasks,
            prices,
            count,
            self.outcomes,
            self._bounds,
            client,
            shared=self.store,
            reset_bounds=self._bound_once,
        )
        self._bound_once = True
        if self._following_bounds is None:
            with contextlib.suppress(RuntimeError):  # no running loop (explain, replay): nothing to follow
                self._following_bounds = asyncio.get_running_loop().create_task(self._follow_bounds())
        return runtime

    async def _follow_bounds(self) -> None:
        """Refresh every error bound of the bound runtime from the store: what other replicas learned."""
        failing = ""
        while True:
            await asyncio.sleep(BOUND_REFRESH_S)
            for bound in list(self._bounds.values()):
                try:
                    await bound.refresh()
                    failing = ""
                except StoreUnavailable as e:
                    if str(e) != failing:
                        log.warning("error bound of %s: cannot read the store: %s (retrying)", bound.collection, e)
                    failing = str(e)

    def _stop_later(self, stopping: Awaitable[None]) -> None:
        task = asyncio.get_running_loop().create_task(stopping)
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def status(self) -> dict[str, Any]:
        out = {name: c.status() for name, c in sorted(self.collections.items())}
        for (_, collection), bound in sorted(self._bounds.items()):
            if collection in out:
                out[collection].setdefault("error_bounds", []).append(bound.status())
        return out

    def task_status(self) -> dict[str, Any]:
        """Per task with examples: whether they are embedded (a task matches nothing until then)."""
        return self._tasks.status() if self._tasks is not None else {}

    async def close(self) -> None:
        if self._following_bounds is not None:
            self._following_bounds.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._following_bounds
        for c in self.collections.values():
            await c.stop()
        if self._tasks is not None:
            await self._tasks.stop()


class RetrievalRuntime:
    """What one policy file's steps use: embedders by name, collections by name, task examples."""

    def __init__(
        self,
        embedders: dict[str, Embedder],
        collections: dict[str, Collection],
        tasks: ExampleTasks,
        prices: PriceBook,
        count_tokens: Callable[[str], int],
        outcomes: OutcomeLedger | None = None,
        bounds: dict[tuple[str, str], ErrorBound] | None = None,
        client: EmbeddingClient | None = None,
        shared: CollectionStore | None = None,
        reset_bounds: bool = False,
    ):
        self.embedders = embedders
        self.collections = collections
        self.tasks = tasks
        self._prices = prices
        self.count_tokens = count_tokens
        self.outcomes = outcomes if outcomes is not None else OutcomeLedger()
        self._bounds = bounds if bounds is not None else {}
        self._client = client  # the runtime's client for the proxy's own calls (embeddings, checks)
        self._shared = shared if shared is not None else MemoryCollectionStore()  # error bounds' outcomes
        self._reset_bounds = reset_bounds

    def answer_check(self, model: str, timeout_s: float) -> AnswerCheck | None:
        """The LLM check of borderline hits on `model`, through the runtime's dispatch."""
        return AnswerCheck(model, self._client, self._prices, timeout_s) if self._client is not None else None

    def error_bound(self, policy: str, collection: str, max_error: float, start: float, floor: float) -> ErrorBound:
        """The error bound of one policy over one collection (shown under the collection in /admin/kb)."""
        key = (policy, collection)
        if key not in self._bounds:
            self._bounds[key] = ErrorBound(
                collection, policy, max_error, start, floor, shared=self._shared, reset=self._reset_bounds
            )
        return self._bounds[key]

    def bound_of(self, policy: str, collection: str) -> ErrorBound | None:
        return self._bounds.get((policy, collection))

    async def warm(self, timeout: float = 600.0) -> None:
        """Wait for the local model before the proxy starts serving: importing torch holds the GIL
        for seconds at a time, which would stall every request in flight."""
        for e in self.embedders.values():
            if isinstance(e, LocalEmbedder):
                try:
                    await e.load(timeout)
                except EmbedderDown as err:
                    log.error("the local embedder is unavailable; retrieval that needs it is skipped: %s", err)

    def local_status(self) -> dict[str, Any]:
        """Per in-process embedder: whether its model is loaded (a lookup through it is skipped until then)."""
        return {
            name: {"loaded": e.identity is not None, "identity": e.identity}
            for name, e in sorted(self.embedders.items())
            if isinstance(e, LocalEmbedder)
        }

    def price_per_token(self, embedder: Embedder) -> float:
        if isinstance(embedder, LocalEmbedder):
            return embedder.price_per_token
        return self._prices.price(embedder.name).input_per_token


class ExampleTasks:
    """`tasks: {name: {examples: [...], min_similarity: x}}`: a request is of the task when its last
    user message is at least that similar to one of the examples.

    The examples are embedded when the policy file is bound, in the background and in batches (never
    on a request, where a long list would outlast the lookup timeout and the task would silently never
    match); until then the task matches nothing, `/readyz` shows it loading, and a failure is logged as
    an error and retried."""

    _BATCH = 64
    _RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0)

    def __init__(
        self,
        tasks: dict[str, TaskConfig],
        embedders: dict[str, Embedder],
        known: dict[tuple[str, tuple[str, ...]], tuple[str, np.ndarray]] | None = None,
    ):
        self._tasks = tasks
        self._embedders = embedders
        # (embedder source, examples) -> (identity, vectors): shared with the previous binding, so a
        # reload that keeps a task's examples does not embed them again.
        self._known = known if known is not None else {}
        self._examples: dict[str, tuple[str | None, np.ndarray]] = {}
        self._errors: dict[str, str] = {}
        self._loader: asyncio.Task[None] | None = None
        self._loaded_at: float | None = None

    def start(self) -> None:
        if self._tasks and self._loader is None:
            with contextlib.suppress(RuntimeError):  # no running loop: started by the first match
                self._loader = asyncio.get_running_loop().create_task(self._load_all())

    async def stop(self) -> None:
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loader

    def _key(self, task: str) -> tuple[str, tuple[str, ...]]:
        cfg = self._tasks[task]
        return (self._embedders[cfg.embedder].source, tuple(cfg.examples))

    async def _embed(self, task: str) -> None:
        cfg = self._tasks[task]
        embedder = self._embedders[cfg.embedder]
        known = self._known.get(self._key(task))
        await embedder.ready()
        if known is None or known[0] != embedder.identity:
            chunks = [
                (await embedder.embed(list(cfg.examples[i : i + self._BATCH]))).vectors
                for i in range(0, len(cfg.examples), self._BATCH)
            ]
            if len({c.shape[1] for c in chunks}) != 1:
                raise EmbedderDown("bad_response", f"embedder {embedder.name} changed dimension while embedding")
            known = self._known[self._key(task)] = (embedder.identity, np.concatenate(chunks))
        self._examples[task] = known

    async def _load_all(self) -> None:
        pending = list(self._tasks)
        attempt = 0
        while pending:
            for task in list(pending):
                try:
                    await self._embed(task)
                except EmbedderDown as e:
                    if self._errors.get(task) != str(e):
                        log.error(
                            "task %s: its %d examples cannot be embedded, so it matches nothing: %s (retrying)",
                            task,
                            len(self._tasks[task].examples),
                            e,
                        )
                    self._errors[task] = str(e)
                    continue
                self._errors.pop(task, None)
                pending.remove(task)
            if pending:
                await asyncio.sleep(self._RETRY_S[min(attempt, len(self._RETRY_S) - 1)])
                attempt += 1
        self._loaded_at = time.time()
        log.info("task examples embedded: %s", ", ".join(f"{t} ({len(c.examples)})" for t, c in self._tasks.items()))

    @property
    def ready(self) -> bool:
        return all(t in self._examples for t in self._tasks)

    def status(self) -> dict[str, Any]:
        return {
            name: {
                "ready": name in self._examples,
                "examples": len(cfg.examples),
                **({"error": self._errors[name]} if name in self._errors else {}),
            }
            for name, cfg in sorted(self._tasks.items())
        }

    def _reembed(self, task: str) -> None:
        """The embedder answered in another dimension: it changed model. Embed the examples again."""
        self._examples.pop(task, None)
        self._known.pop(self._key(task), None)
        if self._loader is None or self._loader.done():
            self._loader = asyncio.get_running_loop().create_task(self._load_all())

    async def matches(self, ctx: TaskRequest, task: str) -> bool:
        cfg = self._tasks.get(task)
        if cfg is None:
            return False
        examples = self._examples.get(task)
        if examples is None:
            self.start()
            metrics.RETRIEVAL_LOOKUPS.labels("-", f"task:{task}", "not_ready").inc()
            return False
        query = query_from_chat(ctx.body) if ctx.endpoint == "chat" else None
        text = query.text if query is not None else ctx.user_text()
        if not text.strip():
            return False
        embedder = self._embedders[cfg.embedder]
        try:
            vector = await embed_for_request(ctx, embedder, text)
        except EmbedderDown as e:
            metrics.RETRIEVAL_LOOKUPS.labels("-", f"task:{task}", "embedder_down").inc()
            log.debug("task %s: embedder down: %s", task, e)
            return False
        if examples[1].shape[1] != vector.shape[0] or examples[0] != embedder.identity:
            # The embedder changed model (rare): embed the examples again now, so this request is still
            # classified (and reaches the collection, which rebuilds its index on seeing the change).
            self._examples.pop(task, None)
            self._known.pop(self._key(task), None)
            try:
                await self._embed(task)
            except EmbedderDown as e:
                self._reembed(task)
                metrics.RETRIEVAL_LOOKUPS.labels("-", f"task:{task}", "not_ready").inc()
                log.error("task %s: its examples cannot be embedded again after a model change: %s", task, e)
                return False
            examples = self._examples[task]
            if examples[1].shape[1] != vector.shape[0]:
                return False
        return float(np.max(examples[1] @ vector)) >= cfg.min_similarity
