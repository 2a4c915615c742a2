"""Regression tests for the core fixes of ResilientConsumer, on the real embedded broker.

Each test shows one defect through public behaviour: what poll()/consume()/run()/fail()/close()
do, the records that land in retry topics, Prometheus metrics read from a private registry,
finished OpenTelemetry spans, and librdkafka's native threads in /proc/self/task.
"""

from __future__ import annotations

import gc
import json
import socket
import sys
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from resilient_kafka import (
    CircuitBreaker,
    ConfigurationError,
    ResilientConsumer,
    ResilientProducer,
    RetryPolicy,
    _admin,
    headers,
)
from resilient_kafka.errors import TopicError
from resilient_kafka.testing import KafkaCluster
from tests.helpers import metric_total, rdk_threads, run_until, wait_for

# Tansu answers a JoinGroup after about half of session.timeout.ms: joins in ~1.5 s
_QUICK_JOIN = {"session.timeout.ms": 3000, "heartbeat.interval.ms": 500}

# -- helpers ------------------------------------------------------------------------------------


def _group() -> str:
    return f"g{uuid.uuid4().hex[:8]}"


def _produce(kafka: KafkaCluster, topic: str, records: dict[int, list[str]]) -> None:
    """Produce ``{partition: [value, ...]}`` and wait for every acknowledgement."""
    producer = Producer(kafka.producer_config(acks="all"))
    for partition, values in records.items():
        for value in values:
            producer.produce(topic, key=value, value=value, partition=partition)
    assert producer.flush(30) == 0


def _next_message(consumer: ResilientConsumer, timeout: float = 30.0) -> Message:
    """Poll until a message (not an error event) arrives."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        if msg is not None and msg.error() is None:
            return msg
    raise AssertionError(f"no message within {timeout}s")


class _Reader:
    """Reads every partition of a topic from its beginning (assign: no group join); waits for
    a topic that does not exist yet."""

    def __init__(self, kafka: KafkaCluster, topic: str) -> None:
        self.records: list[Message] = []
        self._topic = topic
        self._consumer = Consumer(
            kafka.client_config(group_id=f"reader-{uuid.uuid4().hex[:6]}", enable_auto_commit=False)
        )
        self._assigned = False

    def poll(self, timeout: float = 0.1) -> list[Message]:
        if not self._assigned:
            found = self._consumer.list_topics(timeout=5).topics.get(self._topic)
            if found is None or found.error is not None or not found.partitions:
                time.sleep(timeout)  # not created yet: look again on the next call
                return self.records
            self._consumer.assign([TopicPartition(self._topic, p, 0) for p in found.partitions])
            self._assigned = True
        msg = self._consumer.poll(timeout)
        if msg is not None and msg.error() is None:
            self.records.append(msg)
        return self.records

    def close(self) -> None:
        self._consumer.close()


def _read(kafka: KafkaCluster, topic: str, count: int, timeout: float = 20.0) -> list[Message]:
    reader = _Reader(kafka, topic)
    try:
        deadline = time.monotonic() + timeout
        while len(reader.poll(0.2)) < count:
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{len(reader.records)} of {count} record(s) in {topic} after {timeout}s"
                )
        return reader.records
    finally:
        reader.close()


def _down(*_args: object) -> None:
    raise ConnectionError("payment service unavailable")


def _is_open(call: Callable[[], object]) -> bool:
    """False if ``call`` (a poll of a client) finds its client closed."""
    try:
        call()
    except RuntimeError as exc:
        if "closed" in str(exc):
            return False
        raise
    return True


def _retry_copy_waiting(kafka: KafkaCluster, topic: str, group: str, retry: RetryPolicy) -> None:
    """A first member of ``group`` (assign: no group join) fails ``topic``'s first record: its
    retry copy waits in tier 1, where this group never committed."""
    first = ResilientConsumer(
        kafka.client_config(group_id=group), retry=retry, registry=CollectorRegistry()
    )
    try:
        first.assign([TopicPartition(topic, 0, 0)])
        first.fail(_next_message(first), ValueError("downstream said no"))
    finally:
        first.close()
    _read(kafka, f"{topic}.{group}.retry.1", 1)


def _tracing() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


# -- 1: a refused construction leaks the librdkafka handle --------------------------------------


@pytest.mark.parametrize("setting", ["trace_parent", "transactional_id", "metrics_port"])
def test_a_refused_construction_leaves_no_client_running(kafka: KafkaCluster, setting: str) -> None:
    """A constructor that refuses its settings (or cannot serve metrics) closes the librdkafka
    clients it already made: their threads are gone even while the caller still holds the
    exception (whose traceback references the half-built consumer)."""
    config = kafka.client_config(group_id=_group())
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    options: dict[str, Any] = {
        "trace_parent": {"trace_parent": "bogus"},
        "transactional_id": {"producer_config": {"transactional.id": "x"}},
        "metrics_port": {"metrics_port": busy.getsockname()[1]},
    }[setting]
    gc.collect()
    baseline = rdk_threads()
    try:
        with pytest.raises((ConfigurationError, OSError)) as refused:
            ResilientConsumer(config, registry=CollectorRegistry(), **options)
        gc.collect()
        wait_for(
            lambda: rdk_threads() <= baseline,
            3,
            f"librdkafka threads to end after the refused construction ({refused.value!r}); "
            f"{rdk_threads() - baseline} still running",
        )
    finally:
        busy.close()


# -- 2: records held during an outage keep their raw bytes forever --------------------------------


class _Payload:
    """A deserialized value; instances are counted through weak references."""

    __slots__ = ("__weakref__", "text")

    def __init__(self, text: str) -> None:
        self.text = text


def test_records_held_during_an_outage_are_released(kafka: KafkaCluster, topic_factory) -> None:
    """A long outage (a breaker that keeps refusing the probes) with a value deserializer does
    not keep every probed record alive: the deserialized values of refused probes are freed."""
    topic = topic_factory(1)
    _produce(kafka, topic, {0: ["v0", "v1", "v2"]})
    live: weakref.WeakSet[_Payload] = weakref.WeakSet()

    def deserialize(raw: bytes | None, _ctx: object) -> _Payload:
        payload = _Payload((raw or b"").decode())
        live.add(payload)
        return payload

    breaker = CircuitBreaker("payments", fail_max=1, reset_timeout=0.05)
    consumer = ResilientConsumer(
        kafka.client_config(group_id=_group(), enable_auto_commit=False),
        value_deserializer=deserialize,
        breakers=[breaker],
        registry=CollectorRegistry(),
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    calls = Counter[str]()

    def handler(msg: Message) -> None:
        calls[msg.value().text] += 1
        breaker.call(_down)

    run_until(consumer, handler, lambda: calls.total() >= 16)
    assert consumer.outage is not None  # every probe was refused: the outage never ended
    gc.collect()
    # the held record (and at most a trial record) may be kept; not one record per probe
    assert len(live) <= 3, (
        f"{len(live)} deserialized records still alive after {calls.total()} refused probes "
        f"({dict(calls)}): held records are never released"
    )


# -- 3: probes and resume() ignore who paused a partition ----------------------------------------


def test_a_partition_the_application_paused_stays_paused_through_probes(
    kafka: KafkaCluster, topic_factory
) -> None:
    """During an outage no probe (held record or trial) takes a record from a partition the
    application paused itself: it delivers nothing until the application resumes it."""
    topic = topic_factory(2)
    _produce(kafka, topic, {0: ["a0", "a1", "a2"], 1: ["b0", "b1", "b2"]})
    breaker = CircuitBreaker("payments", fail_max=1, reset_timeout=0.1)
    consumer = ResilientConsumer(
        kafka.client_config(group_id=_group(), enable_auto_commit=False),
        breakers=[breaker],
        registry=CollectorRegistry(),
    )
    delivered: list[tuple[int, str]] = []
    try:
        consumer.assign([TopicPartition(topic, 0, 0), TopicPartition(topic, 1, 0)])
        consumer.pause([TopicPartition(topic, 1)])  # the application's own reason
        deadline = time.monotonic() + 15
        # the first delivery opens the breaker; then probes alternate: the held record, a trial
        while len(delivered) < 8 and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None or msg.error() is not None:
                continue
            delivered.append((msg.partition(), msg.value().decode()))
            try:
                breaker.call(_down)
            except Exception as exc:
                consumer.fail(msg, exc)
        assert consumer.outage is not None
    finally:
        consumer.close()
    assert len(delivered) >= 4, f"too few probes to judge: {delivered}"
    assert not [d for d in delivered if d[0] == 1], (
        f"records of the partition the application paused were delivered: {delivered}"
    )


def test_resume_during_an_outage_does_not_unpause_held_partitions(
    kafka: KafkaCluster, topic_factory
) -> None:
    """The application's resume() of every partition during an outage does not make the
    partitions the outage paused fetch records again (only probes may): librdkafka's
    statistics show no record received between the resume() and the next probe."""
    topic = topic_factory(2)
    _produce(kafka, topic, {0: ["a0", "a1", "a2"], 1: ["b0", "b1", "b2"]})
    received: dict[str, int] = {}

    def stats_cb(stats_json: str) -> None:
        parts = json.loads(stats_json).get("topics", {}).get(topic, {}).get("partitions", {})
        received["count"] = sum(p.get("rxmsgs", 0) for k, p in parts.items() if k != "-1")
        received["reports"] = received.get("reports", 0) + 1

    breaker = CircuitBreaker("payments", fail_max=1, reset_timeout=60)  # no probe in the test
    consumer = ResilientConsumer(
        kafka.client_config(
            {"stats_cb": stats_cb},
            group_id=_group(),
            enable_auto_commit=False,
            statistics_interval_ms=100,
        ),
        breakers=[breaker],
        registry=CollectorRegistry(),
    )
    try:
        partitions = [TopicPartition(topic, 0, 0), TopicPartition(topic, 1, 0)]
        consumer.assign(partitions)
        msg = _next_message(consumer)
        try:
            breaker.call(_down)
        except Exception as exc:
            consumer.fail(msg, exc)
        assert consumer.outage is not None
        assert consumer.poll(0.5) is None  # both partitions are paused now

        def quiet_for(seconds: float) -> int:
            """Poll until ``seconds`` pass with no record received; the count then."""
            since, last = time.monotonic(), received.get("count")
            deadline = time.monotonic() + 15
            while time.monotonic() - since < seconds:
                assert time.monotonic() < deadline, "records kept arriving"
                assert consumer.poll(0.1) is None
                if received.get("count") != last:
                    since, last = time.monotonic(), received.get("count")
            return received["count"]

        before = quiet_for(1.0)
        consumer.resume(partitions)  # the application resumes what it never paused
        reports, resumed = received["reports"], time.monotonic()
        # two seconds and five statistics reports later (librdkafka's fetches are seen by then)
        while time.monotonic() - resumed < 2 or received["reports"] < reports + 5:
            assert time.monotonic() - resumed < 15, "no statistics reports"
            assert consumer.poll(0.1) is None, "a record was handed out during the outage"
        assert consumer.outage is not None
        assert received["count"] == before, (
            f"resume() during the outage made its paused partitions fetch "
            f"{received['count'] - before} record(s)"
        )
    finally:
        consumer.close()


# -- 4: retry/DLQ topic preparation under assign() -----------------------------------------------


def test_a_failed_topic_creation_under_assign_is_retried(
    kafka: KafkaCluster, topic_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With assign(), retry/DLQ topics whose creation failed are created later: the retry copy
    still lands in the retry topic (the cluster does not auto-create topics)."""
    topic, group = topic_factory(1), _group()
    _produce(kafka, topic, {0: ["v0"]})
    real = _admin.create_topics
    attempts: list[list[str]] = []

    def flaky(admin: Any, wanted: Any, **kwargs: Any) -> None:
        attempts.append(sorted(wanted))
        if len(attempts) == 1:
            raise TopicError("injected: could not create topics", dict.fromkeys(wanted, "down"))
        real(admin, wanted, **kwargs)

    monkeypatch.setattr(_admin, "create_topics", flaky)
    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, enable_auto_commit=False),
        retry=RetryPolicy(delays=(0.2,)),
        # no auto-creation, as on most production clusters; copies to nowhere expire soon
        producer_config={"allow.auto.create.topics": False, "message.timeout.ms": 5000},
        forward_timeout=5,
        registry=CollectorRegistry(),
    )
    retry_topic = f"{topic}.{group}.retry.1"
    reader = _Reader(kafka, retry_topic)
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        wait_for(lambda: attempts, 10, "assign() to start creating the retry/DLQ topics")
        msg = _next_message(consumer)
        consumer.fail(msg, ValueError("downstream said no"))
        deadline = time.monotonic() + 10
        while not reader.poll(0.1):
            consumer.poll(0.1)
            assert time.monotonic() < deadline, (
                f"the retry copy never reached {retry_topic}: topic creation was tried "
                f"{len(attempts)} time(s) and never again after the failure"
            )
        assert reader.records[0].value() == b"v0"
    finally:
        reader.close()
        consumer.close()


def test_a_metadata_error_in_fail_neither_escapes_nor_loses_the_record(
    kafka: KafkaCluster,
) -> None:
    """A KafkaException from list_topics while fail() prepares the retry topics (assign()
    before the topic existed) does not escape fail(): the copy still lands in the retry topic
    and the source offset becomes committable."""
    topic, group = f"rk-core-late-{uuid.uuid4().hex[:8]}", _group()
    consumer = ResilientConsumer(
        kafka.client_config(
            group_id=group, enable_auto_commit=False, topic_metadata_refresh_interval_ms=500
        ),
        retry=RetryPolicy(delays=(0.2,)),
        registry=CollectorRegistry(),
    )
    retry_topic = f"{topic}.{group}.retry.1"
    reader = None
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])  # the topic does not exist yet
        kafka.create_topics({topic: 1})
        _produce(kafka, topic, {0: ["v0"]})
        msg = _next_message(consumer)
        real = consumer.list_topics
        faults = [KafkaException(KafkaError(KafkaError._TRANSPORT, "injected metadata failure"))]

        def flaky(*args: Any, **kwargs: Any) -> Any:
            if faults:
                raise faults.pop()
            return real(*args, **kwargs)

        consumer.list_topics = flaky  # type: ignore[method-assign]  # one transient failure
        try:
            consumer.fail(msg, ValueError("downstream said no"))
        except KafkaException as exc:
            pytest.fail(f"fail() raised {exc!r}: the record left the hand with no copy sent")
        reader = _Reader(kafka, retry_topic)
        deadline = time.monotonic() + 20
        while not reader.poll(0.1):
            consumer.poll(0.1)
            assert time.monotonic() < deadline, f"the retry copy never reached {retry_topic}"
        committed: list[TopicPartition] = []
        while not committed or committed[0].offset != 1:
            consumer.poll(0.1)
            committed = consumer.commit(asynchronous=False) or []
            assert time.monotonic() < deadline, f"the source offset stalls: {committed}"
    finally:
        if reader is not None:
            reader.close()
        consumer.close()
        kafka.delete_topics([topic])


@pytest.mark.parametrize("refresh_fails_once", [False, True])
def test_tiers_another_consumer_created_are_consumed_without_waiting_for_a_metadata_refresh(
    kafka: KafkaCluster,
    topic_factory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    refresh_fails_once: bool,
) -> None:
    """Consumers of a group deployed together: one creates the retry tiers, the others find
    them there. librdkafka joins a group with the subscribed topics its metadata knows, and
    looks again only at a full metadata refresh (5 minutes by default), so a consumer that
    joined before the tiers existed and did not create them itself must ask for one. Without
    it the tiers were left unassigned and retry copies sat in them unconsumed (the chaos
    suite's workers showed it: one of them joined without its tiers). A refresh that fails
    is tried again."""
    import threading

    from resilient_kafka import _topics

    topic, group = topic_factory(1), _group()
    prepare = _topics.Topics._prepare
    created_elsewhere = threading.Event()

    def prepare_after_another_consumer(self, topics):  # type: ignore[no-untyped-def]
        created_elsewhere.wait(30)  # another member created them meanwhile: none created here
        return prepare(self, topics)

    monkeypatch.setattr(_topics.Topics, "_prepare", prepare_after_another_consumer)
    refreshes: list[float] = []

    class _Native(Consumer):  # what _topics calls librdkafka's full metadata request through
        @staticmethod
        def list_topics(native: Any, timeout: float = -1) -> Any:  # type: ignore[override]
            refreshes.append(timeout)
            if refresh_fails_once and len(refreshes) == 1:
                raise KafkaException(KafkaError(KafkaError._TRANSPORT, "injected: no answer"))
            return Consumer.list_topics(native, timeout=timeout)

    monkeypatch.setattr(_topics, "Consumer", _Native)
    consumer = ResilientConsumer(
        kafka.client_config(_QUICK_JOIN, group_id=group, auto_offset_reset="earliest"),
        retry=RetryPolicy(delays=(0.2,)),
        registry=CollectorRegistry(),
    )
    assigned = threading.Event()
    attempts: list[str] = []

    def handler(msg: Message) -> None:
        attempts.append(msg.topic() or "")
        if len(attempts) == 1:
            raise ValueError("fails once")

    consumer.subscribe([topic], on_assign=lambda c, ps: assigned.set())
    worker = threading.Thread(target=consumer.run, args=(handler,), daemon=True)
    worker.start()
    try:
        wait_for(assigned.is_set, 30, "the source partition assigned")
        tiers = consumer.retry_topics(topic)
        kafka.create_topics({name: 1 for name in [*tiers, consumer.dead_letter_topic(topic)]})
        created_elsewhere.set()
        _produce(kafka, topic, {0: ["v0"]})
        # the group's rejoin with the tiers takes a Tansu JoinGroup (half the session timeout)
        wait_for(lambda: len(attempts) >= 2, 30, "the retry copy to be consumed")
        assert attempts == [topic, tiers[0]]
        assert len(refreshes) == (2 if refresh_fails_once else 1), refreshes
        failed = [r.getMessage() for r in caplog.records if "metadata refresh" in r.getMessage()]
        assert len(failed) == refresh_fails_once, failed
    finally:
        created_elsewhere.set()
        consumer.stop()
        worker.join(30)
        consumer.close()


# -- 5: the library's own assign inside the application's rebalance callback ------------------


def test_cooperative_application_on_assign_that_assigns_itself(
    kafka: KafkaCluster, topic_factory
) -> None:
    """With cooperative-sticky assignment, an on_assign callback that calls
    incremental_assign(partitions) itself (as confluent-kafka allows) works: nothing is
    assigned twice, poll() raises nothing, and records flow."""
    topic, group = topic_factory(1), _group()
    _produce(kafka, topic, {0: ["v0"]})
    consumer = ResilientConsumer(
        kafka.client_config(
            _QUICK_JOIN,
            group_id=group,
            auto_offset_reset="earliest",
            partition_assignment_strategy="cooperative-sticky",
        ),
        registry=CollectorRegistry(),
    )

    seen: list[str] = []

    def on_assign(c: ResilientConsumer, partitions: list[TopicPartition]) -> None:
        seen.extend(tp.topic for tp in partitions)
        c.incremental_assign(partitions)  # the application assigns, as confluent-kafka allows

    consumer.subscribe([topic], on_assign=on_assign)
    tier = f"{topic}.{group}.retry.1"
    try:
        try:
            msg = _next_message(consumer)
            # the tier comes along with the application's own partitions (perhaps in a later
            # rebalance: it is created in the background), though the application never sees it
            deadline = time.monotonic() + 30
            while tier not in {tp.topic for tp in Consumer.assignment(consumer)}:
                assert time.monotonic() < deadline, "the retry tier was never assigned"
                consumer.poll(0.1)
        except:  # noqa: E722  # confluent re-raises a callback's KafkaError: no BaseException
            raise AssertionError(f"poll() raised {sys.exc_info()[1]!r}") from None
        assert msg.value() == b"v0"
        assert set(seen) == {topic}, "the application's on_assign saw a retry tier"
        assert {tp.topic for tp in consumer.assignment()} == {topic}
    finally:
        consumer.close()


def test_eager_application_on_assign_keeps_fresh_tiers_at_their_beginning(
    kafka: KafkaCluster, topic_factory
) -> None:
    """A retry copy written before this member joined is consumed even when the application's
    on_assign assigns the partitions itself with no offsets of its own (OFFSET_INVALID: "let the
    consumer decide"): a tier partition the group never committed on starts at its beginning."""
    topic, group = topic_factory(1), _group()
    _produce(kafka, topic, {0: ["v0"]})
    retry = RetryPolicy(delays=(0.2,))
    _retry_copy_waiting(kafka, topic, group, retry)

    second = ResilientConsumer(
        kafka.client_config(_QUICK_JOIN, group_id=group), retry=retry, registry=CollectorRegistry()
    )

    def on_assign(c: ResilientConsumer, partitions: list[TopicPartition]) -> None:
        c.assign([TopicPartition(tp.topic, tp.partition) for tp in partitions])

    second.subscribe([topic], on_assign=on_assign)
    try:
        msg = _next_message(second, timeout=10)
        assert (msg.value(), headers.attempt(msg)) == (b"v0", 1)
    finally:
        second.close()


# -- 6: exactly-once: a probe fails against a stale "produced" mark ----------------------------


def test_a_failed_probe_does_not_abort_other_topics_work(
    kafka: KafkaCluster, topic_factory
) -> None:
    """Exactly-once, breaker scoped to topic A: while A waits out an outage, B's records write
    output; A's probe then fails on its own (a plain exception, no output written). That is
    routed to a retry tier; it does not abort the transaction holding B's work."""
    source_a = topic_factory(1, suffix="a")
    source_b = topic_factory(1, suffix="b")
    out = topic_factory(1, suffix="out")
    group = _group()
    registry = CollectorRegistry()
    breaker = CircuitBreaker("payments", fail_max=1, reset_timeout=0.5)
    consumer = ResilientConsumer(
        kafka.client_config(_QUICK_JOIN, group_id=group, auto_offset_reset="earliest"),
        exactly_once=True,
        transaction_interval=30,  # B's work stays in the open transaction
        retry=RetryPolicy(delays=(0.2,)),
        breakers=[breaker],
        breaker_scope={"payments": [source_a]},
        registry=registry,
    )
    b_values = [f"b{i}" for i in range(5)]
    handled: Counter[str] = Counter()
    b_sent: list[bool] = []

    def handler(msg: Message) -> None:
        value = msg.value().decode()
        handled[f"{value}@{headers.attempt(msg)}"] += 1
        if value.startswith("b"):
            consumer.producer.produce(out, value=msg.value())
            return
        if sum(handled[f"{v}@0"] for v in b_values) < len(b_values):
            breaker.call(_down)  # trips (then refuses probes) until B's records are handled
        raise ValueError("invalid order")  # the probe: the downstream answered, A is bad

    consumer.subscribe([source_a, source_b])
    _produce(kafka, source_a, {0: ["a0"]})

    def done() -> bool:
        if consumer.outage is not None and not b_sent:
            b_sent.append(True)
            _produce(kafka, source_b, {0: b_values})  # B flows while A is paused
        return routed() > 0 or aborted() > 0  # A's retry copy sent, or the failure

    def routed() -> float:
        return metric_total(
            registry,
            "resilient_kafka_messages_handled_total",
            messaging_destination_name=source_a,
            outcome="retry_scheduled",
        )

    def aborted() -> float:
        return metric_total(
            registry,
            "resilient_kafka_consumer_transactions_total",
            messaging_consumer_group_name=group,
            result="aborted",
        )

    run_until(consumer, handler, done)
    count = aborted()
    assert count == 0, (
        f"{count:.0f} transaction(s) aborted for a probe that wrote nothing; "
        f"handled: {dict(handled)}"
    )
    assert all(handled[f"{v}@0"] == 1 for v in b_values), f"B replayed: {dict(handled)}"
    assert routed() == 1  # A's probe failed on its own: routed to its retry tier


# -- 7: one breaker opening turns every later failure of the batch into an outage -------------


def test_a_later_record_of_a_consume_batch_fails_on_its_own(
    kafka: KafkaCluster, topic_factory
) -> None:
    """consume() hands out a batch; the first record trips the breaker (held: an outage), a
    later record of the same batch fails on its own without calling the breaker: it goes to
    its retry tier, it is not taken for a symptom of the outage."""
    topic, group = topic_factory(1), _group()
    _produce(kafka, topic, {0: ["v0", "v1", "v2"]})
    registry = CollectorRegistry()
    breaker = CircuitBreaker("payments", fail_max=1, reset_timeout=60)
    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, enable_auto_commit=False),
        retry=RetryPolicy(delays=(0.2,)),
        breakers=[breaker],
        registry=registry,
    )
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        deadline = time.monotonic() + 30
        batch: list[Message] = []
        while not batch:
            assert time.monotonic() < deadline, "no batch within 30s"
            batch = [m for m in consumer.consume(10, 0.5) if m.error() is None]
        assert [m.value() for m in batch] == [b"v0", b"v1", b"v2"], "not one batch"
        try:
            breaker.call(_down)  # v0: the downstream is down, the breaker opens
        except Exception as exc:
            consumer.fail(batch[0], exc)
        assert consumer.outage is not None
        consumer.fail(batch[1], ValueError("v1 is malformed"))  # no downstream call at all
        scheduled = metric_total(
            registry,
            "resilient_kafka_messages_handled_total",
            messaging_destination_name=topic,
            outcome="retry_scheduled",
        )
        assert scheduled == 1, "v1 failed on its own but was held as part of the outage"
    finally:
        consumer.close()
    (copy,) = _read(kafka, f"{topic}.{group}.retry.1", 1)
    assert copy.value() == b"v1"


# -- 8: close() that raises on the way leaks both clients --------------------------------------


def test_close_releases_the_clients_even_when_the_final_commit_raises(
    kafka: KafkaCluster, topic_factory
) -> None:
    """A KafkaException on the way out of close() (here from the final transaction commit)
    still closes the native consumer and the forwarding producer, at the latest by a second
    close()."""
    topic = topic_factory(1)
    _produce(kafka, topic, {0: ["v0"]})
    consumer = ResilientConsumer(
        kafka.client_config(group_id=_group()),
        exactly_once=True,
        transaction_interval=60,  # only close() commits
        registry=CollectorRegistry(),
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    _next_message(consumer)
    assert consumer.poll(0.2) is None  # v0 is done: close() has an offset to commit
    faults = [KafkaException(KafkaError(KafkaError._TRANSPORT, "injected"))]
    real = consumer.consumer_group_metadata

    def flaky() -> Any:
        if faults:
            raise faults.pop()
        return real()

    consumer.consumer_group_metadata = flaky  # type: ignore[method-assign]  # one failure
    raised = []
    for _ in range(2):  # close() may raise once; the second call finishes what is left
        try:
            consumer.close()
        except KafkaException as exc:
            raised.append(exc)
    open_clients = []
    if _is_open(lambda: Consumer.poll(consumer, 0)):  # the native consumer, past the wrapper
        open_clients.append("consumer")
        Consumer.close(consumer)  # (the test's own clean-up: a leaked handle crashes pytest)
    if _is_open(lambda: consumer.producer.poll(0)):
        open_clients.append("producer")
        consumer.producer.close()
    assert not open_clients, (
        f"after close() raised {raised!r} and a second close(), still open: {open_clients}"
    )


# -- 9: retry/DLQ send spans of the drop-in loop ------------------------------------------------


def test_a_drop_in_fail_continues_the_records_trace(kafka: KafkaCluster, topic_factory) -> None:
    """fail() in a poll() loop (no process span around it): the ``send`` span of the retry copy
    is in the record's trace, a descendant of the record's creation span, and the copy's
    traceparent carries that trace."""
    topic, group = topic_factory(1), _group()
    provider, exporter = _tracing()
    producer = ResilientProducer(
        kafka.producer_config(), registry=CollectorRegistry(), tracer_provider=provider
    )
    producer.produce(topic, key="k", value="v")
    assert producer.flush(10) == 0
    producer.close()
    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, enable_auto_commit=False),
        retry=RetryPolicy(delays=(0.2,)),
        tracer_provider=provider,
        registry=CollectorRegistry(),
    )
    retry_topic = f"{topic}.{group}.retry.1"
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        consumer.fail(_next_message(consumer), ValueError("downstream said no"))

        def sent() -> bool:
            consumer.poll(0.05)
            return any(s.name == f"send {retry_topic}" for s in exporter.get_finished_spans())

        wait_for(sent, 20, "the retry copy's send span")
    finally:
        consumer.close()
    spans = {s.context.span_id: s for s in exporter.get_finished_spans()}
    (creation,) = [s for s in spans.values() if s.name == f"send {topic}"]
    (send,) = [s for s in spans.values() if s.name == f"send {retry_topic}"]
    assert send.context.trace_id == creation.context.trace_id, (
        "the retry copy's send span started a new trace instead of continuing the record's"
    )
    ancestors, span = [], send
    while span.parent is not None and span.parent.span_id in spans:
        span = spans[span.parent.span_id]
        ancestors.append(span.name)
    assert creation.name in ancestors, f"not under the creation span: {ancestors}"
    (copy,) = _read(kafka, retry_topic, 1)
    traceparent = headers.header_dict(copy)["traceparent"].decode()
    assert traceparent.split("-")[1] == format(creation.context.trace_id, "032x")


# -- found in review: an outage that ends after a silent skip-ahead trial --------------------


def test_the_held_record_comes_again_when_the_breaker_closes_elsewhere(
    kafka: KafkaCluster, topic_factory
) -> None:
    """One partition, its last record held by an outage. A trial skips ahead past the held
    record and hears nothing; meanwhile the breaker is closed elsewhere (shared state, an
    operator): the outage ends without a probe, and the held record is delivered again (it was
    never processed), not skipped."""
    topic = topic_factory(1)
    _produce(kafka, topic, {0: ["v0"]})
    breaker = CircuitBreaker("payments", fail_max=1, reset_timeout=0.2)
    consumer = ResilientConsumer(
        kafka.client_config(group_id=_group(), enable_auto_commit=False),
        breakers=[breaker],
        registry=CollectorRegistry(),
    )
    deliveries: list[float] = []
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])

        def deliver_and_refuse() -> None:
            msg = _next_message(consumer, timeout=10)
            assert msg.value() == b"v0"
            deliveries.append(time.monotonic())
            try:
                breaker.call(_down)
            except Exception as exc:
                consumer.fail(msg, exc)

        deliver_and_refuse()  # the breaker opens: v0 is held
        deliver_and_refuse()  # the probe: refused again; next, a trial past v0 (nothing there)
        assert consumer.outage is not None
        until = time.monotonic() + 1.0
        while time.monotonic() < until:  # the trial is out
            assert consumer.poll(0.1) is None
        breaker.close()  # closed elsewhere: the outage ends at the next look
        msg = _next_message(consumer, timeout=10)
        assert (msg.value(), consumer.outage) == (b"v0", None)
    finally:
        consumer.close()


def test_fresh_tiers_start_at_their_beginning_even_when_on_assign_raises(
    kafka: KafkaCluster, topic_factory
) -> None:
    """The application's on_assign raises (poll() passes the exception on): the partitions are
    assigned anyway, and a retry tier the group never committed on still starts at its
    beginning, so a retry copy written before this member joined is not skipped."""
    topic, group = topic_factory(1), _group()
    _produce(kafka, topic, {0: ["v0"]})
    retry = RetryPolicy(delays=(0.2,))
    _retry_copy_waiting(kafka, topic, group, retry)

    second = ResilientConsumer(
        kafka.client_config(_QUICK_JOIN, group_id=group), retry=retry, registry=CollectorRegistry()
    )
    raised: list[BaseException] = []

    def on_assign(c: ResilientConsumer, partitions: list[TopicPartition]) -> None:
        raise RuntimeError("the application's bookkeeping failed")

    second.subscribe([topic], on_assign=on_assign)
    try:
        deadline = time.monotonic() + 15
        msg = None
        while msg is None or msg.error() is not None:
            assert time.monotonic() < deadline, f"no retry record; raised: {raised!r}"
            try:
                msg = second.poll(0.2)
            except RuntimeError as exc:
                raised.append(exc)
        assert raised, "the callback's exception was not passed on"
        assert (msg.value(), headers.attempt(msg)) == (b"v0", 1)
    finally:
        second.close()


def test_a_dead_letter_held_by_a_flood_is_never_handed_out_undeserialized(
    kafka: KafkaCluster, topic_factory
) -> None:
    """Two undeserializable records in a row trip the DLQ flood guard (max_consecutive=1): the
    second is held, with its raw bytes. Its probes deserialize it again (and hold it again);
    the handler never receives raw bytes instead of a deserialized value."""
    from resilient_kafka import DeadLetterPolicy

    topic = topic_factory(1)
    _produce(kafka, topic, {0: ["bad-1", "bad-2", "good"]})
    tries: Counter[str] = Counter()

    def deserialize(raw: bytes | None, _ctx: object) -> dict[str, str]:
        text = (raw or b"").decode()
        tries[text] += 1
        if text.startswith("bad"):
            raise ValueError(f"not a valid order: {text}")
        return {"order": text}

    consumer = ResilientConsumer(
        kafka.client_config(group_id=_group(), enable_auto_commit=False),
        value_deserializer=deserialize,
        dead_letter=DeadLetterPolicy(max_consecutive=1, flood_backoff=(0.1, 0.2)),
        registry=CollectorRegistry(),
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    raw_values: list[object] = []

    def handler(msg: Message) -> None:
        if not isinstance(msg.value(), dict):
            raw_values.append(msg.value())

    run_until(consumer, handler, lambda: tries["bad-2"] >= 3 or raw_values)
    assert not raw_values, f"the handler got raw bytes: {raw_values}"


def test_partitions_paused_in_on_assign_deliver_nothing_until_resumed(
    kafka: KafkaCluster, topic_factory
) -> None:
    """The application pauses the partitions it is given in its on_assign (to resume them once
    its own state is loaded): nothing of them is handed out until it resumes them."""
    topic = topic_factory(1)
    _produce(kafka, topic, {0: ["v0", "v1"]})
    consumer = ResilientConsumer(
        kafka.client_config(_QUICK_JOIN, group_id=_group(), auto_offset_reset="earliest"),
        registry=CollectorRegistry(),
    )
    given: list[TopicPartition] = []

    def on_assign(c: ResilientConsumer, partitions: list[TopicPartition]) -> None:
        sources = [tp for tp in partitions if tp.topic == topic]
        c.pause(sources)
        given.extend(sources)

    consumer.subscribe([topic], on_assign=on_assign)
    try:
        deadline = time.monotonic() + 15
        while not given:
            assert time.monotonic() < deadline, "never assigned"
            assert consumer.poll(0.1) is None, "a record of a paused partition was handed out"
        until = time.monotonic() + 2
        while time.monotonic() < until:
            assert consumer.poll(0.1) is None, "a record of a paused partition was handed out"
        consumer.resume(given)
        assert _next_message(consumer, timeout=10).value() == b"v0"
    finally:
        consumer.close()
