"""Explain and replay: the proxy's decision for a request without calling any upstream or changing
any state; replay projects spend and savings over recorded traffic so a policy change can be judged
before it ships."""

from __future__ import annotations

import secrets
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import orjson

from proxy.errors import ProxyError
from proxy.pipeline.context import Endpoint, RequestContext
from proxy.pipeline.runtime import Runtime
from proxy.wire.formats import BY_ENDPOINT

DEFAULT_EXPECTED_OUTPUT = 256
# Fields of a traffic line that describe the request rather than being part of its body.
_REPLAY_FIELDS = frozenset({"team", "key", "usage", "prompt_tokens", "endpoint", "ts", "request_id", "status"})
_ENDPOINTS = tuple(BY_ENDPOINT)
# What stands in for prompt text a log left out (its recorded token count is used instead).
_NO_TEXT: dict[str, tuple[str, Any]] = {
    Endpoint.CHAT: ("messages", [{"role": "user", "content": ""}]),
    Endpoint.COMPLETIONS: ("prompt", ""),
    Endpoint.EMBEDDINGS: ("input", ""),
}
# Rejections that say the line itself cannot be replayed (malformed, unknown model or key), as opposed
# to a decision of the policy (forbidden, over budget, over a limit) that replay projects.
_UNREPLAYABLE = frozenset({400, 401, 404, 413, 415})


def endpoint_of(body: dict[str, Any]) -> str:
    """The endpoint a bare request body belongs to (explain and replay get bodies, not paths)."""
    if "messages" in body:
        return Endpoint.CHAT
    if "input" in body:
        return Endpoint.EMBEDDINGS
    return Endpoint.COMPLETIONS if "prompt" in body else Endpoint.CHAT


async def explain(
    runtime: Runtime,
    body: dict[str, Any],
    *,
    headers: dict[str, str] | None = None,
    team: str | None = None,
    prompt_tokens: int | None = None,
    output_tokens: int | None = None,
    endpoint: str | None = None,
) -> dict[str, Any]:
    """The decision for one request body, as JSON-able data (the endpoint guessed from the body's fields
    unless given)."""
    endpoint = endpoint or endpoint_of(body)
    ctx = RequestContext(
        request_id=secrets.token_hex(12),
        endpoint=endpoint,
        headers=headers or {},
        wire=BY_ENDPOINT[endpoint],
        dry_run=True,
    )
    ctx.raw = orjson.dumps(body)
    ctx.team = team
    ctx.known_prompt_tokens = prompt_tokens
    out: dict[str, Any] = {"decision": "upstream"}
    try:
        await runtime.pipeline.run_request(ctx)
    except ProxyError as e:
        out["decision"] = "rejected"
        out["error"] = {"status": e.status, "code": e.code, "message": e.message}
    if ctx.answer is not None:
        out["decision"] = "answered"
        out["route"] = ctx.route
    if ctx.endpoint == Endpoint.EMBEDDINGS:
        expected = 0
    elif output_tokens is not None:
        expected = min(output_tokens, ctx.max_output_tokens or output_tokens)
    else:
        expected = min(ctx.max_output_tokens, DEFAULT_EXPECTED_OUTPUT)
    projected = 0.0
    counterfactual = 0.0
    if ctx.model and ctx.model in runtime.policy.models and out["decision"] != "rejected":
        projected = runtime.prices.cost(ctx.model, ctx.prompt_tokens, 0 if ctx.answer else expected)
    if ctx.model_requested in runtime.policy.models:
        counterfactual = runtime.prices.cost(ctx.model_requested, ctx.prompt_tokens, expected)
    out.update(
        team=ctx.team,
        model_requested=ctx.model_requested,
        model=ctx.model,
        policies=ctx.policies,
        prompt_tokens=ctx.prompt_tokens,
        max_output_tokens=ctx.max_output_tokens,
        expected_output_tokens=expected,
        cost_estimate_usd=ctx.cost_estimate,  # the worst case a budget reserves
        projected_cost_usd=projected,
        counterfactual_usd=counterfactual if out["decision"] != "rejected" else 0.0,
        saved_usd=max(0.0, counterfactual - projected) if out["decision"] != "rejected" else 0.0,
    )
    memory = runtime.model_memory.memory.get(ctx.model or "")
    if memory is not None:  # a self-hosted model with serving facts: the GPU memory the request would hold
        out["model_memory"] = memory.describe(ctx.prompt_tokens + ctx.max_output_tokens)
    if ctx.router_predictions:
        out["router"] = ctx.router_predictions
    # The saving belongs to the policies that change what a request costs (route, retrieve, ...).
    savers = list(dict.fromkeys([*ctx.routed_by, *ctx.saved_by_policy]))
    out["saved_by_policy"] = {p: out["saved_usd"] / len(savers) for p in savers}
    return _tidy(out)


def _tidy(value: Any) -> Any:
    """Floats to 12 significant digits: sums of prices print as 0.0001566, not 0.00015659999999999998."""
    if isinstance(value, float):
        return float(f"{value:.12g}")
    if isinstance(value, dict):
        return {k: _tidy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_tidy(v) for v in value]
    return value


def _bucket() -> dict[str, float]:
    return {"requests": 0, "spend_usd": 0.0, "counterfactual_usd": 0.0, "saved_usd": 0.0}


async def replay(runtime: Runtime, lines: Iterable[str], default_team: str | None = None) -> dict[str, Any]:
    """Project spend and savings over JSONL traffic (docs/replay.md): one OpenAI request body per line,
    with optional `team` or `key`, `endpoint`, `prompt_tokens` (when the log kept no prompt text) and
    `usage`; or a line of the proxy's own request log, whose request body is under `body`.

    `totals.rejected` counts the requests the policy would refuse (forbidden, over budget or a limit);
    lines that cannot be replayed at all (not JSON, a malformed body, an unknown model, key or endpoint)
    are counted in `totals.failed` and listed under `errors` (the first 100)."""
    totals = _bucket()
    totals["rejected"] = 0
    totals["failed"] = 0
    by_policy: dict[str, dict[str, float]] = defaultdict(_bucket)
    by_model: dict[str, dict[str, float]] = defaultdict(_bucket)
    by_team: dict[str, dict[str, float]] = defaultdict(_bucket)
    errors: list[dict[str, Any]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (orjson.JSONDecodeError, ValueError) as e:
            totals["failed"] += 1
            errors.append({"line": n, "error": f"invalid JSON: {e}"})
            continue
        if isinstance(record.get("body"), dict):  # the proxy's own request log
            body = dict(record["body"])
        else:
            body = {k: v for k, v in record.items() if k not in _REPLAY_FIELDS}
        endpoint = record.get("endpoint")
        if endpoint is None:
            endpoint = endpoint_of(body)
        elif endpoint not in _ENDPOINTS:
            totals["failed"] += 1
            errors.append({"line": n, "error": f"unknown endpoint {endpoint!r} (one of {', '.join(_ENDPOINTS)})"})
            continue
        if record.get("prompt_tokens") is not None and endpoint in _NO_TEXT:
            # A log without prompt text: the recorded count stands in for the text.
            body.setdefault(*_NO_TEXT[endpoint])
        team = record.get("team") or default_team
        key = record.get("key")
        usage = record.get("usage") if isinstance(record.get("usage"), dict) else {}
        headers = {"authorization": f"Bearer {key}"} if key else {}
        out = await explain(
            runtime,
            body,
            headers=headers,
            team=None if key else team,
            prompt_tokens=record.get("prompt_tokens"),
            output_tokens=usage.get("completion_tokens"),
            endpoint=endpoint,
        )
        if out["decision"] == "rejected":
            if out["error"]["status"] in _UNREPLAYABLE:
                totals["failed"] += 1
                errors.append({"line": n, "error": out["error"]["message"]})
            else:
                totals["rejected"] += 1
            continue
        for row in (totals, by_model[out["model"]], by_team[out["team"] or "-"]):
            row["requests"] += 1
            row["spend_usd"] += out["projected_cost_usd"]
            row["counterfactual_usd"] += out["counterfactual_usd"]
            row["saved_usd"] += out["saved_usd"]
        for policy in out["policies"]:
            by_policy[policy]["requests"] += 1
            by_policy[policy]["spend_usd"] += out["projected_cost_usd"]
            by_policy[policy]["counterfactual_usd"] += out["counterfactual_usd"]
            by_policy[policy]["saved_usd"] += out["saved_by_policy"].get(policy, 0.0)
    return _tidy(
        {
            "totals": totals,
            "by_policy": dict(by_policy),
            "by_model": dict(by_model),
            "by_team": dict(by_team),
            "errors": errors[:100],
        }
    )


def replay_table(report: dict[str, Any]) -> str:
    lines = []
    t = report["totals"]
    lines.append(
        f"requests {t['requests']} (+{t['rejected']} rejected, {t['failed']} failed)  spend ${t['spend_usd']:.6f}  "
        f"without policies ${t['counterfactual_usd']:.6f}  saved ${t['saved_usd']:.6f}"
    )
    for section in ("by_policy", "by_model", "by_team"):
        lines.append("")
        lines.append(f"{section.replace('_', ' '):<24} {'requests':>9} {'spend $':>12} {'saved $':>12}")
        for name, row in sorted(report[section].items()):
            lines.append(f"{name:<24} {row['requests']:>9} {row['spend_usd']:>12.6f} {row['saved_usd']:>12.6f}")
    for e in report["errors"]:
        lines.append(f"line {e['line']}: {e['error']}")
    return "\n".join(lines)
