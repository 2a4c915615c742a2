"""Completed offsets in the commit metadata (run() with concurrency): the encoding, and a SIGKILL
after which the next owner handles only what was not done.

Tansu answers every committed offset with empty metadata, so the broker tests run on librdkafka's
mock cluster, which keeps it (docs/testing.md).
"""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from resilient_kafka import ResilientConsumer, RetryPolicy
from resilient_kafka._offset_metadata import MAX_CHARS, NotOurs, decode, encode
from resilient_kafka.testing import MockCluster
from tests.helpers import metric_total, run_until, wait_for

# -- the encoding ----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    base=st.integers(min_value=0, max_value=2**62),
    gaps=st.lists(st.integers(min_value=0, max_value=3000), max_size=2500),
)
def test_the_encoding_round_trips_or_keeps_the_longest_prefix_that_fits(
    base: int, gaps: list[int]
) -> None:
    done, position = [], base
    for gap in gaps:
        position += gap + 1
        done.append(position)
    text, complete = encode(base, done)
    assert len(text) <= MAX_CHARS
    named = decode(text, base)
    if complete:
        assert named == set(done)
    else:  # a prefix: every offset it names is done, and it names them from the start
        assert named == set(done[: len(named)]) and len(named) < len(done)
    assert decode(text, base + 1) == frozenset()  # written for another commit: not applied


def test_the_shorter_encoding_is_chosen() -> None:
    dense, _ = encode(100, range(101, 1101, 2))  # every other offset: a bitset is short
    sparse, _ = encode(100, [101, 50_000])  # two far apart: runs are short
    assert dense.split(":")[3] == "b" and len(dense) < 200
    assert sparse.split(":")[3] == "r" and len(sparse) < 30
    assert encode(5, []) == ("", True) and encode(5, [3, 5]) == ("", True)  # none above


def test_encoding_grows_linearly() -> None:
    """A stuck record with many done behind it: encoding costs a sort and a pass, not a
    big-integer build per offset (quadratic: 5 s for a million). Ten times the offsets must
    cost well under twenty times as much (measured as a ratio in one run)."""
    import time as clock

    def cost(count: int) -> float:
        started = clock.perf_counter()
        text, complete = encode(0, range(1, count + 1))
        assert complete and decode(text, 0) == frozenset(range(1, count + 1))
        return clock.perf_counter() - started

    cost(1000)  # warm up
    small, large = min(cost(30_000) for _ in range(3)), min(cost(300_000) for _ in range(3))
    # linear: about 10x; the big-integer bitset this replaced: 32x (encoding alone)
    assert large / small < 20, f"{large / small:.0f}x the time for 10x the offsets"


@pytest.mark.parametrize(
    "metadata",
    [
        "my-app checkpoint 17",  # someone else's
        "rk:2:10:b:AQ",  # a version this library does not know
        "rk:1:10:z:AQ",  # an unknown encoding
        "rk:1:ten:b:AQ",  # a base that is not a number
        "rk:1:10:b:!!!",  # not base64
        "rk:1:10:r:gA",  # a truncated varint
        "rk:1:10:r:AQ",  # an odd number of runs
        "rk:1:10:b",  # a field missing
        "rk:1:10:b:" + "A" * 5000,  # longer than any commit this library writes
        "rk:1:10:r:" + base64.urlsafe_b64encode(bytes([0, 0xFF, 0xFF, 0xFF, 0x7F])).decode(),
    ],
)
def test_metadata_it_did_not_write_is_refused(metadata: str) -> None:
    with pytest.raises(NotOurs):
        decode(metadata, 10)


def test_no_metadata_means_nothing_completed() -> None:
    assert decode("", 10) == frozenset()


# -- on a broker that keeps metadata -----------------------------------------------------------


def _tier_topics(cluster: MockCluster, topic: str, group: str, partitions: int = 1) -> None:
    """The mock cluster answers no CreateTopics: the retry and DLQ topics are made here."""
    probe = ResilientConsumer(
        cluster.client_config(group_id=group), retry=RetryPolicy(delays=(1.0,)), metrics=False
    )
    try:
        names = [*probe.retry_topics(topic), probe.dead_letter_topic(topic)]
    finally:
        probe.close()
    for name in names:
        cluster.create_topic(name, partitions)


def _consumer(
    cluster: MockCluster, group: str, registry: CollectorRegistry, **config: Any
) -> ResilientConsumer:
    return ResilientConsumer(
        cluster.client_config(group_id=group, auto_offset_reset="earliest", **config),
        retry=RetryPolicy(delays=(1.0,)),
        registry=registry,
    )


def _committed(cluster: MockCluster, topic: str, group: str) -> TopicPartition:
    reader = Consumer(cluster.client_config(group_id=group, enable_auto_commit=False))
    try:
        return reader.committed([TopicPartition(topic, 0)], timeout=10)[0]
    finally:
        reader.close()


STUCK = (0, 30)


def _produce(cluster: MockCluster, topic: str, count: int) -> None:
    producer = Producer(cluster.producer_config())
    for i in range(count):
        stuck = i in STUCK  # their handlers hang in the worker that is killed
        producer.produce(topic, key=b"slow" if stuck else f"k{i}".encode(), value=f"v{i}")
    assert producer.flush(30) == 0


_CRASHING_WORKER = textwrap.dedent(
    """
    import sys, threading, time
    from resilient_kafka import ResilientConsumer, RetryPolicy

    bootstrap, topic, group, ledger = sys.argv[1:5]
    consumer = ResilientConsumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
         "session.timeout.ms": 3000, "auto.commit.interval.ms": 300},
        retry=RetryPolicy(delays=(1.0,)), metrics=False,
    )
    lock = threading.Lock()

    def handler(msg):
        if msg.key() == b"slow":
            time.sleep(600)  # SIGKILLed here: offset 0 never completes
        with lock, open(ledger, "a") as out:
            out.write(f"{msg.offset()}\\n")

    consumer.subscribe([topic])
    consumer.run(handler, concurrency=8)
    """
)


def test_after_a_sigkill_the_next_owner_skips_what_was_completed(
    mock_cluster: MockCluster, tmp_path: Path
) -> None:
    topic, group, count = f"src-{uuid.uuid4().hex[:6]}", f"g{uuid.uuid4().hex[:6]}", 60
    mock_cluster.create_topic(topic, 1)
    _tier_topics(mock_cluster, topic, group)
    _produce(mock_cluster, topic, count)
    ledger = tmp_path / "ledger.txt"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CRASHING_WORKER,
            mock_cluster.bootstrap_servers,
            topic,
            group,
            str(ledger),
        ],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        stderr=subprocess.DEVNULL,
    )
    try:
        # records 0 and 30 are stuck (30 waits behind 0: one key): the committed offset stays
        # 0, everything else above it is done and named in the metadata
        def all_others_committed() -> bool:
            tp = _committed(mock_cluster, topic, group)
            return tp.offset == 0 and decode(tp.metadata or "", 0) == set(range(1, count)) - {30}

        wait_for(all_others_committed, 60, "offsets 1..59 but 30 committed as completed")
    finally:
        child.kill()
        child.wait()
    first_run = sorted(int(line) for line in ledger.read_text().split())
    assert first_run == [o for o in range(1, count) if o != 30]

    registry = CollectorRegistry()
    consumer = _consumer(mock_cluster, group, registry, session_timeout_ms=3000)
    handled: list[int] = []
    lock = threading.Lock()

    def handler(msg: Message) -> None:
        with lock:
            handled.append(msg.offset())  # type: ignore[arg-type]

    consumer.subscribe([topic])
    run_until(
        consumer,
        handler,
        lambda: (
            len(handled) == 2
            and metric_total(registry, "resilient_kafka_consumer_completed_skipped_total")
            == count - 2
        ),
        timeout=60,
        concurrency=8,
    )
    assert sorted(handled) == [0, 30]  # only the records not done when it died
    end = _committed(mock_cluster, topic, group)
    assert (end.offset, end.metadata or "") == (count, "")


def test_metadata_it_did_not_write_is_ignored_with_one_warning(
    mock_cluster: MockCluster, caplog: pytest.LogCaptureFixture
) -> None:
    topic, group = f"src-{uuid.uuid4().hex[:6]}", f"g{uuid.uuid4().hex[:6]}"
    mock_cluster.create_topic(topic, 2)
    _tier_topics(mock_cluster, topic, group, partitions=2)
    producer = Producer(mock_cluster.producer_config())
    for i in range(20):
        producer.produce(topic, value=f"v{i}", partition=i % 2)
    assert producer.flush(30) == 0
    app = Consumer(mock_cluster.client_config(group_id=group, enable_auto_commit=False))
    app.commit(
        offsets=[
            TopicPartition(topic, 0, 2, metadata="app checkpoint 7"),
            TopicPartition(topic, 1, 2, metadata="rk:9:2:b:AQ"),
        ],
        asynchronous=False,
    )
    app.close()

    consumer = ResilientConsumer(
        mock_cluster.client_config(group_id=group), retry=RetryPolicy(delays=(1.0,)), metrics=False
    )
    handled: list[tuple[int, int]] = []
    lock = threading.Lock()

    def handler(msg: Message) -> None:
        with lock:
            handled.append((msg.partition(), msg.offset()))  # type: ignore[arg-type]

    consumer.subscribe([topic])
    with caplog.at_level(logging.WARNING, logger="resilient_kafka.consumer"):
        run_until(consumer, handler, lambda: len(handled) >= 16, timeout=60, concurrency=4)
    assert sorted(handled) == [(p, o) for p in (0, 1) for o in range(2, 10)]
    warnings = [r for r in caplog.records if "did not write" in r.getMessage()]
    assert len(warnings) == 1


def test_completed_offsets_that_do_not_fit_are_committed_as_a_prefix(
    mock_cluster: MockCluster,
) -> None:
    """Seven in eight records share a key whose first record is stuck: they wait behind it,
    while every eighth (keys of their own) completes. 3,750 done offsets spread over 30,000 fit
    neither a bitset nor runs in 4,000 characters: the commit names the first ones that fit."""
    topic, group, count = f"src-{uuid.uuid4().hex[:6]}", f"g{uuid.uuid4().hex[:6]}", 30_000
    mock_cluster.create_topic(topic, 1)
    _tier_topics(mock_cluster, topic, group)
    producer = Producer(mock_cluster.producer_config())
    for i in range(count):
        producer.produce(topic, key=f"k{i}" if i % 8 == 0 and i else "slow", value=b"")
        if i % 5000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0
    registry = CollectorRegistry()
    consumer = _consumer(mock_cluster, group, registry, auto_commit_interval_ms=200)
    release = threading.Event()
    handled: set[int] = set()
    lock = threading.Lock()

    def handler(msg: Message) -> None:
        if msg.offset() == 0:
            release.wait(60)
        with lock:
            handled.add(msg.offset())  # type: ignore[arg-type]

    consumer.subscribe([topic])
    options = {"concurrency": 8, "max_buffered": 2 * count, "max_buffered_per_partition": count}
    worker = threading.Thread(target=consumer.run, args=(handler,), kwargs=options)
    worker.start()
    try:
        wait_for(lambda: len(handled) == count // 8 - 1, 60, "the records of their own keys")
        overflows = "resilient_kafka_consumer_completed_offsets_overflow_total"
        wait_for(lambda: metric_total(registry, overflows) == 1, 30, "the overflow counted")

        def committed_a_prefix() -> bool:
            committed = _committed(mock_cluster, topic, group)
            named = decode(committed.metadata or "", committed.offset)
            own_keys = list(range(8, count, 8))
            return (
                committed.offset == 0
                and 0 < len(named) < len(own_keys)
                and sorted(named) == own_keys[: len(named)]
            )

        wait_for(committed_a_prefix, 30, "offset 0 committed with the done ones that fit")
        release.set()
        wait_for(lambda: len(handled) == count, 60, "the stuck key's records after it")
    finally:
        release.set()
        consumer.stop()
        worker.join(60)
    end = _committed(mock_cluster, topic, group)
    assert (end.offset, end.metadata or "") == (count, "")
