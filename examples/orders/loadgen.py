"""The load: customers placing orders through the API, and a few poison records.

A client retries a failed POST with the *same* Idempotency-Key until the API answers (the orders
process may be down for a while in a chaos run): every order the load was told about is
"accepted", and accepted orders are what the invariants hold the system to.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Producer

from examples.orders import config as c
from examples.orders import web


@dataclass
class LoadGenerator:
    api: str
    rate: float = 10.0  # orders a second
    orders: int = 0  # 0: until stopped
    run_id: str = "run"
    seed: int = 7
    give_up_after: float = 120.0
    accepted: dict[str, float] = field(default_factory=dict)  # order id -> accepted at
    refused: list[str] = field(default_factory=list)  # a 4xx the load did not expect
    api_errors: int = 0  # failed attempts that a retry then got through
    finished_at: float = 0.0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._random = random.Random(self.seed)
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> LoadGenerator:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.give_up_after + 10)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def order(self, n: int) -> dict[str, Any]:
        skus = self._random.sample(sorted(c.PRICES), self._random.randint(1, 2))
        card = "".join(str(self._random.randint(0, 9)) for _ in range(16))
        return {
            "customer": f"customer-{n % 50}",
            "items": [{"sku": s, "qty": self._random.randint(1, 3)} for s in skus],
            "card": card,
        }

    def _run(self) -> None:
        n = 0
        start = time.monotonic()
        while not self._stop.is_set() and (not self.orders or n < self.orders):
            self._place(n, self.order(n))
            n += 1
            pause = start + n / self.rate - time.monotonic()
            if pause > 0:
                self._stop.wait(pause)
        self.finished_at = time.time()

    def _place(self, n: int, body: dict[str, Any]) -> None:
        key = f"{self.run_id}-{n}"
        deadline = time.monotonic() + self.give_up_after
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                answer = web.call(
                    "POST", f"{self.api}/orders", body, headers={"Idempotency-Key": key}, timeout=5
                )
                with self._lock:
                    self.accepted[answer["order_id"]] = time.time()
                return
            except web.HttpError as exc:
                if 400 <= exc.status < 500:
                    self.refused.append(f"{key}: {exc}")
                    return
                self.api_errors += 1  # down, or 5xx: the same key again, later
                self._stop.wait(0.5)


# Records no consumer can read, and where each must end up: (topic, value, why)
POISON: list[tuple[str, bytes, str]] = [
    (
        c.PAYMENT_COMMANDS,
        json.dumps(
            {
                "type": "ChargePayment",
                "v": 99,
                "id": "",
                "order_id": "o-poison",
                "command_id": "o-poison:charge",
                "at": 0,
                "data": {"amount_cents": 1, "card": "4000"},
            }
        ).encode(),
        "a schema version from the future (v99)",
    ),
    (
        c.INVENTORY_COMMANDS,
        json.dumps(
            {
                "type": "ReserveStock",
                "v": 2,
                "id": "",
                "order_id": "o-poison",
                "command_id": "o-poison:reserve",
                "at": 0,
                "data": {"items": []},
            }
        ).encode(),
        "an unknown schema version (v2) under exactly-once",
    ),
    (c.SHIPPING_COMMANDS, b"\x00\x01 not json", "bytes that are not JSON"),
    (
        c.ORDER_EVENTS,
        json.dumps(
            {
                "type": "OrderCancelledByCustomer",
                "v": 1,
                "id": "",
                "order_id": "o-poison",
                "at": 0,
                "data": {},
            }
        ).encode(),
        "an event type no schema defines",
    ),
]


def inject_poison(config: dict[str, Any], run_id: str) -> dict[str, tuple[str, str]]:
    """Produce the poison records; returns ``{rk.id: (topic, why)}``."""
    producer = Producer({**config, "enable.idempotence": True})
    expected: dict[str, tuple[str, str]] = {}
    for n, (topic, value, why) in enumerate(POISON):
        record_id = f"poison-{run_id}-{n}"
        producer.produce(topic, value, key=b"o-poison", headers=[("rk.id", record_id.encode())])
        expected[record_id] = (topic, why)
    if producer.flush(30):
        raise RuntimeError("poison records not acknowledged within 30 s")
    return expected
