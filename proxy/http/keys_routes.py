"""Admin endpoints of runtime virtual keys (master key): `POST /admin/keys` makes one (its secret is shown
once, only its SHA-256 digest is stored), `GET /admin/keys` lists them without secrets, `POST
/admin/keys/{id}/rotate` and `DELETE /admin/keys/{id}`; `GET /admin/audit` reads the audit log, where
every admin change (keys, reload, knowledge base) is appended: who (master key fingerprint), what, when.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from proxy.config.models import BudgetConfig
from proxy.errors import InvalidRequest, NotFound, PayloadTooLarge, ProxyError, StoreDown
from proxy.http.admin_auth import require_master_key
from proxy.http.asgi import check_content_type
from proxy.services.budget_ledger import scope_for
from proxy.services.keyring import hash_key
from proxy.services.runtime_keys import check_new_key, fingerprint, new_key_id, new_secret
from proxy.store.base import NANO, StoreUnavailable
from proxy.store.keys import KeyConflict, digest_entry

if TYPE_CHECKING:
    from proxy.http.state import ProxyState

log = logging.getLogger("llm_proxy.admin")

MAX_BODY_BYTES = 64 * 1024
MAX_GRACE_S = 30 * 86400
_AUDITED_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class Conflict(ProxyError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _who(state: ProxyState) -> str:
    """The admin, by the fingerprint of the master key it used (never the key)."""
    return "master:" + fingerprint(hash_key(state.master_key or ""))


async def _read_json(request: Request, required: bool = True) -> Any:
    check_content_type({k.lower(): v for k, v in request.headers.items()})
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    if not raw.strip() and not required:
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"The request body is not valid JSON: {e.args[0]}") from None


def _key_store(state: ProxyState) -> Any:
    if state.key_store is None:
        raise Conflict(
            "Runtime keys need the Redis store, so that they outlive this process and every replica sees them: "
            "set LLM_PROXY_REDIS_URL (e.g. redis://127.0.0.1:6379/0). Policy-file keys work without it.",
            code="runtime_keys_need_redis",
        )
    return state.key_store


def _down(e: StoreUnavailable, what: str = "Nothing was changed") -> StoreDown:
    return StoreDown(f"{what}: the store is unavailable ({e}).")


def _public(record: dict[str, Any]) -> dict[str, Any]:
    """A key record as the API shows it: everything but the digest."""
    return {k: v for k, v in record.items() if k != "digest"}


async def _current(store: Any, key_id: str) -> tuple[bytes, dict[str, Any]]:
    try:
        raw = await store.record(key_id)
    except StoreUnavailable as e:
        raise _down(e) from None
    if raw is None:
        raise NotFound(f"No runtime key '{key_id}'.", code="key_not_found")
    return raw, orjson.loads(raw)


def _refuse_spent(record: dict[str, Any], now: float, doing: str) -> None:
    if record.get("revoked_at") is not None:
        raise Conflict(f"The key '{record['id']}' is revoked; it cannot be {doing}.", code="key_revoked")
    expires = record.get("expires_at")
    if expires is not None and now >= expires:
        raise Conflict(f"The key '{record['id']}' has expired; it cannot be {doing}.", code="key_expired")


def _state_of(record: dict[str, Any], now: float) -> str:
    if record.get("revoked_at") is not None:
        return "revoked"
    if record.get("expires_at") is not None and now >= record["expires_at"]:
        return "expired"
    return "active"


class AuditAdminChanges:
    """ASGI wrapper: each admin change that succeeds (reload, knowledge base) is appended to the audit log.
    The key endpoints write their own, richer entries in the same script as the change."""

    def __init__(self, app: Any, state: ProxyState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        audited = (
            scope["type"] == "http"
            and scope["method"] in _AUDITED_METHODS
            and path.startswith("/admin/")
            and not path.startswith("/admin/keys")
        )
        if not audited:
            await self.app(scope, receive, send)
            return
        status = 500

        async def watch(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        if status < 400:
            entry = {"at": time.time(), "by": _who(self.state), "action": f"{scope['method']} {path[:200]}"}
            try:
                await self.state.audit.append(entry)
            except StoreUnavailable as e:  # the change is made; the audit line is what is lost
                log.error("could not append to the audit log (%s): %s", entry["action"], e)


def add_key_routes(app: FastAPI, state: ProxyState) -> None:
    app.add_middleware(AuditAdminChanges, state=state)

    @app.post("/admin/keys")
    async def key_create(request: Request) -> Response:
        require_master_key(request.headers, state.master_key)
        store = _key_store(state)
        body = await _read_json(request)
        runtime = state.runtime
        now = time.time()
        fields = check_new_key(body, runtime.policy, runtime.allowed, now)
        secret = new_secret()
        digest = hash_key(secret)
        record = {"id": new_key_id(), **fields, "fingerprint": fingerprint(digest), "digest": digest}
        audit = {
            "at": now,
            "by": _who(state),
            "action": "key.create",
            "key_id": record["id"],
            "team": record["team"],
            "name": record["name"],
            "fingerprint": record["fingerprint"],
        }
        try:
            await store.create(record, digest, audit)
        except StoreUnavailable as e:
            raise _down(e, "No key was made") from None
        except KeyConflict:  # a 64-bit id or a 256-bit secret collided: never in practice
            raise Conflict("The new key collided with an existing one; try again.") from None
        return _json({**_public(record), "key": secret}, status=201)

    @app.get("/admin/keys")
    async def key_list(request: Request, team: str | None = None) -> Response:
        require_master_key(request.headers, state.master_key)
        store = _key_store(state)
        now = time.time()
        try:
            _, records, _ = await store.snapshot()
            used, spend = await store.usage()
        except StoreUnavailable as e:
            raise _down(e, "Cannot list keys") from None
        rows = sorted((orjson.loads(r) for r in records.values()), key=lambda r: r["created_at"])
        rows = [r for r in rows if team is None or r["team"] == team]
        budgeted = [r for r in rows if r.get("budget")]
        scopes = [scope_for(r["team"], f"vkey:{r['id']}", BudgetConfig(**r["budget"]), now) for r in budgeted]
        try:
            usage = await state.store.budget_usage(scopes) if scopes else []
        except StoreUnavailable as e:
            raise _down(e, "Cannot list keys") from None
        budgets = {}
        for r, scope, (spent, reserved) in zip(budgeted, scopes, usage, strict=True):
            budgets[r["id"]] = {
                "period": scope.period,
                "limit_usd": scope.limit_nano / NANO,
                "spent_usd": spent / NANO,
                "reserved_usd": reserved / NANO,
                "remaining_usd": max(0, scope.limit_nano - spent - reserved) / NANO,
            }
        out = []
        for r in rows:
            key_id = r["id"].encode()
            last = used.get(key_id)
            out.append(
                {
                    **_public(r),
                    "state": _state_of(r, now),
                    "last_used_at": float(last) if last else None,
                    "spend_usd": int(spend.get(key_id, 0)) / NANO,
                    "budget_state": budgets.get(r["id"]),
                }
            )
        return _json({"keys": out})

    @app.post("/admin/keys/{key_id}/rotate")
    async def key_rotate(key_id: str, request: Request) -> Response:
        require_master_key(request.headers, state.master_key)
        store = _key_store(state)
        body = await _read_json(request, required=False)
        grace = body.get("grace_s", 0) if isinstance(body, dict) else None
        if not isinstance(body, dict) or set(body) - {"grace_s"}:
            raise InvalidRequest("The body is optional: {grace_s: seconds the old key stays valid (default 0)}.")
        if isinstance(grace, bool) or not isinstance(grace, int | float) or not 0 <= grace <= MAX_GRACE_S:
            raise InvalidRequest(f"grace_s must be a number of seconds from 0 to {MAX_GRACE_S}.", param="grace_s")
        raw, record = await _current(store, key_id)
        now = time.time()
        _refuse_spent(record, now, "rotated")
        secret = new_secret()
        digest = hash_key(secret)
        old_digest = record["digest"]
        new = {**record, "digest": digest, "fingerprint": fingerprint(digest), "rotated_at": now}
        audit = {
            "at": now,
            "by": _who(state),
            "action": "key.rotate",
            "key_id": key_id,
            "team": record["team"],
            "fingerprint": new["fingerprint"],
            "old_fingerprint": record["fingerprint"],
            "grace_s": grace,
        }
        digests = [(old_digest, digest_entry(key_id, now + grace)), (digest, digest_entry(key_id, None))]
        try:
            await store.change(raw, new, digests, audit)
        except StoreUnavailable as e:
            raise _down(e) from None
        except KeyConflict:
            raise Conflict(f"The key '{key_id}' changed meanwhile (revoked or rotated); nothing was changed.") from None
        return _json({**_public(new), "key": secret, "old_key_valid_until": now + grace})

    @app.delete("/admin/keys/{key_id}")
    async def key_revoke(key_id: str, request: Request) -> Response:
        require_master_key(request.headers, state.master_key)
        store = _key_store(state)
        raw, record = await _current(store, key_id)
        now = time.time()
        if record.get("revoked_at") is not None:
            raise Conflict(f"The key '{key_id}' is already revoked.", code="key_revoked")
        new = {**record, "revoked_at": now}
        audit = {
            "at": now,
            "by": _who(state),
            "action": "key.revoke",
            "key_id": key_id,
            "team": record["team"],
            "fingerprint": record["fingerprint"],
        }
        try:
            await store.change(raw, new, [], audit)
        except StoreUnavailable as e:
            raise _down(e) from None
        except KeyConflict:
            raise Conflict(f"The key '{key_id}' changed meanwhile; nothing was changed.") from None
        return _json({**_public(new), "state": "revoked"})

    @app.get("/admin/audit")
    async def audit_read(request: Request, limit: int = 100) -> Response:
        require_master_key(request.headers, state.master_key)
        try:
            entries = await state.audit.read(max(1, min(limit, 10_000)))
        except StoreUnavailable as e:
            raise _down(e, "Cannot read the audit log") from None
        return _json({"store": state.store.name, "entries": entries})
