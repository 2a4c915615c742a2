"""What happens to a failed message: how often and when it is retried, and where it ends up."""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from resilient_kafka.errors import ConfigurationError

_LEGAL_TOPIC = re.compile(r"[A-Za-z0-9._-]+")
_MAX_TOPIC_LENGTH = 249


def topic_name(template: str, *, topic: str, group: str, n: int | None = None) -> str:
    """Fill a naming template and check the result is a legal Kafka topic name."""
    try:
        name = template.format(topic=topic, group=group, n=n)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigurationError(
            f"bad topic name template {template!r}: {exc!s}; "
            "use the fields {topic}, {group} and (retry tiers) {n}"
        ) from None
    if not _LEGAL_TOPIC.fullmatch(name) or name in {".", ".."} or len(name) > _MAX_TOPIC_LENGTH:
        raise ConfigurationError(
            f"{name!r} (from template {template!r}, topic {topic!r}, group {group!r}) is not a "
            f"legal Kafka topic name: use only letters, digits, '.', '_' and '-', at most "
            f"{_MAX_TOPIC_LENGTH} characters. Choose a group.id or template that fits."
        )
    return name


def _exception_classes(value: object, what: str) -> tuple[type[BaseException], ...]:
    classes = value if isinstance(value, tuple | list) else (value,)
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise ConfigurationError(f"{what} must be exception classes, got {cls!r}")
    return tuple(classes)


def _number(value: object) -> bool:
    """A finite real number (a bool is not one here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class RetryPolicy:
    """Non-blocking retries through delay topics: one topic per entry of ``delays`` (seconds).

    ``retry_on`` exceptions are retried, ``dead_letter_on`` ones (checked first, also on the
    ``__cause__`` chain) go straight to the DLQ, anything else is non-retryable too. ``timeout``
    is a budget in seconds from the first failure: a failure after it dead-letters.
    ``jitter`` spreads each due time by up to that fraction of its delay (0.1 = ±10 %).

    ``blocking_stop``/``blocking_wait`` (tenacity strategies, e.g. ``stop_after_attempt(3)`` and
    ``wait_exponential(0.1, max=2)``) retry a retryable failure in place first, in ``run()``; only
    when they give up does the message go to a retry topic. Their worst-case total wait must fit
    in ``max.poll.interval.ms`` (checked when the consumer is built).
    """

    delays: tuple[float, ...] = (1.0, 10.0, 60.0)
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    dead_letter_on: tuple[type[BaseException], ...] = ()
    timeout: float | None = None
    jitter: float = 0.0
    topic_template: str = "{topic}.{group}.retry.{n}"
    blocking_stop: Any = None
    blocking_wait: Any = None
    _random: random.Random = field(default_factory=random.Random, repr=False, compare=False)
    _blocking_budget: float = field(default=0.0, repr=False, compare=False)

    def __post_init__(self) -> None:
        given: Any = self.delays
        iterable = hasattr(given, "__iter__") and not isinstance(given, str | bytes)
        delays: tuple[Any, ...] = tuple(given) if iterable else (given,)
        if any(not _number(d) or d < 0 for d in delays):
            raise ConfigurationError(f"retry delays must be non-negative seconds, got {delays!r}")
        object.__setattr__(self, "delays", tuple(float(d) for d in delays))
        object.__setattr__(self, "retry_on", _exception_classes(self.retry_on, "retry_on"))
        object.__setattr__(
            self, "dead_letter_on", _exception_classes(self.dead_letter_on, "dead_letter_on")
        )
        if self.timeout is not None and not (_number(self.timeout) and self.timeout > 0):
            raise ConfigurationError(f"retry timeout must be positive seconds, got {self.timeout}")
        if not (_number(self.jitter) and 0 <= self.jitter < 1):
            raise ConfigurationError(f"jitter must be in [0, 1), got {self.jitter}")
        if self.blocking_stop is not None or self.blocking_wait is not None:
            object.__setattr__(self, "_blocking_budget", _worst_case_wait(self))
        if "{n}" not in self.topic_template:
            raise ConfigurationError(
                f"retry topic template {self.topic_template!r} must contain {{n}} (the tier)"
            )

    @classmethod
    def exponential(
        cls,
        initial: float = 1.0,
        multiplier: float = 2.0,
        max_delay: float = 300.0,
        attempts: int = 3,
        jitter: float = 0.1,
        **kwargs: object,
    ) -> RetryPolicy:
        """``attempts`` tiers with delays ``initial * multiplier**i``, capped at ``max_delay``."""
        if attempts < 1 or initial <= 0 or multiplier < 1 or max_delay < initial:
            raise ConfigurationError(
                "exponential retry needs attempts >= 1, initial > 0, multiplier >= 1 and "
                f"max_delay >= initial (got {attempts}, {initial}, {multiplier}, {max_delay})"
            )
        delays = tuple(min(initial * multiplier**i, max_delay) for i in range(attempts))
        return cls(delays=delays, jitter=jitter, **kwargs)  # type: ignore[arg-type]

    @property
    def blocking(self) -> bool:
        """Whether failures are first retried in place (tenacity ``blocking_stop``/``_wait``)."""
        return self.blocking_stop is not None

    @property
    def blocking_budget(self) -> float:
        """The longest the in-place retries of one message can wait, in seconds."""
        return self._blocking_budget

    @property
    def attempts(self) -> int:
        """How many retries a message gets before the DLQ."""
        return len(self.delays)

    def is_retryable(self, exc: BaseException) -> bool:
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, self.dead_letter_on):
                return False
            cause = cause.__cause__
        return isinstance(exc, self.retry_on)

    def delay(self, tier: int) -> float:
        """Seconds to wait before tier ``tier`` (1-based) processes a record, jitter included."""
        base = self.delays[tier - 1]
        if not self.jitter:
            return base
        return max(0.0, base * (1 + self._random.uniform(-self.jitter, self.jitter)))

    def topic(self, source: str, group: str, tier: int) -> str:
        return topic_name(self.topic_template, topic=source, group=group, n=tier)


def _worst_case_wait(policy: RetryPolicy) -> float:
    """Simulate the blocking retries (handler time taken as zero) and add up their waits."""
    import tenacity

    if policy.blocking_stop is None:
        raise ConfigurationError(
            "blocking_wait needs blocking_stop too (e.g. tenacity.stop_after_attempt(3))"
        )
    wait = policy.blocking_wait or tenacity.wait_none()
    worst = 0.0
    for _run in range(20):  # random waits (jitter): take the largest of several runs
        state = tenacity.RetryCallState(tenacity.Retrying(), fn=None, args=(), kwargs={})
        state.start_time = 0.0
        total = 0.0
        for attempt in range(1, 10_001):
            state.attempt_number = attempt
            state.outcome_timestamp = total
            sleep = float(wait(state))
            state.upcoming_sleep = sleep
            if policy.blocking_stop(state):
                break
            total += sleep
            state.idle_for = total
        else:
            raise ConfigurationError(
                "blocking retries never stop within 10000 attempts: give blocking_stop a bound "
                "such as tenacity.stop_after_attempt(3) | tenacity.stop_after_delay(10)"
            )
        worst = max(worst, total)
    return worst


@dataclass(frozen=True)
class DeadLetterPolicy:
    """Where messages that will not be retried go, and how their diagnostics are bounded.

    ``max_text_bytes`` bounds each of the exception message and stack trace headers (UTF-8).
    The stack trace goes on the DLQ copy; ``stacktrace_on_retry=True`` puts it on every retry
    copy too (formatting it is most of what a failure costs).

    Flood guard: when more than ``max_consecutive`` records in a row, or more than ``max_ratio``
    of the last ``ratio_window`` outcomes, would be dead-lettered, the downstream is taken to be
    down: with ``on_flood="pause"`` the consumer holds the record, pauses and probes with
    ``flood_backoff`` (first, max seconds; doubling) instead of draining the topic into the DLQ;
    with ``"raise"`` it raises :class:`DeadLetterFloodError`. A lone poison record among
    successes still goes to the DLQ.
    """

    topic_template: str = "{topic}.{group}.dlq"
    max_text_bytes: int = 8192
    max_consecutive: int | None = None
    max_ratio: float | None = None
    ratio_window: int = 100
    on_flood: Literal["pause", "raise"] = "pause"
    flood_backoff: tuple[float, float] = (1.0, 60.0)
    stacktrace_on_retry: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.stacktrace_on_retry, bool):
            raise ConfigurationError(
                f"stacktrace_on_retry must be True or False, got {self.stacktrace_on_retry!r}"
            )
        if not (_integer(self.max_text_bytes) and self.max_text_bytes >= 64):
            raise ConfigurationError(f"max_text_bytes must be >= 64, got {self.max_text_bytes}")
        if self.max_consecutive is not None and not (
            _integer(self.max_consecutive) and self.max_consecutive >= 1
        ):
            raise ConfigurationError(f"max_consecutive must be >= 1, got {self.max_consecutive}")
        if self.max_ratio is not None and not (_number(self.max_ratio) and 0 < self.max_ratio < 1):
            raise ConfigurationError(f"max_ratio must be in (0, 1), got {self.max_ratio}")
        if not (_integer(self.ratio_window) and self.ratio_window >= 10):
            raise ConfigurationError(f"ratio_window must be >= 10, got {self.ratio_window}")
        if self.on_flood not in ("pause", "raise"):
            raise ConfigurationError(f"on_flood must be 'pause' or 'raise', got {self.on_flood!r}")
        backoff = self.flood_backoff
        if not (
            isinstance(backoff, tuple | list)
            and len(backoff) == 2
            and all(_number(b) for b in backoff)
            and 0 < backoff[0] <= backoff[1]
        ):
            raise ConfigurationError(
                "flood_backoff must be (first, max) with 0 < first <= max, "
                f"got {self.flood_backoff}"
            )

    @property
    def guarded(self) -> bool:
        """Whether a flood of dead letters is treated as an outage."""
        return self.max_consecutive is not None or self.max_ratio is not None

    def topic(self, source: str, group: str) -> str:
        return topic_name(self.topic_template, topic=source, group=group)
