"""The processing loop, on the polling thread: housekeeping, fetch, admit, hand out, settle.

Read top to bottom: :meth:`Loop.housekeeping` (delivery reports, forwards, due retries,
outages, commits), then the three ways records leave the loop: :meth:`Loop.poll` and
:meth:`Loop.consume` (the drop-in: records stay in hand until the application asks for more,
commits, or fails them) and :meth:`Loop.run` (``run()``: an executor handles each record).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message

from resilient_kafka import headers
from resilient_kafka._admission import Admission
from resilient_kafka._claims import Claims, Verdict
from resilient_kafka._forwarding import Forwarder
from resilient_kafka._outage import DEDUP_STORE, OutageControl
from resilient_kafka._partitions import (
    APPLICATION,
    BACKPRESSURE,
    RETRY_DUE,
    WITH_APPLICATION,
    Key,
    PartitionControl,
)
from resilient_kafka._record import Record
from resilient_kafka._settle import Settlement
from resilient_kafka._topics import Topics
from resilient_kafka.errors import DedupKeyError, ResilientKafkaError

log = logging.getLogger("resilient_kafka.consumer")

# While records flow, housekeeping runs at most this often instead of once per record.
_MAINTAIN_INTERVAL = 0.05
# run() fetches records in batches sized to take about _BATCH_SECONDS to handle (1 to
# _BATCH_MAX records), and cuts a batch short after _BATCH_DEADLINE (the rest is rewound), so
# housekeeping and max.poll.interval.ms never wait on a slow handler.
_BATCH_MAX = 500
_BATCH_SECONDS = 0.1
_BATCH_DEADLINE = 1.0
# run() with concurrent handlers at their bound fetches one record this often (seconds), so
# that max.poll.interval.ms never passes and rebalance callbacks are served
_KEEPALIVE = 1.0


def usable(msg: Message) -> bool:
    """False for consumer events (logged); a fatal error is raised."""
    error = msg.error()
    if error is None:
        return True
    if error.fatal():
        raise KafkaException(error)
    log.debug("consumer event: %s", error)
    return False


class Loop:
    """Owns the records in hand and the rhythm of housekeeping."""

    def __init__(
        self,
        native: Consumer,
        *,
        topics: Topics,
        control: PartitionControl,
        admission: Admission,
        settle: Settlement,
        claims: Claims | None,
        committer: Any,
        forwarder: Forwarder,
        outage: OutageControl,
        producer: Any,
        metrics: Any,
        stop: threading.Event,
    ) -> None:
        self._native = native
        self._topics = topics
        self._tiers = topics.tiers
        self._control = control
        self._admit = admission.admit
        self._admission = admission
        self._native_poll = Consumer.poll.__get__(native)  # the native poll, bound once
        self._marked = -1  # control.version at the last mark() of poll()
        self._settle = settle
        self._claims = claims
        self._committer = committer
        self._forwarder = forwarder
        self._outage = outage
        self._watch = outage.watch
        self._producer = producer
        self._metrics = metrics
        self._stop = stop
        self.in_hand: list[Record] = []  # the drop-in loop's records, not yet settled
        self._maintain_at = 0.0  # monotonic time of the next housekeeping pass
        self._last_gauges = 0.0
        self._batch_size = 32  # run(): records per fetch, adapted to the handler's speed
        self._fetched_at = 0.0  # run(): monotonic time of the last fetch
        self.polled_at: float | None = None  # the last poll(), consume() or run() fetch (health)
        self.running = False  # run() is the loop (it claims around the handler itself)
        self.executor: Any = None  # run()'s executor, while it runs

    # -- housekeeping ------------------------------------------------------------------------

    def housekeeping(self, now: float, deadline: float | None) -> float:
        """Between fetches; returns how long the next fetch may block."""
        self._producer.poll(0)
        forwarder = self._forwarder
        forwarder.send()
        error = forwarder.take_error()
        if error is not None:
            raise error
        control = self._control
        control.reconcile()
        self._topics.maintain(now)
        wait = 0.1 if forwarder.busy else 1.0
        if self._outage.current is not None:
            wait = min(wait, self._outage.tend(now))
        metrics = self._metrics
        metrics.flush()
        if now - self._last_gauges >= 0.5:
            self._last_gauges = now
            self._update_gauges()
        wait = min(wait, float(self._committer.maintain(now)))
        due = control.release_due(time.time() * 1000)
        if due is not None:
            wait = min(wait, due)
        self._maintain_at = now + min(wait, _MAINTAIN_INTERVAL)
        if deadline is not None:
            wait = min(wait, max(0.0, deadline - now))
        return wait

    def _update_gauges(self) -> None:
        paused = self._metrics.paused
        for reason, count in self._outage.paused_counts().items():
            paused(reason, count)
        paused("retry_backoff", len(self._control.paused_by(RETRY_DUE)))
        control = self._control
        paused("manual", len(control.paused_by(APPLICATION) | control.paused_by(WITH_APPLICATION)))
        paused("backpressure", len(control.paused_by(BACKPRESSURE)))
        gauges = self.executor.gauges() if self.executor is not None else None
        if gauges is not None:  # run() with concurrency
            self._metrics.work(*gauges)

    # -- the drop-in loop --------------------------------------------------------------------

    def poll(self, timeout: float | None = None) -> Message | None:
        """The next message for the application (retry records only once due), or None."""
        if timeout is not None and type(timeout) is not float and type(timeout) is not int:
            timeout = real_number(timeout)  # before anything changes, as confluent's does
        in_hand = self.in_hand
        if in_hand:  # what the application holds is done (finish_in_hand(), inline)
            done = self._settle.done
            for held in in_hand:
                done(held)
            in_hand.clear()
        now = self.polled_at = time.monotonic()
        deadline = None if timeout is None or timeout < 0 else now + timeout
        metrics = self._metrics
        outage = self._outage
        committer = self._committer
        control = self._control
        native_poll = self._native_poll
        while True:
            if (
                now >= self._maintain_at
                or outage.current is not None
                or committer.abort_pending
                or control.pending
            ):
                wait = self.housekeeping(now, deadline)
                probe = self._admission.probe(outage.take_probe())
                if probe is not None:
                    if self._handed_out(probe):
                        return probe.msg
                    now = time.monotonic()
                    continue
                now = time.monotonic()  # (the poll's duration starts here)
            else:  # records are flowing: poll until the next housekeeping is due
                wait = self._maintain_at - now
                if deadline is not None and deadline - now < wait:
                    wait = max(0.0, deadline - now)
            generation = committer.generation
            msg: Message | None = native_poll(wait)
            if msg is not None:
                if msg.error() is not None:
                    if self._application_event(msg):
                        return msg
                    now = time.monotonic()
                    continue
                if committer.generation != generation and committer.replayed_since(generation, msg):
                    now = time.monotonic()
                    continue
                if control.version != self._marked:
                    control.mark()
                    self._marked = control.version
                record = self._admit(msg)
                if record is not None:
                    if self._claims is None or self.running:  # the common case, inline
                        record.opens = self._watch.opens
                        if committer.replays:  # exactly-once: output written since then
                            record.produced = self._producer.produced
                        in_hand.append(record)
                    elif not self._handed_out(record):
                        now = time.monotonic()
                        continue
                    if metrics.enabled:
                        metrics.polled(record.topic, time.monotonic() - now)
                    return msg
            now = self.polled_at = time.monotonic()  # (a long poll() is polling all along)
            if deadline is not None and now >= deadline:
                return None

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        """Up to ``num_messages`` messages (retry records only once due)."""
        if timeout is not None and type(timeout) is not float and type(timeout) is not int:
            timeout = real_number(timeout)
        self.finish_in_hand()
        self.polled_at = time.monotonic()
        deadline = None if timeout is None or timeout < 0 else self.polled_at + timeout
        committer = self._committer
        metrics = self._metrics
        while True:
            wait = self.housekeeping(time.monotonic(), deadline)
            probe = self._admission.probe(self._outage.take_probe())
            if probe is not None:
                if self._handed_out(probe):
                    return [probe.msg]
                continue
            started = time.monotonic()
            generation = committer.generation
            batch = Consumer.consume(self._native, num_messages, wait)
            if committer.generation != generation:
                batch = [m for m in batch if not committer.replayed_since(generation, m)]
            self._control.mark()
            out: list[Message] = []
            try:
                for i, msg in enumerate(batch):
                    if msg.error() is not None:
                        if self._application_event(msg):
                            out.append(msg)
                        continue
                    record = self._admit(msg)
                    if record is None:
                        continue
                    verdict = self._hand_out(record)
                    if verdict is Verdict.RUN:
                        out.append(msg)
                        metrics.consumed(record.topic)
                    elif verdict is Verdict.LATER:
                        self._rewind(batch, i)  # its twin (or another claim) goes first
                        break
            except BaseException:
                self._unwind(batch, out)
                raise
            if out and out[-1].error() is None:
                metrics.poll(out[-1].topic(), time.monotonic() - started)
            if out or (deadline is not None and time.monotonic() >= deadline):
                return out

    def _application_event(self, msg: Message) -> bool:
        """Whether an event (an error, the end of a partition) is the application's: those of
        retry tiers are the library's (logged), as their partitions are."""
        if msg.topic() not in self._tiers:
            return True
        error = msg.error()
        if error is not None and error.fatal():
            raise KafkaException(error)
        log.debug("retry tier event: %s", error)
        return False

    def _handed_out(self, record: Record) -> bool:
        """poll(): :meth:`_hand_out`; a record whose claim raised is delivered again."""
        try:
            return self._hand_out(record) is Verdict.RUN
        except BaseException:
            self._control.rewind(record.key, record.offset)
            raise

    def _hand_out(self, record: Record) -> Verdict | None:
        """Give ``record`` to the application (in hand until it asks for more): RUN. The
        drop-in loop's dedup may keep it back (another verdict, applied here; None: it has no
        identity and went to the DLQ). ``run()`` claims in :meth:`_execute` instead."""
        record.opens = self._watch.opens
        record.produced = self._producer.produced
        claims = self._claims
        if claims is None or self.running:
            self.in_hand.append(record)
            return Verdict.RUN
        try:
            key = claims.identity(record)
        except DedupKeyError as exc:
            self._settle.refused(record, exc, headers.NON_RETRYABLE)
            return None
        verdict = claims.claim(record, key, twins=True)
        if verdict is Verdict.RUN:
            self.in_hand.append(record)
        else:
            self._apply(verdict, record)
        return verdict

    def _apply(self, verdict: Verdict, record: Record) -> None:
        """Settle a record its dedup claim keeps from the handler."""
        if verdict is Verdict.DUPLICATE:
            self._settle.duplicate(record)
        elif verdict is Verdict.LATER:
            self._settle.later(record)
        else:
            self._settle.held(record, DEDUP_STORE)

    def fail(self, msg: Message, exc: BaseException) -> None:
        """The application could not process ``msg``: route it (or hold it, an outage)."""
        in_hand = self.in_hand
        for i in range(len(in_hand) - 1, -1, -1):
            if in_hand[i].msg is msg:
                record = in_hand.pop(i)
                break
        else:
            raise ResilientKafkaError(
                "fail() needs a message this consumer handed out and that is still in hand "
                f"({msg.topic()} [{msg.partition()}] @{msg.offset()}); call it before the next "
                "poll()/consume()"
            )
        self._settle.failed(record, exc)

    def finish_in_hand(self) -> None:
        """The application asked for more (or commits): what it holds and did not fail is
        done."""
        in_hand = self.in_hand
        if not in_hand:
            return
        done = self._settle.done
        for record in in_hand:
            done(record)
        in_hand.clear()

    def give_up(self, keys: set[Key], *, lost: bool) -> None:
        """Partitions are revoked (running handlers are awaited, bounded) or ``lost`` (not
        awaited): run()'s concurrent work of theirs ends here."""
        if self.executor is not None:
            self.executor.revoke(keys, lost=lost)

    def replayed(self) -> None:
        """Exactly-once: an aborted transaction is replayed; every partition rewinds, so what
        is in hand or held by run()'s executor comes again."""
        self.drop_in_hand()
        if self.executor is not None:
            self.executor.replayed()

    def drop_in_hand(self) -> None:
        """Forget the records in hand without settling them: they will be delivered again."""
        in_hand = list(self.in_hand)
        self.in_hand.clear()  # in place: poll() holds the list across the native poll
        if self._claims is not None:
            for record in in_hand:
                self._claims.release(record)

    def wrote_in_hand(self) -> bool:
        """Exactly-once: output was written since a record still in hand was handed out."""
        return any(self._committer.wrote_for(record) for record in self.in_hand)

    def _unwind(self, batch: list[Message], admitted: list[Message]) -> None:
        """An exception stopped a batch: nothing of it reaches the application, so its records
        leave the hand (claims released) and every partition rewinds to its first record of
        the batch."""
        taken = {id(m) for m in batch}
        kept = []
        for record in self.in_hand:
            if id(record.msg) in taken:
                if self._claims is not None:
                    self._claims.release(record)
            else:
                kept.append(record)
        self.in_hand[:] = kept
        self._rewind(batch, 0, every=True)

    def _rewind(self, batch: list[Message], start: int, every: bool = True) -> None:
        """Records from ``start`` on were fetched but not handed out: deliver them again. A
        partition positioned since the fetch keeps its position unless ``every``; rewinding
        never skips a lower position set while it is stopped."""
        first: dict[Key, int] = {}
        for msg in batch[start:]:
            if msg.error() is None:
                first.setdefault((msg.topic(), msg.partition()), msg.offset())  # type: ignore[arg-type]
        control = self._control
        for key, offset in first.items():
            if key not in control.assigned or (not every and control.positioned(key)):
                continue
            control.rewind(key, offset)

    def _rewind_skipped(self, skipped: dict[Key, int]) -> None:
        """Records of partitions stopped mid-batch were skipped: a partition positioned since
        the fetch keeps its position; another (paused) is rewound to its first skipped one."""
        control = self._control
        for key, offset in skipped.items():
            if key in control.assigned and not control.positioned(key):
                control.rewind(key, offset)
        skipped.clear()

    # -- run() -------------------------------------------------------------------------------

    def run(self, executor: Any, poll_timeout: float) -> None:
        """Hand records to ``executor`` until stopped; one record at a time in an outage (the
        probes come through poll())."""
        stop = self._stop
        while not stop.is_set():
            if self._outage.current is None:
                self._run_batch(executor, poll_timeout)
                continue
            if (
                executor.room <= 0
                and time.monotonic() - self._fetched_at < _KEEPALIVE
                and executor.wait(0.05)  # concurrent handlers at their bound (see _run_batch)
            ):
                continue
            self._fetched_at = time.monotonic()
            msg = self.poll(min(poll_timeout, 0.05) if executor.busy else poll_timeout)
            if msg is not None and usable(msg):
                self._execute(executor, self.in_hand.pop())
            executor.collect()

    def _claiming(self, executor: Any) -> Any:
        return functools.partial(self._execute, executor)

    def _execute(self, executor: Any, record: Record) -> None:
        """Claim ``record`` (dedup) and hand it to the executor."""
        claims = self._claims
        if claims is not None and record.claim is None and not executor.claims_itself:
            try:
                verdict = claims.claim_record(record)
            except DedupKeyError as exc:
                self._settle.refused(record, exc, headers.NON_RETRYABLE)
                return
            if verdict is not Verdict.RUN:
                self._apply(verdict, record)
                return
        executor.submit(record)

    def _run_batch(self, executor: Any, timeout: float) -> None:
        """Fetch a batch and hand its records to the executor one by one, admitting each only
        when its turn comes (so a pause, a seek, an outage or a due time met mid-batch applies
        to the records behind it, exactly as with one poll() per record)."""
        if self.in_hand:
            self.finish_in_hand()
        now = self.polled_at = time.monotonic()
        wait = self.housekeeping(now, now + timeout)
        outage = self._outage
        if outage.current is not None or outage.probe_ready is not None:
            return
        committer = self._committer
        native = self._native
        # what is already fetched, without waiting for a full batch (latency); else wait for one
        started = time.monotonic()
        generation = committer.generation
        room = executor.room
        if room <= 0 and time.monotonic() - self._fetched_at < _KEEPALIVE and executor.wait(wait):
            # concurrent handlers hold their bound: wait for outcomes instead of fetching (the
            # records wait in librdkafka's queue); one record a second keeps the group's poll
            return
        self._fetched_at = time.monotonic()
        size = max(1, min(executor.batch_records or self._batch_size, room))
        batch = Consumer.consume(native, size, 0)
        if not batch:
            if executor.wait(wait):  # concurrent handlers: their outcomes may free work first
                return
            batch = Consumer.consume(native, 1, wait)
        control = self._control
        before = None
        if executor.batch_wait and batch and len(batch) < size:  # a batch handler's batch fills
            control.mark()
            before = control.version  # (a rebalance during the second fetch changes it)
            batch += Consumer.consume(native, size - len(batch), min(executor.batch_wait, wait))
        if committer.generation != generation:
            batch = [m for m in batch if not committer.replayed_since(generation, m)]
        if not batch:
            return
        control.mark()
        version = control.version if before is None else before  # else: checked per record
        fetched = time.monotonic()
        if (
            executor.batch_records
            and control.version == version
            and executor.lean
            and self._admission.plain
            and not self._stop.is_set()
            and outage.current is None
            and not committer.abort_pending
            and self._lean_batch(executor, batch, fetched - started)
        ):
            return
        submit = (
            executor.submit
            if self._claims is None or executor.claims_itself
            else self._claiming(executor)
        )
        claims = self._claims
        if claims is not None and not executor.claims_itself and not self._admission.deserializing:
            # claims in one round trip for the batch; each completion is written when its
            # handler returns (a crash right after a side effect must find it marked done)
            claims.claim_ahead(batch)
            if claims.volatile:  # nothing survives a crash: completions of the batch at once
                claims.defer()
            try:
                handled = self._hand_over(executor, batch, submit, version, fetched, started)
            finally:
                claims.release_ahead()
                claims.flush()
        else:
            handled = self._hand_over(executor, batch, submit, version, fetched, started)
        if handled and not executor.batch_records:  # the next fetch takes about _BATCH_SECONDS
            per_record = max((time.monotonic() - fetched) / handled, 1e-7)
            self._batch_size = max(1, min(_BATCH_MAX, int(_BATCH_SECONDS / per_record)))

    def _hand_over(
        self,
        executor: Any,
        batch: list[Message],
        submit: Any,
        version: int,
        fetched: float,
        started: float,
    ) -> int:
        """Admit a fetched batch's records one by one and submit them; how many were."""
        control = self._control
        stop = self._stop
        committer = self._committer
        outage = self._outage
        admit = self._admit
        watch = self._watch
        producer = self._producer
        metrics = self._metrics
        consumed = metrics.consumed
        replays = committer.replays
        skipped: dict[Key, int] = {}
        handled = 0
        topic, count = "", 0  # handed out and not counted yet: a run of records of one topic
        try:
            for i, msg in enumerate(batch):
                if control.version != version and msg.error() is None:
                    key: Key = (msg.topic(), msg.partition())  # type: ignore[assignment]
                    if control.stopped(key):  # paused, positioned or revoked since the fetch
                        skipped.setdefault(key, msg.offset())  # type: ignore[arg-type]
                        continue
                if (
                    stop.is_set()
                    or committer.abort_pending
                    or outage.current is not None
                    or time.monotonic() - fetched > _BATCH_DEADLINE
                ):
                    self._rewind_skipped(skipped)  # first: they are lower than what follows
                    self._rewind(batch, i, every=False)
                    break
                if msg.error() is not None and not usable(msg):
                    continue
                record = admit(msg)
                if record is None:
                    continue
                record.opens = watch.opens
                if replays:  # exactly-once: output written since it was handed out
                    record.produced = producer.produced
                if record.topic != topic:
                    if count:
                        consumed(topic, count)
                    else:  # the first record handed out: the fetch's duration
                        metrics.poll(record.topic, fetched - started)
                    topic, count = record.topic, 0
                count += 1
                submit(record)
                handled += 1
        finally:
            if count:
                consumed(topic, count)
        executor.collect()
        self._rewind_skipped(skipped)
        return handled

    def _lean_batch(self, executor: Any, batch: list[Message], polled: float) -> bool:
        """run_batches() with one plain handler, when nothing is to be checked per record
        (no event, no retry-tier record, no deserializer, dedup, outage or transaction): the
        fetched batch goes to the handler as it is, and each partition's range is settled at
        once. Records are made one by one only when the handler raises. False: take the
        general path (nothing was done)."""
        if any(map(_error_of, batch)):
            return False
        topics: set[str] = set(map(_topic_of, batch))  # type: ignore[arg-type]
        if not self._tiers.keys().isdisjoint(topics):
            return False
        opens = self._watch.opens
        self._metrics.poll(batch[0].topic(), polled)
        error = executor.handle_now(batch, opens)
        if error is None:
            self._settle.done_batch(batch, topics)
            return True
        records = []
        admit, consumed = self._admit, self._metrics.consumed
        for msg in batch:
            record = admit(msg)
            if record is not None:  # (always, while nothing is checked per record)
                record.opens = opens
                consumed(record.topic)
                records.append(record)
        executor.failed_now(records, error)
        return True


_error_of = Message.error
_topic_of = Message.topic


def real_number(value: object) -> float:
    """A timeout as confluent's C methods read it: anything with ``__float__`` (or
    ``__index__``); otherwise their TypeError."""
    kind = type(value)
    if hasattr(kind, "__float__") or hasattr(kind, "__index__"):
        return float(value)  # type: ignore[arg-type]
    raise TypeError(f"must be real number, not {kind.__name__}")
