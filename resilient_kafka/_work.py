"""Concurrent handling: ``run(handler, concurrency=N)`` on threads or an asyncio event loop.

The polling thread owns everything here: which records wait, which run, each partition's
epoch and backpressure. Workers only call the handler and put the outcome in a mailbox; the
polling thread takes outcomes out (:meth:`WorkManager.collect`), settles them (barrier,
forwards, outages: single-threaded, as with one handler) and starts what each outcome frees.

A record waits behind the one before it of its *shard*:

- ``ordering="key"``: the shard is (partition, key), so a key's records run one at a time in
  offset order while different keys run in parallel; a record with a null key is independent.
- ``"partition"``: the shard is the partition.
- ``"unordered"``: no shard.

Backpressure: a partition whose records queued behind busy shards (a slow key) reach their bound
pauses (reason ``backpressure``) and resumes at half of it, so a slow key stops only its own
partition. Records held in total (running, ready or queued) have a bound of their own: at it,
the loop fetches no more (records stay in librdkafka's own bounded queue) and waits for outcomes
instead, fetching one record a second so that the group still sees it poll. No partition pauses
for that: a pause costs a fetch round trip when it ends.

A revoked partition's work is dropped; outcomes that arrive later carry the epoch of the
assignment they were started under and are ignored.

Dedup: each record's identity is read on the polling thread; the worker claims it before the
handler (a wait for another consumer's claim happens there, never on the polling thread). Two
copies of one message held at once (a retry copy and a redelivery, say) never run together:
the second waits until the first has settled, then finds it done.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import tenacity
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.trace import Status, StatusCode

from resilient_kafka import headers
from resilient_kafka._claims import Verdict
from resilient_kafka._outage import DEDUP_STORE, OutageControl
from resilient_kafka._partitions import BACKPRESSURE, Key, PartitionControl
from resilient_kafka._record import Record
from resilient_kafka._settle import Settlement
from resilient_kafka.breaker import CircuitBreakerError
from resilient_kafka.errors import ConfigurationError, DedupKeyError
from resilient_kafka.policies import RetryPolicy
from resilient_kafka.producer import WRITES

log = logging.getLogger("resilient_kafka.consumer")

ORDERINGS = ("key", "partition", "unordered")

# With work running and nothing fetched, the polling thread waits on the mailbox this long at
# most before it looks at the broker again (a finished record's successor starts at once).
_IDLE_WAIT = 0.005

# (record, epoch, exception or None, seconds in the handler)
Outcome = tuple[Record, int, BaseException | None, float]


class NotStarted(Exception):
    """The outcome of a record a worker skipped: its partition was revoked, or the consumer is
    stopping, before the record's turn came. Not done, not failed: delivered again later."""


_NOT_STARTED = NotStarted()


class Unclaimed(Exception):
    """The outcome of a record its dedup claim kept from the handler (processed before,
    claimed elsewhere, or the store failing)."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.value)
        self.verdict = verdict


def await_running(
    running: Callable[[], int], collect: Callable[[float], None], timeout: float
) -> bool:
    """Apply outcomes (``collect``) until nothing runs: True, or False once ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while running():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        collect(min(left, 0.1))
    return True


def identified(claims: Any, settle: Settlement, record: Record) -> bool:
    """Read ``record``'s dedup identity (on the polling thread) unless known; False if it has
    none (``dedup_key`` raised): then it cannot be processed once and went to the DLQ."""
    if record.identity is None:
        try:
            record.identity = claims.identity(record)
        except DedupKeyError as exc:
            settle.refused(record, exc, headers.NON_RETRYABLE)
            return False
    return True


def check_options(
    concurrency: object,
    ordering: object,
    max_buffered: int | None,
    max_buffered_per_partition: int | None,
) -> tuple[int, int]:
    """Validate ``run()``'s concurrency options; returns the bounds (total, per partition)."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigurationError(f"concurrency must be an integer >= 1, got {concurrency!r}")
    if ordering not in ORDERINGS:
        raise ConfigurationError(
            f"ordering must be one of {', '.join(map(repr, ORDERINGS))}, got {ordering!r}"
        )
    total = max_buffered if max_buffered is not None else min(max(50 * concurrency, 1000), 20_000)
    per_partition = (
        max_buffered_per_partition if max_buffered_per_partition is not None else total // 4
    )
    if isinstance(total, bool) or not isinstance(total, int) or total < concurrency:
        raise ConfigurationError(
            f"max_buffered ({total!r}) must be an integer >= concurrency ({concurrency}): it "
            "counts the records running too"
        )
    if isinstance(per_partition, bool) or not isinstance(per_partition, int) or per_partition < 1:
        raise ConfigurationError(
            f"max_buffered_per_partition must be an integer >= 1, got {per_partition!r}"
        )
    return total, per_partition


class _PartitionWork:
    """One partition's records in the work manager, under the epoch of its assignment."""

    __slots__ = ("epoch", "held", "queued", "running", "shards")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.held = 0  # records waiting or running
        self.queued = 0  # records waiting behind the head of their shard
        self.running = 0
        # shard -> the records waiting behind its head (the head is ready or running)
        self.shards: dict[Any, deque[Record]] = {}


class WorkManager:
    """The executor of ``run()`` with concurrency: queues records by shard, starts them on a
    runner (threads or an event loop) up to ``concurrency`` at once, and applies their
    outcomes on the polling thread."""

    def __init__(
        self,
        runner: Any,
        settle: Settlement,
        control: PartitionControl,
        outage: OutageControl,
        claims: Any,
        metrics: Any,
        *,
        concurrency: int,
        ordering: str,
        max_buffered: int,
        max_buffered_per_partition: int,
        drain_timeout: float,
    ) -> None:
        self._runner = runner
        self.drain_timeout = drain_timeout
        self._mailbox: queue.SimpleQueue[Outcome] = runner.mailbox
        self._settle = settle
        self._control = control
        self._outage = outage
        self._claims = claims
        self._metrics = metrics
        # the runner gets up to twice as many records as it runs at once, so that a worker
        # that finishes takes its next record without waiting for the polling thread
        self._limit = 2 * concurrency
        self._ordering = ordering
        self._max_total = max_buffered
        self._max_partition = max_buffered_per_partition
        self._partitions: dict[Key, _PartitionWork] = {}
        self._epochs = itertools.count(1)
        self._ready: deque[Record] = deque()  # shard heads waiting for a free worker
        self.running = 0
        self.held = 0
        self._paused: set[Key] = set()  # paused here for backpressure
        self._stopping = False
        self._quiet = False  # exactly-once: nothing starts until the transaction commits
        self._claiming: set[str] = set()  # dedup identities of the records started
        self._twins: dict[str, deque[Record]] = {}  # ready records whose identity is started
        # partition -> the lowest offset given back (claimed elsewhere) and not fetched again:
        # a later give-back must not move the partition forward past it
        self._given_back: dict[Key, int] = {}

    claims_itself = True  # a worker claims its record, before the handler
    batch_records = 0  # records per fetch: sized to the handlers' speed (see the loop)
    batch_wait = 0.0

    # -- the executor interface (polling thread) ---------------------------------------------

    @property
    def busy(self) -> bool:
        """Records are waiting or running: outcomes will come."""
        return self.held > 0

    @property
    def room(self) -> int:
        """How many more records may be fetched before the total bound (``max_buffered``)."""
        return self._max_total - self.held

    def submit(self, record: Record) -> None:
        """Queue ``record`` behind its shard, and start it if it may run now."""
        if self._claims is not None and not identified(self._claims, self._settle, record):
            return
        key = record.key
        if self._given_back:
            mark = self._given_back.get(key)
            if mark is not None and record.offset <= mark:
                del self._given_back[key]  # fetched again from there on
        work = self._partitions.get(key)
        if work is None:
            work = self._partitions[key] = _PartitionWork(next(self._epochs))
        work.held += 1
        self.held += 1
        shard = self._shard_of(record)
        if shard is not None:
            waiting = work.shards.get(shard)
            if waiting is not None:
                record.queued_at = time.monotonic()
                waiting.append(record)
                work.queued += 1
                self._bound(key, work)
                return
            work.shards[shard] = deque()
        self._ready.append(record)
        self._start_ready()
        self._bound(key, work)

    def collect(self, timeout: float = 0.0) -> None:
        """Apply the outcomes that arrived (waiting up to ``timeout`` for the first one), then
        start what they freed."""
        mailbox = self._mailbox
        try:
            outcome = mailbox.get(timeout=timeout) if timeout > 0 else mailbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(outcome)
            try:
                outcome = mailbox.get_nowait()
            except queue.Empty:
                break
        if self._outage.current is not None:
            self._refuse_waiting()
        self._start_ready()
        if self._paused:
            for key in list(self._paused):
                work = self._partitions.get(key)
                if work is not None:
                    self._bound(key, work)

    def wait(self, timeout: float) -> bool:
        """Nothing was fetched: wait for an outcome instead, so a successor starts at once
        (with every worker busy, as long as ``timeout``; else briefly, then the broker's turn).
        False when nothing is running (nothing to wait for here)."""
        if not self.running:
            return False
        self.collect(timeout if self._ready else min(timeout, _IDLE_WAIT))
        return True

    def gauges(self) -> tuple[int, dict[Key, int], int]:
        """(records running, records held per partition, the longest queue behind a shard)."""
        held = {key: work.held for key, work in self._partitions.items() if work.held}
        backlog = max(
            (len(q) for work in self._partitions.values() for q in work.shards.values()),
            default=0,
        )
        return self.running, held, backlog

    # -- outcomes ----------------------------------------------------------------------------

    def _apply(self, outcome: Outcome) -> None:
        record, epoch, exc, seconds = outcome
        self.running -= 1
        if record.identity is not None:
            self._claimed(record.identity)
        key = record.key
        work = self._partitions.get(key)
        if work is None or work.epoch != epoch:  # its partition was revoked meanwhile
            _end_span(record)
            if record.claim is not None:
                if exc is None:  # its side effect happened: never again, whoever owns it now
                    self._claims.complete(record)
                else:
                    self._claims.release(record)
            log.debug("dropping the late outcome of %r (partition revoked)", record)
            return
        work.running -= 1
        metrics = self._metrics
        if isinstance(exc, NotStarted) or (
            isinstance(exc, asyncio.CancelledError) and self._stopping
        ):
            # skipped, or its task was cancelled while stopping: not done, not failed; its
            # offset stays uncommitted and it is delivered again after a restart
            if record.claim is not None:
                self._claims.release(record)
        elif exc is None:
            metrics.process(record.topic, seconds, "")
            self._settle.done(record)
        elif isinstance(exc, Unclaimed):
            self._unclaimed(record, exc.verdict)
        else:
            metrics.process(record.topic, seconds, headers.exception_type(exc))
            self._settle.failed(record, exc)
        _end_span(record)
        self._finished(record, key, work)

    def _claimed(self, identity: str) -> None:
        """The record started under ``identity`` settled: a twin waiting for it may start."""
        self._claiming.discard(identity)
        twins = self._twins.get(identity)
        if twins:
            self._ready.append(twins.popleft())
            if not twins:
                del self._twins[identity]

    def _unclaimed(self, record: Record, verdict: Verdict) -> None:
        settle = self._settle
        if verdict is Verdict.DUPLICATE:
            settle.duplicate(record)
        elif verdict is Verdict.HOLD:
            settle.held(record, DEDUP_STORE)  # an outage: what waits is given back
        else:  # claimed elsewhere past the wait: its partition rewinds to it, or lower
            key = record.key
            lowest = min(
                offset
                for offset in (
                    record.offset,
                    self._drop_waiting([key]).get(key),
                    self._given_back.get(key),
                )
                if offset is not None
            )
            self._given_back[key] = lowest
            self._control.rewind(key, lowest)
            settle.later(record)

    def _finished(self, record: Record, key: Key, work: _PartitionWork) -> None:
        """``record`` left the work manager: the next of its shard becomes ready."""
        work.held -= 1
        self.held -= 1
        shard = self._shard_of(record)
        if shard is not None:
            waiting = work.shards.get(shard)
            if waiting:
                successor = waiting.popleft()
                self._metrics.key_wait(successor.topic, time.monotonic() - successor.queued_at)
                self._ready.append(successor)
                work.queued -= 1
            else:
                work.shards.pop(shard, None)
        if work.held == 0 and key not in self._paused and key not in self._control.assigned:
            del self._partitions[key]

    def _start_ready(self) -> None:
        ready = self._ready
        if not ready or self._stopping or self._quiet:
            return
        outage = self._outage
        start = self._runner.start
        partitions = self._partitions
        while ready and self.running < self._limit:
            record = ready[0]
            if outage.current is not None and not self._may_start_in_outage(record):
                break
            ready.popleft()
            identity = record.identity
            if identity is not None:
                if identity in self._claiming:  # its twin runs: it waits for its outcome
                    self._twins.setdefault(identity, deque()).append(record)
                    continue
                self._claiming.add(identity)
            work = partitions[record.key]
            work.running += 1
            self.running += 1
            start(record, work.epoch)

    def _may_start_in_outage(self, record: Record) -> bool:
        current = self._outage.current
        return (
            current is None
            or record.key not in current.partitions
            or (self._outage.is_probe(record))
        )

    def _shard_of(self, record: Record) -> Any:
        ordering = self._ordering
        if ordering == "key":
            raw = record.raw
            return raw[0] if raw is not None else record.msg.key()
        if ordering == "partition":
            return ()
        return None

    # -- backpressure ------------------------------------------------------------------------

    def _bound(self, key: Key, work: _PartitionWork) -> None:
        if key in self._paused:
            if work.queued <= self._max_partition // 2:
                self._paused.discard(key)
                self._control.release([key], BACKPRESSURE)
        elif work.queued >= self._max_partition:
            self._paused.add(key)
            self._control.pause([key], BACKPRESSURE)

    # -- outages, revocation, shutdown ---------------------------------------------------------

    def _refuse_waiting(self) -> None:
        """An outage holds these partitions: records not started yet are given back (their
        partition rewinds to the lowest, as for a record the breaker refused)."""
        current = self._outage.current
        assert current is not None
        lowest = self._drop_waiting(current.partitions, keep_probe=True)
        for key, offset in lowest.items():
            self._outage.refused(key, offset)

    def _drop_waiting(self, keys: Iterable[Key], *, keep_probe: bool = False) -> dict[Key, int]:
        """Forget the records of ``keys`` that have not started (their dedup claims are
        released); returns each partition's lowest such offset."""
        keys = set(keys) & set(self._partitions)
        lowest: dict[Key, int] = {}
        if not keys:
            return lowest
        dropped: list[Record] = []
        kept: deque[Record] = deque()
        twins = [r for waiting in self._twins.values() for r in waiting]
        twin_ids = {id(r) for r in twins}
        for record in [*self._ready, *twins]:
            if record.key in keys and not (keep_probe and self._outage.is_probe(record)):
                dropped.append(record)
                shard = self._shard_of(record)
                work = self._partitions[record.key]
                if shard is not None:
                    behind = work.shards.pop(shard, ())
                    dropped.extend(behind)
                    work.queued -= len(behind)
            elif id(record) in twin_ids:
                continue
            else:
                kept.append(record)
        self._ready = kept
        if twins:
            gone = {id(r) for r in dropped}
            for identity in list(self._twins):
                left = deque(r for r in self._twins[identity] if id(r) not in gone)
                if left:
                    self._twins[identity] = left
                else:
                    del self._twins[identity]
        is_probe = self._outage.is_probe
        for key in keys:
            work = self._partitions[key]
            for waiting in work.shards.values():
                for record in waiting:
                    if not (keep_probe and is_probe(record)):  # a trial waits for its turn
                        dropped.append(record)
                kept_here = [r for r in waiting if keep_probe and is_probe(r)]
                work.queued -= len(waiting) - len(kept_here)
                waiting.clear()
                waiting.extend(kept_here)
        for record in dropped:
            work = self._partitions[record.key]
            work.held -= 1
            self.held -= 1
            if record.claim is not None:
                self._claims.release(record)
            if record.key not in lowest or record.offset < lowest[record.key]:
                lowest[record.key] = record.offset
        return lowest

    def revoke(self, keys: Iterable[Key], *, lost: bool) -> None:
        """``keys`` are being revoked (or were ``lost``): records not started are dropped,
        running ones are awaited up to ``drain_timeout`` (not when lost: another member owns
        them), their outcomes applied so that their offsets commit with the revocation; late
        outcomes are ignored from then on."""
        keys = set(keys) & set(self._partitions)
        if not keys:
            return
        self._drop_waiting(keys)
        self._runner.cancelled.update(self._partitions[key].epoch for key in keys)
        timeout = 0.0 if lost else self.drain_timeout
        deadline = time.monotonic() + timeout
        while any(self._partitions[k].running for k in keys if k in self._partitions):
            left = deadline - time.monotonic()
            if left <= 0:
                if lost:  # not awaited: another member owns them now
                    break
                running = sum(self._partitions[k].running for k in keys if k in self._partitions)
                log.warning(
                    "%d record(s) of revoked partitions still running after %.0fs: their "
                    "offsets are not committed (the new owner handles them again)",
                    running,
                    timeout,
                )
                break
            self.collect(min(left, 0.1))
        for key in keys:
            self._given_back.pop(key, None)
            work = self._partitions.pop(key, None)
            if work is not None:
                self.held -= work.held
            if key in self._paused:
                self._paused.discard(key)  # partition control forgets revoked partitions

    # -- exactly-once: transactions commit with no handler running -----------------------------

    def quiesce(self) -> bool:
        """Start nothing more until :meth:`resume`; True once no handler runs."""
        self._quiet = True
        return self.running == 0

    def drain(self) -> bool:
        """:meth:`quiesce`, waiting up to ``drain_timeout`` for the running handlers."""
        self._quiet = True
        return await_running(lambda: self.running, self.collect, self.drain_timeout)

    def resume(self) -> None:
        self._quiet = False
        self._start_ready()

    def replayed(self) -> None:
        """The aborted transaction is replayed from the last commit: every partition rewinds,
        so nothing held here is kept, and outcomes still to come are ignored."""
        paused = list(self._paused)
        self.revoke(list(self._partitions), lost=True)
        if paused:
            self._control.release(paused, BACKPRESSURE)

    def shutdown(self) -> None:
        """Stop starting records; wait up to ``drain_timeout`` for the running ones (outcomes
        applied); what never started is dropped (delivered again after a restart)."""
        timeout = self.drain_timeout
        self._stopping = True
        self._runner.stopping = True  # what the runner holds but has not started is skipped
        self._drop_waiting(list(self._partitions))
        if not await_running(lambda: self.running, self.collect, timeout):
            log.warning(
                "%d record(s) still running after %.0fs at shutdown: their offsets are not "
                "committed (delivered again after a restart)",
                self.running,
                timeout,
            )
        self._runner.close()


def _end_span(record: Record) -> None:
    span = record.span
    if span is not None:
        span.end()
        record.span = None


# -- calling the handler ------------------------------------------------------------------------


class Attempts:
    """How a worker calls the handler: blocking retries in place first (when the policy has
    them), a ``process`` span when traced. Each worker has its own (tenacity keeps per-call
    state)."""

    def __init__(
        self,
        retry: RetryPolicy,
        outage: OutageControl,
        stop: threading.Event,
        metrics: Any,
        tracing: Any,
        group: str,
        parent_on_creation: bool,
        claims: Any = None,
        transactional: bool = False,
    ) -> None:
        self.retry = retry
        self.claims = claims
        self.transactional = transactional  # count each handler's output (exactly-once)
        self._outage = outage
        self.stop = stop
        self._metrics = metrics
        self._tracing = tracing
        self._group = group
        self._parent_on_creation = parent_on_creation

    def claim(self, record: Record) -> BaseException | None:
        """Claim ``record`` in the dedup store (waiting, if another consumer holds it, up to
        its lease): None to run the handler, else the outcome to report instead."""
        identity = record.identity
        if identity is None or record.claim is not None:
            return None
        try:
            verdict = self.claims.claim(record, identity)
        except Exception as exc:  # a custom store's bug: the record fails, is not lost
            return exc
        return None if verdict is Verdict.RUN else Unclaimed(verdict)

    def in_place(self, record: Record, exc: BaseException) -> bool:
        """Whether a failure of ``record`` is retried right here: retryable, not stopping, and
        no breaker refused it or opened since it was handed out."""
        writes = record.writes
        return (
            not self.stop.is_set()
            and not isinstance(exc, CircuitBreakerError)
            and self._outage.watch.opens == record.opens
            and not (writes is not None and writes[0])  # its output is in the transaction
            and self.retry.is_retryable(exc)
        )

    def noted(self, record: Record, state: Any) -> None:
        if state.outcome is not None:
            exc = state.outcome.exception()
            error_type = headers.exception_type(exc) if exc is not None else ""
            self._metrics.retry(record.topic, "blocking", error_type)

    def start_span(self, record: Record) -> Any:
        """The record's ``process`` span (ended by the polling thread once settled, so that its
        retry/DLQ copy is its child), or None when not traced."""
        if self._tracing is None:
            return None
        span = self._tracing.start_process(
            record.msg, self._group, parent_on_creation=self._parent_on_creation
        )
        record.span = span
        return span


def _failed_span(span: Any, exc: BaseException) -> None:
    span.set_attribute("error.type", headers.exception_type(exc))
    span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
    span.record_exception(exc)
    if isinstance(exc, CircuitBreakerError):
        span.add_event("resilient_kafka.circuit_breaker.rejected")


class ThreadRunner:
    """``concurrency`` daemon threads taking records from a queue."""

    def __init__(self, handler: Callable[[Any], object], attempts: Attempts, size: int) -> None:
        self.mailbox: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self.cancelled: set[int] = set()  # epochs whose records are skipped (revoked)
        self.stopping = False  # skip every record not started yet
        self._jobs: queue.SimpleQueue[tuple[Record, int] | None] = queue.SimpleQueue()
        self._handler = handler
        self._attempts = attempts
        self._threads = [
            threading.Thread(target=self._work, name=f"resilient-kafka-worker-{i}", daemon=True)
            for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def start(self, record: Record, epoch: int) -> None:
        self._jobs.put((record, epoch))

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)

    def _work(self) -> None:
        attempts = self._attempts
        handler = self._handler
        retry = attempts.retry
        current: list[Record] = []
        blocking = None
        if retry.blocking:
            blocking = tenacity.Retrying(
                stop=retry.blocking_stop,
                wait=retry.blocking_wait or tenacity.wait_none(),
                retry=tenacity.retry_if_exception(lambda e: attempts.in_place(current[0], e)),
                sleep=attempts.stop.wait,  # type: ignore[arg-type]
                reraise=True,
                before_sleep=lambda state: attempts.noted(current[0], state),
            )
        jobs, mailbox = self._jobs, self.mailbox
        monotonic = time.monotonic
        transactional = attempts.transactional
        while True:
            job = jobs.get()
            if job is None:
                return
            record, epoch = job
            if self.stopping or epoch in self.cancelled:
                mailbox.put((record, epoch, _NOT_STARTED, 0.0))
                continue
            if record.identity is not None:
                unclaimed = attempts.claim(record)
                if unclaimed is None and (self.stopping or epoch in self.cancelled):
                    unclaimed = _NOT_STARTED  # revoked while it waited for its claim
                if unclaimed is not None:
                    mailbox.put((record, epoch, unclaimed, 0.0))
                    continue
            span = attempts.start_span(record)
            token = (
                otel_context.attach(otel_trace.set_span_in_context(span))
                if span is not None
                else None
            )
            written = None
            if transactional:
                record.writes = counter = [0]
                written = WRITES.set(counter)
            started = monotonic()
            error: BaseException | None = None
            try:
                if blocking is None:
                    handler(record.msg)
                else:
                    current[:] = [record]
                    blocking(handler, record.msg)
            except BaseException as exc:  # SystemExit too: the record must report back
                error = exc
                if span is not None:
                    _failed_span(span, exc)
            else:
                if span is not None:
                    span.set_attribute("resilient_kafka.outcome", "success")
            finally:
                if token is not None:
                    otel_context.detach(token)
                if written is not None:
                    WRITES.reset(written)
            mailbox.put((record, epoch, error, monotonic() - started))


class AsyncRunner:
    """Records as tasks on an event loop: the application's (``run_async``) or one of its own
    on a daemon thread (``run`` with an ``async def`` handler)."""

    def __init__(
        self,
        handler: Callable[[Any], Any],
        attempts: Attempts,
        size: int,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.mailbox: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self.cancelled: set[int] = set()  # epochs whose records are skipped (revoked)
        self.stopping = False  # skip every record not started yet
        self._handler = handler
        self._attempts = attempts
        self._size = size  # tasks at once
        self._active = 0  # (event loop thread)
        self._queue: deque[tuple[Record, int]] = deque()  # (event loop thread) to start
        self._pending: deque[tuple[Record, int]] = deque()  # handed over by the polling thread
        self._scheduled = False
        self._tasks: dict[asyncio.Task[None], tuple[Record, int]] = {}  # not reported yet
        self._thread: threading.Thread | None = None
        if loop is None:
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=loop.run_forever, name="resilient-kafka-event-loop", daemon=True
            )
            self._thread.start()
        self._loop = loop

    def start(self, record: Record, epoch: int) -> None:
        self._pending.append((record, epoch))
        if not self._scheduled:  # one wake-up of the loop per burst, not per record
            self._scheduled = True
            self._loop.call_soon_threadsafe(self._start_pending)

    def _start_pending(self) -> None:
        self._scheduled = False
        pending, queued = self._pending, self._queue
        while pending:
            queued.append(pending.popleft())
        self._fill()

    def _fill(self) -> None:
        """(Event loop thread) start queued records while fewer than ``size`` run."""
        queued = self._queue
        create = self._loop.create_task
        tasks = self._tasks
        while queued and self._active < self._size:
            record, epoch = queued.popleft()
            if self.stopping or epoch in self.cancelled:
                self.mailbox.put((record, epoch, _NOT_STARTED, 0.0))
                continue
            self._active += 1
            task = create(self._one(record, epoch))
            tasks[task] = (record, epoch)
            task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        job = self._tasks.pop(task, None)
        if job is not None:  # cancelled before its first step: it must still report
            self.mailbox.put((job[0], job[1], asyncio.CancelledError(), 0.0))
        self._active -= 1
        self._fill()

    async def _one(self, record: Record, epoch: int) -> None:
        attempts = self._attempts
        if record.identity is not None:  # the store is blocking I/O: off the event loop
            unclaimed = await asyncio.get_running_loop().run_in_executor(
                None, attempts.claim, record
            )
            if unclaimed is None and (self.stopping or epoch in self.cancelled):
                unclaimed = _NOT_STARTED  # revoked while it waited for its claim
            if unclaimed is not None:
                task = asyncio.current_task()
                if task is not None:
                    self._tasks.pop(task, None)
                self.mailbox.put((record, epoch, unclaimed, 0.0))
                return
        span = attempts.start_span(record)
        token = (
            otel_context.attach(otel_trace.set_span_in_context(span)) if span is not None else None
        )
        if attempts.transactional:  # the task's own context: counts only this handler's output
            record.writes = counter = [0]
            WRITES.set(counter)
        started = time.monotonic()
        error: BaseException | None = None
        try:
            await self._call(record)
        except BaseException as exc:  # a cancelled task reports back too (see WorkManager)
            error = exc
            if span is not None:
                _failed_span(span, exc)
        else:
            if span is not None:
                span.set_attribute("resilient_kafka.outcome", "success")
        finally:
            if token is not None:
                otel_context.detach(token)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.pop(task, None)  # reported here, not by _ended
        self.mailbox.put((record, epoch, error, time.monotonic() - started))

    async def _call(self, record: Record) -> None:
        attempts = self._attempts
        retry = attempts.retry
        if not retry.blocking:
            await self._handler(record.msg)
            return
        async for attempt in tenacity.AsyncRetrying(
            stop=retry.blocking_stop,
            wait=retry.blocking_wait or tenacity.wait_none(),
            retry=tenacity.retry_if_exception(lambda e: attempts.in_place(record, e)),
            reraise=True,
            before_sleep=lambda state: attempts.noted(record, state),
        ):
            with attempt:
                await self._handler(record.msg)

    def close(self) -> None:
        if self._thread is not None:
            loop = self._loop
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(5)
            if not loop.is_running():
                loop.close()
