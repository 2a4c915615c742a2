"""Same-run throughput of poll loops: raw confluent-kafka vs ResilientConsumer, metrics off/on.

A first measurement for the benchmarks issue (not a test; no timed assertions):

    python -m benchmarks.metrics_overhead [MESSAGES]
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, Producer
from prometheus_client import CollectorRegistry

from resilient_kafka import ResilientConsumer
from resilient_kafka.testing import EmbeddedKafka


def _preload(kafka: EmbeddedKafka, topic: str, count: int) -> None:
    producer = Producer({**kafka.producer_config(), "linger.ms": 20, "batch.num.messages": 10000})
    for _ in range(count):
        while True:
            try:
                producer.produce(topic, value=b"x" * 100)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(60)


def _rate(kafka: EmbeddedKafka, topic: str, count: int, make: Callable[[dict], Any]) -> float:
    consumer = make(
        kafka.client_config(group_id=f"bench-{uuid.uuid4().hex[:6]}", auto_offset_reset="earliest")
    )
    consumer.subscribe([topic])
    seen, started = 0, 0.0
    while seen < count:
        msg = consumer.poll(1.0)
        if msg is None or msg.error():
            continue
        if not seen:
            started = time.perf_counter()
        msg.value()
        seen += 1
    elapsed = time.perf_counter() - started
    consumer.close()
    return count / elapsed


def main(count: int = 50_000) -> None:
    cases: dict[str, Callable[[dict], Any]] = {
        "raw_poll": Consumer,
        "resilient_poll_metrics_off": lambda conf: ResilientConsumer(conf, metrics=False),
        "resilient_poll_metrics_on": lambda conf: ResilientConsumer(
            conf, registry=CollectorRegistry()
        ),
    }
    with EmbeddedKafka() as kafka:
        kafka.create_topics({"bench": 1})
        _preload(kafka, "bench", count)
        rates = {
            name: max(_rate(kafka, "bench", count, make) for _ in range(2))
            for name, make in cases.items()
        }
    raw = rates["raw_poll"]
    for name, rate in rates.items():
        print(f"{name:30s} {rate:10,.0f} msg/s {1e6 / rate:6.1f} us/msg {rate / raw:5.2f}x raw")
    on, off = rates["resilient_poll_metrics_on"], rates["resilient_poll_metrics_off"]
    print(f"metrics on / off: {on / off:.2f} (target >= 0.90)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50_000)
