"""Scenario definitions: a load (messages over a duration) and a timeline of faults.

Scenarios are small TOML files (the built-in ones are in ``resilient_kafka/chaos/scenarios``;
``chaos/scenarios`` in the repository links there) so that users can copy one and write
their own::

    name = "latency"
    description = "300 ms (+/- 50) on every byte the brokers send, for 6 s."
    [[faults]]
    kind = "toxic"
    at = 2.0
    for = 6.0
    toxic = { type = "latency", stream = "downstream", attributes = { latency = 300, jitter = 50 } }

Times (``every`` included) are seconds from the start of the load and scale with
``--duration``.

Protocol faults (``cluster = "mock"``) run on librdkafka's mock cluster, three brokers in the
runner's process: partition leaders move, a broker goes down, requests are answered with chosen
error codes::

    cluster = "mock"
    [[faults]]
    kind = "request-errors"
    at = 2.0
    for = 6.0
    request = "Produce"
    errors = ["NOT_LEADER_FOR_PARTITION", "NOT_ENOUGH_REPLICAS"]
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from resilient_kafka._work import ORDERINGS
from resilient_kafka.errors import ConfigurationError

FAULT_KINDS = {
    "proxy-down": "the proxy in front of the broker refuses and drops every connection",
    "toxic": "a Toxiproxy toxic on the broker proxy (latency, bandwidth, timeout, ...)",
    "broker-kill": "SIGKILL the broker process; restart it when the fault ends (embedded only)",
    "downstream-down": "the downstream service the handler calls fails every call",
    "worker-kill": "SIGKILL one consumer worker; start a new one when the fault ends",
    "worker-churn": "workers join and leave the group every `every` seconds",
    # the mock cluster's (cluster = "mock")
    "leader-move": "every partition's leader moves to the next broker every `every` seconds",
    "broker-down": "a broker (`broker`, default 1) refuses connections; it comes back at the end",
    "request-errors": "every `every` seconds the next requests of type `request` fail with "
    "`errors`, in order",
}
MOCK_KINDS = ("leader-move", "broker-down", "request-errors")
PROXY_KINDS = ("proxy-down", "toxic", "broker-kill")  # need the embedded broker or a proxy
CLUSTERS = ("broker", "mock")  # the embedded broker (or --bootstrap), librdkafka's mock
MOCK_BROKERS = 3
# the run(ordering=...) values that promise per-key order: a consumer reorder fails the scenario
KEY_ORDERED = ("key", "partition")
TOXIC_TYPES = (
    "latency",
    "bandwidth",
    "slow_close",
    "timeout",
    "reset_peer",
    "slicer",
    "limit_data",
)


@dataclass(frozen=True)
class Fault:
    kind: str
    at: float
    duration: float
    toxic: dict[str, Any] = field(default_factory=dict)
    every: float = 2.0
    request: str = ""  # request-errors: an ApiKey name
    errors: tuple[str, ...] = ()  # request-errors: KafkaError names, in order
    broker: int = 1  # broker-down: the broker's id

    @property
    def end(self) -> float:
        return self.at + self.duration

    def label(self) -> str:
        if self.kind == "toxic":
            return f"toxic {self.toxic.get('type')}"
        if self.kind == "request-errors":
            return f"{self.request} errors"
        if self.kind == "broker-down":
            return f"broker {self.broker} down"
        return self.kind


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    faults: tuple[Fault, ...] = ()
    duration: float = 10.0  # seconds of load the fault times refer to
    workers: int = 2
    poison: int = 0  # poison messages among the load (non-retryable: DLQ)
    dedup: bool = True  # duplicate side effects fail the scenario
    downstream_latency_ms: float = 1.0
    source: str = ""
    concurrency: int = 1  # handlers at once in each worker: run(handler, concurrency=...)
    ordering: str = "key"  # run(..., ordering=...): "key" | "partition" | "unordered"
    cluster: str = "broker"  # "mock": librdkafka's mock cluster (protocol faults)
    session_timeout_ms: int = 6000  # the workers' session.timeout.ms
    static_membership: bool = False  # workers set group.instance.id; a replacement reuses it

    @property
    def keeps_key_order(self) -> bool:
        """Whether the workers promise per-key order (then a consumer reorder fails)."""
        return self.ordering in KEY_ORDERED

    def scaled(self, duration: float) -> Scenario:
        """The same timeline stretched to a load of ``duration`` seconds."""
        factor = duration / self.duration
        faults = tuple(
            replace(f, at=f.at * factor, duration=f.duration * factor, every=f.every * factor)
            for f in self.faults
        )
        return replace(self, faults=faults, duration=duration)


def _fail(source: str, problem: str) -> ConfigurationError:
    return ConfigurationError(f"scenario {source}: {problem}")


def _number(data: dict[str, Any], key: str, default: float, source: str, minimum: float) -> float:
    value = data.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < minimum
    ):
        raise _fail(source, f"{key} must be a finite number >= {minimum}, got {value!r}")
    return float(value)


# each toxic's attributes (Toxiproxy ignores unknown ones and zeroes missing ones, so a typo
# would silently make the toxic a no-op: reject it here)
TOXIC_ATTRIBUTES = {
    "latency": {"latency", "jitter"},
    "bandwidth": {"rate"},
    "slow_close": {"delay"},
    "timeout": {"timeout"},
    "reset_peer": {"timeout"},
    "slicer": {"average_size", "size_variation", "delay"},
    "limit_data": {"bytes"},
}


def _request_errors(data: dict[str, Any], source: str) -> tuple[str, tuple[str, ...]]:
    """A request-errors fault's request type and error names, checked against the protocol's
    names (a typo would inject nothing, or the wrong thing)."""
    from confluent_kafka import KafkaError

    from resilient_kafka.testing.mock_cluster import ApiKey

    request = data.get("request")
    if not isinstance(request, str) or request not in ApiKey.__members__:
        raise _fail(source, f"request must be one of {sorted(ApiKey.__members__)}, got {request!r}")
    errors = data.get("errors")
    if not isinstance(errors, list) or not errors:
        raise _fail(source, "a request-errors fault needs errors, a non-empty list of names")
    for name in errors:
        code = getattr(KafkaError, name, None) if isinstance(name, str) else None
        # broker error codes are positive (librdkafka's own are negative), _TRANSPORT aside:
        # the mock then drops the connection instead of answering
        if not isinstance(code, int) or (code <= 0 and name != "_TRANSPORT"):
            raise _fail(
                source,
                f"{name!r} is not a Kafka error name (confluent_kafka.KafkaError's, "
                "e.g. NOT_LEADER_FOR_PARTITION, REQUEST_TIMED_OUT, REBALANCE_IN_PROGRESS)",
            )
    return str(request), tuple(errors)


def _flag(data: dict[str, Any], key: str, default: bool, source: str) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise _fail(source, f"{key} must be true or false, got {value!r}")
    return value


def _whole(
    data: dict[str, Any], key: str, default: int, source: str, low: int, high: int, what: str
) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(source, f"{key} must be {what}, got {value!r}")
    return value


def _target(fault: Fault) -> tuple[Any, ...] | None:
    """What a fault's end undoes, for faults whose end would undo an overlapping one's."""
    if fault.kind == "request-errors":
        return (fault.kind, fault.request)  # the end clears every error queued for the request
    if fault.kind == "broker-down":
        return (fault.kind, fault.broker)
    if fault.kind in ("proxy-down", "broker-kill", "downstream-down"):
        return (fault.kind,)
    return None


def _no_overlaps(faults: tuple[Fault, ...], source: str) -> None:
    seen: dict[tuple[Any, ...], Fault] = {}
    for fault in sorted(faults, key=lambda f: f.at):
        target = _target(fault)
        if target is None:
            continue
        before = seen.get(target)
        if before is not None and fault.at < before.end:
            raise _fail(
                source,
                f"two {fault.label()} faults overlap ({before.at:g}-{before.end:g}s and "
                f"{fault.at:g}-{fault.end:g}s): the first one's end would undo the second",
            )
        seen[target] = fault


def _fault(data: Any, source: str, duration: float, cluster: str) -> Fault:
    if not isinstance(data, dict):
        raise _fail(source, f"each [[faults]] entry must be a table, got {data!r}")
    unknown = set(data) - {"kind", "at", "for", "toxic", "every", "request", "errors", "broker"}
    if unknown:
        raise _fail(source, f"unknown fault keys {sorted(unknown)}")
    kind = data.get("kind")
    if kind not in FAULT_KINDS:
        raise _fail(source, f"fault kind must be one of {sorted(FAULT_KINDS)}, got {kind!r}")
    if kind in MOCK_KINDS and cluster != "mock":
        raise _fail(source, f'fault {kind!r} needs cluster = "mock" (librdkafka\'s mock cluster)')
    if kind in PROXY_KINDS and cluster == "mock":
        raise _fail(
            source,
            f"fault {kind!r} needs the broker cluster: no proxy stands in front of the mock "
            "cluster's brokers (use broker-down, leader-move or request-errors there)",
        )
    for key in ("request", "errors"):
        if key in data and kind != "request-errors":
            raise _fail(source, f"only request-errors faults take {key} (fault {kind!r})")
    if "broker" in data and kind != "broker-down":
        raise _fail(source, f"only broker-down faults take broker (fault {kind!r})")
    at = _number(data, "at", 0.0, source, 0.0)
    length = _number(data, "for", 0.0, source, 0.0)
    if length <= 0:
        raise _fail(source, f"fault {kind!r} needs a positive `for` (seconds)")
    if at + length > duration:
        raise _fail(
            source, f"fault {kind!r} ends at {at + length:g}s, after the load ({duration:g}s)"
        )
    toxic = data.get("toxic", {})
    if kind == "toxic":
        if not isinstance(toxic, dict) or toxic.get("type") not in TOXIC_TYPES:
            raise _fail(source, f"a toxic fault needs toxic.type, one of {list(TOXIC_TYPES)}")
        extra = set(toxic) - {"type", "stream", "attributes", "toxicity"}
        if extra:
            raise _fail(source, f"unknown toxic keys {sorted(extra)}")
        if toxic.get("stream", "downstream") not in ("upstream", "downstream"):
            raise _fail(source, "toxic.stream must be 'upstream' or 'downstream'")
        attributes = toxic.get("attributes", {})
        if not isinstance(attributes, dict):
            raise _fail(source, "toxic.attributes must be a table")
        allowed = TOXIC_ATTRIBUTES[toxic["type"]]
        if set(attributes) - allowed:
            raise _fail(
                source,
                f"{toxic['type']} toxics take {sorted(allowed)}, not "
                f"{sorted(set(attributes) - allowed)}",
            )
        for name in attributes:
            _number(attributes, name, 0, source, 0)
        toxicity = _number(toxic, "toxicity", 1.0, source, 0.0)
        if toxicity > 1:
            raise _fail(source, f"toxic.toxicity is a probability (0 to 1), got {toxicity}")
    elif toxic:
        raise _fail(source, f"only toxic faults take a toxic table (fault {kind!r})")
    every = _number(data, "every", 2.0, source, 0.1)
    request, errors = _request_errors(data, source) if kind == "request-errors" else ("", ())
    broker = data.get("broker", 1)
    if isinstance(broker, bool) or not isinstance(broker, int) or not 1 <= broker <= MOCK_BROKERS:
        raise _fail(source, f"broker must be a broker id, 1 to {MOCK_BROKERS}, got {broker!r}")
    return Fault(kind, at, length, dict(toxic), every, request, errors, broker)


def parse(text: str, source: str) -> Scenario:
    """A scenario from TOML text; ConfigurationError naming ``source`` and the problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _fail(source, f"not valid TOML: {exc}") from None
    known = {
        "name",
        "description",
        "faults",
        "duration",
        "workers",
        "poison",
        "dedup",
        "downstream_latency_ms",
        "concurrency",
        "ordering",
        "cluster",
        "session_timeout_ms",
        "static_membership",
    }
    unknown = set(data) - known
    if unknown:
        raise _fail(source, f"unknown keys {sorted(unknown)} (known: {sorted(known)})")
    name = data.get("name")
    if not isinstance(name, str) or not name.replace("-", "").isalnum():
        raise _fail(source, f"name must be letters, digits and dashes, got {name!r}")
    duration = _number(data, "duration", 10.0, source, 1.0)
    workers = int(_number(data, "workers", 2, source, 1))
    faults = data.get("faults", [])
    if not isinstance(faults, list):
        raise _fail(source, "faults must be an array of tables ([[faults]])")
    dedup = _flag(data, "dedup", True, source)
    concurrency = _whole(
        data,
        "concurrency",
        1,
        source,
        1,
        2**31,
        "a whole number >= 1 (handlers at once per worker)",
    )
    ordering = data.get("ordering", "key")
    if ordering not in ORDERINGS:
        raise _fail(source, f"ordering must be one of {list(ORDERINGS)}, got {ordering!r}")
    static = _flag(data, "static_membership", False, source)
    # Kafka's group.min.session.timeout.ms is 6000 by default: below, workers never join
    session_timeout = _whole(
        data,
        "session_timeout_ms",
        6000,
        source,
        6000,
        300_000,
        "a whole number of milliseconds, 6000 to 300000",
    )
    cluster = data.get("cluster", "broker")
    if cluster not in CLUSTERS:
        raise _fail(source, f"cluster must be one of {list(CLUSTERS)}, got {cluster!r}")
    parsed = tuple(_fault(f, source, duration, cluster) for f in faults)
    _no_overlaps(parsed, source)
    return Scenario(
        name=name,
        description=str(data.get("description", "")),
        faults=parsed,
        duration=duration,
        workers=workers,
        poison=int(_number(data, "poison", 0, source, 0)),
        dedup=dedup,
        downstream_latency_ms=_number(data, "downstream_latency_ms", 1.0, source, 0.0),
        source=source,
        concurrency=concurrency,
        ordering=ordering,
        cluster=cluster,
        session_timeout_ms=session_timeout,
        static_membership=static,
    )


def load(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot read scenario file {path}: {exc}") from None
    return parse(text, str(path))


def builtin() -> list[Scenario]:
    """The scenarios shipped with the library, in a stable order."""
    folder = resources.files("resilient_kafka.chaos") / "scenarios"
    found = [
        parse(entry.read_text(encoding="utf-8"), f"built-in {entry.name}")
        for entry in folder.iterdir()
        if entry.name.endswith(".toml")
    ]
    return sorted(found, key=lambda s: _ORDER.index(s.name) if s.name in _ORDER else len(_ORDER))


_ORDER = [
    "broker-outage",
    "broker-kill",
    "latency",
    "bandwidth",
    "reset-peer",
    "timeout",
    "slow-close",
    "downstream-outage",
    "poison-pill",
    "consumer-crash",
    "consumer-restart",
    "consumer-restart-static",
    "rebalance-storm",
    "broker-kill-concurrent",
    "consumer-crash-concurrent",
    "rebalance-storm-concurrent",
    "leader-moves",
    "broker-down",
    "request-errors",
]
