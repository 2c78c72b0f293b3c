"""The Grafana dashboards in grafana/dashboards/ work: every panel query of every dashboard returns data
from a real Prometheus scraping a real proxy under a load that routes, retrieves, holds out, batches,
spends budgets and fails; and the dashboards' JSON has what Grafana needs to load them.

Prometheus comes from Debian's `prometheus` package: scripts/test installs it; this test installs it
when it is not on PATH (as root) and fails, never skips, when it cannot.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import MASTER_KEY, MockUpstream, Server, free_port, start_proxy, wait_until_serving
from tests.test_metrics_catalog import parse_catalog

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "grafana" / "dashboards"
DATASOURCE_FILE = ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
CATALOG = ROOT / "docs" / "metrics.md"
REQUIRED_DASHBOARDS = {"Overview", "Spend & savings", "Routing & retrieval", "Backends & batching"}

# How the panel queries are run here: "All" for every variable (its allValue), and a rate window that
# spans the whole load (a few seconds of traffic scraped every second).
RATE_WINDOW = "1m"
RANGE = "5m"
GRAFANA_BUILTINS = {"__rate_interval": RATE_WINDOW, "__interval": "5s", "__range": RANGE}
ROUNDS = 3  # load rounds, each one scraped before the next: counters then move between scrapes
POLL_TIMEOUT_S = 30.0

KEYS = {"search": "sk-dash-search", "support": "sk-dash-support"}
FAQ = [
    {"id": "faq-1", "question": "What is the refund window?", "answer": "30 days from delivery."},
    {"id": "faq-2", "question": "How do I reset my password?", "answer": "Use the 'Forgot password' link."},
    {"id": "faq-3", "question": "Which plans include SSO?", "answer": "Business and Enterprise."},
]


# ------------------------------------------------------------------------------------------ dashboards


def load_dashboards() -> dict[str, dict[str, Any]]:
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files, f"no dashboard JSON under {DASHBOARDS}"
    return {f.name: json.loads(f.read_text(encoding="utf-8")) for f in files}


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # panels folded into a collapsed row


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard) if p.get("type") != "row"]


def substitute(expr: str, dashboard: dict[str, Any]) -> str:
    """The query Grafana sends with every variable on "All" (its allValue) and builtins replaced."""
    values = dict(GRAFANA_BUILTINS)
    for var in dashboard["templating"]["list"]:
        values[var["name"]] = var.get("allValue") or ".*"

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise AssertionError(f"{dashboard['title']}: unknown variable ${name} in {expr}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


def _datasource_uid() -> str:
    (ds,) = yaml.safe_load(DATASOURCE_FILE.read_text())["datasources"]
    return ds["uid"]


def test_dashboards_have_what_grafana_needs_to_load_them():
    uid = _datasource_uid()
    dashboards = load_dashboards()
    titles = {d["title"].split(" / ")[-1] for d in dashboards.values()}
    assert titles >= REQUIRED_DASHBOARDS, f"missing dashboards: {REQUIRED_DASHBOARDS - titles}"
    uids = [d["uid"] for d in dashboards.values()]
    assert len(set(uids)) == len(uids), f"dashboard uids repeat: {uids}"
    for name, d in dashboards.items():
        where = f"{name} ({d.get('title')})"
        for field in ("title", "uid", "schemaVersion", "panels", "templating", "time"):
            assert field in d, f"{where}: no {field}"
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", d["uid"]), f"{where}: uid must be 1-40 of [A-Za-z0-9_-]"
        assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36, f"{where}: schemaVersion"
        assert "id" not in d or d["id"] is None, f"{where}: a provisioned dashboard has no numeric id"
        variables = {v["name"]: v for v in d["templating"]["list"]}
        assert "model" in variables, f"{where}: no $model variable"
        for v in variables.values():
            assert v["type"] == "query" and v["datasource"]["uid"] == uid, f"{where}: variable {v['name']}"
            query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            assert re.fullmatch(rf"label_values\(\w+, {v['name']}\)", query), f"{where}: ${v['name']}: {query}"
            assert v.get("includeAll") and v.get("allValue"), f"{where}: ${v['name']} needs an All option"

        ids, used_vars, exprs = set(), set(), []
        for p in all_panels(d):
            assert isinstance(p.get("id"), int) and p["id"] not in ids, f"{where}: panel ids must be unique ints"
            ids.add(p["id"])
            ptitle = f"{where} panel {p.get('title')!r}"
            assert p.get("type") and p.get("title"), f"{ptitle}: needs type and title"
            pos = p.get("gridPos", {})
            assert all(isinstance(pos.get(k), int) for k in "hwxy"), f"{ptitle}: gridPos needs h, w, x, y"
            assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24, f"{ptitle}: gridPos {pos}"
            if p["type"] == "row":
                continue
            assert p.get("datasource", {}).get("uid") == uid, f"{ptitle}: datasource must be uid {uid!r}"
            assert p.get("fieldConfig", {}).get("defaults", {}).get("unit"), f"{ptitle}: no unit"
            targets = p.get("targets") or []
            assert targets, f"{ptitle}: no targets"
            refs = [t.get("refId") for t in targets]
            assert all(refs) and len(set(refs)) == len(refs), f"{ptitle}: refIds {refs}"
            for t in targets:
                assert t.get("datasource", {}).get("uid") == uid, f"{ptitle}: target datasource must be {uid!r}"
                assert t.get("expr"), f"{ptitle}: target {t.get('refId')} has no expr"
                exprs.append(t["expr"])
                used_vars |= set(re.findall(r"\$(\w+)", t["expr"]))
        assert not (set(variables) - used_vars), f"{where}: variables never used: {set(variables) - used_vars}"
        assert {"team", "model"} & used_vars, f"{where}: no panel filters by $team or $model"
        if any("team=~" in e for e in exprs):
            assert "team" in variables, f"{where}: filters by team without a $team variable"

    units = {
        p["fieldConfig"]["defaults"]["unit"] for d in dashboards.values() for p in query_panels(d) if "fieldConfig" in p
    }
    assert {"currencyUSD", "s", "short"} <= units, f"units in use: {units}"


def test_dashboards_query_only_metrics_the_catalog_lists():
    documented = parse_catalog(CATALOG.read_text(encoding="utf-8"))
    labels = set().union(*(row.labels for row in documented.values()))
    for name, d in load_dashboards().items():
        for p in query_panels(d):
            for t in p["targets"]:
                for metric in set(re.findall(r"\b((?:llm_proxy|gen_ai)_\w+)", t["expr"])) - labels:
                    base = re.sub(r"_(bucket|sum|count)$", "", metric)
                    assert metric in documented or base in documented, (
                        f"{name} panel {p['title']!r} queries {metric}, which docs/metrics.md does not list"
                    )


# ---------------------------------------------------------------------------------------- prometheus


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found:
        return found
    how = "install Debian's package: apt-get install -y prometheus (scripts/test does)"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.fail(f"prometheus is not on PATH and this user cannot install it; {how}")
    if shutil.which("apt-get") is None:
        pytest.fail(f"prometheus is not on PATH and there is no apt-get; {how}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "prometheus"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed with {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    found = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if not found:
        pytest.fail(f"apt-get installed prometheus but no prometheus binary is on PATH; {how}")
    return found


class Prometheus:
    """Our own Prometheus on a free loopback port (the Debian package's system service is not used)."""

    def __init__(self, binary: str, target: str, tmp: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {"job_name": "llm-numbers-proxy", "static_configs": [{"targets": [target]}]},
                    ],
                }
            )
        )
        self.log_path = tmp / "prometheus.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until_serving(self.url + "/-/ready", self.proc)
        except Exception as e:
            self.stop()
            raise RuntimeError(f"Prometheus did not start: {e}\n{self.log_path.read_text()}") from e

    def query(self, expr: str) -> dict[str, Any]:
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus rejected {expr}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def scalar(self, expr: str) -> float | None:
        data = self.query(expr)
        result = data["result"]
        if data["resultType"] == "scalar":
            return float(result[1])
        return float(result[0]["value"][1]) if result else None

    def label_values(self, label: str, metric: str) -> list[str]:
        r = httpx.get(self.url + f"/api/v1/label/{label}/values", params={"match[]": metric}, timeout=10)
        return r.json()["data"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def poll(what: str, check: Callable[[], bool], timeout: float = POLL_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)  # polling Prometheus's API: it has no event to wait on


# -------------------------------------------------------------------------------------------- load


def _policy(mock_url: str) -> str:
    up = f"api_base: {mock_url}/v1"
    return textwrap.dedent(
        f"""\
        version: 1
        retries: {{max_attempts: 2, max_total_s: 5, initial_backoff_s: 0.01, max_backoff_s: 0.02}}
        models:
          big:
            {up}
            upstream_model: dash-big
            price: {{input_per_mtok: 2.5, output_per_mtok: 10}}
          small:
            {up}
            upstream_model: dash-small
            price: {{input_per_mtok: 0.15, output_per_mtok: 0.6}}
          flaky:
            {up}
            upstream_model: dash-flaky
            price: {{input_per_mtok: 1, output_per_mtok: 2}}
            fallbacks: [small]
          embed:
            {up}
            upstream_model: dash-embed
            mode: embedding
            price: {{input_per_mtok: 0.02}}
          local-llm:
            {up}
            upstream_model: dash-local
            price: {{input_per_mtok: 0.05, output_per_mtok: 0.05}}
            batching: {{mode: batch_endpoint, max_batch_size: 16, max_wait_ms: 5}}
        teams:
          search:
            keys: [{KEYS["search"]}]
            budget: {{usd: 50, period: day}}
          support:
            keys: [{KEYS["support"]}]
            models: [small]
            budget: {{usd: 0.0005, period: day}}
            limits: {{rpm: 4}}
        evaluation: {{judge: small, budget_usd_per_day: 5, workers: 2}}
        tasks:
          summarize: {{patterns: ["(?i)summari[sz]e"]}}
        collections:
          faq: {{kind: kb, embedder: embed}}
        policies:
          - name: faq
            when: {{teams: [search], models: [big]}}
            retrieve: {{collection: faq, min_similarity: 0.9}}
          - name: cheap-summaries
            when: {{task: summarize}}
            route: {{to: small, min_cost_multiple: 10}}
          - name: be-concise
            when: {{models: [small]}}
            concise: {{instruction: "Be concise.", holdout: 0.5, min_samples: 2}}
            shadow: {{rate: 1.0}}  # judged by small: no fault of the load touches its upstream model
            min_quality: 0.5
            min_samples: 1000  # a floor the load never reaches: the panel shows it did not stop
        """
    )


def _chat(proxy: Server, team: str | None, model: str, text: str, **extra: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEYS[team] if team else 'sk-not-a-key'}"}
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 64, **extra}
    return httpx.post(proxy.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)


def _round(proxy: Server, mock: MockUpstream, n: int) -> None:
    """One round of traffic touching every panel's metrics; asserts each request did what it is for."""

    def expect(r: httpx.Response, status: int, route: str | None = None) -> None:
        assert r.status_code == status, f"{r.request.content[:200]!r} -> {r.status_code} {r.text[:300]}"
        if route is not None:
            assert r.headers["x-llm-proxy-route"] == route, dict(r.headers)

    # retrieval: exact hits, and near questions that are searched (similarity) and go upstream
    for entry in FAQ:
        expect(_chat(proxy, "search", "big", entry["question"]), 200, "retrieval")
    for i in range(3):
        expect(_chat(proxy, "search", "big", f"Round {n}: what about question {i} of the faq?"), 200, "upstream")
    # routing by cost multiple (big -> small), then conciseness with a 50% hold-out on small
    for i in range(4):
        r = _chat(proxy, "search", "big", f"Summarize round {n} item {i}: the quarterly numbers went up.")
        expect(r, 200, "upstream")
        assert r.headers["x-llm-proxy-model"] == "small"
    for i in range(8):
        expect(_chat(proxy, "search", "small", f"Round {n}, question {i}: explain token pricing."), 200, "upstream")
    # streaming (time to first chunk)
    for i in range(2):
        r = _chat(proxy, "search", "small", f"Stream {n}.{i}", stream=True, stream_options={"include_usage": True})
        expect(r, 200)
    # micro-batching: concurrent requests to a batched model
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: _chat(proxy, "search", "local-llm", f"Batch {n}.{i}"), range(8)))
    for r in results:
        expect(r, 200, "batch")
    # upstream failures: retried, then a fallback (flaky -> small); retried, then a 5xx to the client
    mock.fault(status=500, model="dash-flaky", count=2)
    expect(_chat(proxy, "search", "flaky", f"Fallback {n}"), 200)
    mock.fault(status=503, model="dash-big", count=2)
    assert _chat(proxy, "search", "big", f"Fails {n}").status_code >= 500
    # client errors: an unknown model, a bad key; a budget refusal and rate-limit refusals
    expect(_chat(proxy, "search", "no-such-model", "hi"), 404)
    expect(_chat(proxy, None, "small", "hi"), 401)
    assert _chat(proxy, "support", "small", "hi", max_tokens=4000).status_code == 429  # budget
    statuses = [_chat(proxy, "support", "small", f"Support {n}.{i}", max_tokens=8).status_code for i in range(5)]
    assert 429 in statuses, statuses  # rpm


def _metric_total(proxy: Server, name: str) -> float:
    total = 0.0
    for line in httpx.get(proxy.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith((name + "{", name + " ")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _requests_total(proxy: Server) -> float:
    return _metric_total(proxy, "llm_proxy_requests_total")


@dataclass
class Stack:
    proxy: Server
    prometheus: Prometheus


@pytest.fixture(scope="module")
def stack(session_tmp: Path, mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary = prometheus_binary()
    started = time.monotonic()
    mock_upstream.reset()
    mock_upstream.configure(judge="tie")
    proxy = start_proxy(session_tmp, _policy(mock_upstream.url))
    prometheus = None
    try:
        prometheus = Prometheus(binary, f"127.0.0.1:{proxy.port}", tmp_path_factory.mktemp("prometheus"))
        poll("Prometheus to scrape the proxy", lambda: prometheus.scalar('up{job="llm-numbers-proxy"}') == 1)
        admin = {"Authorization": f"Bearer {MASTER_KEY}"}
        r = httpx.post(proxy.url + "/admin/reload", headers=admin, timeout=30)
        assert r.status_code == 200, r.text
        r = httpx.post(proxy.url + "/admin/kb/faq", json={"entries": FAQ}, headers=admin, timeout=30)
        assert r.status_code == 200, r.text
        for n in range(ROUNDS):
            _round(proxy, mock_upstream, n)
            expected = _requests_total(proxy)
            poll(
                f"Prometheus to scrape round {n} ({expected:.0f} requests)",
                lambda expected=expected: prometheus.scalar("sum(llm_proxy_requests_total)") == expected,
            )

        # The shadow comparisons run after their requests: wait until the last is judged and scraped.
        def queued() -> float:
            return _metric_total(proxy, "llm_proxy_shadow_queue_depth")

        def judged() -> float:
            return _metric_total(proxy, "llm_proxy_shadow_judgements_total")

        poll("the shadow queue to drain", lambda: judged() > 0 and queued() == 0)
        poll(
            "Prometheus to scrape the judgements",
            lambda: prometheus.scalar("sum(llm_proxy_shadow_judgements_total)") == judged(),
        )
        # One more scrape: every series, even one born in the last round, then has two samples for rate().
        scraped = time.time()
        poll(
            "one more scrape of the proxy",
            lambda: (prometheus.scalar('timestamp(up{job="llm-numbers-proxy"})') or 0) > scraped,
        )
        print(f"load and scrapes took {time.monotonic() - started:.1f}s")
        yield Stack(proxy, prometheus)
    finally:
        if prometheus is not None:
            prometheus.stop()
        proxy.stop()
        mock_upstream.reset()


def _values(data: dict[str, Any]) -> list[float]:
    if data["resultType"] == "scalar":
        return [float(data["result"][1])]
    if data["resultType"] == "vector":
        return [float(s["value"][1]) for s in data["result"]]
    return [float(v[1]) for s in data["result"] for v in s["values"]]


def test_every_panel_query_of_every_dashboard_returns_data_from_prometheus(stack: Stack):
    checked, problems = 0, []
    for name, d in load_dashboards().items():
        for p in query_panels(d):
            for t in p["targets"]:
                expr = substitute(t["expr"], d)
                where = f"{name} / {p['title']} / {t['refId']}"
                try:
                    data = stack.prometheus.query(expr)
                except AssertionError as e:
                    problems.append(f"{where}: {e}")
                    continue
                values = _values(data)
                checked += 1
                if not values:
                    problems.append(f"{where}: empty result for {expr}")
                elif not any(math.isfinite(v) for v in values):
                    problems.append(f"{where}: no finite value ({values[:5]}) for {expr}")
    assert not problems, f"{len(problems)} of {checked} panel queries failed:\n  " + "\n  ".join(problems)
    assert checked >= 40, f"only {checked} panel queries: the dashboards lost panels"
    print(f"{checked} panel queries returned data")


def test_every_dashboard_variable_has_values_in_prometheus(stack: Stack):
    for name, d in load_dashboards().items():
        for v in d["templating"]["list"]:
            query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", query).groups()
            values = stack.prometheus.label_values(label, metric)
            assert values, f"{name}: ${v['name']} ({query}) has no values"
    teams = stack.prometheus.label_values("team", "llm_proxy_requests_total")
    assert {"search", "support"} <= set(teams), teams


def _panel_result(stack: Stack, title: str, ref: str = "A") -> list[dict[str, Any]]:
    for d in load_dashboards().values():
        for p in query_panels(d):
            if p["title"] == title:
                (target,) = [t for t in p["targets"] if t["refId"] == ref]
                return stack.prometheus.query(substitute(target["expr"], d))["result"]
    raise AssertionError(f"no panel {title!r}")


def test_panels_show_what_the_load_did(stack: Stack):
    routes = {s["metric"]["route"] for s in _panel_result(stack, "Route mix")}
    assert routes == {"upstream", "retrieval", "batch"}, routes
    reloads = {
        s["metric"].get("result"): float(s["value"][1])
        for s in _panel_result(stack, "Policy reloads and spend journal")
    }
    assert reloads.get("success", 0) >= 1, reloads
    (saving,) = _panel_result(stack, "Realised conciseness saving")
    assert 0.2 < float(saving["value"][1]) < 0.8, saving  # the mock halves replies asked to be concise
    saved_by = {s["metric"]["policy"] for s in _panel_result(stack, "Saved by policy (USD/hour)")}
    assert {"faq", "cheap-summaries", "be-concise"} <= saved_by, saved_by
    quality = {
        s["metric"]["policy"]: float(s["value"][1])
        for s in _panel_result(stack, "Saving vs quality retained per policy", "B")
    }
    assert quality == {"be-concise": 1.0}, quality  # the mock's judge calls every pair a tie
    (hit_rate,) = _panel_result(stack, "Retrieval hit rate")
    assert float(hit_rate["value"][1]) > 0, hit_rate
    refused = {s["metric"]["reason"] for s in _panel_result(stack, "Refused by limits and budgets")}
    assert {"budget", "rpm"} <= refused, refused
    kinds = {
        (s["metric"]["model"], s["metric"]["kind"]) for s in _panel_result(stack, "Upstream errors by model and kind")
    }
    assert {("flaky", "5xx"), ("big", "5xx")} <= kinds, kinds
