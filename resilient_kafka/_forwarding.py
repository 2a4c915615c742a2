"""Forwarding: retry and DLQ copies on their way to the broker.

A copy holds its source record's offset until the broker acknowledges it. A failed produce is
retried with back-off; an error no retry cures (too large, not authorised, invalid) is raised
once as :class:`ForwardError` at the next housekeeping, and the copy keeps being retried. What
to send and with which headers is routing's business (``_routing``).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from resilient_kafka import headers
from resilient_kafka._topics import Topics
from resilient_kafka.errors import ForwardError
from resilient_kafka.producer import ResilientProducer

log = logging.getLogger("resilient_kafka.consumer")

BACKOFF = (0.1, 5.0)  # first and maximum back-off of a failed forward
# Produce errors no retry cures: the copy is kept (offset held) but the application is told.
PERMANENT_ERRORS = {
    KafkaError.MSG_SIZE_TOO_LARGE: (
        "the copy is larger than the target accepts: raise max.message.bytes of topic {target}"
        " and message.max.bytes of the consumer's producer_config (now {limit}), or keep such"
        " records off this path"
    ),
    KafkaError.RECORD_LIST_TOO_LARGE: (
        "the batch is larger than the target accepts: raise max.message.bytes of topic {target}"
    ),
    KafkaError.INVALID_RECORD: "the broker rejected the record as invalid",
    KafkaError.TOPIC_EXCEPTION: "{target} is not a valid topic name",
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "grant this client WRITE on topic {target}",
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: "grant this client the cluster ACLs it needs",
    KafkaError.POLICY_VIOLATION: "a broker policy refuses the record",
}


class Forward:
    """A retry or DLQ copy on its way to the broker; holds its source offset until acked."""

    __slots__ = (
        "attempts",
        "generation",
        "headers",
        "key",
        "next_try",
        "origin",
        "permanent",
        "progress",
        "source",
        "span",
        "target",
        "timestamp",
        "value",
    )

    def __init__(
        self,
        source: tuple[str, int, int],
        origin: str,
        target: str,
        key: bytes | None,
        value: bytes | None,
        hdrs: headers.HeaderList,
        timestamp: int,
        span: Any = None,
        progress: Any = None,
    ) -> None:
        self.source = source
        self.progress = progress  # the source partition's progress in the commit barrier
        self.origin = origin  # the source topic whose retry/DLQ topics the target is among
        self.target = target
        self.key = key
        self.value = value
        self.headers = hdrs
        self.timestamp = timestamp
        self.span = span
        self.attempts = 0
        self.generation = 0  # exactly-once: the transaction it was produced in
        self.next_try = 0.0
        self.permanent = False  # the broker refused it for good (ForwardError raised once)


class Forwarder:
    """Produces forwards, retries them, and reports each acknowledged copy to ``on_acked``
    (which completes its source record)."""

    def __init__(
        self,
        producer: ResilientProducer,
        topics: Topics,
        on_acked: Callable[[Forward], None],
        *,
        max_bytes: int,
        transactional: bool,
        metrics: Any = None,
    ) -> None:
        self._producer = producer
        self._metrics = metrics
        self._topics = topics
        self._on_acked = on_acked
        self._max_bytes = max_bytes
        self._transactional = transactional
        self._queue: list[Forward] = []  # waiting to be (re-)produced
        self.in_flight = 0  # produced, not yet acknowledged
        self.generation = 0  # exactly-once: bumped when a transaction's forwards are discarded
        self.sent = 0  # produce calls (exactly-once: whether the open transaction wrote)
        self.failed_in_transaction = False  # exactly-once: the open transaction must abort
        self._error: ForwardError | None = None
        self._refused_logged: set[tuple[str, int, int]] = set()

    @property
    def busy(self) -> bool:
        """Copies queued or unacknowledged."""
        return bool(self._queue) or self.in_flight > 0

    def add(self, forward: Forward) -> None:
        self._queue.append(forward)
        self.send()

    def take_error(self) -> ForwardError | None:
        """The ForwardError to raise (once per refused copy), if any."""
        error, self._error = self._error, None
        return error

    def send(self) -> None:
        """Produce every queued copy whose back-off is over."""
        if not self._queue:
            return
        now = time.monotonic()
        # take the list first: delivery callbacks fired by poll() below may append to it
        pending, self._queue = self._queue, []
        waiting = self._queue
        producer = self._producer
        for forward in pending:
            if forward.next_try > now:
                waiting.append(forward)
                continue
            if not self._topics.ensure(forward.origin):
                self._failed(forward, "its retry/DLQ topics could not be created")
                waiting.append(forward)
                continue
            forward.generation = self.generation
            try:
                producer._produce_untraced(
                    forward.target,
                    forward.value,
                    forward.key,
                    -1,
                    producer._reporter(functools.partial(self._delivered, forward)),
                    forward.timestamp,
                    forward.headers,
                )
                self.in_flight += 1
                self.sent += 1
            except BufferError:
                producer.poll(0.05)
                waiting.append(forward)
            except KafkaException as exc:
                self._failed(forward, exc.args[0] if exc.args else exc)
                waiting.append(forward)
            except (TypeError, ValueError) as exc:  # e.g. a value that is not bytes
                self._failed(forward, exc)
                waiting.append(forward)

    def _delivered(self, forward: Forward, err: KafkaError | None, msg: Any) -> None:
        if forward.generation != self.generation:
            return  # produced in an aborted transaction: its record is replayed
        self.in_flight -= 1
        if err is not None and self._transactional:
            # the open transaction cannot commit now: abort and replay it (next housekeeping)
            log.error("forward to %s failed inside a transaction: %s", forward.target, err)
            self.failed_in_transaction = True
            self._note_permanent(forward, err)  # a replay would fail the same way: stop
            return
        if err is None:
            self._on_acked(forward)
            if forward.span is not None:
                from resilient_kafka.tracing import Tracing

                Tracing.end_send(forward.span, None, msg)
            return
        self._failed(forward, err)
        self._queue.append(forward)

    def _note_permanent(self, forward: Forward, err: object) -> bool:
        """If ``err`` is one no retry cures, keep a ForwardError for the next housekeeping to
        raise (once per forward: raising inside a delivery callback would lose it)."""
        if isinstance(err, (TypeError, ValueError)):
            hint = "the record's key or value is not bytes"
        elif isinstance(err, KafkaError) and err.code() in PERMANENT_ERRORS:
            hint = PERMANENT_ERRORS[err.code()].format(target=forward.target, limit=self._max_bytes)
        else:
            return False
        if not forward.permanent:
            forward.permanent = True
            if self._metrics is not None:
                self._metrics.forward_refused(forward.origin)
            size = len(forward.key or b"") + len(forward.value or b"")
            topic, partition, offset = forward.source
            self._error = ForwardError(
                f"the {'DLQ' if forward.target.endswith('.dlq') else 'retry'} copy of {topic} "
                f"[{partition}] @{offset} ({size} bytes of key and value) to {forward.target} "
                f"was refused: {err}. {hint[0].upper()}{hint[1:]}. Nothing is lost: the "
                "offset stays uncommitted (the record comes again after a restart) and the "
                "copy is retried meanwhile",
                forward.source,
                forward.target,
                err,
            )
        return True

    def _failed(self, forward: Forward, err: object) -> None:
        forward.attempts += 1
        first, most = BACKOFF
        backoff = min(most, first * 2 ** (forward.attempts - 1))
        if self._note_permanent(forward, err):
            backoff = most
        forward.next_try = time.monotonic() + backoff
        log.error(
            "forward of %s [%d] @%d to %s failed (attempt %d, retrying in %.1fs; its offset is "
            "held): %s",
            *forward.source,
            forward.target,
            forward.attempts,
            backoff,
            err,
        )

    def drain(self, timeout: float) -> bool:
        """Wait until every copy is acknowledged; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while self._queue or self.in_flight:
            if not self.in_flight and all(f.permanent for f in self._queue):
                refused = {f.source for f in self._queue}
                if refused != self._refused_logged:  # close() drains twice (and on revoke)
                    self._refused_logged = refused
                    log.error(
                        "%d forward(s) refused by the broker for good; their offsets stay "
                        "uncommitted and the records will be redelivered",
                        len(self._queue),
                    )
                return False
            if time.monotonic() >= deadline:
                log.warning(
                    "%d forward(s) still unacknowledged after %.0fs; their offsets stay "
                    "uncommitted and the records will be redelivered",
                    len(self._queue) + self.in_flight,
                    timeout,
                )
                return False
            self._producer.poll(0.05)
            self.send()
        return True

    def discard(self) -> None:
        """Exactly-once: the open transaction was aborted; its copies are void (their records
        are replayed), and their delivery reports are ignored."""
        self.generation += 1
        self._queue.clear()
        self.in_flight = 0
        self.failed_in_transaction = False

    def forget(self, keys: set[tuple[str, int]]) -> None:
        """Exactly-once: partitions given up; their new owner routes these records again."""
        if self._queue:
            self._queue = [f for f in self._queue if (f.source[0], f.source[1]) not in keys]
