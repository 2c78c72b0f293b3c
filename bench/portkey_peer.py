"""Portkey's AI gateway (Node) as a peer for bench/peers.py: installed from npm into bench/.peers/portkey
(git-ignored), run headless as one Node process, pointed at the mock per request by its own headers.

Portkey has no config file for an OpenAI-compatible upstream: `x-portkey-provider: openai` and
`x-portkey-custom-host: <base url>` on each request say where it goes, and the Authorization header is
forwarded to the upstream as the provider key.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from bench.overhead import ROOT

# Pinned exactly so every run measures the same peer.
GATEWAY_VERSION = "1.15.2"
# The gateway's own lock file builds with @hono/node-server 1.13.5; its package.json allows ^1.3.3, and the
# newest 1.x (1.19) wraps fetch's immutable response headers, so every stream fails with "TypeError:
# immutable" in ResponseService.updateHeaders (Portkey-AI/gateway#1389). Pin what the gateway was built on.
_OVERRIDES = {"@hono/node-server": "1.13.5"}
DIR = ROOT / "bench" / ".peers" / "portkey"
_ENTRY = DIR / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"


def _package_json() -> dict:
    return {"private": True, "dependencies": {"@portkey-ai/gateway": GATEWAY_VERSION}, "overrides": _OVERRIDES}


def _installed_version() -> str | None:
    try:
        meta = json.loads((_ENTRY.parent.parent / "package.json").read_text())
        pinned = json.loads((DIR / "package.json").read_text()) == _package_json()
    except (OSError, ValueError):
        return None
    return meta.get("version") if pinned else None


def ensure_installed() -> Path:
    """npm-install the pinned gateway into bench/.peers/portkey unless it is already there."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise RuntimeError("Portkey's gateway needs Node.js and npm (apt-get install -y nodejs npm)")
    if _installed_version() != GATEWAY_VERSION:
        print(f"installing @portkey-ai/gateway@{GATEWAY_VERSION} into {DIR} (once) ...", file=sys.stderr)
        DIR.mkdir(parents=True, exist_ok=True)
        (DIR / "package.json").write_text(json.dumps(_package_json(), indent=2) + "\n")
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=DIR, check=True)
    return _ENTRY


def command(entry: Path, port: int) -> list[str]:
    # --headless: no browser tab, no console UI; the spinner stops once the server listens.
    return ["node", str(entry), f"--port={port}", "--headless"]


def env(base: dict[str, str]) -> dict[str, str]:
    return {**base, "NODE_ENV": "production"}


def headers(mock_url: str, upstream_key: str) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {upstream_key}",
        "x-portkey-provider": "openai",
        "x-portkey-custom-host": f"{mock_url}/v1",
    }
