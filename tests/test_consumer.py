"""ResilientConsumer on the real embedded broker: tiers, DLQ, headers, barrier, bad input."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from resilient_kafka import (
    ConfigurationError,
    DeadLetterPolicy,
    ForwardError,
    ResilientConsumer,
    ResilientKafkaError,
    ResilientProducer,
    RetryPolicy,
    headers,
)
from resilient_kafka.testing import KafkaCluster
from tests.helpers import produce, read_all, run_until, wait_for

RK_HEADERS = {
    "rk.original.topic",
    "rk.original.partition",
    "rk.original.offset",
    "rk.original.timestamp",
    "rk.attempt",
    "rk.first.failure",
    "rk.exception.type",
    "rk.exception.message",
    "rk.exception.stacktrace",
    "rk.consumer.group",
}


class Seen:
    """What the handler saw: (topic, value, attempt, due_ms, seen_ms)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, int, int | None, float]] = []
        self.lock = threading.Lock()

    def add(self, msg: Message) -> None:
        with self.lock:
            self.rows.append(
                (
                    msg.topic(),
                    msg.value().decode(),
                    headers.attempt(msg),
                    headers.due(msg),
                    time.time() * 1000,
                )
            )

    def of(self, value: str) -> list[tuple[str, str, int, int | None, float]]:
        with self.lock:
            return [row for row in self.rows if row[1] == value]


def _run(consumer: ResilientConsumer, handler: Callable[[Message], None]) -> threading.Thread:
    thread = threading.Thread(target=consumer.run, args=(handler,), daemon=True)
    thread.start()
    return thread


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _committed(kafka: KafkaCluster, group: str, topic: str, partitions: int) -> list[int]:
    probe = Consumer(kafka.client_config(group_id=group))
    try:
        got = probe.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        probe.close()
    return [tp.offset for tp in got]


def _first_message(consumer: ResilientConsumer, timeout: float = 30.0) -> Message:
    """Poll until a message (not an error event) arrives; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is None:
            return msg
    raise AssertionError(f"no message within {timeout}s")


def _group() -> str:
    return f"g{uuid.uuid4().hex[:8]}"


def test_failures_walk_every_tier_then_the_dlq_with_exact_headers(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic, group = topic_factory(1), _group()
    records = [(f"k{i}", f"v{i}") for i in range(10)]
    producer = ResilientProducer(kafka.producer_config())
    for key, value in records:
        producer.produce(topic, key=key, value=value, headers=[("trace", b"abc")])
    assert producer.flush(10) == 0
    producer.close()

    seen = Seen()

    def handler(msg: Message) -> None:
        seen.add(msg)
        if msg.value() == b"v4":
            raise ValueError("payment service said no")

    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        retry=RetryPolicy(delays=(0.4, 0.8)),
    )
    consumer.subscribe([topic])
    thread = _run(consumer, handler)
    try:
        dlq = read_all(kafka, f"{topic}.{group}.dlq", 1)
    finally:
        consumer.stop()
        thread.join(30)
    assert not thread.is_alive()

    hops = seen.of("v4")
    assert [(row[0], row[2]) for row in hops] == [
        (topic, 0),
        (f"{topic}.{group}.retry.1", 1),
        (f"{topic}.{group}.retry.2", 2),
    ]
    for _topic, _value, _attempt, due, seen_ms in hops[1:]:
        assert due is not None
        assert seen_ms >= due, "a retry record was handed out before its due time"
        assert seen_ms - due < 3000, "a retry record was handed out far too late"
    assert sorted(row[1] for row in seen.rows if row[0] == topic) == sorted(v for _, v in records)

    (record,) = dlq
    assert record.key() == b"k4" and record.value() == b"v4"
    names = [name for name, _ in record.headers()]
    assert len(names) == len(set(names)), f"headers repeated: {names}"
    hdrs = headers.header_dict(record)
    assert set(hdrs) == RK_HEADERS | {"rk.reason", "trace", "rk.id"}  # rk.id: the producer's
    assert hdrs["trace"] == b"abc"
    assert hdrs["rk.original.topic"] == topic.encode()
    assert hdrs["rk.original.partition"] == b"0"
    assert hdrs["rk.original.offset"] == b"4"
    assert hdrs["rk.attempt"] == b"3"
    assert hdrs["rk.reason"] == b"exhausted"
    assert hdrs["rk.exception.type"] == b"ValueError"
    assert hdrs["rk.exception.message"] == b"payment service said no"
    assert hdrs["rk.consumer.group"] == group.encode()
    assert b"payment service said no" in hdrs["rk.exception.stacktrace"]
    assert headers.original(record) == (topic, 0, 4, int(hdrs["rk.original.timestamp"]))
    assert _committed(kafka, group, topic, 1) == [10]


def test_main_topic_keeps_flowing_while_a_retry_waits(kafka: KafkaCluster, topic_factory) -> None:
    topic, group = topic_factory(1), _group()
    produce(kafka.producer_config(), topic, [(f"k{i}", f"v{i}") for i in range(30)])
    seen = Seen()

    def handler(msg: Message) -> None:
        seen.add(msg)
        if msg.value() == b"v0" and headers.attempt(msg) == 0:
            raise TimeoutError("slow downstream")

    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        retry=RetryPolicy(delays=(2.0,)),
    )
    consumer.subscribe([topic])
    thread = _run(consumer, handler)
    try:
        _wait(lambda: len(seen.of("v0")) == 2, 30, "the retry of v0")
    finally:
        consumer.stop()
        thread.join(30)
    retry_index = next(i for i, row in enumerate(seen.rows) if row[2] == 1)
    main_before_retry = {row[1] for row in seen.rows[:retry_index] if row[0] == topic}
    assert len(main_before_retry) == 30, "main-topic records waited behind the retry"


def test_classification_and_the_retry_budget(kafka: KafkaCluster, topic_factory) -> None:
    topic, group = topic_factory(1), _group()
    produce(kafka.producer_config(), topic, [("a", "fatal"), ("b", "other"), ("c", "slow")])

    def handler(msg: Message) -> None:
        if msg.value() == b"fatal":
            raise RuntimeError("bad") from KeyError("missing field")
        if msg.value() == b"other":
            raise TypeError("not in retry_on")
        raise ValueError("transient")

    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        retry=RetryPolicy(
            delays=(0.5, 0.5, 0.5), retry_on=(ValueError,), dead_letter_on=(KeyError,), timeout=0.3
        ),
    )
    consumer.subscribe([topic])
    thread = _run(consumer, handler)
    try:
        dlq = read_all(kafka, f"{topic}.{group}.dlq", 3)
    finally:
        consumer.stop()
        thread.join(30)
    by_value = {m.value(): headers.header_dict(m) for m in dlq}
    assert by_value[b"fatal"]["rk.reason"] == b"non_retryable"
    assert by_value[b"fatal"]["rk.attempt"] == b"1"
    assert by_value[b"other"]["rk.reason"] == b"non_retryable"
    assert by_value[b"slow"]["rk.reason"] == b"timeout"  # first retry came after the budget
    assert by_value[b"slow"]["rk.attempt"] == b"2"


def test_undeserializable_records_go_to_the_dlq_with_raw_bytes(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic, group = topic_factory(1), _group()
    produce(kafka.producer_config(), topic, [("a", '{"n": 1}'), ("b", "{not json"), ("c", "[2]")])
    values: list[Any] = []

    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        value_deserializer=lambda data, ctx: json.loads(data),
    )
    consumer.subscribe([topic])
    thread = _run(consumer, lambda msg: values.append(msg.value()))
    try:
        (dead,) = read_all(kafka, f"{topic}.{group}.dlq", 1)
        _wait(lambda: len(values) == 2, 20, "the two good records")
    finally:
        consumer.stop()
        thread.join(30)
    assert values == [{"n": 1}, [2]]
    assert dead.value() == b"{not json"
    hdrs = headers.header_dict(dead)
    assert hdrs["rk.reason"] == b"deserialization"
    assert hdrs["rk.exception.type"] == b"resilient_kafka.consumer.DeserializationError"
    assert _committed(kafka, group, topic, 1) == [3]


@pytest.mark.parametrize("on_retry", [False, True])
def test_the_stack_trace_goes_on_retry_copies_only_when_asked(
    kafka: KafkaCluster, topic_factory, on_retry: bool
) -> None:
    topic, group = topic_factory(1), _group()
    produce(kafka.producer_config(), topic, [("k", "v")])

    def handler(msg: Message) -> None:
        raise ValueError("still down")

    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        retry=RetryPolicy(delays=(0.2,)),
        dead_letter=DeadLetterPolicy(stacktrace_on_retry=on_retry),
    )
    consumer.subscribe([topic])
    thread = _run(consumer, handler)
    try:
        (dead,) = read_all(kafka, f"{topic}.{group}.dlq", 1)
        (hop,) = read_all(kafka, f"{topic}.{group}.retry.1", 1)
    finally:
        consumer.stop()
        thread.join(30)
    assert b"still down" in headers.header_dict(dead)["rk.exception.stacktrace"]
    hop_headers = headers.header_dict(hop)
    assert hop_headers["rk.exception.message"] == b"still down"
    assert ("rk.exception.stacktrace" in hop_headers) is on_retry
    with pytest.raises(ConfigurationError, match="stacktrace_on_retry"):
        DeadLetterPolicy(stacktrace_on_retry="yes")  # type: ignore[arg-type]


def test_oversized_dead_letter_drops_diagnostics_instead_of_failing(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic, group = topic_factory(1), _group()
    big_value = "x" * 9000
    produce(kafka.producer_config(), topic, [("k", big_value)])

    def handler(msg: Message) -> None:
        raise ValueError("y" * 8000)

    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        retry=RetryPolicy(delays=()),
        producer_config={"message.max.bytes": 12000},
    )
    consumer.subscribe([topic])
    thread = _run(consumer, handler)
    try:
        (dead,) = read_all(kafka, f"{topic}.{group}.dlq", 1)
    finally:
        consumer.stop()
        thread.join(30)
    hdrs = headers.header_dict(dead)
    assert dead.value() == big_value.encode()
    assert "rk.exception.stacktrace" not in hdrs
    assert hdrs["rk.exception.message"].endswith(b"[truncated]")
    assert len(hdrs["rk.exception.message"]) <= 64
    assert hdrs["rk.reason"] == b"exhausted"


def test_drop_in_poll_loop_and_commit_clamped_to_safe_offsets(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic, group = topic_factory(1), _group()
    produce(kafka.producer_config(), topic, [(f"k{i}", f"v{i}") for i in range(5)])
    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest", enable_auto_commit=False),
        retry=RetryPolicy(delays=(60.0,)),
    )
    consumer.subscribe([topic])
    try:
        got = []
        deadline = time.monotonic() + 30
        while len(got) < 5 and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            got.append(msg.value())
            if msg.value() == b"v2":
                failed = msg
                consumer.fail(msg, ValueError("later"))
        assert got == [b"v0", b"v1", b"v2", b"v3", b"v4"]
        with pytest.raises(ResilientKafkaError, match="still in hand"):
            consumer.fail(failed, ValueError("twice"))  # already failed: no longer in hand
        # asking past the end commits only what is safe: v2's forward must be acked first
        _wait(lambda: consumer._drain(0.1), 20, "the forward of v2")
        committed = consumer.commit(offsets=[TopicPartition(topic, 0, 1000)], asynchronous=False)
        assert [tp.offset for tp in committed or []] == [5]
    finally:
        consumer.close()
    (retry,) = read_all(kafka, f"{topic}.{group}.retry.1", 1)
    assert retry.value() == b"v2"


_KILLED_CONSUMER = textwrap.dedent(
    """
    import sys
    from resilient_kafka import ResilientConsumer, RetryPolicy
    bootstrap, topic, group, blackhole = sys.argv[1:5]
    consumer = ResilientConsumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
         "enable.auto.commit": False, "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
        retry=RetryPolicy(delays=(0.1,)),
        # forwards go to a broker that never answers: fail() can never be acknowledged
        producer_config={"bootstrap.servers": blackhole, "message.timeout.ms": 600000},
    )
    consumer.subscribe([topic])
    seen = 0
    while seen < 10:
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        seen += 1
        if msg.value() == b"v5":
            consumer.fail(msg, ValueError("downstream"))
    committed = consumer.commit(asynchronous=False)
    print("committed", [tp.offset for tp in committed or []], flush=True)
    sys.stdin.read()
    """
)


def test_sigkill_before_the_forward_is_acked_loses_nothing(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic, group = topic_factory(1), _group()
    produce(kafka.producer_config(), topic, [(f"k{i}", f"v{i}") for i in range(10)])
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen()
        address = f"127.0.0.1:{blackhole.getsockname()[1]}"
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _KILLED_CONSUMER,
                kafka.bootstrap_servers,
                topic,
                group,
                address,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            assert line.strip() == "committed [5]", line  # held at the unacknowledged v5
        finally:
            child.kill()
            child.wait()

    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        retry=RetryPolicy(delays=(0.1,)),
    )
    consumer.subscribe([topic])
    try:
        msg = _first_message(consumer)
        assert msg.value() == b"v5", "v5 was lost"
        assert msg.offset() == 5
    finally:
        consumer.close()


def test_bad_configuration_is_rejected_clearly(
    kafka: KafkaCluster, topic_factory, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigurationError, match=r"group\.id must be set \(resilient-kafka names"):
        ResilientConsumer(kafka.client_config())

    consumer = ResilientConsumer(kafka.client_config(group_id="no such topic"))
    try:
        with pytest.raises(ConfigurationError, match="not a legal Kafka topic name"):
            consumer.subscribe([topic_factory(1)])
    finally:
        consumer.close()

    consumer = ResilientConsumer(kafka.client_config(group_id=_group()))
    try:
        with pytest.raises(ConfigurationError, match="pattern subscriptions"):
            consumer.subscribe(["^orders.*"])
        # a missing topic: subscribe() returns (as confluent's does); the application gets
        # librdkafka's event for its topic, never one of a retry tier; the log says why
        consumer.subscribe(["absent-topic"])
        events: list[str] = []
        deadline = time.monotonic() + 20
        while not events or not any("cannot prepare" in r.message for r in caplog.records):
            assert time.monotonic() < deadline, f"events {events}, log {caplog.text[-500:]}"
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is not None:
                assert msg.error().code() == KafkaError.UNKNOWN_TOPIC_OR_PART
                events.append(msg.topic())
        assert set(events) == {"absent-topic"}
        assert "['absent-topic'] do not exist" in caplog.text
    finally:
        consumer.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"delays": (1.0, -2.0)}, "non-negative"),
        ({"jitter": 1.5}, "jitter"),
        ({"timeout": 0}, "timeout must be positive"),
        ({"topic_template": "{topic}.retry"}, "must contain {n}"),
        ({"retry_on": (ValueError, "nope")}, "must be exception classes"),
    ],
)
def test_bad_policies_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RetryPolicy(**kwargs)


def test_policy_helpers() -> None:
    policy = RetryPolicy.exponential(initial=1, multiplier=3, max_delay=5, attempts=4, jitter=0)
    assert policy.delays == (1.0, 3.0, 5.0, 5.0)
    jittery = RetryPolicy(delays=(10.0,), jitter=0.2)
    assert all(8.0 <= jittery.delay(1) <= 12.0 for _ in range(100))
    assert policy.topic("orders", "pay", 2) == "orders.pay.retry.2"
    assert DeadLetterPolicy().topic("orders", "pay") == "orders.pay.dlq"
    with pytest.raises(ConfigurationError, match="bad topic name template"):
        DeadLetterPolicy(topic_template="{topc}.dlq").topic("o", "g")
    with pytest.raises(ConfigurationError, match="max_text_bytes"):
        DeadLetterPolicy(max_text_bytes=10)


def test_a_failed_forward_is_retried_and_holds_the_offset_until_acked(
    kafka: KafkaCluster, topic_factory, caplog: pytest.LogCaptureFixture
) -> None:
    from confluent_kafka import KafkaError

    topic, group = topic_factory(1), _group()
    produce(kafka.producer_config(), topic, [("k0", "v0")])
    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest", enable_auto_commit=False),
        retry=RetryPolicy(delays=(60.0,)),
    )
    real_produce = consumer._producer._produce_untraced  # the path every forward takes
    calls = []

    def flaky_produce(topic, value, key, partition, on_delivery, timestamp, hdrs) -> None:  # type: ignore[no-untyped-def]
        calls.append(topic)
        if len(calls) == 1:  # refused locally
            raise KafkaException(KafkaError(KafkaError._QUEUE_FULL))
        if len(calls) == 2:  # accepted, then reported failed
            callback = on_delivery

            def on_delivery(err: Any, msg: Any) -> None:
                callback(KafkaError(KafkaError._MSG_TIMED_OUT), msg)

        real_produce(topic, value, key, partition, on_delivery, timestamp, hdrs)

    consumer._producer._produce_untraced = flaky_produce  # type: ignore[method-assign]
    consumer.subscribe([topic])
    try:
        msg = _first_message(consumer)
        with caplog.at_level(logging.ERROR, logger="resilient_kafka.consumer"):
            consumer.fail(msg, ValueError("downstream"))
            with pytest.raises(KafkaException) as nothing:  # nothing safe yet: as confluent says
                consumer.commit(asynchronous=False)
            assert nothing.value.args[0].code() == KafkaError._NO_OFFSET
            _wait(lambda: consumer._drain(0.1), 20, "the forward to be acknowledged")
        assert len(calls) == 3
        assert sum("forward of" in r.getMessage() for r in caplog.records) == 2
        committed = consumer.commit(asynchronous=False)
        assert [tp.offset for tp in committed or []] == [1]
    finally:
        consumer.close()


def test_rebalance_while_retries_are_pending_loses_nothing(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic, group = topic_factory(2), _group()
    values = [f"v{i}" for i in range(20)]
    produce(kafka.producer_config(), topic, [(f"k{i}", v) for i, v in enumerate(values)])
    seen = Seen()
    assigned: dict[str, list[int]] = {}

    def handler(msg: Message) -> None:
        seen.add(msg)
        if headers.attempt(msg) == 0:
            raise ConnectionError("downstream blip")

    def conf() -> dict[str, Any]:
        return kafka.client_config(group_id=group, auto_offset_reset="earliest")

    first = ResilientConsumer(conf(), retry=RetryPolicy(delays=(3.0,)))
    first.subscribe(
        [topic], on_assign=lambda c, ps: assigned.setdefault("first", []).append(len(ps))
    )
    first_thread = _run(first, handler)
    second = ResilientConsumer(conf(), retry=RetryPolicy(delays=(3.0,)))
    try:
        _wait(lambda: len(seen.rows) >= 20, 30, "every first attempt")
        # a second member joins while 20 retries wait, then leaves again
        second.subscribe(
            [topic], on_assign=lambda c, ps: assigned.setdefault("second", []).append(len(ps))
        )
        second_thread = _run(second, handler)
        _wait(lambda: "second" in assigned, 40, "the second consumer to be assigned")
        second.stop()
        second_thread.join(30)
        _wait(
            lambda: {row[1] for row in seen.rows if row[2] == 1} == set(values),
            60,
            "every retry to be processed",
        )
    finally:
        first.stop()
        second.stop()
        first_thread.join(30)
    for _topic, _value, attempt, due, seen_ms in seen.rows:
        if attempt == 1:
            assert due is not None and seen_ms >= due
    assert len(assigned["first"]) >= 2, "the first consumer saw no rebalance"


_SIGNALLED_CONSUMER = textwrap.dedent(
    """
    import sys
    from resilient_kafka import ResilientConsumer
    bootstrap, topic, group = sys.argv[1:4]
    consumer = ResilientConsumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
         "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
    )
    consumer.subscribe([topic])
    consumer.run(lambda msg: print(msg.value().decode(), flush=True))
    print("stopped", flush=True)
    """
)


def test_run_in_the_main_thread_stops_cleanly_on_sigterm(
    kafka: KafkaCluster, topic_factory
) -> None:
    import signal

    topic, group = topic_factory(1), _group()
    produce(kafka.producer_config(), topic, [(f"k{i}", f"v{i}") for i in range(5)])
    child = subprocess.Popen(
        [sys.executable, "-c", _SIGNALLED_CONSUMER, kafka.bootstrap_servers, topic, group],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert child.stdout is not None
        lines = [child.stdout.readline().strip() for _ in range(5)]
        assert lines == [f"v{i}" for i in range(5)]
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 0
        assert child.stdout.read().strip() == "stopped"
    finally:
        child.kill()
        child.wait()
    assert _committed(kafka, group, topic, 1) == [5]  # the last message in hand was committed


def test_assign_mode_creates_the_dlq_on_first_failure(kafka: KafkaCluster, topic_factory) -> None:
    topic, group = topic_factory(1), _group()
    produce(kafka.producer_config(), topic, [("k", "v")])
    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, enable_auto_commit=False), retry=RetryPolicy(delays=())
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    try:
        msg = _first_message(consumer)
        consumer.fail(msg, ValueError("no tiers: straight to the DLQ"))
        _wait(lambda: consumer._drain(0.1), 20, "the DLQ copy")
    finally:
        consumer.close()
    (dead,) = read_all(kafka, f"{topic}.{group}.dlq", 1)
    assert headers.header_dict(dead)["rk.reason"] == b"exhausted"


def test_close_never_commits_an_older_stored_offset(
    kafka: KafkaCluster, topic_factory, monkeypatch
) -> None:
    """librdkafka's close-time auto-commit commits the *stored* offsets; a stale stored offset
    must not overwrite the final commit (found as an intermittent CI failure)."""
    import resilient_kafka._committer as committer_module

    monkeypatch.setattr(committer_module, "STORE_INTERVAL", 3600.0)  # no periodic stores
    topic, group = topic_factory(1), _group()
    produce(kafka.producer_config(), topic, [(f"k{i}", f"v{i}") for i in range(5)])
    consumer = ResilientConsumer(kafka.client_config(group_id=group, auto_offset_reset="earliest"))
    consumer.subscribe([topic])
    try:
        _first_message(consumer)
        _first_message(consumer)  # v0 is now done
        consumer._committer.sync_store()  # the store position is 1: stale from here on
        for _ in range(3):
            _first_message(consumer)
        assert consumer.poll(0.5) is None  # asking for more: v4 is done too
    finally:
        consumer.close()  # v0..v4 done: the final commit is 5
    assert _committed(kafka, group, topic, 1) == [5]


def test_close_after_a_crashed_handler_does_not_commit_the_record(
    kafka: KafkaCluster, topic_factory
) -> None:
    """A record in hand when close() is called was never reported processed: redeliver it."""
    topic, group = topic_factory(1), _group()
    produce(kafka.producer_config(), topic, [("k0", "v0"), ("k1", "v1")])
    consumer = ResilientConsumer(kafka.client_config(group_id=group, auto_offset_reset="earliest"))
    consumer.subscribe([topic])
    try:
        _first_message(consumer)  # v0
        crashed = _first_message(consumer)  # v1: the handler raises and the app just closes
        assert crashed.value() == b"v1"
    finally:
        consumer.close()
    assert _committed(kafka, group, topic, 1) == [1]  # v0 done, v1 will be delivered again


def test_retry_tiers_are_read_from_the_start_whatever_auto_offset_reset_says(
    kafka: KafkaCluster, topic_factory
) -> None:
    """With librdkafka's default auto.offset.reset=latest, a member that takes over a retry
    partition this group never committed on must still read the retry copies already there."""
    topic, group = topic_factory(1), _group()
    # the first member reads the source from the start (Tansu resolves "latest" unreliably:
    # its ListOffsets is wrong); the member taking over the tier uses librdkafka's default
    first = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        retry=RetryPolicy(delays=(2.0,)),
    )
    first.subscribe([topic])
    try:
        produce(kafka.producer_config(), topic, [("k", "needs a retry")])
        msg = _first_message(first)
        first.fail(msg, ConnectionError("blip"))  # the copy goes to retry.1, due in 2 s
        _wait(lambda: first._drain(0.1), 20, "the retry copy to be acknowledged")
    finally:
        first.close()  # before the copy is due: nothing was ever committed on the tier

    conf = kafka.client_config(group_id=group)  # auto.offset.reset: default (latest)
    assert "auto.offset.reset" not in conf
    second = ResilientConsumer(conf, retry=RetryPolicy(delays=(2.0,)))
    second.subscribe([topic])
    try:
        retried = _first_message(second, timeout=40)
    finally:
        second.close()
    assert retried.topic() == f"{topic}.{group}.retry.1"
    assert retried.value() == b"needs a retry" and headers.attempt(retried) == 1


def _produce_to(config: dict[str, Any], topic: str, per_partition: dict[int, int]) -> None:
    from confluent_kafka import Producer

    producer = Producer({**config, "acks": "all"})
    for partition, count in per_partition.items():
        for i in range(count):
            producer.produce(topic, value=f"p{partition}-{i}", partition=partition)
    assert producer.flush(30) == 0


def _run_until_it_stops(
    consumer: ResilientConsumer, handler: Callable[[Message], None], progress: Callable[[], str]
) -> None:
    """run() in a thread until the handler stops it (60 s at most); always joined."""
    thread = threading.Thread(target=consumer.run, args=(handler,), daemon=True)
    thread.start()
    try:
        thread.join(60)
        assert not thread.is_alive(), progress()
    finally:
        consumer.stop()
        thread.join(30)


def test_run_honours_a_pause_made_by_the_handler_mid_batch(
    kafka: KafkaCluster, topic_factory
) -> None:
    """run() fetches records in batches; a partition the handler pauses must deliver nothing
    more until resumed, and then carry on from the record after the one that paused it."""
    topic, group = topic_factory(2), f"g{uuid.uuid4().hex[:8]}"
    _produce_to(kafka.producer_config(), topic, {0: 60, 1: 60})
    consumer = ResilientConsumer(kafka.client_config(group_id=group, auto_offset_reset="earliest"))
    handled: list[tuple[int, int]] = []
    state = {"paused_at": -1, "resumed_at": -1}

    def handler(msg: Message) -> None:
        handled.append((msg.partition(), msg.offset()))
        if msg.partition() == 0 and msg.offset() == 10:
            consumer.pause([TopicPartition(topic, 0)])
            state["paused_at"] = len(handled)
        elif msg.partition() == 1 and msg.offset() == 69:  # produced after the pause
            state["resumed_at"] = len(handled)
            consumer.resume([TopicPartition(topic, 0)])
        if len(handled) == 130:
            consumer.stop()

    consumer.subscribe([topic])
    thread = threading.Thread(target=consumer.run, args=(handler,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: state["paused_at"] >= 0, 30, "the handler to pause partition 0")
        _produce_to(kafka.producer_config(), topic, {1: 10})
        thread.join(60)
        assert not thread.is_alive(), f"handled {len(handled)} of 130"
    finally:
        consumer.stop()
        thread.join(30)
    p0 = [offset for partition, offset in handled if partition == 0]
    assert p0 == list(range(60))  # nothing lost, nothing twice, in order
    assert sorted(o for p, o in handled if p == 1) == list(range(70))
    while_paused = handled[state["paused_at"] : state["resumed_at"]]
    assert while_paused and all(partition == 1 for partition, _ in while_paused), while_paused


def test_run_honours_a_seek_made_by_the_handler_mid_batch(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic, group = topic_factory(1), f"g{uuid.uuid4().hex[:8]}"
    _produce_to(kafka.producer_config(), topic, {0: 40})
    consumer = ResilientConsumer(kafka.client_config(group_id=group, auto_offset_reset="earliest"))
    handled: list[int] = []

    def handler(msg: Message) -> None:
        handled.append(msg.offset())
        if msg.offset() == 20 and handled.count(20) == 1:
            consumer.seek(TopicPartition(topic, 0, 5))  # replay 5..20 once
        if msg.offset() == 39:
            consumer.stop()

    consumer.subscribe([topic])
    _run_until_it_stops(consumer, handler, lambda: f"handled {handled}")
    assert handled == list(range(21)) + list(range(5, 40))


def test_run_honours_an_assign_made_by_the_handler_mid_batch(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic, group = topic_factory(1), f"g{uuid.uuid4().hex[:8]}"
    _produce_to(kafka.producer_config(), topic, {0: 40})
    consumer = ResilientConsumer(kafka.client_config(group_id=group))
    handled: list[int] = []

    def handler(msg: Message) -> None:
        handled.append(msg.offset())
        if msg.offset() == 10:
            consumer.assign([TopicPartition(topic, 0, 30)])  # jump ahead: 11..29 skipped
        if msg.offset() == 39:
            consumer.stop()

    consumer.assign([TopicPartition(topic, 0, 0)])
    _run_until_it_stops(consumer, handler, lambda: f"handled {handled}")
    assert handled == list(range(11)) + list(range(30, 40))


@pytest.mark.parametrize("mode", ["run", "poll", "exactly_once"])
def test_a_copy_the_broker_refuses_for_good_stops_the_consumer_and_loses_nothing(
    kafka: KafkaCluster, topic_factory, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The source topic takes a 1.2 MB record; the consumer's producer (message.max.bytes
    # 1 MB, librdkafka's default) cannot forward it. Before, the forward was retried forever
    # in silence while consumption ran ahead of a commit that could never move.
    topic, group = topic_factory(1), _group()
    big = b"x" * 1_200_000
    producer = ResilientProducer({**kafka.producer_config(), "message.max.bytes": 2_000_000})
    producer.produce(topic, key=b"a", value=b"ok")
    producer.produce(topic, key=b"b", value=big)
    producer.produce(topic, key=b"c", value=b"ok")
    assert producer.flush(10) == 0
    producer.close()
    handled: list[tuple[str, int]] = []

    def handler(msg: Message) -> None:
        handled.append((msg.topic(), msg.offset()))
        if msg.value() == big:
            raise ConnectionError("downstream timed out")

    config = kafka.client_config(group_id=group, auto_offset_reset="earliest")
    options: dict[str, Any] = {"exactly_once": mode == "exactly_once"}
    consumer = ResilientConsumer(config, retry=RetryPolicy(delays=(0.2,)), **options)
    consumer.subscribe([topic])
    started = time.monotonic()
    with pytest.raises(ResilientKafkaError) as raised:
        if mode == "poll":
            try:
                while time.monotonic() - started < 60:
                    msg = consumer.poll(0.5)
                    if msg is not None and msg.error() is None:
                        try:
                            handler(msg)
                        except ConnectionError as exc:
                            consumer.fail(msg, exc)
            finally:
                consumer.close()
        else:
            consumer.run(handler)  # closes on the way out
    assert time.monotonic() - started < 60
    error = raised.value
    assert isinstance(error, ForwardError)
    assert error.source == (topic, 0, 1)
    assert error.target == f"{topic}.{group}.retry.1"
    assert isinstance(error.kafka_error, KafkaError)
    assert error.kafka_error.code() == KafkaError.MSG_SIZE_TOO_LARGE
    assert "max.message.bytes" in str(error) and "1200001 bytes" in str(error)
    assert _committed(kafka, group, topic, 1)[0] <= 1, "committed past the refused record"
    said = [r.getMessage() for r in caplog.records if "refused by the broker for good" in r.msg]
    assert said == [
        "1 forward(s) refused by the broker for good; their offsets stay "
        "uncommitted and the records will be redelivered"
    ]

    if mode != "run":
        return  # the restart is the same in every mode
    # with a producer that can send it, a restart forwards the record and moves on
    again = ResilientConsumer(
        config,
        retry=RetryPolicy(delays=(0.2,)),
        producer_config={"message.max.bytes": 2_000_000},
        **options,
    )
    again.subscribe([topic])
    handled.clear()
    retry_1 = f"{topic}.{group}.retry.1"
    run_until(again, handler, lambda: (retry_1, 0) in handled)  # forwarded, then consumed
    assert (topic, 1) in handled and (topic, 2) in handled
    assert _committed(kafka, group, topic, 1) == [3]
