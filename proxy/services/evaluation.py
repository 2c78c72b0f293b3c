"""Shadow evaluation: what a cost policy keeps of the answers' quality, measured on live traffic off the
client's path, and the `min_quality` floor that stops a policy whose answers are worse.

A sampled request a policy changed (routed, made concise, answered from retrieval) is queued once its
client has the answer. A worker sends the counterfactual (the request as the client sent it, in its own
format: chat, Responses or Messages, to the model it asked for, not streamed and stored nowhere) through
the runtime's dispatcher (which translates it for an upstream that speaks only chat), compares the two
answers (a judge in both orders, or an exact / JSON / final-number check), and records the outcome per
policy, model pair and day in the store. Shadow and judge calls are measurement spend: reserved against
the daily measurement budget before the call, recorded under their own pseudo-team, never against a team.
Prompts and answers live only in the queued job, in memory, until it is judged; nothing here logs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy import metrics
from proxy.config.evaluation import MEASUREMENT_TEAM
from proxy.config.models import PolicyFile
from proxy.errors import ProxyError
from proxy.services.budget_ledger import period_id
from proxy.services.estimator import Estimator
from proxy.services.judging import (
    CHECKS,
    JUDGE_SYSTEM,
    UNJUDGED,
    combine_orders,
    conversation_text,
    judge_messages,
    parse_verdict,
)
from proxy.services.quality import QualityRetained, floor_breached, quality_retained
from proxy.store.base import BudgetScope, JudgementCounts, Store, StoreUnavailable, Usage, to_nano, utc_day
from proxy.upstream.dispatch import Dispatcher, DispatchRequest
from proxy.wire.adapter import Endpoint, WireAdapter
from proxy.wire.chat import CHAT
from proxy.wire.content import user_text
from proxy.wire.formats import BY_ENDPOINT

log = logging.getLogger("llm_proxy.evaluation")

_BUDGET_TTL_S = 3 * 86400
_JUDGE_FRAMING_TOKENS = 64  # the judge prompt's markers and message framing, over its counted parts
# The shadow's own trace while it runs (tracing on), so that its upstream calls are spans under it.
_SHADOW_TRACE: ContextVar[Any] = ContextVar("llm_proxy_shadow_trace", default=None)
# Fields of the client's request a counterfactual call leaves out: it is not streamed nor run in the background
# (a Responses `background`), one answer is compared, and nothing is stored (chat's `store` is off by default;
# a Responses request gets `store: false`, as the API stores by default).
_NOT_SENT = frozenset({"stream", "stream_options", "n", "model", "store", "background"})
# A judged outcome (the policy's side) as the winner of a RouteLLM pairwise label (the policy's answer: `weak`).
WINNER = {"win": "weak", "tie": "tie", "loss": "strong"}


@dataclass(slots=True, eq=False)
class ShadowJob:
    """One sampled request, held in memory until it is judged."""

    policy: str
    compare: str  # judge | exact | json | number
    team: str
    model: str  # what answered under the policy ("retrieval:COLLECTION" for a retrieval hit)
    counterfactual_model: str  # the model the client asked for
    body: dict[str, Any]  # the request as the client sent it, before any policy changed it
    answer: str  # the policy's answer, the text the client received
    trace: Any = None  # the request's RequestTrace when tracing is on: the shadow's trace links to it
    # The team retains prompts (teams.T.retain_prompts): once judged, the user text is kept this long with
    # its outcome, as a label for `router fit --from-store`. None: nothing outlives the job.
    retain_ttl_s: float | None = None
    endpoint: str = Endpoint.CHAT  # the client's format, which `body` is in (chat, Responses or Messages)
    upstream_headers: dict[str, str] = field(default_factory=dict)  # the client's, for a native upstream

    @property
    def pair(self) -> str:
        return f"{self.model} vs {self.counterfactual_model}"


class QualityFloor:
    """The policies of one runtime stopped by their `min_quality` floor: a reload builds a new runtime, and
    with it a floor that has stopped nothing. A stop is shared through the store: every replica whose
    runtime started before it follows it (`adopt`), so a reload anywhere still lifts it there."""

    def __init__(self, policy: PolicyFile, started_at: float | None = None):
        self.floors = {p.name: (p.min_quality, p.min_samples) for p in policy.policies if p.min_quality is not None}
        self.stopped: dict[str, QualityRetained] = {}
        self.started_at = time.time() if started_at is None else started_at
        for name in self.floors:
            metrics.SHADOW_POLICY_STOPPED.labels(name).set(0)

    def judge(self, name: str, quality: QualityRetained) -> bool:
        """Stop `name` when its interval's upper end is below its floor with enough samples; True when this
        judgement stopped it."""
        floor = self.floors.get(name)
        if floor is None or name in self.stopped or not floor_breached(quality, floor[0], floor[1]):
            return False
        self._stop(name, quality, "")
        return True

    def adopt(self, name: str, quality: QualityRetained) -> None:
        """Another replica's floor stopped `name` after this runtime started: stop it here too."""
        if name in self.floors and name not in self.stopped:
            self._stop(name, quality, " (seen by another replica)")

    def _stop(self, name: str, quality: QualityRetained, where: str) -> None:
        self.stopped[name] = quality
        metrics.SHADOW_POLICY_STOPPED.labels(name).set(1)
        log.warning(
            "policy %s stopped%s: quality retained %.3f (95%% interval %.3f-%.3f, n=%d) is below its floor %.3f; "
            "it acts again after a reload",
            name,
            where,
            quality.share,
            quality.low,
            quality.high,
            quality.n,
            self.floors[name][0],
        )


class _Spend:
    """The measurement spend of one evaluation, recorded call by call under the measurement pseudo-team."""

    def __init__(self, store: Store):
        self._store = store
        self.nano = 0

    async def add(self, model: str, kind: str, input_tokens: int, output_tokens: int, cost: float) -> None:
        nano = to_nano(cost)
        self.nano += nano
        metrics.child(metrics.SHADOW_SPEND, model, kind).inc(cost)
        try:
            await self._store.record_usage(Usage(MEASUREMENT_TEAM, model, nano, input_tokens, output_tokens), utc_day())
        except StoreUnavailable as e:
            log.error("could not record measurement spend: %s", e)


class _ShadowFailed(Exception):
    """The counterfactual call gave no answer to compare with."""


class ShadowEvaluator:
    """The shadow evaluation of one runtime: a bounded queue, its workers, the comparisons, the floor."""

    def __init__(self, policy: PolicyFile, dispatcher: Dispatcher, estimator: Estimator, store: Store):
        assert policy.evaluation is not None
        self.cfg = policy.evaluation
        self.shadowed = {p.name: p for p in policy.policies if p.shadow is not None}
        self.floor = QualityFloor(policy)
        self._dispatcher = dispatcher
        self._estimator = estimator
        self._prices = estimator.prices
        self._store = store
        self._default_max_output = policy.server.default_max_output_tokens
        self._limit_nano = to_nano(self.cfg.budget_usd_per_day)
        self._jobs: deque[ShadowJob] = deque()
        self._wake: asyncio.Event | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._retired = False
        self._instruction_tokens: int | None = None
        self._following: asyncio.Task[None] | None = None
        if self.floor.floors:
            with contextlib.suppress(RuntimeError):  # no running loop: only this replica's judgements stop
                self._following = asyncio.get_running_loop().create_task(self._follow_floors())

    # ------------------------------------------------------------------------------------ the queue

    def submit(self, job: ShadowJob) -> bool:
        """Queue a job without waiting; False (and counted) when the queue is full."""
        if self._retired:
            return False
        if len(self._jobs) >= self.cfg.queue:
            metrics.child(metrics.SHADOW_DROPPED, job.policy, "queue_full").inc()
            return False
        self._jobs.append(job)
        metrics.SHADOW_QUEUE_DEPTH.inc()
        if self._wake is None:
            self._wake = asyncio.Event()
            self._workers = [asyncio.create_task(self._work()) for _ in range(self.cfg.workers)]
        self._wake.set()
        return True

    @property
    def waiting(self) -> int:
        return len(self._jobs)

    async def _work(self) -> None:
        assert self._wake is not None
        while True:
            while not self._jobs:
                if self._retired:
                    return
                self._wake.clear()
                await self._wake.wait()
            job = self._jobs.popleft()
            metrics.SHADOW_QUEUE_DEPTH.dec()
            try:
                await (self.evaluate(job) if job.trace is None else self._evaluate_traced(job))
            except Exception:
                # Never the job itself in the log line: it holds the prompt and the answers.
                log.exception("shadow evaluation of policy %s failed", job.policy)

    @property
    def finished(self) -> bool:
        """Retired, and its workers have done the last of its queue."""
        return self._retired and all(t.done() for t in self._workers)

    def retire(self) -> None:
        """A reload replaced this runtime: take no new jobs, finish the queued ones, then stop."""
        self._retired = True
        if self._following is not None:
            self._following.cancel()
        if self._wake is not None:
            self._wake.set()

    async def close(self) -> None:
        """Shutdown: stop the workers now; what is still queued is dropped (counted)."""
        self.retire()
        for job in self._jobs:
            metrics.child(metrics.SHADOW_DROPPED, job.policy, "shutdown").inc()
        metrics.SHADOW_QUEUE_DEPTH.dec(len(self._jobs))
        self._jobs.clear()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    # ------------------------------------------------------------------------------- one evaluation

    def budget_scope(self, now: float | None = None) -> BudgetScope:
        """Today's measurement budget (UTC day)."""
        day = period_id("day", time.time() if now is None else now)
        return BudgetScope(MEASUREMENT_TEAM, "measurement", day, self._limit_nano, _BUDGET_TTL_S)

    def _max_output(self, model: str, wire: WireAdapter, body: dict[str, Any]) -> int:
        return wire.max_output(body) or self._prices.price(model).max_output_tokens or self._default_max_output

    def _judge_instructions(self, judge: str) -> int:
        if self._instruction_tokens is None:
            self._instruction_tokens = self._estimator.counter(judge).text(JUDGE_SYSTEM) + _JUDGE_FRAMING_TOKENS
        return self._instruction_tokens

    async def _evaluate_traced(self, job: ShadowJob) -> str | None:
        attributes = {"llm_proxy.policy": job.policy, "gen_ai.request.model": job.counterfactual_model}
        with job.trace.follow_up(f"shadow {job.policy}", attributes) as trace:
            token = _SHADOW_TRACE.set(trace)
            try:
                outcome = await self.evaluate(job)
            finally:
                _SHADOW_TRACE.reset(token)
            trace.set("llm_proxy.shadow.outcome", outcome or "dropped")
            return outcome

    async def evaluate(self, job: ShadowJob) -> str | None:
        """Run one job: reserve, call, compare, record. The outcome, or None when it was dropped."""
        model, wire = job.counterfactual_model, BY_ENDPOINT[job.endpoint]
        body = counterfactual_body(job)
        request = DispatchRequest(job.endpoint, model, body, model, upstream_headers=job.upstream_headers)
        if not self._dispatcher.speaks(model, job.endpoint):
            # Translated once, as TranslateForUpstream does for a client's request; what no chat upstream can
            # take (a Responses id only its upstream knows, a built-in tool) is not sent nor reserved for.
            try:
                request.chat_body = wire.to_chat(body)
            except ProxyError:
                metrics.child(metrics.SHADOW_DROPPED, job.policy, "untranslatable").inc()
                return None
        prompt_tokens, _ = wire.count_prompt(self._estimator.counter(model), body)
        max_output = self._max_output(model, wire, body)
        request.prompt_tokens, request.max_output_tokens = prompt_tokens, max_output
        worst = self._prices.cost(model, prompt_tokens, max_output)
        question = question_text(wire, job.body)
        if job.compare == "judge":
            judge = self.cfg.judge
            assert judge is not None  # check makes compare: judge need one
            # Each judge call reads the question, both answers (the counterfactual's at most max_output) and
            # the instructions.
            counter = self._estimator.counter(judge)
            judge_prompt = (
                counter.text(question) + counter.text(job.answer) + max_output + self._judge_instructions(judge)
            )
            worst += 2 * self._prices.cost(judge, judge_prompt, self.cfg.judge_max_tokens)
        scope, reserved = self.budget_scope(), to_nano(worst)
        try:
            reservation = await self._store.reserve_budget([scope], reserved)
        except (ProxyError, StoreUnavailable):  # fail_closed and the store is down
            reservation = None
        if reservation is None:
            metrics.child(metrics.SHADOW_DROPPED, job.policy, "store_down").inc()
            return None
        if not reservation.ok:
            metrics.child(metrics.SHADOW_DROPPED, job.policy, "budget").inc()
            return None
        spend = _Spend(self._store)
        try:
            try:
                reference = await self._counterfactual(request, spend)
            except _ShadowFailed:
                metrics.child(metrics.SHADOW_DROPPED, job.policy, "shadow_error").inc()
                return None
            if job.compare == "judge":
                outcome = await self._judged(question, job.answer, reference, spend)
            else:
                outcome = CHECKS[job.compare](job.answer, reference)
        finally:
            try:
                await self._store.settle_budget([scope], reserved, spend.nano)
            except StoreUnavailable as e:
                log.error("could not settle the measurement budget: %s", e)
        metrics.child(metrics.SHADOW_JUDGEMENTS, job.policy, outcome).inc()
        try:
            await self._store.record_judgement(job.policy, job.pair, utc_day(), outcome)
        except StoreUnavailable as e:
            log.error("could not record a judgement of policy %s: %s", job.policy, e)
            return outcome
        if job.retain_ttl_s is not None and outcome in WINNER:
            await self._retain(job, outcome)
        await self.refresh(job.policy)
        return outcome

    async def _retain(self, job: ShadowJob, outcome: str) -> None:
        """Keep a judged sample of a team that retains prompts: a RouteLLM pairwise label (the policy's answer
        is the `weak` one) with the user text a learned router scores."""
        assert job.retain_ttl_s is not None
        prompt = user_text(job.body)
        if not prompt.strip():
            return
        label = {
            "prompt": prompt,
            "winner": WINNER[outcome],
            "model": job.model,
            "counterfactual_model": job.counterfactual_model,
            "compare": job.compare,
            "judged_at": round(time.time(), 3),
        }
        try:
            await self._store.put_label(job.team, job.policy, orjson.dumps(label), job.retain_ttl_s)
        except StoreUnavailable as e:
            log.error("could not keep a label of policy %s: %s", job.policy, e)
            return
        metrics.child(metrics.SHADOW_LABELS, job.policy).inc()

    async def _call(self, call: DispatchRequest) -> tuple[str, int, int]:
        """One call through the dispatcher, bounded by the evaluation's timeout: the text of its reply (in the
        call's format: the dispatcher translates a chat upstream's reply back) and its usage."""
        call.trace = _SHADOW_TRACE.get()
        reply = await asyncio.wait_for(self._dispatcher.send(call), self.cfg.timeout_s)
        wire = BY_ENDPOINT[call.endpoint]
        data = reply.data or {}
        wire.check_reply(data)
        text = wire.reply_text(data)
        if reply.usage is not None:
            return text, reply.usage.input, reply.usage.output
        return text, call.prompt_tokens, self._estimator.counter(call.answered_by or call.model).text(text)

    async def _counterfactual(self, call: DispatchRequest, spend: _Spend) -> str:
        model = call.model
        try:
            text, used_in, used_out = await self._call(call)
        except Exception as e:  # whatever the upstream did, the client's answer is not affected
            log.info("shadow call to %s failed: %s", model, type(e).__name__)
            raise _ShadowFailed from None
        await spend.add(model, "shadow", used_in, used_out, self._prices.cost(model, used_in, used_out))
        if not text.strip():
            raise _ShadowFailed
        return text

    async def _judged(self, question: str, answer: str, reference: str, spend: _Spend) -> str:
        """Two judge calls, the policy's answer first as A then as B, at once."""
        first, second = await asyncio.gather(
            self._verdict(judge_messages(question, answer, reference), spend),
            self._verdict(judge_messages(question, reference, answer), spend),
        )
        return combine_orders(first, second)

    async def _verdict(self, messages: list[dict[str, str]], spend: _Spend) -> str | None:
        judge = self.cfg.judge
        assert judge is not None
        body = {"model": judge, "messages": messages, "max_tokens": self.cfg.judge_max_tokens, "temperature": 0}
        prompt_tokens, _ = CHAT.count_prompt(self._estimator.counter(judge), body)
        call = DispatchRequest(
            Endpoint.CHAT, judge, body, judge, prompt_tokens=prompt_tokens, max_output_tokens=self.cfg.judge_max_tokens
        )
        try:
            text, used_in, used_out = await self._call(call)
        except TimeoutError:
            metrics.child(metrics.SHADOW_JUDGE_ERRORS, judge, "timeout").inc()
            return None
        except Exception:  # an error status, a reply that is not a chat completion, a broken connection
            metrics.child(metrics.SHADOW_JUDGE_ERRORS, judge, "error").inc()
            return None
        await spend.add(judge, "judge", used_in, used_out, self._prices.cost(judge, used_in, used_out))
        verdict = parse_verdict(text)
        if verdict is None:
            metrics.child(metrics.SHADOW_JUDGE_ERRORS, judge, "unparseable").inc()
        return verdict

    # --------------------------------------------------------------------------------- the figures

    def window(self) -> list[str]:
        now = time.time()
        return [utc_day(now - 86400 * i) for i in range(self.cfg.window_days)]

    async def refresh(self, policy: str) -> QualityRetained | None:
        """Re-read a policy's judgements over the floor's window: the gauges, then the floor."""
        try:
            rows = (await self._store.judgements([policy], self.window())).get(policy, {})
        except StoreUnavailable:
            return None
        total = JudgementCounts()
        for counts in rows.values():
            total.add(counts)
        quality = quality_retained(total.win, total.tie, total.loss)
        if quality.n:  # with nothing judged there is no figure to show (not a share of 1.0)
            for bound, value in (("estimate", quality.share), ("low", quality.low), ("high", quality.high)):
                metrics.child(metrics.SHADOW_QUALITY, policy, bound).set(value)
        if self.floor.judge(policy, quality):
            stop = {"at": time.time(), "wins": quality.wins, "ties": quality.ties, "losses": quality.losses}
            try:
                await self._store.put_floor_stop(policy, orjson.dumps(stop), self.cfg.window_days * 86400)
            except StoreUnavailable as e:
                log.error("could not share the stop of policy %s with other replicas: %s", policy, e)
        return quality

    async def _follow_floors(self) -> None:
        """Every `floor_refresh_s`, stop here what another replica's floor stopped after this runtime started."""
        failing = ""
        while True:
            await asyncio.sleep(self.cfg.floor_refresh_s)
            waiting = [name for name in self.floor.floors if name not in self.floor.stopped]
            if not waiting:
                return
            try:
                stops = await self._store.floor_stops(waiting)
                failing = ""
            except StoreUnavailable as e:
                if str(e) != failing:
                    log.warning("quality floors: cannot read the stops of other replicas: %s (retrying)", e)
                failing = str(e)
                continue
            for name, raw in stops.items():
                stop = orjson.loads(raw)
                if stop["at"] >= self.floor.started_at:
                    self.floor.adopt(name, quality_retained(stop["wins"], stop["ties"], stop["losses"]))


def counterfactual_body(job: ShadowJob) -> dict[str, Any]:
    """The request as the client sent it, to the model it asked for, in its format: not streamed, one answer,
    and kept by no upstream."""
    body = {k: v for k, v in job.body.items() if k not in _NOT_SENT}
    body["model"] = job.counterfactual_model
    if job.endpoint == Endpoint.RESPONSES:
        body["store"] = False
    return body


def question_text(wire: WireAdapter, body: dict[str, Any]) -> str:
    """The request as the judge reads it, from its chat form (a Responses request's instructions and input
    items, a Messages request's system and blocks); failing a translation, the user's text."""
    try:
        return conversation_text(wire.to_chat(body))
    except ProxyError:
        return user_text(body)


__all__ = ["UNJUDGED", "QualityFloor", "ShadowEvaluator", "ShadowJob"]
