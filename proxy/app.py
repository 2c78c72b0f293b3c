"""The composition root: one policy file → the process state, the raw ASGI gateway in front (the OpenAI
endpoints), and the ops/admin app behind it."""

from __future__ import annotations

import os

from proxy.config import load_policy_file
from proxy.http.admin_auth import AdminGuard
from proxy.http.gateway import Gateway
from proxy.http.ops import build_ops_app
from proxy.http.state import ProxyState

DEFAULT_CONFIG = "policies/default.yaml"


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
    return Gateway(state, AdminGuard(build_ops_app(state), lambda: state.master_key))
