"""The consumer's topics: retry tiers and DLQ names per source topic, and their creation.

A source topic counts as prepared only once its retry and DLQ topics exist; a forward whose
source is not prepared prepares it first and, if that fails, backs off and tries again.
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import Consumer, KafkaException

from resilient_kafka import _admin
from resilient_kafka._settings import Settings
from resilient_kafka.errors import ConfigurationError, ResilientKafkaError, TopicError

log = logging.getLogger("resilient_kafka.consumer")


class Topics:
    """Names (cached), the tier map, and which source topics have their retry/DLQ topics."""

    def __init__(self, settings: Settings, native: Consumer, metrics: Any) -> None:
        self._settings = settings
        self._native = native
        self._metrics = metrics
        self.tiers: dict[str, tuple[str, int]] = {}  # retry topic -> (source topic, tier)
        self._prepared: set[str] = set()
        self._targets: dict[tuple[str, int | None], str] = {}  # (source, tier|None) -> topic

    def retry_topics(self, topic: str) -> list[str]:
        retry, group = self._settings.retry, self._settings.group
        return [retry.topic(topic, group, n) for n in range(1, retry.attempts + 1)]

    def dead_letter_topic(self, topic: str) -> str:
        return self._settings.dead_letter.topic(topic, self._settings.group)

    def source_of(self, topic: str) -> str:
        tier = self.tiers.get(topic)
        return tier[0] if tier is not None else topic

    def target(self, source: str, attempt: int | None) -> str:
        """Retry tier ``attempt`` of ``source`` (DLQ for None), named once and cached."""
        key = (source, attempt)
        name = self._targets.get(key)
        if name is None:
            name = self._targets[key] = (
                self.dead_letter_topic(source)
                if attempt is None
                else self._settings.retry.topic(source, self._settings.group, attempt)
            )
        return name

    def derived(self, topics: set[str]) -> set[str]:
        """The retry and DLQ topics of ``topics`` (names that cannot have tiers are skipped)."""
        names: set[str] = set()
        for topic in topics:
            try:
                names.update(self.retry_topics(topic))
                names.add(self.dead_letter_topic(topic))
            except ConfigurationError:
                continue
        return names

    def prepared(self, source: str) -> bool:
        return source in self._prepared

    def prepare(self, topics: list[str]) -> list[str]:
        """Check that ``topics`` exist and create their missing retry/DLQ topics; returns the
        retry tier topics. Raises :class:`TopicError` (or KafkaException from the cluster)."""
        settings = self._settings
        metadata = self._native.list_topics(timeout=settings.forward_timeout)
        missing = [t for t in topics if t not in metadata.topics or metadata.topics[t].error]
        if missing:
            raise TopicError(
                f"cannot subscribe: topic(s) {missing} do not exist on {settings.where}",
                dict.fromkeys(missing, "does not exist"),
            )
        wanted: dict[str, int] = {}
        tier_topics: list[str] = []
        for topic in topics:
            self._metrics.prepare_topic(topic)
            partitions = len(metadata.topics[topic].partitions)
            for n, name in enumerate(self.retry_topics(topic), start=1):
                self.tiers[name] = (topic, n)
                tier_topics.append(name)
                wanted[name] = partitions
            wanted[self.dead_letter_topic(topic)] = partitions
        absent = {name: n for name, n in wanted.items() if name not in metadata.topics}
        if absent:
            _admin.create_topics(
                _admin_client(settings.connection),
                absent,
                where=settings.where,
                replication_factor=settings.replication,
                exist_ok=True,
                timeout=settings.forward_timeout,
            )
        self._prepared.update(topics)  # only now: a failed creation is tried again
        return tier_topics

    def ensure(self, source: str) -> bool:
        """Before a forward of ``source``: its retry/DLQ topics exist (prepared now if not, for
        consumers using assign()); False (logged) if that failed: the forward backs off."""
        if source in self._prepared:
            return True
        log.warning(
            "%s: retry tiers are consumed automatically only with subscribe(); with assign(), "
            "assign %s too",
            source,
            ", ".join(self.retry_topics(source)) or "no tiers",
        )
        try:
            self.prepare([source])
        except (ResilientKafkaError, KafkaException) as exc:
            log.error("cannot prepare retry/DLQ topics for %s: %s", source, exc)
            return False
        return True


def _admin_client(connection: dict[str, Any]) -> Any:
    from confluent_kafka.admin import AdminClient

    return AdminClient(connection)
