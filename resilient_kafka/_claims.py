"""Dedup claims: a record is claimed in the dedup store before its handler runs, completed
after it succeeded, released when it failed (its retry hop claims again).

:meth:`Claims.claim` answers with a :class:`Verdict`; what to do with the record is the
caller's business (run it, settle it as a duplicate, deliver it again later, hold it).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from typing import Any

from resilient_kafka import headers
from resilient_kafka._lease import LeaseKeeper
from resilient_kafka._record import Record
from resilient_kafka._settings import Settings
from resilient_kafka.dedup import BUSY, DONE, NEW, DedupStore, DedupStoreError
from resilient_kafka.errors import DedupKeyError

log = logging.getLogger("resilient_kafka.consumer")


class Verdict(enum.Enum):
    RUN = "run"  # claimed (or, the store failing and on_dedup_error="process", unclaimed)
    DUPLICATE = "duplicate"  # processed before: skip the handler, the record is done
    LATER = "later"  # another claim holds it (another consumer, or its twin in hand)
    HOLD = "hold"  # the store failed and on_dedup_error="pause": hold it, pause


class Claims:
    """This consumer's claims in one dedup store, with their leases renewed meanwhile."""

    def __init__(
        self, settings: Settings, store: DedupStore, metrics: Any, stop: threading.Event
    ) -> None:
        self._store = store
        self._group = settings.group
        self._key_of = settings.dedup_key or headers.message_id
        self._lease = settings.dedup_lease
        self._fail_open = settings.dedup_fail_open
        self._metrics = metrics
        self._stop = stop
        self._owner = _owner_name()
        self._leases = LeaseKeeper(store, self._owner, settings.dedup_lease)
        self._in_hand: set[str] = set()  # the drop-in loop's claims not settled yet

    def identity(self, record: Record) -> str:
        """``record``'s dedup key in this group; DedupKeyError if ``dedup_key`` raised (then
        the record has no identity and cannot be processed once: it is dead-lettered)."""
        msg = record.msg
        try:
            return f"{self._group}|{self._key_of(msg)}"
        except Exception as exc:
            error = DedupKeyError(
                f"dedup_key failed for {record.topic} [{record.partition}] @{record.offset}: "
                f"{type(exc).__name__}: {exc}"
            )
            error.__cause__ = exc
            log.warning("%s; sending it to the DLQ", error)
            raise error from exc

    def claim(self, record: Record, key: str, *, twins: bool = False) -> Verdict:
        """Claim ``record`` under ``key``; with ``twins`` (the drop-in loop, where several
        records are in hand at once) a key already claimed by a record in hand is LATER."""
        if twins and key in self._in_hand:
            return Verdict.LATER
        metrics = self._metrics
        waited_until = time.monotonic() + self._lease + 1
        while True:
            try:
                verdict = self._store.claim(key, self._owner, self._lease)
            except DedupStoreError as exc:
                metrics.dedup(record.topic, "error")
                if self._fail_open:
                    log.error("dedup store failed; processing %s without a claim: %s", key, exc)
                    return Verdict.RUN
                log.error("dedup store failed; holding %s and pausing: %s", key, exc)
                return Verdict.HOLD
            if verdict == NEW:
                metrics.dedup(record.topic, "miss")
                self._leases.hold(key)
                record.claim = key
                if twins:
                    self._in_hand.add(key)
                return Verdict.RUN
            if verdict == DONE:
                metrics.dedup(record.topic, "hit")
                metrics.outcome(record.topic, "duplicate_skipped", "")
                log.info("skipping %s: already processed", key)
                return Verdict.DUPLICATE
            assert verdict == BUSY  # another consumer holds a live claim: wait it out
            if self._stop.is_set() or time.monotonic() > waited_until:
                return Verdict.LATER  # not done: delivered again, never committed
            self._stop.wait(0.05)

    def complete(self, record: Record) -> None:
        """``record`` was processed: its claim becomes a done entry."""
        claim = record.claim
        if claim is None:
            return
        record.claim = None
        self._in_hand.discard(claim)
        kept = self._leases.drop(claim)
        try:
            ours = self._store.complete(claim, self._owner)
        except DedupStoreError as exc:  # the side effect happened: nothing to undo
            self._metrics.dedup(record.topic, "error")
            log.error("dedup store failed to record %s as processed: %s", claim, exc)
            return
        if not kept or ours is False:
            self._metrics.dedup(record.topic, "lease_lost")
            log.warning(
                "the dedup claim on %s ran out before its handler finished (dedup_lease=%.0fs, "
                "renewed every third of it): another consumer may have run it too",
                claim,
                self._lease,
            )

    def release(self, record: Record) -> None:
        """``record`` was not processed (failed, or given back): another attempt claims it."""
        claim = record.claim
        if claim is None:
            return
        record.claim = None
        self._in_hand.discard(claim)
        self._leases.drop(claim)
        try:
            self._store.release(claim, self._owner)
        except DedupStoreError as exc:  # the lease runs out on its own
            log.warning("dedup store failed to release %s: %s", claim, exc)

    def close(self) -> None:
        self._leases.close()


def _owner_name() -> str:
    import uuid

    return uuid.uuid4().hex  # this consumer's name in dedup claims
