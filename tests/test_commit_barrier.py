"""The commit barrier alone: offsets advance only past a contiguous prefix of done records."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from resilient_kafka._barrier import CommitBarrier


def test_out_of_order_completion_holds_the_offset() -> None:
    barrier = CommitBarrier()
    for offset in (10, 11, 12, 13):
        barrier.track("t", 0, offset)
    assert barrier.safe_offset("t", 0) == -1
    barrier.complete("t", 0, 12)
    barrier.complete("t", 0, 11)
    assert barrier.safe_offset("t", 0) == -1  # 10 (e.g. a forward in flight) holds everything
    barrier.complete("t", 0, 10)
    assert barrier.safe_offset("t", 0) == 13
    assert barrier.advanced() == [("t", 0, 13)]
    assert barrier.advanced() == []  # reported once
    barrier.complete("t", 0, 13)
    assert barrier.committable() == [("t", 0, 14)]
    assert barrier.pending("t", 0) == 0


def test_partitions_are_independent_and_forgotten_on_revoke() -> None:
    barrier = CommitBarrier()
    barrier.track("t", 0, 0)
    barrier.track("t", 1, 0)
    barrier.complete("t", 1, 0)
    assert barrier.committable() == [("t", 1, 1)]
    barrier.forget("t", 1)
    assert barrier.committable() == []
    assert barrier.total_pending() == 1


@given(st.permutations(list(range(30))), st.integers(min_value=0, max_value=30))
def test_safe_offset_is_the_first_record_not_done(order: list[int], done_count: int) -> None:
    barrier = CommitBarrier()
    for offset in range(30):
        barrier.track("t", 0, offset)
    done = set(order[:done_count])
    for offset in order[:done_count]:
        barrier.complete("t", 0, offset)
    first_not_done = next((o for o in range(30) if o not in done), 30)
    expected = first_not_done if first_not_done > 0 else -1
    assert barrier.safe_offset("t", 0) == expected


def test_a_copy_acked_after_its_partition_came_back_does_not_complete_the_new_tracking() -> None:
    """A retry copy acknowledged late, after its partition was revoked and assigned again (the
    drain on revoke timed out), must not mark the redelivered record as done: that record is
    in hand again and its offset must not commit before it is handled."""
    from prometheus_client import CollectorRegistry

    from resilient_kafka import ResilientConsumer
    from resilient_kafka._forwarding import Forward

    consumer = ResilientConsumer(  # no broker needed: nothing here reaches it
        {"bootstrap.servers": "127.0.0.1:9", "group.id": "g", "log_level": 0},
        registry=CollectorRegistry(),
    )
    try:
        barrier = consumer._committer.barrier
        before = barrier.track("t", 0, 5)  # handed out, failed, its copy on the way
        copy = Forward(("t", 0, 5), "t", "t.g.retry.1", b"k", b"v", [], 0, progress=before)
        consumer._committer.forget({("t", 0)})  # revoked; later assigned again
        barrier.track("t", 0, 5)  # redelivered: in hand again
        consumer._forwarder.in_flight += 1  # (it was produced)
        consumer._forwarder._delivered(copy, None, None)  # the old copy's late ack
        assert barrier.safe_offset("t", 0) == -1
    finally:
        consumer.close()
