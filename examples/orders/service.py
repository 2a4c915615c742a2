"""What every service process shares: its settings, its Kafka clients and its readiness line.

Services use only resilient-kafka's public API. Settings come as one JSON argument from the
harness; TLS/SASL settings of a real cluster come from the file named by
``KAFKA_CLIENT_PROPERTIES`` (read here, never passed on a command line).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from examples.orders import config as c
from examples.orders import schemas
from resilient_kafka import ResilientConsumer, RetryPolicy, TransactionError
from resilient_kafka.dedup import SQLiteStore
from resilient_kafka.testing import ExternalKafka


def settings() -> c.ServiceSettings:
    if len(sys.argv) != 2:
        sys.exit(f"usage: python -m {sys.argv[0]} '<settings JSON>' (the harness starts services)")
    s = c.ServiceSettings.from_argv(sys.argv[1])
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>`: every thread's stack, in the log
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {s.name}[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    return s


def cluster(s: c.ServiceSettings) -> ExternalKafka:
    found = ExternalKafka.from_env()  # KAFKA_BOOTSTRAP_SERVERS + KAFKA_CLIENT_PROPERTIES
    if found is not None and found.bootstrap_servers == s.bootstrap:
        return found
    return ExternalKafka(s.bootstrap)


def producer_config(s: c.ServiceSettings, **extra: Any) -> dict[str, Any]:
    conf = cluster(s).producer_config(extra, linger_ms=5)
    if s.profile.tansu_kill_safe:
        # Tansu can lose an acknowledged idempotent batch when it is SIGKILLed (docs/testing.md);
        # one request in flight keeps order without idempotence, and duplicates are harmless:
        # every record has a deterministic rk.id that consumers deduplicate on.
        conf.update({"enable.idempotence": False, "max.in.flight.requests.per.connection": 1})
    return conf


def consumer(
    s: c.ServiceSettings,
    group: str,
    *,
    retry_on: tuple[type[BaseException], ...],
    dedup: bool = True,
    delays: Sequence[float] | None = None,
    metrics: bool = True,
    **kwargs: Any,
) -> ResilientConsumer:
    """A subscribed consumer of ``group``'s topics: retry tiers, a DLQ, the schema registry's
    deserializer and (unless ``dedup=False``) a SQLite dedup store next to the service's DB."""
    p = s.profile
    conf = cluster(s).client_config(
        {"group.id": group, "auto.offset.reset": "earliest", "client.id": f"{s.name}-{group}"}
    )
    consumer = ResilientConsumer(
        conf,
        retry=RetryPolicy(delays=tuple(delays or p.retry_delays), retry_on=retry_on),
        dead_letter=c.dead_letter_policy(),
        value_deserializer=schemas.deserialize,
        dedup=SQLiteStore(Path(s.workdir) / f"{group}-dedup.db") if dedup else None,
        dedup_lease=p.dedup_lease,
        metrics_port=s.metrics_port if metrics and s.metrics_port else None,
        **kwargs,
    )
    consumer.subscribe(list(c.GROUPS[group]))
    return consumer


def ready(s: c.ServiceSettings, **facts: Any) -> None:
    """The line the harness waits for before it counts the service as up."""
    detail = " ".join(f"{k}={v}" for k, v in facts.items())
    print(f"{s.name} ready {detail}".rstrip(), flush=True)


def reply_headers(record_id: str) -> list[tuple[str, bytes]]:
    return [("rk.id", record_id.encode())]


def run(consumer: ResilientConsumer, handler: Any, **kwargs: Any) -> None:
    """``consumer.run(handler)``; a consumer whose transactional producer is unusable (fenced by
    a newer instance, or a librdkafka call that never returned) ends the process at once with
    code 70, for the supervisor (Kubernetes, or the chaos harness) to start a fresh one: a
    blocked native call could hold a normal interpreter exit too."""
    try:
        consumer.run(handler, **kwargs)
    except TransactionError as exc:
        logging.getLogger("orders").error("exiting for a restart: %s", exc)
        logging.shutdown()
        sys.stdout.flush()
        os._exit(70)


class NotAcknowledged(Exception):
    """A record was not acknowledged in time, or its delivery failed: retry the input record
    (the same record, with the same ``rk.id``, goes again)."""


def produce_acknowledged(
    producer: Any, topic: str, value: bytes, key: str, record_id: str, timeout: float = 10.0
) -> None:
    """Produce one record and wait for *its* delivery report. Outside exactly-once mode a
    handler's own output is not under the commit barrier: the input's offset may commit only
    once the output is acknowledged. (``flush()`` would wait for every thread's records, and
    returns 0 for a record whose delivery failed too.)"""
    import threading
    import time

    done = threading.Event()
    failure: list[Any] = []

    def report(err: Any, _msg: Any) -> None:
        if err is not None:
            failure.append(err)
        done.set()

    producer.produce(
        topic, value, key=key.encode(), headers=reply_headers(record_id), on_delivery=report
    )
    deadline = time.monotonic() + timeout
    while not done.is_set() and time.monotonic() < deadline:
        producer.poll(0.05)  # serves delivery reports (any thread's: each sets its own event)
    if not done.is_set():
        raise NotAcknowledged(f"{record_id} not acknowledged within {timeout:.0f} s")
    if failure:
        raise NotAcknowledged(f"{record_id} not delivered: {failure[0]}")
