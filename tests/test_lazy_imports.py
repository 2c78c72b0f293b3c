"""The fast path stays light: litellm, torch and embedding models are imported only when the
policy file needs them."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

PROBE = """
import asyncio, sys
from proxy.app import create_app
app = create_app(sys.argv[1])
async def main():
    await app.state.start()
    await app.state.stop()
asyncio.run(main())
print(",".join(m for m in ("litellm", "torch", "sentence_transformers", "numpy") if m in sys.modules))
"""


def _heavy_modules(config: str) -> set[str]:
    r = subprocess.run([sys.executable, "-c", PROBE, config], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    return set(filter(None, r.stdout.rstrip("\n").split("\n")[-1].split(",")))


def test_openai_only_policy_imports_no_heavy_library():
    assert _heavy_modules("policies/default.yaml") == set()


def test_a_litellm_provider_imports_litellm(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("models:\n  claude: {provider: anthropic, api_key: x, price: {input_per_mtok: 1}}\n")
    assert "litellm" in _heavy_modules(str(path))
