"""resilient-kafka: Kafka consumers and producers that survive the failures of event-driven systems.

Retry topics, dead-letter queues, circuit breakers and a commit barrier on top of
confluent-kafka, with metrics, tracing and a chaos suite that proves nothing is lost.
"""

from importlib.metadata import PackageNotFoundError, version

from resilient_kafka import dlq, headers
from resilient_kafka.breaker import CircuitBreaker, CircuitBreakerError
from resilient_kafka.consumer import ResilientConsumer
from resilient_kafka.errors import (
    BatchFailed,
    ConfigurationError,
    DeadLetterFloodError,
    DedupKeyError,
    DeserializationError,
    ForwardError,
    MissingDependencyError,
    ResilientKafkaError,
    TransactionError,
)
from resilient_kafka.metrics import serve_metrics
from resilient_kafka.policies import DeadLetterPolicy, RetryPolicy
from resilient_kafka.producer import ResilientProducer

try:
    __version__ = version("resilient-kafka")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = [
    "BatchFailed",
    "CircuitBreaker",
    "CircuitBreakerError",
    "ConfigurationError",
    "DeadLetterFloodError",
    "DeadLetterPolicy",
    "DedupKeyError",
    "DeserializationError",
    "ForwardError",
    "MissingDependencyError",
    "ResilientConsumer",
    "ResilientKafkaError",
    "ResilientProducer",
    "RetryPolicy",
    "TransactionError",
    "__version__",
    "dlq",
    "headers",
    "serve_metrics",
]
