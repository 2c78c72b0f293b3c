"""State backends behind one protocol: the embedded memory store and Redis."""

from __future__ import annotations

from proxy.config.models import StoreConfig
from proxy.store.base import Store, StoreUnavailable, Usage
from proxy.store.memory import MemoryStore


def build_store(redis_url: str | None, config: StoreConfig) -> Store:
    if not redis_url:
        return MemoryStore()
    from proxy.store.redis import RedisStore
    from proxy.store.resilient import FailurePolicyStore

    return FailurePolicyStore(RedisStore(redis_url, config), config.on_failure)


__all__ = ["MemoryStore", "Store", "StoreUnavailable", "Usage", "build_store"]
