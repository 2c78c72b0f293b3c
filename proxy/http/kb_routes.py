"""Admin endpoints of the collections (master key): `/admin/kb/{collection}` upsert (POST), list (GET)
and `/admin/kb/{collection}/{id}` delete (DELETE); `/admin/kb` shows every collection's state.

An upsert is all or nothing: every entry is validated and embedded before any is written, and the
write is one store operation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from proxy.errors import InvalidRequest, NotFound, PayloadTooLarge, ProxyError, StoreDown
from proxy.http.admin_auth import require_master_key

if TYPE_CHECKING:
    from proxy.http.state import ProxyState

MAX_UPSERT_BYTES = 32 * 1024 * 1024
MAX_UPSERT_ENTRIES = 10_000


class EmbedderUnavailable(ProxyError):
    status = 503
    type = "api_error"
    code = "embedder_unavailable"


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _collection(state: ProxyState, name: str) -> Any:
    retrieval = state.retrieval
    collection = retrieval.collections.get(name) if retrieval is not None else None
    if collection is None or name not in state.runtime.policy.collections:
        raise NotFound(f"No collection '{name}': define it under collections: in the policy file.")
    return collection


async def _read_entries(request: Request) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_UPSERT_BYTES:
        raise PayloadTooLarge(f"An upsert is at most {MAX_UPSERT_BYTES} bytes; send the entries in parts.")
    raw = await request.body()
    if len(raw) > MAX_UPSERT_BYTES:
        raise PayloadTooLarge(f"An upsert is at most {MAX_UPSERT_BYTES} bytes; send the entries in parts.")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"The request body is not valid JSON: {e.args[0]}") from None
    if isinstance(data, dict) and "entries" in data:
        data = data["entries"]
    elif isinstance(data, dict):
        data = [data]
    if isinstance(data, list) and len(data) > MAX_UPSERT_ENTRIES:
        raise PayloadTooLarge(f"An upsert is at most {MAX_UPSERT_ENTRIES} entries; send them in parts.")
    return data


def add_kb_routes(app: FastAPI, state: ProxyState) -> None:
    @app.get("/admin/kb")
    async def kb_status(request: Request) -> Response:
        require_master_key(request.headers, state.master_key)
        return _json({"collections": state.retrieval.status() if state.retrieval is not None else {}})

    @app.post("/admin/kb/{name}")
    async def kb_upsert(name: str, request: Request) -> Response:
        require_master_key(request.headers, state.master_key)
        from proxy.retrieval.embedders import EmbedderDown
        from proxy.retrieval.entries import EntryError, parse_entries
        from proxy.store.base import StoreUnavailable

        collection = _collection(state, name)
        data = await _read_entries(request)
        try:
            entries = parse_entries(data, frozenset(state.runtime.policy.teams))
        except EntryError as e:
            raise InvalidRequest(f"Nothing was stored: {e}", code="invalid_entries") from None
        try:
            version = await collection.upsert(entries)
        except EmbedderDown as e:
            raise EmbedderUnavailable(f"Nothing was stored: the embedder cannot answer ({e}).") from None
        except StoreUnavailable as e:
            raise StoreDown(f"Nothing was stored: the store is unavailable ({e}).") from None
        return _json({"collection": name, "upserted": len(entries), "version": version})

    @app.get("/admin/kb/{name}")
    async def kb_list(name: str, request: Request, offset: int = 0, limit: int = 100) -> Response:
        require_master_key(request.headers, state.master_key)
        from proxy.retrieval.entries import load_stored
        from proxy.store.base import StoreUnavailable

        collection = _collection(state, name)
        try:
            total, raws = await state.retrieval.store.page(name, max(0, offset), max(1, min(limit, 1000)))
        except StoreUnavailable as e:
            raise StoreDown(f"The store is unavailable ({e}).") from None
        entries = [e.public() for e in map(load_stored, raws) if e is not None]
        status = state.retrieval.status().get(name) or collection.status()  # with its error bounds
        return _json({"collection": name, "status": status, "total": total, "entries": entries})

    @app.delete("/admin/kb/{name}/{entry_id:path}")
    async def kb_delete(name: str, entry_id: str, request: Request) -> Response:
        require_master_key(request.headers, state.master_key)
        from proxy.store.base import StoreUnavailable

        collection = _collection(state, name)
        try:
            deleted = await collection.delete(entry_id)
        except StoreUnavailable as e:
            raise StoreDown(f"Nothing was deleted: the store is unavailable ({e}).") from None
        if not deleted:
            raise NotFound(f"No entry '{entry_id}' in collection '{name}'.")
        return _json({"collection": name, "deleted": entry_id})
