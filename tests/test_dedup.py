"""Dedup stores: one contract for the memory, SQLite and Redis stores; bounds, TTL, errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Message, TopicPartition
from prometheus_client import CollectorRegistry

from resilient_kafka import ResilientConsumer, ResilientProducer, RetryPolicy
from resilient_kafka.dedup import (
    BUSY,
    DONE,
    NEW,
    DedupStoreError,
    MemoryStore,
    RedisStore,
    SQLiteStore,
)
from resilient_kafka.errors import ConfigurationError
from resilient_kafka.testing import KafkaCluster
from tests.helpers import read_all, run_until, wait_for


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    if request.param == "memory":
        made: object = MemoryStore(ttl=60)
    elif request.param == "sqlite":
        made = SQLiteStore(tmp_path / "dedup.db", ttl=60)
    else:
        made = RedisStore(  # one server for the session: a prefix of its own per test
            request.getfixturevalue("redis_url"), ttl=60, prefix=f"t{uuid.uuid4().hex[:8]}:"
        )
    yield made
    made.close()  # type: ignore[attr-defined]


def test_claim_complete_release_contract(store) -> None:
    assert store.claim("m1", "a", lease=30) == NEW
    assert store.claim("m1", "b", lease=30) == BUSY  # a live claim of another consumer
    assert store.claim("m1", "a", lease=30) == NEW  # the owner may claim again
    store.complete("m1", "a")
    assert store.claim("m1", "b", lease=30) == DONE
    assert store.claim("m2", "a", lease=30) == NEW
    store.release("m2", "b")  # not the owner: nothing happens
    assert store.claim("m2", "b", lease=30) == BUSY
    store.release("m2", "a")  # failed: retryable by anyone
    assert store.claim("m2", "b", lease=30) == NEW
    store.complete("m2", "b")
    store.release("m2", "b")  # a release never undoes a completion
    assert store.claim("m2", "a", lease=30) == DONE


def test_many_at_once_answer_as_one_at_a_time(store) -> None:
    """claim_many/complete_many (one lock, one SQLite transaction, one Redis round trip)."""
    store.claim("m1", "a", lease=30)
    store.complete("m1", "a")
    store.claim("m2", "b", lease=30)  # another consumer's live claim
    store.claim("m4", "a", lease=30)  # ours already: a renewal
    assert store.claim_many(["m1", "m2", "m3", "m4"], "a", 30) == [DONE, BUSY, NEW, NEW]
    assert store.complete_many(["m3", "m2"], "a") == [True, False]  # m2 was b's
    assert [store.claim(k, "b", lease=30) for k in ("m3", "m2", "m4")] == [DONE, DONE, BUSY]
    assert store.claim_many([], "a", 30) == [] and store.complete_many([], "a") == []


def test_a_store_that_changes_claim_is_never_bypassed_by_an_inherited_claim_many() -> None:
    from resilient_kafka._claims import _batched

    class Counting(MemoryStore):
        def claim(self, key: str, owner: str, lease: float) -> str:
            return super().claim(key, owner, lease)

    class CountingMany(Counting):
        def claim_many(self, keys: list[str], owner: str, lease: float) -> list[str]:
            return super().claim_many(keys, owner, lease)

    assert _batched(Counting(), "claim_many", "claim") is None
    assert _batched(CountingMany(), "claim_many", "claim") is not None
    assert _batched(MemoryStore(), "complete_many", "complete") is not None


def test_run_claims_a_fetched_batch_at_once_and_gives_back_what_it_did_not_hand_out(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic, group = topic_factory(1), f"g{uuid.uuid4().hex[:8]}"
    _produce(kafka.producer_config(), topic, [(f"v{i}", None, 0) for i in range(200)])

    class Counted(MemoryStore):
        def __init__(self) -> None:
            super().__init__(ttl=60)
            self.singles = 0
            self.batches: list[int] = []

        def claim(self, key: str, owner: str, lease: float) -> str:
            self.singles += 1
            return super().claim(key, owner, lease)

        def claim_many(self, keys: list[str], owner: str, lease: float) -> list[str]:
            self.batches.append(len(keys))
            return super().claim_many(keys, owner, lease)

    store = Counted()
    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        dedup=store,
        metrics=False,
    )
    handled: list[str] = []

    def handler(msg: Message) -> None:
        handled.append(msg.value().decode())
        if len(handled) == 150:
            consumer.stop()  # mid-batch: the rest of it was claimed ahead

    consumer.subscribe([topic])
    thread = threading.Thread(target=consumer.run, args=(handler,), daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    assert handled == [f"v{i}" for i in range(150)]
    assert max(store.batches) > 1, store.batches
    assert store.singles < 150 / 2, f"{store.singles} claims one at a time"
    states = [entry[0] for entry in store._entries.values()]
    assert states.count(DONE) == 150
    assert "claimed" not in states, "a claim made ahead was not given back"


def test_an_expired_lease_can_be_taken_over(store) -> None:
    assert store.claim("m", "crashed", lease=0.2) == NEW
    assert store.claim("m", "other", lease=30) == BUSY
    wait_for(lambda: store.claim("m", "other", lease=30) == NEW, 5, "the lease to expire")


def test_done_entries_expire_after_the_ttl(tmp_path: Path, redis_url: str) -> None:
    stores = [
        MemoryStore(ttl=0.3),
        SQLiteStore(tmp_path / "ttl.db", ttl=0.3),
        RedisStore(redis_url, ttl=0.3, prefix="ttl:"),
    ]
    for store in stores:
        store.complete("m", "a")
        assert store.claim("m", "b", lease=30) == DONE
    deadline = time.monotonic() + 5
    for store in stores:
        wait_for(lambda s=store: s.claim("m", "b", lease=30) == NEW, 5, f"{store} TTL")
        store.close()
    assert time.monotonic() < deadline


def test_memory_and_sqlite_stores_are_bounded(tmp_path: Path) -> None:
    memory = MemoryStore(ttl=60, max_entries=100)
    sqlite = SQLiteStore(tmp_path / "bound.db", ttl=60, max_entries=100)
    for i in range(250):
        memory.complete(f"m{i}", "a")
        sqlite.complete(f"m{i}", "a")
    sqlite.prune()
    assert len(memory) == 100 and len(sqlite) == 100
    # the newest entries are the ones kept
    assert memory.claim("m249", "b", 30) == DONE and memory.claim("m0", "b", 30) == NEW
    assert sqlite.claim("m249", "b", 30) == DONE and sqlite.claim("m0", "b", 30) == NEW
    sqlite.close()


def test_complete_reports_a_claim_another_owner_took(store) -> None:
    assert store.claim("m", "slow", lease=0.2) == NEW
    wait_for(lambda: store.claim("m", "other", lease=30) == NEW, 5, "the lease to expire")
    # the slow owner finishes after its lease ran out and another consumer took the claim
    assert store.complete("m", "slow") is False
    assert store.claim("m", "third", lease=30) == DONE  # still recorded: it was processed
    assert store.claim("n", "a", lease=30) == NEW
    assert store.complete("n", "a") is True
    assert store.complete("never-claimed", "a") is True


def test_claiming_again_renews_the_lease(store) -> None:
    assert store.claim("m", "a", lease=0.3) == NEW
    assert store.claim("m", "a", lease=30) == NEW  # renewed: now 30 s from here
    expired_by = time.monotonic() + 0.6
    wait_for(lambda: time.monotonic() > expired_by, 5, "the first lease's end")
    assert store.claim("m", "b", lease=30) == BUSY


def test_bounds_never_evict_a_live_claim(tmp_path: Path) -> None:
    memory = MemoryStore(ttl=60, max_entries=3)
    sqlite = SQLiteStore(tmp_path / "bound.db", ttl=60, max_entries=3)
    for made in (memory, sqlite):
        assert made.claim("in-flight", "a", lease=60) == NEW
        for i in range(10):
            made.complete(f"m{i}", "a")
    sqlite.prune()
    for made in (memory, sqlite):
        assert made.claim("in-flight", "b", lease=60) == BUSY  # the oldest entry, still held
        assert made.claim("m9", "b", lease=60) == DONE  # the newest done entries are kept
        assert made.claim("m0", "b", lease=60) == NEW
    sqlite.close()


def test_a_failed_sqlite_write_leaves_the_store_usable(tmp_path: Path, monkeypatch) -> None:
    import sqlite3

    store = SQLiteStore(tmp_path / "d.db")

    def broken(key: str) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "_row", broken)
    with pytest.raises(DedupStoreError, match="disk I/O error"):
        store.claim("m", "a", 30)
    monkeypatch.undo()
    assert store.claim("m", "a", 30) == NEW  # rolled back: not stuck inside a transaction
    store.close()


def test_a_live_owner_keeps_its_claim_past_the_lease() -> None:
    from resilient_kafka._lease import LeaseKeeper

    store = MemoryStore()
    keeper = LeaseKeeper(store, "a", lease=0.3)
    try:
        assert store.claim("m", "a", 0.3) == NEW
        keeper.hold("m")
        past_lease = time.monotonic() + 1.0
        wait_for(lambda: time.monotonic() > past_lease, 5, "three leases to pass")
        assert store.claim("m", "b", 0.3) == BUSY  # renewed all along
        assert keeper.drop("m") is True
        # a claim another owner took (the store lost it, say) is reported as lost
        assert store.claim("n", "a", 0.3) == NEW
        keeper.hold("n")
        store._entries["n"] = ("claimed", "b", time.time() + 60)
        wait_for(lambda: "n" in keeper.lost, 5, "the renewal to find the claim gone")
        assert keeper.drop("n") is False
    finally:
        keeper.close()


def test_sqlite_store_survives_a_reopen(tmp_path: Path) -> None:
    first = SQLiteStore(tmp_path / "durable.db")
    first.complete("m", "a")
    first.close()
    again = SQLiteStore(tmp_path / "durable.db")
    assert again.claim("m", "b", 30) == DONE
    again.close()


def test_consumers_opening_a_new_sqlite_store_together_all_succeed(tmp_path: Path) -> None:
    # Workers started together used to fail with "database is locked": SQLite answers the
    # switch to WAL with SQLITE_BUSY at once when another connection sets up the same new file.
    failures: list[Exception] = []
    for round_ in range(60):
        path = tmp_path / f"new-{round_}.db"
        barrier = threading.Barrier(8)

        def open_store(path: Path = path, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                store = SQLiteStore(path)
            except DedupStoreError as exc:
                failures.append(exc)
                return
            store.complete("m", "a")
            store.close()

        threads = [threading.Thread(target=open_store) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
    again = SQLiteStore(tmp_path / "new-0.db")
    assert again.claim("m", "b", 30) == DONE
    again.close()


def test_store_errors_are_specific(tmp_path: Path) -> None:
    with pytest.raises(DedupStoreError, match="cannot open dedup store"):
        SQLiteStore(tmp_path / "missing-dir" / "x.db")
    broken = SQLiteStore(tmp_path / "closed.db")
    broken.close()
    with pytest.raises(DedupStoreError, match=r"closed\.db"):
        broken.claim("m", "a", 30)
    down = RedisStore("redis://:s3cret@127.0.0.1:1/0", socket_timeout=0.5)
    with pytest.raises(DedupStoreError) as info:
        down.claim("m", "a", 30)
    assert "127.0.0.1:1" in str(info.value) and "s3cret" not in str(info.value)
    with pytest.raises(ConfigurationError, match="ttl"):
        MemoryStore(ttl=0)
    with pytest.raises(ConfigurationError, match="max_entries"):
        SQLiteStore(tmp_path / "x.db", max_entries=0)


# -- the consumer with a store, on the embedded broker ------------------------------------------


def _produce(
    config: dict[str, Any], topic: str, records: list[tuple[str, dict | None, int]]
) -> None:
    """(value, headers, partition) through ResilientProducer (it stamps rk.id when absent)."""
    producer = ResilientProducer(config)
    for value, headers, partition in records:
        producer.produce(topic, value=value, headers=headers, partition=partition)
    assert producer.flush(30) == 0
    producer.close()


def _skipped(reg: CollectorRegistry, topic: str, group: str) -> float:
    value = reg.get_sample_value(
        "resilient_kafka_messages_handled_total",
        {
            "messaging_destination_name": topic,
            "messaging_consumer_group_name": group,
            "outcome": "duplicate_skipped",
            "error_type": "",
        },
    )
    return value or 0.0


def test_the_same_message_produced_twice_is_handled_once(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic, group = topic_factory(1), f"g{uuid.uuid4().hex[:8]}"
    _produce(
        kafka.producer_config(),
        topic,
        [
            ("pay-1", {"rk.id": b"order-1"}, 0),
            ("pay-1", {"rk.id": b"order-1"}, 0),
            ("pay-2", None, 0),
        ],
    )
    reg = CollectorRegistry()
    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        dedup=MemoryStore(),
        registry=reg,
    )
    side_effects: list[bytes] = []
    consumer.subscribe([topic])
    run_until(
        consumer,
        lambda msg: side_effects.append(msg.value()),
        lambda: _skipped(reg, topic, group) == 1 and len(side_effects) == 2,
    )
    assert side_effects == [b"pay-1", b"pay-2"]
    reader = ResilientConsumer(kafka.client_config(group_id=group), metrics=False)
    try:
        (committed,) = reader.committed([TopicPartition(topic, 0)], timeout=10)
    finally:
        reader.close()
    assert committed.offset == 3  # committed past the duplicate too


def test_two_consumers_racing_on_one_id_run_the_side_effect_once(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic, group = topic_factory(2), f"g{uuid.uuid4().hex[:8]}"
    _produce(
        kafka.producer_config(), topic, [("x", {"rk.id": b"same"}, 0), ("x", {"rk.id": b"same"}, 1)]
    )
    store = MemoryStore()
    reg = CollectorRegistry()
    side_effects: list[int] = []
    lock = threading.Lock()

    def handler(msg: Message) -> None:
        time.sleep(1.0)  # a slow side effect: both consumers are in it at once
        with lock:
            side_effects.append(msg.partition())

    consumers = []
    threads = []
    for partition in (0, 1):
        consumer = ResilientConsumer(kafka.client_config(group_id=group), dedup=store, registry=reg)
        consumer.assign([TopicPartition(topic, partition, 0)])
        consumers.append(consumer)
        threads.append(threading.Thread(target=consumer.run, args=(handler,), daemon=True))
    for thread in threads:
        thread.start()
    try:
        wait_for(
            lambda: len(side_effects) == 1 and _skipped(reg, topic, group) == 1,
            30,
            "one side effect and one skipped duplicate",
        )
    finally:
        for consumer in consumers:
            consumer.stop()
        for thread in threads:
            thread.join(30)
    assert len(side_effects) == 1, side_effects


_CRASHING_WORKER = textwrap.dedent(
    """
    import sys, time
    from resilient_kafka import ResilientConsumer
    from resilient_kafka.dedup import SQLiteStore

    bootstrap, topic, group, db, ledger = sys.argv[1:6]
    consumer = ResilientConsumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
         "session.timeout.ms": 6000, "auto.commit.interval.ms": 600000},
        dedup=SQLiteStore(db), dedup_lease=2.0, metrics=False,
    )

    def handler(msg):
        if msg.value() == b"v5":
            print("v0..v4 done, v5 claimed", flush=True)
            time.sleep(600)  # SIGKILLed here: v5's side effect never happens
        with open(ledger, "a") as out:
            out.write(msg.value().decode() + "\\n")

    consumer.subscribe([topic])
    consumer.run(handler)
    """
)


def test_sigkill_after_side_effects_before_the_commit_skips_them_on_restart(
    kafka: KafkaCluster, topic_factory, tmp_path: Path
) -> None:
    topic, group = topic_factory(1), f"g{uuid.uuid4().hex[:8]}"
    _produce(kafka.producer_config(), topic, [(f"v{i}", None, 0) for i in range(10)])
    db, ledger = tmp_path / "dedup.db", tmp_path / "ledger.txt"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CRASHING_WORKER,
            kafka.bootstrap_servers,
            topic,
            group,
            str(db),
            str(ledger),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "v0..v4 done, v5 claimed"
    finally:
        child.kill()  # SIGKILL: nothing committed (auto-commit interval 10 min)
        child.wait()
    assert ledger.read_text().split() == [f"v{i}" for i in range(5)]

    reg = CollectorRegistry()
    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        dedup=SQLiteStore(db),
        dedup_lease=2.0,
        registry=reg,
    )
    handled: list[str] = []

    def handler(msg: Message) -> None:
        handled.append(msg.value().decode())
        with open(ledger, "a") as out:
            out.write(msg.value().decode() + "\n")

    consumer.subscribe([topic])
    run_until(consumer, handler, lambda: len(handled) == 5)
    assert handled == [f"v{i}" for i in range(5, 10)]  # v5 after the dead worker's lease ran out
    assert ledger.read_text().split() == [f"v{i}" for i in range(10)]  # each side effect once
    assert _skipped(reg, topic, group) == 5


class _FlakyStore(MemoryStore):
    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def claim(self, key: str, owner: str, lease: float) -> str:
        if self.failures:
            self.failures -= 1
            raise DedupStoreError("connection refused")
        return super().claim(key, owner, lease)


@pytest.mark.parametrize("policy", ["pause", "process"])
def test_store_failures_follow_the_policy(kafka: KafkaCluster, topic_factory, policy: str) -> None:
    topic, group = topic_factory(1), f"g{uuid.uuid4().hex[:8]}"
    _produce(kafka.producer_config(), topic, [(f"v{i}", None, 0) for i in range(5)])
    store = _FlakyStore(failures=2 if policy == "pause" else 10**6)
    reg = CollectorRegistry()
    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        dedup=store,
        on_dedup_error=policy,
        registry=reg,
    )
    handled: list[str] = []
    paused_seen: list[float] = []

    def handler(msg: Message) -> None:
        handled.append(msg.value().decode())

    def done() -> bool:
        paused = reg.get_sample_value(
            "resilient_kafka_consumer_paused_partitions",
            {"messaging_consumer_group_name": group, "reason": "dedup_store"},
        )
        paused_seen.append(paused or 0.0)
        return len(handled) >= 5

    consumer.subscribe([topic])
    run_until(consumer, handler, done)
    assert sorted(handled) == [f"v{i}" for i in range(5)]  # each once, none lost
    errors = reg.get_sample_value(
        "resilient_kafka_dedup_lookups_total",
        {
            "messaging_destination_name": topic,
            "messaging_consumer_group_name": group,
            "result": "error",
        },
    )
    if policy == "pause":
        assert errors == 2
        assert max(paused_seen) >= 1  # held, its partitions (and tiers) paused meanwhile
        assert consumer.outage is None
    else:
        assert errors == 5  # processed without a claim, each failure counted


@pytest.mark.parametrize("loop", ["poll", "consume"])
def test_the_drop_in_loop_skips_duplicates_and_releases_failed_claims(
    kafka: KafkaCluster, topic_factory, loop: str
) -> None:
    topic, group = topic_factory(1), f"g{uuid.uuid4().hex[:8]}"
    _produce(
        kafka.producer_config(),
        topic,
        [
            ("pay-1", {"rk.id": b"order-1"}, 0),
            ("pay-1", {"rk.id": b"order-1"}, 0),  # a duplicate
            ("pay-2", {"rk.id": b"order-2"}, 0),  # fails once: its claim must be released
            ("pay-3", None, 0),
        ],
    )
    reg = CollectorRegistry()
    store = MemoryStore()
    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        dedup=store,
        retry=RetryPolicy(delays=(0.2,)),
        registry=reg,
    )
    side_effects: list[bytes] = []
    calls: list[bytes] = []
    consumer.subscribe([topic])
    try:
        deadline = time.monotonic() + 60
        while len(side_effects) < 3 or _skipped(reg, topic, group) < 1:
            assert time.monotonic() < deadline, (side_effects, calls)
            batch = [consumer.poll(0.5)] if loop == "poll" else consumer.consume(10, 0.5)
            for msg in batch:
                if msg is None or msg.error() is not None:
                    continue
                calls.append(msg.value())
                if msg.value() == b"pay-2" and calls.count(b"pay-2") == 1:
                    consumer.fail(msg, RuntimeError("downstream hiccup"))
                    continue
                side_effects.append(msg.value())
        consumer.commit(asynchronous=False)
        (committed,) = consumer.committed([TopicPartition(topic, 0)], timeout=10)
    finally:
        consumer.close()
    assert sorted(side_effects) == [b"pay-1", b"pay-2", b"pay-3"]  # each once
    assert calls.count(b"pay-1") == 1  # the duplicate never reached the application
    assert committed.offset == 4
    assert store.claim(f"{group}|id:order-2", "someone-else", 10) == DONE  # done after its retry


def test_dedup_settings_are_checked(kafka: KafkaCluster) -> None:
    with pytest.raises(ConfigurationError, match="dedup_lease"):
        ResilientConsumer(kafka.client_config(group_id="g"), dedup=MemoryStore(), dedup_lease=0)
    with pytest.raises(ConfigurationError, match=r"max\.poll\.interval\.ms=30000"):
        ResilientConsumer(
            kafka.client_config(group_id="g", max_poll_interval_ms=30000),
            dedup=MemoryStore(),
            dedup_lease=60,
        )
    with pytest.raises(ConfigurationError, match="on_dedup_error"):
        ResilientConsumer(
            kafka.client_config(group_id="g"), dedup=MemoryStore(), on_dedup_error="x"
        )


def _consumer(kafka: KafkaCluster, group: str, **options: Any) -> ResilientConsumer:
    """A consumer of ``group`` from the beginning, metrics off unless asked for."""
    options.setdefault("metrics", False)
    return ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"), **options
    )


def _committed(kafka: KafkaCluster, group: str, topic: str) -> int:
    reader = ResilientConsumer(kafka.client_config(group_id=group), metrics=False)
    try:
        (committed,) = reader.committed([TopicPartition(topic, 0)], timeout=10)
    finally:
        reader.close()
    return int(committed.offset)


def test_a_handler_longer_than_the_lease_keeps_its_claim(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic, group = topic_factory(1), f"g{uuid.uuid4().hex[:8]}"
    _produce(kafka.producer_config(), topic, [("slow", {"rk.id": b"slow-1"}, 0)])
    store = MemoryStore()
    consumer = _consumer(kafka, group, dedup=store, dedup_lease=1.0)
    verdicts: list[str] = []

    def handler(msg: Message) -> None:
        past_lease = time.monotonic() + 2.5
        while time.monotonic() < past_lease:  # a slow side effect, 2.5 leases long
            verdicts.append(store.claim(key, "intruder", 1.0))
            time.sleep(0.2)

    consumer.subscribe([topic])
    key = f"{group}|id:slow-1"
    run_until(consumer, handler, lambda: store._entries.get(key, ("",))[0] == DONE)
    assert verdicts and set(verdicts) == {BUSY}, verdicts  # never NEW for another consumer


@pytest.mark.parametrize("loop", ["run", "poll", "consume"])
def test_a_record_whose_dedup_key_fails_goes_to_the_dlq(
    kafka: KafkaCluster, topic_factory, loop: str
) -> None:
    topic, group = topic_factory(1), f"g{uuid.uuid4().hex[:8]}"
    _produce(kafka.producer_config(), topic, [("a", None, 0), ("bad", None, 0), ("c", None, 0)])

    def order_id(msg: Message) -> str:
        if msg.value() == b"bad":
            raise KeyError("order_id")
        return msg.value().decode()

    consumer = _consumer(kafka, group, dedup=MemoryStore(), dedup_key=order_id)
    handled: list[bytes] = []
    consumer.subscribe([topic])
    if loop == "run":
        run_until(consumer, lambda msg: handled.append(msg.value()), lambda: len(handled) == 2)
    else:
        try:
            deadline = time.monotonic() + 60
            while len(handled) < 2:
                assert time.monotonic() < deadline, handled
                batch = [consumer.poll(0.5)] if loop == "poll" else consumer.consume(10, 0.5)
                handled += [m.value() for m in batch if m is not None and m.error() is None]
            consumer.poll(0.5)  # done with both; housekeeping commits (auto-commit)
            consumer.commit(asynchronous=False)
        finally:
            consumer.close()
    assert handled == [b"a", b"c"]
    (dead,) = read_all(kafka, f"{topic}.{group}.dlq", 1)
    assert dead.value() == b"bad"
    dead_headers = {k: v for k, v in dead.headers()}
    assert dead_headers["rk.exception.type"].endswith(b"DedupKeyError")
    assert b"dedup_key failed" in dead_headers["rk.exception.message"]
    assert dead_headers["rk.reason"] == b"non_retryable"
    assert _committed(kafka, group, topic) == 3  # past the dead letter, once its copy is acked


class _Interrupted(BaseException):
    """Like KeyboardInterrupt, without pytest's own handling of it."""


@pytest.mark.parametrize("loop", ["poll", "consume"])
def test_a_claim_interrupted_mid_batch_loses_nothing(
    kafka: KafkaCluster, topic_factory, loop: str
) -> None:
    # an exception out of the claim used to leave its record in hand (completed, and so
    # committed, at the next call without the application ever seeing it), and in consume()
    # the claims of the records before it were never released (the next call found their
    # twins "in hand" again and again: no record ever came out)
    topic, group = topic_factory(1), f"g{uuid.uuid4().hex[:8]}"
    _produce(kafka.producer_config(), topic, [(f"v{i}", None, 0) for i in range(3)])
    interrupt = [b"v1"]

    def key(msg: Message) -> str:
        if msg.value() in interrupt:
            interrupt.clear()
            raise _Interrupted
        return msg.value().decode()

    consumer = _consumer(kafka, group, dedup=MemoryStore(), dedup_key=key)
    consumer.subscribe([topic])
    seen: list[bytes] = []
    raised = 0
    try:
        deadline = time.monotonic() + 60
        while len(set(seen)) < 3:
            assert time.monotonic() < deadline, (seen, raised)
            try:
                batch = [consumer.poll(0.5)] if loop == "poll" else consumer.consume(10, 0.5)
            except _Interrupted:
                raised += 1
                continue
            seen += [m.value() for m in batch if m is not None and m.error() is None]
        consumer.poll(0.5)
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    assert raised == 1
    assert sorted(set(seen)) == [b"v0", b"v1", b"v2"]  # v1 was handed out after all
    assert seen.count(b"v1") == 1
    assert _committed(kafka, group, topic) == 3


def test_a_record_another_consumer_holds_comes_again_after_the_wait(
    kafka: KafkaCluster, topic_factory
) -> None:
    # the wait for another consumer's claim outlasts run()'s batch deadline: the record is
    # seeked back, and the rest of the batch must not be rewound over that position (it was:
    # the record never came again before a restart, and its partition's commits stalled)
    topic, group = topic_factory(1), f"g{uuid.uuid4().hex[:8]}"
    _produce(
        kafka.producer_config(),
        topic,
        # "first" alone makes run()'s first batch; the rest arrive prefetched as the next one
        [("first", None, 0), ("held", {"rk.id": b"held"}, 0)]
        + [(f"v{i}", None, 0) for i in range(3)],
    )
    store = MemoryStore()
    consumer = _consumer(kafka, group, dedup=store, dedup_lease=1.0)
    handled: list[bytes] = []

    def handler(msg: Message) -> None:
        if msg.value() == b"first":  # a consumer that died holding "held" (never renewed)
            assert store.claim(f"{group}|id:held", "crashed-consumer", 3.0) == NEW
        handled.append(msg.value())

    consumer.subscribe([topic])
    run_until(consumer, handler, lambda: len(handled) == 5)
    assert handled == [b"first", b"held", b"v0", b"v1", b"v2"]  # in order, each once
    assert _committed(kafka, group, topic) == 5


def test_a_failed_batched_completion_stops_renewing_its_claims() -> None:
    """A store error on complete_many must not leave the claims renewed for ever (another
    consumer would find them busy, again and again)."""
    from confluent_kafka import Message as Msg

    from resilient_kafka._claims import Verdict
    from resilient_kafka._record import Record

    class Failing(MemoryStore):
        def complete_many(self, keys: list[str], owner: str) -> list[bool]:
            raise DedupStoreError("connection reset")

    consumer = ResilientConsumer(
        {"bootstrap.servers": "127.0.0.1:1", "group.id": "g"}, dedup=Failing(), metrics=False
    )
    try:
        claims = consumer._claims
        assert claims is not None
        records = [Record(Msg(topic="t", partition=0, offset=i), "t", 0, i) for i in range(3)]
        keys = [claims.identity(record) for record in records]
        assert claims.claim_many(records, keys) == [Verdict.RUN] * 3
        claims.defer()
        for record in records:
            claims.complete(record)
        claims.flush()
        assert not set(keys) & claims._leases._keys, "claims still renewed"
    finally:
        consumer.close()
