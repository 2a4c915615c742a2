"""Lease renewal for dedup claims.

A claim's lease is what lets another consumer take over a message whose owner died; a handler
that runs longer than the lease would lose its claim while still running, and a second consumer
could run the same side effect at the same time. So while a consumer holds claims, a daemon
thread renews them every third of the lease: a live owner keeps its claims for as long as it
works on them, a dead one loses them within one lease.
"""

from __future__ import annotations

import logging
import threading

from resilient_kafka.dedup import NEW, DedupStore, DedupStoreError

log = logging.getLogger("resilient_kafka.dedup")


class LeaseKeeper:
    """Renews the claims one consumer holds (``hold`` after a NEW claim, ``drop`` before it is
    completed or released)."""

    def __init__(self, store: DedupStore, owner: str, lease: float) -> None:
        self._store = store
        self._owner = owner
        self._lease = lease
        self._keys: set[str] = set()
        self._lock = threading.Lock()  # held while renewing: a dropped key is never renewed
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: set[str] = set()  # claims another owner took before this one finished

    def hold(self, key: str) -> None:
        with self._lock:
            self._keys.add(key)
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(
                    target=self._renew_loop, name="resilient-kafka-dedup-lease", daemon=True
                )
                self._thread.start()

    def hold_many(self, keys: list[str]) -> None:
        """:meth:`hold` for each of ``keys``."""
        if not keys:
            return
        with self._lock:
            self._keys.update(keys)
        self.hold(keys[0])  # (starts the renewing thread)

    def drop_many(self, keys: list[str]) -> set[str]:
        """:meth:`drop` for each of ``keys``; returns those found lost."""
        with self._lock:
            self._keys.difference_update(keys)
            lost = self.lost.intersection(keys) if self.lost else set()
            self.lost -= lost
            return lost

    def drop(self, key: str) -> bool:
        """Stop renewing ``key``; False if the claim was found lost while renewing it."""
        with self._lock:
            self._keys.discard(key)
            if key in self.lost:
                self.lost.discard(key)
                return False
            return True

    def _renew_loop(self) -> None:
        while not self._closed.wait(self._lease / 3):
            with self._lock:
                for key in list(self._keys):
                    self._renew(key)

    def _renew(self, key: str) -> None:
        try:
            verdict = self._store.claim(key, self._owner, self._lease)
        except DedupStoreError as exc:
            log.warning("cannot renew the dedup claim on %s (retried): %s", key, exc)
            return
        except Exception:  # a custom store's bug must not end the renewals of the others
            log.exception("dedup store failed renewing the claim on %s", key)
            return
        if verdict != NEW:
            self._keys.discard(key)
            self.lost.add(key)
            log.warning(
                "the dedup claim on %s was lost while its handler ran (%s): another consumer "
                "may be processing it too",
                key,
                verdict,
            )

    def close(self) -> None:
        self._closed.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
