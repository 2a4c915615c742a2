"""Hostile input on the embedded broker: records whose headers lie must not stall a partition."""

from __future__ import annotations

import threading
import time
import uuid

from confluent_kafka import Message, Producer
from prometheus_client import CollectorRegistry

from resilient_kafka import ResilientConsumer, RetryPolicy, headers
from resilient_kafka.testing import KafkaCluster
from tests.helpers import metric_total, run_until, wait_for


def test_a_retry_record_due_far_ahead_waits_only_its_tiers_delay(
    kafka: KafkaCluster, topic_factory
) -> None:
    """Three records of a retry tier carry an rk.due far in the future (absurd, a year ahead,
    an hour ahead: the writer's clock). Each waits its tier's delay from its first fetch, not
    its header, and the thirty records behind them on the tier's two partitions go on too."""
    source = topic_factory(2)
    group = f"g{uuid.uuid4().hex[:8]}"
    registry = CollectorRegistry()
    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        retry=RetryPolicy(delays=(1.0,), jitter=0.2),
        registry=registry,
    )
    tier = consumer.retry_topics(source)[0]
    handled: dict[str, float] = {}
    lock = threading.Lock()

    def handler(msg: Message) -> None:
        with lock:
            handled[msg.value().decode()] = time.monotonic()  # type: ignore[union-attr]

    consumer.subscribe([source])
    wait_for(lambda: tier in kafka.list_topics(), 60, "the retry tier created")
    now_ms = int(time.time() * 1000)
    hostile = {
        "absurd": b"99999999999999",
        "a-year-ahead": str(now_ms + 365 * 86_400_000).encode(),
        "clock-an-hour-ahead": str(now_ms + 3_600_000 + 1000).encode(),
    }
    producer = Producer(kafka.producer_config())
    values = []
    for partition in (0, 1):
        for i in range(15):
            value = f"p{partition}-{i}"
            due = str(now_ms).encode()
            if partition == 0 and i == 1:
                value, due = "absurd", hostile["absurd"]
            elif partition == 1 and i == 0:
                value, due = "a-year-ahead", hostile["a-year-ahead"]
            elif partition == 1 and i == 7:
                value, due = "clock-an-hour-ahead", hostile["clock-an-hour-ahead"]
            producer.produce(tier, value=value, partition=partition, headers=[(headers.DUE, due)])
            values.append(value)
    assert producer.flush(30) == 0
    produced_at = time.monotonic()
    run_until(consumer, handler, lambda: len(handled) == 30, timeout=60)
    assert set(handled) == set(values)
    # each hostile record cost at most its tier's delay (1 s, +20 % jitter, +1 s of clock
    # slack) after its first fetch, and the ones behind it waited for it, once
    assert max(handled.values()) - produced_at < 15
    clamped = metric_total(registry, "resilient_kafka_retry_due_clamped_total")
    assert clamped == 3


HOSTILE = {
    "negative-attempt": [(headers.ATTEMPT, b"-3")],
    "attempt-not-a-number": [(headers.ATTEMPT, b"\xff\xfe")],
    "attempt-past-int-limit": [(headers.ATTEMPT, b"9" * 5000)],
    "first-failure-in-the-future": [(headers.FIRST_FAILURE, b"99999999999999")],
    "duplicated-rk-headers": [  # the last of a repeated header counts
        (headers.ATTEMPT, b"7"),
        (headers.ATTEMPT, b"0"),
        (headers.ID, b"a"),
        (headers.ID, b"b"),
    ],
    "forged-original": [
        (headers.ORIGINAL_TOPIC, b"\xff"),
        (headers.ORIGINAL_PARTITION, b"-7"),
        (headers.ORIGINAL_OFFSET, b"x"),
    ],
    "spring-family": [("kafka_dlt-original-offset", b"\x00\x00"), ("retry_topic-attempts", b"")],
    "huge-user-header": [("x-blob", b"x" * 600_000)],
}


def test_records_with_hostile_headers_are_retried_from_tier_one_and_lose_nothing(
    kafka: KafkaCluster, topic_factory
) -> None:
    """Each record fails once: its retry copy goes to tier 1 whatever its headers claim
    (a forged negative attempt count once named a tier that does not exist), then succeeds."""
    source = topic_factory(1)
    group = f"g{uuid.uuid4().hex[:8]}"
    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        retry=RetryPolicy(delays=(0.2, 0.2)),
        metrics=False,
    )
    producer = Producer(kafka.producer_config())
    for name, hdrs in HOSTILE.items():
        producer.produce(source, value=name, headers=hdrs)
    assert producer.flush(30) == 0
    seen: dict[str, list[str]] = {}
    lock = threading.Lock()

    def handler(msg: Message) -> None:
        name = msg.value().decode()  # type: ignore[union-attr]
        with lock:
            seen.setdefault(name, []).append(msg.topic())  # type: ignore[arg-type]
            first = len(seen[name]) == 1
        if first:
            raise RuntimeError(f"{name} fails once")

    consumer.subscribe([source])
    tier_one = consumer.retry_topics(source)[0]
    run_until(consumer, handler, lambda: all(len(seen.get(n, ())) == 2 for n in HOSTILE))
    assert seen == {name: [source, tier_one] for name in HOSTILE}, seen
