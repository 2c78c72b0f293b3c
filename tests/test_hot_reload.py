"""Hot reload: file changes, SIGHUP and POST /admin/reload; invalid edits keep the running config;
requests in flight finish under the config they started with."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import httpx
import pytest

from tests.conftest import MASTER_KEY, TEAM_KEYS, policy_yaml, start_proxy, wait_for

BLOCK = """\
policies:
  - name: block-marked
    when: {headers: {x-blocked: "yes"}}
    reject: {message: blocked by policy}
"""


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # what editors and ConfigMap updates do: a new file under the same name


def _reloads(url: str, result: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(f'llm_proxy_config_reloads_total{{result="{result}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _chat(url: str, headers: dict | None = None, model: str = "small") -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {TEAM_KEYS['alpha']}", **(headers or {})},
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )


class Traffic:
    """Requests flowing from a background thread while the config changes."""

    def __init__(self, url: str):
        self.url = url
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client() as client:
            while not self._stop.is_set():
                r = client.post(
                    self.url + "/v1/chat/completions",
                    headers={"Authorization": f"Bearer {TEAM_KEYS['alpha']}"},
                    json={"model": "small", "messages": [{"role": "user", "content": "x"}]},
                )
                self.statuses.append(r.status_code)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    d = tmp_path / "conf"
    d.mkdir()
    return d


def test_valid_and_invalid_edits_while_requests_flow(config_dir, mock):
    base = policy_yaml(mock.url)
    server = start_proxy(config_dir, base)
    config = next(config_dir.glob("policy-*.yaml"))
    try:
        with Traffic(server.url) as traffic:
            assert _chat(server.url, {"x-blocked": "yes"}).status_code == 200
            _write(config, base + BLOCK)
            wait_for(lambda: _chat(server.url, {"x-blocked": "yes"}).status_code == 403, timeout=15)
            assert _reloads(server.url, "success") >= 1
            errors_before = _reloads(server.url, "error")
            _write(config, base + BLOCK + "  - name: broken\n    route: {to: nowhere}\n")
            wait_for(lambda: _reloads(server.url, "error") > errors_before, timeout=15)
            # The running config is kept: the block policy still applies, the rest still works.
            assert _chat(server.url, {"x-blocked": "yes"}).status_code == 403
            assert _chat(server.url).status_code == 200
            wait_for(lambda: len(traffic.statuses) > 20, timeout=15)
        assert set(traffic.statuses) == {200}
        assert "policies[1].route.to: unknown model 'nowhere'" in server.log()
    finally:
        server.stop()


def test_admin_reload_reports_errors_and_sighup_reloads(config_dir, mock):
    base = policy_yaml(mock.url, litellm=True).replace(
        "  max_body_bytes: 65536\n", "  max_body_bytes: 65536\n  watch_config: false\n"
    )
    server = start_proxy(config_dir, base)
    config = next(config_dir.glob("policy-*.yaml"))
    admin = {"Authorization": f"Bearer {MASTER_KEY}"}
    try:
        _write(config, base + "policies: [{name: x, reject: {}, set: {a: {max: 1}}}]\n")
        r = httpx.post(server.url + "/admin/reload", headers=admin)
        assert r.status_code == 400
        details = r.json()["error"]["details"]
        assert any(d.startswith(f"{config}:") and "exactly one action" in d for d in details)
        assert httpx.post(server.url + "/admin/reload").status_code == 401
        # Not watching: a valid edit takes effect on SIGHUP only.
        _write(config, base + BLOCK)
        assert _chat(server.url, {"x-blocked": "yes"}).status_code == 200
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: _chat(server.url, {"x-blocked": "yes"}).status_code == 403, timeout=15)
        ok = httpx.post(server.url + "/admin/reload", headers=admin)
        assert ok.status_code == 200 and ok.json()["reloaded"] is True
        config_view = httpx.get(server.url + "/admin/config", headers=admin).json()
        assert config_view["models"]["claude"]["api_key"] == "***"
        assert TEAM_KEYS["alpha"] not in str(config_view)
    finally:
        server.stop()


def test_in_flight_requests_finish_under_the_config_they_started_with(config_dir, mock):
    base = policy_yaml(mock.url)
    server = start_proxy(config_dir, base)
    config = next(config_dir.glob("policy-*.yaml"))
    try:
        mock.configure(latency_ms=1500)
        result: dict[str, httpx.Response] = {}
        slow = threading.Thread(target=lambda: result.update(r=_chat(server.url, model="big")))
        slow.start()
        wait_for(lambda: mock.calls() == 1, timeout=15)  # the request is at the upstream
        # The new config no longer serves `big` at all.
        _write(config, base.replace("  big:\n", "  huge:\n"))
        wait_for(lambda: _chat(server.url, model="big").status_code == 404, timeout=15)
        slow.join(30)
        assert result["r"].status_code == 200
        assert result["r"].headers["x-llm-proxy-model"] == "big"
    finally:
        server.stop()
