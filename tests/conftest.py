"""Shared fixtures: real servers on loopback (the proxy and the mock upstream as subprocesses), a real
Redis with a per-run key prefix, and the official openai SDK as the client."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "tests" / "node"  # the Node clients (tests/node/package.json)
REDIS_URL = os.environ.get("LLM_PROXY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
MASTER_KEY = "sk-master-test"
TEAM_KEYS = {"alpha": "sk-alpha-test", "beta": "sk-beta-test"}
# How long a server may take to answer after it was spawned. Generous: on a busy 2-core machine a proxy that
# imports litellm has been seen to need more than 30 s. A server that exits is reported at once, whatever this is.
START_TIMEOUT_S = float(os.environ.get("LLM_PROXY_TEST_START_TIMEOUT", "120"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerExited(RuntimeError):
    """The server process ended before it served: starting it again would fail the same way."""


def wait_until_serving(url: str, proc: subprocess.Popen, timeout: float | None = None) -> None:
    timeout = START_TIMEOUT_S if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise ServerExited(f"server exited with {proc.returncode}:\n{out}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)  # polling a port that is not open yet; there is no event to wait on
    raise TimeoutError(f"{url} did not answer within {timeout}s (LLM_PROXY_TEST_START_TIMEOUT)")


def wait_for(condition, what: str = "the condition", timeout: float = 60.0):
    """Poll until `condition()` returns something truthy and return it (state that changes in another
    process: there is no event to wait on)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path):
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def launch_process(args: list[str], port: int, tmp: Path, env: dict[str, str] | None = None) -> Server:
    """Start `llm-numbers-proxy ARGS` without waiting for it to serve (several can then start together)."""
    log_path = tmp / f"server-{port}.log"
    # A proxy uses Redis only when a test says so, whatever the calling shell has set.
    full_env = {k: v for k, v in os.environ.items() if k != "LLM_PROXY_REDIS_URL"}
    full_env.update(env or {})
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", *args], cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT
        )
    return Server(proc, port, log_path)


def _serving(launch: Callable[[], Server], health_path: str, what: str) -> Server:
    """Launch a server and wait for it to answer `health_path`. A start that timed out (a busy machine) or lost
    its port to another process is tried once more on a new port; the error carries the cause and the server's
    own output."""
    for attempt in (1, 2):
        server = launch()
        try:
            wait_until_serving(server.url + health_path, server.proc)
            return server
        except TimeoutError as e:
            server.stop()
            if attempt == 2:
                raise RuntimeError(f"could not start {what} (twice):\n{server.log()}") from e
        except ServerExited as e:
            server.stop()
            # free_port() leaves a moment between finding a port and the server binding it
            if attempt == 2 or "address already in use" not in server.log().lower():
                raise RuntimeError(f"could not start {what}:\n{server.log()}") from e
        except BaseException:
            server.stop()
            raise
    raise AssertionError("unreachable")


def start_process(args: list[str], port: int, health_path: str, tmp: Path, env: dict[str, str] | None = None) -> Server:
    """Start `llm-numbers-proxy ARGS` on `port` and wait until it serves (a fixed port: no second try elsewhere)."""
    server = launch_process(args, port, tmp, env)
    try:
        wait_until_serving(server.url + health_path, server.proc)
    except Exception as e:
        server.stop()
        raise RuntimeError(f"could not start {args}:\n{server.log()}") from e
    return server


class MockUpstream(Server):
    def reset(self) -> None:
        httpx.post(self.url + "/mock/reset").raise_for_status()
        self.configure(
            reply_tokens=32,
            usage=True,
            latency_ms=0,
            chunk_delay_ms=0,
            concise_ratio=0.5,
            length_jitter=0,
            judge=None,
            judge_only_on=None,
            reply_tokens_by_model={},
            scripted=[],
        )

    def configure(self, **cfg) -> None:
        httpx.post(self.url + "/mock/config", json=cfg).raise_for_status()

    def fault(self, **fault) -> None:
        httpx.post(self.url + "/mock/faults", json=fault).raise_for_status()

    def stats(self) -> dict:
        return httpx.get(self.url + "/mock/stats").json()

    def calls(self, path: str = "/v1/chat/completions") -> int:
        return self.stats()["calls"].get(path, 0)


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


def start_mock_upstream(tmp: Path, *args: str) -> MockUpstream:
    def launch() -> Server:
        port = free_port()
        return launch_process(["mock-upstream", "--port", str(port), *args], port, tmp)

    server = _serving(launch, "/v1/models", "the mock upstream")
    return MockUpstream(server.proc, server.port, server.log_path)


class SharedServer:
    """A server many tests share, started when the first of them needs it. A failed start fails that test
    (with the server's output) and the next test tries again, so one slow start does not error every test
    after it; after two failed starts the rest fail at once with the first failure."""

    def __init__(self, start: Callable[[], Server]):
        self._start = start
        self._server: Server | None = None
        self._failures: list[str] = []

    def get(self) -> Server:
        if self._server is None:
            if len(self._failures) >= 2:
                pytest.fail(f"the shared server failed to start twice; the first time:\n{self._failures[0]}")
            try:
                self._server = self._start()
            except RuntimeError as e:
                self._failures.append(f"{e}\ncaused by: {e.__cause__!r}")
                raise
        return self._server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()


@pytest.fixture(scope="session")
def mock_upstream(session_tmp: Path) -> Iterator[MockUpstream]:
    mock = start_mock_upstream(session_tmp)
    yield mock
    mock.stop()


@pytest.fixture
def mock(mock_upstream: MockUpstream) -> MockUpstream:
    mock_upstream.reset()
    return mock_upstream


_LITELLM_MODEL = """\
  claude:
    provider: anthropic
    api_base: {mock_url}
    api_key: test-anthropic-key
    upstream_model: claude-3-5-haiku-20241022
    price: {{input_per_mtok: 0.8, output_per_mtok: 4}}
"""


def policy_yaml(mock_url: str, extra: str = "", *, litellm: bool = False) -> str:
    """A policy for tests: cheap/expensive models on the mock upstream, two teams. With `litellm`, also a model
    behind litellm (`claude`): a proxy then imports litellm at start, seconds of CPU, so only where a test needs it."""
    claude = _LITELLM_MODEL.format(mock_url=mock_url) if litellm else ""
    return (
        textwrap.dedent(
            f"""\
        version: 1
        server:
          max_body_bytes: 65536
        retries:
          max_attempts: 3
          max_total_s: 10
          initial_backoff_s: 0.01
          max_backoff_s: 0.05
          max_retry_after_s: 2
        models:
          big:
            api_base: {mock_url}/v1
            upstream_model: mock-big
            price: {{input_per_mtok: 2.5, output_per_mtok: 10}}
            max_input_tokens: 2000
          small:
            api_base: {mock_url}/v1
            upstream_model: mock-small
            price: {{input_per_mtok: 0.15, output_per_mtok: 0.6}}
          flaky:
            api_base: {mock_url}/v1
            upstream_model: mock-flaky
            price: {{input_per_mtok: 1, output_per_mtok: 2}}
            fallbacks: [small]
            timeout_s: 1
          nousage:
            api_base: {mock_url}/v1
            upstream_model: mock-nousage
            price: {{input_per_mtok: 1, output_per_mtok: 2}}
            stream_usage: false
          embed:
            api_base: {mock_url}/v1
            upstream_model: mock-embed
            mode: embedding
            price: {{input_per_mtok: 0.02}}
        """
        )
        + claude
        + textwrap.dedent(
            f"""\
        teams:
          alpha:
            keys: [{TEAM_KEYS["alpha"]}]
            models: ["*"]
          beta:
            keys: [sha256:{__import__("hashlib").sha256(TEAM_KEYS["beta"].encode()).hexdigest()}]
            models: [small, embed]
        """
        )
        + textwrap.dedent(extra)
    )


def launch_proxy(tmp: Path, policy: str, redis_url: str | None = None, env: dict[str, str] | None = None) -> Server:
    """A proxy on `policy` (written next to its log), started but not yet waited for."""
    port = free_port()
    config = tmp / f"policy-{port}.yaml"
    config.write_text(policy)
    full_env = {"LLM_PROXY_MASTER_KEY": MASTER_KEY, **(env or {})}
    if redis_url:
        full_env["LLM_PROXY_REDIS_URL"] = redis_url
    args = ["serve", "--config", str(config), "--port", str(port), "--log-level", "warning"]
    return launch_process(args, port, tmp, full_env)


def start_proxy(tmp: Path, policy: str, redis_url: str | None = None, env: dict[str, str] | None = None) -> Server:
    """A proxy on `policy`, serving (tried twice when a start times out; errors carry the proxy's log)."""
    return _serving(lambda: launch_proxy(tmp, policy, redis_url, env), "/healthz", "a proxy")


@pytest.fixture(scope="session")
def _shared_proxy(session_tmp: Path, mock_upstream: MockUpstream) -> Iterator[SharedServer]:
    shared = SharedServer(lambda: start_proxy(session_tmp, policy_yaml(mock_upstream.url, litellm=True)))
    yield shared
    shared.stop()


@pytest.fixture
def proxy(_shared_proxy: SharedServer) -> Server:
    """The proxy most tests share (memory store, the test policy with a litellm model)."""
    return _shared_proxy.get()


def delete_redis_keys(prefix: str, url: str = REDIS_URL) -> None:
    """Delete every key starting with `prefix` (from the shared Redis unless `url` names another)."""
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(f"{prefix}*", count=1000):
        client.delete(key)
    client.close()


@contextlib.contextmanager
def private_redis_keys(prefix: str) -> Iterator[str]:
    """Keys of this test's own on the shared Redis: every key starting with `prefix` is deleted after."""
    try:
        yield prefix
    finally:
        delete_redis_keys(prefix)


@pytest.fixture(scope="session")
def redis_prefix() -> Iterator[str]:
    with private_redis_keys(f"llmptest{uuid.uuid4().hex[:8]}") as prefix:
        yield prefix


@pytest.fixture(scope="session")
def _shared_redis_proxy(session_tmp: Path, mock_upstream: MockUpstream, redis_prefix: str) -> Iterator[SharedServer]:
    policy = policy_yaml(mock_upstream.url, f"store:\n  key_prefix: {redis_prefix}\n")
    shared = SharedServer(lambda: start_proxy(session_tmp, policy, redis_url=REDIS_URL))
    yield shared
    shared.stop()


@pytest.fixture
def redis_proxy(_shared_redis_proxy: SharedServer) -> Server:
    """The shared proxy on the real Redis (this session's own key prefix)."""
    return _shared_redis_proxy.get()


def client_for(server: Server, team: str = "alpha", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=TEAM_KEYS[team], max_retries=0, **kw)


def admin_spend(server: Server) -> dict:
    r = httpx.get(server.url + "/admin/spend", headers={"Authorization": f"Bearer {MASTER_KEY}"})
    r.raise_for_status()
    return r.json()


def team_spend(server: Server, team: str) -> dict:
    return admin_spend(server)["teams"].get(team, {"spend_usd": 0.0, "by_model": {}})


@pytest.fixture(scope="module")
def node_sdk() -> str:
    """Node, with the Node SDKs installed (`npm ci` from the committed lock file when missing)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "Node.js and npm are needed for the Node SDK tests (scripts/test installs them)"
    packages = ("openai", "ai", "@ai-sdk/openai", "@ai-sdk/anthropic")  # as tests/node/package.json lists them
    if not all((NODE_DIR / "node_modules" / name / "package.json").exists() for name in packages):
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return node
