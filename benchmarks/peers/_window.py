"""The timed window of the concurrency benchmark, shared by ``benchmarks.concurrency`` and the
concurrent peers (which import it as a sibling module: no resilient_kafka in their process).

Counts the records handled in ``seconds`` after the first one (or until they run out), then
calls ``stop`` (from a timer thread); checks per-key order: a key's records (key and partition)
must reach the point where the handler reports them (its end) in offset order, else it is a
reorder. A handler that calls :meth:`Window.begin` first also has its overlaps counted: records
that start while another record of their key is still running (order kept by luck of timing
shows as 0 reorders, never as 0 overlaps).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class Window:
    def __init__(self, seconds: float, stop: Callable[[], object]) -> None:
        self.seconds = seconds
        self._stop = stop
        self.lock = threading.Lock()
        self.count = 0
        self.started = 0.0
        self.last = 0.0
        self.offsets: dict[tuple[int, Any], int] = {}
        self.reorders = 0
        self.running: dict[tuple[int, Any], int] = {}
        self.overlaps = 0

    def begin(self, partition: int, key: Any) -> None:
        """A handler starts on a record of this key."""
        slot = (partition, key)
        with self.lock:
            running = self.running.get(slot, 0)
            if running:
                self.overlaps += 1
            self.running[slot] = running + 1

    def handled(self, partition: int, key: Any, offset: int) -> bool:
        """Records one handled record; True when it counted (inside the window)."""
        now = time.perf_counter()
        with self.lock:
            slot = (partition, key)
            running = self.running.get(slot, 0)
            if running:
                self.running[slot] = running - 1
            if self.offsets.get(slot, -1) > offset:
                self.reorders += 1
            self.offsets[slot] = offset
            if not self.started:
                self.started = now
                # the window ends on time even if the records run out before it
                timer = threading.Timer(self.seconds, self._stop)
                timer.daemon = True
                timer.start()
            elif now - self.started <= self.seconds:
                self.count += 1
                self.last = now
                return True
            return False

    @property
    def elapsed(self) -> float:
        return self.last - self.started

    @property
    def rate(self) -> float:
        elapsed = self.elapsed
        return self.count / elapsed if elapsed > 0 else 0.0

    def result(self) -> dict[str, Any]:
        """What a peer prints (one JSON line) and benchmarks.concurrency reads back."""
        return {
            "count": self.count,
            "elapsed": self.elapsed,
            "reorders": self.reorders,
            "overlaps": self.overlaps,
        }
