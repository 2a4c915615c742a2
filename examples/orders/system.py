"""The whole system on one machine: an embedded broker behind a Toxiproxy-API proxy, the
payment gateway behind another, and one process per service. The chaos run and ``up`` share it.

Every process is started here and stopped here (SIGTERM, then SIGKILL), also when the harness
itself fails; a chaos fault SIGKILLs one and starts it again on the same ports and files.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from examples.orders import config as c
from resilient_kafka.testing import EmbeddedKafka
from resilient_kafka.toxiproxy import Toxiproxy, ToxiproxyServer

KAFKA_PROXY = "orders-kafka"
GATEWAY_PROXY = "orders-gateway"
MODULES = {
    "gateway": "examples.orders.gateway",
    **{name: f"examples.orders.services.{name}" for name in c.SERVICES},
}
HTTP = ("gateway", "orders", "view")
ROOT = Path(__file__).resolve().parents[2]  # the directory holding examples/


def _path_with(root: Path) -> str:
    current = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join([str(root), current]) if current else str(root)


class SystemError_(RuntimeError):
    """A process did not start, or exited when it should not have."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass(eq=False)
class Process:
    """One service process: its log, its pid, how often it was started."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    pids: list[int] = field(default_factory=list)

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the harness, which stops us in order
                env={**os.environ, "PYTHONPATH": _path_with(ROOT)},
            )
        self.starts += 1
        self.pids.append(self.popen.pid)
        _live.add(self)

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def ready_lines(self) -> int:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return 0
        return sum(1 for line in text.splitlines() if line.startswith(f"{self.name} ready"))

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if not self.running:
                raise SystemError_(
                    f"{self.name} exited ({self.popen and self.popen.returncode})"
                    f"; its log ends:\n{self.log_tail()}"
                )
            return self.ready_lines() >= self.starts

        wait_for(ready, timeout, f"{self.name} to be ready")

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(10)

    def stop(self, timeout: float = 20.0) -> None:
        if self.popen is None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        _live.discard(self)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def _signal(self, sig: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)


_live: set[Process] = set()


@atexit.register
def _stop_leftovers() -> None:
    for process in list(_live):
        process.kill()


class System:
    """Broker, proxies, gateway and services; ``start()`` returns once every service is ready."""

    def __init__(
        self, workdir: str | Path, profile: c.Profile, *, durable: bool = False, seed: int = 7
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.durable = durable
        # memory storage loses everything with the broker, so a broker kill needs S3 storage;
        # and Tansu may lose an idempotent batch in flight when killed (docs/testing.md)
        self.profile = dataclasses.replace(profile, tansu_kill_safe=True) if durable else profile
        self.seed = seed
        self.toxiproxy_server: ToxiproxyServer | None = None
        self.toxiproxy: Toxiproxy | None = None
        self.broker: EmbeddedKafka | None = None
        self.processes: dict[str, Process] = {}
        self.ports: dict[str, int] = {}
        self.bootstrap = ""

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, on_step: Callable[[str], None] = lambda _s: None) -> System:
        try:
            on_step("toxiproxy")
            self.toxiproxy_server = ToxiproxyServer(seed=self.seed).start()
            self.toxiproxy = self.toxiproxy_server.client()
            kafka_port = free_port()
            on_step("broker")
            self.broker = EmbeddedKafka(durable=self.durable, advertised_port=kafka_port).start()
            self.toxiproxy.create_proxy(
                KAFKA_PROXY, f"127.0.0.1:{kafka_port}", self.broker.listener
            )
            self.bootstrap = f"127.0.0.1:{kafka_port}"
            self.broker.create_topics(dict.fromkeys(c.TOPICS, self.profile.partitions))
            self.ports = {
                name: free_port()
                for name in (*HTTP, "gateway-proxy", *(f"{s}-metrics" for s in c.SERVICES))
            }
            self.toxiproxy.create_proxy(
                GATEWAY_PROXY,
                f"127.0.0.1:{self.ports['gateway-proxy']}",
                f"127.0.0.1:{self.ports['gateway']}",
            )
            for name in MODULES:
                on_step(name)
                self._spawn(name)
            for name in MODULES:
                self.processes[name].wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _settings(self, name: str) -> c.ServiceSettings:
        return c.ServiceSettings(
            name=name,
            bootstrap=self.bootstrap,
            workdir=str(self.workdir),
            profile=self.profile,
            http_port=self.ports.get(name, 0),
            metrics_port=self.ports.get(f"{name}-metrics", 0),
            gateway_url=f"http://127.0.0.1:{self.ports['gateway-proxy']}",
            seed=self.seed,
        )

    def _spawn(self, name: str) -> None:
        argv = [sys.executable, "-m", MODULES[name], self._settings(name).to_argv()]
        process = Process(name, argv, self.workdir / f"{name}.log")
        self.processes[name] = process
        process.start()

    def kill(self, name: str) -> None:
        """SIGKILL a process, as a crash would (``broker`` for the broker)."""
        if name == "broker":
            assert self.broker is not None
            self.broker.kill()
        else:
            self.processes[name].kill()

    def restart(self, name: str, wait: bool = True) -> None:
        if name == "broker":
            assert self.broker is not None
            self.broker.restart()
            return
        process = self.processes[name]
        process.stop()
        process.start()
        if wait:
            process.wait_ready()

    def exited(self) -> list[str]:
        """Services that exited by themselves (not killed by a fault)."""
        return [n for n, p in self.processes.items() if p.popen and p.popen.poll() is not None]

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            self.processes[name].stop()
        if self.broker is not None:
            self.broker.stop()
        if self.toxiproxy_server is not None:
            self.toxiproxy_server.stop()

    def __enter__(self) -> System:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the load, the checker and the live view need -----------------------------------

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def metrics_url(self, service: str = "payments") -> str:
        return f"http://127.0.0.1:{self.ports[f'{service}-metrics']}/metrics"

    def client_config(self) -> dict[str, Any]:
        return {"bootstrap.servers": self.bootstrap}

    def db(self, name: str) -> Path:
        return self.workdir / f"{name}.db"
