"""Outage bookkeeping: which partitions are paused because the downstream is down, which record
is held back as the probe, and when to probe next; plus the DLQ flood counter."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from resilient_kafka.policies import DeadLetterPolicy

BREAKER = "breaker"
DLQ_FLOOD = "dlq-flood"
DEDUP_STORE = "dedup-store"  # the dedup store failed and on_dedup_error="pause"


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
        "trial_msg",
    )

    def __init__(self, reason: str, breakers: list[Any], backoff: float) -> None:
        self.reason = reason
        self.breakers = breakers  # the registered breakers that were open when it began
        self.partitions: set[tuple[str, int]] = set()
        self.held: Any = None  # the first refused record; None after its partition was revoked
        self.rewind: dict[tuple[str, int], int] = {}  # lowest refused offset per partition
        self.next_probe = 0.0  # time.monotonic() at which to probe
        self.probing = False  # a probe is out: waiting for its result
        self.probes = 0
        # a trial: one partition resumed until its first record arrives (then paused again)
        self.trial: tuple[str, int] | None = None
        self.trial_msg: Any = None
        self.probe_deadline = 0.0
        self.backoff = backoff
        self.started = time.monotonic()

    def is_probe(self, msg: Any) -> bool:
        """Whether ``msg`` is the record currently probing the downstream."""
        return self.probing and (msg is self.held or msg is self.trial_msg)


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
