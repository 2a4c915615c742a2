"""Exactly-once mode on the embedded broker: the handler's output, the retry/DLQ forwards and the
consumed offsets commit in one transaction; an aborted transaction is replayed.

Tansu (the embedded broker) keeps records of an *open* transaction from read_committed readers
(last stable offset) but, unlike Apache Kafka, shows the records of an *aborted* one to them
afterwards. The tests therefore check the strong property ("read_committed output has each
input's output exactly once") on the records of committed transactions, and check that aborted
records are hidden too whenever the broker filters them (``aborted_hidden``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter
from typing import Any

import pytest
import tenacity
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from prometheus_client import CollectorRegistry

from resilient_kafka import (
    ConfigurationError,
    ResilientConsumer,
    ResilientKafkaError,
    RetryPolicy,
    TransactionError,
)
from resilient_kafka.dedup import MemoryStore
from resilient_kafka.testing import KafkaCluster
from tests.helpers import run_until, wait_for


def _produce(kafka: KafkaCluster, topic: str, values: list[str], partitions: int = 1) -> None:
    producer = Producer(kafka.producer_config())
    for i, value in enumerate(values):
        producer.produce(topic, value=value, partition=i % partitions)
    assert producer.flush(30) == 0


def _read(
    kafka: KafkaCluster, topic: str, isolation: str, expect: int, settle: float = 1.0
) -> list[Message]:
    """Every record of ``topic`` visible at ``isolation``: reads until ``expect`` records came
    and nothing more arrives for ``settle`` seconds (or 30 s pass)."""
    reader = Consumer(
        kafka.client_config(
            group_id=f"reader-{uuid.uuid4().hex[:8]}",
            isolation_level=isolation,
            enable_auto_commit=False,
        )
    )
    parts = kafka.admin().list_topics(topic, timeout=10).topics[topic].partitions
    reader.assign([TopicPartition(topic, p, 0) for p in parts])
    got: list[Message] = []
    deadline = time.monotonic() + 30
    quiet_since = time.monotonic()
    try:
        while time.monotonic() < deadline:
            msg = reader.poll(0.2)
            if msg is not None and msg.error() is None:
                got.append(msg)
                quiet_since = time.monotonic()
            elif len(got) >= expect and time.monotonic() - quiet_since >= settle:
                break
    finally:
        reader.close()
    return got


@pytest.fixture(scope="session")
def aborted_hidden(kafka: KafkaCluster) -> bool:
    topic = f"rk-abort-probe-{uuid.uuid4().hex[:8]}"
    kafka.create_topics({topic: 1})
    producer = Producer(kafka.producer_config(transactional_id=f"probe-{uuid.uuid4().hex}"))
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topic, value=b"aborted")
    producer.flush(30)
    producer.abort_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, value=b"committed")
    producer.commit_transaction(30)
    values = [m.value() for m in _read(kafka, topic, "read_committed", expect=1)]
    kafka.delete_topics([topic])
    assert b"committed" in values
    return b"aborted" not in values


def _transactions(reg: CollectorRegistry, group: str, result: str) -> float:
    value = reg.get_sample_value(
        "resilient_kafka_consumer_transactions_total",
        {"messaging_consumer_group_name": group, "result": result},
    )
    return value or 0.0


def _committed(kafka: KafkaCluster, group: str, topic: str, partitions: int) -> list[int]:
    reader = Consumer(kafka.client_config(group_id=group))
    try:
        found = reader.committed([TopicPartition(topic, p) for p in range(partitions)], 30)
    finally:
        reader.close()
    return [tp.offset for tp in found]


def _eos_consumer(
    kafka: KafkaCluster, group: str, reg: CollectorRegistry, **kwargs: Any
) -> ResilientConsumer:
    """An exactly-once consumer of ``group`` from the earliest offset, retries after 0.2 s."""
    return ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        exactly_once=True,
        retry=RetryPolicy(delays=(0.2,)),
        registry=reg,
        **kwargs,
    )


class _Recorder:
    """A handler that writes one output record per call (``value:call``) through the
    consumer's producer, and fails the first call of the values in ``fail_first`` after
    writing (so its output must be aborted)."""

    def __init__(self, consumer: ResilientConsumer, out: str, fail_first: set[str]) -> None:
        self.consumer = consumer
        self.out = out
        self.fail_first = fail_first
        self.calls: Counter[str] = Counter()
        self.fail_before: set[str] = set()  # values whose first call fails before writing
        self.pause = 0.0  # seconds each call takes (concurrent handlers overlap)
        self._lock = threading.Lock()

    def __call__(self, msg: Message) -> None:
        value = msg.value().decode()
        with self._lock:  # concurrent handlers: one count per call
            self.calls[value] += 1
            call = self.calls[value]
        if self.pause:
            time.sleep(self.pause)
        if value in self.fail_before and call == 1:
            raise RuntimeError(f"{value} failed before writing anything")
        self.consumer.producer.produce(self.out, value=f"{value}:{call}")
        if value in self.fail_first and call == 1:
            raise RuntimeError(f"{value} failed after writing its output")


def _outputs_of_last_calls(outputs: list[Message], calls: Counter[str]) -> Counter[str]:
    """How often each input's output from its *last* handler call is in ``outputs``."""
    found: Counter[str] = Counter()
    for msg in outputs:
        value, call = msg.value().decode().rsplit(":", 1)
        if int(call) == calls[value]:
            found[value] += 1
    return found


def test_output_forwards_and_offsets_commit_together(
    kafka: KafkaCluster, topic_factory, aborted_hidden: bool
) -> None:
    source, out = topic_factory(2), topic_factory(1, suffix="out")
    group = f"g{uuid.uuid4().hex[:8]}"
    values = [f"v{i}" for i in range(20)]
    _produce(kafka, source, values, partitions=2)
    reg = CollectorRegistry()
    # v1 and v3 (both partition 1) share a transaction
    consumer = _eos_consumer(kafka, group, reg, transaction_interval=1.0)
    handler = _Recorder(consumer, out, fail_first={"v3", "v12"})
    consumer.subscribe([source])
    run_until(
        consumer,
        handler,
        lambda: all(handler.calls[v] >= (2 if v in {"v3", "v12"} else 1) for v in values),
    )

    # failed once, then retried: at least twice. More when a retry call shares a transaction
    # with the other failure (a slow machine): that transaction aborts and is replayed too
    assert handler.calls["v3"] >= 2 and handler.calls["v12"] >= 2
    assert _transactions(reg, group, "aborted") >= 2  # each failure aborted its transaction
    # what the aborted transaction held came again: v1 was handled before v3, in its partition
    assert handler.calls["v1"] >= 2
    outputs = _read(kafka, out, "read_committed", expect=len(values))
    # each input's output from its last (successful) call, exactly once
    assert _outputs_of_last_calls(outputs, handler.calls) == Counter(values)
    if aborted_hidden:  # and nothing of the aborted attempts (the failed calls, the replays)
        assert len(outputs) == len(values), sorted(m.value() for m in outputs)
    # the retry copies went through the transaction too, and the offsets are at the end
    assert _committed(kafka, group, source, 2) == [10, 10]


@pytest.mark.parametrize("loop", ["poll", "consume"])
def test_the_drop_in_loop_commits_in_transactions(
    kafka: KafkaCluster, topic_factory, aborted_hidden: bool, loop: str
) -> None:
    source, out = topic_factory(1), topic_factory(1, suffix="out")
    group = f"g{uuid.uuid4().hex[:8]}"
    values = [f"v{i}" for i in range(6)]
    _produce(kafka, source, values)
    reg = CollectorRegistry()
    consumer = _eos_consumer(kafka, group, reg)
    handler = _Recorder(consumer, out, fail_first={"v2"})
    consumer.subscribe([source])
    try:
        deadline = time.monotonic() + 60
        while not (handler.calls["v2"] == 2 and all(handler.calls[v] for v in values)):
            assert time.monotonic() < deadline, handler.calls
            batch = [consumer.poll(0.5)] if loop == "poll" else consumer.consume(10, 0.5)
            for msg in batch:  # a failure mid-batch: the records behind it still in hand
                if msg is None or msg.error() is not None:
                    continue
                try:
                    handler(msg)
                except RuntimeError as exc:
                    consumer.fail(msg, exc)
        with pytest.raises(ResilientKafkaError, match="without message= or offsets="):
            consumer.commit(message=msg)
        consumer.commit()
        assert _committed(kafka, group, source, 1) == [6]
    finally:
        consumer.close()
    assert _transactions(reg, group, "aborted") >= 1
    outputs = _read(kafka, out, "read_committed", expect=len(values))
    assert _outputs_of_last_calls(outputs, handler.calls) == Counter(values)
    if aborted_hidden:
        assert len(outputs) == len(values)


def test_a_rebalance_commits_the_transaction_and_the_new_owner_goes_on_from_there(
    kafka: KafkaCluster, topic_factory
) -> None:
    source, out = topic_factory(2), topic_factory(1, suffix="out")
    group = f"g{uuid.uuid4().hex[:8]}"
    values = [f"v{i}" for i in range(40)]
    _produce(kafka, source, values, partitions=2)
    reg = CollectorRegistry()
    handled: list[str] = []
    consumers, threads = [], []

    def start() -> None:
        consumer = ResilientConsumer(
            kafka.client_config(group_id=group, auto_offset_reset="earliest"),
            exactly_once=True,
            transaction_interval=30,  # only the rebalance (and close) commit
            registry=reg,
        )

        def handler(msg: Message) -> None:
            handled.append(msg.value().decode())
            consumer.producer.produce(out, value=msg.value())
            time.sleep(0.05)  # a slow handler: the rebalance comes mid-stream

        consumer.subscribe([source])
        thread = threading.Thread(target=consumer.run, args=(handler,), daemon=True)
        thread.start()
        consumers.append(consumer)
        threads.append(thread)

    start()
    try:
        wait_for(lambda: len(handled) >= 5, 60, "the first consumer to start")
        start()  # the group rebalances: the first consumer commits on revoke
        wait_for(lambda: set(handled) == set(values), 60, "every record to be handled")
    finally:
        for consumer in consumers:
            consumer.stop()
        for thread in threads:
            thread.join(30)
    assert _committed(kafka, group, source, 2) == [20, 20]
    assert reg.get_sample_value(
        "resilient_kafka_consumer_rebalances_total",
        {"messaging_consumer_group_name": group, "event": "revoke"},
    )
    assert _transactions(reg, group, "aborted") == 0
    assert sorted(handled) == sorted(values)  # each record handled once across the handover
    outputs = _read(kafka, out, "read_committed", expect=len(values))
    assert sorted(m.value().decode() for m in outputs) == sorted(values)


@pytest.mark.parametrize("mode", ["threads", "asyncio"])
def test_concurrent_handlers_keep_output_and_offsets_exactly_once(
    kafka: KafkaCluster, topic_factory, aborted_hidden: bool, mode: str
) -> None:
    """Eight handlers at once write into the open transaction; one failing after its write
    aborts it (the transaction commits or aborts only with no handler running), one failing
    before writing is routed without aborting anything."""
    source, out = topic_factory(2), topic_factory(1, suffix="out")
    group = f"g{uuid.uuid4().hex[:8]}"
    values = [f"v{i}" for i in range(40)]
    _produce(kafka, source, values, partitions=2)
    reg = CollectorRegistry()
    consumer = _eos_consumer(kafka, group, reg, transaction_interval=0.5)
    recorder = _Recorder(consumer, out, fail_first={"v7", "v30"})
    recorder.fail_before = {"v11", "v24"}
    recorder.pause = 0.02
    failing = recorder.fail_first | recorder.fail_before
    handler: Any = recorder
    if mode == "asyncio":

        async def handler(msg: Message) -> None:
            await asyncio.sleep(0.02)
            recorder(msg)

    consumer.subscribe([source])
    run_until(
        consumer,
        handler,
        lambda: all(recorder.calls[v] >= (2 if v in failing else 1) for v in values),
        concurrency=8,
    )
    outputs = _read(kafka, out, "read_committed", expect=len(values))
    assert _outputs_of_last_calls(outputs, recorder.calls) == Counter(values)
    if aborted_hidden:
        assert len(outputs) == len(values), sorted(m.value() for m in outputs)
    assert 1 <= _transactions(reg, group, "aborted") <= 2  # v7's and v30's, maybe together
    assert _committed(kafka, group, source, 2) == [20, 20]


def test_no_transaction_commits_while_a_concurrent_handler_runs(
    kafka: KafkaCluster, topic_factory
) -> None:
    """A handler writes its output, runs for 1 s (ten transaction intervals) while other keys
    flow, then fails: no transaction may commit meanwhile, or its output would be published
    for a record that is then routed to a retry tier."""
    source, out = topic_factory(1), topic_factory(1, suffix="out")
    group = f"g{uuid.uuid4().hex[:8]}"
    values = ["slow", *[f"v{i}" for i in range(40)]]
    producer = Producer(kafka.producer_config())
    for i, value in enumerate(values):
        producer.produce(source, key=f"k{i}", value=value)
    assert producer.flush(30) == 0
    reg = CollectorRegistry()
    consumer = _eos_consumer(kafka, group, reg, transaction_interval=0.1)
    seen: Counter[str] = Counter()
    commits_while_slow: list[float] = []
    lock = threading.Lock()

    def handler(msg: Message) -> None:
        value = msg.value().decode()  # type: ignore[union-attr]
        with lock:
            seen[value] += 1
            first = seen[value] == 1
        consumer.producer.produce(out, value=value)
        if value == "slow" and first:
            before = _transactions(reg, group, "committed")
            threading.Event().wait(1.0)  # its own run time, while the others flow
            commits_while_slow.append(_transactions(reg, group, "committed") - before)
            raise RuntimeError("slow fails after writing")
        time.sleep(0.02)

    consumer.subscribe([source])
    run_until(
        consumer,
        handler,
        lambda: seen["slow"] >= 2 and all(seen[v] for v in values),
        concurrency=8,
    )
    assert commits_while_slow == [0]


def test_a_concurrent_failure_before_any_output_aborts_nothing(
    kafka: KafkaCluster, topic_factory
) -> None:
    """Other handlers write while a record fails: its own handler wrote nothing, so the
    transaction is not aborted (each worker counts its handler's output)."""
    source, out = topic_factory(1), topic_factory(1, suffix="out")
    group = f"g{uuid.uuid4().hex[:8]}"
    values = [f"v{i}" for i in range(30)]
    _produce(kafka, source, values)
    reg = CollectorRegistry()
    consumer = _eos_consumer(kafka, group, reg)
    recorder = _Recorder(consumer, out, fail_first=set())
    recorder.fail_before = {"v3", "v10", "v17", "v25"}
    recorder.pause = 0.05
    consumer.subscribe([source])
    run_until(
        consumer,
        recorder,
        lambda: all(recorder.calls[v] >= (2 if v in recorder.fail_before else 1) for v in values),
        concurrency=8,
    )
    assert _transactions(reg, group, "aborted") == 0
    assert _committed(kafka, group, source, 1) == [30]


def test_an_attempt_that_wrote_output_is_not_retried_in_place(
    kafka: KafkaCluster, topic_factory
) -> None:
    source, out = topic_factory(1), topic_factory(1, suffix="out")
    group = f"g{uuid.uuid4().hex[:8]}"
    _produce(kafka, source, ["v0", "v1"])
    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        exactly_once=True,
        retry=RetryPolicy(delays=(0.2,), blocking_stop=tenacity.stop_after_attempt(3)),
        metrics=False,
    )
    recorder = _Recorder(consumer, out, fail_first={"v0"})
    topics: list[str] = []

    def handler(msg: Message) -> None:
        topics.append(msg.topic())
        recorder(msg)

    consumer.subscribe([source])
    run_until(consumer, handler, lambda: recorder.calls["v0"] >= 2 and recorder.calls["v1"] >= 1)
    # both attempts' output would commit together after an in-place retry: it went to the
    # retry topic instead (its first output aborted)
    assert topics[0] == source and consumer.retry_topics(source)[0] in topics


def test_a_failed_commit_replays_from_the_last_committed_offset(
    kafka: KafkaCluster, topic_factory
) -> None:
    source, out = topic_factory(1), topic_factory(1, suffix="out")
    group = f"g{uuid.uuid4().hex[:8]}"
    values = [f"v{i}" for i in range(10)]
    _produce(kafka, source, values)
    reg = CollectorRegistry()
    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        exactly_once=True,
        transaction_interval=0.5,
        registry=reg,
    )
    handler = _Recorder(consumer, out, fail_first=set())
    txn = consumer._txn
    assert txn is not None
    real_commit = txn.commit
    in_failed: list[str] = []

    def commit_failing_once(offsets: list[TopicPartition], metadata: object) -> bool:
        if offsets and not in_failed:  # the broker refuses the first commit: abortable
            in_failed.extend(handler.calls)
            txn.abort()
            return False
        return real_commit(offsets, metadata)

    txn.commit = commit_failing_once  # type: ignore[method-assign]
    consumer.subscribe([source])
    run_until(
        consumer,
        handler,
        lambda: (
            bool(in_failed)
            and all(handler.calls[v] >= 2 for v in in_failed)
            and all(handler.calls[v] for v in values)
        ),
    )
    assert _committed(kafka, group, source, 1) == [10]
    assert _transactions(reg, group, "aborted") == 1


_WORKER = textwrap.dedent(
    """
    import sys, time
    from resilient_kafka import ResilientConsumer

    bootstrap, source, out, group, tid = sys.argv[1:6]
    consumer = ResilientConsumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
         "session.timeout.ms": 6000},
        exactly_once=True, transaction_interval=600, producer_config={"transactional.id": tid},
        metrics=False,
    )
    delivered = []

    def handler(msg):
        value = msg.value().decode()
        consumer.producer.produce(
            out, value=value + ":1", on_delivery=lambda err, msg: delivered.append(err)
        )
        if value == "v5":
            while len(delivered) < 6:  # v0..v5's output is at the broker, uncommitted
                consumer.producer.poll(0.1)
            print("v0..v5 written", flush=True)
            time.sleep(600)  # SIGKILLed here, the transaction open

    consumer.subscribe([source])
    consumer.run(handler)
    """
)


def test_sigkill_mid_transaction_loses_nothing_and_shows_no_partial_output(
    kafka: KafkaCluster, topic_factory, aborted_hidden: bool
) -> None:
    source, out = topic_factory(1), topic_factory(1, suffix="out")
    group, tid = f"g{uuid.uuid4().hex[:8]}", f"rk-test-{uuid.uuid4().hex[:8]}"
    values = [f"v{i}" for i in range(10)]
    _produce(kafka, source, values)
    child = subprocess.Popen(
        [sys.executable, "-c", _WORKER, kafka.bootstrap_servers, source, out, group, tid],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "v0..v5 written"
        partial = _read(kafka, out, "read_uncommitted", expect=6)
        assert sorted(m.value() for m in partial) == [f"v{i}:1".encode() for i in range(6)]
        # the open transaction's records are invisible to read_committed readers
        assert _read(kafka, out, "read_committed", expect=0) == []
    finally:
        child.kill()  # SIGKILL, mid-transaction
        child.wait()
    assert _committed(kafka, group, source, 1) == [-1001]  # no offset outside a transaction

    # a restarted instance (same transactional.id) fences the dead one's transaction
    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        exactly_once=True,
        producer_config={"transactional.id": tid},
        metrics=False,
    )
    handled: list[str] = []

    def handler(msg: Message) -> None:
        handled.append(msg.value().decode())
        consumer.producer.produce(out, value=f"{msg.value().decode()}:2")

    consumer.subscribe([source])
    run_until(consumer, handler, lambda: len(handled) >= 10)
    assert handled == values  # nothing lost: v0..v5 again, then the rest
    assert _committed(kafka, group, source, 1) == [10]
    outputs = _read(kafka, out, "read_committed", expect=10)
    dead = {(m.partition(), m.offset()) for m in partial}
    committed = [m for m in outputs if (m.partition(), m.offset()) not in dead]
    assert sorted(m.value() for m in committed) == sorted(f"{v}:2".encode() for v in values)
    if aborted_hidden:  # Apache Kafka: the dead transaction's records never show
        assert len(outputs) == 10


def test_exactly_once_settings_are_checked(kafka: KafkaCluster) -> None:
    config = kafka.client_config(group_id="g-eos")
    with pytest.raises(ConfigurationError, match="dedup= and exactly_once"):
        ResilientConsumer(config, exactly_once=True, dedup=MemoryStore())
    with pytest.raises(ConfigurationError, match=r"enable\.auto\.commit"):
        ResilientConsumer({**config, "enable.auto.commit": True}, exactly_once=True)
    with pytest.raises(ConfigurationError, match="read_committed"):
        ResilientConsumer({**config, "isolation.level": "read_uncommitted"}, exactly_once=True)
    with pytest.raises(ConfigurationError, match=r"transactional\.id"):
        ResilientConsumer(config, producer_config={"transactional.id": "x"})
    with pytest.raises(ConfigurationError, match="transaction_interval"):
        ResilientConsumer(config, exactly_once=True, transaction_interval=0)
    slow = RetryPolicy(
        blocking_stop=tenacity.stop_after_attempt(60), blocking_wait=tenacity.wait_fixed(1)
    )
    consumer = ResilientConsumer(config, exactly_once=True, retry=slow)
    guard = threading.Timer(10, consumer.stop)  # were it accepted, run() would not return
    guard.start()
    try:  # 59 s of blocking retries would keep a transaction open past 80 % of 60 s
        with pytest.raises(ConfigurationError, match=r"transaction\.timeout\.ms"):
            consumer.run(lambda msg: None, concurrency=4)
    finally:
        guard.cancel()
        consumer.close()


class _BlockingProducer:
    """A transactional producer stand-in: ``init_transactions`` fails retriably ``fails``
    times; ``send_offsets_to_transaction`` blocks until ``release`` is set, whatever its
    timeout (as librdkafka's can while the group coordinator is unreachable)."""

    def __init__(self, fails: int = 0) -> None:
        self.fails = fails
        self.timeouts: list[float] = []
        self.release = threading.Event()

    def init_transactions(self, timeout: float) -> None:
        from confluent_kafka import KafkaError, KafkaException

        self.timeouts.append(timeout)
        if self.fails:
            self.fails -= 1
            time.sleep(0.05)
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "slow", retriable=True))

    def send_offsets_to_transaction(self, offsets: Any, metadata: Any, timeout: float) -> None:
        self.release.wait(30)

    def commit_transaction(self, timeout: float) -> None:
        pass


def test_a_bounded_transactional_call_is_never_given_an_unbounded_timeout() -> None:
    """init_transactions retried near its deadline gets what is left (at least 0.1 s), never
    librdkafka's -1 (wait forever)."""
    from resilient_kafka import _transaction

    producer = _BlockingProducer(fails=1000)
    with pytest.raises(TransactionError, match="init_transactions failed"):
        _transaction.Transactions(producer, "tid", timeout=0.3)
    assert len(producer.timeouts) > 2 and min(producer.timeouts) >= 0.1, producer.timeouts


def test_a_transactional_call_blocked_past_its_deadline_is_abandoned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from resilient_kafka import _transaction

    monkeypatch.setattr(_transaction, "_GRACE", 0.3)
    producer = _BlockingProducer()
    txn = _transaction.Transactions(producer, "tid", timeout=0.2, transaction_timeout=0.3)
    txn.open = True
    started = time.monotonic()
    try:
        with pytest.raises(TransactionError, match="send_offsets_to_transaction did not return"):
            txn.commit([TopicPartition("t", 0, 1)], object())
        assert 0.7 < time.monotonic() - started < 3  # the deadline (0.5 s) plus the grace
        assert txn.stuck and not txn.open
        assert producer in _transaction._ABANDONED  # never destroyed while the call blocks
        with pytest.raises(TransactionError, match="commit_transaction not attempted"):
            txn._call("commit_transaction", producer.commit_transaction)
    finally:
        producer.release.set()
        _transaction._ABANDONED.remove(producer)


@pytest.mark.parametrize("concurrency", [1, 2])
def test_batch_handlers_keep_output_and_offsets_exactly_once(
    kafka: KafkaCluster, topic_factory, concurrency: int
) -> None:
    """A batch whose named failure follows output written in the transaction: the
    transaction aborts, the batch's other records come again, the failed one is routed."""
    from resilient_kafka import BatchFailed
    from tests.helpers import serve

    source, out = topic_factory(2), topic_factory(1, suffix="out")
    group = f"g{uuid.uuid4().hex[:8]}"
    values = [f"v{i}" for i in range(20)]
    _produce(kafka, source, values, partitions=2)
    reg = CollectorRegistry()
    consumer = _eos_consumer(kafka, group, reg, transaction_interval=1.0)
    calls: Counter[str] = Counter()
    lock = threading.Lock()

    def handler(msgs: list[Message]) -> None:
        failures = []
        for msg in msgs:
            value = msg.value().decode()  # type: ignore[union-attr]
            with lock:
                calls[value] += 1
                call = calls[value]
            consumer.producer.produce(out, value=f"{value}:{call}")
            if value == "v3" and call == 1:
                failures.append((msg, RuntimeError("v3 failed after writing its output")))
        if failures:
            raise BatchFailed(failures)

    consumer.subscribe([source])
    serve(
        consumer.run_batches,
        handler,
        lambda: calls["v3"] >= 2 and all(calls[v] for v in values),
        120,  # a replay waits for a rejoin on Tansu, slow on a loaded machine
        concurrency=concurrency,
    )
    assert _transactions(reg, group, "aborted") >= 1
    outputs = _read(kafka, out, "read_committed", expect=len(values))
    assert _outputs_of_last_calls(outputs, calls) == Counter(values)
    assert _committed(kafka, group, source, 2) == [10, 10]


def test_batches_that_waited_for_a_commit_start_after_it_on_an_idle_topic(
    kafka: KafkaCluster, topic_factory
) -> None:
    """Concurrent batch handlers stop starting batches while a transaction commits. What waited
    must start when the commit is done, not when the next record arrives: here none does."""
    from tests.helpers import serve

    source = topic_factory(2)
    group = f"g{uuid.uuid4().hex[:8]}"
    values = [f"v{i}" for i in range(40)]
    _produce(kafka, source, values, partitions=2)
    consumer = _eos_consumer(kafka, group, CollectorRegistry(), transaction_interval=0.2)
    handled: list[str] = []
    lock = threading.Lock()

    def handler(msgs: list[Message]) -> None:
        time.sleep(0.15)  # the bulk write: commits fall due while batches run and wait
        with lock:
            handled.extend(m.value().decode() for m in msgs)  # type: ignore[union-attr]

    consumer.subscribe([source])
    serve(
        consumer.run_batches,
        handler,
        lambda: len(handled) >= len(values),
        60,
        concurrency=2,
        max_records=5,
    )
    assert sorted(handled) == sorted(values)
    # (not the committed offsets: Tansu stores only the first of transactions committed this
    # close together, see docs/testing.md)
