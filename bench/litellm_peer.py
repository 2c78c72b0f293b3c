"""The LiteLLM proxy as a peer for bench/peers.py: installed in its own venv (never into this package's),
configured to run offline with no database, one worker, and quiet logs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from bench.overhead import ROOT

# Pinned exactly so every run measures the same peer. Never 1.82.7 or 1.82.8 (compromised releases).
LITELLM_VERSION = "1.108.7"
VENV = ROOT / "bench" / ".peers-venv"

# The model cost map is fetched from the internet at import time unless told to use the bundled copy
# (three retries, ~15 s, when offline); LITELLM_OFFLINE_MODE covers the other fetches in later releases.
_OFFLINE = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_OFFLINE_MODE": "true", "LITELLM_LOG": "ERROR"}


def env() -> dict[str, str]:
    """The caller's environment, less anything that would make LiteLLM look for a database."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "DIRECT_URL"))}
    return {**base, **_OFFLINE}


def _installed_version() -> str | None:
    python = VENV / "bin" / "python"
    if not python.exists():
        return None
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() if out.returncode == 0 else None


def ensure_venv() -> Path:
    """Create bench/.peers-venv with litellm[proxy] at the pinned version unless it is already there."""
    if _installed_version() != LITELLM_VERSION:
        print(f"installing litellm[proxy]=={LITELLM_VERSION} into {VENV} (once) ...", file=sys.stderr)
        if not (VENV / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run(
            [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"],
            check=True,
        )
    return VENV / "bin" / "litellm"


def config(mock_url: str, master_key: str) -> str:
    """Model `m` → the mock as an OpenAI-compatible api_base; auth by master key only (no database)."""
    return textwrap.dedent(
        f"""\
        model_list:
          - model_name: m
            litellm_params:
              model: openai/mock
              api_base: {mock_url}/v1
              api_key: sk-mock-upstream
        litellm_settings:
          telemetry: false
          set_verbose: false
          json_logs: false
        general_settings:
          master_key: {master_key}
        """
    )


def command(exe: Path, config_path: str, port: int) -> list[str]:
    return [str(exe), "--config", config_path, "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
