"""run(handler, concurrency=N): per-key order, parallelism, backpressure, failures, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
import tenacity
from confluent_kafka import Message
from prometheus_client import CollectorRegistry

from resilient_kafka import ConfigurationError, ResilientConsumer, RetryPolicy, headers
from resilient_kafka.testing import KafkaCluster
from tests.helpers import (
    committed_offsets,
    fresh_consumer,
    metric_total,
    produce,
    read_all,
    serve,
    wait_for,
)


class Tally:
    """What the handlers saw: order per key, and how many ran at once (overall, per key,
    per partition)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: dict[Any, list[int]] = defaultdict(list)
        self.done: set[str] = set()
        self.calls = 0
        self.running = 0
        self.peak = 0
        self.by_key: dict[Any, int] = defaultdict(int)
        self.key_peak = 0
        self.by_partition: dict[int, int] = defaultdict(int)
        self.partition_peak = 0


def _enter(tally: Tally, msg: Message) -> None:
    key, partition = msg.key(), msg.partition()
    with tally.lock:
        tally.calls += 1
        tally.running += 1
        tally.peak = max(tally.peak, tally.running)
        tally.by_key[key] += 1
        tally.key_peak = max(tally.key_peak, tally.by_key[key])
        tally.by_partition[partition] += 1  # type: ignore[index]
        tally.partition_peak = max(tally.partition_peak, tally.by_partition[partition])  # type: ignore[index]


def _leave(tally: Tally, msg: Message, ok: bool = True) -> None:
    key, partition = msg.key(), msg.partition()
    with tally.lock:
        tally.running -= 1
        tally.by_key[key] -= 1
        tally.by_partition[partition] -= 1  # type: ignore[index]
        if ok:
            seq = int(msg.value().decode().split("-")[1])  # type: ignore[union-attr]
            tally.seen[key].append(seq)
            tally.done.add(msg.value().decode())  # type: ignore[union-attr]


def _records(keys: list[str | None], per_key: int) -> list[tuple[Any, str]]:
    """``per_key`` records for each key, interleaved; values ``"<key>-<seq>"``."""
    return [(key, f"{key}-{seq}") for seq in range(per_key) for key in keys]


def _consumer(kafka: KafkaCluster, **kwargs: Any) -> ResilientConsumer:
    return fresh_consumer(kafka, **kwargs)  # type: ignore[no-any-return]


def _run(
    consumer: ResilientConsumer, handler: Any, done: Any, timeout: float = 60, **run: Any
) -> None:
    serve(consumer.run, handler, done, timeout, **run)


_committed = committed_offsets


def _group_of(consumer: ResilientConsumer) -> str:
    return consumer._group


# -- ordering and parallelism -------------------------------------------------------------------


def test_key_order_is_kept_while_keys_run_in_parallel(kafka: KafkaCluster, topic_factory) -> None:
    topic = topic_factory(2)
    keys = [f"k{i}" for i in range(20)]
    records = _records(keys, 15)  # 300 records
    produce(kafka.client_config(), topic, records)
    tally = Tally()

    def handler(msg: Message) -> None:
        _enter(tally, msg)
        time.sleep(0.02)
        _leave(tally, msg)

    consumer = _consumer(kafka)
    group = _group_of(consumer)
    consumer.subscribe([topic])
    _run(consumer, handler, lambda: len(tally.done) == len(records), concurrency=16)
    assert tally.calls == len(records), "a record was handled twice"
    for key in keys:
        assert tally.seen[key.encode()] == list(range(15)), f"key {key} out of order"
    assert tally.key_peak == 1, "two records of one key ran at once"
    assert tally.peak >= 8, f"at most {tally.peak} handlers ran at once"
    assert sum(_committed(kafka, group, topic, 2)) == len(records)


def test_partition_ordering_runs_one_record_per_partition(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic = topic_factory(2)
    records = _records([f"k{i}" for i in range(10)], 6)
    produce(kafka.client_config(), topic, records)
    tally = Tally()
    order: dict[int, list[int]] = defaultdict(list)

    def handler(msg: Message) -> None:
        _enter(tally, msg)
        order[msg.partition()].append(msg.offset())  # type: ignore[index, arg-type]
        time.sleep(0.01)
        _leave(tally, msg)

    consumer = _consumer(kafka)
    consumer.subscribe([topic])
    _run(
        consumer,
        handler,
        lambda: len(tally.done) == len(records),
        concurrency=8,
        ordering="partition",
    )
    assert tally.partition_peak == 1
    assert tally.peak == 2, "the two partitions did not run side by side"
    for offsets in order.values():
        assert offsets == sorted(offsets)


def test_null_keys_are_independent_and_unordered_ignores_keys(
    kafka: KafkaCluster, topic_factory
) -> None:
    """Null-keyed records are not one key (Parallel Consumer #183); "unordered" runs records
    of one key at once."""
    for ordering, key in (("key", None), ("unordered", "one")):
        topic = topic_factory(1, suffix=ordering)
        records = _records([key], 40)
        produce(kafka.client_config(), topic, records)
        tally = Tally()

        def handler(msg: Message, tally: Tally = tally) -> None:
            _enter(tally, msg)
            time.sleep(0.02)
            _leave(tally, msg)

        consumer = _consumer(kafka)
        consumer.subscribe([topic])
        _run(consumer, handler, lambda t=tally: len(t.done) == 40, concurrency=8, ordering=ordering)
        assert tally.peak >= 4, f"{ordering}/{key}: at most {tally.peak} at once"


# -- failures -----------------------------------------------------------------------------------


class Flaky(Exception):
    pass


def test_failures_reach_retry_tiers_and_the_dlq_and_nothing_is_lost(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic = topic_factory(2)
    records = _records([f"k{i}" for i in range(10)], 10)
    produce(kafka.client_config(), topic, records)
    doomed = {value for _, value in records if value.endswith("-3")}  # 10 records always fail
    once = {value for _, value in records if value.endswith("-5")}  # fail on the first attempt
    tally = Tally()

    def handler(msg: Message) -> None:
        value = msg.value().decode()  # type: ignore[union-attr]
        _enter(tally, msg)
        try:
            time.sleep(0.005)
            if value in doomed or (value in once and headers.attempt(msg) == 0):
                raise Flaky(value)
        except Flaky:
            _leave(tally, msg, ok=False)
            raise
        _leave(tally, msg)

    consumer = _consumer(kafka, retry=RetryPolicy(delays=(0.2,)))
    group = _group_of(consumer)
    dlq = consumer.dead_letter_topic(topic)
    consumer.subscribe([topic])
    _run(consumer, handler, lambda: len(tally.done) == len(records) - len(doomed), concurrency=8)
    dead = {m.value().decode() for m in read_all(kafka, dlq, len(doomed))}  # type: ignore[union-attr]
    assert dead == doomed
    assert tally.done | dead == {value for _, value in records}
    assert sum(_committed(kafka, group, topic, 2)) == len(records)


def test_blocking_retries_hold_only_their_key(kafka: KafkaCluster, topic_factory) -> None:
    """A record retried in place holds its key; other keys flow meanwhile, and the next record
    of its key waits for it."""
    topic = topic_factory(1)
    records = [("slow", "slow-0"), ("slow", "slow-1"), *_records([f"k{i}" for i in range(8)], 5)]
    produce(kafka.client_config(), topic, records)
    times: dict[str, float] = {}
    attempts: dict[str, int] = defaultdict(int)
    lock = threading.Lock()

    def handler(msg: Message) -> None:
        value = msg.value().decode()  # type: ignore[union-attr]
        with lock:
            attempts[value] += 1
            if value == "slow-0" and attempts[value] < 3:
                raise Flaky("not yet")
            times[value] = time.monotonic()

    policy = RetryPolicy(
        delays=(0.2,),
        blocking_stop=tenacity.stop_after_attempt(3),
        blocking_wait=tenacity.wait_fixed(0.5),
    )
    consumer = _consumer(kafka, retry=policy)
    consumer.subscribe([topic])
    _run(consumer, handler, lambda: len(times) == len(records), concurrency=4)
    assert attempts["slow-0"] == 3
    others = [at for value, at in times.items() if not value.startswith("slow")]
    assert max(others) < times["slow-0"], "other keys waited for the retried record"
    assert times["slow-1"] > times["slow-0"], "its key's next record overtook it"


def test_an_outage_gives_back_queued_records_and_skips_none(
    kafka: KafkaCluster, topic_factory
) -> None:
    """A breaker opens while a slow key's next record waits behind it: that record is given
    back, and comes again after the probe, although it is below the held record."""
    from resilient_kafka import CircuitBreaker

    topic = topic_factory(1)
    produce(kafka.client_config(), topic, [("A", "A-0"), ("A", "A-1"), ("B", "B-2"), ("C", "C-3")])
    breaker = CircuitBreaker("payments", fail_max=1, reset_timeout=0.5)
    handled: dict[str, int] = defaultdict(int)
    calls: dict[str, int] = defaultdict(int)
    lock = threading.Lock()

    def service(value: str) -> None:
        with lock:
            calls[value] += 1
            if value == "B-2" and calls[value] == 1:  # down once: the held B-2 is the probe
                raise ConnectionError("payments down")

    def handler(msg: Message) -> None:
        value = msg.value().decode()  # type: ignore[union-attr]
        if value == "A-0":
            time.sleep(1.0)  # A-1 waits behind it while the breaker opens
        else:
            breaker.call(service, value)
        with lock:
            handled[value] += 1

    consumer = _consumer(kafka, breakers=[breaker], retry=RetryPolicy(delays=()))
    group = _group_of(consumer)
    consumer.subscribe([topic])
    _run(
        consumer,
        handler,
        lambda: {"A-0", "A-1", "B-2", "C-3"} <= set(handled),
        timeout=30,
        concurrency=4,
    )
    assert _committed(kafka, group, topic, 1) == [4]


def test_a_cancelled_error_from_a_handler_is_a_failure(kafka: KafkaCluster, topic_factory) -> None:
    """A handler's own CancelledError (a library cancelled what it awaited) routes its record:
    it does not leave the partition stuck below it."""
    topic = topic_factory(1)
    records = _records([f"k{i}" for i in range(5)], 2)
    produce(kafka.client_config(), topic, records)
    done: set[str] = set()

    async def handler(msg: Message) -> None:
        value = msg.value().decode()  # type: ignore[union-attr]
        if value == "k2-0":
            raise asyncio.CancelledError()
        done.add(value)

    consumer = _consumer(kafka, retry=RetryPolicy(delays=()))
    group = _group_of(consumer)
    dlq = consumer.dead_letter_topic(topic)
    consumer.subscribe([topic])
    _run(consumer, handler, lambda: len(done) == len(records) - 1, concurrency=4)
    assert [m.value() for m in read_all(kafka, dlq, 1)] == [b"k2-0"]
    assert _committed(kafka, group, topic, 1) == [len(records)]


# -- backpressure -------------------------------------------------------------------------------


def test_a_hot_key_pauses_only_its_partition(kafka: KafkaCluster, topic_factory) -> None:
    """Parallel Consumer #540: a slow key stops its own partition (bounded memory), not the
    others; records that only wait for a free worker pause nothing."""
    topic = topic_factory(2)
    from confluent_kafka import Producer

    producer = Producer(kafka.client_config())
    hot = [f"hot-{i}" for i in range(200)]
    for value in hot:
        producer.produce(topic, key="hot", value=value, partition=0)
    cold = [f"c{i}-0" for i in range(200)]
    for i, value in enumerate(cold):
        producer.produce(topic, key=f"c{i}", value=value, partition=1)
    assert producer.flush(30) == 0
    done: set[str] = set()
    paused: set[tuple[str, int]] = set()
    held: list[int] = []
    registry = CollectorRegistry()
    consumer = _consumer(kafka, registry=registry)

    def handler(msg: Message) -> None:
        value = msg.value().decode()  # type: ignore[union-attr]
        if value.startswith("hot"):
            time.sleep(0.01)
        paused.update(consumer._control.paused_by("backpressure"))
        executor = consumer._loop.executor
        held.append(executor.held if executor is not None else 0)
        done.add(value)

    consumer.subscribe([topic])
    hot_done_when_cold_was: list[int] = []

    def finished() -> bool:
        if not hot_done_when_cold_was and all(value in done for value in cold):
            hot_done_when_cold_was.append(sum(1 for v in done if v.startswith("hot")))
        return len(done) == 400

    _run(
        consumer,
        handler,
        finished,
        concurrency=8,
        max_buffered=300,
        max_buffered_per_partition=20,
    )
    assert paused == {(topic, 0)}, f"paused for backpressure: {paused}"
    assert hot_done_when_cold_was[0] < 100, (
        f"the cold partition finished only after {hot_done_when_cold_was[0]} hot records"
    )
    assert max(held) <= 300, f"{max(held)} records held at once"
    # the hot key's records waited behind each other (10 ms each); the cold ones never did
    waits = "resilient_kafka_consumer_key_wait_seconds"
    assert metric_total(registry, f"{waits}_count") >= 150
    assert metric_total(registry, f"{waits}_sum") > 1.0


def test_the_total_bound_holds_without_pausing(kafka: KafkaCluster, topic_factory) -> None:
    """At max_buffered the loop stops fetching (records wait in librdkafka's queue) instead of
    pausing partitions, whose resume would cost a fetch round trip."""
    topic = topic_factory(2)
    records = _records([f"k{i}" for i in range(100)], 4)
    produce(kafka.client_config(), topic, records)
    held: list[int] = []
    paused: set[tuple[str, int]] = set()
    done: set[str] = set()
    consumer = _consumer(kafka)

    def handler(msg: Message) -> None:
        time.sleep(0.005)
        executor = consumer._loop.executor
        held.append(executor.held if executor is not None else 0)
        paused.update(consumer._control.paused_by("backpressure"))
        done.add(msg.value().decode())  # type: ignore[union-attr]

    consumer.subscribe([topic])
    _run(consumer, handler, lambda: len(done) == len(records), concurrency=8, max_buffered=40)
    assert not paused, f"paused for backpressure: {paused}"
    assert max(held) <= 41, f"{max(held)} records held (bound 40, one a second beyond it)"
    assert max(held) >= 30, "the bound was never approached: the test shows nothing"


def test_a_rebalance_mid_flight_loses_nothing(kafka: KafkaCluster, topic_factory) -> None:
    """A second member joins while the first runs slow handlers on every partition: the first
    awaits what runs on the partitions it gives up (inside the rebalance callback), drops what
    waits, and commits; between them every record is handled, and the group commits all."""
    topic = topic_factory(4)
    records = _records([f"k{i}" for i in range(80)], 5)  # 400 records: 5 s for one member
    produce(kafka.client_config(), topic, records)
    done: dict[str, set[str]] = {"first": set(), "second": set()}
    lock = threading.Lock()

    def handler_for(name: str) -> Any:
        def handler(msg: Message) -> None:
            time.sleep(0.1)
            with lock:
                done[name].add(msg.value().decode())  # type: ignore[union-attr]

        return handler

    group = f"conc-{uuid.uuid4().hex[:8]}"

    def member() -> ResilientConsumer:
        consumer = ResilientConsumer(
            kafka.client_config(
                group_id=group,
                auto_offset_reset="earliest",
                session_timeout_ms=6000,
                heartbeat_interval_ms=1000,
            ),
            registry=CollectorRegistry(),
        )
        consumer.subscribe([topic])
        return consumer

    first = member()  # the second subscribes only when it starts polling: a member that
    second: ResilientConsumer | None = None  # joined but never polls would stall the group
    threads = [
        threading.Thread(
            target=first.run,
            args=(handler_for("first"),),
            kwargs={"concurrency": 8, "drain_timeout": 10.0},
            daemon=True,
        )
    ]
    threads[0].start()
    try:
        wait_for(lambda: len(done["first"]) >= 20, 60, "the first member to be busy")
        second = member()
        threads.append(
            threading.Thread(
                target=second.run,
                args=(handler_for("second"),),
                kwargs={"concurrency": 8},
                daemon=True,
            )
        )
        threads[1].start()
        wait_for(lambda: len(done["second"]) > 0, 60, "the second member to get partitions")
        wait_for(lambda: len(done["first"] | done["second"]) == len(records), 60, "every record")
    finally:
        first.stop()
        if second is not None:
            second.stop()
        for thread in threads:
            thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert sum(_committed(kafka, group, topic, 4)) == len(records)


# -- shutdown and asyncio -----------------------------------------------------------------------


def test_stop_awaits_running_handlers_and_commits_only_what_is_done(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic = topic_factory(1)
    records = _records([f"k{i}" for i in range(4)], 50)
    produce(kafka.client_config(), topic, records)
    started = threading.Event()
    finished: list[int] = []

    def handler(msg: Message) -> None:
        started.set()
        time.sleep(0.3)
        finished.append(msg.offset())  # type: ignore[arg-type]

    consumer = _consumer(kafka)
    group = _group_of(consumer)
    consumer.subscribe([topic])
    thread = threading.Thread(
        target=consumer.run, args=(handler,), kwargs={"concurrency": 4}, daemon=True
    )
    thread.start()
    assert started.wait(30)
    consumer.stop()
    thread.join(30)
    assert not thread.is_alive()
    assert 1 <= len(finished) < len(records)
    done = set(finished)
    contiguous = 0
    while contiguous in done:
        contiguous += 1
    assert _committed(kafka, group, topic, 1) == [contiguous]


def test_async_handler_runs_many_at_once(kafka: KafkaCluster, topic_factory) -> None:
    topic = topic_factory(2)
    records = _records([f"k{i}" for i in range(200)], 2)
    produce(kafka.client_config(), topic, records)
    tally = Tally()

    async def handler(msg: Message) -> None:
        _enter(tally, msg)
        await asyncio.sleep(0.05)
        _leave(tally, msg)

    consumer = _consumer(kafka)
    consumer.subscribe([topic])
    _run(consumer, handler, lambda: len(tally.done) == len(records), concurrency=200)
    assert tally.peak >= 50, f"at most {tally.peak} tasks at once"
    assert tally.key_peak == 1
    for key, seqs in tally.seen.items():
        assert seqs == [0, 1], key


def test_run_async_in_the_applications_loop_stops_on_cancel(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic = topic_factory(1)
    records = _records([f"k{i}" for i in range(50)], 2)
    produce(kafka.client_config(), topic, records)
    tally = Tally()
    loops: set[int] = set()
    consumer = _consumer(kafka)
    group = _group_of(consumer)
    consumer.subscribe([topic])

    async def handler(msg: Message) -> None:
        loops.add(id(asyncio.get_running_loop()))
        _enter(tally, msg)
        await asyncio.sleep(0.01)
        _leave(tally, msg)

    async def main() -> int:
        task = asyncio.create_task(consumer.run_async(handler, concurrency=20))
        deadline = time.monotonic() + 60
        while len(tally.done) < len(records):
            assert time.monotonic() < deadline, f"{len(tally.done)} handled"
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return id(asyncio.get_running_loop())

    app_loop = asyncio.run(main())
    assert loops == {app_loop}
    assert _committed(kafka, group, topic, 1) == [len(records)]
    with pytest.raises(RuntimeError):
        consumer.poll(0)  # closed


# -- bad options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency": 0}, "concurrency must be an integer >= 1"),
        ({"concurrency": True}, "concurrency must be an integer >= 1"),
        ({"concurrency": 2.5}, "concurrency must be an integer >= 1"),
        ({"ordering": "fifo"}, "ordering must be one of 'key', 'partition', 'unordered'"),
        ({"concurrency": 50, "max_buffered": 10}, r"max_buffered \(10\) must be an integer >= "),
        ({"max_buffered_per_partition": 0}, "max_buffered_per_partition must be an integer >= 1"),
    ],
)
def test_bad_concurrency_options_are_refused(
    kafka: KafkaCluster, options: dict[str, Any], message: str
) -> None:
    consumer = _consumer(kafka)
    try:
        with pytest.raises(ConfigurationError, match=message):
            consumer.run(lambda msg: None, **options)
        consumer.poll(0)  # a refused run() leaves the consumer usable
    finally:
        consumer.close()


def test_run_async_refuses_a_plain_function(
    kafka: KafkaCluster,
) -> None:
    consumer = _consumer(kafka)
    try:
        with pytest.raises(ConfigurationError, match="run_async\\(\\) needs an async def"):
            asyncio.run(consumer.run_async(lambda msg: None))  # type: ignore[arg-type, return-value]
    finally:
        consumer.close()


# -- dedup ------------------------------------------------------------------------------------


def _produce_with_ids(kafka: KafkaCluster, topic: str, records: list[tuple[str, str, str]]) -> None:
    """(key, value, rk.id) records into partition 0."""
    from confluent_kafka import Producer

    producer = Producer(kafka.producer_config())
    for key, value, ident in records:
        producer.produce(topic, key=key, value=value, partition=0, headers=[(headers.ID, ident)])
    assert producer.flush(30) == 0


def test_twins_held_at_once_run_once(kafka: KafkaCluster, topic_factory) -> None:
    """Two copies of each message (same rk.id, different keys: they would run in parallel)
    are fetched together; the second waits for the first's outcome and is skipped."""
    from resilient_kafka.dedup import MemoryStore

    topic = topic_factory(1)
    records = [(f"a{i}", f"a{i}-0", f"id{i}") for i in range(20)]
    records += [(f"b{i}", f"b{i}-0", f"id{i}") for i in range(20)]
    _produce_with_ids(kafka, topic, records)
    registry = CollectorRegistry()
    consumer = ResilientConsumer(
        kafka.client_config(group_id=f"conc-{uuid.uuid4().hex[:8]}", auto_offset_reset="earliest"),
        registry=registry,
        dedup=MemoryStore(),
    )
    consumer.subscribe([topic])
    calls: dict[bytes, int] = defaultdict(int)
    lock = threading.Lock()

    def handler(msg: Message) -> None:
        time.sleep(0.05)
        ident = dict(msg.headers() or [])[headers.ID]
        with lock:
            calls[ident] += 1

    skipped = "resilient_kafka_messages_handled_total"
    _run(
        consumer,
        handler,
        lambda: (
            len(calls) == 20 and metric_total(registry, skipped, outcome="duplicate_skipped") == 20
        ),
        concurrency=40,
    )
    assert set(calls.values()) == {1}


def test_a_claim_held_elsewhere_is_waited_for_in_a_worker(
    kafka: KafkaCluster, topic_factory
) -> None:
    """Another consumer holds the claim of the first record (and dies: it never completes):
    its worker waits out the lease while the other records flow; then it runs. A message
    another consumer completed is skipped."""
    from resilient_kafka.dedup import DONE, MemoryStore

    store = MemoryStore()
    topic = topic_factory(1)
    _produce_with_ids(
        kafka,
        topic,
        [("k0", "k0-0", "held"), ("k1", "k1-0", "done")]
        + [(f"k{i}", f"k{i}-0", f"id{i}") for i in range(2, 30)],
    )
    group = f"conc-{uuid.uuid4().hex[:8]}"
    store.claim(f"{group}|id:done", "another-consumer", 3.0)
    store.complete(f"{group}|id:done", "another-consumer")
    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        registry=CollectorRegistry(),
        dedup=store,
        dedup_lease=3.0,
    )

    def claim_it(consumer: Any, partitions: Any) -> None:  # the group takes its time to join
        assert store.claim(f"{group}|id:held", "another-consumer", 3.0) != DONE

    consumer.subscribe([topic], on_assign=claim_it)
    order: list[str] = []
    lock = threading.Lock()

    def handler(msg: Message) -> None:
        with lock:
            order.append(msg.key().decode())  # type: ignore[union-attr]

    _run(consumer, handler, lambda: "k0" in order, concurrency=4)
    assert sorted(order) == sorted(["k0", *[f"k{i}" for i in range(2, 30)]])
    assert order[-1] == "k0"  # the others did not wait behind the claim
    assert _committed(kafka, group, topic, 1) == [30]


@pytest.fixture(autouse=True)
def _no_worker_left() -> Iterator[None]:
    """Every worker thread and event loop thread ends with its consumer."""
    yield
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = [t.name for t in threading.enumerate() if t.name.startswith("resilient-kafka-")]
        if not left or all(name == "resilient-kafka-topics" for name in left):
            return
        time.sleep(0.05)
    raise AssertionError(f"threads left behind: {left}")


# -- the work manager alone (no broker: a fake runner decides when each record finishes) --------


class _FakeRunner:
    def __init__(self) -> None:
        import queue

        self.mailbox: Any = queue.SimpleQueue()
        self.started: list[tuple[Any, int]] = []
        self.cancelled: set[int] = set()
        self.stopping = False

    def start(self, record: Any, epoch: int) -> None:
        self.started.append((record, epoch))

    def finish(self, record: Any, exc: BaseException | None = None) -> None:
        epoch = next(e for r, e in self.started if r is record)
        self.mailbox.put((record, epoch, exc, 0.0))

    def close(self) -> None:
        pass


def _work_manager(runner: _FakeRunner, settled: list[tuple[str, int]], **kwargs: Any) -> Any:
    from types import SimpleNamespace

    from resilient_kafka._work import WorkManager
    from resilient_kafka.metrics import NoMetrics

    settle = SimpleNamespace(
        done=lambda r: settled.append(("done", r.offset)),
        failed=lambda r, exc: settled.append(("failed", r.offset)),
        later=lambda r: settled.append(("later", r.offset)),
    )
    control = SimpleNamespace(
        assigned={("t", 0)},
        pause=lambda keys, reason: None,
        release=lambda keys, reason: [],
        rewind=lambda key, offset: settled.append(("rewind", offset)),
    )
    outage = SimpleNamespace(current=None, is_probe=lambda r: False)
    options = {
        "concurrency": 2,
        "ordering": "key",
        "max_buffered": 100,
        "max_buffered_per_partition": 50,
        "drain_timeout": 0.2,
        **kwargs,
    }
    claims = kwargs.pop("claims", None)
    options = {k: v for k, v in options.items() if k != "claims"}
    return WorkManager(runner, settle, control, outage, claims, NoMetrics(), **options)  # type: ignore[arg-type]


def _record(offset: int, key: bytes | None) -> Any:
    from types import SimpleNamespace

    from resilient_kafka._record import Record

    msg = SimpleNamespace(key=lambda: key)
    return Record(msg, "t", 0, offset)  # type: ignore[arg-type]


def test_work_manager_orders_a_key_and_fences_revoked_outcomes() -> None:
    runner = _FakeRunner()
    settled: list[tuple[str, int]] = []
    work = _work_manager(runner, settled, concurrency=3)
    a0, b1, a2, c3 = _record(0, b"a"), _record(1, b"b"), _record(2, b"a"), _record(3, b"c")
    for record in (a0, b1, a2, c3):
        work.submit(record)
    # three workers: a0, b1 and c3 run; a2 waits behind a0
    assert [r.offset for r, _ in runner.started] == [0, 1, 3]
    runner.finish(b1)
    work.collect()
    assert [r.offset for r, _ in runner.started] == [0, 1, 3], "a2 overtook a0"
    runner.finish(a0, RuntimeError("boom"))
    work.collect()
    assert settled == [("done", 1), ("failed", 0)]
    assert [r.offset for r, _ in runner.started][-1] == 2, "a2 starts once a0 is settled"
    # the partition is revoked while a2 and c3 run (awaited for drain_timeout), and assigned
    # again before their outcomes arrive: they belong to the old epoch and are ignored
    work.revoke({("t", 0)}, lost=False)
    a4 = _record(4, b"a")
    work.submit(a4)
    assert runner.started[-1][0] is a4, "the new assignment's key a does not wait for a2"
    runner.finish(a2)
    runner.finish(c3)
    runner.finish(a4)
    work.collect()
    assert settled == [("done", 1), ("failed", 0), ("done", 4)]
    assert work.running == 0 and work.held == 0


class _FakeClaims:
    """Dedup claims that record what the work manager does with them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def identity(self, record: Any) -> str:
        return "X"  # every record is a copy of one message

    def complete(self, record: Any) -> None:
        self.calls.append(("complete", record.offset))
        record.claim = None

    def release(self, record: Any) -> None:
        self.calls.append(("release", record.offset))
        record.claim = None


def test_a_late_success_completes_its_claim_and_its_twin_starts_after_it() -> None:
    """A handler that succeeded after its partition was revoked did its side effect: its claim
    becomes done (a release would let its twin, or the new owner, run it again)."""
    runner = _FakeRunner()
    settled: list[tuple[str, int]] = []
    claims = _FakeClaims()
    work = _work_manager(runner, settled, claims=claims, drain_timeout=0.0)
    first, twin = _record(0, b"a"), _record(1, b"b")
    work.submit(first)
    work.submit(twin)
    assert [r.offset for r, _ in runner.started] == [0], "the twin waits for the first copy"
    first.claim = "X"  # the worker claimed it
    work.revoke({("t", 0)}, lost=True)
    runner.finish(first)  # it succeeded, too late for its epoch
    work.collect()
    assert claims.calls == [("complete", 0)]
    assert settled == []  # not settled here: the new owner's offsets are its own


def test_a_second_give_back_never_moves_its_partition_forward() -> None:
    """Records 10 and 12 of a partition run; another consumer holds both claims. 10 is given
    back (its partition rewinds to 10); before 10 is fetched again, 12 is given back too: the
    partition must stay at 10, not jump forward to 12 and skip 10 and 11."""
    from resilient_kafka._claims import Verdict
    from resilient_kafka._work import Unclaimed

    runner = _FakeRunner()
    settled: list[tuple[str, int]] = []
    claims = _FakeClaims()
    claims.identity = lambda record: f"id{record.offset}"  # type: ignore[method-assign]
    work = _work_manager(runner, settled, claims=claims, ordering="unordered")
    r10, r11, r12 = _record(10, b"a"), _record(11, b"b"), _record(12, b"c")
    for record in (r10, r11, r12):
        work.submit(record)
    runner.finish(r11)
    runner.finish(r10, Unclaimed(Verdict.LATER))
    work.collect()
    runner.finish(r12, Unclaimed(Verdict.LATER))
    work.collect()
    rewinds = [offset for what, offset in settled if what == "rewind"]
    assert rewinds == [10, 10], rewinds
