"""Batch handlers: ``run_batches(handler)`` hands the handler a list of records at a time.

The handler returning means every record is done. :class:`~resilient_kafka.BatchFailed`
names the records that failed (and why): those follow the retry policy one by one, the others
are done. Any other exception says only that something failed: the batch is split in halves
and each half handed over again (left first, so order holds), down to the single records that
fail on their own, which then follow the retry policy. Good records are never retried or
dead-lettered for a bad neighbour, and one poison record in a batch of 500 costs about 18
extra calls, not 500. A breaker that refuses (or opens meanwhile) and a batch whose output is
already in the open transaction are not split: every record still unresolved gets the
exception (an outage holds them, exactly-once aborts and replays).

The polling thread owns the batches: records wait in *lanes* (``ordering``): with one handler
at a time a single lane, so a batch is whatever one fetch brought, across partitions; with
``concurrency`` > 1, ``"partition"`` gives each partition its own lane, ``"key"`` splits each
partition in ``concurrency`` lanes by key (a key's records stay in order), ``"unordered"`` is
one lane any number of batches take from at once. A lane runs one batch at a time. Workers call
the handler and put each batch's outcomes in a mailbox; the polling thread settles them.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import tenacity

from resilient_kafka import headers
from resilient_kafka._claims import Verdict
from resilient_kafka._outage import DEDUP_STORE, OutageControl
from resilient_kafka._partitions import Key, PartitionControl
from resilient_kafka._record import Record
from resilient_kafka._settle import Settlement
from resilient_kafka._work import NotStarted, Unclaimed, await_running, identified
from resilient_kafka.breaker import CircuitBreakerError
from resilient_kafka.errors import BatchFailed, ConfigurationError
from resilient_kafka.policies import RetryPolicy
from resilient_kafka.producer import WRITES

log = logging.getLogger("resilient_kafka.consumer")

# what a record of a batch came to: None (done), the exception it failed with, Unclaimed (its
# dedup claim kept it from the handler) or NotStarted (stopping or revoked before its turn)
Outcome = BaseException | None
# (records, their partitions' epochs, outcomes, seconds in the handler)
Report = tuple[list[Record], list[int], list[Outcome], float]

_NOT_STARTED = NotStarted()


def check_batch_options(max_records: object, max_wait: object) -> tuple[int, float]:
    if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 1:
        raise ConfigurationError(f"max_records must be an integer >= 1, got {max_records!r}")
    if (
        isinstance(max_wait, bool)
        or not isinstance(max_wait, int | float)
        or not 0 <= max_wait <= 60
    ):
        raise ConfigurationError(f"max_wait must be seconds between 0 and 60, got {max_wait!r}")
    return max_records, float(max_wait)


# -- finding the failing records ----------------------------------------------------------------


def _named(exc: BatchFailed, part: Sequence[Record]) -> list[Outcome] | None:
    """The outcomes ``exc`` names for ``part`` (by message or by index), or None when it names
    something that is not in it (then it says no more than any other exception)."""
    outcomes: list[Outcome] = [None] * len(part)
    where = {id(record.msg): i for i, record in enumerate(part)}
    for which, error in exc.failures:
        if isinstance(which, int) and not isinstance(which, bool):
            i = which if 0 <= which < len(part) else None
        else:
            i = where.get(id(which))
        if i is None or not isinstance(error, BaseException):
            log.error(
                "BatchFailed names a record that is not in the batch (%r); finding the "
                "failing ones by handing the batch over again in halves",
                which,
            )
            return None
        outcomes[i] = error
    return outcomes


class FailureSearch:
    """Which records of a batch failed: :meth:`after` is told what handing over the last part
    raised (None: it returned) and answers the next part to hand over, None once every
    record's outcome (in :attr:`outcomes`) is known. The first part is the whole batch.
    ``systemic(exc)``: an exception that splitting cannot help (every record still unresolved
    gets it)."""

    def __init__(self, records: list[Record], systemic: Callable[[BaseException], bool]) -> None:
        self.records = records
        self.outcomes: list[Outcome] = [None] * len(records)
        self._systemic = systemic
        self._todo: list[tuple[int, int]] = []  # ranges still to hand over, the leftmost last
        self._part = (0, len(records))

    def first(self) -> list[Record]:
        return self.records

    def abandon(self, outcome: Outcome) -> None:
        """Give every record not known yet (the last part handed out, and what waits) this
        outcome."""
        lo, hi = self._part
        self.outcomes[lo:hi] = [outcome] * (hi - lo)
        for left, right in self._todo:
            self.outcomes[left:right] = [outcome] * (right - left)
        self._todo.clear()

    def after(self, exc: BaseException | None) -> list[Record] | None:
        lo, hi = self._part
        outcomes, todo = self.outcomes, self._todo
        if exc is not None:
            named = _named(exc, self.records[lo:hi]) if isinstance(exc, BatchFailed) else None
            if named is not None:
                outcomes[lo:hi] = named
            elif hi - lo == 1:
                outcomes[lo] = exc
            elif self._systemic(exc):
                outcomes[lo:hi] = [exc] * (hi - lo)
                for left, right in todo:
                    outcomes[left:right] = [exc] * (right - left)
                todo.clear()
            else:
                middle = (lo + hi) // 2
                todo.append((middle, hi))
                todo.append((lo, middle))
        if not todo:
            return None
        lo, hi = self._part = todo.pop()
        return self.records[lo:hi]


class BatchCalls:
    """How a batch is handled on a worker (or the polling thread): dedup claims first, then
    the handler, split as :class:`FailureSearch` says, each call retried in place when the
    retry policy has blocking retries. One per worker (tenacity keeps per-call state)."""

    def __init__(
        self,
        handler: Callable[[list[Any]], Any],
        retry: RetryPolicy,
        outage: OutageControl,
        stop: threading.Event,
        metrics: Any,
        claims: Any,
        transactional: bool,
        cancelled: set[int],
        wrote: Callable[[Record], bool],
    ) -> None:
        self._handler = handler
        self._wrote = wrote  # exactly-once: the open transaction holds the record's output
        self._retry = retry
        self._outage = outage
        self._stop = stop
        self._metrics = metrics
        self._claims = claims
        self._transactional = transactional
        self._cancelled = cancelled
        # what the call in progress was handed: (breaker openings before it, its first record)
        self._current: tuple[int, Record | None] = (0, None)
        self._call: Callable[[list[Any]], Any] = handler
        if retry.blocking and not asyncio.iscoroutinefunction(handler):
            blocking = tenacity.Retrying(
                stop=retry.blocking_stop,
                wait=retry.blocking_wait or tenacity.wait_none(),
                retry=tenacity.retry_if_exception(self._in_place),
                sleep=stop.wait,  # type: ignore[arg-type]
                reraise=True,
                before_sleep=self._noted,
            )
            self._call = functools.partial(blocking, handler)

    def claim(self, records: list[Record], epochs: list[int]) -> list[Outcome | bool]:
        """True for each record claimed (or without identity), else its outcome."""
        claims = self._claims
        out: list[Outcome | bool] = []
        todo = [r for r in records if r.identity is not None and r.claim is None]
        try:  # (a batch never holds two records of one identity)
            verdicts = iter(claims.claim_many(todo, [r.identity for r in todo]))
        except Exception as exc:  # a custom store's bug: the records fail, are not lost
            return [exc if r.identity is not None and r.claim is None else True for r in records]
        for record, epoch in zip(records, epochs, strict=True):
            if record.identity is None or record.claim is not None:
                out.append(True)
                continue
            verdict = next(verdicts)
            if verdict is not Verdict.RUN:
                out.append(Unclaimed(verdict))
            elif self._stop.is_set() or epoch in self._cancelled:
                out.append(_NOT_STARTED)  # revoked while it waited for its claim
            else:
                out.append(True)
        return out

    def _systemic(self, exc: BaseException) -> bool:
        """Splitting cannot help: a breaker refused or opened, stopping, or output written."""
        opens, first = self._current
        return (
            isinstance(exc, CircuitBreakerError)
            or self._outage.watch.opens != opens
            or (first is not None and self._wrote(first))
        )

    def _in_place(self, exc: BaseException) -> bool:
        opens, first = self._current
        return (
            not isinstance(exc, BatchFailed | CircuitBreakerError)
            and not self._stop.is_set()
            and self._outage.watch.opens == opens
            and not (first is not None and self._wrote(first))
            and self._retry.is_retryable(exc)
        )

    def _noted(self, state: Any) -> None:
        first = self._current[1]
        if state.outcome is not None and first is not None:
            exc = state.outcome.exception()
            error_type = headers.exception_type(exc) if exc is not None else ""
            self._metrics.retry(first.topic, "blocking", error_type)

    def prepare(
        self, records: list[Record], epochs: list[int]
    ) -> tuple[list[Outcome], list[int], Any]:
        """Claims and the exactly-once output counter: the outcomes so far (None where the
        handler is to run), the indexes it runs for, the counter (reset it after)."""
        outcomes: list[Outcome] = [None] * len(records)
        run = list(range(len(records)))
        if self._claims is not None:
            claimed = self.claim(records, epochs)
            run = []
            for i, verdict in enumerate(claimed):
                if verdict is True:
                    run.append(i)
                else:
                    outcomes[i] = verdict  # type: ignore[assignment]
        token = None
        if self._transactional:
            counter = [0]
            for record in records:
                record.writes = counter
            token = WRITES.set(counter)
        return outcomes, run, token

    def call(self, msgs: list[Any], opens: int, first: Record | None) -> BaseException | None:
        """Hand ``msgs`` over (retried in place as the policy says); what it raised."""
        self._current = (opens, first)
        try:
            self._call(msgs)
        except Exception as exc:
            return exc
        return None

    def handle(self, records: list[Record], error: BaseException | None = None) -> list[Outcome]:
        """Each record's outcome, calling the handler as often as it takes to know them;
        ``error``: what handing over all of ``records`` already raised."""
        search = FailureSearch(records, self._systemic)
        opens = records[0].opens
        if error is None:
            error = self.call([record.msg for record in records], opens, records[0])
        else:
            self._current = (opens, records[0])
        part = search.after(error)
        while part is not None:
            if self._stop.is_set():  # stopping: what is not known yet comes again after
                search.abandon(_NOT_STARTED)
                break
            part = search.after(self.call([record.msg for record in part], opens, part[0]))
        return search.outcomes

    async def handle_async(self, records: list[Record]) -> list[Outcome]:
        """:meth:`handle` for an ``async def`` handler."""
        search = FailureSearch(records, self._systemic)
        opens = records[0].opens
        part: list[Record] | None = records
        while part is not None:
            self._current = (opens, part[0])
            try:
                await self._call_async(part)
            except Exception as exc:
                part = search.after(exc)
            else:
                part = search.after(None)
        return search.outcomes

    async def _call_async(self, part: list[Record]) -> None:
        retry = self._retry
        msgs = [record.msg for record in part]
        if not retry.blocking:
            await self._handler(msgs)
            return
        async for attempt in tenacity.AsyncRetrying(
            stop=retry.blocking_stop,
            wait=retry.blocking_wait or tenacity.wait_none(),
            retry=tenacity.retry_if_exception(self._in_place),
            reraise=True,
            before_sleep=self._noted,
        ):
            with attempt:
                await self._handler(msgs)


def _merge(outcomes: list[Outcome], run: list[int], handled: list[Outcome]) -> None:
    for i, outcome in zip(run, handled, strict=True):
        outcomes[i] = outcome


# -- runners: where batches are handled ----------------------------------------------------------


class InlineBatchRunner:
    """Handles a batch on the polling thread, at once (one plain handler at a time)."""

    def __init__(self, calls: BatchCalls) -> None:
        self.mailbox: queue.SimpleQueue[Report] = queue.SimpleQueue()
        self.cancelled: set[int] = set()
        self.stopping = False
        self.calls = calls  # the executor's lean path calls the handler through it too

    def start(self, records: list[Record], epochs: list[int]) -> None:
        calls = self.calls
        outcomes, run, token = calls.prepare(records, epochs)
        started = time.monotonic()
        try:
            if run:
                part = records if len(run) == len(records) else [records[i] for i in run]
                _merge(outcomes, run, calls.handle(part))
        finally:
            if token is not None:
                WRITES.reset(token)
        self.mailbox.put((records, epochs, outcomes, time.monotonic() - started))

    def close(self) -> None:
        """Nothing runs elsewhere."""


class ThreadBatchRunner:
    """``size`` daemon threads taking batches from a queue."""

    def __init__(self, calls: Callable[[], BatchCalls], size: int) -> None:
        self.mailbox: queue.SimpleQueue[Report] = queue.SimpleQueue()
        self.cancelled: set[int] = set()
        self.stopping = False
        self._jobs: queue.SimpleQueue[tuple[list[Record], list[int]] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(
                target=self._work, args=(calls(),), name=f"resilient-kafka-batch-{i}", daemon=True
            )
            for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def start(self, records: list[Record], epochs: list[int]) -> None:
        self._jobs.put((records, epochs))

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)

    def _work(self, calls: BatchCalls) -> None:
        jobs, mailbox = self._jobs, self.mailbox
        while True:
            job = jobs.get()
            if job is None:
                return
            records, epochs = job
            if self.stopping or any(epoch in self.cancelled for epoch in epochs):
                mailbox.put((records, epochs, [_NOT_STARTED] * len(records), 0.0))
                continue
            started = time.monotonic()
            outcomes: list[Outcome] = [None] * len(records)
            token = None
            try:
                outcomes, run, token = calls.prepare(records, epochs)
                if run:
                    _merge(outcomes, run, calls.handle([records[i] for i in run]))
            except BaseException as exc:  # SystemExit too: every record must report back
                outcomes = [exc if o is None else o for o in outcomes]
            finally:
                if token is not None:
                    WRITES.reset(token)
            mailbox.put((records, epochs, outcomes, time.monotonic() - started))


class AsyncBatchRunner:
    """Batches as tasks on an event loop: the application's or one of its own on a thread."""

    def __init__(
        self, calls: Callable[[], BatchCalls], loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self.mailbox: queue.SimpleQueue[Report] = queue.SimpleQueue()
        self.cancelled: set[int] = set()
        self.stopping = False
        self._calls = calls  # one per batch: tasks interleave, each call keeps its own state
        self._thread: threading.Thread | None = None
        if loop is None:
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=loop.run_forever, name="resilient-kafka-event-loop", daemon=True
            )
            self._thread.start()
        self._loop = loop
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, records: list[Record], epochs: list[int]) -> None:
        self._loop.call_soon_threadsafe(self._create, records, epochs)

    def _create(self, records: list[Record], epochs: list[int]) -> None:
        task = self._loop.create_task(self._one(records, epochs))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _one(self, records: list[Record], epochs: list[int]) -> None:
        calls = self._calls()
        if self.stopping or any(epoch in self.cancelled for epoch in epochs):
            self.mailbox.put((records, epochs, [_NOT_STARTED] * len(records), 0.0))
            return
        started = time.monotonic()
        outcomes: list[Outcome] = [None] * len(records)
        token = None
        try:
            # the dedup store is blocking I/O: off the event loop
            loop = asyncio.get_running_loop()
            outcomes, run, token = await loop.run_in_executor(None, calls.prepare, records, epochs)
            if token is not None:  # set in the executor's thread: set again in this task
                WRITES.set(records[0].writes)
            if run:
                part = [records[i] for i in run]
                _merge(outcomes, run, await calls.handle_async(part))
        except BaseException as exc:  # cancelled too: every record must report back
            outcomes = [exc if o is None else o for o in outcomes]
        self.mailbox.put((records, epochs, outcomes, time.monotonic() - started))

    def close(self) -> None:
        if self._thread is not None:
            loop = self._loop
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(5)
            if not loop.is_running():
                loop.close()


# -- the executor: lanes and outcomes, on the polling thread ---------------------------------------


class BatchExecutor:
    """The executor of ``run_batches()``: records wait in lanes, a lane's next batch starts
    when the one before it settled, up to ``concurrency`` batches at once."""

    claims_itself = True  # a batch's records are claimed together, before the handler

    def __init__(
        self,
        runner: Any,
        settle: Settlement,
        control: PartitionControl,
        outage: OutageControl,
        claims: Any,
        metrics: Any,
        *,
        max_records: int,
        max_wait: float,
        concurrency: int,
        ordering: str,
        max_buffered: int,
        drain_timeout: float,
    ) -> None:
        self._runner = runner
        self._inline_runner = isinstance(runner, InlineBatchRunner)
        self._inline = self._inline_runner and claims is None
        self._calls: BatchCalls = getattr(runner, "calls", None)  # type: ignore[assignment]
        self._mailbox: queue.SimpleQueue[Report] = runner.mailbox
        self._settle = settle
        self._control = control
        self._outage = outage
        self._claims = claims
        self._metrics = metrics
        self.batch_records = max_records  # the loop fetches this many at a time
        self.batch_wait = max_wait  # and waits this long for a batch to fill
        self._concurrency = concurrency
        self._ordering = ordering if concurrency > 1 else "one"
        self._max_total = max(max_buffered, max_records)
        self.drain_timeout = drain_timeout
        self._lanes: dict[Any, deque[Record]] = {}  # lane -> records waiting, in order
        self._busy: set[Any] = set()  # lanes with a batch running
        self._epochs: dict[Key, int] = {}  # partition -> the epoch of its assignment
        self._next_epoch = itertools.count(1)
        self._claiming: set[str] = set()  # dedup identities in a batch started or waiting
        self._inflight: dict[Key, int] = {}  # partition -> its records in running batches
        self.running = 0  # batches
        self.held = 0  # records waiting or running
        self._quiet = False  # exactly-once: nothing starts until the transaction commits
        self._stopping = False

    # -- the lean path: one plain handler, nothing to check per record --------------------------

    @property
    def lean(self) -> bool:
        """Batches may be handed over straight from the fetch (see :meth:`Loop._lean_batch`):
        one plain handler on this thread, no dedup claims, nothing waiting here."""
        return self._inline and not self.held

    def handle_now(self, msgs: list[Any], opens: int) -> BaseException | None:
        """Hand a fetched batch to the handler at once; what it raised."""
        started = time.monotonic()
        error = self._calls.call(msgs, opens, None)
        if error is None:
            self._metrics.process(msgs[0].topic(), time.monotonic() - started, "")
        return error

    def failed_now(self, records: list[Record], error: BaseException) -> None:
        """:meth:`handle_now` raised ``error`` for ``records`` (admitted since): find the
        failing ones and settle every record."""
        outcomes = self._calls.handle(records, error)
        settle = self._settle
        self._metrics.process(records[0].topic, 0.0, headers.exception_type(error))
        for record, outcome in zip(records, outcomes, strict=True):
            if outcome is None:
                settle.done(record)
            elif not isinstance(outcome, NotStarted):  # (stopping: not committed, comes again)
                settle.failed(record, outcome)

    # -- the executor interface --------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.held > 0

    @property
    def room(self) -> int:
        return self._max_total - self.held

    def submit(self, record: Record) -> None:
        """Queue ``record`` in its lane (batches start in :meth:`collect`)."""
        if self._claims is not None and not identified(self._claims, self._settle, record):
            return
        key = record.key
        if key not in self._epochs:
            self._epochs[key] = next(self._next_epoch)
        lane = self._lane_of(record)
        waiting = self._lanes.get(lane)
        if waiting is None:
            waiting = self._lanes[lane] = deque()
        waiting.append(record)
        self.held += 1

    def collect(self, timeout: float = 0.0) -> None:
        """Apply the outcomes that arrived (waiting up to ``timeout`` for the first), start
        the batches that may start, and apply what an inline runner settled at once."""
        self._apply_all(timeout)
        if self._outage.current is not None:
            self._refuse_waiting()
        while self._start():  # an inline runner settles at once: what that frees starts
            self._apply_all(0.0)

    def wait(self, timeout: float) -> bool:
        if not self.running:
            return False
        self.collect(timeout)
        return True

    def gauges(self) -> tuple[int, dict[Key, int], int]:
        held: dict[Key, int] = {}
        for waiting in self._lanes.values():
            for record in waiting:
                held[record.key] = held.get(record.key, 0) + 1
        backlog = max((len(waiting) for waiting in self._lanes.values()), default=0)
        return self.running, held, backlog

    # -- starting batches --------------------------------------------------------------------

    def _lane_of(self, record: Record) -> Any:
        ordering = self._ordering
        if ordering == "partition":
            return record.key
        if ordering == "key":
            raw = record.raw
            key = raw[0] if raw is not None else record.msg.key()
            return (record.topic, record.partition, hash(key) % self._concurrency)
        return None  # one lane: "unordered", or one handler at a time

    def _start(self) -> bool:
        """Start a batch from every lane that may start one; True if any started."""
        if self._quiet or self._stopping:
            return False
        started = False
        parallel = self._ordering == "unordered"
        outage = self._outage.current
        for lane, waiting in list(self._lanes.items()):
            while (
                waiting
                and self.running < self._concurrency
                and (parallel or lane not in self._busy)
            ):
                batch = self._take(waiting, outage)
                if not batch:
                    break
                if not waiting:
                    del self._lanes[lane]
                self._busy.add(lane)
                self.running += 1
                inflight = self._inflight
                for record in batch:
                    inflight[record.key] = inflight.get(record.key, 0) + 1
                started = True
                self._runner.start(batch, [self._epochs[r.key] for r in batch])
                if not parallel:
                    break
            if self.running >= self._concurrency:
                break
        return started

    def _take(self, waiting: deque[Record], outage: Any) -> list[Record]:
        """The next batch of a lane: up to ``max_records``, ending before a record whose
        dedup identity is already claimed (its twin settles first); during an outage only
        its probe."""
        batch: list[Record] = []
        claiming = self._claiming
        limit = self.batch_records
        while waiting and len(batch) < limit:
            record = waiting[0]
            if (
                outage is not None
                and record.key in outage.partitions
                and not self._outage.is_probe(record)
            ):
                break
            identity = record.identity
            if identity is not None:
                if identity in claiming:
                    break
                claiming.add(identity)
            batch.append(waiting.popleft())
        return batch

    # -- outcomes ----------------------------------------------------------------------------

    def _apply_all(self, timeout: float) -> None:
        mailbox = self._mailbox
        try:
            report = mailbox.get(timeout=timeout) if timeout > 0 else mailbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(report)
            try:
                report = mailbox.get_nowait()
            except queue.Empty:
                return

    def _apply(self, report: Report) -> None:
        claims = self._claims
        if claims is None:
            self._settled(report)
            return
        claims.defer()  # the batch's completions in one round trip
        try:
            self._settled(report)
        finally:
            claims.flush()

    def _settled(self, report: Report) -> None:
        records, epochs, outcomes, seconds = report
        self.running -= 1
        self._busy.discard(self._lane_of(records[0]))
        settle = self._settle
        failure = next((o for o in outcomes if o is not None), None)
        self._metrics.process(  # one observation per batch handed over
            records[0].topic, seconds, "" if failure is None else headers.exception_type(failure)
        )
        for record, epoch, outcome in zip(records, epochs, outcomes, strict=True):
            if record.identity is not None:
                self._claiming.discard(record.identity)
            if self._epochs.get(record.key) != epoch:  # revoked meanwhile: not ours to settle
                if record.claim is not None:
                    if outcome is None:  # its side effect happened: never again
                        self._claims.complete(record)
                    else:
                        self._claims.release(record)
                continue
            self.held -= 1
            self._inflight[record.key] -= 1
            if outcome is None:
                settle.done(record)
            elif isinstance(outcome, NotStarted) or (
                isinstance(outcome, asyncio.CancelledError) and self._stopping
            ):
                if record.claim is not None:
                    self._claims.release(record)
                self._rewind(record)
            elif isinstance(outcome, Unclaimed):
                self._unclaimed(record, outcome.verdict)
            else:
                settle.failed(record, outcome)

    def _rewind(self, record: Record) -> None:
        """Not handled and not failed (not started): its partition goes back to it, with what
        waits behind it."""
        key = record.key
        if key in self._control.assigned and not self._stopping:
            lowest = self._drop_waiting([key]).get(key, record.offset)
            self._control.rewind(key, min(lowest, record.offset))

    def _unclaimed(self, record: Record, verdict: Verdict) -> None:
        settle = self._settle
        if verdict is Verdict.DUPLICATE:
            settle.duplicate(record)
        elif verdict is Verdict.HOLD:
            settle.held(record, DEDUP_STORE)
        else:  # claimed elsewhere past the wait: the partition rewinds to it
            key = record.key
            lowest = self._drop_waiting([key]).get(key, record.offset)
            self._control.rewind(key, min(lowest, record.offset))
            settle.later(record)

    # -- giving records back -----------------------------------------------------------------

    def _refuse_waiting(self) -> None:
        """An outage holds these partitions: what waits there (but the probe) is given back."""
        current = self._outage.current
        assert current is not None
        lowest = self._drop_waiting(current.partitions, keep_probe=True)
        for key, offset in lowest.items():
            self._outage.refused(key, offset)

    def _drop_waiting(self, keys: Iterable[Key], *, keep_probe: bool = False) -> dict[Key, int]:
        """Forget the waiting records of ``keys``; returns each partition's lowest offset."""
        keys = set(keys)
        lowest: dict[Key, int] = {}
        is_probe = self._outage.is_probe
        for lane in list(self._lanes):
            waiting = self._lanes[lane]
            kept: deque[Record] = deque()
            for record in waiting:
                key = record.key
                if key not in keys or (keep_probe and is_probe(record)):
                    kept.append(record)
                    continue
                self.held -= 1
                if record.claim is not None:
                    self._claims.release(record)
                if key not in lowest or record.offset < lowest[key]:
                    lowest[key] = record.offset
            if kept:
                self._lanes[lane] = kept
            else:
                del self._lanes[lane]
        return lowest

    def revoke(self, keys: Iterable[Key], *, lost: bool) -> None:
        """As :meth:`WorkManager.revoke`: what waits is dropped, running batches are awaited
        (bounded; not when lost), later outcomes of these partitions are ignored."""
        keys = set(keys) & set(self._epochs)
        if not keys:
            return
        self._drop_waiting(keys)
        self._runner.cancelled.update(self._epochs[key] for key in keys)
        if not lost and not await_running(
            lambda: self.running, self._apply_all, self.drain_timeout
        ):
            log.warning(
                "%d batch(es) still running after %.0fs at a revocation: their offsets are "
                "not committed (delivered again to the next owner)",
                self.running,
                self.drain_timeout,
            )
        for key in keys:
            del self._epochs[key]
            self.held -= self._inflight.pop(key, 0)  # their outcomes will be ignored

    # -- exactly-once: transactions commit with no handler running -----------------------------

    def quiesce(self) -> bool:
        self._quiet = True
        return self.running == 0

    def drain(self) -> bool:
        self._quiet = True
        return await_running(lambda: self.running, self._apply_all, self.drain_timeout)

    def resume(self) -> None:
        self._quiet = False
        if not self._inline_runner:  # what waited for the commit starts now, not at a fetch
            self.collect()

    def replayed(self) -> None:
        """The aborted transaction is replayed from the last commit: nothing held is kept."""
        self.revoke(list(self._epochs), lost=True)

    def shutdown(self) -> None:
        """Stop starting batches; await the running ones (bounded); drop what waits."""
        self._stopping = True
        self._runner.stopping = True
        self._drop_waiting(list(self._epochs))
        if not await_running(lambda: self.running, self._apply_all, self.drain_timeout):
            log.warning(
                "%d batch(es) still running after %.0fs at shutdown: their offsets are not "
                "committed (delivered again after a restart)",
                self.running,
                self.drain_timeout,
            )
        self._runner.close()
