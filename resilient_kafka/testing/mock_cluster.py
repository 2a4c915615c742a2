"""librdkafka's built-in mock Kafka cluster, driven through ctypes, for tests.

The librdkafka shipped inside the confluent-kafka wheel contains an in-process mock cluster
(``rd_kafka_mock_*``): a few brokers on loopback ports, run by threads of this process, that
ordinary clients reach through ``bootstrap.servers``. It starts in milliseconds, needs no
binary, behaves like Apache Kafka where Tansu does not (commit metadata is kept, watermarks are
right, brokers have distinct ids) and can be steered: move partition leaders, take brokers
down, make the next requests of one kind fail with chosen error codes.

confluent-kafka has no Python binding for it, so this module calls the C functions directly.
Its limits (no CreateTopics, read_committed readers see open and aborted transactions) are in
docs/testing.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import threading
import weakref
from collections.abc import Iterable, Mapping
from enum import IntEnum
from pathlib import Path
from types import TracebackType
from typing import Any

from resilient_kafka.errors import ResilientKafkaError, TopicError
from resilient_kafka.testing._cluster import _ADMIN_TIMEOUT, KafkaCluster

__all__ = [
    "ApiKey",
    "MockCluster",
    "MockClusterError",
    "MockClusterUnavailableError",
    "find_librdkafka",
]

# librdkafka's error codes the wrapper looks at (rd_kafka_resp_err_t).
_NO_ERROR = 0
_TOPIC_ALREADY_EXISTS = 36

_RD_KAFKA_PRODUCER = 0  # rd_kafka_type_t
_RD_KAFKA_CONF_OK = 0  # rd_kafka_conf_res_t
_ERRSTR_SIZE = 512

# The owning handle has no bootstrap.servers (it only hosts the cluster), which librdkafka
# reports as a CONFWARN notice; errors (level 3) still reach stderr.
_OWNER_LOG_LEVEL = b"3"


class ApiKey(IntEnum):
    """Kafka protocol request types, as ``push_request_errors`` and ``clear_request_errors`` take.

    Numbers from the Kafka protocol (and librdkafka's ``rdkafka_protocol.h``).
    """

    Produce = 0
    Fetch = 1
    ListOffsets = 2
    Metadata = 3
    OffsetCommit = 8
    OffsetFetch = 9
    FindCoordinator = 10
    JoinGroup = 11
    Heartbeat = 12
    LeaveGroup = 13
    SyncGroup = 14
    CreateTopics = 19
    InitProducerId = 22
    AddPartitionsToTxn = 24
    AddOffsetsToTxn = 25
    EndTxn = 26
    TxnOffsetCommit = 28


class MockClusterError(ResilientKafkaError, RuntimeError):
    """A mock cluster operation failed; ``code`` is librdkafka's error code, when there is one."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class MockClusterUnavailableError(MockClusterError):
    """librdkafka, or one of the ``rd_kafka_mock_*`` functions this wrapper needs, was not found."""


# -- the C library ---------------------------------------------------------------------------

_c_void_p = ctypes.c_void_p
_c_char_p = ctypes.c_char_p
_c_int = ctypes.c_int
_c_int16 = ctypes.c_int16
_c_int32 = ctypes.c_int32
_c_size_t = ctypes.c_size_t

# name: (restype, argtypes), from librdkafka's rdkafka.h and rdkafka_mock.h.
_REQUIRED: dict[str, tuple[Any, list[Any]]] = {
    "rd_kafka_version_str": (_c_char_p, []),
    "rd_kafka_err2str": (_c_char_p, [_c_int]),
    "rd_kafka_conf_new": (_c_void_p, []),
    "rd_kafka_conf_set": (_c_int, [_c_void_p, _c_char_p, _c_char_p, _c_char_p, _c_size_t]),
    "rd_kafka_conf_destroy": (None, [_c_void_p]),
    "rd_kafka_new": (_c_void_p, [_c_int, _c_void_p, _c_char_p, _c_size_t]),
    "rd_kafka_destroy": (None, [_c_void_p]),
    "rd_kafka_mock_cluster_new": (_c_void_p, [_c_void_p, _c_int]),
    "rd_kafka_mock_cluster_destroy": (None, [_c_void_p]),
    "rd_kafka_mock_cluster_bootstraps": (_c_char_p, [_c_void_p]),
    "rd_kafka_mock_topic_create": (_c_int, [_c_void_p, _c_char_p, _c_int, _c_int]),
    "rd_kafka_mock_topic_delete": (_c_int, [_c_void_p, _c_char_p]),
    "rd_kafka_mock_partition_set_leader": (_c_int, [_c_void_p, _c_char_p, _c_int32, _c_int32]),
    "rd_kafka_mock_broker_set_down": (_c_int, [_c_void_p, _c_int32]),
    "rd_kafka_mock_broker_set_up": (_c_int, [_c_void_p, _c_int32]),
    "rd_kafka_mock_coordinator_set": (_c_int, [_c_void_p, _c_char_p, _c_char_p, _c_int32]),
    "rd_kafka_mock_push_request_errors_array": (
        None,
        [_c_void_p, _c_int16, _c_size_t, ctypes.POINTER(_c_int)],
    ),
    "rd_kafka_mock_clear_request_errors": (None, [_c_void_p, _c_int16]),
    "rd_kafka_mock_group_initial_rebalance_delay_ms": (None, [_c_void_p, _c_int32]),
}

# Used when present: with a controller in metadata, admin CreateTopics/DeleteTopics fail at once
# (unsupported) instead of waiting for a controller until their timeout.
_OPTIONAL: dict[str, tuple[Any, list[Any]]] = {
    "rd_kafka_mock_set_controller_id": (None, [_c_void_p, _c_int32]),
}

_lock = threading.Lock()
_loaded: dict[str, _Library] = {}


class _Library:
    """librdkafka with the signatures of the functions the wrapper calls declared."""

    def __init__(self, path: str) -> None:
        try:
            self.cdll = ctypes.CDLL(path)
        except OSError as exc:
            raise MockClusterUnavailableError(f"cannot load librdkafka from {path}: {exc}") from exc
        self.path = path
        missing = [name for name in _REQUIRED if not hasattr(self.cdll, name)]
        if missing:
            raise MockClusterUnavailableError(
                f"librdkafka at {path} does not export {', '.join(missing)}: the mock cluster "
                "needs librdkafka 2.15 or later (as bundled with confluent-kafka 2.16)"
            )
        for name, (restype, argtypes) in {**_REQUIRED, **_OPTIONAL}.items():
            if hasattr(self.cdll, name):
                function = getattr(self.cdll, name)
                function.restype = restype
                function.argtypes = argtypes

    def has(self, name: str) -> bool:
        return hasattr(self.cdll, name)

    def fn(self, name: str) -> Any:
        return getattr(self.cdll, name)

    @property
    def version(self) -> str:
        raw = self.fn("rd_kafka_version_str")()
        return raw.decode() if raw else "unknown"

    def err2str(self, code: int) -> str:
        raw = self.fn("rd_kafka_err2str")(code)
        return raw.decode(errors="replace") if raw else f"error {code}"


def _loaded_copies() -> list[str]:
    """Paths of librdkafka copies mapped into this process (Linux), e.g. by confluent_kafka."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    found: list[str] = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        path = fields[5] if len(fields) == 6 else ""
        if Path(path).name.startswith("librdkafka") and path not in found:
            found.append(path)
    return found


def find_librdkafka() -> str:
    """Path of the librdkafka confluent-kafka uses, so the mock runs in the clients' own copy.

    ``RK_LIBRDKAFKA`` overrides it. Otherwise: the copy this process has loaded (Linux), then
    the wheel's bundled one, then a system librdkafka.
    """
    override = os.environ.get("RK_LIBRDKAFKA", "").strip()
    if override:
        if not Path(override).is_file():
            raise MockClusterUnavailableError(f"RK_LIBRDKAFKA={override} is not a file")
        return override
    try:
        import confluent_kafka  # loads cimpl, and with it librdkafka
    except ImportError as exc:
        raise MockClusterUnavailableError(f"the mock cluster needs confluent-kafka: {exc}") from exc
    loaded = _loaded_copies()
    if loaded:
        return loaded[0]
    package = Path(confluent_kafka.__file__).parent
    patterns = [
        package.parent / "confluent_kafka.libs" / "librdkafka*",  # auditwheel, delvewheel
        package / ".libs" / "librdkafka*",
        package / ".dylibs" / "librdkafka*",  # delocate (macOS)
        package / "librdkafka*.dll",
    ]
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern)))
        if matches:
            return matches[0]
    system = ctypes.util.find_library("rdkafka")
    if system:
        return system
    searched = ", ".join(str(p) for p in patterns)
    raise MockClusterUnavailableError(
        f"librdkafka not found: not loaded by confluent_kafka, not in {searched}, and no system "
        "librdkafka. Set RK_LIBRDKAFKA to its path."
    )


def _library(path: str | None = None) -> _Library:
    resolved = path or find_librdkafka()
    with _lock:
        if resolved not in _loaded:
            _loaded[resolved] = _Library(resolved)
        return _loaded[resolved]


def _destroy(lib: _Library, rk: int, mcluster: int) -> None:
    """Tear down in librdkafka's order: the cluster before the handle it was created on."""
    lib.fn("rd_kafka_mock_cluster_destroy")(mcluster)
    lib.fn("rd_kafka_destroy")(rk)


# -- the cluster -----------------------------------------------------------------------------


class MockCluster(KafkaCluster):
    """librdkafka's mock cluster of ``brokers`` brokers (ids 1..n) on loopback ports.

    Use it like :class:`EmbeddedKafka` (``with`` block, ``bootstrap_servers``,
    ``client_config()``, ``create_topics()``), plus controls a real broker does not offer:
    :meth:`set_leader`, :meth:`broker_down`/:meth:`broker_up`, :meth:`push_request_errors`.

    ``group_initial_rebalance_delay_ms`` is the broker's ``group.initial.rebalance.delay.ms``;
    librdkafka's mock defaults to Kafka's 3000 ms, 0 lets a first consumer join at once.
    ``library`` is the path of librdkafka to use (default: :func:`find_librdkafka`).
    """

    def __init__(
        self,
        brokers: int = 3,
        *,
        group_initial_rebalance_delay_ms: int = 0,
        library: str | None = None,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(extra_config)
        if brokers < 1:
            raise ValueError(f"a mock cluster needs at least one broker, got {brokers}")
        if group_initial_rebalance_delay_ms < 0:
            raise ValueError(
                "group_initial_rebalance_delay_ms must be >= 0, "
                f"got {group_initial_rebalance_delay_ms}"
            )
        self.broker_count = brokers
        self.group_initial_rebalance_delay_ms = group_initial_rebalance_delay_ms
        self._library_path = library
        self._lib: _Library | None = None
        self._mcluster: int | None = None
        self._bootstrap = ""
        self._finalizer: weakref.finalize[Any, Any] | None = None
        # held by every call into the cluster and by close(): no call on a destroyed cluster
        self._guard = threading.RLock()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._mcluster is not None

    def start(self) -> MockCluster:
        """Create the cluster (on a producer handle of its own, kept until :meth:`close`).

        Starting a closed cluster gives a new, empty one on new ports.
        """
        with self._guard:
            if not self.running:
                self._start()
        return self

    def _start(self) -> None:
        lib = _library(self._library_path)
        errstr = ctypes.create_string_buffer(_ERRSTR_SIZE)
        conf = lib.fn("rd_kafka_conf_new")()
        if not conf:
            raise MockClusterError("rd_kafka_conf_new() returned NULL")
        set_conf = lib.fn("rd_kafka_conf_set")
        if (
            set_conf(conf, b"log_level", _OWNER_LOG_LEVEL, errstr, _ERRSTR_SIZE)
            != _RD_KAFKA_CONF_OK
        ):
            lib.fn("rd_kafka_conf_destroy")(conf)
            raise MockClusterError(f"rd_kafka_conf_set(log_level): {errstr.value.decode()}")
        rk = lib.fn("rd_kafka_new")(_RD_KAFKA_PRODUCER, conf, errstr, _ERRSTR_SIZE)
        if not rk:  # on failure the configuration is still ours to free
            lib.fn("rd_kafka_conf_destroy")(conf)
            raise MockClusterError(f"rd_kafka_new() failed: {errstr.value.decode()}")
        mcluster = lib.fn("rd_kafka_mock_cluster_new")(rk, self.broker_count)
        if not mcluster:
            lib.fn("rd_kafka_destroy")(rk)
            raise MockClusterError(
                f"rd_kafka_mock_cluster_new() could not create {self.broker_count} broker(s) "
                f"(librdkafka {lib.version}; see its log above)"
            )
        # From here on the finalizer owns both: close(), garbage collection or interpreter exit
        # destroys them, whichever comes first, and only once.
        self._finalizer = weakref.finalize(self, _destroy, lib, rk, mcluster)
        self._lib = lib
        self._mcluster = mcluster
        try:
            raw = lib.fn("rd_kafka_mock_cluster_bootstraps")(mcluster)
            self._bootstrap = raw.decode() if raw else ""
            if not self._bootstrap:
                raise MockClusterError("the mock cluster reported no bootstrap servers")
            lib.fn("rd_kafka_mock_group_initial_rebalance_delay_ms")(
                mcluster, self.group_initial_rebalance_delay_ms
            )
            if lib.has("rd_kafka_mock_set_controller_id"):
                lib.fn("rd_kafka_mock_set_controller_id")(mcluster, 1)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Destroy the cluster and its handle; clients still connected see the brokers vanish.

        Safe to call twice.
        """
        with self._guard:
            finalizer, self._finalizer = self._finalizer, None
            self._lib = None
            self._mcluster = None
            self._bootstrap = ""
            if finalizer is not None:
                finalizer()

    def stop(self) -> None:
        """Alias of :meth:`close`, as :class:`EmbeddedKafka` names it."""
        self.close()

    def __enter__(self) -> MockCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"on {self._bootstrap}" if self.running else "closed"
        return f"<MockCluster {self.broker_count} broker(s) {state}>"

    # -- addresses -------------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        """``127.0.0.1:port,...``, one entry per broker."""
        with self._guard:
            self._handle()
            return self._bootstrap

    @property
    def broker_ids(self) -> list[int]:
        """The brokers' ids: 1 to ``broker_count``."""
        return list(range(1, self.broker_count + 1))

    # -- topics ----------------------------------------------------------------------------

    def create_topic(self, name: str, partitions: int = 1, replication_factor: int = 1) -> None:
        """Create one topic; :class:`MockClusterError` if it exists or the counts are invalid."""
        self._check_counts(name, partitions, replication_factor)
        self._call_checked(
            f"create topic {name!r}",
            "rd_kafka_mock_topic_create",
            name.encode(),
            partitions,
            replication_factor,
        )

    def create_topics(
        self,
        topics: Mapping[str, int] | Iterable[str],
        *,
        replication_factor: int = -1,
        config: Mapping[str, str] | None = None,
        exist_ok: bool = False,
        timeout: float = _ADMIN_TIMEOUT,
    ) -> None:
        """:meth:`KafkaCluster.create_topics` for the mock, which does not answer CreateTopics.

        ``replication_factor=-1`` means the cluster default, ``min(3, brokers)``. Topic configs
        are not supported (the mock keeps none): any raises :class:`TopicError`. ``timeout`` is
        accepted for compatibility; creation is immediate and visible in metadata at once.
        """
        wanted = dict(topics) if isinstance(topics, Mapping) else dict.fromkeys(topics, 1)
        factor = min(3, self.broker_count) if replication_factor == -1 else replication_factor
        errors: dict[str, str] = {}
        for name, partitions in wanted.items():
            if config:
                errors[name] = "the mock cluster does not support topic configs"
                continue
            try:
                self.create_topic(name, partitions, factor)
            except MockClusterError as exc:
                if exist_ok and exc.code == _TOPIC_ALREADY_EXISTS:
                    continue
                errors[name] = str(exc)
        if errors:
            detail = "; ".join(f"{name}: {reason}" for name, reason in sorted(errors.items()))
            raise TopicError(
                f"could not create {len(errors)} topic(s) on the mock cluster: {detail}", errors
            )

    def delete_topics(self, names: Iterable[str], *, timeout: float = _ADMIN_TIMEOUT) -> None:
        """Delete topics (the mock does not answer DeleteTopics either); :class:`TopicError`
        names each one that could not be deleted."""
        errors: dict[str, str] = {}
        for name in names:
            try:
                self._call_checked(
                    f"delete topic {name!r}", "rd_kafka_mock_topic_delete", name.encode()
                )
            except MockClusterError as exc:
                errors[name] = str(exc)
        if errors:
            raise TopicError(f"could not delete topic(s): {errors}", errors)

    # -- leaders and brokers ---------------------------------------------------------------

    def set_leader(self, topic: str, partition: int, broker_id: int) -> None:
        """Make ``broker_id`` the leader of ``topic`` [``partition``] (-1: no leader).

        Clients learn it from their next metadata refresh, as after a real leader election.
        A topic that does not exist is created, with ``partition + 1`` partitions.
        """
        self._call_checked(
            f"set the leader of {topic} [{partition}] to broker {broker_id}",
            "rd_kafka_mock_partition_set_leader",
            topic.encode(),
            partition,
            broker_id,
        )

    def broker_down(self, broker_id: int) -> None:
        """Close the broker's connections and refuse new ones (-1: every broker).

        Leadership does not move: partitions it leads stay unavailable until
        :meth:`broker_up` or :meth:`set_leader`.
        """
        self._call_checked(
            f"take broker {broker_id} down", "rd_kafka_mock_broker_set_down", broker_id
        )

    def broker_up(self, broker_id: int) -> None:
        """Let the broker accept connections again, on the same port (-1: every broker)."""
        self._call_checked(f"bring broker {broker_id} up", "rd_kafka_mock_broker_set_up", broker_id)

    def set_coordinator(self, kind: str, key: str, broker_id: int) -> None:
        """Make ``broker_id`` the coordinator of group ``key`` (``kind="group"``) or of
        transactional id ``key`` (``kind="transaction"``); clients find it with their next
        FindCoordinator. Then :meth:`broker_down` takes just that coordinator away."""
        if kind not in ("group", "transaction"):
            raise ValueError(f"kind must be 'group' or 'transaction', got {kind!r}")
        self._call_checked(
            f"make broker {broker_id} the {kind} coordinator of {key!r}",
            "rd_kafka_mock_coordinator_set",
            kind.encode(),
            key.encode(),
            broker_id,
        )

    # -- error injection -------------------------------------------------------------------

    def push_request_errors(self, api_key: int, *error_codes: Any) -> None:
        """Make the next ``len(error_codes)`` requests of type ``api_key``, to any broker, fail
        with these codes, in order.

        Codes are ints, ``KafkaError.<NAME>`` constants or ``KafkaError`` instances;
        ``KafkaError._TRANSPORT`` makes the broker drop the connection instead of answering.
        """
        if not error_codes:
            raise ValueError("push_request_errors needs at least one error code")
        codes = [_error_code(code) for code in error_codes]
        array = (_c_int * len(codes))(*codes)
        self._call("rd_kafka_mock_push_request_errors_array", _api_key(api_key), len(codes), array)

    def clear_request_errors(self, api_key: int) -> None:
        """Drop the errors still queued for ``api_key``."""
        self._call("rd_kafka_mock_clear_request_errors", _api_key(api_key))

    # -- internals -------------------------------------------------------------------------

    def _handle(self) -> tuple[_Library, int]:
        if self._lib is None or self._mcluster is None:
            raise MockClusterError("the mock cluster is not running: call start() first")
        return self._lib, self._mcluster

    def _call(self, function: str, *args: Any) -> Any:
        """``function(mcluster, *args)``, with the cluster kept alive for the call."""
        with self._guard:
            lib, mcluster = self._handle()
            return lib.fn(function)(mcluster, *args)

    def _call_checked(self, what: str, function: str, *args: Any) -> None:
        """:meth:`_call` for functions returning an error code: MockClusterError unless 0."""
        with self._guard:
            lib, mcluster = self._handle()
            err = lib.fn(function)(mcluster, *args)
        if err != _NO_ERROR:
            raise MockClusterError(f"could not {what}: {lib.err2str(err)}", err)

    def _check_counts(self, name: str, partitions: int, replication_factor: int) -> None:
        # librdkafka trusts these blindly (a negative count would be a huge allocation), and
        # a real broker refuses a replication factor above the broker count.
        if not isinstance(partitions, int) or partitions < 1:
            raise MockClusterError(
                f"topic {name!r}: partitions must be a positive integer, got {partitions!r}"
            )
        if not isinstance(replication_factor, int) or not (
            1 <= replication_factor <= self.broker_count
        ):
            raise MockClusterError(
                f"topic {name!r}: replication factor must be 1..{self.broker_count} "
                f"(the broker count), got {replication_factor!r}"
            )


def _api_key(api_key: int) -> int:
    key = int(api_key)
    if not 0 <= key < 2**15:
        raise ValueError(f"not a Kafka API key: {api_key!r}")
    return key


def _error_code(code: Any) -> int:
    """An error code from an int, a ``KafkaError`` constant or a ``KafkaError`` instance."""
    if isinstance(code, int):
        return code
    method = getattr(code, "code", None)
    if callable(method):
        return int(method())
    raise TypeError(f"not a Kafka error code: {code!r}")
