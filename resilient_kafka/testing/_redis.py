"""A private redis-server (Debian's package) on a free loopback port, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import shutil
import socket
import time
from collections.abc import Iterator

from resilient_kafka.testing._embedded import free_port
from resilient_kafka.testing._process import ManagedProcess

MISSING = "redis-server is not installed (apt-get install redis-server; .ci/run does)"


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
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError(MISSING)
    port = free_port()
    server = ManagedProcess(
        "redis",
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
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
