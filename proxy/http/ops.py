"""Ops and admin endpoints (health, readiness, metrics, reload, config, spend, savings, explain, knowledge
base): a small FastAPI app behind the raw ASGI gateway, which serves the OpenAI endpoints itself."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from proxy.config import PolicyFile
from proxy.errors import InvalidRequest, NotFound, ProxyError, StoreDown, Unauthorized
from proxy.http.admin_auth import require_master_key
from proxy.http.asgi import check_content_type
from proxy.http.endpoints import unknown_path
from proxy.http.feedback import add_feedback_routes
from proxy.http.kb_routes import add_kb_routes
from proxy.http.keys_routes import add_key_routes
from proxy.http.metrics_export import render_metrics, worker_started, worker_stopped
from proxy.http.savings_report import savings_report
from proxy.http.state import ProxyState
from proxy.pipeline.explain import explain
from proxy.services.budget_ledger import scope_for
from proxy.services.shadow_labels import NoLabels, labels_jsonl, retained_labels
from proxy.store import Store
from proxy.store.base import NANO, StoreUnavailable, utc_day
from proxy.wire.json_body import parse_body


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
    async def _http_error(request: Request, e: StarletteHTTPException) -> Response:
        if e.status_code == 404 and e.detail == "Not Found":  # no route: say which exist
            return _error_response(unknown_path(request.url.path))
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
        tokenizers_ok = state.tokenizers_ready
        body: dict[str, Any] = {
            "status": ("ready" if tokenizers_ok else "starting") if store_ok else "degraded",
            "store": {"backend": state.store.name, "healthy": store_ok},
            "models": len(state.runtime.policy.models),
            "tokenizers": {"ready": tokenizers_ok, "loaded": list(state.tokenizers_loaded)},
        }
        if state.retrieval is not None:
            body["collections"] = state.retrieval.status()
            body["tasks"] = state.retrieval.task_status()  # example embeddings: a task matches once ready
        if state.runtime.retrieval is not None:
            body["embedders"] = state.runtime.retrieval.local_status()  # a reload starts loading a new model
        return JSONResponse(body, status_code=200 if store_ok and tokenizers_ok else 503)

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
        runtime = state.runtime
        return await savings_report(runtime.policy, state.store, max(1, min(days, 90)), runtime.evaluation)

    @app.get("/admin/shadow/labels")
    async def admin_shadow_labels(request: Request, policy: str | None = None) -> Response:
        """The retained labels of a shadowed policy as JSONL (`router fit --labels` reads it)."""
        require_master_key(request.headers, state.master_key)
        if not policy:
            raise InvalidRequest("Name the shadowed policy: GET /admin/shadow/labels?policy=NAME.", param="policy")
        try:
            labels = await retained_labels(state.runtime.policy, state.store, policy)
        except NoLabels as e:
            raise NotFound(f"No labels: {e}.") from None
        except StoreUnavailable as e:
            raise StoreDown(f"The store is unavailable ({e}).") from None
        return Response(labels_jsonl(labels), media_type="application/x-ndjson")

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
    add_feedback_routes(app, state)
    add_key_routes(app, state)
    return app
