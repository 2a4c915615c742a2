"""run_batches(handler): batches, the records a failure names, finding the failing ones,
concurrency by partition and by key, async handlers, dedup, breakers, bad options."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from typing import Any

import pytest
import tenacity
from confluent_kafka import Message
from prometheus_client import CollectorRegistry

from resilient_kafka import (
    BatchFailed,
    CircuitBreaker,
    ConfigurationError,
    ResilientConsumer,
    RetryPolicy,
    headers,
)
from resilient_kafka._batch import FailureSearch
from resilient_kafka.dedup import MemoryStore
from resilient_kafka.testing import KafkaCluster
from tests.helpers import (
    committed_offsets,
    fresh_consumer,
    metric_total,
    produce,
    read_all,
    records_in,
    serve,
    wait_for,
)


class Poison(Exception):
    pass


# -- finding the failing records, without a broker ------------------------------------------------


class _Rec:
    def __init__(self, n: int) -> None:
        self.msg = n


def _drive(records: list[Any], bad: set[int], systemic: Any = lambda e: False) -> tuple[Any, int]:
    """A FailureSearch with a handler that fails (plainly) when a part holds a bad record."""
    search = FailureSearch(records, systemic)
    part = search.first()
    calls = 0
    while part is not None:
        calls += 1
        failing = [r.msg for r in part if r.msg in bad]
        part = search.after(Poison(failing) if failing else None)
    return search.outcomes, calls


def test_a_plain_exception_is_narrowed_down_to_the_records_that_fail_alone() -> None:
    records = [_Rec(i) for i in range(500)]
    outcomes, calls = _drive(records, {17, 301})
    failed = [i for i, o in enumerate(outcomes) if o is not None]
    assert failed == [17, 301]
    assert all(isinstance(outcomes[i], Poison) for i in failed)
    assert calls <= 2 * 2 * 9 + 1, f"{calls} calls to find 2 records in 500"


def test_parts_are_handed_over_left_first_so_order_holds() -> None:
    search = FailureSearch([_Rec(i) for i in range(8)], lambda e: False)
    part = search.first()
    seen = []
    while part is not None:
        seen.append([r.msg for r in part])
        part = search.after(Poison() if 5 in seen[-1] else None)
    assert seen == [
        list(range(8)),
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [4, 5],
        [4],
        [5],
        [6, 7],
    ]


def test_records_a_batch_failure_names_fail_and_no_others() -> None:
    records = [_Rec(i) for i in range(10)]
    search = FailureSearch(records, lambda e: False)
    boom, bang = Poison("3"), Poison("7")
    assert search.after(BatchFailed([(records[3].msg, boom), (7, bang)])) is None
    outcomes = search.outcomes
    assert outcomes[3] is boom and outcomes[7] is bang
    assert [o for i, o in enumerate(outcomes) if i not in (3, 7)] == [None] * 8


def test_a_batch_failure_naming_a_stranger_is_narrowed_down_like_any_other() -> None:
    search = FailureSearch([_Rec(i) for i in range(4)], lambda e: False)
    part = search.after(BatchFailed([(99, Poison("not in the batch"))]))
    assert part is not None and [r.msg for r in part] == [0, 1], "the batch was not split"


def test_a_systemic_failure_fails_every_record_without_splitting() -> None:
    outcomes, calls = _drive([_Rec(i) for i in range(64)], {3}, systemic=lambda e: True)
    assert calls == 1
    assert all(isinstance(o, Poison) for o in outcomes)


def test_a_batch_failure_needs_a_record() -> None:
    with pytest.raises(ValueError, match="at least one"):
        BatchFailed({})


# -- on the broker ---------------------------------------------------------------------------------


def _records(count: int, keys: int = 10) -> list[tuple[str, str]]:
    return [(f"k{i % keys}", f"v-{i}") for i in range(count)]


def _consumer(kafka: KafkaCluster, **kwargs: Any) -> ResilientConsumer:
    return fresh_consumer(kafka, **kwargs)  # type: ignore[no-any-return]


def _serve(consumer: ResilientConsumer, handler: Any, done: Any, **options: Any) -> None:
    serve(consumer.run_batches, handler, done, **options)


def _committed(kafka: KafkaCluster, group: str, topic: str, partitions: int) -> int:
    return sum(committed_offsets(kafka, group, topic, partitions))


class Seen:
    """What the handler saw, thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values: list[str] = []
        self.sizes: list[int] = []
        self.running = 0
        self.peak = 0
        self.by_partition: dict[int, int] = defaultdict(int)
        self.partition_peak = 0
        self.order: dict[Any, list[int]] = defaultdict(list)

    def enter(self, msgs: list[Message]) -> None:
        with self.lock:
            self.sizes.append(len(msgs))
            self.running += 1
            self.peak = max(self.peak, self.running)
            for p in {m.partition() for m in msgs}:
                self.by_partition[p] += 1  # type: ignore[index]
                self.partition_peak = max(self.partition_peak, self.by_partition[p])  # type: ignore[index]

    def leave(self, msgs: list[Message], ok: bool = True) -> None:
        with self.lock:
            self.running -= 1
            for p in {m.partition() for m in msgs}:
                self.by_partition[p] -= 1  # type: ignore[index]
            if ok:
                for m in msgs:
                    self.values.append(m.value().decode())  # type: ignore[union-attr]
                    self.order[(m.partition(), m.key())].append(m.offset())


def test_batches_are_handled_whole_and_committed(kafka: KafkaCluster, topic_factory) -> None:
    topic = topic_factory(3)
    records = _records(600)
    produce(kafka.client_config(), topic, records)
    seen = Seen()

    def handler(msgs: list[Message]) -> None:
        seen.enter(msgs)
        seen.leave(msgs)

    consumer = _consumer(kafka)
    group = consumer._group
    consumer.subscribe([topic])
    _serve(consumer, handler, lambda: len(seen.values) >= len(records), max_records=100)
    assert sorted(seen.values) == sorted(v for _, v in records), "a record was lost or doubled"
    assert max(seen.sizes) > 1, "every batch held one record"
    assert max(seen.sizes) <= 100
    assert _committed(kafka, group, topic, 3) == len(records)


def test_named_failures_follow_the_retry_policy_and_the_rest_are_done(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic = topic_factory(2)
    records = _records(200)
    produce(kafka.client_config(), topic, records)
    doomed = {f"v-{i}" for i in range(0, 200, 25)}  # 8 records fail every time
    once = {f"v-{i}" for i in range(5, 200, 50)}  # 4 fail the first time only
    seen = Seen()
    calls: dict[str, int] = defaultdict(int)

    def handler(msgs: list[Message]) -> None:
        failures = []  # (message, exception): confluent's Message is not hashable
        good = []
        for m in msgs:
            value = m.value().decode()  # type: ignore[union-attr]
            calls[value] += 1
            if value in doomed or (value in once and headers.attempt(m) == 0):
                failures.append((m, Poison(value)))
            else:
                good.append(m)
        seen.enter(good)
        seen.leave(good)
        if failures:
            raise BatchFailed(failures)

    consumer = _consumer(kafka, retry=RetryPolicy(delays=(0.2,)))
    group = consumer._group
    dlq = consumer.dead_letter_topic(topic)
    consumer.subscribe([topic])
    _serve(consumer, handler, lambda: len(seen.values) >= len(records) - len(doomed))
    dead = read_all(kafka, dlq, len(doomed))
    assert {m.value().decode() for m in dead} == doomed  # type: ignore[union-attr]
    assert {h for m in dead for h, _ in m.headers() or []} >= {"rk.exception.type"}
    assert sorted(seen.values) == sorted(v for _, v in records if v not in doomed)
    good_calls = [n for value, n in calls.items() if value not in doomed | once]
    assert set(good_calls) == {1}, "a good record was handed over again"
    assert all(calls[v] == 2 for v in once)
    assert _committed(kafka, group, topic, 2) == len(records)


def test_a_plain_exception_dead_letters_only_the_poison_records(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic = topic_factory(1)
    records = _records(300)
    produce(kafka.client_config(), topic, records)
    poison = {"v-40", "v-211"}
    seen = Seen()
    calls = [0]

    def handler(msgs: list[Message]) -> None:
        calls[0] += 1
        if any(m.value().decode() in poison for m in msgs):  # type: ignore[union-attr]
            raise Poison("the bulk write failed")  # says nothing of which
        seen.enter(msgs)
        seen.leave(msgs)

    consumer = _consumer(kafka, retry=RetryPolicy(delays=()))
    group = consumer._group
    dlq = consumer.dead_letter_topic(topic)
    retry_topics = consumer.retry_topics(topic)
    consumer.subscribe([topic])
    _serve(consumer, handler, lambda: len(seen.values) >= len(records) - 2, max_records=300)
    dead = read_all(kafka, dlq, 2)
    assert {m.value().decode() for m in dead} == poison  # type: ignore[union-attr]
    assert sorted(seen.values) == sorted(v for _, v in records if v not in poison)
    assert not retry_topics
    wait_for(lambda: _committed(kafka, group, topic, 1) == len(records), 20, "the commit")
    # what was handed over again: a few halvings per poison record, not one call per record
    assert calls[0] < 60, f"{calls[0]} handler calls"


def test_partition_batches_run_in_parallel_one_per_partition(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic = topic_factory(4)
    records = _records(800, keys=40)
    produce(kafka.client_config(), topic, records)
    seen = Seen()

    def handler(msgs: list[Message]) -> None:
        seen.enter(msgs)
        time.sleep(0.02)
        seen.leave(msgs)

    consumer = _consumer(kafka)
    group = consumer._group
    consumer.subscribe([topic])
    _serve(
        consumer,
        handler,
        lambda: len(seen.values) >= len(records),
        max_records=20,
        concurrency=4,
        ordering="partition",
    )
    assert sorted(seen.values) == sorted(v for _, v in records)
    assert seen.partition_peak == 1, "two batches of one partition ran at once"
    assert seen.peak >= 2, "batches of different partitions never ran side by side"
    for offsets in seen.order.values():
        assert offsets == sorted(offsets)
    assert _committed(kafka, group, topic, 4) == len(records)


def test_key_batches_keep_each_keys_order_while_keys_run_in_parallel(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic = topic_factory(1)
    records = _records(400, keys=16)
    produce(kafka.client_config(), topic, records)
    seen = Seen()
    keys_running: dict[Any, int] = defaultdict(int)
    overlap = [0]

    def handler(msgs: list[Message]) -> None:
        seen.enter(msgs)
        with seen.lock:
            for k in {m.key() for m in msgs}:
                keys_running[k] += 1
                overlap[0] = max(overlap[0], keys_running[k])
        time.sleep(0.01)
        with seen.lock:
            for k in {m.key() for m in msgs}:
                keys_running[k] -= 1
        seen.leave(msgs)

    consumer = _consumer(kafka)
    consumer.subscribe([topic])
    _serve(
        consumer,
        handler,
        lambda: len(seen.values) >= len(records),
        max_records=10,
        concurrency=4,
        ordering="key",
    )
    assert sorted(seen.values) == sorted(v for _, v in records)
    assert overlap[0] == 1, "two batches holding one key ran at once"
    assert seen.peak >= 2, "one partition's keys never ran side by side"
    for offsets in seen.order.values():
        assert offsets == sorted(offsets), "a key's records were reordered"


def test_async_batch_handlers_run_and_fail_like_plain_ones(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic = topic_factory(2)
    records = _records(120)
    produce(kafka.client_config(), topic, records)
    seen = Seen()

    async def handler(msgs: list[Message]) -> None:
        await asyncio.sleep(0.001)
        if any(m.value() == b"v-7" for m in msgs):
            raise Poison("v-7")
        seen.enter(msgs)
        seen.leave(msgs)

    consumer = _consumer(kafka, retry=RetryPolicy(delays=()))
    dlq = consumer.dead_letter_topic(topic)
    consumer.subscribe([topic])
    _serve(consumer, handler, lambda: len(seen.values) >= len(records) - 1, concurrency=2)
    assert [m.value() for m in read_all(kafka, dlq, 1)] == [b"v-7"]
    assert sorted(seen.values) == sorted(v for _, v in records if v != "v-7")


def test_run_batches_async_uses_the_applications_loop(kafka: KafkaCluster, topic_factory) -> None:
    topic = topic_factory(1)
    records = _records(50)
    produce(kafka.client_config(), topic, records)
    seen: list[str] = []

    async def main() -> None:
        consumer = _consumer(kafka)
        consumer.subscribe([topic])
        loop = asyncio.get_running_loop()

        async def handler(msgs: list[Message]) -> None:
            assert asyncio.get_running_loop() is loop
            seen.extend(m.value().decode() for m in msgs)  # type: ignore[union-attr]

        task = asyncio.create_task(consumer.run_batches_async(handler))
        deadline = time.monotonic() + 60
        while len(seen) < len(records):
            assert time.monotonic() < deadline, f"{len(seen)} of {len(records)} handled"
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert sorted(seen) == sorted(v for _, v in records)


def test_an_open_breaker_holds_the_batch_and_nothing_is_lost(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic = topic_factory(1)
    records = _records(100)
    produce(kafka.client_config(), topic, records)
    breaker = CircuitBreaker("bulk", fail_max=1, reset_timeout=0.5)
    down = threading.Event()
    down.set()
    seen = Seen()

    def write(msgs: list[Message]) -> None:
        if down.is_set():
            raise ConnectionError("index unavailable")
        seen.enter(msgs)
        seen.leave(msgs)

    def handler(msgs: list[Message]) -> None:
        breaker.call(write, msgs)

    consumer = _consumer(kafka, breakers=[breaker], retry=RetryPolicy(delays=()))
    dlq = consumer.dead_letter_topic(topic)
    consumer.subscribe([topic])
    thread = threading.Thread(target=consumer.run_batches, args=(handler,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: consumer.outage is not None, 30, "the outage")
        down.clear()  # the index is back: the probe closes the breaker
        wait_for(lambda: len(seen.values) >= len(records), 60, "the records after the outage")
    finally:
        consumer.stop()
        thread.join(60)
    assert sorted(seen.values) == sorted(v for _, v in records)
    assert dlq not in kafka.list_topics() or not records_in(kafka, dlq)


def test_dedup_skips_what_was_done_and_twins_never_share_a_batch(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic = topic_factory(1)
    # the same message id twice in a row (a producer retry), and a batch after a restart
    records: list[tuple[str, str]] = []
    for i in range(60):
        records.append((f"k{i}", f"v-{i}"))
    store = MemoryStore()
    config = kafka.client_config()
    from confluent_kafka import Producer

    producer = Producer({**config, "acks": "all"})
    for key, value in records:
        for _ in range(2):
            producer.produce(topic, key=key, value=value, headers={headers.ID: value})
    assert producer.flush(30) == 0
    producer.close()
    seen = Seen()

    def handler(msgs: list[Message]) -> None:
        ids = [m.value() for m in msgs]
        assert len(ids) == len(set(ids)), "two copies of one message in a batch"
        seen.enter(msgs)
        seen.leave(msgs)

    registry = CollectorRegistry()
    consumer = _consumer(kafka, dedup=store, registry=registry)
    group = consumer._group
    consumer.subscribe([topic])
    skipped = "resilient_kafka_messages_handled_total"
    _serve(
        consumer,
        handler,
        lambda: metric_total(registry, skipped, outcome="duplicate_skipped") == len(records),
        max_records=50,
    )
    assert sorted(seen.values) == sorted(v for _, v in records), "a duplicate was handled"
    assert _committed(kafka, group, topic, 1) == 2 * len(records)


def test_batch_options_are_checked(kafka: KafkaCluster) -> None:
    consumer = _consumer(kafka)
    try:
        for bad in (0, -1, 2.5, True):
            with pytest.raises(ConfigurationError, match="max_records"):
                consumer.run_batches(lambda msgs: None, max_records=bad)
        for wait in (-1, 61, "1"):
            with pytest.raises(ConfigurationError, match="max_wait"):
                consumer.run_batches(lambda msgs: None, max_wait=wait)
        with pytest.raises(ConfigurationError, match="ordering"):
            consumer.run_batches(lambda msgs: None, concurrency=2, ordering="random")

        async def main() -> None:
            await consumer.run_batches_async(lambda msgs: None)  # type: ignore[arg-type]

        with pytest.raises(ConfigurationError, match="async def"):
            asyncio.run(main())
    finally:
        consumer.close()


# -- the lean path's bookkeeping, without a broker ------------------------------------------------


def test_a_batchs_ranges_are_found_per_partition_and_topic() -> None:
    from resilient_kafka._settle import _ranges

    def m(topic: str, partition: int, offset: int) -> Message:
        return Message(topic=topic, partition=partition, offset=offset)

    one = [m("a", 0, o) for o in (5, 6, 9)]
    assert _ranges(one, {"a"}) == {("a", 0): (5, 9)}
    mixed = [m("a", 0, 5), m("a", 1, 2), m("a", 0, 6), m("a", 1, 3), m("a", 1, 4)]
    assert _ranges(mixed, {"a"}) == {("a", 0): (5, 6), ("a", 1): (2, 4)}
    topics = [m("a", 0, 5), m("b", 0, 7), m("a", 0, 6), m("b", 0, 8)]
    assert _ranges(topics, {"a", "b"}) == {("a", 0): (5, 6), ("b", 0): (7, 8)}


def test_a_range_moves_a_partition_only_when_nothing_before_it_is_outstanding() -> None:
    from resilient_kafka._barrier import CommitBarrier

    barrier = CommitBarrier()
    assert barrier.done_range("t", 0, 10, 19)
    assert barrier.safe_offset("t", 0) == 20
    assert barrier.done_range("t", 0, 3, 5)  # a re-delivery never moves it back
    assert barrier.safe_offset("t", 0) == 20
    progress = barrier.track("t", 0, 20)  # a forward waits for its acknowledgement
    assert not barrier.done_range("t", 0, 21, 30)
    assert barrier.safe_offset("t", 0) == 20
    barrier.done(progress, 20)
    assert barrier.safe_offset("t", 0) == 21


def test_a_batch_of_successes_counts_in_the_flood_guard_as_that_many_records() -> None:
    from resilient_kafka._outage import FloodGuard
    from resilient_kafka.policies import DeadLetterPolicy

    for before, count in ((3, 5), (15, 7), (0, 40), (19, 1)):
        one, many = (FloodGuard(DeadLetterPolicy(ratio_window=20)) for _ in range(2))
        for guard in (one, many):
            for i in range(before):
                guard.record(i % 3 != 0)
        for _ in range(count):
            one.record(False)
        many.succeeded(count)
        assert (list(many._window), many.dead, many.consecutive) == (
            list(one._window),
            one.dead,
            one.consecutive,
        ), (before, count)


def test_every_record_of_a_failing_batch_counts_as_consumed(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic = topic_factory(1)
    records = _records(40)
    produce(kafka.client_config(), topic, records)
    registry = CollectorRegistry()
    consumer = _consumer(kafka, registry=registry, retry=RetryPolicy(delays=()))
    seen = Seen()

    def handler(msgs: list[Message]) -> None:
        seen.enter(msgs)
        seen.leave(msgs)
        raise BatchFailed([(0, Poison("the first of every batch"))])

    consumer.subscribe([topic])
    name = "messaging_client_consumed_messages_total"
    _serve(
        consumer,
        handler,
        lambda: metric_total(registry, name, messaging_destination_name=topic) >= len(records),
        max_records=10,
    )
    handled = "resilient_kafka_messages_handled_total"
    success = metric_total(registry, handled, outcome="success")
    dead = metric_total(registry, handled, outcome="dead_lettered")
    assert success + dead == len(records) and dead >= 4


def test_stopping_while_a_failing_batch_is_searched_leaves_its_records_to_come_again(
    kafka: KafkaCluster, topic_factory
) -> None:
    """The bulk write fails and the consumer is stopped (a SIGTERM) before the failing records
    are found: what is not known yet is neither retried nor dead-lettered. It stays
    uncommitted, and the group's next consumer gets every record."""
    topic = topic_factory(1)
    records = _records(40)
    produce(kafka.client_config(), topic, records)
    calls: list[int] = []
    consumer = _consumer(kafka, retry=RetryPolicy(delays=()))
    group = consumer._group
    dlq = consumer.dead_letter_topic(topic)

    def failing(msgs: list[Message]) -> None:
        calls.append(len(msgs))
        consumer.stop()
        raise Poison("the bulk write failed")

    consumer.subscribe([topic])
    thread = threading.Thread(
        target=consumer.run_batches,
        args=(failing,),
        kwargs={"max_records": len(records), "max_wait": 5.0},  # one batch of all of them
        daemon=True,
    )
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "run_batches did not return after stop()"
    consumer.close()
    assert calls == [len(records)], f"handed over again while stopping: {calls}"
    assert dlq not in kafka.list_topics() or not records_in(kafka, dlq), "a record was routed"
    assert _committed(kafka, group, topic, 1) <= 0, "records not known to be done committed"

    seen = Seen()

    def handler(msgs: list[Message]) -> None:
        seen.enter(msgs)
        seen.leave(msgs)

    again_config = kafka.client_config(
        group_id=group, auto_offset_reset="earliest", enable_auto_commit=False
    )
    again = ResilientConsumer(again_config, registry=CollectorRegistry())
    again.subscribe([topic])
    _serve(again, handler, lambda: len(seen.values) >= len(records))
    again.close()
    assert sorted(seen.values) == sorted(v for _, v in records)


def test_async_batches_in_flight_together_each_keep_their_own_call(
    kafka: KafkaCluster, topic_factory
) -> None:
    """Two async batches, of two topics, are awaited at once; the first fails once and is
    retried in place. What its retry is counted under is its own topic, not that of the batch
    handed over while it was awaited."""
    first_topic, second_topic = topic_factory(1), topic_factory(1, suffix="other")
    produce(kafka.client_config(), first_topic, _records(20))
    produce(kafka.client_config(), second_topic, _records(20))
    registry = CollectorRegistry()
    state: dict[str, Any] = {"first": None, "other_started": False, "failed": False}
    seen = Seen()

    async def handler(msgs: list[Message]) -> None:
        topic = msgs[0].topic()
        if state["first"] is None:
            state["first"] = topic
        if topic == state["first"] and not state["failed"]:
            deadline = time.monotonic() + 30  # until the other topic's batch is handed over
            while not state["other_started"] and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            state["failed"] = True
            raise Poison("the first call fails")
        if topic != state["first"] and not state["other_started"]:
            state["other_started"] = True
            await asyncio.sleep(0.3)  # still awaited when the first batch fails
        seen.enter(msgs)
        seen.leave(msgs)

    consumer = _consumer(
        kafka,
        registry=registry,
        retry=RetryPolicy(delays=(), blocking_stop=tenacity.stop_after_attempt(2)),
    )
    consumer.subscribe([first_topic, second_topic])
    _serve(consumer, handler, lambda: len(seen.values) >= 40, concurrency=2)
    assert state["other_started"], "the two batches were never awaited together"
    name = "resilient_kafka_retries_total"
    first, other = state["first"], ({first_topic, second_topic} - {state["first"]}).pop()
    assert metric_total(registry, name, messaging_destination_name=first, mode="blocking") == 1
    assert metric_total(registry, name, messaging_destination_name=other) == 0
