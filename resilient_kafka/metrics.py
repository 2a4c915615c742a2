"""Prometheus metrics: the four semconv-derived messaging metrics plus library metrics.

Families are created once per registry, so several consumers and producers in one process share
them (labelled by group and topic) instead of colliding. Label values are bounded: topics, group,
outcome, mode, breaker names and an ``error_type`` capped at 20 distinct values (then
``_OTHER``); never keys, offsets or exception messages.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

# messaging semconv histogram boundaries (= prometheus_client's defaults)
SEMCONV_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
RETRY_DELAY_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
OUTCOMES = ("success", "retry_scheduled", "dead_lettered", "duplicate_skipped")
PAUSE_REASONS = (
    "circuit_open",
    "dlq_flood",
    "dedup_store",
    "schema_registry",
    "retry_backoff",
    "manual",
    "backpressure",
)
BREAKER_STATES = ("closed", "open", "half_open")
_MAX_ERROR_TYPES = 20
OTHER = "_OTHER"

_SYSTEM = "kafka"
_GROUP = "messaging_consumer_group_name"
_DEST = "messaging_destination_name"


class HistogramCell:
    """Bucket counts and sum of one writer (one consumer's thread) for one label set: an
    observation is a bisect and two additions, no lock (``prometheus_client`` takes two)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class _LockedCell(HistogramCell):
    """A cell several threads write (producer delivery reports, slow paths)."""

    __slots__ = ("_lock",)

    def __init__(self, bounds: tuple[float, ...]) -> None:
        super().__init__(bounds)
        self._lock = threading.Lock()

    def observe(self, amount: float) -> None:
        with self._lock:
            super().observe(amount)


class BatchedHistogram:
    """A histogram family read at scrape time from per-writer cells.

    ``cell(*labels)`` gives a writer its own lock-free cell; ``labels(*labels)`` a shared,
    locked one (the ``prometheus_client`` child interface, for code on any thread). A scrape
    adds up the cells of each label set.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: list[str],
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = list(labelnames)
        self._bounds = (*(float(b) for b in buckets), math.inf)
        self._cells: dict[tuple[str, ...], list[HistogramCell]] = {}
        self._shared: dict[tuple[str, ...], HistogramCell] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def _check(self, labels: tuple[str, ...]) -> None:
        if len(labels) != len(self._labelnames):
            raise ValueError(f"{self._name} takes labels {self._labelnames}, got {labels}")

    def cell(self, *labels: str) -> HistogramCell:
        """A new cell for one writer thread."""
        self._check(labels)
        cell = HistogramCell(self._bounds)
        with self._lock:
            self._cells.setdefault(labels, []).append(cell)
        return cell

    def labels(self, *labels: str) -> HistogramCell:
        """The shared cell of ``labels`` (thread-safe observe)."""
        cell = self._shared.get(labels)
        if cell is None:
            self._check(labels)
            with self._lock:
                cell = self._shared.get(labels)
                if cell is None:
                    cell = self._shared[labels] = _LockedCell(self._bounds)
                    self._cells.setdefault(labels, []).append(cell)
        return cell

    def retire(self, cell: HistogramCell, *labels: str) -> None:
        """Fold a writer's cell into the shared one (its consumer closed): memory stays bounded
        however many consumers come and go, and the totals keep counting up."""
        shared = self.labels(*labels)
        with self._lock:
            cells = self._cells.get(labels, [])
            if cell in cells and cell is not shared:
                cells.remove(cell)
                with shared._lock:  # type: ignore[attr-defined]
                    for i, count in enumerate(cell.counts):
                        shared.counts[i] += count
                    shared.sum += cell.sum

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        sums = []
        with self._lock:  # under the lock: retire() must not move a cell mid-sum
            for labels, cells in self._cells.items():
                counts = [0] * len(self._bounds)
                total = 0.0
                for cell in cells:
                    for i, count in enumerate(cell.counts):
                        counts[i] += count
                    total += cell.sum
                sums.append((labels, counts, total))
        les = [floatToGoString(b) for b in self._bounds]  # type: ignore[no-untyped-call]
        for labels, counts, total in sums:
            cumulative, buckets = 0, []
            for le, count in zip(les, counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(list(labels), buckets, total)
        yield family


class Families:
    """Every metric family of the library in one registry."""

    def __init__(self, registry: CollectorRegistry, namespace: str) -> None:
        ns = namespace
        self.error_types: set[str] = set()
        self._lock = threading.Lock()
        # consumers batch their per-record counts; a scrape flushes them first (registered
        # before the families, so the registry collects it first)
        self.consumers: weakref.WeakSet[ConsumerMetrics] = weakref.WeakSet()
        registry.register(_FlushBeforeCollect(self.consumers))
        sc = ["messaging_system", "messaging_operation_name"]
        self.consumed = Counter(
            "messaging_client_consumed_messages",
            "Messages handed to the application by poll()/consume().",
            [*sc, _DEST, _GROUP, "error_type"],
            registry=registry,
        )
        self.sent = Counter(
            "messaging_client_sent_messages",
            "Messages sent, counted at the delivery report (success or final failure).",
            [*sc, _DEST, "error_type"],
            registry=registry,
        )
        # observed once or twice per record: batched cells instead of prometheus_client's
        # locked children (1.4 µs an observation)
        self.operation_duration = BatchedHistogram(
            "messaging_client_operation_duration_seconds",
            "Duration of send (produce to ack), poll (that returned messages) and commit.",
            [*sc, "messaging_operation_type", _DEST, _GROUP, "error_type"],
            SEMCONV_BUCKETS,
            registry,
        )
        self.process_duration = BatchedHistogram(
            "messaging_process_duration_seconds",
            "Duration of each handler invocation in run().",
            [*sc, _DEST, _GROUP, "error_type"],
            SEMCONV_BUCKETS,
            registry,
        )
        self.handled = Counter(
            f"{ns}_messages_handled",
            "One per handled delivery, by final disposition.",
            [_DEST, _GROUP, "outcome", "error_type"],
            registry=registry,
        )
        # outcome="dead_lettered" of messages_handled_total, without error_type: each topic's
        # series exists at 0 from the start, so increase() sees the first dead letter too
        self.dead_letters = Counter(
            f"{ns}_dead_letters",
            "Records sent to a dead-letter topic, by the topic they were first consumed from.",
            [_DEST, _GROUP],
            registry=registry,
        )
        self.forwards_refused = Counter(
            f"{ns}_forwards_refused",
            "Retry or DLQ copies the broker refused for good (too large, a policy, no "
            "authorization), by the topic their record was first consumed from: its offset "
            "stays uncommitted.",
            [_DEST, _GROUP],
            registry=registry,
        )
        self.retries = Counter(
            f"{ns}_retries",
            "Retries: in place (blocking) or through a retry topic.",
            [_DEST, _GROUP, "mode", "error_type"],
            registry=registry,
        )
        self.retry_delay = Histogram(
            f"{ns}_retry_delay_seconds",
            "Time from a failure to the re-attempt of its retry record.",
            [_DEST, _GROUP],
            buckets=RETRY_DELAY_BUCKETS,
            registry=registry,
        )
        self.breaker_state = Gauge(
            f"{ns}_circuitbreaker_state",
            "1 for the breaker's current state, 0 for the others.",
            ["name", "state"],
            registry=registry,
        )
        self.breaker_calls = Counter(
            f"{ns}_circuitbreaker_calls",
            "Calls through a breaker: successful, failed, or ignored (excluded exceptions).",
            ["name", "kind"],
            registry=registry,
        )
        self.breaker_not_permitted = Counter(
            f"{ns}_circuitbreaker_not_permitted_calls",
            "Calls refused because the breaker was open.",
            ["name"],
            registry=registry,
        )
        self.paused = Gauge(
            f"{ns}_consumer_paused_partitions",
            "Partitions currently paused, by reason.",
            [_GROUP, "reason"],
            registry=registry,
        )
        self.rebalances = Counter(
            f"{ns}_consumer_rebalances",
            "Rebalance callbacks: assign, revoke, lost.",
            [_GROUP, "event"],
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{ns}_consumer_records_in_flight",
            "Records whose handler is running (run() with concurrency).",
            [_GROUP],
            registry=registry,
        )
        self.buffered = Gauge(
            f"{ns}_consumer_records_buffered",
            "Records held by run() with concurrency (running or waiting), per partition.",
            [_GROUP, "messaging_destination_name", "messaging_destination_partition_id"],
            registry=registry,
        )
        self.key_backlog = Gauge(
            f"{ns}_consumer_longest_key_backlog",
            "Records waiting behind the busiest key (or partition, with ordering=partition).",
            [_GROUP],
            registry=registry,
        )
        self.key_wait = BatchedHistogram(
            f"{ns}_consumer_key_wait_seconds",
            "Time a record waited behind a busy key (or partition) before it could start "
            "(run() with concurrency; only records that waited).",
            [_GROUP, _DEST],
            SEMCONV_BUCKETS,
            registry,
        )
        self.due_clamped = Counter(
            f"{ns}_retry_due_clamped",
            "Retry records whose rk.due lay further ahead than their tier's delay (a bad header "
            "or the writer's clock ahead): they waited only the delay.",
            [_GROUP, _DEST],
            registry=registry,
        )
        self.completed_skipped = Counter(
            f"{ns}_consumer_completed_skipped",
            "Records skipped because the commit metadata says an earlier owner completed them "
            "(run() with concurrency).",
            [_GROUP, "messaging_destination_name"],
            registry=registry,
        )
        self.completed_overflow = Counter(
            f"{ns}_consumer_completed_offsets_overflow",
            "Times a partition's completed offsets stopped fitting the commit metadata: its "
            "commits carry the longest prefix that fits (a crash handles the rest again).",
            [_GROUP],
            registry=registry,
        )
        self.assigned = Gauge(
            f"{ns}_consumer_assigned_partitions",
            "Partitions currently assigned.",
            [_GROUP],
            registry=registry,
        )
        self.lag = Gauge(
            f"{ns}_consumer_lag",
            "Records behind the high watermark, from librdkafka statistics.",
            [_GROUP, _DEST, "messaging_destination_partition_id"],
            registry=registry,
        )
        self.dedup_lookups = Counter(
            f"{ns}_dedup_lookups",
            "Dedup store lookups: hit, miss, error, lease_lost (a claim ran out before its "
            "handler finished).",
            [_DEST, _GROUP, "result"],
            registry=registry,
        )
        self.transactions = Counter(
            f"{ns}_consumer_transactions",
            "Exactly-once mode: transactions committed and aborted (records then replayed).",
            [_GROUP, "result"],
            registry=registry,
        )
        self.health = _HealthGauges(ns)
        registry.register(self.health)
        self.build_info = Gauge(
            f"{ns}_build_info",
            "Versions of resilient-kafka, confluent-kafka and librdkafka.",
            ["version", "confluent_kafka_version", "librdkafka_version"],
            registry=registry,
        )
        import confluent_kafka

        from resilient_kafka import __version__

        self.build_info.labels(__version__, client_version(), confluent_kafka.libversion()[0]).set(
            1
        )

    def error_type(self, value: str) -> str:
        """``value`` while fewer than 20 distinct error types were seen, else ``_OTHER``."""
        if not value or value in self.error_types:
            return value
        with self._lock:
            if len(self.error_types) < _MAX_ERROR_TYPES:
                self.error_types.add(value)
                return value
        return OTHER


def client_version() -> str:
    """confluent-kafka's version (``version()`` is a string in 2.16, a tuple before)."""
    import confluent_kafka

    found: Any = confluent_kafka.version()
    return str(found[0] if isinstance(found, tuple) else found)


_families: weakref.WeakKeyDictionary[CollectorRegistry, Families] = weakref.WeakKeyDictionary()
_families_lock = threading.Lock()


def families(
    registry: CollectorRegistry | None = None, namespace: str = "resilient_kafka"
) -> Families:
    """The library's metric families in ``registry`` (the global one by default)."""
    registry = REGISTRY if registry is None else registry
    with _families_lock:
        found = _families.get(registry)
        if found is None:
            found = _families[registry] = Families(registry, namespace)
        return found


class _HealthGauges:
    """The consumers' health at scrape time: stalled (records outstanding, no offset moved for
    ``stall_timeout``) and seconds since the last poll, the worst of each group's consumers."""

    def __init__(self, namespace: str) -> None:
        self._ns = namespace
        self._reports: weakref.WeakKeyDictionary[Any, tuple[str, Callable[[], Any]]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def watch(self, owner: Any, group: str, report: Callable[[], Any]) -> None:
        """Report ``owner``'s health (a consumer) under ``group`` while it lives."""
        with self._lock:
            self._reports[owner] = (group, report)

    def forget(self, owner: Any) -> None:
        with self._lock:
            self._reports.pop(owner, None)

    def describe(self) -> list[GaugeMetricFamily]:
        return list(self._empty())

    def _empty(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        ns = self._ns
        return (
            GaugeMetricFamily(
                f"{ns}_consumer_stalled",
                "1 while records are outstanding and no offset moved for stall_timeout.",
                labels=[_GROUP],
            ),
            GaugeMetricFamily(
                f"{ns}_consumer_poll_age_seconds",
                "Seconds since the consumer last polled (live while below max.poll.interval.ms).",
                labels=[_GROUP],
            ),
        )

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            watched = list(self._reports.values())
        worst: dict[str, tuple[float, float]] = {}
        for group, report in watched:
            found = report()
            stalled, age = worst.get(group, (0.0, 0.0))
            worst[group] = (
                max(stalled, float(found.stalled)),
                max(age, found.seconds_since_poll or 0.0),
            )
        stalled_family, age_family = self._empty()
        for group, (stalled, age) in worst.items():
            stalled_family.add_metric([group], stalled)
            age_family.add_metric([group], age)
        yield stalled_family
        yield age_family


class _FlushBeforeCollect:
    """A collector with no metrics of its own: flushes the consumers' batched counts."""

    def __init__(self, consumers: weakref.WeakSet[ConsumerMetrics]) -> None:
        self._consumers = consumers

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        with _families_lock:  # consumers register under it from other threads
            consumers = list(self._consumers)
        for consumer in consumers:
            consumer.flush()
        return []


class ConsumerMetrics:
    """One consumer's view of the families: label children bound per topic, pre-created at 0.

    The per-record counters (consumed, handled successfully) are plain integers on the hot path,
    added to the Prometheus counters by :meth:`flush` (the consumer's housekeeping, at most 50 ms
    apart, and every scrape).
    """

    enabled = True  # (NoMetrics: False; callers skip taking times nobody records)

    def __init__(self, fam: Families, group: str) -> None:
        self.fam = fam
        self.group = group
        self._consumed: dict[str, Any] = {}
        self._success: dict[str, Any] = {}
        # topic -> [consumed, succeeded]: running totals (written by the consumer's thread only)
        # and how much of them the Prometheus counters already hold
        self._counts: dict[str, list[int]] = {}
        self._dedup_counts: dict[tuple[str, str], int] = {}  # (topic, result) -> not flushed
        self._flushed: dict[str, list[int]] = {}
        self._flush_lock = threading.Lock()
        # this consumer's own histogram cells: (family, cell, label values)
        self._cells: list[tuple[BatchedHistogram, HistogramCell, tuple[str, ...]]] = []
        self._poll: dict[str, Any] = {}  # bound observe() of the poll-duration child per topic
        self._process_ok: dict[str, Callable[[float], None]] = {}
        self._children: dict[tuple[Any, ...], Any] = {}  # bounded: topics x capped error types
        for reason in PAUSE_REASONS:
            fam.paused.labels(group, reason).set(0)
        for event in ("assign", "revoke", "lost"):
            fam.rebalances.labels(group, event)
        fam.assigned.labels(group).set(0)
        with _families_lock:
            fam.consumers.add(self)

    def prepare_topic(self, topic: str) -> None:
        """Create the known label combinations of ``topic`` at 0."""
        fam, group = self.fam, self.group
        self._consumed[topic] = fam.consumed.labels(_SYSTEM, "poll", topic, group, "").inc
        self._success[topic] = fam.handled.labels(topic, group, "success", "").inc
        with self._flush_lock:
            self._counts.setdefault(topic, [0, 0])
            self._flushed.setdefault(topic, [0, 0])
        if topic not in self._poll:
            for family, labels, observers in (
                (
                    fam.operation_duration,
                    (_SYSTEM, "poll", "receive", topic, group, ""),
                    self._poll,
                ),
                (fam.process_duration, (_SYSTEM, "process", topic, group, ""), self._process_ok),
            ):
                cell = family.cell(*labels)
                self._cells.append((family, cell, labels))
                observers[topic] = cell.observe
        for outcome in OUTCOMES:
            fam.handled.labels(topic, group, outcome, "")
        for mode in ("blocking", "topic"):
            fam.retries.labels(topic, group, mode, "")
        fam.dedup_lookups.labels(topic, group, "hit")
        fam.dedup_lookups.labels(topic, group, "miss")
        fam.dead_letters.labels(topic, group)
        fam.forwards_refused.labels(topic, group)

    def _totals(self, topic: str) -> list[int]:
        counts = self._counts.get(topic)
        if counts is None:
            self.prepare_topic(topic)
            counts = self._counts[topic]
        return counts

    def consumed(self, topic: str, count: int = 1) -> None:
        counts = self._counts.get(topic) or self._totals(topic)
        counts[0] += count

    def polled(self, topic: str, seconds: float) -> None:
        """One record handed out by a poll that took ``seconds``."""
        counts = self._counts.get(topic) or self._totals(topic)
        counts[0] += 1
        self._poll[topic](seconds)

    def handled(self, topic: str, count: int) -> None:
        """``count`` records handed out and handled at once (a batch)."""
        counts = self._counts.get(topic) or self._totals(topic)
        counts[0] += count
        counts[1] += count

    def success(self, topic: str) -> None:
        counts = self._counts.get(topic) or self._totals(topic)
        counts[1] += 1

    def retire(self) -> None:
        """The consumer closed: flush, and fold its histogram cells into the shared ones."""
        self.flush()
        for family, cell, labels in self._cells:
            family.retire(cell, *labels)
        self._cells.clear()
        self._poll.clear()
        self._process_ok.clear()

    def flush(self) -> None:
        """Add the counts batched since the last flush to the Prometheus counters."""
        with self._flush_lock:
            if self._dedup_counts:
                for (topic, result), count in self._dedup_counts.items():
                    self._child(self.fam.dedup_lookups, topic, self.group, result).inc(count)
                self._dedup_counts.clear()
            for topic, counts in self._counts.items():
                flushed = self._flushed[topic]
                consumed, succeeded = counts[0], counts[1]
                if consumed != flushed[0]:
                    self._consumed[topic](consumed - flushed[0])
                    flushed[0] = consumed
                if succeeded != flushed[1]:
                    self._success[topic](succeeded - flushed[1])
                    flushed[1] = succeeded

    def _child(self, family: Any, *labels: str) -> Any:
        """``family.labels(*labels)``, cached (labels() costs ~2 µs)."""
        key = (id(family), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*labels)
        return child

    def outcome(self, topic: str, outcome: str, error_type: str) -> None:
        error_type = self.fam.error_type(error_type)
        self._child(self.fam.handled, topic, self.group, outcome, error_type).inc()

    def dead_lettered(self, origin: str) -> None:
        """A record of ``origin`` (the topic it was first consumed from) went to its DLQ."""
        self._child(self.fam.dead_letters, origin, self.group).inc()

    def forward_refused(self, origin: str) -> None:
        """A retry or DLQ copy of a record of ``origin`` was refused for good."""
        self._child(self.fam.forwards_refused, origin, self.group).inc()

    def dedup(self, topic: str, result: str, count: int = 1) -> None:
        """``count`` dedup store lookups: hit (a duplicate), miss, or error (counted here,
        added to Prometheus at the next flush: a counter's inc() takes a lock and ~1 µs)."""
        key = (topic, result)
        with self._flush_lock:  # workers count too (run() with concurrency)
            self._dedup_counts[key] = self._dedup_counts.get(key, 0) + count

    def retry(self, topic: str, mode: str, error_type: str) -> None:
        error_type = self.fam.error_type(error_type)
        self._child(self.fam.retries, topic, self.group, mode, error_type).inc()

    def retry_delay(self, topic: str, seconds: float) -> None:
        self.fam.retry_delay.labels(topic, self.group).observe(max(0.0, seconds))

    def process_ok(self, topic: str) -> Callable[[float], None]:
        """Where the durations of ``topic``'s successful handler calls go: a caller that holds
        on to it observes in one call."""
        observe = self._process_ok.get(topic)
        if observe is None:
            self.prepare_topic(topic)
            observe = self._process_ok[topic]
        return observe

    def process(self, topic: str, seconds: float, error_type: str) -> None:
        if not error_type:
            (self._process_ok.get(topic) or self.process_ok(topic))(seconds)
            return
        self._child(
            self.fam.process_duration,
            _SYSTEM,
            "process",
            topic,
            self.group,
            self.fam.error_type(error_type),
        ).observe(seconds)

    def poll(self, topic: str, seconds: float) -> None:
        observe = self._poll.get(topic)
        if observe is None:
            self.prepare_topic(topic)
            observe = self._poll[topic]
        observe(seconds)

    def commit(self, seconds: float, error_type: str = "") -> None:
        self.fam.operation_duration.labels(
            _SYSTEM, "commit", "settle", "", self.group, self.fam.error_type(error_type)
        ).observe(seconds)

    def transaction(self, result: str) -> None:
        """Exactly-once mode: a transaction ``committed`` or ``aborted``."""
        self._child(self.fam.transactions, self.group, result).inc()

    def rebalance(self, event: str, assigned: int | None = None) -> None:
        self.fam.rebalances.labels(self.group, event).inc()
        if assigned is not None:
            self.fam.assigned.labels(self.group).set(assigned)

    def paused(self, reason: str, count: int) -> None:
        self.fam.paused.labels(self.group, reason).set(count)

    def work(self, running: int, held: dict[tuple[str, int], int], backlog: int) -> None:
        """run() with concurrency: handlers running, records held per partition, the longest
        queue behind one key (partitions no longer held are removed)."""
        fam, group = self.fam, self.group
        fam.in_flight.labels(group).set(running)
        fam.key_backlog.labels(group).set(backlog)
        shown = self.__dict__.setdefault("_buffered_shown", set())
        for topic, partition in shown - set(held):
            with contextlib.suppress(KeyError):
                fam.buffered.remove(group, topic, str(partition))
        for (topic, partition), count in held.items():
            fam.buffered.labels(group, topic, str(partition)).set(count)
        shown.clear()
        shown.update(held)

    def key_wait(self, topic: str, seconds: float) -> None:
        self._child(self.fam.key_wait, self.group, topic).observe(seconds)

    def due_clamped(self, topic: str) -> None:
        self._child(self.fam.due_clamped, self.group, topic).inc()

    def completed_skipped(self, topic: str) -> None:
        self._child(self.fam.completed_skipped, self.group, topic).inc()

    def completed_overflow(self) -> None:
        self._child(self.fam.completed_overflow, self.group).inc()

    def stats(self, stats_json: str) -> None:
        """Lag per partition from a librdkafka statistics document (``consumer_lag_stored``:
        the library stores offsets only past done records, so this is the true backlog)."""
        try:
            stats = json.loads(stats_json)
        except ValueError:
            return
        for topic, info in (stats.get("topics") or {}).items():
            for partition, p in (info.get("partitions") or {}).items():
                if partition == "-1":
                    continue
                lag = p.get("consumer_lag_stored", -1)
                if lag is None or lag < 0:
                    lag = p.get("consumer_lag", -1)
                if lag is not None and lag >= 0:
                    self.fam.lag.labels(self.group, topic, partition).set(lag)


class NoMetrics:
    """Metrics switched off: the calls of :class:`ConsumerMetrics`, doing nothing (so the hot
    path carries no ``if metrics`` branches)."""

    fam = None
    enabled = False

    def _nothing(self, *args: Any, **kwargs: Any) -> None:
        return None

    prepare_topic = polled = retire = flush = _nothing
    # called once per record: a C-level no-op taking the topic costs a fraction of a call
    success = staticmethod(id)
    consumed = outcome = dedup = retry = retry_delay = process = poll = commit = _nothing
    forward_refused = dead_lettered = _nothing
    transaction = rebalance = paused = stats = work = _nothing
    completed_skipped = completed_overflow = key_wait = due_clamped = handled = _nothing

    def process_ok(self, topic: str) -> Callable[[float], None]:
        return self._nothing


class BreakerMetrics:
    """pybreaker listener feeding the breaker metrics."""

    def __init__(self, fam: Families, name: str, state: str) -> None:
        self.fam = fam
        self.name = name
        for kind in ("successful", "failed", "ignored"):
            fam.breaker_calls.labels(name, kind)
        fam.breaker_not_permitted.labels(name)
        self.set_state(state)

    def set_state(self, state: str) -> None:
        state = state.replace("-", "_")
        for known in BREAKER_STATES:
            self.fam.breaker_state.labels(self.name, known).set(1 if known == state else 0)

    def call(self, kind: str) -> None:
        self.fam.breaker_calls.labels(self.name, kind).inc()

    def not_permitted(self) -> None:
        self.fam.breaker_not_permitted.labels(self.name).inc()


def serve_metrics(
    port: int = 0,
    addr: str = "127.0.0.1",
    registry: CollectorRegistry | None = None,
    health: Callable[[], Any] | None = None,
) -> tuple[Any, str]:
    """Serve ``/metrics`` over HTTP in a daemon thread; returns ``(server, url)``.

    ``port=0`` picks a free port; a port already taken raises :class:`ConfigurationError`. With
    ``health`` (a callable returning a :class:`~resilient_kafka.health.HealthReport`),
    ``/healthz`` and ``/readyz`` answer 200 or 503 with the report as JSON. Call
    ``server.shutdown()`` to stop it and free the port (a consumer restarted in the same
    process binds it again).
    """
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer

    from resilient_kafka.errors import ConfigurationError

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """Probes and scrapes come every few seconds: not logged."""

    class Server(ThreadingWSGIServer):
        def shutdown(self) -> None:
            """Stop serving and close the listening socket (else the port stays taken)."""
            super().shutdown()
            self.server_close()

    app = make_wsgi_app(REGISTRY if registry is None else registry)
    if health is not None:
        app = _with_health(app, health)
    try:
        server = make_server(addr, port, app, Server, handler_class=Quiet)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc} (metrics_port: "
            "another process, or a consumer of this one not closed, holds it; 0 picks a free "
            "port)"
        ) from exc
    threading.Thread(
        target=server.serve_forever, name="resilient-kafka-metrics", daemon=True
    ).start()
    return server, f"http://{addr}:{server.server_port}/metrics"


def _with_health(metrics_app: Any, health: Callable[[], Any]) -> Any:
    """``metrics_app`` with ``/healthz`` (live) and ``/readyz`` (ready) in front of it."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in ("/healthz", "/readyz"):
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        report = health()
        ok = report.live if path == "/healthz" else report.ready
        body = json.dumps(report.as_dict()).encode()
        start_response(
            "200 OK" if ok else "503 Service Unavailable",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [body] if environ.get("REQUEST_METHOD") != "HEAD" else []

    return app
