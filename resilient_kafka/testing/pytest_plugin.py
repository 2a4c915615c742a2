"""pytest fixtures for code that talks to Kafka (registered through the ``pytest11`` entry point).

* ``kafka``: one cluster for the whole session: an :class:`EmbeddedKafka`, or the external
  cluster named by ``KAFKA_BOOTSTRAP_SERVERS`` (settings from ``KAFKA_CLIENT_PROPERTIES``).
* ``kafka_config``: a fresh consumer-ready config dict for that cluster.
* ``topic_factory``: ``topic_factory(partitions=1)`` creates a uniquely named topic and returns
  its name; topics are deleted when the test ends.
* ``mock_cluster``: a fresh librdkafka mock cluster (3 brokers) for one test, with leaders,
  broker outages and request errors under the test's control (:class:`MockCluster`).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from resilient_kafka.testing._cluster import ExternalKafka, KafkaCluster

if TYPE_CHECKING:
    from resilient_kafka.testing.mock_cluster import MockCluster


@pytest.fixture(scope="session")
def kafka() -> Iterator[KafkaCluster]:
    """The session's cluster: external if ``KAFKA_BOOTSTRAP_SERVERS`` is set, else embedded."""
    external = ExternalKafka.from_env()
    if external is not None:
        yield external
        return
    from resilient_kafka.testing._embedded import EmbeddedKafka

    with EmbeddedKafka() as broker:
        yield broker


@pytest.fixture
def kafka_config(kafka: KafkaCluster) -> dict[str, Any]:
    """A consumer-ready client config dict for the session's cluster (a new copy per test)."""
    return kafka.client_config()


@pytest.fixture
def topic_factory(
    kafka: KafkaCluster, request: pytest.FixtureRequest
) -> Iterator[Callable[..., str]]:
    """Create uniquely named topics for one test; they are deleted when the test ends."""
    created: list[str] = []
    stem = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")[:60] or "test"

    def create(
        partitions: int = 1, *, suffix: str = "", config: dict[str, str] | None = None
    ) -> str:
        name = f"rk-{stem}{'-' + suffix if suffix else ''}-{uuid.uuid4().hex[:8]}"
        kafka.create_topics({name: partitions}, config=config)
        created.append(name)
        return name

    yield create
    if created:
        try:
            kafka.delete_topics(created)
        except Exception as exc:
            request.node.warn(pytest.PytestWarning(f"could not delete test topics: {exc}"))


@pytest.fixture
def mock_cluster() -> Iterator[MockCluster]:
    """A new librdkafka mock cluster of 3 brokers for one test, destroyed when it ends."""
    from resilient_kafka.testing.mock_cluster import MockCluster

    with MockCluster(brokers=3) as cluster:
        yield cluster
