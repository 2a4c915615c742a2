"""Exactly-once mode: the consumer's forwards, the handler's output and the consumed offsets
commit in one Kafka transaction.

This module owns the transactional producer's protocol and librdkafka's error contract for it:
a retriable error repeats the call, an abortable one aborts (the consumer then rewinds and
replays), a fatal one (fenced by another producer with the same ``transactional.id``) ends the
consumer with :class:`TransactionError`. Rewinding and replaying is the consumer's business.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from resilient_kafka.errors import ConfigurationError, TransactionError

log = logging.getLogger("resilient_kafka.transaction")

_RETRY_PAUSE = 0.1  # seconds between repeats of a call that failed with a retriable error


def consumer_settings(conf: dict[str, Any], dedup: object) -> None:
    """Check and complete a consumer config for exactly-once mode (in place)."""
    if dedup is not None:
        raise ConfigurationError(
            "dedup= and exactly_once=True do not combine: after an aborted transaction the "
            "records are replayed, and a dedup store would skip them (their output was "
            "aborted). Exactly-once covers what the handler writes to Kafka; make other side "
            "effects idempotent (key them by rk.id)"
        )
    if str(conf.get("enable.auto.commit", False)).lower() in ("true", "1"):
        raise ConfigurationError(
            "enable.auto.commit=true contradicts exactly_once=True: offsets are committed "
            "inside each transaction (leave enable.auto.commit unset)"
        )
    if str(conf.get("isolation.level", "read_committed")) != "read_committed":
        raise ConfigurationError(
            "exactly_once=True needs isolation.level=read_committed (the retry topics are "
            "written in transactions; aborted copies must not be read)"
        )
    conf["enable.auto.commit"] = False
    conf["isolation.level"] = "read_committed"


def transactional_id(producer_config: Mapping[str, Any], consumer_config: Mapping[str, Any]) -> str:
    """The producer's ``transactional.id``: the caller's, else one derived from the static
    member id (stable across restarts), else a fresh one per consumer."""
    given = producer_config.get("transactional.id")
    if given:
        return str(given)
    group = consumer_config["group.id"]
    instance = consumer_config.get("group.instance.id")
    if instance:
        return f"rk-{group}-{instance}"
    return f"rk-{group}-{uuid.uuid4().hex[:12]}"


class Transactions:
    """One open transaction at a time on ``producer``; every call bounded by ``timeout``."""

    def __init__(
        self, producer: Any, tid: str, timeout: float, transaction_timeout: float = 60.0
    ) -> None:
        self._producer = producer
        self.transactional_id = tid
        self._timeout = timeout
        # a commit's retriable errors are resumable: repeat it (librdkafka bounds each call by
        # the transaction's remaining time) until the coordinator must have settled it
        self._settle = transaction_timeout + timeout
        self.open = False
        self.committed = 0
        self.aborted = 0
        self._call("init_transactions", producer.init_transactions)

    def begin(self) -> None:
        if self.open:
            return
        try:
            self._producer.begin_transaction()
        except KafkaException as exc:  # still in an abortable state: abort, then begin
            error = exc.args[0] if exc.args else None
            if not isinstance(error, KafkaError) or not error.txn_requires_abort():
                raise TransactionError(
                    f"begin_transaction failed for transactional.id={self.transactional_id!r}: "
                    f"{exc}",
                    error,
                ) from exc
            self._call("abort_transaction", self._producer.abort_transaction)
            self._producer.begin_transaction()
        self.open = True

    def commit(self, offsets: list[TopicPartition], group_metadata: Any) -> bool:
        """Commit the open transaction with ``offsets``; False if it had to be aborted."""
        producer = self._producer
        try:
            if offsets:
                self._call(
                    "send_offsets_to_transaction",
                    lambda t: producer.send_offsets_to_transaction(offsets, group_metadata, t),
                )
            self._call("commit_transaction", producer.commit_transaction)
        except _Abortable as exc:
            log.warning("transaction must be aborted (its records are replayed): %s", exc)
            self.abort()
            return False
        self.open = False
        self.committed += 1
        return True

    def abort(self) -> None:
        """Abort the open transaction: its records are discarded for read_committed readers."""
        if self.open:
            try:
                self._call("abort_transaction", self._producer.abort_transaction)
            except _Abortable as exc:  # the coordinator aborts it when it times out
                log.warning("abort_transaction failed (the broker aborts on timeout): %s", exc)
            self.open = False
        self.aborted += 1

    def _call(self, name: str, call: Any) -> None:
        bounded = name == "init_transactions"
        deadline = time.monotonic() + (self._timeout if bounded else self._settle)
        while True:
            try:
                call(max(0.1, deadline - time.monotonic()) if bounded else -1)
                return
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if not isinstance(error, KafkaError):
                    raise
                if error.fatal():
                    self.open = False
                    raise TransactionError(
                        f"{name} failed fatally for transactional.id={self.transactional_id!r}: "
                        f"{error.str()} (another producer with this transactional.id fenced "
                        "this one, or the broker lost its state; the consumer must be "
                        "recreated)",
                        error,
                    ) from exc
                if error.txn_requires_abort():
                    raise _Abortable(f"{name}: {error.str()}") from exc
                if error.retriable() and time.monotonic() < deadline:
                    time.sleep(_RETRY_PAUSE)
                    continue
                if name != "send_offsets_to_transaction":  # unsettled: cannot go on
                    raise TransactionError(
                        f"{name} failed for transactional.id={self.transactional_id!r}: "
                        f"{error.str()}",
                        error,
                    ) from exc
                raise _Abortable(f"{name}: {error.str()}") from exc


class _Abortable(Exception):
    """The transaction cannot commit; abort it and replay its records."""
