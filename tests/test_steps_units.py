"""Each pipeline step is a unit over a RequestContext: built from services, its hooks run in process,
with no server, no upstream and the embedded store. And the layering rules of the package hold."""

from __future__ import annotations

import ast
import asyncio
import secrets
import time
from pathlib import Path

import orjson
import pytest

from proxy.config import parse_policy_text
from proxy.errors import BudgetExceeded, InvalidRequest, ProxyError, RateLimited, Unauthorized
from proxy.pipeline.context import RequestContext
from proxy.pipeline.runtime import Runtime
from proxy.pipeline.step import Pipeline, Step
from proxy.services.keyring import hash_key
from proxy.steps.accounting import RecordUsage
from proxy.steps.auth import Authenticate
from proxy.steps.budget import EnforceBudget
from proxy.steps.count_tokens import CountTokens
from proxy.steps.limits import EnforceRateLimits
from proxy.steps.validate import ValidateRequest
from proxy.store.memory import MemoryStore
from proxy.upstream.reply import UpstreamReply
from proxy.wire.chat import CHAT
from proxy.wire.usage import TokenUsage

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-unit-test"
POLICY = f"""\
version: 1
models:
  big: {{api_base: "http://127.0.0.1:9/v1", price: {{input_per_mtok: 10, output_per_mtok: 30}}}}
  small: {{api_base: "http://127.0.0.1:9/v1", price: {{input_per_mtok: 0.1, output_per_mtok: 0.3}}}}
teams:
  unit:
    keys: ["{hash_key(KEY)}"]
    models: [big, small]
    budget: {{usd: 0.01, period: day}}
    limits: {{rpm: 2, tpm: 100000}}
policies:
  - name: be-concise
    when: {{models: [big]}}
    concise: {{holdout: 0}}
  - name: to-small
    when: {{headers: {{x-cheap: "1"}}}}
    route: {{to: small, min_cost_multiple: 10}}
"""


def _runtime() -> Runtime:
    return Runtime(parse_policy_text(POLICY), MemoryStore(), None)


def _ctx(body: dict, headers: dict | None = None) -> RequestContext:
    ctx = RequestContext(
        request_id=secrets.token_hex(12),
        endpoint=CHAT.endpoint,
        headers={"authorization": f"Bearer {KEY}", **(headers or {})},
        wire=CHAT,
    )
    ctx.raw = orjson.dumps(body)
    return ctx


def _chat(content: str = "What is the capital of France?", **extra) -> dict:
    return {"model": "big", "messages": [{"role": "user", "content": content}], **extra}


def _step(runtime: Runtime, cls: type) -> Step:
    return next(s for s in runtime.pipeline.steps if isinstance(s, cls))


def test_every_step_is_a_step_and_says_what_it_does():
    runtime = _runtime()
    described = runtime.pipeline.describe()
    assert [d["step"] for d in described][:6] == [
        "Authenticate",
        "ValidateRequest",
        "ResolveModel",
        "KeepConversation",
        "CountTokens",
        "EnforceRateLimits",
    ]
    for step, d in zip(runtime.pipeline.steps, described, strict=True):
        assert isinstance(step, Step)
        assert d["hooks"], f"{d['step']} acts in no phase"
        assert d["does"], f"{d['step']} has no docstring"
    # The conciseness action measures its arms after the answer: it is a step of its own, after the engine.
    names = [d["step"] for d in described]
    assert names.index("be-concise") == names.index("ApplyPolicies") + 1


async def test_authenticate_resolves_the_team_or_refuses():
    auth = Authenticate(_runtime().keyring)
    ctx = _ctx(_chat())
    await auth.on_request(ctx)
    assert ctx.team == "unit" and ctx.key_id == hash_key(KEY)[7:19]
    bad = _ctx(_chat(), {"authorization": "Bearer sk-nope"})
    with pytest.raises(Unauthorized):
        await auth.on_request(bad)


async def test_validate_uses_the_wire_format_of_the_request():
    step = ValidateRequest()
    ctx = _ctx({"model": "big", "messages": []})
    with pytest.raises(InvalidRequest) as e:
        await step.on_request(ctx)
    assert e.value.param == "messages"
    ok = _ctx(_chat(stream=True, stream_options={"include_usage": True}))
    await step.on_request(ok)
    assert ok.model == ok.model_requested == "big" and ok.stream and ok.include_usage


async def test_count_tokens_prices_the_worst_case_then_takes_reported_or_counted_usage():
    runtime = _runtime()
    step = _step(runtime, CountTokens)
    ctx = _ctx(_chat(max_tokens=100))
    await ValidateRequest().on_request(ctx)
    await step.on_request(ctx)
    assert ctx.prompt_tokens > 0 and ctx.max_output_tokens == 100
    assert ctx.cost_estimate == pytest.approx((ctx.prompt_tokens * 10 + 100 * 30) / 1e6)
    ctx.reply = UpstreamReply({"choices": [{"message": {"content": "Paris."}}]}, b"", TokenUsage(12, 3))
    await step.on_response(ctx)
    assert (ctx.input_tokens, ctx.output_tokens, ctx.usage.counted) == (12, 3, False)
    ctx.reply = UpstreamReply({"choices": [{"message": {"content": "Paris is the capital."}}]}, b"")
    await step.on_response(ctx)
    assert ctx.usage.counted and ctx.input_tokens == ctx.prompt_tokens and ctx.output_tokens >= 4


async def _through_request_phase(runtime: Runtime, ctx: RequestContext) -> None:
    await runtime.pipeline.run_request(ctx)


async def test_rate_limits_count_and_refuse_past_the_limit():
    runtime = _runtime()
    limits = _step(runtime, EnforceRateLimits)
    for _ in range(2):
        ctx = _ctx(_chat())
        for step in runtime.pipeline.steps[:4]:
            await step.on_request(ctx)
        await limits.on_request(ctx)
        assert ctx.limits.windows
        ctx.sent_upstream = True  # counted for good: it reached the upstream
    third = _ctx(_chat())
    for step in runtime.pipeline.steps[:4]:
        await step.on_request(third)
    with pytest.raises(RateLimited):
        await limits.on_request(third)


async def test_budget_reserves_the_worst_case_and_settles_the_real_cost():
    runtime = _runtime()
    budget = _step(runtime, EnforceBudget)
    ctx = _ctx(_chat(max_tokens=100))
    await runtime.pipeline.run_request(ctx)
    assert ctx.budget.scopes and ctx.budget.reserved_nano > 0
    ctx.cost = 0.0001
    await budget.on_settle(ctx)
    (spent, reserved), *_ = await runtime.ledger.store.budget_usage(ctx.budget.scopes)
    assert (spent, reserved) == (100_000, 0)
    too_big = _ctx(_chat(max_tokens=1_000_000))
    with pytest.raises(BudgetExceeded):
        await runtime.pipeline.run_request(too_big)


async def test_route_and_concise_apply_through_the_policy_engine():
    runtime = _runtime()
    ctx = _ctx(_chat(max_tokens=50), {"x-cheap": "1"})
    await runtime.pipeline.run_request(ctx)
    assert ctx.model == "small" and ctx.policies == ["be-concise", "to-small"]  # in the order of the file
    big = _ctx(_chat(max_tokens=50))
    await runtime.pipeline.run_request(big)
    assert big.policies == ["be-concise"] and big.experiments == {"be-concise": "treated"}
    assert big.body["messages"][0]["role"] == "system"


async def test_record_usage_prices_the_usage_and_the_saving_of_a_route():
    runtime = _runtime()
    ctx = _ctx(_chat(max_tokens=50), {"x-cheap": "1"})
    await runtime.pipeline.run_request(ctx)
    ctx.answered_by = "small"
    ctx.usage = TokenUsage(1000, 100)
    await _step(runtime, RecordUsage).on_response(ctx)
    assert ctx.cost == pytest.approx((1000 * 0.1 + 100 * 0.3) / 1e6)
    assert ctx.saved_by_policy["to-small"] == pytest.approx((1000 * 10 + 100 * 30) / 1e6 - ctx.cost)


def test_a_pipeline_runs_only_the_hooks_a_step_overrides():
    calls: list[str] = []

    class OnlySettles(Step):
        """Records its settle."""

        async def on_settle(self, ctx: RequestContext) -> None:
            calls.append("settle")

    pipeline = Pipeline([OnlySettles()], concurrent_settle=False)
    ctx = _ctx(_chat())
    asyncio.run(pipeline.run_request(ctx))
    asyncio.run(pipeline.run_settle(ctx))
    assert calls == ["settle"]
    assert pipeline.describe() == [{"step": "OnlySettles", "hooks": ["on_settle"], "does": "Records its settle."}]


def _imports() -> dict[str, set[str]]:
    mods: dict[str, set[str]] = {}
    for f in (ROOT / "proxy").rglob("*.py"):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        deps: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("proxy"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("proxy"))
        mods[name] = deps
    return mods


def test_no_step_imports_another_step_and_no_import_circle():
    mods = _imports()
    for m, deps in mods.items():
        if m.startswith("proxy.steps."):
            assert not {d for d in deps if d.startswith("proxy.steps.")}, f"{m} imports another step"
    # Test doubles, wire formats and the store never reach up into the pipeline or the HTTP surface.
    for m, deps in mods.items():
        if m.startswith(
            ("proxy.fakes", "proxy.wire", "proxy.store", "proxy.config", "proxy.upstream", "proxy.retrieval")
        ):
            up = {d for d in deps if d.startswith(("proxy.pipeline", "proxy.http", "proxy.steps", "proxy.app"))}
            assert not up, f"{m} imports from a layer above it: {sorted(up)}"
    seen: set[str] = set()
    stack: list[str] = []

    def visit(m: str) -> None:
        assert m not in stack, "import circle: " + " -> ".join([*stack[stack.index(m) :], m])
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in sorted(mods.get(m, ())):
            if d in mods:
                visit(d)
        stack.pop()

    for m in sorted(mods):
        visit(m)


async def test_a_refused_request_changes_no_state():
    runtime = _runtime()
    ctx = _ctx({"model": "big", "messages": "not a list"})
    with pytest.raises(ProxyError):
        await runtime.pipeline.run_request(ctx)
    await runtime.pipeline.run_settle(ctx)
    assert ctx.budget is None and ctx.limits is None
    scopes = [s for s, _ in runtime.ledger.scopes("unit", hash_key(KEY)[7:19], time.time())]
    assert await runtime.ledger.store.budget_usage(scopes) == [(0, 0)]


async def test_embeddings_made_for_a_request_count_in_its_limits_and_budget():
    """An embedding the proxy made to decide a request (a retrieval miss, a task match) passes through the
    same limits and accounting as the request: its tokens join the team's tpm window, its cost the budget."""
    from proxy.retrieval.embedders import EmbeddingCall, RequestEmbeddings
    from proxy.store.base import LimitWindow

    runtime = _runtime()
    ctx = _ctx(_chat(max_tokens=50))
    await runtime.pipeline.run_request(ctx)
    ctx.sent_upstream = True
    ctx.answered_by = ctx.model
    ctx.embeddings = RequestEmbeddings(calls=[EmbeddingCall("embedder", 700, 0.0002)])
    ctx.reply = UpstreamReply({"choices": []}, b"", TokenUsage(ctx.prompt_tokens, 40))
    await runtime.pipeline.run_response(ctx)
    await runtime.pipeline.run_settle(ctx)
    store = runtime.ledger.store
    seen = await store.hit_limits([LimitWindow("unit", "team:tpm", 100000, 0)], time.time())
    counted_on_arrival = next(w.cost for w in ctx.limits.windows if w.name == "team:tpm")  # before conciseness
    assert seen.used == (counted_on_arrival + 40 + 700,)
    (spent, reserved), *_ = await store.budget_usage(ctx.budget.scopes)
    assert reserved == 0 and spent == round((ctx.cost + 0.0002) * 1e9)
