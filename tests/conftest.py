"""Suite-wide checks: no broker or S3 server started by the tests may outlive them."""

from __future__ import annotations

import pytest

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
