"""Topics, consumer groups and the timing profiles every process of the system shares."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from resilient_kafka import DeadLetterPolicy, RetryPolicy

NAMESPACE = "orders"

ORDER_EVENTS = f"{NAMESPACE}.order-events"
INVENTORY_COMMANDS = f"{NAMESPACE}.inventory-commands"
INVENTORY_EVENTS = f"{NAMESPACE}.inventory-events"
PAYMENT_COMMANDS = f"{NAMESPACE}.payment-commands"
PAYMENT_EVENTS = f"{NAMESPACE}.payment-events"
SHIPPING_COMMANDS = f"{NAMESPACE}.shipping-commands"
SHIPPING_EVENTS = f"{NAMESPACE}.shipping-events"

TOPICS = (
    ORDER_EVENTS,
    INVENTORY_COMMANDS,
    INVENTORY_EVENTS,
    PAYMENT_COMMANDS,
    PAYMENT_EVENTS,
    SHIPPING_COMMANDS,
    SHIPPING_EVENTS,
)

# consumer group -> the topics it reads. Each (topic, group) pair has its own retry tiers and DLQ.
GROUPS: dict[str, tuple[str, ...]] = {
    "order-saga": (INVENTORY_EVENTS, PAYMENT_EVENTS, SHIPPING_EVENTS),
    "inventory": (INVENTORY_COMMANDS,),
    "payments": (PAYMENT_COMMANDS,),
    "shipping": (SHIPPING_COMMANDS,),
    "shipping-ledger": (SHIPPING_EVENTS,),
    "order-view": (ORDER_EVENTS, INVENTORY_EVENTS, PAYMENT_EVENTS, SHIPPING_EVENTS),
}

SERVICES = ("inventory", "payments", "shipping", "orders", "view")

SKUS = {"apple": 400, "pear": 300, "plum": 200, "fig": 60}
PRICES = {"apple": 120, "pear": 150, "plum": 90, "fig": 300}  # cents


@dataclass(frozen=True)
class Profile:
    """Timing and failure rates: ``normal`` is for watching, ``short`` and ``full`` for chaos."""

    name: str = "normal"
    partitions: int = 3
    retry_delays: tuple[float, ...] = (1.0, 5.0)
    payment_retry_delays: tuple[float, ...] = (1.0, 5.0, 15.0)
    breaker_fail_max: int = 5
    breaker_reset: float = 5.0
    step_timeout: float = 10.0  # the saga sends a step again when no reply came in this long
    step_timeout_max: float = 40.0
    ship_fail_pct: int = 8  # orders whose shipment fails for good (drives compensations)
    carrier_busy_pct: int = 5  # shipments that fail once, transiently (drives retry tiers)
    decline_pct: int = 4  # cards the gateway declines
    gateway_error_pct: int = 5  # gateway answers 503 now and then
    gateway_latency_ms: tuple[int, int] = (20, 150)
    dedup_lease: float = 10.0  # a killed process's claims expire this fast
    transaction_interval: float = 0.2  # inventory's exactly-once commits
    tansu_kill_safe: bool = False  # producers without idempotence (service.producer_config)
    stock: dict[str, int] = field(default_factory=lambda: dict(SKUS))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Profile:
        data = dict(data)
        for name in ("retry_delays", "payment_retry_delays", "gateway_latency_ms"):
            if name in data:
                data[name] = tuple(data[name])
        return cls(**data)


PROFILES = {
    "normal": Profile(),
    "short": Profile(
        name="short",
        partitions=2,
        retry_delays=(0.5, 2.0),
        payment_retry_delays=(0.5, 2.0, 4.0),
        breaker_fail_max=3,
        breaker_reset=1.0,
        step_timeout=6.0,
        step_timeout_max=20.0,
        dedup_lease=8.0,
    ),
    # S3-backed storage (for the broker kill) costs every commit a round of object writes:
    # fewer partitions and transactions, and step timeouts above the slower replies
    "full": Profile(
        name="full",
        partitions=2,
        breaker_reset=3.0,
        transaction_interval=0.5,
        step_timeout=15.0,
        step_timeout_max=60.0,
    ),
}


def retry_policy(profile: Profile, retry_on: tuple[type[BaseException], ...]) -> RetryPolicy:
    return RetryPolicy(delays=profile.retry_delays, retry_on=retry_on)


def dead_letter_policy() -> DeadLetterPolicy:
    # a flood of dead letters (a bug, a bad deploy) pauses the consumer instead of emptying
    # the topic into the DLQ
    return DeadLetterPolicy(max_consecutive=20, max_ratio=0.5, on_flood="pause")


def derived_topics(profile: Profile) -> dict[str, list[str]]:
    """``{"retry": [...], "dlq": [...]}``: the topics the library creates for every group."""
    retry: list[str] = []
    dlq: list[str] = []
    for group, topics in GROUPS.items():
        delays = profile.payment_retry_delays if group == "payments" else profile.retry_delays
        policy = RetryPolicy(delays=delays)
        for topic in topics:
            retry += [policy.topic(topic, group, n) for n in range(1, len(delays) + 1)]
            dlq.append(DeadLetterPolicy().topic(topic, group))
    return {"retry": retry, "dlq": dlq}


@dataclass(frozen=True)
class ServiceSettings:
    """What the harness hands a service process (one JSON argument; never a secret: those come
    from the file named by ``KAFKA_CLIENT_PROPERTIES``)."""

    name: str
    bootstrap: str
    workdir: str
    profile: Profile
    http_port: int = 0
    metrics_port: int = 0
    gateway_url: str = ""
    seed: int = 0

    def to_argv(self) -> str:
        return json.dumps({**asdict(self), "profile": self.profile.to_json()})

    @classmethod
    def from_argv(cls, text: str) -> ServiceSettings:
        data = json.loads(text)
        return cls(**{**data, "profile": Profile.from_json(data["profile"])})

    def but(self, **changes: Any) -> ServiceSettings:
        return replace(self, **changes)
