"""Shared pieces of the benchmark cases: preloading, fresh consumer configs, a counting handler."""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from confluent_kafka import Producer

VALUE_BYTES = 100
# At its first record a case pauses this long, letting librdkafka prefetch the topic into its
# local queue, and times the records after it: the numbers are the client's cost per record,
# not how fast the embedded broker serves fetches (which caps every client alike).
WARMUP = 3.0


def preload(producer_config: dict[str, Any], topic: str, count: int, partitions: int) -> None:
    """``count`` keyed 100-byte records spread over ``partitions``, flushed and acknowledged."""
    producer = Producer(
        {**producer_config, "linger.ms": 20, "batch.num.messages": 10000, "acks": "all"}
    )
    failures: list[Any] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            failures.append(err)

    value = b"v" * VALUE_BYTES
    for i in range(count):
        while True:
            try:
                producer.produce(
                    topic, value, str(i).encode(), i % partitions, on_delivery=on_delivery
                )
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120) or failures:
        raise RuntimeError(f"preloading {topic} failed: {failures[:3] or 'flush timed out'}")


# Tansu answers JoinGroup after about half the session timeout; the smoke profile (a harness
# check, not a measurement) shortens it to save ~2 s a case.
GROUP_TIMING = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}
# librdkafka postpones a partition's next fetch by fetch.queue.backoff.ms (1 s) once its queue
# is full, which the warm-up pause makes it: a client that then drains the queue within that
# second waits out the rest. Measured for run() over 200,000 records: 1.9 µs a record, but
# 34-44 µs in the 20,000 records after the queue ran dry (python -m benchmarks.layer does not
# see it: no broker). Every client here fetches again as soon as its queue has room.
PREFETCH = {"fetch.queue.backoff.ms": 10}


def consumer_config(base: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A fresh group reading from the beginning (each case starts at offset 0)."""
    return {
        **base,
        "group.id": f"bench-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest",
        **GROUP_TIMING,
        **PREFETCH,
        **extra,
    }


def warm_up(warmup: float) -> float:
    """Pause at a case's first record (see WARMUP); returns the start of the timed part."""
    if warmup:
        time.sleep(warmup)  # a benchmark's prefetch window, not test synchronisation
    return time.perf_counter()


class Counter:
    """A no-op handler that reads each value, times the records after the first (see
    :func:`warm_up`) up to the ``target``-th call, and calls ``stop`` then (a callable such as
    ``ResilientConsumer.stop``)."""

    __slots__ = ("count", "ended", "started", "stop", "target", "warmup")

    def __init__(self, target: int, warmup: float = 0.0) -> None:
        self.target = target
        self.warmup = warmup
        self.count = 0
        self.started = 0.0
        self.ended = 0.0
        self.stop: Any = None

    def __call__(self, msg: Any) -> None:
        msg.value()
        count = self.count = self.count + 1
        if count == 1:
            self.started = warm_up(self.warmup)
        if count == self.target:
            self.ended = time.perf_counter()
            self.stop()

    @property
    def timed(self) -> int:
        """Records inside the timed window (all but the first)."""
        return self.target - 1

    @property
    def elapsed(self) -> float:
        return self.ended - self.started


class BatchCounter(Counter):
    """:class:`Counter` for a batch handler: times the records after the first batch."""

    __slots__ = ("first",)

    def __init__(self, target: int, warmup: float = 0.0) -> None:
        super().__init__(target, warmup)
        self.first = 0

    def __call__(self, msgs: Any) -> None:
        for msg in msgs:
            msg.value()
        if not self.count:
            self.started = warm_up(self.warmup)
            self.first = len(msgs)
        count = self.count = self.count + len(msgs)
        if count >= self.target and not self.ended:
            self.ended = time.perf_counter()
            self.stop()

    @property
    def timed(self) -> int:
        return self.count - self.first


def rss_bytes() -> int:
    """Resident set size of this process (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.01)
