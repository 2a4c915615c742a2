"""Topic administration shared by the consumer (retry/DLQ topics) and the test helpers."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from resilient_kafka.errors import TopicError


def create_topics(
    admin: Any,
    wanted: Mapping[str, int],
    *,
    where: str,
    replication_factor: int = -1,
    config: Mapping[str, str] | None = None,
    exist_ok: bool = False,
    timeout: float = 30.0,
) -> None:
    """Create ``{name: partitions}`` and wait until metadata shows them; TopicError on failure."""
    from confluent_kafka import KafkaError
    from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

    if not wanted:
        return
    for name, partitions in wanted.items():
        if not isinstance(partitions, int) or partitions < 1:
            raise TopicError(
                f"topic {name!r}: partitions must be a positive integer, got {partitions!r}",
                {name: "invalid partition count"},
            )
    new = [
        NewTopic(
            name,
            num_partitions=partitions,
            replication_factor=replication_factor,
            config=dict(config or {}),
        )
        for name, partitions in wanted.items()
    ]
    futures = admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
    errors: dict[str, str] = {}
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
        except Exception as exc:
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            if exist_ok and err is not None and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            errors[name] = err.str() if err is not None else str(exc)
    if errors:
        detail = "; ".join(f"{name}: {reason}" for name, reason in sorted(errors.items()))
        raise TopicError(f"could not create {len(errors)} topic(s) on {where}: {detail}", errors)
    wait_for_topics(admin, wanted, timeout)


def wait_for_topics(admin: Any, wanted: Mapping[str, int], timeout: float) -> None:
    """Wait until every topic is in metadata with at least its partition count."""
    deadline = time.monotonic() + timeout
    while True:
        metadata = admin.list_topics(timeout=max(1.0, deadline - time.monotonic()))
        missing = sorted(
            name
            for name, partitions in wanted.items()
            if name not in metadata.topics or len(metadata.topics[name].partitions) < partitions
        )
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise TopicError(
                f"topics created but not visible in metadata after {timeout:.0f}s: {missing}",
                dict.fromkeys(missing, "not visible in metadata"),
            )
        time.sleep(0.05)


def delete_topics(admin: Any, names: list[str], *, timeout: float = 30.0) -> None:
    """Delete topics; TopicError names each one that could not be deleted."""
    if not names:
        return
    futures = admin.delete_topics(names, operation_timeout=timeout, request_timeout=timeout)
    errors: dict[str, str] = {}
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
        except Exception as exc:
            errors[name] = str(exc)
    if errors:
        raise TopicError(f"could not delete topic(s): {errors}", errors)
