"""Outage control: breakers that refuse calls, a flood of dead letters or a failing dedup store
pause the partitions in scope instead of failing records; one record is held back and probes the
downstream, alternating with one-record trials from the other paused partitions, until a probe
succeeds. Plus the DLQ flood counter."""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from typing import Any

from resilient_kafka import headers
from resilient_kafka._partitions import OUTAGE, Key, PartitionControl
from resilient_kafka._record import Record
from resilient_kafka._settings import Settings
from resilient_kafka._topics import Topics
from resilient_kafka.breaker import CLOSED, BreakerWatch, CircuitBreakerError, probe_due_at
from resilient_kafka.policies import DeadLetterPolicy

log = logging.getLogger("resilient_kafka.consumer")

_BREAKER_CHECK_INTERVAL = 0.5  # seconds between looks at shared breaker state during an outage
_TRIAL_WAIT = 2.0  # seconds to wait for a trial partition's first record before the next one

BREAKER = "breaker"
DLQ_FLOOD = "dlq-flood"
DEDUP_STORE = "dedup-store"  # the dedup store failed and on_dedup_error="pause"
SCHEMA_REGISTRY = "schema-registry"  # a deserializer's registry could not answer
_DESCRIBED = {
    BREAKER: "downstream breaker open",
    DLQ_FLOOD: "dead-letter flood",
    DEDUP_STORE: "dedup store failing",
    SCHEMA_REGISTRY: "schema registry unavailable",
}


class Outage:
    """One outage: from the first refused record until a probe succeeds."""

    __slots__ = (
        "backoff",
        "breakers",
        "held",
        "next_probe",
        "partitions",
        "probe_deadline",
        "probes",
        "probing",
        "reason",
        "rewind",
        "started",
        "trial",
        "trial_record",
    )

    def __init__(self, reason: str, breakers: list[Any], backoff: float) -> None:
        self.reason = reason
        self.breakers = breakers  # the registered breakers that were open when it began
        self.partitions: set[Key] = set()  # the partitions this outage holds
        self.held: Record | None = None  # the first refused record; None once revoked
        self.rewind: dict[Key, int] = {}  # lowest refused offset per partition
        self.next_probe = 0.0  # time.monotonic() at which to probe
        self.probing = False  # a probe is out: waiting for its result
        self.probes = 0
        # a trial: one partition resumed until its first record arrives (then paused again)
        self.trial: Key | None = None
        self.trial_record: Record | None = None
        self.probe_deadline = 0.0
        self.backoff = backoff
        self.started = time.monotonic()

    def is_probe(self, record: Record) -> bool:
        """Whether ``record`` is the record currently probing the downstream."""
        return self.probing and (record is self.held or record is self.trial_record)


class FloodGuard:
    """Counts dead letters among recent outcomes to tell a poison record from an outage."""

    __slots__ = ("_window", "consecutive", "dead", "max_consecutive", "max_ratio")

    _MIN_SAMPLES = 10

    def __init__(self, policy: DeadLetterPolicy) -> None:
        self.max_consecutive = policy.max_consecutive
        self.max_ratio = policy.max_ratio
        self._window: deque[bool] = deque(maxlen=policy.ratio_window)
        self.consecutive = 0
        self.dead = 0

    def record(self, dead_lettered: bool) -> None:
        window = self._window
        if len(window) == window.maxlen and window[0]:
            self.dead -= 1
        window.append(dead_lettered)
        if dead_lettered:
            self.dead += 1
            self.consecutive += 1
        else:
            self.consecutive = 0

    def succeeded(self, count: int) -> None:
        """``count`` records were handled (a batch): :meth:`record` ``False`` that often."""
        window = self._window
        leaving = min(len(window), len(window) + count - (window.maxlen or 0))
        for _ in range(max(0, leaving)):
            if window.popleft():
                self.dead -= 1
        window.extend(itertools.repeat(False, min(count, window.maxlen or count)))
        self.consecutive = 0

    def would_flood(self) -> bool:
        """Whether one more dead letter would exceed a limit."""
        if self.max_consecutive is not None and self.consecutive + 1 > self.max_consecutive:
            return True
        samples = len(self._window) + 1
        return (
            self.max_ratio is not None
            and samples >= self._MIN_SAMPLES
            and (self.dead + 1) / samples > self.max_ratio
        )

    def reset(self) -> None:
        self._window.clear()
        self.dead = 0
        self.consecutive = 0


class OutageControl:
    """Starts, tends and ends outages; the only owner of :class:`Outage` state."""

    def __init__(
        self,
        settings: Settings,
        control: PartitionControl,
        topics: Topics,
        assignment: Any,
    ) -> None:
        self._control = control
        self._topics = topics
        self._assignment = assignment  # () -> the native assignment
        self._breakers = settings.breakers
        self._scope = settings.breaker_scope
        self._backoff = settings.dead_letter.flood_backoff
        self.watch = BreakerWatch()
        for breaker in self._breakers:
            breaker.add_listener(self.watch)
        self.flood = FloodGuard(settings.dead_letter) if settings.dead_letter.guarded else None
        self.current: Outage | None = None
        self.probe_ready: Record | None = None  # the held record, to hand out as the probe
        self._accounted = 0  # breaker openings already blamed on a failed record
        self._last_breaker_check = 0.0

    # -- is it an outage? --------------------------------------------------------------------

    def tripped(self, record: Record, exc: BaseException) -> bool:
        """A breaker refused the call, or ``record``'s handling tripped one (an opening since
        it was handed out that no earlier failure accounts for)."""
        if isinstance(exc, CircuitBreakerError):
            return True
        return self.watch.opens != max(record.opens, self._accounted)

    def blame(self, record: Record, exc: BaseException) -> bool:
        """:meth:`tripped`, and the openings seen so far are accounted for: a later record of
        the same batch is judged by what happens while it is handled."""
        tripped = self.tripped(record, exc)
        self._accounted = self.watch.opens
        if isinstance(exc, CircuitBreakerError):
            self.watch.refused(self._breakers)
        return tripped

    def in_scope(self, key: Key, outage: Outage) -> bool:
        if outage.reason != BREAKER or not self._scope or not outage.breakers:
            return True
        source = self._topics.source_of(key[0])
        return any(source in self._scope.get(b.name, ()) for b in outage.breakers)

    # -- holding -----------------------------------------------------------------------------

    def hold(self, record: Record, reason: str) -> None:
        """Keep ``record`` (not failed, no attempt counted), pause, and schedule a probe."""
        key = record.key
        control = self._control
        outage = self.current
        if outage is None:
            open_breakers = [b for b in self._breakers if b.current_state != CLOSED]
            outage = self.current = Outage(reason, open_breakers, self._backoff[0])
            keys = [
                (tp.topic, tp.partition)
                for tp in self._assignment()
                if self.in_scope((tp.topic, tp.partition), outage)
            ]
            outage.partitions.update(keys)
            control.pause(keys, OUTAGE)
            log.warning(
                "%s: pausing %d partition(s) instead of failing messages; holding %s [%d] @%d",
                _DESCRIBED[reason],
                len(keys),
                *key,
                record.offset,
            )
        elif outage.probing:  # the probe failed: back off, and re-pause what a trial resumed
            outage.backoff = min(self._backoff[1], outage.backoff * 2)
            control.pause(outage.partitions, OUTAGE)
        if key not in outage.partitions:
            outage.partitions.add(key)
            control.pause([key], OUTAGE)
        held = outage.held
        if held is None or held is record or (held.key == key and record.offset < held.offset):
            outage.held = record
        self.refused(key, record.offset)
        outage.probing = False
        outage.trial = outage.trial_record = None
        outage.next_probe = self._next_probe(outage)

    def refused(self, key: Key, offset: int) -> None:
        """Records of ``key`` from ``offset`` on were refused: deliver them again after the
        outage, never skipping one (the lowest refused offset wins)."""
        outage = self.current
        assert outage is not None
        lowest = min(offset, outage.rewind.get(key, offset))
        outage.rewind[key] = lowest
        self._control.pause([key], OUTAGE)
        self._control.rewind(key, lowest)

    def _next_probe(self, outage: Outage) -> float:
        now = time.monotonic()
        if outage.reason == BREAKER:
            dues = [d for d in (probe_due_at(b) for b in outage.breakers) if d is not None]
            if dues:
                return now + max(0.0, min(dues) - time.time())
        return now + outage.backoff

    # -- admission during an outage ----------------------------------------------------------

    def admits(self, record: Record, tier: bool) -> bool:
        """The trial record passes (its partition is paused again behind it); a record that
        slipped out of another paused partition is rewound to, not handed out. ``tier``: the
        record is a retry record (it has a due time)."""
        outage = self.current
        assert outage is not None
        key = record.key
        control = self._control
        if key == outage.trial and outage.trial_record is None:
            due = headers.due(record.msg) if tier else None
            if due is not None and due > time.time() * 1000:  # not due: try another partition
                self.refused(key, record.offset)
                outage.trial = None
                outage.probing = False
                outage.next_probe = time.monotonic()
                return False
            outage.trial_record = record
            control.pause([key], OUTAGE)
            control.seek(key, record.offset + 1)
            held = outage.held
            if held is None or held.key != key:
                outage.rewind.pop(key, None)  # a skip-ahead trial keeps the held record's
            log.info("probing the downstream with %s [%d] @%d", *key, record.offset)
            return True
        if key in outage.partitions:
            self.refused(key, record.offset)
            return False
        return True

    def abandon_trial(self) -> None:
        """The trial record was not handed out (not due, undeserializable): try again soon."""
        outage = self.current
        assert outage is not None
        if outage.trial is not None:
            self._control.pause([outage.trial], OUTAGE)
        outage.trial = outage.trial_record = None
        outage.probing = False
        outage.next_probe = time.monotonic()

    def take_probe(self) -> Record | None:
        """The held record, when it is its turn to probe the downstream."""
        record, self.probe_ready = self.probe_ready, None
        if record is not None:
            log.info(
                "probing the downstream with %s [%d] @%d",
                record.topic,
                record.partition,
                record.offset,
            )
        return record

    def is_probe(self, record: Record) -> bool:
        outage = self.current
        return outage is not None and outage.is_probe(record)

    # -- probing -----------------------------------------------------------------------------

    def tend(self, now: float) -> float:
        """Probe when it is time; returns how long until it wants to be tended again."""
        outage = self.current
        assert outage is not None
        control = self._control
        if outage.probing:
            trial_silent = outage.trial is not None and outage.trial_record is None
            if trial_silent and now >= outage.probe_deadline:
                # nothing arrived from the trial partition (empty, paused for another reason,
                # or a retry not due): the next one; a skip-ahead past the held record is undone
                assert outage.trial is not None
                control.pause([outage.trial], OUTAGE)
                if outage.trial in outage.rewind:
                    control.rewind(outage.trial, outage.rewind[outage.trial])
                outage.trial = None
                outage.probing = False
                outage.next_probe = now
            return max(0.0, outage.probe_deadline - now) if trial_silent else 0.1
        if outage.breakers and now - self._last_breaker_check >= _BREAKER_CHECK_INTERVAL:
            self._last_breaker_check = now
            if all(b.current_state == CLOSED for b in outage.breakers):
                self.end(seek_past=None)  # closed elsewhere (shared state)
                return 0.0
        if now < outage.next_probe:
            return outage.next_probe - now
        # Alternate the held record with a one-record trial from another paused partition: a
        # record that fails on its own must not keep the breaker open for everyone.
        k = outage.probes
        outage.probes += 1
        held = outage.held
        held_key = held.key if held is not None else None
        # partitions paused for nothing but the outage; those known to hold refused records
        # first: an empty one only costs a wait
        others = sorted(
            (
                key
                for key in outage.partitions
                if key != held_key and control.paused_only_for(key, OUTAGE)
            ),
            key=lambda key: (key not in outage.rewind, key),
        )
        outage.probing = True
        if held is not None and k % 2 == 0:
            self.probe_ready = held
            return 0.0
        outage.trial_record = None
        outage.probe_deadline = now + _TRIAL_WAIT
        if others:
            outage.trial = others[(k // 2) % len(others)]
        elif (
            held is not None and held_key is not None and control.paused_only_for(held_key, OUTAGE)
        ):
            # nothing else to try: the record after the held one (the held record may be poison)
            outage.trial = held_key
            control.seek(held_key, held.offset + 1)
        else:
            outage.probing = False
            outage.next_probe = now + outage.backoff
            return outage.backoff
        control.release([outage.trial], OUTAGE)
        return _TRIAL_WAIT

    def end(self, seek_past: Record | None) -> None:
        """The downstream answered: resume what the outage paused (what nothing else holds)."""
        outage = self.current
        if outage is None:
            return
        self.current = None
        self.probe_ready = None
        control = self._control
        if seek_past is not None:
            key = seek_past.key
            target = seek_past.offset + 1
            lowest = outage.rewind.get(key)
            if lowest is not None:
                if seek_past is not outage.held:
                    target = min(target, lowest)  # a skip-ahead trial: held comes again
                elif lowest < seek_past.offset:
                    # refused below the held record (concurrent handlers: records queued behind
                    # a running key were given back): they come again, none skipped
                    target = lowest
            control.seek(key, target)
        for key, lowest in outage.rewind.items():  # refused records come again, none skipped
            if seek_past is None or key != seek_past.key:
                control.rewind(key, lowest)
        resumed = control.release(outage.partitions, OUTAGE)
        if self.flood is not None:
            self.flood.reset()
        log.warning(
            "downstream recovered after %.1fs: resuming %d partition(s)",
            time.monotonic() - outage.started,
            len(resumed),
        )

    # -- rebalances and replays --------------------------------------------------------------

    def assigned(self, keys: set[Key]) -> None:
        """Newly assigned partitions in scope wait out the outage too."""
        outage = self.current
        if outage is None:
            return
        held_back = {key for key in keys if self.in_scope(key, outage)}
        outage.partitions |= held_back
        self._control.pause(held_back, OUTAGE)

    def forget(self, keys: set[Key]) -> None:
        """Partitions given up: their refused records are their new owner's."""
        outage = self.current
        if outage is None:
            return
        outage.partitions -= keys
        for key in keys:
            outage.rewind.pop(key, None)
        held = outage.held
        if held is not None and held.key in keys:
            outage.held = None  # its new owner will see it
            self.probe_ready = None
        if outage.trial in keys:
            outage.trial = outage.trial_record = None
            outage.probing = False
            outage.next_probe = time.monotonic()
        if outage.probing and outage.held is None and outage.trial is None:
            outage.probing = False  # the probe went with its partition: probe again

    def void_probe(self) -> None:
        """An aborted transaction: a probe in progress is void (its record comes again)."""
        outage = self.current
        if outage is None:
            return
        if outage.trial is not None:
            self._control.pause([outage.trial], OUTAGE)
        outage.trial = outage.trial_record = None
        outage.probing = False
        outage.next_probe = time.monotonic()
        self.probe_ready = None

    def replayed(self, key: Key, offset: int) -> bool:
        """An aborted transaction rewinds ``key`` to ``offset``: True if the outage holds the
        partition (it stays paused, from there)."""
        outage = self.current
        if outage is None or key not in outage.partitions:
            return False
        held = outage.held
        if held is not None and held.key == key:
            outage.held = None  # it comes again from the rewound position
        self.refused(key, offset)
        return True

    def paused_counts(self) -> dict[str, int]:
        """Partitions paused by the outage, per pause-gauge reason."""
        outage = self.current
        count = len(outage.partitions) if outage is not None else 0
        reason = outage.reason if outage is not None else None
        return {
            "circuit_open": count if reason == BREAKER else 0,
            "dlq_flood": count if reason == DLQ_FLOOD else 0,
            "dedup_store": count if reason == DEDUP_STORE else 0,
            "schema_registry": count if reason == SCHEMA_REGISTRY else 0,
        }
