"""What tests need from a Kafka cluster, whether embedded or external."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from resilient_kafka import _admin, _config

# Tansu answers JoinGroup only after about half of session.timeout.ms; 6 s (the broker's usual
# group.min.session.timeout.ms) keeps a join near 3 s and still works on Apache Kafka.
CONSUMER_TIMING = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}

_ADMIN_TIMEOUT = 30.0


class KafkaCluster:
    """Bootstrap address, client configs and topic administration for one cluster."""

    def __init__(self, extra_config: Mapping[str, Any] | None = None) -> None:
        self._extra_config = dict(extra_config or {})

    @property
    def bootstrap_servers(self) -> str:
        raise NotImplementedError

    def producer_config(
        self, overrides: Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> dict[str, Any]:
        """Config for producers and admin clients (no consumer-only keys, so no CONFWARN)."""
        base = {"bootstrap.servers": self.bootstrap_servers, **self._extra_config}
        return _config.merge(base, overrides, kwargs)

    def client_config(
        self, overrides: Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> dict[str, Any]:
        """Config for consumers: bootstrap, security settings and group timing for this broker.

        ``overrides`` takes dotted librdkafka keys; keyword arguments are a shorthand in which
        ``_`` stands for ``.`` (``group_id="g"`` sets ``group.id``).
        """
        return _config.merge({**self.producer_config(), **CONSUMER_TIMING}, overrides, kwargs)

    def admin(self) -> Any:
        from confluent_kafka.admin import AdminClient

        return AdminClient(self.producer_config())

    def create_topics(
        self,
        topics: Mapping[str, int] | Iterable[str],
        *,
        replication_factor: int = -1,
        config: Mapping[str, str] | None = None,
        exist_ok: bool = False,
        timeout: float = _ADMIN_TIMEOUT,
    ) -> None:
        """Create topics (``{"name": partitions}`` or names with one partition) and wait for them.

        Raises :class:`TopicError` listing every topic that failed; with ``exist_ok`` an existing
        topic is not an error. Returns once every topic is visible in metadata.
        """
        wanted = dict(topics) if isinstance(topics, Mapping) else dict.fromkeys(topics, 1)
        _admin.create_topics(
            self.admin(),
            wanted,
            where=self.bootstrap_servers,
            replication_factor=replication_factor,
            config=config,
            exist_ok=exist_ok,
            timeout=timeout,
        )

    def delete_topics(self, names: Iterable[str], *, timeout: float = _ADMIN_TIMEOUT) -> None:
        """Delete topics; raises :class:`TopicError` for any that could not be deleted."""
        admin = self.admin()  # must outlive the futures: a destroyed handle fails them
        _admin.delete_topics(admin, list(names), timeout=timeout)

    def list_topics(self, timeout: float = 10.0) -> dict[str, int]:
        """``{topic: partition count}`` for every topic the cluster reports."""
        metadata = self.admin().list_topics(timeout=timeout)
        return {name: len(t.partitions) for name, t in metadata.topics.items()}


class ExternalKafka(KafkaCluster):
    """A cluster someone else runs, named by its bootstrap servers (and optional settings)."""

    def __init__(self, bootstrap_servers: str, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self._bootstrap = bootstrap_servers

    @property
    def bootstrap_servers(self) -> str:
        return self._bootstrap

    @classmethod
    def from_env(cls) -> ExternalKafka | None:
        """The cluster named by ``KAFKA_BOOTSTRAP_SERVERS`` (and ``KAFKA_CLIENT_PROPERTIES``)."""
        found = _config.external_cluster_from_env()
        return cls(*found) if found else None

    def __repr__(self) -> str:  # never the config: it may hold SASL passwords
        return f"ExternalKafka({self._bootstrap!r})"
