"""Retrieval for one proxy process: the loaded local models and the collections (their indexes
survive policy reloads), and per policy file the embedders, collections and task examples the
runtime's steps use."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
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
from proxy.retrieval.query import query_from_chat
from proxy.services.pricing import PriceBook
from proxy.services.tokens import counter_for
from proxy.store.base import Store
from proxy.store.collections import CollectionStore, collection_store

log = logging.getLogger("llm_proxy.retrieval")


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
                if name == "local":
                    model = self.local_model(settings.local_model, settings.local_threads)
                    price = settings.local_price.input_per_mtok / 1e6 if settings.local_price else 0.0
                    embedders[name] = LocalEmbedder(model, price, count, settings.embed_timeout_s)
                else:
                    cfg = policy.models[name]
                    embedders[name] = ModelEmbedder(name, cfg.upstream_model or name, client, settings.embed_timeout_s)
            return embedders[name]

        for name in list(self.collections):
            if name not in policy.collections:
                stopping = asyncio.get_running_loop().create_task(self.collections.pop(name).stop())
                self._stopping.add(stopping)
                stopping.add_done_callback(self._stopping.discard)
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
        for e in embedders.values():
            if isinstance(e, LocalEmbedder):
                e.start_loading()  # on its worker thread: a reload keeps serving meanwhile
        return RetrievalRuntime(embedders, dict(self.collections), ExampleTasks(tasks, embedders), prices, count)

    def status(self) -> dict[str, Any]:
        return {name: c.status() for name, c in sorted(self.collections.items())}

    async def close(self) -> None:
        for c in self.collections.values():
            await c.stop()


class RetrievalRuntime:
    """What one policy file's steps use: embedders by name, collections by name, task examples."""

    def __init__(
        self,
        embedders: dict[str, Embedder],
        collections: dict[str, Collection],
        tasks: ExampleTasks,
        prices: PriceBook,
        count_tokens: Callable[[str], int],
    ):
        self.embedders = embedders
        self.collections = collections
        self.tasks = tasks
        self._prices = prices
        self.count_tokens = count_tokens

    async def warm(self, timeout: float = 600.0) -> None:
        """Wait for the local model before the proxy starts serving: importing torch holds the GIL
        for seconds at a time, which would stall every request in flight."""
        for e in self.embedders.values():
            if isinstance(e, LocalEmbedder):
                try:
                    await e.load(timeout)
                except EmbedderDown as err:
                    log.error("the local embedder is unavailable; retrieval that needs it is skipped: %s", err)

    def price_per_token(self, embedder: Embedder) -> float:
        if isinstance(embedder, LocalEmbedder):
            return embedder.price_per_token
        return self._prices.price(embedder.name).input_per_token


class ExampleTasks:
    """`tasks: {name: {examples: [...], min_similarity: x}}`: a request is of the task when its last
    user message is at least that similar to one of the examples."""

    def __init__(self, tasks: dict[str, TaskConfig], embedders: dict[str, Embedder]):
        self._tasks = tasks
        self._embedders = embedders
        self._examples: dict[str, tuple[str | None, np.ndarray]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def _example_vectors(self, task: str, embedder: Embedder) -> np.ndarray:
        known = self._examples.get(task)
        if known is not None and known[0] == embedder.identity:
            return known[1]
        lock = self._locks.setdefault(task, asyncio.Lock())
        async with lock:
            known = self._examples.get(task)
            if known is None or known[0] != embedder.identity:
                vectors = (await embedder.embed(list(self._tasks[task].examples))).vectors
                known = self._examples[task] = (embedder.identity, vectors)
        return known[1]

    async def matches(self, ctx: TaskRequest, task: str) -> bool:
        cfg = self._tasks.get(task)
        if cfg is None:
            return False
        query = query_from_chat(ctx.body) if ctx.endpoint == "chat" else None
        text = query.text if query is not None else ctx.user_text()
        if not text.strip():
            return False
        embedder = self._embedders[cfg.embedder]
        try:
            vector = await embed_for_request(ctx, embedder, text)
            examples = await self._example_vectors(task, embedder)
            if examples.shape[1] != vector.shape[0]:  # the embedder changed model: embed the examples again
                self._examples.pop(task, None)
                examples = await self._example_vectors(task, embedder)
        except EmbedderDown as e:
            metrics.RETRIEVAL_LOOKUPS.labels("-", f"task:{task}", "embedder_down").inc()
            log.debug("task %s: embedder down: %s", task, e)
            return False
        return float(np.max(examples @ vector)) >= cfg.min_similarity
