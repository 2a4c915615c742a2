"""Exactly-once mode: the consumer's forwards, the handler's output and the consumed offsets
commit in one Kafka transaction.

This module owns the transactional producer's protocol and librdkafka's error contract for it:
a retriable error repeats the call, an abortable one aborts (the consumer then rewinds and
replays), a fatal one (fenced by another producer with the same ``transactional.id``) ends the
consumer with :class:`TransactionError`. Rewinding and replaying is the consumer's business.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from resilient_kafka.errors import ConfigurationError, TransactionError

log = logging.getLogger("resilient_kafka.transaction")

_RETRY_PAUSE = 0.1  # seconds between repeats of a call that failed with a retriable error
# How long past its deadline a transactional call may block before it is given up on. librdkafka
# can block in send_offsets_to_transaction() far past the timeout it was given while the group
# coordinator is unreachable (librdkafka issues 5456 and 5511): after a broker restart that
# decommissioned the coordinator, for good.
_GRACE = 5.0
_ABANDONED: list[Any] = []  # producers with a call that never returned: kept, never destroyed


def consumer_settings(conf: dict[str, Any], dedup: object) -> None:
    """Check and complete a consumer config for exactly-once mode (in place)."""
    if dedup is not None:
        raise ConfigurationError(
            "dedup= and exactly_once=True do not combine: after an aborted transaction the "
            "records are replayed, and a dedup store would skip them (their output was "
            "aborted). Exactly-once covers what the handler writes to Kafka; make other side "
            "effects idempotent (key them by rk.id)"
        )
    if str(conf.get("enable.auto.commit", False)).lower() in ("true", "1"):
        raise ConfigurationError(
            "enable.auto.commit=true contradicts exactly_once=True: offsets are committed "
            "inside each transaction (leave enable.auto.commit unset)"
        )
    if str(conf.get("isolation.level", "read_committed")) != "read_committed":
        raise ConfigurationError(
            "exactly_once=True needs isolation.level=read_committed (the retry topics are "
            "written in transactions; aborted copies must not be read)"
        )
    conf["enable.auto.commit"] = False
    conf["isolation.level"] = "read_committed"


def transactional_id(producer_config: Mapping[str, Any], consumer_config: Mapping[str, Any]) -> str:
    """The producer's ``transactional.id``: the caller's, else one derived from the static
    member id (stable across restarts), else a fresh one per consumer."""
    given = producer_config.get("transactional.id")
    if given:
        return str(given)
    group = consumer_config["group.id"]
    instance = consumer_config.get("group.instance.id")
    if instance:
        return f"rk-{group}-{instance}"
    return f"rk-{group}-{uuid.uuid4().hex[:12]}"


class Transactions:
    """One open transaction at a time on ``producer``; every call bounded by ``timeout``."""

    def __init__(
        self, producer: Any, tid: str, timeout: float, transaction_timeout: float = 60.0
    ) -> None:
        self._producer = producer
        self.transactional_id = tid
        self._timeout = timeout
        # a commit's retriable errors are resumable: repeat it (librdkafka bounds each call by
        # the transaction's remaining time) until the coordinator must have settled it
        self._settle = transaction_timeout + timeout
        self.open = False
        self.committed = 0
        self.aborted = 0
        # a call that never returned: the producer is unusable (every later call refused,
        # and closing it would block too)
        self.stuck: str | None = None
        self._call("init_transactions", producer.init_transactions)

    def begin(self) -> None:
        if self.open:
            return
        try:
            self._producer.begin_transaction()
        except KafkaException as exc:  # still in an abortable state: abort, then begin
            error = exc.args[0] if exc.args else None
            if not isinstance(error, KafkaError) or not error.txn_requires_abort():
                raise TransactionError(
                    f"begin_transaction failed for transactional.id={self.transactional_id!r}: "
                    f"{exc}",
                    error,
                ) from exc
            self._call("abort_transaction", self._producer.abort_transaction)
            self._producer.begin_transaction()
        self.open = True

    def commit(self, offsets: list[TopicPartition], group_metadata: Any) -> bool:
        """Commit the open transaction with ``offsets``; False if it had to be aborted."""
        producer = self._producer
        try:
            if offsets:
                self._call(
                    "send_offsets_to_transaction",
                    lambda t: producer.send_offsets_to_transaction(offsets, group_metadata, t),
                )
            self._call("commit_transaction", producer.commit_transaction)
        except _Abortable as exc:
            log.warning("transaction must be aborted (its records are replayed): %s", exc)
            self.abort()
            return False
        self.open = False
        self.committed += 1
        return True

    def abort(self) -> None:
        """Abort the open transaction: its records are discarded for read_committed readers."""
        if self.open:
            try:
                self._call("abort_transaction", self._producer.abort_transaction)
            except _Abortable as exc:  # the coordinator aborts it when it times out
                log.warning("abort_transaction failed (the broker aborts on timeout): %s", exc)
            self.open = False
        self.aborted += 1

    def _call(self, name: str, call: Any) -> None:
        if self.stuck is not None:
            raise TransactionError(f"{name} not attempted: {self.stuck}")
        bounded = name == "init_transactions"
        deadline = time.monotonic() + (self._timeout if bounded else self._settle)
        while True:
            try:
                self._within(name, call, deadline, bounded)
                return
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if not isinstance(error, KafkaError):
                    raise
                if error.fatal():
                    self.open = False
                    raise TransactionError(
                        f"{name} failed fatally for transactional.id={self.transactional_id!r}: "
                        f"{error.str()} (another producer with this transactional.id fenced "
                        "this one, or the broker lost its state; the consumer must be "
                        "recreated)",
                        error,
                    ) from exc
                if error.txn_requires_abort():
                    raise _Abortable(f"{name}: {error.str()}") from exc
                if error.retriable() and time.monotonic() < deadline:
                    time.sleep(_RETRY_PAUSE)
                    continue
                if name != "send_offsets_to_transaction":  # unsettled: cannot go on
                    raise TransactionError(
                        f"{name} failed for transactional.id={self.transactional_id!r}: "
                        f"{error.str()}",
                        error,
                    ) from exc
                raise _Abortable(f"{name}: {error.str()}") from exc

    def _within(self, name: str, call: Any, deadline: float, bounded: bool) -> None:
        """``call(timeout)`` on a thread of its own, waited for until ``deadline`` plus a grace;
        ``timeout`` is the time left (``bounded``) or -1, librdkafka's "the transaction's
        remaining time". A call still blocked then makes this producer unusable
        (TransactionError): it is never closed nor destroyed (either would block on the call)."""
        outcome: list[BaseException | None] = []
        done = threading.Event()
        timeout = max(0.1, deadline - time.monotonic()) if bounded else -1

        def target() -> None:
            try:
                call(timeout)
                outcome.append(None)
            except BaseException as exc:  # handed to the caller's thread
                outcome.append(exc)
            finally:
                done.set()

        started = time.monotonic()
        # a daemon thread: a call that never returns must not hold the process at exit
        threading.Thread(target=target, name=f"rk-txn-{name}", daemon=True).start()
        if not done.wait(max(0.0, deadline - started) + _GRACE):
            self.stuck = (
                f"{name} did not return within {time.monotonic() - started:.0f} s for "
                f"transactional.id={self.transactional_id!r} (librdkafka blocks past its "
                "timeout while a coordinator is unreachable: librdkafka issues 5456, 5511); "
                "the producer is unusable and is left open: stop this process and start a "
                "new one (a fixed transactional.id lets it fence the open transaction at once)"
            )
            self.open = False
            _ABANDONED.append(self._producer)  # destroying it would block on the call
            log.error("%s", self.stuck)
            raise TransactionError(self.stuck)
        if outcome[0] is not None:
            raise outcome[0]


class _Abortable(Exception):
    """The transaction cannot commit; abort it and replay its records."""


class TransactionalCommitter:
    """Exactly-once mode's committer: offsets commit inside the transaction that carries the
    handler's output and the retry/DLQ copies, every ``transaction_interval``. An aborted
    transaction is replayed: every partition rewinds to where the transaction began."""

    replays = True  # records of an aborted transaction come again (admission asks prefailed)

    def __init__(
        self,
        native: Any,
        txn: Transactions,
        producer: Any,
        forwarder: Any,
        control: Any,
        outage: Any,
        settings: Any,
        metrics: Any,
    ) -> None:
        from resilient_kafka._barrier import CommitBarrier

        self._native = native
        self._txn = txn
        self._producer = producer
        self._forwarder = forwarder
        self._control = control
        self._outage = outage
        self._interval = settings.transaction_interval
        self._timeout = settings.forward_timeout
        self._metrics = metrics
        self.barrier = CommitBarrier()
        self.abort_pending = False  # a record failed after writing output: abort, replay
        self.generation = 0  # bumped by every replay
        self.on_replay: Any = None  # the loop: drop the records in hand (they come again)
        self._started = time.monotonic()
        self._work: Any = None  # run()'s concurrent handlers, quiesced around each commit
        self._produced = producer.produced  # at the start of the open transaction
        self._sent = forwarder.sent
        self._replayed: dict[tuple[str, int], tuple[int, int]] = {}  # (generation, offset)
        # records whose attempt was aborted with its transaction: routed when they come again
        self._prefailed: dict[tuple[str, int, int], BaseException] = {}

    @property
    def open(self) -> bool:
        return self._txn.open

    def quiesce_with(self, work: Any) -> None:
        """``run()`` with concurrency: a transaction commits or aborts only while no handler
        runs (a handler's output must land whole in the transaction of its offset). ``work``
        stops starting records when asked (:meth:`quiesce`), and starts again on
        :meth:`resume`."""
        self._work = work

    def wrote_for(self, record: Any) -> bool:
        """Whether the open transaction holds output written for ``record`` (with concurrent
        handlers: by its own handler; else since it was handed out), or must abort anyway."""
        writes = record.writes
        return (
            self.abort_pending
            or self._forwarder.failed_in_transaction
            or (writes[0] > 0 if writes is not None else self._producer.produced != record.produced)
        )

    def abort_for(self, record: Any, exc: BaseException | None) -> None:
        """``record`` failed with its output in the open transaction: abort and replay at the
        next housekeeping; with ``exc``, the record is routed when it comes again, without
        running the handler (after-rollback processing)."""
        self.abort_pending = True
        if exc is not None:
            self._prefailed[record.topic, record.partition, record.offset] = exc

    def prefailed(self, record: Any) -> BaseException | None:
        if not self._prefailed:
            return None
        return self._prefailed.pop((record.topic, record.partition, record.offset), None)

    def maintain(self, now: float) -> float:
        if (
            self.abort_pending
            or self._forwarder.failed_in_transaction
            or now - self._started >= self._interval
        ):
            work = self._work
            if work is not None and not work.quiesce():
                return 0.005  # handlers still running; none starts until the commit
            self.commit_transaction()
            if work is not None:
                work.resume()
        return float(self._interval)

    def _drain(self) -> None:
        """Wait (bounded) until no concurrent handler runs, before a commit or abort that
        cannot wait for the next housekeeping (a rebalance, the shutdown)."""
        work = self._work
        if work is not None and not work.drain():
            log.error(
                "handlers still running after the drain timeout: the transaction commits "
                "without them; their output, if they fail, may be written twice"
            )

    def commit(self, message: Any, offsets: Any, asynchronous: bool) -> None:
        if message is not None or offsets is not None:
            from resilient_kafka.errors import ResilientKafkaError

            raise ResilientKafkaError(
                "in exactly-once mode offsets commit with the transaction, past every "
                "record done; call commit() without message= or offsets="
            )
        self.commit_transaction()

    def commit_transaction(self) -> None:
        """Commit the open transaction with the offsets of every record done in it (abort and
        replay it if that fails). Called between records, never with a record in hand."""
        txn = self._txn
        if not txn.open:
            return
        forwarder = self._forwarder
        forwarder.send()
        failed = self.abort_pending or forwarder.failed_in_transaction
        if forwarder.in_flight or failed:
            # a forward's ack is what makes its source offset committable; and an abort right
            # after a produce can fail fatally in librdkafka (its issue #4849): flush first
            self._producer.flush(self._timeout)
        failed = self.abort_pending or forwarder.failed_in_transaction
        if failed or forwarder.in_flight:
            if forwarder.in_flight:
                log.error(
                    "%d forward(s) unacknowledged after %.0fs: aborting the transaction",
                    forwarder.in_flight,
                    self._timeout,
                )
            self.abort_and_replay()
            return
        points = self.barrier.replay_points()  # before advanced(): if the commit fails
        offsets = [TopicPartition(t, p, o) for t, p, o in self.barrier.advanced()]
        now = time.monotonic()
        wrote = forwarder.sent != self._sent or self._producer.produced != self._produced
        if not offsets and not wrote:
            self._started = now  # nothing written, nothing consumed: keep it open
            return
        if txn.commit(offsets, self._native.consumer_group_metadata()):
            self._metrics.commit(time.monotonic() - now)
            self._metrics.transaction("committed")
            self._begin()
        else:
            self._metrics.commit(time.monotonic() - now, "TransactionAborted")
            self._replay(points)

    def _begin(self) -> None:
        self._txn.begin()
        self._started = time.monotonic()
        self._produced = self._producer.produced
        self._sent = self._forwarder.sent

    def abort_and_replay(self) -> None:
        self._txn.abort()
        self._replay(None)

    def _replay(self, points: list[tuple[str, int, int]] | None) -> None:
        """The open transaction was aborted: forget what it did and rewind every partition to
        where it began (the offset committed with the last transaction), so its records come
        again; then open the next one."""
        self._metrics.transaction("aborted")
        self.generation += 1
        self._forwarder.discard()  # delivery reports of the aborted forwards are ignored
        self.abort_pending = False
        self._outage.void_probe()
        if self.on_replay is not None:
            self.on_replay()
        if points is None:
            points = self.barrier.replay_points()
        try:
            assigned = {(tp.topic, tp.partition) for tp in Consumer.assignment(self._native)}
        except KafkaException as exc:  # going on would commit past the aborted records
            raise TransactionError(
                f"cannot read the assignment to replay an aborted transaction: {exc}; stopping "
                "(a restart resumes from the committed offsets)"
            ) from exc
        rewound = 0
        for topic, partition, offset in points:
            key = (topic, partition)
            self.barrier.forget(topic, partition)
            if key not in assigned:
                continue
            rewound += 1
            # a replay inside a rebalance callback, mid poll()/consume(): the records that call
            # fetched for this partition are dropped and the partition rewound again
            self._replayed[key] = (self.generation, offset)
            self._rewind(key, offset)
        log.warning("transaction aborted: replaying %d partition(s)", rewound)
        self._begin()

    def _rewind(self, key: tuple[str, int], offset: int) -> None:
        if self._outage.replayed(key, offset):
            return
        from resilient_kafka._partitions import RETRY_DUE

        try:
            self._control.seek(key, offset)
        except KafkaException as exc:  # going on would commit past the aborted records
            raise TransactionError(
                f"cannot rewind {key[0]} [{key[1]}] to {offset} after an aborted "
                f"transaction: {exc}; stopping (a restart resumes from the committed offsets)"
            ) from exc
        self._control.release([key], RETRY_DUE)  # its retry record comes again from there

    def replayed_since(self, generation: int, msg: Any) -> bool:
        """True (and the partition rewound again) if ``msg`` was fetched by a call during
        which a replay rewound its partition: it may predate the rewind, so it comes again."""
        key = (msg.topic(), msg.partition())
        entry = self._replayed.get(key)
        if entry is None or entry[0] <= generation or msg.error() is not None:
            return False
        self._rewind(key, entry[1])
        return True

    def revoke(self, keys: set[tuple[str, int]]) -> None:
        """Partitions are being revoked (forwards drained): commit while still owned."""
        self._drain()
        self.commit_transaction()
        if self._work is not None:
            self._work.resume()

    def lost(self, keys: set[tuple[str, int]]) -> None:
        """Partitions were lost: the open transaction's offsets cannot commit; abort it and
        replay the partitions still owned."""
        if self._txn.open:
            self._drain()
            self.abort_and_replay()
            if self._work is not None:
                self._work.resume()

    def forget(self, keys: set[tuple[str, int]]) -> None:
        for key in keys:
            self.barrier.forget(*key)
        self._forwarder.forget(keys)  # their new owner routes them again
        if self._prefailed:  # their new owner runs the handler on them again
            for coordinates in [c for c in self._prefailed if (c[0], c[1]) in keys]:
                del self._prefailed[coordinates]

    def sync_store(self) -> None:
        """(Offsets are never stored outside a transaction.)"""

    def close(self, wrote: bool) -> None:
        """Commit what is done; output written for records still in hand (``wrote``) is
        aborted with it (those records were not reported processed and are redelivered)."""
        txn = self._txn
        if not txn.open:
            return  # fenced: nothing can commit
        from resilient_kafka.errors import ResilientKafkaError

        if self._work is not None and not self._work.quiesce():
            wrote = True  # handlers outlived the shutdown: their output must not commit
        try:
            if wrote:
                txn.abort()
                self._metrics.transaction("aborted")
            else:
                self.commit_transaction()
        except ResilientKafkaError as exc:
            log.error("final transaction not committed (records will be redelivered): %s", exc)
