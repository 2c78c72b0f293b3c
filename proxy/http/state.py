"""The objects one proxy process lives on: store, upstream session, the current runtime, the reloader,
the requests in flight. Built by the app factory (`proxy.app`), never global."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import aiohttp

from proxy.config import PolicyFile
from proxy.config.references import uses_embedder
from proxy.config.reload import Reloader
from proxy.http.heap import freeze_startup_heap, refreeze_after_reload
from proxy.pipeline.runtime import Runtime
from proxy.services.evaluation import ShadowEvaluator
from proxy.services.request_log import RequestLogWriter
from proxy.services.runtime_keys import RuntimeKeys
from proxy.services.tokens import get_encoding
from proxy.services.tracing import Tracing, tracing_from_env
from proxy.store import Store, build_store
from proxy.store.keys import AuditLog, MemoryAuditLog, RedisKeyStore, build_key_store

if TYPE_CHECKING:
    from proxy.retrieval.service import Retrieval

log = logging.getLogger("llm_proxy")

# How long shutdown waits for requests still settling (store writes, bounded by the store's own
# timeouts and the fail-open journal) before it closes the store under them.
SETTLE_ON_SHUTDOWN_S = 10.0


class InFlight:
    """The HTTP requests being served. uvicorn cancels requests still running past its graceful
    timeout and goes straight on to the lifespan shutdown; a cancelled request still settles (releases
    its reservation, records what a stream relayed), so the store must stay open until it has."""

    __slots__ = ("_idle", "count")

    def __init__(self) -> None:
        self.count = 0
        self._idle: asyncio.Event | None = None

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0 and self._idle is not None:
            self._idle.set()

    async def drained(self, timeout: float) -> bool:
        if self.count == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


class ProxyState:
    """The objects one proxy process lives on; built by the factory, never global."""

    def __init__(self, policy: PolicyFile, config_path: str | None, redis_url: str | None, master_key: str | None):
        self.config_path = config_path
        self.master_key = master_key
        self.store: Store = build_store(redis_url, policy.store)
        self.session: aiohttp.ClientSession | None = None
        self.reloader: Reloader | None = None
        self.request_log: RequestLogWriter | None = None
        self.started_at = time.time()
        self._policy = policy
        self.retrieval: Retrieval | None = None  # built when a policy file first uses collections
        # Runtime keys and a shared audit log need Redis; the embedded store keeps the audit in process.
        self.key_store: RedisKeyStore | None = build_key_store(self.store)
        self.runtime_keys = RuntimeKeys(self.key_store) if self.key_store is not None else None
        self.audit: AuditLog = self.key_store if self.key_store is not None else MemoryAuditLog()
        self.tracing: Tracing | None = None  # from the OTEL_* variables, in start (each worker its own)
        self.runtime: Runtime = Runtime(policy, self.store, None, config_path or "", runtime_keys=self.runtime_keys)
        self.in_flight = InFlight()
        self._retired: list[ShadowEvaluator] = []  # evaluators of replaced runtimes, closed on stop
        # Encodings the configured models count with, loaded in the background after start (readiness
        # waits for them) so that no client request pays the ~0.65 s load of one.
        self.tokenizers_loaded: list[str] = []
        self._tokenizers_pending: set[str] = set()
        self._warming: asyncio.Task[None] | None = None
        self._started = False  # start() has run: a later apply_policy is a reload

    async def start(self) -> None:
        start_store = getattr(self.store, "start", None)
        if start_store is not None:
            await start_store()
        if self.runtime_keys is not None:
            await self.runtime_keys.start()
        self.tracing = tracing_from_env()
        connector = aiohttp.TCPConnector(
            limit=self._policy.server.max_connections, ttl_dns_cache=300, keepalive_timeout=30
        )
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=True, skip_auto_headers=["User-Agent"]
        )
        self.apply_policy(self._policy)
        if self.runtime.retrieval is not None:
            await self.runtime.retrieval.warm()
        if self.runtime.keyring.plaintext_keys:
            log.warning(
                "SECURITY: %d virtual key(s) in %s are stored in plaintext; store them as sha256:<hex> "
                "(llm-numbers-proxy hash-key KEY prints the form).",
                self.runtime.keyring.plaintext_keys,
                self.config_path,
            )
        if self.config_path:
            self.reloader = Reloader(self.config_path, self.apply_policy)
            self.reloader.start(watch=self._policy.server.watch_config)
        self._started = True
        freeze_startup_heap()

    def _log_writer(self, policy: PolicyFile) -> RequestLogWriter | None:
        path = policy.log.requests
        if path is None:
            return None
        if self.request_log is None or self.request_log.path != path:
            if self.request_log is not None:
                self.request_log.flush()
            self.request_log = RequestLogWriter(path)
        return self.request_log

    def apply_policy(self, policy: PolicyFile) -> None:
        """Build a complete runtime for `policy`, then swap it in (one assignment)."""
        runtime = Runtime(
            policy,
            self.store,
            self.session,
            self.config_path or "",
            self._log_writer(policy),
            retrieval=self._retrieval_for(policy),
            runtime_keys=self.runtime_keys,
        )
        self._policy = policy
        previous, self.runtime = self.runtime, runtime
        if previous.evaluation is not None:
            # Its queued shadow comparisons still finish (their budget is reserved); it takes no new ones.
            previous.evaluation.retire()
            self._retired = [e for e in self._retired if not e.finished] + [previous.evaluation]
        if self._started:
            refreeze_after_reload()
        self._warm_tokenizers(policy)

    def _warm_tokenizers(self, policy: PolicyFile) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # built outside a loop (explain, tests): encodings load on first count
            return
        wanted = {self.runtime.estimator.counter(name).encoding_name for name in policy.models}
        new = sorted(wanted - set(self.tokenizers_loaded) - self._tokenizers_pending)
        if not new:
            return
        self._tokenizers_pending.update(new)
        previous = self._warming

        async def warm() -> None:
            if previous is not None:
                await previous  # one at a time: two threads building the same encoding would both pay
            for name in new:
                await asyncio.to_thread(get_encoding, name)  # off the event loop: /healthz answers meanwhile
                self._tokenizers_pending.discard(name)
                self.tokenizers_loaded.append(name)
            freeze_startup_heap()  # an encoding's tables are start-up heap too

        self._warming = asyncio.get_running_loop().create_task(warm())

    @property
    def tokenizers_ready(self) -> bool:
        return not self._tokenizers_pending

    async def tokenizers_warmed(self) -> None:
        """Wait until the configured models' encodings are loaded."""
        while self._warming is not None and not self._warming.done():
            await asyncio.shield(self._warming)

    def _retrieval_for(self, policy: PolicyFile) -> Retrieval | None:
        if self.retrieval is None and uses_embedder(policy):
            from proxy.retrieval.service import Retrieval

            self.retrieval = Retrieval(self.store, policy.store.key_prefix)
        return self.retrieval

    async def stop(self) -> None:
        if self._warming is not None and not self._warming.done():
            self._warming.cancel()  # the thread finishes on its own; nothing waits for it
        if not await self.in_flight.drained(SETTLE_ON_SHUTDOWN_S):
            log.error("shutting down with %d requests not settled", self.in_flight.count)
        for evaluator in [*self._retired, self.runtime.evaluation]:
            if evaluator is not None:
                await evaluator.close()  # before the session and the store it uses are closed
        if self.retrieval is not None:
            await self.retrieval.close()
        if self.request_log is not None:
            self.request_log.flush()
        if self.reloader is not None:
            await self.reloader.stop()
        if self.session is not None:
            await self.session.close()
        if self.runtime_keys is not None:
            await self.runtime_keys.stop()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # the last spans, within the export timeout
        await self.store.close()
