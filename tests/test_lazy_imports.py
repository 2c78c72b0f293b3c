"""The fast path stays light: litellm, torch and embedding models are imported only when the
policy file needs them."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
    path.write_text("models:\n  titan: {provider: bedrock, api_key: x, price: {input_per_mtok: 1}}\n")
    assert "litellm" in _heavy_modules(str(path))


def test_an_anthropic_model_needs_no_litellm_until_chat_is_sent_to_it(tmp_path):
    # /v1/messages goes to Anthropic natively; only a chat request to it would need litellm's translation.
    path = tmp_path / "p.yaml"
    path.write_text("models:\n  claude: {provider: anthropic, api_key: x, price: {input_per_mtok: 1}}\n")
    assert "litellm" not in _heavy_modules(str(path))


TOKENIZER_PROBE = """
import asyncio, sys
from proxy.services import tokens
from proxy.app import create_app
app = create_app(sys.argv[1])
async def main():
    built = tokens.get_encoding.cache_info().currsize
    await app.state.start()
    await app.state.tokenizers_warmed()
    warmed = sorted(app.state.tokenizers_loaded)
    counter = app.state.runtime.estimator.counter("gpt-4o")
    n = counter.chat_prompt([{"role": "user", "content": "hello there"}])
    enc = tokens.get_encoding(counter.encoding_name)
    await app.state.stop()
    print(built, ",".join(warmed), tokens.get_encoding.cache_info().currsize, n, hasattr(enc, "_mergeable_ranks"))
asyncio.run(main())
"""


def test_tokenizers_the_models_need_load_after_start_without_their_python_ranks():
    """Only the encodings of the configured models load (tens of MiB each), in the background once the proxy
    has started, so no request pays for one; none while the runtime is merely built (check, explain)."""
    r = subprocess.run(
        [sys.executable, "-c", TOKENIZER_PROBE, "policies/default.yaml"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    built, warmed, loaded, tokens, keeps_ranks = r.stdout.split()
    assert built == "0"  # building the app loads nothing
    # default.yaml's gpt-4o family counts with o200k_base, text-embedding-3-small with cl100k_base: those two only
    assert warmed == "cl100k_base,o200k_base" and loaded == "2"  # counting loaded nothing more
    assert tokens == "9"  # 3 priming + 3 framing + 1 role + 2 text tokens: counting is unchanged
    assert keeps_ranks == "False"


def test_an_unknown_tokenizer_fails_when_the_runtime_is_built_not_on_a_request():
    from proxy.services.tokens import TokenCounter

    with pytest.raises(ValueError, match="no_such_base"):
        TokenCounter("no_such_base")
