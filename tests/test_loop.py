"""The run() batch logic against a scripted native consumer: which records of a fetched batch
are handed out, and where each partition resumes, when partitions are paused or the batch
breaks mid-way. (A real broker cannot be made to interleave partitions in one batch at will;
what the broker does is covered in test_consumer.py and test_breaker.py.)"""

from __future__ import annotations

import threading
import types
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from resilient_kafka import _executor as executor
from resilient_kafka import _loop, _partitions
from resilient_kafka._partitions import APPLICATION, PartitionControl
from resilient_kafka._record import Record
from resilient_kafka.metrics import NoMetrics


class _Msg:
    def __init__(self, partition: str, offset: int) -> None:
        self._partition, self._offset = partition, offset

    def topic(self) -> str:
        return self._partition

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def error(self) -> None:
        return None


class _Native:
    """Stands in for confluent's Consumer: records seeks, serves one scripted batch."""

    def __init__(self, batch: list[_Msg]) -> None:
        self.batch = batch
        self.seeks: list[tuple[str, int]] = []

    @staticmethod
    def pause(native: Any, partitions: list[TopicPartition]) -> None:
        return None

    resume = pause

    @staticmethod
    def poll(native: Any, timeout: float) -> None:
        return None

    @staticmethod
    def seek(native: Any, tp: TopicPartition) -> None:
        native.seeks.append((tp.topic, tp.offset))

    @staticmethod
    def consume(native: Any, num: int, timeout: float) -> list[_Msg]:
        batch, native.batch = native.batch, []
        return batch


def _loop_over(native: _Native, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any, Any]:
    monkeypatch.setattr(_partitions, "Consumer", _Native)
    monkeypatch.setattr(_loop, "Consumer", _Native)
    control = PartitionControl(native)  # type: ignore[arg-type]
    control.assigned_now({("a", 0), ("b", 0), ("c", 0)}, replace=True)
    control.reconcile()
    outage = types.SimpleNamespace(
        current=None,
        probe_ready=None,
        watch=types.SimpleNamespace(opens=0),
        paused_counts=dict,
    )
    loop = _loop.Loop(
        native,  # type: ignore[arg-type]
        topics=types.SimpleNamespace(tiers={}, maintain=lambda now: None),  # type: ignore[arg-type]
        control=control,
        admission=types.SimpleNamespace(  # type: ignore[arg-type]
            admit=lambda m: Record(m, m.topic(), m.partition(), m.offset())
        ),
        settle=None,  # type: ignore[arg-type]
        claims=None,
        committer=types.SimpleNamespace(
            generation=0, abort_pending=False, replays=False, maintain=lambda n: 1
        ),
        forwarder=types.SimpleNamespace(  # type: ignore[arg-type]
            send=lambda: None, take_error=lambda: None, busy=False
        ),
        outage=outage,  # type: ignore[arg-type]
        producer=types.SimpleNamespace(poll=lambda t: None, produced=0),
        metrics=NoMetrics(),
        stop=threading.Event(),
    )
    return loop, control, outage


def test_records_skipped_behind_a_pause_come_again_when_the_batch_breaks_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The handler pauses c at c5: c6 and c7 are skipped. At b1 an outage starts and the batch
    breaks; c8 is behind the break. c must resume at c6 (the first record it skipped), not at
    c8: c6 and c7 were never handed out."""
    native = _Native([_Msg("c", 5), _Msg("c", 6), _Msg("c", 7), _Msg("b", 1), _Msg("b", 2)])
    native.batch.append(_Msg("c", 8))
    loop, control, outage = _loop_over(native, monkeypatch)
    handled: list[tuple[str, int]] = []

    class Executor(executor.Executor):
        def submit(self, record: Record) -> None:
            handled.append((record.topic, record.offset))
            if (record.topic, record.offset) == ("c", 5):
                control.pause([("c", 0)], APPLICATION)  # the application pauses c
            if (record.topic, record.offset) == ("b", 1):
                outage.current = object()  # an outage starts: the batch breaks

    loop._run_batch(Executor(), 0.1)
    assert handled == [("c", 5), ("b", 1)]
    assert ("b", 2) in native.seeks  # b comes again from b2
    c_seeks = [offset for topic, offset in native.seeks if topic == "c"]
    assert c_seeks and min(c_seeks) == 6 and c_seeks[-1] == 6, native.seeks


def test_a_seek_mid_batch_keeps_its_position(monkeypatch: pytest.MonkeyPatch) -> None:
    """The handler seeks c forward at c5: the rest of c's records in the batch are not handed
    out and not rewound over the application's position; a's records go on."""
    native = _Native([_Msg("c", 5), _Msg("c", 6), _Msg("a", 1), _Msg("c", 7), _Msg("a", 2)])
    loop, control, _ = _loop_over(native, monkeypatch)
    handled: list[tuple[str, int]] = []

    class Executor(executor.Executor):
        def submit(self, record: Record) -> None:
            handled.append((record.topic, record.offset))
            if (record.topic, record.offset) == ("c", 5):
                control.seek(("c", 0), 100)

    loop._run_batch(Executor(), 0.1)
    assert handled == [("c", 5), ("a", 1), ("a", 2)]
    assert native.seeks == [("c", 100)]


def test_a_partition_revoked_during_a_batch_handlers_fill_up_fetch_is_not_handed_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """run_batches(max_wait=...) fetches a second time to fill the batch; a rebalance served
    inside that fetch revokes c. c's records from the first fetch belong to another consumer
    now: they must not reach the handler. a's records, from both fetches, do."""

    class _Filling(_Native):
        @staticmethod
        def consume(native: Any, num: int, timeout: float) -> list[_Msg]:
            batch, native.batch = native.batch, []
            if batch:
                return batch
            control.revoked([("c", 0)])  # the rebalance callback runs inside the fetch
            return [_Msg("a", 2)]

    native = _Filling([_Msg("c", 5), _Msg("a", 1), _Msg("c", 6)])
    loop, control, _ = _loop_over(native, monkeypatch)
    monkeypatch.setattr(_loop, "Consumer", _Filling)
    handled: list[tuple[str, int]] = []

    class Executor(executor.Executor):
        batch_records = 10  # a batch handler's max_records
        batch_wait = 0.5  # and max_wait: a short first fetch is filled up
        lean = False  # (the lean path is refused anyway once the version moved)

        def submit(self, record: Record) -> None:
            handled.append((record.topic, record.offset))

    loop._run_batch(Executor(), 1.0)
    assert handled == [("a", 1), ("a", 2)]
