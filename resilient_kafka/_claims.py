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
        self._claim_many = _batched(store, "claim_many", "claim")
        self._complete_many = _batched(store, "complete_many", "complete")
        self._deferred: list[Record] | None = None  # completions kept for one round trip
        self._ahead: dict[str, str] = {}  # key -> the store's answer, claimed for a batch
        self._ahead_ids: dict[int, str] = {}  # id(msg) -> its key, read by claim_ahead
        # a store gone with the process (MemoryStore): completions of a batch are written
        # together, since a crash loses its entries anyway
        self.volatile = getattr(store, "durable", True) is False
        self._deferring = 0  # the thread that keeps completions (it alone flushes them)

    def identity(self, record: Record) -> str:
        """``record``'s dedup key in this group; DedupKeyError if ``dedup_key`` raised (then
        the record has no identity and cannot be processed once: it is dead-lettered)."""
        msg = record.msg
        if self._ahead_ids:
            key = self._ahead_ids.pop(id(msg), None)
            if key is not None:  # read by claim_ahead already
                return key
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

    def claim_record(self, record: Record) -> Verdict:
        """:meth:`identity` and :meth:`claim` at once: for a record claimed ahead, two dict
        lookups (DedupKeyError as :meth:`identity` raises it)."""
        if self._ahead:
            key = self._ahead_ids.pop(id(record.msg), None)
            if key is not None:
                answer = self._ahead.pop(key, None)
                if answer == NEW:  # (counted and renewed already)
                    record.claim = key
                    return Verdict.RUN
                if answer is not None and answer != BUSY:
                    return self._answered(record, key, answer, held=True)
                return self.claim(record, key)
        return self.claim(record, self.identity(record))

    def claim(self, record: Record, key: str, *, twins: bool = False) -> Verdict:
        """Claim ``record`` under ``key``; with ``twins`` (the drop-in loop, where several
        records are in hand at once) a key already claimed by a record in hand is LATER."""
        if twins and key in self._in_hand:
            return Verdict.LATER
        if self._ahead:
            answer = self._ahead.pop(key, None)
            if answer is not None and answer != BUSY:
                return self._answered(record, key, answer, held=True)
        if self._deferred and threading.get_ident() == self._deferring:
            self.flush()  # a twin of a record done in this batch must find it done
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

    def claim_many(self, records: list[Record], keys: list[str]) -> list[Verdict]:
        """:meth:`claim` for a fetched batch's records (distinct keys), in one round trip when
        the store can; a key another consumer holds is waited for one by one."""
        if self._claim_many is None or len(records) < 2:
            return [self.claim(r, k) for r, k in zip(records, keys, strict=True)]
        try:
            answers = self._claim_many(keys, self._owner, self._lease)
        except DedupStoreError:
            return [self.claim(r, k) for r, k in zip(records, keys, strict=True)]  # each decides
        return [
            self._answered(record, key, answer)
            if answer != BUSY
            else self.claim(record, key)  # another consumer's live claim: wait it out
            for record, key, answer in zip(records, keys, answers, strict=True)
        ]

    def _answered(self, record: Record, key: str, answer: str, held: bool = False) -> Verdict:
        """The verdict for a NEW or DONE answer of the store (``held``: its lease is renewed
        already)."""
        metrics = self._metrics
        if answer == NEW:
            if not held:  # (a claim made ahead was counted and is renewed already)
                metrics.dedup(record.topic, "miss")
                self._leases.hold(key)
            record.claim = key
            return Verdict.RUN
        metrics.dedup(record.topic, "hit")
        metrics.outcome(record.topic, "duplicate_skipped", "")
        log.info("skipping %s: already processed", key)
        return Verdict.DUPLICATE

    def claim_ahead(self, msgs: list[Any]) -> None:
        """Claim a fetched batch's messages in one round trip (up to the first twin: what
        follows is claimed one by one); :meth:`claim` then answers from what the store said.
        End with :meth:`release_ahead`. A store failure here changes nothing: each record's
        own claim decides."""
        if self._claim_many is None or len(msgs) < 2:
            return
        keys: list[str] = []
        seen: set[str] = set()
        ids = self._ahead_ids
        group, key_of = self._group, self._key_of
        for msg in msgs:
            if msg.error() is not None:
                continue
            try:
                key = f"{group}|{key_of(msg)}"
            except Exception:
                continue  # its own claim raises DedupKeyError
            if key in seen:
                break
            seen.add(key)
            ids[id(msg)] = key
            keys.append(key)
        try:
            answers = self._claim_many(keys, self._owner, self._lease)
        except DedupStoreError:
            return
        self._ahead = ahead = dict(zip(keys, answers, strict=True))
        claimed = [key for key, answer in ahead.items() if answer == NEW]
        self._leases.hold_many(claimed)  # renewed while they wait for their turn
        if claimed:  # the store's misses, counted once per topic for the batch
            misses: dict[str, int] = {}
            for msg in msgs:
                if ahead.get(ids.get(id(msg), "")) == NEW:
                    misses[msg.topic()] = misses.get(msg.topic(), 0) + 1
            for topic, count in misses.items():
                self._metrics.dedup(topic, "miss", count)

    def release_ahead(self) -> None:
        """Give back what was claimed ahead for records that were not handed out (rewound,
        skipped, or the batch cut short)."""
        ahead, self._ahead = self._ahead, {}
        self._ahead_ids.clear()
        for key, answer in ahead.items():
            if answer == NEW:
                self._leases.drop(key)
                try:
                    self._store.release(key, self._owner)
                except DedupStoreError as exc:  # the lease runs out on its own
                    log.warning("dedup store failed to release %s: %s", key, exc)

    def defer(self) -> None:
        """Keep completions until :meth:`flush` (one round trip for a fetched batch)."""
        if self._complete_many is not None:
            self._deferred = []
            self._deferring = threading.get_ident()

    def flush(self) -> None:
        """Write the kept completions."""
        deferred = self._deferred
        self._deferred = None
        if not deferred:
            return
        claims = [record.claim for record in deferred]
        for record in deferred:
            record.claim = None
        lost = self._leases.drop_many(claims)  # type: ignore[arg-type]
        try:
            answers = self._complete_many(claims, self._owner)
        except DedupStoreError as exc:  # the side effects happened: nothing to undo
            self._metrics.dedup(deferred[0].topic, "error")
            log.error("dedup store failed to record %d messages as processed: %s", len(claims), exc)
            return
        for record, claim, ours in zip(deferred, claims, answers, strict=True):
            if ours is False or claim in lost:
                self._completed(record, claim, claim not in lost, ours)  # type: ignore[arg-type]

    def complete(self, record: Record) -> None:
        """``record`` was processed: its claim becomes a done entry (now, or at
        :meth:`flush`)."""
        claim = record.claim
        if claim is None:
            return
        self._in_hand.discard(claim)
        if self._deferred is not None:
            self._deferred.append(record)
            return
        record.claim = None
        kept = self._leases.drop(claim)
        try:
            ours = self._store.complete(claim, self._owner)
        except DedupStoreError as exc:  # the side effect happened: nothing to undo
            self._metrics.dedup(record.topic, "error")
            log.error("dedup store failed to record %s as processed: %s", claim, exc)
            return
        self._completed(record, claim, kept, ours)

    def _completed(self, record: Record, claim: str, kept: bool, ours: bool | None) -> None:
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


def _batched(store: Any, name: str, single: str) -> Any:
    """The store's batch method ``name``, unless it has none or ``single`` is overridden below
    the class that defines it (a subclass changing ``claim`` must not be bypassed)."""
    if getattr(store, name, None) is None:
        return None
    mro = type(store).__mro__

    def depth(attr: str) -> int:
        return next((i for i, cls in enumerate(mro) if attr in vars(cls)), len(mro))

    return getattr(store, name) if depth(name) <= depth(single) else None


def _owner_name() -> str:
    import uuid

    return uuid.uuid4().hex  # this consumer's name in dedup claims
