"""Test support: a real embedded Kafka-compatible broker and pytest fixtures around it.

``EmbeddedKafka`` runs Tansu as a child process; ``ExternalKafka`` names a cluster someone else
runs (``KAFKA_BOOTSTRAP_SERVERS``). Both offer the same ``bootstrap_servers``,
``client_config()``, ``producer_config()`` and ``create_topics()``.
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

__all__ = [
    "CONSUMER_TIMING",
    "BrokerError",
    "BrokerNotFoundError",
    "BrokerStartError",
    "EmbeddedKafka",
    "ExternalKafka",
    "KafkaCluster",
    "PortInUseError",
    "TopicError",
    "find_tansu_binary",
]
