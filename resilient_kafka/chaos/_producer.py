"""The load of a chaos scenario (run as its own OS process): ``messages`` keyed records with
unique ids (``rk.id``), paced over ``duration`` seconds. Every acknowledged id is appended to
the acks file; a failed delivery is sent again (with the same id), as Trogdor's RoundTrip
workload does, so an outage delays records instead of dropping them.

``python -m resilient_kafka.chaos._producer '<json settings>'``
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from resilient_kafka import ResilientProducer
from resilient_kafka.chaos._stack import client_config

KEYS = 16


def records(messages: int, poison: int, seed: int) -> list[dict[str, Any]]:
    """The scenario's messages: ids m0000000..., 16 keys, per-key sequence numbers."""
    rng = random.Random(seed)
    poisoned = set(rng.sample(range(messages), min(poison, messages)))
    seqs = [0] * KEYS
    out = []
    for i in range(messages):
        key = i % KEYS
        out.append(
            {"id": f"m{i:07d}", "key": f"k{key:02d}", "seq": seqs[key], "poison": i in poisoned}
        )
        seqs[key] += 1
    return out


def main(settings: dict[str, Any]) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s producer %(name)s %(message)s")
    todo = records(settings["messages"], settings["poison"], settings["seed"])
    config = {
        **client_config(settings["bootstrap"], settings["external"]),
        "delivery.timeout.ms": 30000,
        "linger.ms": 5,
        # see runner.py: Tansu 0.6 loses an acknowledged in-flight batch of an idempotent
        # producer when it is SIGKILLed; re-sent duplicates are absorbed by the consumers' dedup
        "enable.idempotence": settings["idempotence"],
    }
    acks = open(settings["acks"], "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    retry: list[dict[str, Any]] = []
    producer = ResilientProducer(config, metrics=False)

    def report(record: dict[str, Any]) -> Any:
        def delivered(err: KafkaError | None, msg: Any) -> None:
            if err is None:
                acks.write(record["id"] + "\n")
            else:
                retry.append(record)

        return delivered

    def send(record: dict[str, Any]) -> None:
        nonlocal producer
        while True:
            try:
                producer.produce(
                    settings["topic"],
                    json.dumps(record).encode(),
                    key=record["key"],
                    headers={"rk.id": record["id"].encode()},
                    on_delivery=report(record),
                )
                return
            except BufferError:
                producer.poll(0.1)
            except KafkaException as exc:  # a fatal idempotence error: start a new producer
                error = exc.args[0] if exc.args else None
                if not isinstance(error, KafkaError) or not error.fatal():
                    raise
                producer = ResilientProducer(config, metrics=False)

    started = time.monotonic()
    interval = settings["duration"] / max(1, len(todo))
    for i, record in enumerate(todo):
        due = started + i * interval
        producer.poll(0)
        # poll() returns as soon as it has served a delivery report: wait out the pace in a loop
        # (one poll let the load run at the pace of the broker's acknowledgements instead)
        while (wait := due - time.monotonic()) > 0:
            producer.poll(wait)
        while retry:
            send(retry.pop(0))  # oldest first: keeps each key's order where it can
        send(record)
    deadline = time.monotonic() + settings["drain_timeout"]
    while time.monotonic() < deadline:
        producer.flush(1.0)
        while retry:
            send(retry.pop(0))
        if not retry and len(producer) == 0:
            break
    acks.close()
    print("done", flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
