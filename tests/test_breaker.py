"""Circuit breakers, blocking retries and the DLQ flood guard on the real embedded broker."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import tenacity
from confluent_kafka import Message

from resilient_kafka import (
    CircuitBreaker,
    ConfigurationError,
    DeadLetterFloodError,
    DeadLetterPolicy,
    ResilientConsumer,
    RetryPolicy,
    headers,
)
from resilient_kafka._outage import FloodGuard
from resilient_kafka.breaker import CircuitBreakerError
from resilient_kafka.testing import KafkaCluster
from tests.helpers import produce


class Downstream:
    """A payment service whose health the test controls; counts the calls that reach it."""

    def __init__(self, healthy: bool = True) -> None:
        self.healthy = healthy
        self.calls = 0
        self.paid: list[tuple[str, int]] = []  # (value, rk.attempt)
        self.lock = threading.Lock()

    def charge(self, msg: Message) -> None:
        with self.lock:
            self.calls += 1
        if not self.healthy:
            raise ConnectionError("payment service unavailable")
        if msg.value() == b"poison":
            raise ValueError("invalid order")
        with self.lock:
            self.paid.append((msg.value().decode(), headers.attempt(msg)))

    def paid_values(self) -> set[str]:
        with self.lock:
            return {value for value, _ in self.paid}


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


def _count_forwards(consumer: ResilientConsumer) -> Counter[str]:
    """Count every retry/DLQ copy the consumer produces, by target topic."""
    sent: Counter[str] = Counter()
    real = consumer._producer._produce_untraced  # the path every forward takes

    def counting(topic: str, *args: Any, **kwargs: Any) -> None:
        sent[topic] += 1
        real(topic, *args, **kwargs)

    consumer._producer._produce_untraced = counting  # type: ignore[method-assign]
    return sent


def _start(consumer: ResilientConsumer, handler: Callable[[Message], None]) -> threading.Thread:
    thread = threading.Thread(target=consumer.run, args=(handler,), daemon=True)
    thread.start()
    return thread


def _stop(*pairs: tuple[ResilientConsumer, threading.Thread]) -> None:
    for consumer, _thread in pairs:
        consumer.stop()
    for _consumer, thread in pairs:
        thread.join(30)
        assert not thread.is_alive()


def test_outage_longer_than_max_poll_interval_pauses_and_recovers(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic, group = topic_factory(2), f"g{uuid.uuid4().hex[:8]}"
    values = [f"v{i}" for i in range(12)]
    produce(kafka.producer_config(), topic, [(f"k{i}", v) for i, v in enumerate(values)])
    downstream = Downstream(healthy=False)
    breaker = CircuitBreaker("payments", fail_max=1, reset_timeout=1.0)
    rebalances: Counter[str] = Counter()

    consumer = ResilientConsumer(
        kafka.client_config(
            group_id=group, auto_offset_reset="earliest", max_poll_interval_ms=7000
        ),
        retry=RetryPolicy(delays=(0.2,)),
        breakers=[breaker],
    )
    forwards = _count_forwards(consumer)
    consumer.subscribe(
        [topic],
        on_assign=lambda c, ps: rebalances.update(["assign"]),
        on_revoke=lambda c, ps: rebalances.update(["revoke"]),
    )
    thread = _start(consumer, lambda msg: breaker.call(downstream.charge, msg))
    try:
        started = time.monotonic()
        _wait(lambda: consumer.outage is not None, 30, "the consumer to pause")
        paused_after = time.monotonic() - started
        outage_began = time.monotonic()
        # the outage outlasts max.poll.interval.ms (7 s) and several probes fail
        _wait(
            lambda: time.monotonic() - outage_began > 9 and downstream.calls >= 4,
            30,
            "a long outage with failed probes",
        )
        assert consumer.outage is not None
        calls_during_outage = downstream.calls
        assert calls_during_outage <= 2 + int(time.monotonic() - outage_began) * 2, (
            "the paused consumer kept calling the downstream"
        )
        healed = time.monotonic()
        downstream.healthy = True
        _wait(lambda: downstream.paid_values() == set(values), 30, "every order to be paid")
        recovered_after = time.monotonic() - healed
        membership = Counter(rebalances)  # before close(), which revokes
    finally:
        _stop((consumer, thread))

    assert forwards == Counter(), "an outage sent records to retry topics or the DLQ"
    assert {attempt for _, attempt in downstream.paid} == {0}, "an outage counted attempts"
    assert sorted(v for v, _ in downstream.paid) == sorted(values), "a record was paid twice"
    assert membership == Counter(assign=1), f"the consumer lost its membership: {membership}"
    print(f"\npaused after {paused_after:.2f}s, recovered {recovered_after:.2f}s after healing")


def test_rebalance_while_paused_keeps_the_pause_and_loses_nothing(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic, group = topic_factory(2), f"g{uuid.uuid4().hex[:8]}"
    values = [f"v{i}" for i in range(10)]
    produce(kafka.producer_config(), topic, [(f"k{i}", v) for i, v in enumerate(values)])
    downstream = Downstream(healthy=False)
    assigned: Counter[str] = Counter()

    def member(name: str) -> tuple[ResilientConsumer, threading.Thread, Counter[str]]:
        breaker = CircuitBreaker(f"payments-{name}", fail_max=1, reset_timeout=1.0)
        consumer = ResilientConsumer(
            kafka.client_config(group_id=group, auto_offset_reset="earliest"),
            retry=RetryPolicy(delays=(0.2,)),
            breakers=[breaker],
        )
        forwards = _count_forwards(consumer)
        consumer.subscribe([topic], on_assign=lambda c, ps: assigned.update([name]))
        return consumer, _start(consumer, lambda m: breaker.call(downstream.charge, m)), forwards

    first, first_thread, first_forwards = member("first")
    second = None
    try:
        _wait(lambda: first.outage is not None, 30, "the first consumer to pause")
        second, second_thread, second_forwards = member("second")
        _wait(lambda: assigned["second"] >= 1, 40, "the second consumer to join")
        _wait(lambda: first.outage is not None, 10, "the first consumer to stay paused")
        _stop((second, second_thread))
        _wait(lambda: assigned["first"] >= 3, 40, "the first consumer to take everything back")
        assert first.outage is not None, "the rebalance resumed partitions during the outage"
        assert not downstream.paid
        downstream.healthy = True
        _wait(lambda: downstream.paid_values() == set(values), 40, "every order to be paid")
    finally:
        _stop((first, first_thread))
        if second is not None:
            second.stop()
    assert first_forwards == Counter() and second_forwards == Counter()
    assert {attempt for _, attempt in downstream.paid} == {0}


_SHARED_BREAKER = textwrap.dedent(
    """
    import sys
    from redis import Redis
    from resilient_kafka import CircuitBreaker
    from resilient_kafka.breaker import redis_storage
    breaker = CircuitBreaker("shared", fail_max=1, reset_timeout=60,
                             state_storage=redis_storage(Redis.from_url(sys.argv[1]), sys.argv[2]))
    def down():
        raise ConnectionError("down")
    try:
        breaker.call(down)
    except Exception:
        pass
    print(breaker.current_state, flush=True)
    sys.stdin.readline()
    breaker.close()
    print(breaker.current_state, flush=True)
    sys.stdin.readline()
    """
)


def test_breaker_state_is_shared_across_processes_through_redis(
    kafka: KafkaCluster, topic_factory, redis_url: str
) -> None:
    from redis import Redis

    from resilient_kafka.breaker import redis_storage

    topic, group = topic_factory(1), f"g{uuid.uuid4().hex[:8]}"
    namespace = f"rk-test-{uuid.uuid4().hex[:8]}"
    values = [f"v{i}" for i in range(5)]
    produce(kafka.producer_config(), topic, [(f"k{i}", v) for i, v in enumerate(values)])
    other = subprocess.Popen(
        [sys.executable, "-c", _SHARED_BREAKER, redis_url, namespace],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert other.stdout is not None and other.stdin is not None
        assert other.stdout.readline().strip() == "open"  # the other process tripped it

        downstream = Downstream(healthy=True)
        breaker = CircuitBreaker(
            "shared",
            fail_max=1,
            reset_timeout=60,
            state_storage=redis_storage(Redis.from_url(redis_url), namespace),
        )
        consumer = ResilientConsumer(
            kafka.client_config(group_id=group, auto_offset_reset="earliest"),
            breakers=[breaker],
        )
        forwards = _count_forwards(consumer)
        consumer.subscribe([topic])
        thread = _start(consumer, lambda m: breaker.call(downstream.charge, m))
        try:
            _wait(lambda: consumer.outage is not None, 30, "the consumer to see the open breaker")
            assert downstream.calls == 0, "an open shared breaker let a call through"
            other.stdin.write("close\n")
            other.stdin.flush()
            assert other.stdout.readline().strip() == "closed"
            closed_at = time.monotonic()
            # long before its own 60 s reset timeout, the consumer follows the shared state
            _wait(lambda: downstream.paid_values() == set(values), 20, "every order to be paid")
            assert time.monotonic() - closed_at < 10
        finally:
            _stop((consumer, thread))
        assert forwards == Counter()
    finally:
        other.kill()
        other.wait()


def test_blocking_retries_succeed_in_place_or_escalate(kafka: KafkaCluster, topic_factory) -> None:
    topic, group = topic_factory(1), f"g{uuid.uuid4().hex[:8]}"
    produce(kafka.producer_config(), topic, [("a", "flaky"), ("b", "broken"), ("c", "fine")])
    calls: Counter[tuple[str, int]] = Counter()
    done: list[tuple[str, int]] = []

    def handler(msg: Message) -> None:
        value, attempt = msg.value().decode(), headers.attempt(msg)
        calls[(value, attempt)] += 1
        if value == "flaky" and calls[(value, attempt)] < 3:
            raise ConnectionError("blip")
        if value == "broken" and attempt == 0:
            raise ConnectionError("still down")
        done.append((value, attempt))

    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        retry=RetryPolicy(
            delays=(0.3,),
            blocking_stop=tenacity.stop_after_attempt(3),
            blocking_wait=tenacity.wait_fixed(0.05),
        ),
    )
    forwards = _count_forwards(consumer)
    consumer.subscribe([topic])
    thread = _start(consumer, handler)
    try:
        _wait(lambda: len(done) == 3, 30, "all three records to be handled")
    finally:
        _stop((consumer, thread))
    assert sorted(done) == [("broken", 1), ("fine", 0), ("flaky", 0)]
    assert calls[("flaky", 0)] == 3  # two in-place retries, then success: no retry topic
    assert calls[("broken", 0)] == 3  # three in-place attempts, then escalated to tier 1
    assert forwards == Counter({f"{topic}.{group}.retry.1": 1})


def test_blocking_retries_that_cannot_fit_are_rejected(kafka: KafkaCluster) -> None:
    policy = RetryPolicy(
        blocking_stop=tenacity.stop_after_attempt(10), blocking_wait=tenacity.wait_fixed(1)
    )
    assert policy.blocking_budget == 9.0
    consumer = ResilientConsumer(
        kafka.client_config(group_id="g", max_poll_interval_ms=10000), retry=policy
    )
    try:  # one handler on the polling thread would miss max.poll.interval.ms; workers would not
        with pytest.raises(
            ConfigurationError, match=r"up to 9\.0s per message.*max\.poll\.interval"
        ):
            consumer.run(lambda msg: None)
    finally:
        consumer.close()
    with pytest.raises(ConfigurationError, match="never stop"):
        RetryPolicy(blocking_stop=tenacity.stop_never)
    with pytest.raises(ConfigurationError, match="needs blocking_stop"):
        RetryPolicy(blocking_wait=tenacity.wait_fixed(1))


def test_flood_guard_pauses_on_an_outage_but_dead_letters_a_lone_poison(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic, group = topic_factory(1), f"g{uuid.uuid4().hex[:8]}"
    first = [f"v{i}" for i in range(10)]
    produce(kafka.producer_config(), topic, [(f"k{i}", v) for i, v in enumerate(first)])
    downstream = Downstream(healthy=False)
    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        retry=RetryPolicy(delays=()),
        dead_letter=DeadLetterPolicy(max_consecutive=3, flood_backoff=(0.3, 0.6)),
    )
    forwards = _count_forwards(consumer)
    dlq = f"{topic}.{group}.dlq"
    consumer.subscribe([topic])
    thread = _start(consumer, downstream.charge)
    try:
        _wait(lambda: consumer.outage is not None, 30, "the flood guard to pause")
        _wait(lambda: downstream.calls >= 8, 30, "a few failed probes")
        assert forwards == Counter({dlq: 3}), "the DLQ kept filling during the outage"
        downstream.healthy = True
        _wait(lambda: len(downstream.paid_values()) == 7, 30, "the backlog to drain")
        assert consumer.outage is None

        produce(
            kafka.producer_config(),
            topic,
            [("p", "poison")] + [(f"n{i}", f"new{i}") for i in range(5)],
        )
        _wait(lambda: len(downstream.paid_values()) == 12, 30, "the new records")
        _wait(lambda: forwards[dlq] == 4, 10, "the lone poison record to be dead-lettered")
    finally:
        _stop((consumer, thread))
    assert consumer.outage is None


def test_flood_guard_can_raise_instead(kafka: KafkaCluster, topic_factory) -> None:
    topic, group = topic_factory(1), f"g{uuid.uuid4().hex[:8]}"
    produce(kafka.producer_config(), topic, [(f"k{i}", f"v{i}") for i in range(5)])
    consumer = ResilientConsumer(
        kafka.client_config(group_id=group, auto_offset_reset="earliest"),
        retry=RetryPolicy(delays=()),
        dead_letter=DeadLetterPolicy(max_consecutive=2, on_flood="raise"),
    )
    consumer.subscribe([topic])
    failures = 0
    try:
        with pytest.raises(DeadLetterFloodError, match="not dead-lettered"):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                msg = consumer.poll(0.5)
                if msg is not None and msg.error() is None:
                    failures += 1
                    consumer.fail(msg, ConnectionError("down"))
    finally:
        consumer.close()
    assert failures == 3


def test_flood_guard_ratio_and_policy_validation() -> None:
    guard = FloodGuard(DeadLetterPolicy(max_ratio=0.5, ratio_window=10))
    for outcome in [True, False] * 4:
        guard.record(outcome)
    assert not guard.would_flood()  # fewer than 10 samples: ratios are not judged yet
    guard.record(True)  # 5 dead of 9
    assert guard.would_flood()  # a 6th of 10 is over half
    guard.reset()
    assert not guard.would_flood()

    for bad, message in [
        ({"max_consecutive": 0}, "max_consecutive"),
        ({"max_ratio": 1.5}, "max_ratio"),
        ({"ratio_window": 2}, "ratio_window"),
        ({"on_flood": "ignore"}, "on_flood"),
        ({"flood_backoff": (5.0, 1.0)}, "flood_backoff"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            DeadLetterPolicy(**bad)
    with pytest.raises(ConfigurationError, match="needs a name"):
        CircuitBreaker("")
    with pytest.raises(ConfigurationError, match="fail_max"):
        CircuitBreaker("x", fail_max=0)
    with pytest.raises(ConfigurationError, match="unknown breakers"):
        ResilientConsumer(
            {"bootstrap.servers": "127.0.0.1:1", "group.id": "g"},
            breakers=[CircuitBreaker("a")],
            breaker_scope={"b": ["orders"]},
        )


def test_order_pipeline_through_an_outage_loses_nothing(kafka: KafkaCluster) -> None:
    """The demo's main job, shortened: flaky per-order failures through three retry tiers, a
    full payment-service outage midway, and an accounting in which every order is paid or in
    the DLQ. (This found records skipped by partitions resumed during an outage.)"""
    from resilient_kafka.demo import OrderPipeline

    # the demo's own parameters: with them the old code lost an order in every run
    pipeline = OrderPipeline(
        kafka, messages=2000, rate=100, delays=(1.0, 3.0, 10.0), outage=(8.0, 18.0)
    )
    started = time.monotonic()
    pipeline.start()
    try:

        def settled() -> bool:
            pipeline.observe(time.monotonic() - started)
            return pipeline.settled()

        deadline = time.monotonic() + 90
        while not settled() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        pipeline.stop()
    acc = pipeline.accounting
    assert len(acc.produced) == 2000
    lost = sorted(acc.lost)
    assert not lost, f"{len(lost)} orders neither paid nor dead-lettered: {lost[:5]}"
    # the failures it takes to open the breaker are real failures (a record on its last tier
    # among them is rightly dead-lettered); after that the DLQ must not grow
    growth = acc.dlq_at["service back"] - acc.dlq_at["service down"]
    assert growth <= pipeline.breaker.fail_max - 1, f"the DLQ grew by {growth} in the outage"
    assert acc.timeline["consumer paused"] - acc.timeline["service down"] < 2.0
    assert acc.timeline["consumer resumed"] - acc.timeline["service back"] < 8.0
    assert acc.handled_per_attempt[3] > 0, "the third retry tier was never exercised"


def test_a_closed_breaker_lets_concurrent_calls_run_together() -> None:
    """pybreaker holds its lock around the guarded call: with concurrent handlers, every call
    through one breaker ran alone. Four calls must be inside the breaker at once (a barrier
    that only opens when all four have arrived), and failures still trip it."""
    breaker = CircuitBreaker("together", fail_max=4, reset_timeout=60)
    barrier = threading.Barrier(4, timeout=10)
    errors: list[BaseException] = []

    def calling(fail: bool) -> None:
        def guarded() -> None:
            barrier.wait()  # BrokenBarrierError if the calls are serialised
            if fail:
                raise ConnectionError("down")

        try:
            breaker.call(guarded)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=calling, args=(False,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == [] and breaker.current_state == "closed"
    barrier.reset()
    threads = [threading.Thread(target=calling, args=(True,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(isinstance(e, threading.BrokenBarrierError) for e in errors), errors
    assert breaker.current_state == "open"  # the fourth failure tripped it
    with pytest.raises(CircuitBreakerError):
        breaker.call(lambda: None)
