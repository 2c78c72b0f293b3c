"""App factory: wires config, store, upstream session and runtime; ops and admin endpoints.

The OpenAI endpoints are served by the raw ASGI gateway in front; everything else (health,
readiness, metrics, admin) is a small FastAPI app behind it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from proxy.admin_auth import AdminGuard, require_master_key
from proxy.config import PolicyFile, load_policy_file
from proxy.config.reload import Reloader
from proxy.errors import ProxyError, Unauthorized
from proxy.explain import explain
from proxy.gateway import Gateway, check_content_type
from proxy.metrics_export import render_metrics, worker_started, worker_stopped
from proxy.retrieval.admin import add_kb_routes
from proxy.runtime import Runtime
from proxy.savings_report import savings_report
from proxy.steps.budget import scope_for
from proxy.steps.request_log import RequestLogWriter
from proxy.steps.validate import parse_body
from proxy.store import Store, build_store
from proxy.store.base import NANO, utc_day

if TYPE_CHECKING:
    from proxy.retrieval.service import Retrieval

log = logging.getLogger("llm_proxy")

DEFAULT_CONFIG = "policies/default.yaml"
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
        self.runtime: Runtime = Runtime(policy, self.store, None, config_path or "")
        self.in_flight = InFlight()

    async def start(self) -> None:
        start_store = getattr(self.store, "start", None)
        if start_store is not None:
            await start_store()
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
        )
        self._policy = policy
        self.runtime = runtime

    def _retrieval_for(self, policy: PolicyFile) -> Retrieval | None:
        if self.retrieval is None and (policy.collections or any(t.examples for t in policy.tasks.values())):
            from proxy.retrieval.service import Retrieval

            self.retrieval = Retrieval(self.store, policy.store.key_prefix)
        return self.retrieval

    async def stop(self) -> None:
        if not await self.in_flight.drained(SETTLE_ON_SHUTDOWN_S):
            log.error("shutting down with %d requests not settled", self.in_flight.count)
        if self.retrieval is not None:
            await self.retrieval.close()
        if self.request_log is not None:
            self.request_log.flush()
        if self.reloader is not None:
            await self.reloader.stop()
        if self.session is not None:
            await self.session.close()
        await self.store.close()


def redacted_config(policy: PolicyFile) -> dict[str, Any]:
    """The running config with every secret replaced (model api keys, virtual key hashes)."""
    data = policy.model_dump(mode="json")
    for model in data["models"].values():
        if model.get("api_key"):
            model["api_key"] = "***"
        model["headers"] = dict.fromkeys(model.get("headers") or {}, "***")
    for team in data["teams"].values():
        team["keys"] = [f"*** ({len(team['keys'])} keys)"] if team["keys"] else []
    return data


async def _team_budgets(policy: PolicyFile, store: Store, now: float) -> list[tuple[str, dict[str, Any]]]:
    """Spent, reserved and remaining of each team budget in its current period."""
    teams = [(name, cfg.budget) for name, cfg in sorted(policy.teams.items()) if cfg.budget is not None]
    if not teams:
        return []
    scopes = [scope_for(name, "team", budget, now) for name, budget in teams]
    usage = await store.budget_usage(scopes)
    return [
        (
            name,
            {
                "period": scope.period,
                "limit_usd": scope.limit_nano / NANO,
                "spent_usd": spent / NANO,
                "reserved_usd": reserved / NANO,
                "remaining_usd": max(0, scope.limit_nano - spent - reserved) / NANO,
            },
        )
        for (name, _), scope, (spent, reserved) in zip(teams, scopes, usage, strict=True)
    ]


def _error_response(e: ProxyError) -> JSONResponse:
    return Response(e.body(), status_code=e.status, media_type="application/json", headers=e.headers)


def build_ops_app(state: ProxyState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker_started()
        await state.start()
        try:
            yield
        finally:
            try:
                await state.stop()
            finally:
                worker_stopped()

    app = FastAPI(title="llm-numbers-proxy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ProxyError)
    async def _proxy_error(_: Request, e: ProxyError) -> Response:
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> Response:
        err = ProxyError(str(e.detail), code="not_found" if e.status_code == 404 else None)
        err.status = e.status_code
        err.type = "invalid_request_error"
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> Response:
        err = ProxyError(f"Invalid request: {e.errors()[0].get('msg', 'invalid')}")
        err.status = 400
        err.type = "invalid_request_error"
        return _error_response(err)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        store_ok = await state.store.healthy()
        body: dict[str, Any] = {
            "status": "ready" if store_ok else "degraded",
            "store": {"backend": state.store.name, "healthy": store_ok},
            "models": len(state.runtime.policy.models),
        }
        if state.retrieval is not None:
            body["collections"] = state.retrieval.status()
        return JSONResponse(body, status_code=200 if store_ok else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        body, content_type = render_metrics()  # every worker's values under serve --workers N
        return Response(body, media_type=content_type)

    @app.post("/admin/reload")
    async def admin_reload(request: Request) -> Response:
        require_master_key(request.headers, state.master_key)
        if state.reloader is None:
            raise ProxyError("This proxy was started without a policy file path; nothing to reload.")
        errors = await state.reloader.reload("admin request")
        if errors:
            err = ProxyError("The new policy file is invalid; the running config is kept.", code="invalid_config")
            err.status, err.type = 400, "invalid_request_error"
            body = orjson.loads(err.body())
            body["error"]["details"] = errors
            return Response(orjson.dumps(body), status_code=400, media_type="application/json")
        return JSONResponse({"reloaded": True, "generation": state.reloader.generation})

    @app.post("/v1/proxy/explain")
    async def proxy_explain(request: Request) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        check_content_type(headers)  # as the endpoints it explains: JSON bodies only
        body = parse_body(await request.body())
        # Authenticate as the real endpoints do: explain tells a team only about its own requests.
        out = await explain(state.runtime, body, headers=headers)
        if out["decision"] == "rejected" and out["error"]["status"] == 401:
            raise Unauthorized(out["error"]["message"])
        return Response(orjson.dumps(out), media_type="application/json")

    @app.get("/admin/config")
    async def admin_config(request: Request) -> Response:
        require_master_key(request.headers, state.master_key)
        return Response(orjson.dumps(redacted_config(state.runtime.policy)), media_type="application/json")

    @app.get("/admin/savings")
    async def admin_savings(request: Request, days: int = 7) -> dict[str, Any]:
        require_master_key(request.headers, state.master_key)
        return await savings_report(state.runtime.policy, state.store, max(1, min(days, 90)))

    @app.get("/admin/spend")
    async def admin_spend(request: Request, days: int = 7) -> dict[str, Any]:
        require_master_key(request.headers, state.master_key)
        days = max(1, min(days, 90))
        now = time.time()
        day_list = [utc_day(now - 86400 * i) for i in range(days)]
        teams = sorted(state.runtime.policy.teams)
        spend = await state.store.spend(teams, day_list)
        out: dict[str, Any] = {}
        for team, ts in spend.items():
            out[team] = {
                "spend_usd": sum(line.cost_nano for line in ts.total.values()) / 1e9,
                "by_model": {m: line.as_dict() for m, line in sorted(ts.total.items())},
                "by_day": {
                    d: {m: line.as_dict() for m, line in sorted(lines.items())}
                    for d, lines in sorted(ts.by_day.items())
                },
            }
        for team, budget in await _team_budgets(state.runtime.policy, state.store, now):
            out[team]["budget"] = budget
        return {"store": state.store.name, "teams": out}

    add_kb_routes(app, state)
    return app


def create_app(
    config_path: str | None = None,
    *,
    redis_url: str | None = None,
    master_key: str | None = None,
) -> Gateway:
    """Build the ASGI app. Arguments default to LLM_PROXY_CONFIG, LLM_PROXY_REDIS_URL, LLM_PROXY_MASTER_KEY."""
    path = config_path or os.environ.get("LLM_PROXY_CONFIG") or DEFAULT_CONFIG
    policy = load_policy_file(path)
    state = ProxyState(
        policy,
        path,
        redis_url if redis_url is not None else os.environ.get("LLM_PROXY_REDIS_URL") or None,
        master_key if master_key is not None else os.environ.get("LLM_PROXY_MASTER_KEY") or None,
    )
    return _CountingGateway(state, AdminGuard(build_ops_app(state), lambda: state.master_key))


class _CountingGateway(Gateway):
    """The gateway, counting the requests in flight for `ProxyState.stop`."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        in_flight = self.state.in_flight
        in_flight.count += 1
        try:
            await super().__call__(scope, receive, send)
        finally:
            in_flight.leave()
