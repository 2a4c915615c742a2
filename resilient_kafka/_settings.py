"""The consumer's settings, checked before anything native exists.

Every contradiction is found here, so that a bad setting raises :class:`ConfigurationError`
without having opened a librdkafka handle (a refused consumer leaks nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from resilient_kafka import _transaction
from resilient_kafka.dedup import DedupStore
from resilient_kafka.errors import ConfigurationError
from resilient_kafka.policies import DeadLetterPolicy, RetryPolicy
from resilient_kafka.producer import SharedToken, producer_config_from

BLOCKING_SHARE = 0.8  # blocking retries (and dedup waits) may use this share of max.poll


def _flag(value: object) -> bool:
    return str(value).lower() in ("true", "1")


class Settings:
    """What a :class:`ResilientConsumer` was asked for, validated and completed."""

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        retry: RetryPolicy | None,
        dead_letter: DeadLetterPolicy | None,
        producer_config: Mapping[str, Any] | None,
        topic_replication_factor: int,
        forward_timeout: float,
        breakers: Sequence[Any],
        breaker_scope: Mapping[str, Sequence[str]] | None,
        trace_parent: str,
        dedup: DedupStore | None,
        dedup_key: Callable[[Any], str] | None,
        dedup_lease: float,
        on_dedup_error: str,
        exactly_once: bool,
        transaction_interval: float,
    ) -> None:
        conf = dict(config)
        if exactly_once:
            _transaction.consumer_settings(conf, dedup)
        if transaction_interval <= 0:
            raise ConfigurationError(
                f"transaction_interval must be positive seconds, got {transaction_interval}"
            )
        if dedup_lease <= 0:
            raise ConfigurationError(f"dedup_lease must be positive seconds, got {dedup_lease}")
        if on_dedup_error not in ("pause", "process"):
            raise ConfigurationError(
                f"on_dedup_error must be 'pause' (fail closed) or 'process' (fail open), got "
                f"{on_dedup_error!r}"
            )
        if trace_parent not in ("creation_context", "link_only"):
            raise ConfigurationError(
                f"trace_parent must be 'creation_context' or 'link_only', got {trace_parent!r}"
            )
        group = conf.get("group.id")
        if group is None or str(group) == "":
            raise ConfigurationError(
                "Failed to create consumer: group.id must be set (resilient-kafka names the "
                "retry and DLQ topics per group)"
            )
        group = str(group)  # as librdkafka does with a uuid.UUID or another object
        if forward_timeout <= 0:
            raise ConfigurationError(f"forward_timeout must be positive, got {forward_timeout}")
        self.group: str = group
        self.retry = retry if retry is not None else RetryPolicy()
        self.dead_letter = dead_letter if dead_letter is not None else DeadLetterPolicy()
        self.auto_commit = _flag(conf.get("enable.auto.commit", True))
        self.commit_interval = float(conf.get("auto.commit.interval.ms", 5000)) / 1000
        max_poll = float(conf.get("max.poll.interval.ms", 300_000)) / 1000
        self.max_poll = max_poll
        if dedup is not None and dedup_lease + 1 > max_poll * BLOCKING_SHARE:
            # a record whose claim another consumer holds waits up to the lease for it
            raise ConfigurationError(
                f"dedup_lease={dedup_lease:.0f}s does not fit in max.poll.interval.ms="
                f"{max_poll * 1000:.0f} (a consumer waiting out another's claim would be "
                f"fenced); keep it under {max_poll * BLOCKING_SHARE - 1:.0f}s"
            )
        names = [getattr(b, "name", None) for b in breakers]
        unknown = set(breaker_scope or {}) - set(names)
        if unknown:
            raise ConfigurationError(f"breaker_scope names unknown breakers: {sorted(unknown)}")
        conf["enable.auto.offset.store"] = False  # offsets are stored only past done records
        if callable(conf.get("oauth_cb")):
            conf["oauth_cb"] = SharedToken(conf["oauth_cb"]).fetch
        self.connection = producer_config_from(conf)
        self.admin_config = self.connection
        pconf = {**self.connection, **(producer_config or {})}
        if "transactional.id" in pconf and not exactly_once:
            raise ConfigurationError(
                "producer_config has a transactional.id but exactly_once is off: the forwarding "
                "producer would refuse to send outside a transaction (set exactly_once=True)"
            )
        if exactly_once:
            pconf["transactional.id"] = _transaction.transactional_id(pconf, conf)
        self.consumer_config = conf
        self.producer_config = pconf
        self.exactly_once = exactly_once
        self.transaction_interval = transaction_interval
        self.transaction_timeout = float(pconf.get("transaction.timeout.ms", 60_000)) / 1000
        self.max_bytes = int(pconf.get("message.max.bytes", 1_000_000))
        self.where = str(
            conf.get("bootstrap.servers") or conf.get("metadata.broker.list") or "no brokers set"
        )
        self.replication = topic_replication_factor
        self.forward_timeout = forward_timeout
        self.cooperative = "cooperative" in str(conf.get("partition.assignment.strategy", ""))
        self.breakers = list(breakers)
        self.breaker_scope = {k: set(v) for k, v in (breaker_scope or {}).items()}
        self.parent_on_creation = trace_parent == "creation_context"
        self.dedup = dedup
        self.dedup_key = dedup_key
        self.dedup_lease = dedup_lease
        self.dedup_fail_open = on_dedup_error == "process"

    def check_blocking_fits(self) -> None:
        """``run()`` with one handler on the polling thread: its blocking retries must end
        well inside ``max.poll.interval.ms`` (with concurrency a worker waits, not the poll)."""
        budget, max_poll = self.retry.blocking_budget, self.max_poll
        if self.retry.blocking and budget > max_poll * BLOCKING_SHARE:
            raise ConfigurationError(
                f"blocking retries can wait up to {budget:.1f}s per message, which does not "
                f"fit in max.poll.interval.ms={max_poll * 1000:.0f} with one handler on the "
                f"polling thread (keep them under {max_poll * BLOCKING_SHARE:.1f}s, let retry "
                "topics take the longer delays, or run with concurrency > 1)"
            )

    def check_blocking_fits_transaction(self) -> None:
        """Exactly-once with concurrency: a transaction commits only when no handler runs, so
        a record in blocking retries keeps it open; it must end well inside
        ``transaction.timeout.ms`` (the broker aborts a transaction open longer)."""
        budget, limit = self.retry.blocking_budget, self.transaction_timeout * BLOCKING_SHARE
        if self.retry.blocking and budget > limit:
            raise ConfigurationError(
                f"blocking retries can wait up to {budget:.1f}s per message, which does not "
                f"fit in transaction.timeout.ms={self.transaction_timeout * 1000:.0f} with "
                f"exactly_once=True and concurrency (a transaction stays open while a handler "
                f"runs): keep them under {limit:.1f}s, or let retry topics take the longer delays"
            )
