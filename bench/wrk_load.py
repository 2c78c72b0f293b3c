"""wrk as a closed-loop load generator: a C client, so at concurrency 16/64 on a 2-core machine the
client's own CPU does not crowd out the server being measured (as a Python client does).

`run_wrk` POSTs one body for a fixed time and returns the same figures as bench.overhead's `_load`
(n, rps, p50_ms, p99_ms) plus errors and the CPU wrk itself used (from its rusage).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

# wrk calls done() once at the end; latency percentiles are in microseconds.
_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d\\n", summary.requests, summary.duration, e.status,
    e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def wrk_path() -> str | None:
    return shutil.which("wrk")


def _script(body: bytes, headers: dict[str, str]) -> str:
    text = body.decode()
    if "]==]" in text:
        raise ValueError("body cannot be quoted as a Lua long string")
    lines = ['wrk.method = "POST"', f"wrk.body = [==[{text}]==]"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    return "\n".join(lines) + "\n" + _DONE


def run_wrk(url: str, body: bytes, headers: dict[str, str], concurrency: int, seconds: float) -> dict:
    """Closed loop: `concurrency` keep-alive connections, each sending the next request when the last ends."""
    exe = wrk_path()
    if exe is None:
        raise RuntimeError("wrk is not installed (apt-get install -y wrk)")
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(_script(body, headers))
        args = [
            exe,
            f"-t{min(concurrency, 2)}",
            f"-c{concurrency}",
            f"-d{max(1, round(seconds))}s",
            # wrk's default 2 s timeout would drop the slow tail of a saturated server from p99.
            "--timeout",
            "60s",
            "-s",
            str(script),
            url,
        ]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = proc.stdout.read().decode()
        # wait4 rather than wait: the rusage is wrk's own CPU, what the load generator took from the servers.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    result = next((line.split() for line in out.splitlines() if line.startswith("RESULT ")), None)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {out.strip()[-500:]}")
    n, duration_us, status_errors, socket_errors, p50_us, p99_us = map(int, result[1:])
    return {
        "n": n,
        "rps": n / (duration_us / 1e6),
        "p50_ms": p50_us / 1000,
        "p99_ms": p99_us / 1000,
        "errors": status_errors + socket_errors,
        "loadgen_cpu_s": usage.ru_utime + usage.ru_stime,
    }
