"""Suite-wide fixtures and checks: no server started by the tests may outlive them."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator

import pytest

from resilient_kafka.testing._embedded import free_port
from resilient_kafka.testing._process import ManagedProcess
from tests.helpers import broker_processes, pid_alive, wait_for

pytest_plugins = ["pytester"]

_before: set[int] = set()


def pytest_sessionstart(session: pytest.Session) -> None:
    _before.update(broker_processes())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any Tansu or moto process started during it is still alive."""
    leaked = broker_processes() - _before
    try:
        wait_for(lambda: not any(pid_alive(pid) for pid in leaked), 10, "children to exit")
    except AssertionError:
        still = sorted(pid for pid in leaked if pid_alive(pid))
        session.config.get_terminal_writer().line(
            f"LEAK: broker/S3 processes still running after the tests: {still}", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A private redis-server on a free loopback port (Debian's redis-server package)."""
    binary = shutil.which("redis-server")
    if binary is None:
        reason = "redis-server is not installed (apt-get install redis-server; .ci/run does)"
        if os.environ.get("RK_REQUIRE_REDIS"):
            pytest.fail(reason)
        pytest.skip(reason)
    port = free_port()
    server = ManagedProcess(
        "redis",
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
    )
    server.start()
    try:
        wait_for(lambda: _redis_answers(port), 15, "redis-server to answer PING")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.stop()
        server.remove_log()


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False
