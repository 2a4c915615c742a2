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
