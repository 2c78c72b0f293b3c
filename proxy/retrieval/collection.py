"""One collection as this replica sees it: the entries in the store, mirrored into an in-process vector
index that follows the store's change log, rebuilt on start and whenever the embedder's identity
(model, dimension) changes, so vectors of two embedders are never compared.

A knowledge base (`kb`) is written by the admin API or `llm-numbers-proxy kb load`; a semantic cache
(`cache`) by upstream answers to requests a policy marks cacheable. Cache entries belong to the team
whose request made them unless the collection is `shared`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np

from proxy import metrics
from proxy.config.models import CollectionConfig
from proxy.retrieval.embedders import Embedder, EmbedderDown
from proxy.retrieval.entries import Entry, load_stored
from proxy.retrieval.guards import TextFacts, analyse
from proxy.retrieval.index import VectorIndex
from proxy.retrieval.query import RetrievalQuery, text_key
from proxy.store.base import StoreUnavailable
from proxy.store.collections import CollectionStore, StoredItem

log = logging.getLogger("llm_proxy.retrieval")

SYNC_INTERVAL_S = 0.2
_PURGE_EVERY_S = 5.0
_EMBED_BATCH = 256
_CANDIDATES = 8
_ALL_TEAMS = "*"


class NotReady(Exception):
    """The collection's index is not (or no longer) usable: loading, or the embedder changed."""


@dataclass(slots=True, eq=False)
class _Indexed:
    entry: Entry
    slots: list[tuple[tuple[str, str], int]]  # (partition, row) per question
    facts: list[TextFacts]  # per question
    keys: list[tuple[str, str, str]]  # exact-match keys (scope, context, text key)

    def expired(self, now: float) -> bool:
        return self.entry.expires_at is not None and self.entry.expires_at <= now


@dataclass(frozen=True, slots=True)
class Match:
    entry: Entry
    question: int  # which of the entry's questions matched
    facts: TextFacts  # of that question
    similarity: float
    runner_up: float | None  # the best similarity among entries with another answer

    @property
    def margin(self) -> float:
        return float("inf") if self.runner_up is None else self.similarity - self.runner_up


def _scopes(entry: Entry) -> list[str]:
    return [_ALL_TEAMS] if entry.teams is None else list(entry.teams)


class Collection:
    def __init__(self, name: str, cfg: CollectionConfig, embedder: Embedder, store: CollectionStore):
        self.name = name
        self.cfg = cfg
        self.embedder = embedder
        self._store = store
        self._index: VectorIndex | None = None
        self._entries: dict[str, _Indexed] = {}
        self._owners: dict[tuple[tuple[str, str], int], tuple[str, int]] = {}
        self._exact: dict[tuple[str, str, str], str] = {}
        self.version = 0
        self.ready = False
        self._reload = True
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._last_purge = 0.0
        self._last_error = ""

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            with contextlib.suppress(RuntimeError):  # no running loop: started by the first use
                self._task = asyncio.get_running_loop().create_task(self._follow_store())

    def configure(self, cfg: CollectionConfig, embedder: Embedder) -> None:
        """A reloaded policy: same collection, maybe another embedder (then the index is rebuilt)."""
        self.cfg = cfg
        if embedder.source != self.embedder.source:
            self._reload = True
            self.ready = False
        self.embedder = embedder
        self.start()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def status(self) -> dict:
        return {
            "kind": self.cfg.kind,
            "ready": self.ready,
            "entries": len(self._entries),
            "version": self.version,
            "embedder": self.embedder.name,
            "identity": self._index.identity if self._index else None,
            **({"error": self._last_error} if self._last_error and not self.ready else {}),
        }

    async def _follow_store(self) -> None:
        delay = SYNC_INTERVAL_S
        while True:
            try:
                if self._reload:
                    await self._load_all()
                else:
                    await self.catch_up()
                now = time.time()
                if now - self._last_purge > _PURGE_EVERY_S:
                    self._last_purge = now
                    await self._store.purge_expired(self.name, now)
                await self._refresh_ann()
                delay = SYNC_INTERVAL_S
            except (StoreUnavailable, EmbedderDown) as e:
                if str(e) != self._last_error:
                    log.warning("collection %s: %s (retrying)", self.name, e)
                self._last_error = str(e)
                delay = min(delay * 2, 5.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("collection %s: unexpected error while following the store", self.name)
                delay = 5.0
            await asyncio.sleep(delay)

    async def _load_all(self) -> None:
        """(Re)build the index from every stored entry, for the embedder as it is now."""
        # A reload may swap in a new (not yet probed) embedder while this one gets ready: use this one.
        embedder = self.embedder
        await embedder.ready()
        identity = embedder.identity
        assert identity is not None
        dim = int(identity.rsplit(":", 1)[1])
        async with self._lock:
            self.ready = False
            self._index = VectorIndex(identity, dim)
            self._entries, self._owners, self._exact = {}, {}, {}
            self.version = await self._store.version(self.name)
            stale: list[tuple[Entry, bytes]] = []
            async for chunk in self._store.scan(self.name):
                for entry_id, raw in chunk:
                    stale += self._apply(entry_id, raw)
            self._reload = False
        await self.catch_up()
        if stale:
            await self._refresh_stale(stale)
        self.ready = not self._reload
        self._last_error = ""
        metrics.RETRIEVAL_ENTRIES.labels(self.name).set(len(self._entries))
        log.info("collection %s: %d entries indexed (%s)", self.name, len(self._entries), identity)

    async def catch_up(self) -> None:
        """Apply the store's changes since this replica's version."""
        async with self._lock:
            if self._reload or self._index is None:
                return
            stale: list[tuple[Entry, bytes]] = []
            while True:
                changes = await self._store.changes(self.name, self.version)
                if changes is None:  # fell behind the change log: rebuild from scratch
                    self._reload = True
                    return
                for entry_id, raw in changes.entries.items():
                    self._forget(entry_id)
                    if raw is not None:
                        stale += self._apply(entry_id, raw)
                self.version = changes.version
                if changes.complete:
                    break
        metrics.RETRIEVAL_ENTRIES.labels(self.name).set(len(self._entries))
        if stale:
            await self._refresh_stale(stale)

    async def _refresh_ann(self) -> None:
        if self._index is None:
            return
        for part in list(self._index.partitions.values()):
            if part.needs_ann():
                await part.refresh_ann()

    # -- the in-process mirror -----------------------------------------------------------------------

    def _apply(self, entry_id: str, raw: bytes) -> list[tuple[Entry, bytes]]:
        """Index one stored entry; returns it when its vectors were made by another embedder."""
        entry = load_stored(raw)
        if entry is None or entry.id != entry_id:
            log.warning("collection %s: skipping unreadable entry %r", self.name, entry_id)
            return []
        if entry.expires_at is not None and entry.expires_at <= time.time():
            return []
        index = self._index
        assert index is not None
        if entry.embedder != index.identity or entry.vectors is None or entry.vectors.shape[1] != index.dim:
            return [(entry, raw)]  # the stored bytes, for a rewrite only if still unchanged
        slots, keys = [], []
        for scope in _scopes(entry):
            partition = (scope, entry.context)
            for qi, vector in enumerate(entry.vectors):
                row = index.add(partition, vector)
                slots.append((partition, row))
                self._owners[(partition, row)] = (entry.id, qi)
            for q in entry.questions:
                key = (scope, entry.context, text_key(q))
                self._exact[key] = entry.id
                keys.append(key)
        vectors, entry.vectors = entry.vectors, None  # the index holds them
        del vectors
        self._entries[entry.id] = _Indexed(entry, slots, [analyse(q) for q in entry.questions], keys)
        return []

    def _forget(self, entry_id: str) -> None:
        indexed = self._entries.pop(entry_id, None)
        if indexed is None or self._index is None:
            return
        for partition, row in indexed.slots:
            self._index.remove(partition, row)
            self._owners.pop((partition, row), None)
        for key in indexed.keys:
            if self._exact.get(key) == entry_id:
                del self._exact[key]

    async def _refresh_stale(self, stale: list[tuple[Entry, bytes]]) -> None:
        """Entries embedded by another model: a knowledge base re-embeds them (written back only if
        unchanged meanwhile); a cache drops them, it refills by itself."""
        if self.cfg.kind == "cache":
            await self._store.delete(self.name, [e.id for e, _ in stale])
        else:
            log.info("collection %s: re-embedding %d entries for %s", self.name, len(stale), self.embedder.name)
            for start in range(0, len(stale), _EMBED_BATCH):
                batch = stale[start : start + _EMBED_BATCH]
                await self._embed([e for e, _ in batch])
                await self._store.replace_unchanged(self.name, [(e.id, raw, e.dump()) for e, raw in batch])
        await self.catch_up()

    # -- lookups ---------------------------------------------------------------------------------

    def _visible(self, team: str | None) -> list[str]:
        return [_ALL_TEAMS, team] if team else [_ALL_TEAMS]

    def exact(self, team: str | None, query: RetrievalQuery, now: float) -> _Indexed | None:
        """The entry whose question is the query up to case, spacing and trailing punctuation."""
        if not self.ready:
            return None
        for scope in self._visible(team):
            entry_id = self._exact.get((scope, query.context, query.key))
            if entry_id is not None:
                indexed = self._entries.get(entry_id)
                if indexed is not None and not indexed.expired(now):
                    return indexed
        return None

    def search(self, team: str | None, context: str, vector: np.ndarray, now: float) -> Match | None:
        index = self._index
        if not self.ready or index is None:
            raise NotReady(f"collection {self.name} is loading")
        if vector.shape[-1] != index.dim:
            # The embedder now answers in another dimension: it changed model. Never compare across.
            self._reload = True
            self.ready = False
            raise NotReady(f"embedder {self.embedder.name} changed dimension ({index.dim} -> {vector.shape[-1]})")
        partitions = [(scope, context) for scope in self._visible(team)]
        best: tuple[_Indexed, int, float] | None = None
        for partition, row, sim in index.search(partitions, vector, _CANDIDATES):
            owner = self._owners.get((partition, row))
            if owner is None:
                continue
            indexed = self._entries[owner[0]]
            if indexed.expired(now):
                continue
            if best is None:
                best = (indexed, owner[1], sim)
            elif indexed.entry.answer != best[0].entry.answer:
                return Match(best[0].entry, best[1], best[0].facts[best[1]], best[2], sim)
        if best is None:
            return None
        return Match(best[0].entry, best[1], best[0].facts[best[1]], best[2], None)

    def get(self, entry_id: str) -> Entry | None:
        indexed = self._entries.get(entry_id)
        return indexed.entry if indexed else None

    # -- writes ------------------------------------------------------------------------------------

    async def _embed(self, entries: list[Entry]) -> None:
        embedder = self.embedder  # the same one throughout, even if a reload swaps it meanwhile
        await embedder.ready()
        texts = [q for e in entries for q in e.questions]
        chunks = []
        for start in range(0, len(texts), _EMBED_BATCH):
            chunks.append((await embedder.embed(texts[start : start + _EMBED_BATCH])).vectors)
        vectors = np.concatenate(chunks)
        identity = embedder.identity
        if len({c.shape[1] for c in chunks}) != 1 or identity is None or not identity.endswith(f":{vectors.shape[1]}"):
            raise EmbedderDown("bad_response", f"embedder {embedder.name} changed dimension while embedding")
        at = 0
        for e in entries:
            e.vectors = vectors[at : at + len(e.questions)]
            e.embedder = identity
            at += len(e.questions)

    async def upsert(self, entries: list[Entry]) -> int:
        """Embed and store entries all together (any failure stores none); visible here at once."""
        await self._embed(entries)
        ttl = self.cfg.entry_ttl_s
        now = time.time()
        items = []
        for e in entries:
            e.created_at = now  # lifetimes count from the write, not from the request that sent them
            lifetime = e.ttl_s if e.ttl_s is not None else ttl
            e.expires_at = e.created_at + lifetime if lifetime is not None else None
            items.append(StoredItem(e.id, e.dump(), e.expires_at, e.created_at))
        version = await self._store.upsert(self.name, items, self.cfg.max_entries)
        await self.catch_up()
        return version

    async def delete(self, entry_id: str) -> bool:
        deleted = await self._store.delete(self.name, [entry_id])
        await self.catch_up()
        return deleted > 0

    async def remember(
        self, query: RetrievalQuery, team: str | None, vector: np.ndarray, answer: str, identity: str | None
    ) -> bool:
        """Store an upstream answer in this cache (the query's own embedding is reused)."""
        index = self._index
        if index is None or identity != index.identity or vector.shape[-1] != index.dim:
            return False  # embedded by an embedder this index does not hold: never mix
        scope = _ALL_TEAMS if self.cfg.shared or team is None else team
        now = time.time()
        entry = Entry(
            id=f"{scope}.{query.context or 'standalone'}.{query.key}",
            questions=[query.text],
            answer=answer,
            teams=None if scope == _ALL_TEAMS else [scope],
            context=query.context,
            created_at=now,
            embedder=identity,
            vectors=vector.reshape(1, -1).astype(np.float32),
        )
        ttl = self.cfg.entry_ttl_s
        entry.expires_at = now + ttl if ttl is not None else None
        await self._store.upsert(
            self.name, [StoredItem(entry.id, entry.dump(), entry.expires_at, now)], self.cfg.max_entries
        )
        await self.catch_up()
        return True
