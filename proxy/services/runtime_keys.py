"""Runtime virtual keys (made through `/admin/keys`): what a key may do, the checks a new key must pass,
and each replica's copy of every key, kept current by polling one version counter in the background.

The request path never waits on Redis for a key this replica already knows: a lookup is a dict hit.
A key this replica has not seen yet (made on another replica a moment ago) costs one Redis lookup,
once. Revocation reaches every replica at the next poll (every 250 ms), since a change bumps the
version counter and a replica that sees a new version reloads the whole set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from proxy.config.models import BudgetConfig, LimitsConfig, PolicyFile
from proxy.errors import InvalidRequest, NotFound
from proxy.store.base import StoreUnavailable
from proxy.store.keys import RedisKeyStore, parse_digest_entry

log = logging.getLogger("llm_proxy.keys")

KEY_PREFIX = "sk-lnp-"  # every runtime key starts so: recognisable in a leak scanner, routed to this ring
POLL_S = 0.25
FLUSH_EVERY = 4  # polls between writes of last-used times and spend (about once a second)
MAX_METADATA_BYTES = 4096
_MISSES_MAX = 65536
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@:/-]{0,63}$")


@dataclass(frozen=True, slots=True)
class KeyRights:
    """What a runtime key may do on top of its team's rights: it can only narrow them."""

    id: str
    models: frozenset[str] | None
    budget: BudgetConfig | None
    limits: LimitsConfig | None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    team: str
    name: str
    expires_at: float | None
    revoked_at: float | None
    rights: KeyRights
    data: dict[str, Any]  # the stored record as read (for listing)
    raw: bytes  # its stored form, for compare-and-set

    @classmethod
    def load(cls, raw: bytes) -> KeyRecord:
        d = orjson.loads(raw)
        rights = KeyRights(
            d["id"],
            frozenset(d["models"]) if d.get("models") else None,
            BudgetConfig(**d["budget"]) if d.get("budget") else None,
            LimitsConfig(**d["limits"]) if d.get("limits") else None,
        )
        return cls(d["id"], d["team"], d["name"], d.get("expires_at"), d.get("revoked_at"), rights, d, raw)


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "vk" + secrets.token_hex(8)


def fingerprint(digest: str) -> str:
    """The short, non-secret name of a key's SHA-256 digest (`sha256:<hex>`): as YAML keys show it."""
    return digest[7:19]


class NewKey(BaseModel):
    """The body of `POST /admin/keys`."""

    model_config = ConfigDict(extra="forbid")
    team: str = Field(min_length=1, max_length=128)
    name: str
    models: list[str] | None = Field(default=None, min_length=1, max_length=256)
    budget: BudgetConfig | None = None
    limits: LimitsConfig | None = None
    expires_at: float | datetime | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _printable_name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError("a name is 1-64 characters: letters, digits, space and . _ @ : / -, starting alphanumeric")
        return name


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "body"
    return f"{where}: {err.get('msg', 'invalid')}"


def check_new_key(body: Any, policy: PolicyFile, allowed: dict[str, frozenset[str]], now: float) -> dict[str, Any]:
    """A validated key record (without id and secret) for `body`, or InvalidRequest/NotFound saying why."""
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object: {team, name, models?, budget?, limits?, ...}.")
    try:
        new = NewKey.model_validate(body)
    except ValidationError as e:
        raise InvalidRequest(f"Invalid key: {_first_error(e)}", code="invalid_key_request") from None
    team = policy.teams.get(new.team)
    if team is None:
        raise NotFound(f"No team '{new.team}' in the policy file.", param="team", code="team_not_found")
    models = None
    if new.models is not None:
        unknown = [m for m in new.models if m not in policy.models]
        if unknown:
            raise NotFound(f"No model '{unknown[0]}' in the policy file.", param="models", code="model_not_found")
        outside = [m for m in new.models if m not in allowed.get(new.team, ())]
        if outside:
            raise InvalidRequest(
                f"Team '{new.team}' may not use the model '{outside[0]}': a key can only narrow its team's models.",
                param="models",
                code="model_not_allowed",
            )
        models = sorted(set(new.models))
    if new.budget is not None:
        if new.budget.on_exceed != "reject":
            raise InvalidRequest("A key's budget can only reject (on_exceed: reject).", param="budget")
        for what, ceiling in (("team's budget", team.budget), ("team's key_budget", team.key_budget)):
            if ceiling is not None and new.budget.usd > ceiling.usd:
                raise InvalidRequest(
                    f"The key's budget of ${new.budget.usd:g} is larger than the {what} of ${ceiling.usd:g}.",
                    param="budget.usd",
                    code="budget_too_large",
                )
    if new.limits is not None:
        for what, ceiling in (("team's limits", team.limits), ("team's key_limits", team.key_limits)):
            for kind in ("rpm", "tpm"):
                mine, theirs = getattr(new.limits, kind), getattr(ceiling, kind) if ceiling else None
                if mine is not None and theirs is not None and mine > theirs:
                    raise InvalidRequest(
                        f"The key's {kind} of {mine} is larger than the {what} {kind} of {theirs}.",
                        param=f"limits.{kind}",
                        code="limit_too_large",
                    )
    expires = new.expires_at.timestamp() if isinstance(new.expires_at, datetime) else new.expires_at
    if expires is not None and expires <= now:
        raise InvalidRequest("expires_at is in the past.", param="expires_at", code="expiry_in_past")
    if new.metadata is not None:
        size = len(orjson.dumps(new.metadata))
        if size > MAX_METADATA_BYTES:
            raise InvalidRequest(
                f"metadata is {size} bytes as JSON; at most {MAX_METADATA_BYTES}.",
                param="metadata",
                code="metadata_too_large",
            )
    return {
        "team": new.team,
        "name": new.name,
        "models": models,
        "budget": new.budget.model_dump(include={"usd", "period"}) if new.budget else None,
        "limits": new.limits.model_dump(exclude_none=True) if new.limits else None,
        "expires_at": expires,
        "metadata": new.metadata,
        "created_at": now,
        "revoked_at": None,
        "rotated_at": None,
    }


class RuntimeKeys:
    """This replica's copy of every runtime key (digest → key), current within one poll."""

    def __init__(self, store: RedisKeyStore):
        self.store = store
        self._by_digest: dict[str, tuple[str, float | None]] = {}
        self._records: dict[str, KeyRecord] = {}
        self._version = -1
        self._generation = 0  # bumped by each reload: a lookup that began before one is not cached
        self._misses: set[str] = set()
        self._use: dict[str, list[float]] = {}  # id -> [last used, spend nano] not yet written
        self._task: asyncio.Task[None] | None = None
        self._warned = False

    async def start(self) -> None:
        try:
            await self.reload()
        except StoreUnavailable as e:
            log.warning("runtime keys not loaded at start (%s); retrying in the background", e)
        self._task = asyncio.create_task(self._poll_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(StoreUnavailable):
            await self._flush_use()

    async def reload(self) -> None:
        version, records, digests = await self.store.snapshot()
        loaded = {}
        for raw in records.values():
            try:
                record = KeyRecord.load(raw)
            except (ValueError, KeyError, TypeError, ValidationError):
                log.error("skipping an unreadable runtime key record")
                continue
            loaded[record.id] = record
        self._records = loaded
        self._by_digest = {d.decode(): parse_digest_entry(e.decode()) for d, e in digests.items()}
        self._misses = set()
        self._version = version
        self._generation += 1

    async def _poll_forever(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(POLL_S)  # the poll period: how stale a revocation may be, at most
            tick += 1
            try:
                if await self.store.version() != self._version:
                    await self.reload()
                if tick % FLUSH_EVERY == 0:
                    await self._flush_use()
                self._warned = False
            except StoreUnavailable as e:
                if not self._warned:
                    log.warning("runtime keys: store unavailable (%s); serving the keys known so far", e)
                    self._warned = True

    async def find(self, digest: str) -> tuple[KeyRecord, float | None] | None:
        """(record, grace end of a rotated-out secret) for a digest; Redis is asked only for a digest
        this replica has not seen. Raises StoreUnavailable when it must ask and cannot."""
        hit = self._by_digest.get(digest)
        if hit is not None:
            record = self._records.get(hit[0])
            return (record, hit[1]) if record is not None else None
        if digest in self._misses:
            return None
        generation = self._generation
        found = await self.store.lookup(digest)
        if found is None or not found[1]:
            if len(self._misses) > _MISSES_MAX:
                self._misses.clear()
            self._misses.add(digest)
            return None
        key_id, until = parse_digest_entry(found[0])
        record = KeyRecord.load(found[1])
        if generation == self._generation:  # no reload since the lookup began: what it read is current
            self._by_digest[digest] = (key_id, until)
            self._records.setdefault(key_id, record)
        return record, until

    def note_use(self, key_id: str, spend_nano: int) -> None:
        entry = self._use.get(key_id)
        if entry is None:
            self._use[key_id] = [time.time(), spend_nano]
        else:
            entry[0] = time.time()
            entry[1] += spend_nano

    async def _flush_use(self) -> None:
        if not self._use:
            return
        pending, self._use = self._use, {}
        try:
            await self.store.add_usage([(k, v[0], int(v[1])) for k, v in pending.items()])
        except StoreUnavailable:
            for k, (used, nano) in pending.items():  # kept for the next flush
                self.note_use(k, int(nano))
                self._use[k][0] = max(self._use[k][0], used)
            raise
