"""What happens to a failed message: how often and when it is retried, and where it ends up."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class RetryPolicy:
    """Non-blocking retries through delay topics: one topic per entry of ``delays`` (seconds).

    ``retry_on`` exceptions are retried, ``dead_letter_on`` ones (checked first, also on the
    ``__cause__`` chain) go straight to the DLQ, anything else is non-retryable too. ``timeout``
    is a budget in seconds from the first failure: a failure after it dead-letters.
    ``jitter`` spreads each due time by up to that fraction of its delay (0.1 = ±10 %).
    """

    delays: tuple[float, ...] = (1.0, 10.0, 60.0)
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    dead_letter_on: tuple[type[BaseException], ...] = ()
    timeout: float | None = None
    jitter: float = 0.0
    topic_template: str = "{topic}.{group}.retry.{n}"
    _random: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        delays = tuple(self.delays)
        if any(not isinstance(d, int | float) or d < 0 for d in delays):
            raise ConfigurationError(f"retry delays must be non-negative seconds, got {delays!r}")
        object.__setattr__(self, "delays", tuple(float(d) for d in delays))
        object.__setattr__(self, "retry_on", _exception_classes(self.retry_on, "retry_on"))
        object.__setattr__(
            self, "dead_letter_on", _exception_classes(self.dead_letter_on, "dead_letter_on")
        )
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigurationError(f"retry timeout must be positive seconds, got {self.timeout}")
        if not 0 <= self.jitter < 1:
            raise ConfigurationError(f"jitter must be in [0, 1), got {self.jitter}")
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


@dataclass(frozen=True)
class DeadLetterPolicy:
    """Where messages that will not be retried go, and how their diagnostics are bounded.

    ``max_text_bytes`` bounds each of the exception message and stack trace headers (UTF-8).
    """

    topic_template: str = "{topic}.{group}.dlq"
    max_text_bytes: int = 8192

    def __post_init__(self) -> None:
        if self.max_text_bytes < 64:
            raise ConfigurationError(f"max_text_bytes must be >= 64, got {self.max_text_bytes}")

    def topic(self, source: str, group: str) -> str:
        return topic_name(self.topic_template, topic=source, group=group)
