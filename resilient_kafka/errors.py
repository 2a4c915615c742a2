"""The exceptions resilient-kafka raises, in one hierarchy so callers can catch them broadly."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


class ResilientKafkaError(Exception):
    """Base class of every error raised by resilient-kafka."""


class ConfigurationError(ResilientKafkaError, ValueError):
    """A setting is missing, malformed or contradicts another one."""


class MissingDependencyError(ResilientKafkaError, ImportError):
    """An optional dependency is not installed; the message says which extra provides it."""


class BrokerError(ResilientKafkaError):
    """The embedded broker (or the S3 server behind it) could not be found or run."""


class BrokerNotFoundError(BrokerError, MissingDependencyError):
    """The Tansu broker binary is not installed and ``TANSU_BIN`` does not point at one."""


class BrokerStartError(BrokerError):
    """The broker process did not become ready; the message includes the tail of its log."""


class PortInUseError(BrokerStartError):
    """The requested listener port is already taken by another process."""


class TopicError(ResilientKafkaError):
    """Creating or deleting topics failed; ``errors`` maps each failed topic to its reason."""

    def __init__(self, message: str, errors: dict[str, str]) -> None:
        super().__init__(message)
        self.errors = errors


class DeadLetterFloodError(ResilientKafkaError):
    """More records would go to the DLQ than ``DeadLetterPolicy`` allows (``on_flood="raise"``)."""


class ForwardError(ResilientKafkaError):
    """The broker refused a retry or DLQ copy for good (too large, not authorised, invalid).

    Nothing is lost: the source record's offset stays uncommitted, so it comes again after a
    restart, and the copy is retried in the background in case the cause is fixed meanwhile.
    ``source`` is the record's (topic, partition, offset), ``target`` the topic it was going
    to, ``kafka_error`` librdkafka's error (or the exception produce() raised).
    """

    def __init__(
        self, message: str, source: tuple[str, int, int], target: str, kafka_error: object
    ) -> None:
        super().__init__(message)
        self.source = source
        self.target = target
        self.kafka_error = kafka_error


class TransactionError(ResilientKafkaError):
    """Exactly-once mode cannot go on: the transactional producer was fenced or could not start.

    ``kafka_error`` is librdkafka's error, when there is one.
    """

    def __init__(self, message: str, kafka_error: object = None) -> None:
        super().__init__(message)
        self.kafka_error = kafka_error


class DeserializationError(ResilientKafkaError):
    """A record's key or value could not be deserialized; it went to the DLQ with its raw bytes
    (``field``: which; ``schema``: the Schema Registry schema it names, if it is framed so)."""

    # its name is in the rk.exception.type header of DLQ records: kept where it always was
    __module__ = "resilient_kafka.consumer"

    def __init__(self, message: str, *, field: str | None = None, schema: Any = None) -> None:
        super().__init__(message)
        self.field = field
        self.schema = schema


class DedupKeyError(ResilientKafkaError):
    """``dedup_key`` raised for a record: it has no identity, so it went to the DLQ unprocessed."""

    __module__ = "resilient_kafka.consumer"  # as DeserializationError


class BatchFailed(ResilientKafkaError):
    """Raised by a batch handler (``run_batches()``): these records of the batch failed.

    ``failures``: ``(record, exception)`` pairs, where the record is the ``Message`` handed
    over or its index in the batch (confluent's ``Message`` is not hashable: a dict can only
    be keyed by index). Those records follow the
    retry policy one by one (``failures[msg]`` decides retryable or not, and is what their retry
    and DLQ copies carry); every other record of the batch is done. Naming a record that is not
    in the batch makes this an exception like any other: the batch is split to find the failing
    records.
    """

    def __init__(
        self,
        failures: Mapping[Any, BaseException] | Iterable[tuple[Any, BaseException]],
        message: str | None = None,
    ) -> None:
        pairs = list(failures.items() if isinstance(failures, Mapping) else failures)
        if not pairs:
            raise ValueError("BatchFailed needs at least one failed record")
        super().__init__(message or f"{len(pairs)} record(s) of the batch failed")
        self.failures: list[tuple[Any, BaseException]] = pairs
