"""Circuit breakers around downstream calls, and what a consumer needs to know about them.

A refused call (the breaker is open) is a symptom of an outage, not of the message: the
consumer pauses instead of failing the message, and probes when the breaker's reset timeout
has passed. Any ``pybreaker.CircuitBreaker`` works; :class:`CircuitBreaker` only adds defaults
suited to consumers and a required name.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import pybreaker

from resilient_kafka.errors import ConfigurationError

CircuitBreakerError = pybreaker.CircuitBreakerError
OPEN, HALF_OPEN, CLOSED = pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN, pybreaker.STATE_CLOSED
T = TypeVar("T")


class CircuitBreaker(pybreaker.CircuitBreaker):
    """A ``pybreaker.CircuitBreaker`` with a name, ``fail_max=5`` and ``reset_timeout=30`` s.

    ``exclude`` lists exceptions that say nothing about the downstream's health (a declined
    payment, a validation error) and so never trip the breaker.
    """

    def __init__(
        self,
        name: str,
        fail_max: int = 5,
        reset_timeout: float = 30.0,
        *,
        success_threshold: int = 1,
        exclude: Iterable[type[BaseException]] | None = None,
        listeners: Sequence[pybreaker.CircuitBreakerListener] | None = None,
        state_storage: pybreaker.CircuitBreakerStorage | None = None,
    ) -> None:
        if not name:
            raise ConfigurationError("a CircuitBreaker needs a name (it labels logs and metrics)")
        if fail_max < 1 or reset_timeout <= 0:
            raise ConfigurationError(
                f"breaker {name!r}: fail_max must be >= 1 and reset_timeout > 0 "
                f"(got {fail_max} and {reset_timeout})"
            )
        super().__init__(
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            success_threshold=success_threshold,
            exclude=list(exclude or ()),
            listeners=list(listeners or ()),
            state_storage=state_storage,
            name=name,
            throw_new_error_on_trip=True,
        )

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``pybreaker.CircuitBreaker.call``, but a closed breaker does not hold its lock
        around the guarded call: pybreaker's does, so concurrent handlers calling through one
        breaker would run one at a time. Open and half-open keep pybreaker's behaviour (the
        trial call runs alone). The outcome of a call that started closed updates the breaker
        only if it is still in that state (a trip in the meantime has said it all)."""
        with self._lock:
            state = self.state
            if state.name != CLOSED:
                return state.call(func, *args, **kwargs)
            state.before_call(func, *args, **kwargs)
            for listener in self.listeners:
                listener.before_call(self, func, *args, **kwargs)
        try:
            result = func(*args, **kwargs)
        except BaseException as exc:
            with self._lock:
                if self.state is state:
                    state._handle_error(exc)  # counts it, may trip, re-raises
            raise
        if isinstance(result, types.GeneratorType):  # pybreaker's way: settled as it runs
            return state.generator_call(result)  # type: ignore[no-untyped-call, no-any-return]
        with self._lock:
            if self.state is state:
                state._handle_success()
        return result

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} {self.current_state}>"


def redis_storage(redis_client: Any, name: str) -> pybreaker.CircuitRedisStorage:
    """Breaker state kept in Redis under ``name``, shared by every process that uses it."""
    return pybreaker.CircuitRedisStorage(CLOSED, redis_client, namespace=name)


def probe_due_at(breaker: pybreaker.CircuitBreaker) -> float | None:
    """Epoch seconds at which an open breaker lets a trial call through; None if not open."""
    if breaker.current_state != OPEN:
        return None
    opened_at: datetime | None = breaker._state_storage.opened_at
    if opened_at is None:
        return datetime.now(UTC).timestamp()
    return float(opened_at.timestamp() + breaker.reset_timeout)


class BreakerWatch(pybreaker.CircuitBreakerListener):
    """Counts transitions to open, so the consumer can tell that a call tripped a breaker even
    when the breaker re-raises the original exception (``throw_new_error_on_trip=False``)."""

    def __init__(self) -> None:
        self.opens = 0
        self._lock = threading.Lock()
        self._metrics: dict[int, Any] = {}  # id(breaker) -> BreakerMetrics

    def track(self, breaker: Any, fam: Any) -> None:
        """Feed this breaker's calls and states into the metric families ``fam``."""
        from resilient_kafka.metrics import BreakerMetrics

        name = getattr(breaker, "name", None) or f"breaker-{id(breaker):x}"
        self._metrics[id(breaker)] = BreakerMetrics(fam, name, breaker.current_state)

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        if new_state is not None and new_state.name == OPEN:
            with self._lock:
                self.opens += 1
        metrics = self._metrics.get(id(cb))
        if metrics is not None and new_state is not None:
            metrics.set_state(new_state.name)

    def success(self, cb: Any) -> None:
        metrics = self._metrics.get(id(cb))
        if metrics is not None:
            metrics.call("successful")

    def failure(self, cb: Any, exc: BaseException) -> None:
        metrics = self._metrics.get(id(cb))
        if metrics is not None:
            metrics.call("failed")

    def refused(self, breakers: Iterable[Any]) -> None:
        """A call was refused: count it against the registered breakers that are open."""
        for breaker in breakers:
            metrics = self._metrics.get(id(breaker))
            if metrics is not None and breaker.current_state == OPEN:
                metrics.not_permitted()
