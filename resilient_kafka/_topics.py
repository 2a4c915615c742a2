"""The consumer's topics: retry tiers and DLQ names per source topic, and their creation.

Names come from the settings alone, so ``subscribe()`` and ``assign()`` return at once, as
confluent's do, even while the cluster is unreachable. Creating the retry/DLQ topics needs the
cluster (a source's partition count), so it runs on a background thread; the polling thread
collects the outcome in housekeeping and tries again with back-off. A source counts as prepared
only once its retry and DLQ topics exist; a forward whose source is not prepared backs off.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Any

from confluent_kafka import Consumer, KafkaException

from resilient_kafka import _admin
from resilient_kafka._settings import Settings
from resilient_kafka.errors import ConfigurationError, ResilientKafkaError, TopicError

log = logging.getLogger("resilient_kafka.consumer")

_BACKOFF_FIRST = 1.0  # seconds before a failed preparation is tried again, doubling
_BACKOFF_MAX = 30.0
_SLICE = 0.25  # seconds per metadata request while the cluster does not answer
_REFRESH_TIMEOUT = 5.0  # at most this long for the metadata refresh after new tiers exist

_Outcome = tuple[list[str], list[str]]  # sources that exist, sources missing


class Topics:
    """Names (cached), the tier map, and which source topics have their retry/DLQ topics."""

    def __init__(self, settings: Settings, native: Consumer, metrics: Any) -> None:
        self._settings = settings
        self._native = native
        self._metrics = metrics
        self.tiers: dict[str, tuple[str, int]] = {}  # retry topic -> (source topic, tier)
        self._prepared: set[str] = set()
        self._wanted: set[str] = set()  # sources whose retry/DLQ topics must exist
        self._targets: dict[tuple[str, int | None], str] = {}  # (source, tier|None) -> topic
        self._job: Future[_Outcome] | None = None  # the preparation running in the background
        self._admin_client: Any = None  # used by the background thread only
        self._closing = threading.Event()
        self._retry_at = 0.0  # monotonic time before which a failed preparation is not retried
        self._backoff = _BACKOFF_FIRST
        self.subscribed = False  # subscribe() (not assign()): new tiers need a metadata refresh
        self._refresh_pending = False  # a source's tiers exist; librdkafka must look again
        self._refresh_at = 0.0  # monotonic time before which a failed refresh is not retried
        self._refresh_backoff = _BACKOFF_FIRST

    # -- names -------------------------------------------------------------------------------

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

    def declare(self, topics: list[str]) -> list[str]:
        """Name the retry tiers of ``topics`` (no cluster needed; ConfigurationError for a
        name that cannot have tiers) and start creating what is missing; returns the tiers."""
        tier_topics: list[str] = []
        for topic in topics:
            names = self.retry_topics(topic)
            self.dead_letter_topic(topic)  # a name that cannot be built fails here, not later
            for n, name in enumerate(names, start=1):
                self.tiers[name] = (topic, n)
                tier_topics.append(name)
            self._metrics.prepare_topic(topic)
        self._wanted.update(topics)
        self._retry_at = 0.0
        self._backoff = _BACKOFF_FIRST
        self.maintain(time.monotonic())
        return tier_topics

    # -- creation ----------------------------------------------------------------------------

    def prepared(self, source: str) -> bool:
        return source in self._prepared

    def maintain(self, now: float) -> None:
        """Housekeeping: take in a finished preparation; start one for what is still missing."""
        job = self._job
        if job is not None:
            if not job.done():
                return
            self._job = None
            self._finished(job, now)
        if self._refresh_pending and now >= self._refresh_at:
            self._refresh(now)
        missing = self._wanted - self._prepared
        if missing and now >= self._retry_at:
            self._job = job = Future()
            sources = sorted(missing)

            def work() -> None:
                try:
                    job.set_result(self._prepare(sources))
                except BaseException as exc:  # handed to the polling thread
                    job.set_exception(exc)

            # a daemon: a preparation blocked on an unreachable cluster never delays close() or
            # the interpreter's exit
            threading.Thread(target=work, name="resilient-kafka-topics", daemon=True).start()

    def _finished(self, job: Future[_Outcome], now: float) -> None:
        try:
            present, missing = job.result()
        except (ResilientKafkaError, KafkaException) as exc:
            self._failed(now, exc)
            return
        except Exception as exc:  # a bug, or the cluster answering nonsense: keep trying
            log.exception("preparing retry/DLQ topics failed unexpectedly")
            self._failed(now, exc)
            return
        if set(present) - self._prepared and self.subscribed:
            self._refresh_pending = True
        self._prepared.update(present)
        if missing:
            where = self._settings.where
            self._failed(now, TopicError(f"topic(s) {missing} do not exist on {where}", {}))
        else:
            self._backoff = _BACKOFF_FIRST

    def _refresh(self, now: float) -> None:
        """librdkafka joins the group with the subscribed topics its metadata knew, and looks
        again only at a full metadata refresh (every topic.metadata.refresh.interval.ms, 5
        minutes by default): ask for one once a source's tiers exist, also when another
        consumer of the group created them (else they stay unassigned). Tried again with
        back-off until it succeeds."""
        if self._closing.is_set() or not self.subscribed:
            self._refresh_pending = False
            return
        timeout = min(self._settings.forward_timeout, _REFRESH_TIMEOUT)
        try:
            Consumer.list_topics(self._native, timeout=timeout)
        except (KafkaException, RuntimeError) as exc:
            log.warning(
                "metadata refresh for the new retry topics failed (trying again in %.0fs; "
                "until then they may stay unassigned): %s",
                self._refresh_backoff,
                exc,
            )
            self._refresh_at = now + self._refresh_backoff
            self._refresh_backoff = min(self._refresh_backoff * 2, _BACKOFF_MAX)
            return
        self._refresh_pending = False
        self._refresh_backoff = _BACKOFF_FIRST

    def _failed(self, now: float, exc: BaseException) -> None:
        log.error(
            "cannot prepare the retry/DLQ topics of %s (trying again in %.0fs): %s",
            sorted(self._wanted - self._prepared),
            self._backoff,
            exc,
        )
        self._retry_at = now + self._backoff
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX)

    def _prepare(self, topics: list[str]) -> _Outcome:
        """(Background thread; it changes no state.) Create the missing retry/DLQ topics of
        those of ``topics`` that exist: returns (existing, missing). Raises TopicError
        (or KafkaException) when the cluster cannot answer or refuses."""
        settings = self._settings
        admin = self._admin()
        metadata = self._metadata(admin)
        missing = [t for t in topics if t not in metadata.topics or metadata.topics[t].error]
        present = [t for t in topics if t not in missing]
        wanted: dict[str, int] = {}
        for topic in present:
            partitions = len(metadata.topics[topic].partitions)
            for name in self.retry_topics(topic):
                wanted[name] = partitions
            wanted[self.dead_letter_topic(topic)] = partitions
        absent = {name: n for name, n in wanted.items() if name not in metadata.topics}
        if absent:
            _admin.create_topics(
                admin,
                absent,
                where=settings.where,
                replication_factor=settings.replication,
                exist_ok=True,
                timeout=settings.forward_timeout,
            )
        return present, missing

    def _metadata(self, admin: Any) -> Any:
        """The cluster's metadata, asked for in short slices so that close() ends the wait."""
        deadline = time.monotonic() + self._settings.forward_timeout
        while True:
            try:
                return admin.list_topics(timeout=_SLICE)
            except KafkaException:
                if self._closing.is_set() or time.monotonic() >= deadline:
                    raise

    def _admin(self) -> Any:
        admin = self._admin_client
        if admin is None:
            from confluent_kafka.admin import AdminClient

            admin = self._admin_client = AdminClient(self._settings.admin_config)
        return admin

    def ensure(self, source: str) -> bool:
        """Before a forward of ``source``: its retry/DLQ topics exist. If not, their creation
        is started (or waited for) and False says so: the forward backs off and tries again."""
        if source in self._prepared:
            return True
        if source not in self._wanted:
            log.warning(
                "%s: retry tiers are consumed automatically only with subscribe(); with "
                "assign(), assign %s too",
                source,
                ", ".join(self.retry_topics(source)) or "no tiers",
            )
            self._wanted.add(source)
            self._retry_at = 0.0
        self.maintain(time.monotonic())
        return source in self._prepared

    def close(self) -> None:
        """Stop preparing (a preparation under way finishes on its own; nothing waits)."""
        self._wanted.clear()
        self._closing.set()
