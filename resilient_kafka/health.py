"""Liveness, readiness and stalls: what a Kubernetes probe asks of a consumer.

The consumer's parts report what they own (the loop: when it last polled; partition control:
the assignment; the commit barrier: records outstanding and its progress); :class:`Health` turns
them into the answers of ``/healthz`` and ``/readyz`` and a stall signal. Probes and scrapes
read it from the metrics server's threads: nothing here runs on the hot path.

- **Live**: the loop polled within ``max.poll.interval.ms`` (the group would drop a member that
  does not), and no fatal error ended it. A downstream outage, a rebalance or a broker that is
  down keeps a consumer live: restarting it would not help.
- **Ready**: running, and the group gave it its assignment (an empty one too: more members than
  partitions is legitimately idle), and not stopping.
- **Stalled**: records are outstanding (handed out, not yet done) and none has been done for
  ``stall_timeout`` seconds. A signal for alerts, not a probe answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from resilient_kafka.errors import ConfigurationError

STARTING, RUNNING, STOPPING, CLOSED, FAILED = "starting", "running", "stopping", "closed", "failed"


@dataclass(frozen=True)
class HealthReport:
    """One answer, as ``/healthz`` and ``/readyz`` return it (JSON)."""

    live: bool
    ready: bool
    stalled: bool
    state: str
    reasons: list[str]
    seconds_since_poll: float | None
    max_poll_interval_seconds: float
    assigned_partitions: int
    outstanding_records: int
    seconds_since_progress: float | None
    stall_timeout_seconds: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Signals:
    """What the consumer's parts tell, each read when asked (from any thread)."""

    state: Callable[[], str]  # STARTING, RUNNING, STOPPING, CLOSED or FAILED
    failure: Callable[[], str | None]  # what ended it, when FAILED
    polled_at: Callable[[], float | None]  # time.monotonic() of the last poll, None if never
    joined: Callable[[], bool]  # an assignment was given (by the group, or assign())
    assigned: Callable[[], int]  # partitions assigned now
    outstanding: Callable[[], int]  # records handed out or held, not done yet
    progress: Callable[[], int]  # grows whenever a record is done


class Health:
    """The consumer's health, from its :class:`Signals`."""

    def __init__(
        self,
        signals: Signals,
        *,
        max_poll_interval: float,
        stall_timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (
            isinstance(stall_timeout, bool)
            or not isinstance(stall_timeout, int | float)
            or not stall_timeout > 0
        ):
            raise ConfigurationError(
                f"stall_timeout must be a positive number of seconds, got {stall_timeout!r}"
            )
        self._signals = signals
        self.max_poll_interval = max_poll_interval
        self.stall_timeout = stall_timeout
        self._clock = clock  # the signals' clock (polled_at)
        self._created = clock()
        self._lock = threading.Lock()  # probes and scrapes come on threads of their own
        self._progress: int | None = None
        self._progressed_at = self._created

    def _since_progress(self, now: float, outstanding: int) -> float | None:
        """Seconds since a record was last seen done (None with nothing outstanding). Progress
        is sampled at each report: the answer is as fine as probes and scrapes are frequent."""
        progress = self._signals.progress()
        with self._lock:
            if progress != self._progress or outstanding == 0:
                self._progress = progress
                self._progressed_at = now
            since = now - self._progressed_at
        return since if outstanding else None

    def report(self) -> HealthReport:
        signals = self._signals
        now = self._clock()
        state = signals.state()
        polled_at = signals.polled_at()
        since_poll = None if polled_at is None else now - polled_at
        outstanding = signals.outstanding()
        since_progress = self._since_progress(now, outstanding)
        stalled = since_progress is not None and since_progress >= self.stall_timeout
        joined = signals.joined()
        reasons: list[str] = []
        live = True
        if state == FAILED:
            live = False
            reasons.append(f"failed: {signals.failure() or 'fatal error'}")
        elif state == CLOSED:
            live = False
            reasons.append("closed")
        elif since_poll is None:
            waited = now - self._created
            if waited > self.max_poll_interval:
                live = False
                reasons.append(f"never polled in the {waited:.0f} s since it was created")
            else:
                reasons.append("not polled yet")
        elif since_poll > self.max_poll_interval and state != STOPPING:
            live = False
            reasons.append(
                f"no poll for {since_poll:.0f} s (max.poll.interval.ms is "
                f"{self.max_poll_interval:.0f} s): a handler is stuck or the loop ended"
            )
        ready = live and state == RUNNING and joined
        if state == STOPPING:
            reasons.append("stopping")
        elif live and not joined:
            reasons.append("waiting for the group to assign partitions")
        if stalled:
            reasons.append(
                f"stalled: {outstanding} record(s) outstanding, none done for "
                f"{since_progress:.0f} s"
            )
        return HealthReport(
            live=live,
            ready=ready,
            stalled=stalled,
            state=state,
            reasons=reasons,
            seconds_since_poll=None if since_poll is None else round(since_poll, 3),
            max_poll_interval_seconds=self.max_poll_interval,
            assigned_partitions=signals.assigned(),
            outstanding_records=outstanding,
            seconds_since_progress=None if since_progress is None else round(since_progress, 3),
            stall_timeout_seconds=self.stall_timeout,
        )
