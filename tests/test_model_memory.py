"""The GPU memory arithmetic of a self-hosted model (proxy/config/capacity.py) and the policy-file checks
built on it: the founding numbers, the token budget that bounds a batch, and file:line errors and warnings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from proxy.config import ConfigError, ConfigIssue, parse_policy_text
from proxy.config.capacity import ModelMemory, default_kv_mb_per_token
from proxy.config.models import ModelConfig
from tests.conftest import ROOT


def memory(**facts) -> ModelMemory:
    m = ModelMemory.of(ModelConfig(**facts))
    assert m is not None
    return m


def test_the_founding_numbers_two_bytes_per_parameter_and_a_megabyte_per_token_at_13b():
    assert memory(hardware={"gpu_memory_gb": 24}, params_b=7).weights_gb == 14.0  # 7B at fp16 -> 14 GB
    assert default_kv_mb_per_token(13, "fp16") == pytest.approx(1.0)  # ~1 MB per token for a 13B model
    assert memory(hardware={"gpu_memory_gb": 80}, params_b=13).mb(512) == pytest.approx(512)  # 512 tokens ≈ 512 MB


def test_quantised_weights_shrink_the_weights_not_the_kv_cache():
    int4 = memory(hardware={"gpu_memory_gb": 40}, params_b=70, dtype="int4")
    assert int4.weights_gb == 35.0
    assert int4.kv_mb_per_token == pytest.approx(70 / 13)  # the cache stays 16-bit by default
    assert memory(hardware={"gpu_memory_gb": 80}, params_b=13, dtype="fp32").kv_mb_per_token == pytest.approx(2.0)
    assert memory(hardware={"gpu_memory_gb": 80}, params_b=13, kv_mb_per_token=0.25).kv_mb_per_token == 0.25


def test_the_token_budget_is_what_the_weights_and_the_margin_leave():
    # A10G, 7B fp16: 24 GB x 0.9 = 21.6 GB usable, 14 GB of weights: 7.6 GB for requests in flight.
    m = memory(hardware={"gpu_memory_gb": 24}, params_b=7, kv_mb_per_token=0.5)
    assert m.budget_mb == pytest.approx(7600)
    assert m.token_budget == 15200
    assert m.misfit("m", 15200) is None
    why = m.misfit("m", 15201)
    assert why is not None and "15201 tokens" in why and "7,600 MB (15200 tokens)" in why and "14 GB at fp16" in why
    two = memory(hardware={"gpu_memory_gb": 24, "gpus": 2, "memory_margin": 0}, params_b=7, kv_mb_per_token=1)
    assert two.token_budget == 34000  # 48 GB - 14 GB, at 1 MB per token


def test_a_model_without_serving_facts_has_no_memory_bound():
    assert ModelMemory.of(ModelConfig()) is None
    assert ModelMemory.of(ModelConfig(max_input_tokens=4096)) is None


def _issues(model_yaml: str) -> list[str]:
    text = f"version: 1\nmodels:\n  m:\n    api_base: http://127.0.0.1:1/v1\n    {model_yaml}\n"
    with pytest.raises(ConfigError) as e:
        parse_policy_text(text, "p.yaml", {})
    return [str(i) for i in e.value.issues]


A10G_7B = "hardware: {gpu_memory_gb: 24}\n    params_b: 7"


@pytest.mark.parametrize(
    ("model_yaml", "line", "path", "message"),
    [
        ("hardware: {gpu_memory_gb: -24}\n    params_b: 7", 5, "models.m.hardware.gpu_memory_gb", "greater than 0"),
        ("hardware: {gpu_memory_gb: 1e9}\n    params_b: 7", 5, "models.m.hardware.gpu_memory_gb", "less than or equal"),
        ("hardware: {gpu_memory_gb: 24}\n    params_b: 0", 6, "models.m.params_b", "greater than 0"),
        ("hardware: {gpu_memory_gb: 24}\n    params_b: 50000", 6, "models.m.params_b", "less than or equal"),
        (
            "hardware: {gpu_memory_gb: 24, memory_margin: 1}\n    params_b: 7",
            5,
            "models.m.hardware.memory_margin",
            "0.9",
        ),
        ("hardware: {gpu_memory_gb: 24, gpus: 0}\n    params_b: 7", 5, "models.m.hardware.gpus", "greater than"),
        (A10G_7B + "\n    dtype: fp8", 7, "models.m.dtype", "unknown dtype 'fp8'"),
        (
            A10G_7B + "\n    kv_mb_per_token: 0",
            7,
            "models.m.kv_mb_per_token",
            "greater than 0",
        ),
        ("hardware: {gpu_memory_gb: 24}", 5, "models.m.hardware", "needs params_b"),
        ("params_b: 7", 5, "models.m.params_b", "needs hardware"),
        ("dtype: int8", 5, "models.m.dtype", "no effect without hardware and params_b"),
        ("hardware: {gpu_memory_gb: 24}\n    params_b: 13", 6, "models.m.params_b", "weights alone (13B parameters"),
        ("hardware: {gpu_memory_gb: 15}\n    params_b: 7", 5, "models.m.hardware", "leave no memory for requests"),
        (
            "hardware: {gpu_memory_gb: 24}\n    params_b: 7\n    kv_mb_per_token: 1\n    max_output_tokens: 8000",
            8,
            "models.m.max_output_tokens",
            "max_output_tokens 8000 cannot fit: the model holds 7600 tokens",
        ),
    ],
)
def test_check_rejects_serving_facts_that_cannot_be_true(model_yaml, line, path, message):
    issues = _issues(model_yaml)
    assert len(issues) == 1, issues
    assert issues[0].startswith(f"p.yaml:{line}: {path}: "), issues
    assert message in issues[0], issues


def test_check_warns_when_the_configured_batch_cannot_fit_at_the_context_window(tmp_path):
    text = (
        "version: 1\nmodels:\n  m:\n    api_base: http://127.0.0.1:1/v1\n"
        "    hardware: {gpu_memory_gb: 24}\n    params_b: 7\n    kv_mb_per_token: 0.5\n"
        "    max_input_tokens: 4096\n    batching: {max_batch_size: 32}\n"
    )
    warnings: list[ConfigIssue] = []
    parse_policy_text(text, "p.yaml", {}, warnings)
    assert [str(w) for w in warnings] == [
        "p.yaml:9: models.m.batching.max_batch_size: warning: 32 requests at the context window (4096 tokens) "
        "need 65,536 MB; 7,600 MB is left after the weights: at full context about 3 fit at once, so memory, "
        "not max_batch_size, bounds the batch"
    ]
    path = tmp_path / "p.yaml"
    path.write_text(text)
    r = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "check", str(path)], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    assert f"{path}:9: models.m.batching.max_batch_size: warning: 32 requests" in r.stderr
    fits = text.replace("max_batch_size: 32", "max_batch_size: 3")
    quiet: list[ConfigIssue] = []
    parse_policy_text(fits, "p.yaml", {}, quiet)
    assert quiet == []


def test_check_warns_when_one_request_at_the_context_window_cannot_fit():
    text = (
        "version: 1\nmodels:\n  m:\n    api_base: http://127.0.0.1:1/v1\n"
        "    hardware: {gpu_memory_gb: 24}\n    params_b: 7\n    kv_mb_per_token: 1\n    max_input_tokens: 128000\n"
    )
    warnings: list[ConfigIssue] = []
    parse_policy_text(text, "p.yaml", {}, warnings)
    assert len(warnings) == 1 and str(warnings[0]).startswith("p.yaml:8: models.m.max_input_tokens: warning: ")
    assert "one request at the context window (128000 tokens) cannot fit the 7600 tokens" in warnings[0].message
