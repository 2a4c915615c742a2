"""Protocol-level faults on a three-broker cluster (librdkafka's mock cluster): partition leaders
move, a broker goes down and comes back, requests are answered with chosen error codes. For
each: nothing is lost (every record is handled or in the DLQ), no offset is committed past an
unfinished record, and the consumer recovers by itself or stops with the error the docs promise.

A third of the records fail once (their retry copies go through the retry tier) and a few fail
for good (DLQ), so forwards are produced while the faults hit.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from prometheus_client import CollectorRegistry

from resilient_kafka import ForwardError, ResilientConsumer, RetryPolicy, TransactionError
from resilient_kafka.testing import ApiKey, MockCluster
from tests.helpers import metric_total, wait_for

COUNT = 90
PARTITIONS = 3


class Load:
    """A source topic with its retry tier and DLQ on the mock cluster, ``COUNT`` keyed records,
    and a handler: every third record fails once, every seventeenth always."""

    def __init__(self, cluster: MockCluster, exactly_once: bool = False) -> None:
        self.cluster = cluster
        self.exactly_once = exactly_once
        self.out = f"out-{uuid.uuid4().hex[:6]}"
        cluster.create_topic(self.out, 1, replication_factor=3)
        self.registries: list[CollectorRegistry] = []  # of every consumer made
        self.topic = f"src-{uuid.uuid4().hex[:6]}"
        self.group = f"g{uuid.uuid4().hex[:6]}"
        cluster.create_topic(self.topic, PARTITIONS, replication_factor=3)
        probe = self.consumer()
        self.tier = probe.retry_topics(self.topic)[0]
        self.dlq = probe.dead_letter_topic(self.topic)
        probe.close()
        for name in (self.tier, self.dlq):  # the mock cluster answers no CreateTopics
            cluster.create_topic(name, PARTITIONS, replication_factor=3)
        producer = Producer(cluster.producer_config())
        self.values = [f"v{i}" for i in range(COUNT)]
        for i, value in enumerate(self.values):
            producer.produce(self.topic, key=f"k{i % 10}", value=value, partition=i % PARTITIONS)
        assert producer.flush(30) == 0
        self.attempts: dict[str, int] = {}
        self.done: set[str] = set()
        self.lock = threading.Lock()
        self.hold: threading.Event | None = None  # set: records after the first third wait
        # False: no record fails once after writing its output (each such failure aborts the
        # open transaction under exactly-once, so no commit would come for a while)
        self.flaky = True

    def consumer(
        self, quiet: bool = False, settings: dict[str, Any] | None = None, **conf: Any
    ) -> ResilientConsumer:
        """A consumer of the group (``quiet``: no librdkafka log lines, for faults that make
        it complain)."""
        config = self.cluster.client_config(
            group_id=self.group, auto_offset_reset="earliest", **conf
        )
        if quiet:
            config["log_level"] = 0
        registry = CollectorRegistry()
        self.registries.append(registry)
        self.current: ResilientConsumer
        self.current = ResilientConsumer(
            config,
            retry=RetryPolicy(delays=(0.2,)),
            registry=registry,
            exactly_once=self.exactly_once,
            **(settings or {}),
        )
        return self.current

    def handler(self, msg: Message) -> None:
        if self.hold is not None and len(self.done) >= COUNT // 3:
            self.hold.wait(60)
        value = msg.value().decode()  # type: ignore[union-attr]
        i = int(value[1:])
        with self.lock:
            self.attempts[value] = self.attempts.get(value, 0) + 1
            attempt = self.attempts[value]
        if i % 17 == 0:
            raise ValueError(f"{value} is poison")
        if self.exactly_once:  # its output, aborted with its transaction if it fails after
            self.current.producer.produce(self.out, value=value)
        if i % 3 == 0 and attempt == 1 and self.flaky:
            raise RuntimeError(f"{value} fails once")
        with self.lock:
            self.done.add(value)

    def expected_dead(self) -> set[str]:
        return {v for v in self.values if int(v[1:]) % 17 == 0}

    def settled(self) -> bool:
        """Every record handled, and every poison one routed to the DLQ by this consumer (its
        copy is acknowledged before the consumer's final commit)."""
        routed = sum(
            metric_total(r, "resilient_kafka_messages_handled_total", outcome="dead_lettered")
            for r in self.registries
        )
        dead = self.expected_dead()
        return len(self.done) == COUNT - len(dead) and routed >= len(dead)

    def committed_to_the_end(self) -> bool:
        return all(
            _committed(self.cluster, self.group, topic) == _ends(self.cluster, topic)
            for topic in (self.topic, self.tier)
        )

    def check(self) -> None:
        """Every record handled or dead-lettered, and the group committed to the end of the
        source and of the tier. A fault can make the last commit fail (the group's generation
        changed under it): then its records are delivered again, to a consumer that finishes
        the job here; nothing may be missing after it."""
        # the mock cluster accepts a transaction's offsets but never stores them (committed()
        # after the commit finds none: docs/testing.md), so in exactly-once mode the check
        # stays inside the one run, where replays rewind in process
        if not self.exactly_once and not self.committed_to_the_end():
            consumer = self.consumer()
            consumer.subscribe([self.topic])
            thread = threading.Thread(target=consumer.run, args=(self.handler,), daemon=True)
            thread.start()
            try:
                wait_for(self.committed_to_the_end, 60, "the group to commit to the end")
            finally:
                consumer.stop()
                thread.join(30)
        assert self.done == set(self.values) - self.expected_dead()
        dead = _read(self.cluster, self.dlq)
        assert set(dead) == self.expected_dead(), sorted(dead)
        if self.exactly_once:
            # every output there; "exactly once" cannot be read here: librdkafka 2.16's mock
            # shows aborted records to read_committed readers (docs/testing.md), so the
            # exactly-once output is checked on the embedded broker (test_exactly_once.py)
            outputs = set(_read(self.cluster, self.out, partitions=1))
            assert outputs == set(self.values) - self.expected_dead()


def _read(
    cluster: MockCluster,
    topic: str,
    partitions: int = PARTITIONS,
    isolation: str = "read_committed",
) -> list[str]:
    reader = Consumer(
        cluster.client_config(group_id=f"r-{uuid.uuid4().hex[:6]}", isolation_level=isolation)
    )
    reader.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    got: list[str] = []
    quiet = time.monotonic()
    try:
        while time.monotonic() - quiet < 1.5:
            msg = reader.poll(0.2)
            if msg is not None and msg.error() is None:
                got.append(msg.value().decode())  # type: ignore[union-attr]
                quiet = time.monotonic()
    finally:
        reader.close()
    return got


def _committed(cluster: MockCluster, group: str, topic: str) -> list[int]:
    reader = Consumer(cluster.client_config(group_id=group))
    try:
        found = reader.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], 10)
    finally:
        reader.close()
    return [max(tp.offset, 0) for tp in found]


def _ends(cluster: MockCluster, topic: str) -> list[int]:
    """Per partition, the offset after its last record a read_committed consumer sees: where
    the group's commit ends (transaction markers and aborted records lie beyond it)."""
    reader = Consumer(
        cluster.client_config(
            group_id=f"r-{uuid.uuid4().hex[:6]}", isolation_level="read_committed"
        )
    )
    reader.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    ends = [0] * PARTITIONS
    quiet = time.monotonic()
    try:
        while time.monotonic() - quiet < 1.0:
            msg = reader.poll(0.2)
            if msg is not None and msg.error() is None:
                partition, offset = msg.partition(), msg.offset()
                assert partition is not None and offset is not None
                ends[partition] = max(ends[partition], offset + 1)
                quiet = time.monotonic()
    finally:
        reader.close()
    return ends


def _run(
    load: Load,
    consumer: ResilientConsumer,
    fault: Callable[[], None] | None,
    settled: Callable[[], bool] | None = None,
) -> None:
    """Run until every record is settled (``settled``, default ``load.settled``); ``fault``
    strikes once a third is done; then stop (the final commit) and check."""
    settled = settled or load.settled
    thread, errors = _start_expecting(load, consumer, BaseException)
    try:
        if fault is not None:
            wait_for(lambda: len(load.done) >= COUNT // 3 or errors, 60, "a third handled")
            fault()
        wait_for(lambda: settled() or errors, 90, "every record settled")
    finally:
        consumer.stop()
        thread.join(60)
    assert not errors, errors
    assert not thread.is_alive()


def _start_expecting(
    load: Load, consumer: ResilientConsumer, error: type[BaseException]
) -> tuple[threading.Thread, list[BaseException]]:
    """``consumer.run(load.handler)`` in a thread that collects the ``error`` it is expected
    to stop with (any other error escapes the thread, and the list stays empty)."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            consumer.run(load.handler)
        except error as exc:
            failure.append(exc)

    consumer.subscribe([load.topic])
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, failure


def _leaders_to(cluster: MockCluster, broker: int, *topics: str) -> None:
    for topic in topics:
        for partition in range(PARTITIONS):
            cluster.set_leader(topic, partition, broker)


def test_partition_leaders_of_the_source_and_the_tiers_move_mid_stream(
    mock_cluster: MockCluster,
) -> None:
    load = Load(mock_cluster)
    _leaders_to(mock_cluster, 1, load.topic, load.tier, load.dlq)

    def move() -> None:
        _leaders_to(mock_cluster, 2, load.topic)
        _leaders_to(mock_cluster, 3, load.tier, load.dlq)

    _run(load, load.consumer(), move)
    load.check()


def test_a_broker_goes_down_and_comes_back(mock_cluster: MockCluster) -> None:
    load = Load(mock_cluster)
    _leaders_to(mock_cluster, 2, load.topic, load.tier, load.dlq)

    def outage() -> None:
        mock_cluster.broker_down(2)
        time.sleep(3)  # the fault's length, not a synchronisation
        mock_cluster.broker_up(2)

    _run(load, load.consumer(quiet=True), outage)
    load.check()


@pytest.mark.parametrize(
    "codes",
    [
        (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.NOT_LEADER_FOR_PARTITION),
        (KafkaError.REQUEST_TIMED_OUT, KafkaError.REQUEST_TIMED_OUT),
        (KafkaError.NOT_ENOUGH_REPLICAS, KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND),
    ],
    ids=["not-leader", "request-timed-out", "not-enough-replicas"],
)
def test_retriable_errors_on_forwards_are_retried(
    mock_cluster: MockCluster, codes: tuple[int, ...]
) -> None:
    load = Load(mock_cluster)
    _run(load, load.consumer(), lambda: mock_cluster.push_request_errors(ApiKey.Produce, *codes))
    load.check()


@pytest.mark.parametrize(
    "code",
    [KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.TOPIC_AUTHORIZATION_FAILED],
    ids=["message-too-large", "topic-authorization-failed"],
)
def test_a_permanent_error_on_a_forward_stops_run_with_forward_error_and_loses_nothing(
    mock_cluster: MockCluster, code: int
) -> None:
    """run() stops with ForwardError (its documented error); the refused copy's record is not
    committed; a new consumer, once the broker accepts again, finishes the job."""
    load = Load(mock_cluster)
    mock_cluster.push_request_errors(ApiKey.Produce, code)
    thread, failure = _start_expecting(load, load.consumer(), ForwardError)
    wait_for(lambda: failure or not thread.is_alive(), 60, "run() to stop with ForwardError")
    thread.join(30)
    assert failure and isinstance(failure[0], ForwardError), failure
    _run(load, load.consumer(), None)
    load.check()


@pytest.mark.parametrize(
    ("api", "codes"),
    [
        (
            ApiKey.OffsetCommit,
            (
                KafkaError.REBALANCE_IN_PROGRESS,
                KafkaError.COORDINATOR_NOT_AVAILABLE,
                KafkaError.UNKNOWN_MEMBER_ID,
                KafkaError.ILLEGAL_GENERATION,
            ),
        ),
        (ApiKey.Heartbeat, (KafkaError.REBALANCE_IN_PROGRESS, KafkaError.UNKNOWN_MEMBER_ID)),
        (ApiKey.JoinGroup, (KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.NOT_COORDINATOR)),
        (
            ApiKey.SyncGroup,
            (KafkaError.REBALANCE_IN_PROGRESS, KafkaError.COORDINATOR_LOAD_IN_PROGRESS),
        ),
    ],
    ids=["offset-commit", "heartbeat", "join-group", "sync-group"],
)
def test_group_protocol_errors_are_recovered_from(
    mock_cluster: MockCluster, api: int, codes: tuple[int, ...]
) -> None:
    load = Load(mock_cluster)
    # a commit every 100 ms: the errors meet commits mid-stream
    consumer = load.consumer(quiet=True, auto_commit_interval_ms=100)
    _run(load, consumer, lambda: mock_cluster.push_request_errors(api, *codes))
    load.check()


# -- exactly-once ---------------------------------------------------------------------------


def test_exactly_once_survives_an_init_producer_id_error(mock_cluster: MockCluster) -> None:
    load = Load(mock_cluster, exactly_once=True)
    mock_cluster.push_request_errors(
        ApiKey.InitProducerId, KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.NOT_COORDINATOR
    )
    _run(load, load.consumer(quiet=True), None)
    load.check()


@pytest.mark.parametrize(
    ("api", "codes"),
    [
        (
            ApiKey.AddPartitionsToTxn,
            (KafkaError.CONCURRENT_TRANSACTIONS, KafkaError.COORDINATOR_NOT_AVAILABLE),
        ),
        (
            ApiKey.AddOffsetsToTxn,
            (KafkaError.CONCURRENT_TRANSACTIONS, KafkaError.COORDINATOR_NOT_AVAILABLE),
        ),
        (
            ApiKey.TxnOffsetCommit,
            (KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.UNKNOWN_TOPIC_OR_PART),
        ),
        (ApiKey.EndTxn, (KafkaError.CONCURRENT_TRANSACTIONS, KafkaError.NOT_COORDINATOR)),
    ],
    ids=["add-partitions", "add-offsets", "txn-offset-commit", "end-txn"],
)
def test_exactly_once_recovers_from_transaction_errors(
    mock_cluster: MockCluster, api: int, codes: tuple[int, ...]
) -> None:
    """Retriable errors are retried, abortable ones abort and replay; the output stays exactly
    once (read_committed) and nothing is lost."""
    load = Load(mock_cluster, exactly_once=True)
    _run(load, load.consumer(quiet=True), lambda: mock_cluster.push_request_errors(api, *codes))
    load.check()


def test_a_fenced_producer_stops_run_with_transaction_error(mock_cluster: MockCluster) -> None:
    """Fenced mid-transaction (another instance took the transactional.id): run() stops with
    TransactionError, saying so (closing the fenced producer once replaced it with librdkafka's
    raw KafkaException)."""
    load = Load(mock_cluster, exactly_once=True)
    thread, failure = _start_expecting(load, load.consumer(quiet=True), TransactionError)
    wait_for(lambda: len(load.done) >= COUNT // 3, 60, "a third handled")
    mock_cluster.push_request_errors(ApiKey.EndTxn, KafkaError.PRODUCER_FENCED)
    wait_for(lambda: failure or not thread.is_alive(), 60, "run() to stop")
    thread.join(30)
    assert failure and isinstance(failure[0], TransactionError), failure
    assert "fenced" in str(failure[0]).lower(), str(failure[0])
    assert not thread.is_alive()


def test_a_transactional_call_that_never_returns_stops_run_with_transaction_error(
    mock_cluster: MockCluster,
) -> None:
    """librdkafka's send_offsets_to_transaction() can block far past its timeout while the
    group coordinator is unreachable (librdkafka issues 5456 and 5511; the orders example's
    chaos run found it hanging an inventory service for good after a broker restart). run()
    stops with TransactionError once the call's deadline has passed, instead of hanging, and
    nothing is lost: the next instance gets the records of the transaction that never
    committed."""
    load = Load(mock_cluster, exactly_once=True)
    # broker 2 is the group coordinator and nothing else: the records, their forwards and the
    # transaction coordinator stay reachable, so the commit reaches send_offsets_to_transaction
    tid = f"tx-{load.group}"
    _leaders_to(mock_cluster, 1, load.topic, load.tier, load.dlq)
    mock_cluster.set_leader(load.out, 0, 1)
    mock_cluster.set_coordinator("transaction", tid, 1)
    mock_cluster.set_coordinator("group", load.group, 2)
    settings = {
        "producer_config": {"transaction.timeout.ms": 4000, "transactional.id": tid},
        "forward_timeout": 2.0,
    }
    consumer = load.consumer(quiet=True, settings=settings)
    load.hold = threading.Event()  # records keep coming after the coordinator is gone
    thread, failure = _start_expecting(load, consumer, TransactionError)
    wait_for(lambda: len(load.done) >= COUNT // 3, 60, "a third handled")
    # the next commit must reach send_offsets_to_transaction within the session timeout (6 s):
    # records failing once after their output abort transaction after transaction, and once
    # the session has timed out the partitions are lost and there is nothing to commit
    load.flaky = False
    mock_cluster.broker_down(2)
    load.hold.set()
    rescue = threading.Timer(40, mock_cluster.broker_up, args=(2,))  # unblocks the old code
    rescue.start()
    try:
        started = time.monotonic()
        wait_for(lambda: failure or not thread.is_alive(), 45, "run() to stop")
        took = time.monotonic() - started
        thread.join(15)
    finally:
        rescue.cancel()
        mock_cluster.broker_up(2)
    assert failure and isinstance(failure[0], TransactionError), failure
    assert "did not return" in str(failure[0]), str(failure[0])
    assert took < 25, took  # the deadline: transaction timeout + forward timeout + grace
    assert not thread.is_alive()
    load.hold = None
    # the next instance finishes the work, from the beginning (the mock cluster never stores a
    # transaction's offsets). It is done when every poison record is in the DLQ: counting its
    # routings is not enough, since the mock shows it the tier copies of the first instance's
    # aborted and open transactions too (docs/testing.md), each routed again
    dead = load.expected_dead()
    _run(
        load,
        load.consumer(quiet=True),
        None,
        lambda: (
            load.settled()
            and dead <= set(_read(mock_cluster, load.dlq, isolation="read_uncommitted"))
        ),
    )
    load.check()
