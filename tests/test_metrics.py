"""Prometheus metrics on the real embedded broker, with a private registry per test."""

from __future__ import annotations

import threading
import time
import urllib.request
import uuid
from collections.abc import Callable

import pytest
from confluent_kafka import Message, TopicPartition
from prometheus_client import CollectorRegistry

from resilient_kafka import CircuitBreaker, ResilientConsumer, RetryPolicy, headers
from resilient_kafka.metrics import SEMCONV_BUCKETS, serve_metrics
from resilient_kafka.testing import KafkaCluster
from tests.helpers import produce


class Poison(Exception):
    pass


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


def _value(reg: CollectorRegistry, metric: str, /, **labels: str) -> float:
    value = reg.get_sample_value(metric, labels)
    return 0.0 if value is None else value


def test_counts_match_a_scripted_run(kafka: KafkaCluster, topic_factory) -> None:
    topic, group = topic_factory(1), f"g{uuid.uuid4().hex[:8]}"
    records = [(f"ok{i}", "ok") for i in range(6)]
    records += [(f"flaky{i}", "flaky") for i in range(2)]
    records += [(f"bad{i}", "poison") for i in range(2)]
    produce(kafka.producer_config(), topic, records)
    reg = CollectorRegistry()
    handled: list[str] = []

    def handler(msg: Message) -> None:
        handled.append(msg.topic())
        if msg.value() == b"poison":
            raise Poison("invalid")
        if msg.value() == b"flaky" and headers.attempt(msg) == 0:
            raise ConnectionError("blip")

    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        retry=RetryPolicy(delays=(0.3,), dead_letter_on=(Poison,)),
        registry=reg,
    )
    # a second consumer on the same registry must not collide with the first
    ResilientConsumer(kafka.client_config(group_id=f"{group}-2"), registry=reg).close()
    consumer.subscribe([topic])
    thread = threading.Thread(target=consumer.run, args=(handler,), daemon=True)
    thread.start()
    retry1, dlq = f"{topic}.{group}.retry.1", f"{topic}.{group}.dlq"
    try:
        _wait(lambda: len(handled) == 12, 30, "every delivery to be handled")
        _wait(
            lambda: (
                _value(
                    reg,
                    "messaging_client_sent_messages_total",
                    messaging_system="kafka",
                    messaging_operation_name="send",
                    messaging_destination_name=dlq,
                    error_type="",
                )
                == 2
            ),
            10,
            "the DLQ deliveries to be counted",
        )
    finally:
        consumer.stop()
        thread.join(30)

    def handled_total(dest: str, outcome: str, error_type: str = "") -> float:
        return _value(
            reg,
            "resilient_kafka_messages_handled_total",
            messaging_destination_name=dest,
            messaging_consumer_group_name=group,
            outcome=outcome,
            error_type=error_type,
        )

    assert handled_total(topic, "success") == 6
    assert handled_total(retry1, "success") == 2
    assert handled_total(topic, "retry_scheduled", "ConnectionError") == 2
    assert handled_total(topic, "dead_lettered", "tests.test_metrics.Poison") == 2
    assert (
        reg.get_sample_value(  # pre-created at 0
            "resilient_kafka_messages_handled_total",
            {
                "messaging_destination_name": topic,
                "messaging_consumer_group_name": group,
                "outcome": "duplicate_skipped",
                "error_type": "",
            },
        )
        == 0
    )
    assert (
        _value(
            reg,
            "resilient_kafka_retries_total",
            messaging_destination_name=topic,
            messaging_consumer_group_name=group,
            mode="topic",
            error_type="ConnectionError",
        )
        == 2
    )
    consumed = {
        "messaging_system": "kafka",
        "messaging_operation_name": "poll",
        "messaging_consumer_group_name": group,
        "error_type": "",
    }
    assert (
        _value(
            reg,
            "messaging_client_consumed_messages_total",
            messaging_destination_name=topic,
            **consumed,
        )
        == 10
    )
    assert (
        _value(
            reg,
            "messaging_client_consumed_messages_total",
            messaging_destination_name=retry1,
            **consumed,
        )
        == 2
    )
    assert (
        _value(
            reg,
            "messaging_client_sent_messages_total",
            messaging_system="kafka",
            messaging_operation_name="send",
            messaging_destination_name=retry1,
            error_type="",
        )
        == 2
    )
    process = {
        "messaging_system": "kafka",
        "messaging_operation_name": "process",
        "messaging_consumer_group_name": group,
    }
    assert (
        _value(
            reg,
            "messaging_process_duration_seconds_count",
            messaging_destination_name=topic,
            error_type="",
            **process,
        )
        == 6
    )
    assert (
        _value(
            reg,
            "messaging_process_duration_seconds_count",
            messaging_destination_name=topic,
            error_type="ConnectionError",
            **process,
        )
        == 2
    )
    delay_count = _value(
        reg,
        "resilient_kafka_retry_delay_seconds_count",
        messaging_destination_name=retry1,
        messaging_consumer_group_name=group,
    )
    delay_sum = _value(
        reg,
        "resilient_kafka_retry_delay_seconds_sum",
        messaging_destination_name=retry1,
        messaging_consumer_group_name=group,
    )
    assert delay_count == 2 and 0.6 <= delay_sum < 6
    buckets = [
        s.labels["le"]
        for m in reg.collect()
        if m.name == "messaging_process_duration_seconds"
        for s in m.samples
        if s.name.endswith("_bucket")
    ][: len(SEMCONV_BUCKETS)]
    assert [float(b) for b in buckets] == [float(b) for b in SEMCONV_BUCKETS]
    assert any(m.name == "resilient_kafka_build_info" for m in reg.collect())
    assert (
        _value(
            reg,
            "resilient_kafka_consumer_rebalances_total",
            messaging_consumer_group_name=group,
            event="assign",
        )
        >= 1
    )


def test_metrics_are_served_over_http(kafka: KafkaCluster) -> None:
    reg = CollectorRegistry()
    consumer = ResilientConsumer(
        kafka.client_config(group_id=f"g{uuid.uuid4().hex[:8]}"), registry=reg, metrics_port=0
    )
    try:
        assert consumer.metrics_url is not None
        assert consumer.metrics_url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(consumer.metrics_url, timeout=5) as response:
            body = response.read().decode()
    finally:
        consumer.close()
    assert "resilient_kafka_build_info" in body
    assert "resilient_kafka_consumer_paused_partitions" in body

    server, url = serve_metrics(0, registry=reg)
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            assert "resilient_kafka_consumer_assigned_partitions" in response.read().decode()
    finally:
        server.shutdown()


def test_lag_is_right_while_behind_and_reaches_zero(kafka: KafkaCluster, topic_factory) -> None:
    topic, group = topic_factory(1), f"g{uuid.uuid4().hex[:8]}"
    produce(kafka.producer_config(), topic, [(f"k{i}", f"v{i}") for i in range(50)])
    reg = CollectorRegistry()
    consumer = ResilientConsumer(
        kafka.client_config(
            group_id=group, auto_offset_reset="earliest", statistics_interval_ms=200
        ),
        registry=reg,
    )
    consumer.subscribe([topic])

    def lag() -> float | None:
        return reg.get_sample_value(
            "resilient_kafka_consumer_lag",
            {
                "messaging_consumer_group_name": group,
                "messaging_destination_name": topic,
                "messaging_destination_partition_id": "0",
            },
        )

    try:
        seen = 0
        deadline = time.monotonic() + 30
        while seen < 10 and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                seen += 1
        consumer.pause([TopicPartition(topic, 0)])  # stay behind, but keep polling
        deadline = time.monotonic() + 20
        while lag() != 40 and time.monotonic() < deadline:
            consumer.poll(0.2)
        assert lag() == 40, f"lag while 40 behind: {lag()}"
        consumer.resume([TopicPartition(topic, 0)])
        deadline = time.monotonic() + 30
        while lag() != 0 and time.monotonic() < deadline:
            consumer.poll(0.2)
        assert lag() == 0, f"lag after catching up: {lag()}"
    finally:
        consumer.close()


def test_breaker_metrics_follow_an_outage(kafka: KafkaCluster, topic_factory) -> None:
    topic, group = topic_factory(1), f"g{uuid.uuid4().hex[:8]}"
    produce(kafka.producer_config(), topic, [(f"k{i}", f"v{i}") for i in range(5)])
    reg = CollectorRegistry()
    healthy = threading.Event()
    breaker = CircuitBreaker("payments", fail_max=1, reset_timeout=0.5)
    done: list[bytes] = []

    def charge(msg: Message) -> None:
        if not healthy.is_set():
            raise ConnectionError("down")
        done.append(msg.value())

    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        breakers=[breaker],
        registry=reg,
    )
    consumer.subscribe([topic])
    thread = threading.Thread(
        target=consumer.run, args=(lambda m: breaker.call(charge, m),), daemon=True
    )
    thread.start()

    def state(name: str) -> float:
        return _value(reg, "resilient_kafka_circuitbreaker_state", name="payments", state=name)

    try:
        _wait(lambda: state("open") == 1, 30, "the breaker to open")
        assert state("closed") == 0
        _wait(
            lambda: (
                _value(
                    reg,
                    "resilient_kafka_consumer_paused_partitions",
                    messaging_consumer_group_name=group,
                    reason="circuit_open",
                )
                > 0
            ),
            10,
            "the paused-partitions gauge",
        )
        healthy.set()
        _wait(lambda: len(done) == 5, 30, "recovery")
        _wait(lambda: state("closed") == 1, 10, "the state gauge to show closed")
    finally:
        consumer.stop()
        thread.join(30)
    assert (
        _value(reg, "resilient_kafka_circuitbreaker_calls_total", name="payments", kind="failed")
        >= 1
    )
    assert (
        _value(
            reg, "resilient_kafka_circuitbreaker_calls_total", name="payments", kind="successful"
        )
        >= 5
    )


def test_batched_counts_are_exact_at_every_scrape(kafka: KafkaCluster, topic_factory) -> None:
    """Per-record counts are kept as plain integers on the hot path; a scrape still sees them
    all, without waiting for the consumer's housekeeping."""
    topic, group = topic_factory(1), f"g{uuid.uuid4().hex[:8]}"
    produce(kafka.producer_config(), topic, [(f"k{i}", "v") for i in range(3)])
    reg = CollectorRegistry()
    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"), registry=reg
    )
    consumer.subscribe([topic])
    labels = {"messaging_destination_name": topic, "messaging_consumer_group_name": group}
    consumed = {"messaging_system": "kafka", "messaging_operation_name": "poll", **labels}
    success = {"outcome": "success", **labels}
    try:
        for n in range(1, 4):
            deadline = time.monotonic() + 30
            msg = None
            while msg is None or msg.error() is not None:
                assert time.monotonic() < deadline, "no record"
                msg = consumer.poll(0.5)
            # read right after the poll: nothing waits for a flush
            assert (
                _value(reg, "messaging_client_consumed_messages_total", error_type="", **consumed)
                == n
            )
            assert (
                _value(reg, "resilient_kafka_messages_handled_total", error_type="", **success)
                == n - 1
            )  # the record in hand is not done until the next poll
    finally:
        consumer.close()
    assert _value(reg, "resilient_kafka_messages_handled_total", error_type="", **success) == 2


def test_batched_histogram_exposes_what_prometheus_client_would() -> None:
    from prometheus_client import Histogram, generate_latest

    from resilient_kafka.metrics import BatchedHistogram

    ours_reg, theirs_reg = CollectorRegistry(), CollectorRegistry()
    ours = BatchedHistogram("d_seconds", "doc", ["topic"], SEMCONV_BUCKETS, ours_reg)
    theirs = Histogram("d_seconds", "doc", ["topic"], buckets=SEMCONV_BUCKETS, registry=theirs_reg)
    first, second = ours.cell("t"), ours.cell("t")  # two consumers' cells, one label set
    values = [0.0, 0.005, 0.0051, 0.3, 7.5, 11.0, 1e9]
    for i, value in enumerate(values):
        (first if i % 2 else second).observe(value)
        theirs.labels("t").observe(value)
    ours.labels("u").observe(0.01)
    theirs.labels("u").observe(0.01)

    def samples(reg: CollectorRegistry) -> set[tuple[str, tuple, float]]:
        return {
            (s.name, tuple(sorted(s.labels.items())), s.value)
            for m in reg.collect()
            for s in m.samples
            if not s.name.endswith("_created")
        }

    assert samples(ours_reg) == samples(theirs_reg)
    ours.retire(first, "t")  # a closed consumer's counts stay in the totals
    assert samples(ours_reg) == samples(theirs_reg)
    assert b'd_seconds_bucket{le="+Inf",topic="t"} 7.0' in generate_latest(ours_reg)
    with pytest.raises(ValueError, match="takes labels"):
        ours.cell("t", "extra")


def test_build_info_carries_full_versions() -> None:
    import confluent_kafka

    from resilient_kafka import __version__
    from resilient_kafka.metrics import families

    reg = CollectorRegistry()
    families(reg)
    (sample,) = [
        s for m in reg.collect() if m.name == "resilient_kafka_build_info" for s in m.samples
    ]
    assert sample.labels == {
        "version": __version__,
        "confluent_kafka_version": confluent_kafka.__version__,
        "librdkafka_version": confluent_kafka.libversion()[0],
    }
