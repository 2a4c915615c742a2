"""Test support: a real embedded Kafka-compatible broker and pytest fixtures around it.

``EmbeddedKafka`` runs Tansu as a child process; ``ExternalKafka`` names a cluster someone else
runs (``KAFKA_BOOTSTRAP_SERVERS``); ``MockCluster`` is librdkafka's in-process mock cluster,
whose leaders, brokers and request errors a test controls. All offer the same
``bootstrap_servers``, ``client_config()``, ``producer_config()`` and ``create_topics()``.
"""

from resilient_kafka.errors import (
    BrokerError,
    BrokerNotFoundError,
    BrokerStartError,
    PortInUseError,
    TopicError,
)
from resilient_kafka.testing._cluster import CONSUMER_TIMING, ExternalKafka, KafkaCluster
from resilient_kafka.testing._embedded import EmbeddedKafka, find_tansu_binary
from resilient_kafka.testing.mock_cluster import (
    ApiKey,
    MockCluster,
    MockClusterError,
    MockClusterUnavailableError,
)

__all__ = [
    "CONSUMER_TIMING",
    "ApiKey",
    "BrokerError",
    "BrokerNotFoundError",
    "BrokerStartError",
    "EmbeddedKafka",
    "ExternalKafka",
    "KafkaCluster",
    "MockCluster",
    "MockClusterError",
    "MockClusterUnavailableError",
    "PortInUseError",
    "TopicError",
    "find_tansu_binary",
]
