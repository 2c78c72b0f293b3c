"""The suite's own start-up helpers on a busy machine: a slow start is tried again, a failed one reports the
server's output and its cause, and a shared server that failed to start fails one test, not all after it."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

import tests.conftest as harness
from tests.conftest import Server, SharedServer, free_port, launch_process, start_proxy


def test_a_proxy_that_exits_is_reported_with_its_own_output_and_the_cause(tmp_path):
    with pytest.raises(RuntimeError) as e:
        start_proxy(tmp_path, "models:\n  m: {timeout_s: fast}\n")
    assert "could not start a proxy" in str(e.value)
    assert "models.m.timeout_s" in str(e.value)  # the proxy's own words, from its log
    assert isinstance(e.value.__cause__, harness.ServerExited)  # the cause is kept, not raised "from None"


def test_a_start_that_times_out_is_tried_once_more(tmp_path, monkeypatch):
    launched: list[Server] = []

    def launch() -> Server:
        port = free_port()
        if not launched:  # the first one never serves: a start too slow for the wait
            log = tmp_path / "sleeper.log"
            proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdout=log.open("w"))
            server = Server(proc, port, log)
        else:
            server = launch_process(["mock-upstream", "--port", str(port)], port, tmp_path)
        launched.append(server)
        return server

    real_wait = harness.wait_until_serving

    def wait(url, proc, timeout=None):  # a short wait for the first start, the usual one for the second
        return real_wait(url, proc, 2.0 if len(launched) == 1 else timeout)

    monkeypatch.setattr(harness, "wait_until_serving", wait)
    server = harness._serving(launch, "/v1/models", "the mock upstream")
    try:
        assert len(launched) == 2 and launched[0].proc.poll() is not None  # the slow one was stopped
        assert httpx.get(server.url + "/v1/models").status_code == 200
    finally:
        server.stop()


def test_a_shared_server_that_failed_to_start_fails_one_test_and_is_tried_again():
    class Started:
        stopped = False

        def stop(self) -> None:
            self.stopped = True

    outcomes: list[Exception | Started] = [RuntimeError("could not start a proxy: slow"), Started()]

    def flaky_start():
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    shared = SharedServer(flaky_start)
    with pytest.raises(RuntimeError, match="slow"):  # the test that asked first fails...
        shared.get()
    server = shared.get()  # ...the next one gets a server
    assert isinstance(server, Started) and shared.get() is server
    shared.stop()
    assert server.stopped


def test_a_shared_server_that_never_starts_fails_fast_after_two_tries():
    attempts: list[int] = []

    def start() -> Server:
        attempts.append(1)
        raise RuntimeError(f"could not start a proxy (attempt {len(attempts)})")

    shared = SharedServer(start)
    for n in (1, 2):
        with pytest.raises(RuntimeError, match=f"attempt {n}"):
            shared.get()
    with pytest.raises(pytest.fail.Exception, match="attempt 1"):  # after two: at once, with the first failure
        shared.get()
    assert len(attempts) == 2
