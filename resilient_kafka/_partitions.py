"""Partition control: the only code that pauses, resumes or positions the native consumer.

Each partition carries the set of reasons it is paused for (the application's pause, a retry
record not yet due, an outage, backpressure); it resumes only when no reason is left, so one
part of the consumer can never resume what another holds. Positions set while a partition is
stopped never move forward past a lower one (:meth:`rewind`), so no record is skipped, unless the
position is set on purpose (:meth:`seek`: the application's seek, a replay, past a probe).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from confluent_kafka import Consumer, KafkaException, TopicPartition

log = logging.getLogger("resilient_kafka.consumer")

Key = tuple[str, int]

APPLICATION = "manual"  # the application called pause()
WITH_APPLICATION = "manual_all"  # a retry tier: the application paused all of its partitions
RETRY_DUE = "retry_backoff"  # a retry record is fetched but not due yet
OUTAGE = "outage"  # a breaker is open, the DLQ floods, or the dedup store fails
BACKPRESSURE = "backpressure"  # too much of the partition is in flight (concurrent handlers)


class PartitionControl:
    """Pause reasons, positions and the assignment as this consumer sees them."""

    __slots__ = (
        "_due",
        "_native",
        "_positioned",
        "_reasons",
        "_restart",
        "assigned",
        "assignments",
        "pending",
        "version",
    )

    def __init__(self, native: Consumer) -> None:
        self._native = native
        self._reasons: dict[Key, set[str]] = {}  # paused partitions only
        self._restart: dict[Key, int] = {}  # position set while stopped (lowest wins)
        self._positioned: set[Key] = set()  # positioned since the last mark()
        self.pending: set[Key] = set()  # assigned; native pause flags not reconciled yet
        self._due: dict[Key, int] = {}  # RETRY_DUE partitions: epoch ms their record is due
        self.assigned: set[Key] = set()
        self.assignments = 0  # assignments given (by the group or assign()): it has joined
        self.version = 0  # bumped by every change a batch in progress must notice

    # -- pausing -----------------------------------------------------------------------------

    def pause(self, keys: Iterable[Key], reason: str) -> None:
        """Stop fetching ``keys`` for ``reason`` (other reasons are kept)."""
        now_paused = []
        for key in keys:
            reasons = self._reasons.get(key)
            if reasons is None:
                self._reasons[key] = {reason}
                now_paused.append(TopicPartition(*key))
            else:
                reasons.add(reason)
        self.version += 1
        if not now_paused:
            return
        try:
            Consumer.pause(self._native, now_paused)
        except KafkaException as exc:  # being assigned: reconcile() pauses it
            log.debug("pause deferred to the assignment: %s", exc)

    def release(self, keys: Iterable[Key], reason: str) -> list[Key]:
        """Take ``reason`` off ``keys``; those left with no reason resume (returned)."""
        resumed = []
        for key in keys:
            reasons = self._reasons.get(key)
            if reasons is None or reason not in reasons:
                continue
            reasons.discard(reason)
            if reason == RETRY_DUE:
                self._due.pop(key, None)
            if not reasons:
                del self._reasons[key]
                self._restart.pop(key, None)
                if key in self.assigned and key not in self.pending:
                    resumed.append(key)
        if resumed:
            Consumer.resume(self._native, [TopicPartition(*key) for key in resumed])
        return resumed

    def pause_until(self, key: Key, due_ms: int, offset: int) -> None:
        """A retry record of ``key`` at ``offset`` is due at ``due_ms``: stop there till then."""
        self.pause([key], RETRY_DUE)
        self._due[key] = due_ms
        self.rewind(key, offset)

    def release_due(self, now_ms: float) -> float | None:
        """Resume partitions whose retry record is due; seconds until the next one, if any."""
        due = self._due
        if not due:
            return None
        ready = [key for key, at in due.items() if at <= now_ms]
        if ready:
            self.release(ready, RETRY_DUE)
        if not due:
            return None
        return max(0.0, (min(due.values()) - now_ms) / 1000)

    def paused_for(self, key: Key, reason: str) -> bool:
        reasons = self._reasons.get(key)
        return reasons is not None and reason in reasons

    def paused_by(self, reason: str) -> set[Key]:
        return {key for key, reasons in self._reasons.items() if reason in reasons}

    def is_paused(self, key: Key) -> bool:
        return key in self._reasons

    # -- positions ---------------------------------------------------------------------------

    def seek(self, key: Key, offset: int, partition: TopicPartition | None = None) -> None:
        """Fetch ``key`` from ``offset`` next, whatever was set before (raises KafkaException);
        ``partition``: the application's own TopicPartition (its leader epoch kept)."""
        Consumer.seek(self._native, partition or TopicPartition(key[0], key[1], offset))
        self._positioned.add(key)
        if key in self._reasons:
            self._restart[key] = offset
        self.version += 1

    def rewind(self, key: Key, offset: int) -> bool:
        """Deliver ``key`` from ``offset`` again, unless a lower position is already set while
        the partition is stopped; False (logged) if the native consumer refused."""
        current = self._restart.get(key)
        if current is not None and current <= offset:
            return True
        try:
            Consumer.seek(self._native, TopicPartition(key[0], key[1], offset))
        except KafkaException as exc:
            log.warning(
                "cannot rewind %s [%d] to %d (records from there are redelivered only after a "
                "restart or rebalance): %s",
                *key,
                offset,
                exc,
            )
            return False
        self._restart[key] = offset
        self._positioned.add(key)
        self.version += 1
        return True

    def mark(self) -> None:
        """A fetch returned: what was positioned before (or during) it is what it fetched from;
        what is paused or positioned from now on stops the records it returned."""
        if self._positioned:
            self._positioned.clear()
        if self._restart:
            reasons = self._reasons
            self._restart = {k: o for k, o in self._restart.items() if k in reasons}

    def stopped(self, key: Key) -> bool:
        """Records of ``key`` fetched before now must not be handed out: it is paused, was
        positioned since the fetch, or is no longer assigned."""
        return key in self._reasons or key in self._positioned or key not in self.assigned

    def positioned(self, key: Key) -> bool:
        return key in self._positioned

    # -- assignment --------------------------------------------------------------------------

    def assigned_now(self, keys: Iterable[Key], *, replace: bool) -> None:
        """``keys`` were assigned (all of the assignment when ``replace``). librdkafka keeps a
        partition's pause flag across revoke and assign: it is reconciled with the reasons at
        the next :meth:`reconcile`."""
        keys = set(keys)
        if replace:
            self.revoked(self.assigned - keys)
        self.assigned |= keys
        self.assignments += 1
        self.pending |= keys
        self._positioned |= keys  # the assignment's positions are its own
        self.version += 1

    def revoked(self, keys: Iterable[Key]) -> None:
        for key in keys:
            self.assigned.discard(key)
            self._reasons.pop(key, None)
            self._restart.pop(key, None)
            self.pending.discard(key)
            self._due.pop(key, None)
        self.version += 1

    def reconcile(self) -> None:
        """Make the native pause flags of newly assigned partitions match their reasons."""
        if not self.pending:
            return
        keys, self.pending = self.pending & self.assigned, set()
        paused = [TopicPartition(*k) for k in keys if k in self._reasons]
        flowing = [TopicPartition(*k) for k in keys if k not in self._reasons]
        try:
            if paused:
                Consumer.pause(self._native, paused)
            if flowing:
                Consumer.resume(self._native, flowing)
        except KafkaException as exc:  # revoked again meanwhile
            log.debug("pause/resume of new partitions skipped: %s", exc)

    def paused_only_for(self, key: Key, reason: str) -> bool:
        """Paused for ``reason`` and nothing else (a trial may resume it)."""
        return self._reasons.get(key) == {reason}
