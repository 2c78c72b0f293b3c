"""Redis servers that a test owns: started on a free loopback port, stopped and restarted at will,
and a three-node Redis Cluster."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from tests.conftest import free_port


def _wait_ping(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    while time.monotonic() < deadline:
        try:
            if client.ping():
                client.close()
                return
        except redis.ConnectionError:
            time.sleep(0.05)  # the server is still binding its port
    raise TimeoutError(f"redis on {port} did not start")


class OwnRedis:
    """A redis-server with append-only persistence in `workdir`, so a restart keeps its data."""

    def __init__(self, workdir: Path, port: int | None = None, extra: list[str] | None = None):
        self.port = port or free_port()
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> OwnRedis:
        self.proc = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_ping(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(20000, 50000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


class OwnCluster:
    """Three masters with --cluster-enabled, joined with `redis-cli --cluster create`."""

    def __init__(self, workdir: Path):
        self.nodes = [
            OwnRedis(
                workdir,
                port=_cluster_port(),
                extra=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{i}.conf",
                    "--cluster-node-timeout",
                    "2000",
                ],
            )
            for i in range(3)
        ]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> OwnCluster:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                shutil.which("redis-cli") or "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            info = redis.Redis(port=self.nodes[0].port).cluster("info")
            if info.get("cluster_state") == "ok":
                return self
            time.sleep(0.1)  # slots are being assigned; CLUSTER INFO is the only signal
        raise TimeoutError("cluster did not become ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
