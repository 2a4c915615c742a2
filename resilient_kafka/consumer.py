"""``ResilientConsumer``: a drop-in confluent-kafka Consumer with retry topics, a DLQ and a
commit barrier.

Failed messages are copied to delay topics (``T.G.retry.n``) and finally to a dead-letter topic
(``T.G.dlq``); the consumer consumes its own retry tiers and never hands a retry record out before
its due time. No offset is stored or committed past a record that is not done: handled, or its
retry/DLQ copy acknowledged by the broker.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.serialization import MessageField, SerializationContext
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.trace import Status, StatusCode

from resilient_kafka import _admin, _transaction, headers
from resilient_kafka._barrier import CommitBarrier
from resilient_kafka._lease import LeaseKeeper
from resilient_kafka._outage import BREAKER, DEDUP_STORE, DLQ_FLOOD, FloodGuard, Outage
from resilient_kafka.breaker import CLOSED, BreakerWatch, CircuitBreakerError, probe_due_at
from resilient_kafka.dedup import BUSY, DONE, NEW, DedupStore, DedupStoreError
from resilient_kafka.errors import (
    ConfigurationError,
    DeadLetterFloodError,
    ForwardError,
    ResilientKafkaError,
    TopicError,
    TransactionError,
)
from resilient_kafka.metrics import ConsumerMetrics, families
from resilient_kafka.policies import DeadLetterPolicy, RetryPolicy
from resilient_kafka.producer import ResilientProducer, producer_config_from

log = logging.getLogger("resilient_kafka.consumer")

Handler = Callable[[Message], object]
Deserializer = Callable[[bytes | None, SerializationContext], Any]
_Key = tuple[str, int]

_STORE_INTERVAL = 0.05  # seconds between offset-store calls: batches the per-message work
# While records flow, housekeeping (delivery reports, due retries, offset store) runs at most
# this often instead of once per record; anything that needs it sooner sets _maintain_at = 0.
_MAINTAIN_INTERVAL = 0.05
_FORWARD_BACKOFF = (0.1, 5.0)  # first and maximum back-off of a failed forward
# Produce errors no retry cures: the copy is kept (offset held) but the application is told.
_PERMANENT_FORWARD_ERRORS = {
    KafkaError.MSG_SIZE_TOO_LARGE: (
        "the copy is larger than the target accepts: raise max.message.bytes of topic {target}"
        " and message.max.bytes of the consumer's producer_config (now {limit}), or keep such"
        " records off this path"
    ),
    KafkaError.RECORD_LIST_TOO_LARGE: (
        "the batch is larger than the target accepts: raise max.message.bytes of topic {target}"
    ),
    KafkaError.INVALID_RECORD: "the broker rejected the record as invalid",
    KafkaError.TOPIC_EXCEPTION: "{target} is not a valid topic name",
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "grant this client WRITE on topic {target}",
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: "grant this client the cluster ACLs it needs",
    KafkaError.POLICY_VIOLATION: "a broker policy refuses the record",
}
_BREAKER_CHECK_INTERVAL = 0.5  # seconds between looks at shared breaker state during an outage
_BLOCKING_SHARE = 0.8  # blocking retries may use this share of max.poll.interval.ms
_TRIAL_WAIT = 2.0  # seconds to wait for a trial partition's first record before the next one
# run() fetches records in batches sized to take about _BATCH_SECONDS to handle (1 to
# _BATCH_MAX records), and cuts a batch short after _BATCH_DEADLINE (the rest is rewound), so
# housekeeping and max.poll.interval.ms never wait on a slow handler.
_SKIP = "\0skip"  # _claim(): the handler must not run for this record
_LATER = "\0later"  # _claim(): not now (another consumer holds it): deliver it again
_BATCH_MAX = 500
_BATCH_SECONDS = 0.1
_BATCH_DEADLINE = 1.0


class _NotNow(Exception):
    """The drop-in loop cannot hand a record out now (its dedup identity is claimed by a record
    in hand, or by another consumer past the wait): it is delivered again."""


class DeserializationError(ResilientKafkaError):
    """A record's key or value could not be deserialized; it went to the DLQ with its raw bytes."""


class DedupKeyError(ResilientKafkaError):
    """``dedup_key`` raised for a record: it has no identity, so it went to the DLQ unprocessed."""


class _Forward:
    """A retry or DLQ copy on its way to the broker; holds its source offset until acked."""

    __slots__ = (
        "attempts",
        "generation",
        "headers",
        "key",
        "next_try",
        "permanent",
        "source",
        "span",
        "target",
        "timestamp",
        "value",
    )

    def __init__(
        self,
        source: tuple[str, int, int],
        target: str,
        key: bytes | None,
        value: bytes | None,
        hdrs: headers.HeaderList,
        timestamp: int,
    ) -> None:
        self.source = source
        self.target = target
        self.key = key
        self.value = value
        self.headers = hdrs
        self.timestamp = timestamp
        self.attempts = 0
        self.generation = 0  # exactly-once: the transaction it was produced in
        self.next_try = 0.0
        self.span: Any = None
        self.permanent = False  # the broker refused it for good (ForwardError raised once)


class ResilientConsumer(Consumer):
    """``confluent_kafka.Consumer`` that routes failures to retry topics and a DLQ.

    Use it as a drop-in (``poll()``/``consume()``, calling :meth:`fail` on a message that could
    not be processed) or hand :meth:`run` a handler. A message counts as processed once the
    application asks for the next one (or commits) without having called :meth:`fail` on it.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        retry: RetryPolicy | None = None,
        dead_letter: DeadLetterPolicy | None = None,
        key_deserializer: Deserializer | None = None,
        value_deserializer: Deserializer | None = None,
        producer_config: Mapping[str, Any] | None = None,
        topic_replication_factor: int = -1,
        forward_timeout: float = 30.0,
        breakers: Sequence[Any] = (),
        breaker_scope: Mapping[str, Sequence[str]] | None = None,
        metrics: bool = True,
        registry: Any = None,
        metrics_port: int | None = None,
        tracer_provider: Any = None,
        trace_parent: str = "creation_context",
        dedup: DedupStore | None = None,
        dedup_key: Callable[[Message], str] | None = None,
        dedup_lease: float = 60.0,
        on_dedup_error: str = "pause",
        exactly_once: bool = False,
        transaction_interval: float = 0.1,
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
        group = conf.get("group.id")
        if not group or not isinstance(group, str):
            raise ConfigurationError(
                "ResilientConsumer needs a 'group.id': retry and DLQ topics are named per group"
            )
        if not conf.get("bootstrap.servers") and not conf.get("metadata.broker.list"):
            raise ConfigurationError("ResilientConsumer needs 'bootstrap.servers'")
        if forward_timeout <= 0:
            raise ConfigurationError(f"forward_timeout must be positive, got {forward_timeout}")
        self._group = group
        self._retry = retry if retry is not None else RetryPolicy()
        self._dead_letter = dead_letter if dead_letter is not None else DeadLetterPolicy()
        self._auto_commit = str(conf.get("enable.auto.commit", True)).lower() in ("true", "1")
        max_poll = float(conf.get("max.poll.interval.ms", 300_000)) / 1000
        if self._retry.blocking and self._retry.blocking_budget > max_poll * _BLOCKING_SHARE:
            raise ConfigurationError(
                f"blocking retries can wait up to {self._retry.blocking_budget:.1f}s per message, "
                f"which does not fit in max.poll.interval.ms={max_poll * 1000:.0f} (keep them "
                f"under {max_poll * _BLOCKING_SHARE:.1f}s, or let retry topics take the longer "
                "delays)"
            )
        if dedup is not None and dedup_lease + 1 > max_poll * _BLOCKING_SHARE:
            # a record whose claim another consumer holds waits up to the lease for it
            raise ConfigurationError(
                f"dedup_lease={dedup_lease:.0f}s does not fit in max.poll.interval.ms="
                f"{max_poll * 1000:.0f} (a consumer waiting out another's claim would be "
                f"fenced); keep it under {max_poll * _BLOCKING_SHARE - 1:.0f}s"
            )
        names = [getattr(b, "name", None) for b in breakers]
        unknown = set(breaker_scope or {}) - set(names)
        if unknown:
            raise ConfigurationError(f"breaker_scope names unknown breakers: {sorted(unknown)}")
        conf["enable.auto.offset.store"] = False  # offsets are stored only past done records
        self._metrics: ConsumerMetrics | None = None
        self.metrics_url: str | None = None
        if metrics:
            self._metrics = ConsumerMetrics(families(registry), group)
            user_stats_cb = conf.get("stats_cb")
            metrics_sink = self._metrics

            def stats_cb(stats_json: str) -> None:
                metrics_sink.stats(stats_json)
                if user_stats_cb is not None:
                    user_stats_cb(stats_json)

            conf["stats_cb"] = stats_cb
            conf.setdefault("statistics.interval.ms", 5000)  # lag comes from statistics
        super().__init__(conf)
        self._connection = producer_config_from(conf)
        pconf = {**self._connection, **(producer_config or {})}
        if trace_parent not in ("creation_context", "link_only"):
            raise ConfigurationError(
                f"trace_parent must be 'creation_context' or 'link_only', got {trace_parent!r}"
            )
        from resilient_kafka.tracing import tracer_for

        self._tracing = tracer_for(tracer_provider)
        self._parent_on_creation = trace_parent == "creation_context"
        self._txn: _transaction.Transactions | None = None
        if "transactional.id" in pconf and not exactly_once:
            raise ConfigurationError(
                "producer_config has a transactional.id but exactly_once is off: the forwarding "
                "producer would refuse to send outside a transaction (set exactly_once=True)"
            )
        if exactly_once:
            pconf["transactional.id"] = _transaction.transactional_id(pconf, conf)
        self._producer = ResilientProducer(
            pconf, metrics=metrics, registry=registry, tracer_provider=tracer_provider
        )
        if exactly_once:
            try:
                self._txn = _transaction.Transactions(
                    self._producer,
                    pconf["transactional.id"],
                    forward_timeout,
                    float(pconf.get("transaction.timeout.ms", 60_000)) / 1000,
                )
            except BaseException:
                super().close()
                raise
            self._txn.begin()
        if metrics_port is not None:
            from resilient_kafka.metrics import serve_metrics

            self._metrics_server, self.metrics_url = serve_metrics(metrics_port, registry=registry)
        self._max_bytes = int(pconf.get("message.max.bytes", 1_000_000))
        self._forward_error: ForwardError | None = None
        self._refused_logged: set[tuple[str, int, int]] = set()
        self._where = str(conf.get("bootstrap.servers") or conf.get("metadata.broker.list"))
        self._key_deserializer = key_deserializer
        self._value_deserializer = value_deserializer
        self._replication = topic_replication_factor
        self._forward_timeout = forward_timeout

        self._barrier = CommitBarrier()
        self._in_hand: list[Message] = []
        # raw key/value of deserialized records (kept with the message, so ids are not reused)
        self._raw: dict[int, tuple[Message, bytes | None, bytes | None]] = {}
        self._forwards: list[_Forward] = []  # waiting to be (re-)produced
        self._in_flight = 0  # produced, not yet acknowledged
        self._tiers: dict[str, tuple[str, int]] = {}  # retry topic -> (source topic, tier)
        self._waiting: dict[_Key, int] = {}  # partitions paused until a retry record is due (ms)
        self._user_paused: set[_Key] = set()
        self._to_resume: set[_Key] = set()  # newly assigned, possibly still paused from before
        self._prepared: set[str] = set()  # source topics whose retry/DLQ topics exist
        self._targets: dict[tuple[str, int | None], str] = {}  # (source, tier|None) -> topic
        self._assigned_count = 0
        self._last_gauges = 0.0
        strategy = str(conf.get("partition.assignment.strategy", ""))
        self._cooperative = "cooperative" in strategy
        self._last_store = 0.0
        self._maintain_at = 0.0  # monotonic time of the next housekeeping pass
        self._batch_size = 32  # run(): records per fetch, adapted to the handler's speed
        self._batch_break = False  # run(): the application paused/seeked/assigned mid-batch
        self._seeked: set[_Key] = set()  # partitions the application seeked mid-batch
        self._stop = threading.Event()
        self._closed = False
        # outages: a breaker refusing calls, or a flood of dead letters
        self._breakers = list(breakers)
        self._breaker_scope = {k: set(v) for k, v in (breaker_scope or {}).items()}
        self._watch = BreakerWatch()
        for breaker in self._breakers:
            breaker.add_listener(self._watch)
            if self._metrics is not None:
                self._watch.track(breaker, self._metrics.fam)
        self._opens_at_handout = 0
        self._outage: Outage | None = None
        self._probe_ready: Message | None = None
        self._last_breaker_check = 0.0
        self._flood = FloodGuard(self._dead_letter) if self._dead_letter.guarded else None
        self._blocking = None
        if self._retry.blocking:
            import tenacity

            self._blocking = tenacity.Retrying(
                stop=self._retry.blocking_stop,
                wait=self._retry.blocking_wait or tenacity.wait_none(),
                retry=tenacity.retry_if_exception(self._retry_in_place),
                sleep=self._stop.wait,
                reraise=True,
                before_sleep=self._blocking_retry_noted,
            )
        self._user_callbacks: dict[str, Callable[..., Any] | None] = {}
        self._dedup = dedup
        self._dedup_key = dedup_key or headers.message_id
        self._dedup_lease = dedup_lease
        self._dedup_fail_open = on_dedup_error == "process"
        self._owner = uuid.uuid4().hex  # this consumer's name in dedup claims
        self._leases = LeaseKeeper(dedup, self._owner, dedup_lease) if dedup is not None else None
        self._running = False
        # the drop-in loop's dedup claims of records in hand: id(msg) -> (msg, key)
        self._loop_claims: dict[int, tuple[Message, str]] = {}
        self._loop_keys: set[str] = set()  # the keys of _loop_claims: twins found in O(1)
        # exactly-once mode
        self._txn_interval = transaction_interval
        self._txn_started = time.monotonic()
        self._txn_generation = 0
        self._replayed: dict[_Key, tuple[int, int]] = {}  # partition -> (generation, offset)
        self._txn_failed = False  # a forward failed inside the open transaction: abort it
        self._produced_mark = 0  # producer.produced when the records in hand were handed out
        # records whose attempt was aborted with its transaction: routed when they come again
        self._prefailed: dict[tuple[str, int, int], BaseException] = {}
        self._txn_produced = self._producer.produced  # at the start of the open transaction
        self._txn_forwarded = 0  # forwards sent in the open transaction

    # -- subscription ------------------------------------------------------------------------

    def subscribe(
        self,
        topics: Sequence[str],
        on_assign: Callable[..., Any] | None = None,
        on_revoke: Callable[..., Any] | None = None,
        on_lost: Callable[..., Any] | None = None,
    ) -> None:
        """Subscribe to ``topics`` and their retry tiers, creating missing retry/DLQ topics."""
        topics = list(topics)
        patterns = [t for t in topics if t.startswith("^")]
        if patterns:
            raise ConfigurationError(
                f"pattern subscriptions ({patterns}) are not supported: retry and DLQ topics "
                "are created per source topic at subscribe time; list the topics"
            )
        tier_topics = self._prepare_topics(topics)
        self._user_callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}
        super().subscribe(
            topics + tier_topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    def retry_topics(self, topic: str) -> list[str]:
        """The retry tier topics of ``topic`` for this consumer's group, tier 1 first."""
        return [
            self._retry.topic(topic, self._group, n) for n in range(1, self._retry.attempts + 1)
        ]

    def dead_letter_topic(self, topic: str) -> str:
        """The DLQ of ``topic`` for this consumer's group."""
        return self._dead_letter.topic(topic, self._group)

    @property
    def producer(self) -> ResilientProducer:
        """The consumer's producer, for the handler's output records. In exactly-once mode
        they commit in the same transaction as the consumed offsets (don't call flush() or the
        transaction methods on it: the consumer drives them)."""
        return self._producer

    def _target(self, source: str, attempt: int | None) -> str:
        """Retry tier ``attempt`` of ``source`` (DLQ for None), named once and cached."""
        key = (source, attempt)
        name = self._targets.get(key)
        if name is None:
            name = self._targets[key] = (
                self.dead_letter_topic(source)
                if attempt is None
                else self._retry.topic(source, self._group, attempt)
            )
        return name

    def _prepare_topics(self, topics: list[str]) -> list[str]:
        from confluent_kafka.admin import AdminClient

        metadata = self.list_topics(timeout=self._forward_timeout)
        missing = [t for t in topics if t not in metadata.topics or metadata.topics[t].error]
        if missing:
            raise TopicError(
                f"cannot subscribe: topic(s) {missing} do not exist on {self._where}",
                dict.fromkeys(missing, "does not exist"),
            )
        wanted: dict[str, int] = {}
        tier_topics: list[str] = []
        self._prepared.update(topics)
        if self._metrics is not None:
            for topic in topics:
                self._metrics.prepare_topic(topic)
        for topic in topics:
            partitions = len(metadata.topics[topic].partitions)
            for n, name in enumerate(self.retry_topics(topic), start=1):
                self._tiers[name] = (topic, n)
                tier_topics.append(name)
                wanted[name] = partitions
            wanted[self.dead_letter_topic(topic)] = partitions
        absent = {name: n for name, n in wanted.items() if name not in metadata.topics}
        if absent:
            admin = AdminClient(self._connection)
            _admin.create_topics(
                admin,
                absent,
                where=self._where,
                replication_factor=self._replication,
                exist_ok=True,
                timeout=self._forward_timeout,
            )
        return tier_topics

    def _prepare_for_assign(self, topic: str) -> None:
        """With assign() instead of subscribe(), create the topic's retry/DLQ topics on its
        first failure so the copy has somewhere to go (the tiers are consumed only when the
        application assigns them too)."""
        log.warning(
            "%s: retry tiers are consumed automatically only with subscribe(); with assign(), "
            "assign %s too",
            topic,
            ", ".join(self.retry_topics(topic)) or "no tiers",
        )
        try:
            self._prepare_topics([topic])
        except ResilientKafkaError as exc:  # the forward retries with back-off meanwhile
            log.error("cannot prepare retry/DLQ topics for %s: %s", topic, exc)

    # -- rebalance ---------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # librdkafka keeps a partition's pause flag across revoke/assign, but our reasons to
        # pause it were forgotten on revoke: resume once the assignment is in place (next poll),
        # unless the application pauses it again in its own callback.
        self._to_resume.update((tp.topic, tp.partition) for tp in partitions)
        self._maintain_at = 0.0
        self._start_tiers_at_beginning(partitions)
        self._assigned_count += len(partitions)
        if self._metrics is not None:
            self._metrics.rebalance("assign", self._assigned_count)
        callback = self._user_callbacks.get("assign")
        if callback is not None:
            callback(self, partitions)

    def _start_tiers_at_beginning(self, partitions: list[TopicPartition]) -> None:
        """A retry tier partition this group never committed on must be read from its start,
        whatever ``auto.offset.reset`` says for the source topics (librdkafka's default,
        latest, would skip retry copies written before this member got the partition)."""
        tiers = [tp for tp in partitions if tp.topic in self._tiers]
        if not tiers:
            return
        try:
            committed = self.committed(
                [TopicPartition(tp.topic, tp.partition) for tp in tiers], timeout=10
            )
        except KafkaException as exc:
            log.warning("cannot read committed offsets of retry tiers: %s", exc)
            return
        fresh = {(tp.topic, tp.partition) for tp in committed if tp.offset < 0}
        for tp in partitions:
            if (tp.topic, tp.partition) in fresh:
                tp.offset = OFFSET_BEGINNING
        if fresh:
            if self._cooperative:
                self.incremental_assign(partitions)
            else:
                super().assign(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._drop_in_hand()  # only when closing: a poll() finished them before this callback
        keys = {(tp.topic, tp.partition) for tp in partitions}
        safe = []
        if self._txn is not None:
            self._drain(self._forward_timeout)  # queued forwards go into this transaction
            self._commit_transaction()  # while this member still owns the partitions
        else:
            self._drain(self._forward_timeout)
            self._sync_offset_store()
            safe = [
                TopicPartition(t, p, o) for t, p, o in self._barrier.committable() if (t, p) in keys
            ]
        if safe:
            try:
                super().commit(offsets=safe, asynchronous=False)
            except KafkaException as exc:
                log.warning("commit on revoke failed (records will be redelivered): %s", exc)
        self._forget(keys)
        self._assigned_count = max(0, self._assigned_count - len(partitions))
        if self._metrics is not None:
            self._metrics.rebalance("revoke", self._assigned_count)
        callback = self._user_callbacks.get("revoke")
        if callback is not None:
            callback(self, partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._forget({(tp.topic, tp.partition) for tp in partitions})
        if self._txn is not None and self._txn.open:
            # its offsets can no longer commit: abort, and replay the partitions still owned
            self._abort_and_replay()
        self._assigned_count = max(0, self._assigned_count - len(partitions))
        if self._metrics is not None:
            self._metrics.rebalance("lost", self._assigned_count)
        callback = self._user_callbacks.get("lost") or self._user_callbacks.get("revoke")
        if callback is not None:
            callback(self, partitions)

    def _forget(self, keys: set[_Key]) -> None:
        for key in keys:
            self._barrier.forget(*key)
            self._waiting.pop(key, None)
            self._user_paused.discard(key)
        if self._txn is not None and self._forwards:  # their new owner routes them again
            self._forwards = [f for f in self._forwards if (f.source[0], f.source[1]) not in keys]
        if self._prefailed:  # their new owner runs the handler on them again
            for coordinates in [c for c in self._prefailed if (c[0], c[1]) in keys]:
                del self._prefailed[coordinates]
        outage = self._outage
        if outage is not None:
            outage.partitions -= keys
            for key in keys:
                outage.rewind.pop(key, None)
            held = outage.held
            if held is not None and (held.topic(), held.partition()) in keys:
                outage.held = None  # its new owner will see it
                self._probe_ready = None
            if outage.trial in keys:
                outage.trial = outage.trial_msg = None
                outage.probing = False
                outage.next_probe = time.monotonic()
            if outage.probing and outage.held is None and outage.trial is None:
                outage.probing = False  # the probe went with its partition: probe again

    # -- consuming ---------------------------------------------------------------------------

    def poll(self, timeout: float | None = None) -> Message | None:
        """The next message for the application (retry records only once due), or None."""
        if self._in_hand:
            self._finish_in_hand()
        now = time.monotonic()
        deadline = None if timeout is None or timeout < 0 else now + timeout
        metrics = self._metrics
        while True:
            if now >= self._maintain_at or self._outage is not None:
                wait = self._maintain(deadline, now)
                if self._probe_ready is not None:
                    probe = self._hand_out_probe()
                    if probe is not None and self._claimed_or_rewound(probe):
                        return probe
                    now = time.monotonic()
                    continue
            else:  # records are flowing: poll until the next housekeeping is due
                wait = self._maintain_at - now
                if deadline is not None and deadline - now < wait:
                    wait = max(0.0, deadline - now)
            started = time.monotonic() if metrics is not None else 0.0
            generation = self._txn_generation
            msg = super().poll(wait)
            if msg is not None:
                if msg.error() is not None:
                    return msg
                if self._txn_generation != generation and self._replayed_since(generation, msg):
                    now = time.monotonic()
                    continue
                admitted = self._admit(msg)
                if admitted is not None:
                    self._in_hand.append(admitted)
                    if self._dedup is not None and not self._claimed_or_rewound(admitted):
                        now = time.monotonic()
                        continue  # a duplicate (skipped), held back, or for later
                    self._opens_at_handout = self._watch.opens
                    if metrics is not None:
                        metrics.polled(admitted.topic(), time.monotonic() - started)
                    return admitted
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return None

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        """Up to ``num_messages`` messages (retry records only once due)."""
        self._finish_in_hand()
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        while True:
            wait = self._maintain(deadline, time.monotonic())
            if self._probe_ready is not None:
                probe = self._hand_out_probe()
                if probe is not None and self._claimed_or_rewound(probe):
                    return [probe]
                continue
            started = time.monotonic()
            generation = self._txn_generation
            batch = super().consume(num_messages, wait)
            if self._txn_generation != generation:
                batch = [m for m in batch if not self._replayed_since(generation, m)]
            self._opens_at_handout = self._watch.opens
            out = []
            metrics = self._metrics
            try:
                for i, msg in enumerate(batch):
                    if msg.error() is not None:
                        out.append(msg)
                        continue
                    admitted = self._admit(msg)
                    if admitted is not None:
                        self._in_hand.append(admitted)
                        if self._dedup is not None:
                            try:
                                if not self._claimed_for_loop(admitted):
                                    continue
                            except _NotNow:
                                self._take_out_of_hand(admitted)
                                self._seeked.clear()  # no application code ran in between
                                self._rewind_unhandled(batch, i)
                                break
                        out.append(admitted)
                        if metrics is not None:
                            metrics.consumed(admitted.topic())
            except BaseException:
                self._unwind(batch, out)
                raise
            if metrics is not None and out and out[-1].error() is None:
                metrics.poll(out[-1].topic(), time.monotonic() - started)
            if out or (deadline is not None and time.monotonic() >= deadline):
                return out

    def _admit(self, msg: Message) -> Message | None:
        """Track ``msg``, or hold it back: retry records not yet due, undeserializable records."""
        # outage first: a not-due check below would seek past records refused earlier
        if self._outage is not None:
            if not self._admit_during_outage(msg):
                return None
            if msg is self._outage.trial_msg:
                admitted = self._admit_checked(msg)
                if admitted is None and self._outage is not None:
                    self._abandon_trial()
                return admitted
        return self._admit_checked(msg)

    def _admit_checked(self, msg: Message) -> Message | None:
        topic = msg.topic()
        if topic in self._tiers:
            if (topic, msg.partition()) in self._waiting:
                return None  # fetched in the same batch behind a record that is not due
            due = headers.due(msg)
            now_ms = time.time() * 1000
            if due is not None and due > now_ms:
                tp = TopicPartition(topic, msg.partition(), msg.offset())
                super().pause([tp])
                super().seek(tp)
                self._waiting[(topic, msg.partition())] = due
                self._maintain_at = 0.0  # work out when to resume it
                return None
            if due is not None and self._metrics is not None:
                tier = self._tiers[topic][1]
                nominal = self._retry.delays[tier - 1] if tier <= self._retry.attempts else 0.0
                self._metrics.retry_delay(topic, (now_ms - due) / 1000 + nominal)
        self._barrier.track(topic, msg.partition(), msg.offset())
        if self._txn is not None:
            self._produced_mark = self._producer.produced
            if self._prefailed:
                exc = self._prefailed.pop((topic, msg.partition(), msg.offset()), None)
                if exc is not None:  # its attempt was aborted with its transaction: route it
                    self._route(msg, exc)
                    return None
        if self._key_deserializer is not None or self._value_deserializer is not None:
            return self._deserialize(msg)
        return msg

    def _deserialize(self, msg: Message) -> Message | None:
        raw = (msg.key(), msg.value())
        try:
            if self._key_deserializer is not None:
                ctx = SerializationContext(msg.topic(), MessageField.KEY, msg.headers())
                msg.set_key(self._key_deserializer(raw[0], ctx))
            if self._value_deserializer is not None:
                ctx = SerializationContext(msg.topic(), MessageField.VALUE, msg.headers())
                msg.set_value(self._value_deserializer(raw[1], ctx))
        except Exception as exc:
            msg.set_key(raw[0])
            msg.set_value(raw[1])
            error = DeserializationError(f"cannot deserialize record: {exc}")
            error.__cause__ = exc
            log.warning(
                "record %s [%d] @%d cannot be deserialized; sending it to the DLQ: %s",
                msg.topic(),
                msg.partition(),
                msg.offset(),
                exc,
            )
            self._route(msg, error, reason=headers.DESERIALIZATION)
            return None
        self._raw[id(msg)] = (msg, raw[0], raw[1])
        return msg

    def _unwind(self, batch: list[Message], admitted: list[Message]) -> None:
        """An exception stopped a batch: nothing of it reaches the application, so take its
        records out of hand (the one being admitted too: never completed unseen), release their
        dedup claims, and seek every partition back to its first record of the batch."""
        taken = {id(m) for m in batch}
        self._in_hand = [m for m in self._in_hand if id(m) not in taken]
        for msg in batch:
            self._raw.pop(id(msg), None)
            if id(msg) in self._loop_claims:
                self._unclaim(self._pop_loop_claim(msg))
        first: dict[_Key, int] = {}
        for msg in batch:
            offset = msg.offset()
            if msg.error() is None and offset is not None:
                key = (msg.topic(), msg.partition())
                first[key] = min(first.get(key, offset), offset)
        for (topic, partition), offset in first.items():
            try:
                super().seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:
                log.warning("cannot rewind %s [%d] to %d: %s", topic, partition, offset, exc)

    def _hand_out_probe(self) -> Message | None:
        msg = self._probe_ready
        assert msg is not None
        self._probe_ready = None
        deserializing = self._key_deserializer is not None or self._value_deserializer is not None
        # held before it was deserialized: deserialize now, never hand out raw bytes
        if deserializing and id(msg) not in self._raw and self._deserialize(msg) is None:
            outage = self._outage
            if outage is not None and outage.probing:  # dead-lettered, not held again
                self._end_outage(seek_past=msg)
            return None
        self._in_hand.append(msg)
        self._opens_at_handout = self._watch.opens
        log.info(
            "probing the downstream with %s [%d] @%d", msg.topic(), msg.partition(), msg.offset()
        )
        return msg

    def _drop_in_hand(self) -> None:
        """Forget records in hand without completing them: they will be delivered again."""
        for msg in self._in_hand:
            self._raw.pop(id(msg), None)
            if self._loop_claims:
                self._unclaim(self._pop_loop_claim(msg))
        self._in_hand.clear()

    def _finish_in_hand(self) -> None:
        """The application asked for more: every message it holds and did not fail is done."""
        in_hand = self._in_hand
        if not in_hand:
            return
        complete = self._barrier.complete
        success = self._metrics.success if self._metrics is not None else None
        outage = self._outage
        for msg in in_hand:
            topic = msg.topic()
            complete(topic, msg.partition(), msg.offset())
            if success is not None:
                success(topic)
            if outage is not None and outage.is_probe(msg):
                self._end_outage(seek_past=msg)
                outage = None
        if self._flood is not None:
            for _ in in_hand:
                self._flood.record(False)
        if self._raw:
            for msg in in_hand:
                self._raw.pop(id(msg), None)
        if self._loop_claims:  # the drop-in loop's records are processed: mark them done
            for msg in in_hand:
                self._claimed_done(self._pop_loop_claim(msg), msg)
        in_hand.clear()

    def _maintain(self, deadline: float | None, now: float) -> float:
        """Housekeeping between polls; returns how long the next poll may block."""
        self._producer.poll(0)
        if self._forwards:
            self._send_forwards()
        if self._forward_error is not None:
            error, self._forward_error = self._forward_error, None
            raise error
        if self._to_resume:
            keys = self._to_resume - self._user_paused - self._waiting.keys()
            self._to_resume.clear()
            outage = self._outage
            if outage is not None:  # newly assigned partitions wait out the outage too
                held_back = {key for key in keys if self._in_scope(key, outage)}
                if held_back:
                    super().pause([TopicPartition(t, p) for t, p in held_back])
                    outage.partitions |= held_back
                keys -= held_back
            if keys:
                super().resume([TopicPartition(t, p) for t, p in keys])
        if self._outage is not None:
            self._tend_outage(now)
        if self._metrics is not None:
            self._metrics.flush()
            if now - self._last_gauges >= 0.5:
                self._last_gauges = now
                self._update_pause_gauges()
        if self._auto_commit and now - self._last_store >= _STORE_INTERVAL:
            self._last_store = now
            self._store_offsets()
        wait = 0.1 if self._in_flight or self._forwards else 1.0
        if self._txn is not None:
            if self._txn_failed or now - self._txn_started >= self._txn_interval:
                self._commit_transaction()
            wait = min(wait, self._txn_interval)
        if self._waiting:
            now_ms = time.time() * 1000
            due_now = [key for key, due in self._waiting.items() if due <= now_ms]
            outage_partitions = self._outage.partitions if self._outage is not None else ()
            for key in due_now:
                del self._waiting[key]
                if key not in self._user_paused and key not in outage_partitions:
                    super().resume([TopicPartition(*key)])
            if self._waiting:
                next_due = min(self._waiting.values())
                wait = min(wait, max(0.0, (next_due - now_ms) / 1000))
        outage = self._outage
        if outage is not None and not outage.probing:
            wait = min(wait, max(0.0, outage.next_probe - now))
        self._maintain_at = now + min(wait, _MAINTAIN_INTERVAL)
        if deadline is not None:
            wait = min(wait, max(0.0, deadline - now))
        return wait

    def _sync_offset_store(self) -> None:
        """Store every safe offset now: librdkafka's own auto-commit (periodic, on revoke and
        on close) commits the stored offsets, and must not commit an older position after an
        explicit commit of a newer one."""
        if self._auto_commit:
            self._store_offsets()

    def _store_offsets(self) -> None:
        moved = self._barrier.advanced()
        if not moved:
            return
        try:
            super().store_offsets(offsets=[TopicPartition(t, p, o) for t, p, o in moved])
        except KafkaException as exc:  # a partition revoked in the meantime
            log.debug("store_offsets skipped: %s", exc)

    # -- failures ----------------------------------------------------------------------------

    def fail(self, msg: Message, exc: BaseException) -> None:
        """Route ``msg`` to its next retry tier or the DLQ; its offset waits for the ack."""
        for i, in_hand in enumerate(self._in_hand):
            if in_hand is msg:
                del self._in_hand[i]
                break
        else:
            raise ResilientKafkaError(
                "fail() needs a message this consumer handed out and that is still in hand "
                f"({msg.topic()} [{msg.partition()}] @{msg.offset()}); call it before the next "
                "poll()/consume()"
            )
        self._maintain_at = 0.0  # a forward to send and acknowledge, or an outage to tend
        if self._loop_claims:
            self._unclaim(self._pop_loop_claim(msg))  # not done: the retry hop claims again
        if self._txn is not None and (
            self._txn_failed or self._producer.produced != self._produced_mark
        ):
            # the handler's output for this record is in the open transaction: the transaction
            # is aborted and replayed at the next housekeeping (after a flush, and after the
            # application is done with the records it holds); the record is routed when it
            # comes again, without running the handler
            self._txn_failed = True
            self._batch_break = True
            if not self._is_outage(exc):
                self._prefailed[(msg.topic(), msg.partition(), msg.offset())] = exc
                return
        outage = self._outage
        probe = outage is not None and outage.is_probe(msg)
        if self._is_outage(exc):
            if isinstance(exc, CircuitBreakerError):
                self._watch.refused(self._breakers)
            self._hold(msg, BREAKER)  # refused, or it tripped a breaker: not the message's fault
            return
        held = self._route(msg, exc)
        if probe and not held:  # the downstream answered; this record just failed on its own
            self._end_outage(seek_past=msg)

    def _route(self, msg: Message, exc: BaseException, reason: str | None = None) -> bool:
        """Send ``msg`` on to a retry tier or the DLQ; True if it was held back (DLQ flood)."""
        now_ms = int(time.time() * 1000)
        prev = headers.header_dict(msg)
        attempt = (headers.int_header(prev, headers.ATTEMPT) or 0) + 1
        first = headers.int_header(prev, headers.FIRST_FAILURE) or now_ms
        source_topic = self._tiers[msg.topic()][0] if msg.topic() in self._tiers else msg.topic()
        if source_topic not in self._prepared:
            self._prepare_for_assign(source_topic)
        due_ms = None
        if reason is None:
            timeout = self._retry.timeout
            if not self._retry.is_retryable(exc):
                reason = headers.NON_RETRYABLE
            elif timeout is not None and now_ms - first >= timeout * 1000:
                reason = headers.TIMEOUT
            elif attempt > self._retry.attempts:
                reason = headers.EXHAUSTED
        if reason is None:
            target = self._target(source_topic, attempt)
            due_ms = now_ms + int(self._retry.delay(attempt) * 1000)
        else:
            if self._flood is not None:
                if self._flood.would_flood():
                    if self._dead_letter.on_flood == "raise":
                        raise DeadLetterFloodError(
                            f"{self._flood.consecutive} consecutive / {self._flood.dead} recent "
                            f"dead letters: {msg.topic()} [{msg.partition()}] @{msg.offset()} "
                            "not dead-lettered (DeadLetterPolicy limits exceeded)"
                        ) from exc
                    self._hold(msg, DLQ_FLOOD)
                    return True
                self._flood.record(True)
            target = self._target(source_topic, None)
        entry = self._raw.pop(id(msg), None)
        key, value = (entry[1], entry[2]) if entry is not None else (msg.key(), msg.value())
        hdrs = self._sized_headers(msg, prev, exc, attempt, first, key, value, due_ms, reason)
        kind, ts = msg.timestamp()
        span = None
        if self._tracing is not None:
            span, hdrs = self._tracing.start_send(
                target,
                hdrs,
                key,
                link_context=self._tracing.creation_context(msg.headers()),
                attributes={
                    "resilient_kafka.forward.reason": "retry" if reason is None else "dlq",
                    "resilient_kafka.retry.attempt": attempt,
                    "resilient_kafka.original.destination": source_topic,
                },
            )
            self._trace_route(target, attempt, due_ms, reason)
        forward = _Forward(
            (msg.topic(), msg.partition(), msg.offset()),
            target,
            key,
            value,
            hdrs,
            ts if kind else 0,
        )
        forward.span = span
        self._forwards.append(forward)
        self._send_forwards()
        if self._metrics is not None:
            error_type = headers.exception_type(exc)
            if reason is None:
                self._metrics.outcome(msg.topic(), "retry_scheduled", error_type)
                self._metrics.retry(msg.topic(), "topic", error_type)
            else:
                self._metrics.outcome(msg.topic(), "dead_lettered", error_type)
        return False

    def _sized_headers(
        self,
        msg: Message,
        prev: dict[str, bytes],
        exc: BaseException,
        attempt: int,
        first: int,
        key: bytes | None,
        value: bytes | None,
        due_ms: int | None,
        reason: str | None,
    ) -> headers.HeaderList:
        """Headers that keep the record under ``message.max.bytes``: drop the stack trace, then
        shorten the exception message, before a forward could fail because of our diagnostics."""
        build = functools.partial(
            headers.forward_headers,
            msg,
            prev=prev,
            exc=exc,
            attempt_no=attempt,
            first_failure_ms=first,
            group=self._group,
            max_text_bytes=self._dead_letter.max_text_bytes,
            due_ms=due_ms,
            reason=reason,
        )
        hdrs = build()
        if headers.size_of(key, value, hdrs) <= self._max_bytes:
            return hdrs
        hdrs = build(include_stacktrace=False)
        if headers.size_of(key, value, hdrs) <= self._max_bytes:
            return hdrs
        return build(include_stacktrace=False, message_limit=64)

    def _send_forwards(self) -> None:
        now = time.monotonic()
        # take the list first: delivery callbacks fired by poll() below may append to it
        pending, self._forwards = self._forwards, []
        waiting = self._forwards
        for forward in pending:
            if forward.next_try > now:
                waiting.append(forward)
                continue
            forward.generation = self._txn_generation
            try:
                self._producer._produce_untraced(
                    forward.target,
                    forward.value,
                    forward.key,
                    -1,
                    self._producer._reporter(functools.partial(self._forwarded, forward)),
                    forward.timestamp,
                    forward.headers,
                )
                self._in_flight += 1
                self._txn_forwarded += 1
            except BufferError:
                self._producer.poll(0.05)
                waiting.append(forward)
            except KafkaException as exc:
                self._forward_failed(forward, exc.args[0] if exc.args else exc)
                waiting.append(forward)
            except (TypeError, ValueError) as exc:  # e.g. a value that is not bytes
                self._forward_failed(forward, exc)
                waiting.append(forward)

    def _forwarded(self, forward: _Forward, err: KafkaError | None, msg: Any) -> None:
        if forward.generation != self._txn_generation:
            return  # produced in an aborted transaction: its record is replayed
        self._in_flight -= 1
        if err is not None and self._txn is not None:
            # the open transaction cannot commit now: abort and replay it (next housekeeping)
            log.error("forward to %s failed inside a transaction: %s", forward.target, err)
            self._txn_failed = True
            self._maintain_at = 0.0
            self._note_permanent(forward, err)  # a replay would fail the same way: stop
            return
        if err is None:
            self._barrier.complete(*forward.source)
            if forward.span is not None:
                from resilient_kafka.tracing import Tracing

                Tracing.end_send(forward.span, None, msg)
            return
        self._forward_failed(forward, err)
        self._forwards.append(forward)

    def _trace_route(
        self, target: str, attempt: int, due_ms: int | None, reason: str | None
    ) -> None:
        """Outcome attribute and event on the current (process) span."""
        from opentelemetry import trace

        span = trace.get_current_span()
        if not span.is_recording():
            return
        if reason is None:
            delay = (due_ms - time.time() * 1000) / 1000 if due_ms else 0.0
            span.set_attribute("resilient_kafka.outcome", "retry_scheduled")
            span.add_event(
                "resilient_kafka.retry.scheduled",
                {"messaging.destination.name": target, "attempt": attempt, "delay_s": delay},
            )
        else:
            span.set_attribute("resilient_kafka.outcome", "dead_lettered")
            span.add_event(
                "resilient_kafka.dead_lettered",
                {"messaging.destination.name": target, "reason": reason},
            )

    def _note_permanent(self, forward: _Forward, err: object) -> bool:
        """If ``err`` is one no retry cures, keep a ForwardError for the next housekeeping to
        raise (once per forward: raising inside a delivery callback would lose it)."""
        if isinstance(err, (TypeError, ValueError)):
            hint = "the record's key or value is not bytes"
        elif isinstance(err, KafkaError) and err.code() in _PERMANENT_FORWARD_ERRORS:
            hint = _PERMANENT_FORWARD_ERRORS[err.code()].format(
                target=forward.target, limit=self._max_bytes
            )
        else:
            return False
        if not forward.permanent:
            forward.permanent = True
            size = len(forward.key or b"") + len(forward.value or b"")
            topic, partition, offset = forward.source
            self._forward_error = ForwardError(
                f"the {'DLQ' if forward.target.endswith('.dlq') else 'retry'} copy of {topic} "
                f"[{partition}] @{offset} ({size} bytes of key and value) to {forward.target} "
                f"was refused: {err}. {hint[0].upper()}{hint[1:]}. Nothing is lost: the "
                "offset stays uncommitted (the record comes again after a restart) and the "
                "copy is retried meanwhile",
                forward.source,
                forward.target,
                err,
            )
            self._maintain_at = 0.0
        return True

    def _forward_failed(self, forward: _Forward, err: object) -> None:
        forward.attempts += 1
        first, most = _FORWARD_BACKOFF
        backoff = min(most, first * 2 ** (forward.attempts - 1))
        if self._note_permanent(forward, err):
            backoff = most
        forward.next_try = time.monotonic() + backoff
        log.error(
            "forward of %s [%d] @%d to %s failed (attempt %d, retrying in %.1fs; its offset is "
            "held): %s",
            *forward.source,
            forward.target,
            forward.attempts,
            backoff,
            err,
        )

    def _drain(self, timeout: float) -> bool:
        """Wait until every forward is acknowledged; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while self._forwards or self._in_flight:
            if not self._in_flight and all(f.permanent for f in self._forwards):
                refused = {f.source for f in self._forwards}
                if refused != self._refused_logged:  # close() drains twice (and on revoke)
                    self._refused_logged = refused
                    log.error(
                        "%d forward(s) refused by the broker for good; their offsets stay "
                        "uncommitted and the records will be redelivered",
                        len(self._forwards),
                    )
                return False
            if time.monotonic() >= deadline:
                log.warning(
                    "%d forward(s) still unacknowledged after %.0fs; their offsets stay "
                    "uncommitted and the records will be redelivered",
                    len(self._forwards) + self._in_flight,
                    timeout,
                )
                return False
            self._producer.poll(0.05)
            if self._forwards:
                self._send_forwards()
        return True

    def _update_pause_gauges(self) -> None:
        assert self._metrics is not None
        outage = self._outage
        paused = self._metrics.paused
        reason = outage.reason if outage is not None else None
        count = len(outage.partitions) if outage is not None else 0
        paused("circuit_open", count if reason == BREAKER else 0)
        paused("dlq_flood", count if reason == DLQ_FLOOD else 0)
        paused("dedup_store", count if reason == DEDUP_STORE else 0)
        paused("retry_backoff", len(self._waiting))
        paused("manual", len(self._user_paused))

    # -- outages -----------------------------------------------------------------------------

    def _is_outage(self, exc: BaseException) -> bool:
        """A breaker refused the call, or this message's handling tripped one."""
        return isinstance(exc, CircuitBreakerError) or self._watch.opens != self._opens_at_handout

    def _blocking_retry_noted(self, state: Any) -> None:
        if self._metrics is not None and self._in_hand and state.outcome is not None:
            exc = state.outcome.exception()
            error_type = headers.exception_type(exc) if exc is not None else ""
            self._metrics.retry(self._in_hand[-1].topic(), "blocking", error_type)

    def _retry_in_place(self, exc: BaseException) -> bool:
        if self._txn is not None and self._producer.produced != self._produced_mark:
            return False  # its output is in the transaction: a retry topic hop replays cleanly
        return (
            not self._stop.is_set() and not self._is_outage(exc) and self._retry.is_retryable(exc)
        )

    def _in_scope(self, key: _Key, outage: Outage) -> bool:
        if outage.reason != BREAKER or not self._breaker_scope or not outage.breakers:
            return True
        source = self._tiers[key[0]][0] if key[0] in self._tiers else key[0]
        return any(source in self._breaker_scope.get(b.name, ()) for b in outage.breakers)

    def _hold(self, msg: Message, reason: str) -> None:
        """Keep ``msg`` (not failed, no attempt counted), pause, and schedule a probe."""
        key = (msg.topic(), msg.partition())
        outage = self._outage
        if outage is None:
            open_breakers = [b for b in self._breakers if b.current_state != CLOSED]
            outage = self._outage = Outage(
                reason, open_breakers, self._dead_letter.flood_backoff[0]
            )
            paused = [
                TopicPartition(tp.topic, tp.partition)
                for tp in self.assignment()
                if self._in_scope((tp.topic, tp.partition), outage)
            ]
            super().pause(paused)
            outage.partitions.update((tp.topic, tp.partition) for tp in paused)
            log.warning(
                "%s: pausing %d partition(s) instead of failing messages; holding %s [%d] @%d",
                {BREAKER: "downstream breaker open", DLQ_FLOOD: "dead-letter flood"}.get(
                    reason, "dedup store failing"
                ),
                len(paused),
                *key,
                msg.offset(),
            )
        elif outage.probing:  # the probe failed: back off, and re-pause what a trial resumed
            outage.backoff = min(self._dead_letter.flood_backoff[1], outage.backoff * 2)
            super().pause([TopicPartition(t, p) for t, p in outage.partitions])
        if key not in outage.partitions:
            super().pause([TopicPartition(*key)])
            outage.partitions.add(key)
        held = outage.held
        if (
            held is None
            or held is msg
            or ((held.topic(), held.partition()) == key and msg.offset() < held.offset())
        ):
            outage.held = msg
        self._rewind(outage, key, msg.offset())
        outage.probing = False
        outage.trial = outage.trial_msg = None
        outage.next_probe = self._next_probe(outage)

    def _next_probe(self, outage: Outage) -> float:
        now = time.monotonic()
        if outage.reason == BREAKER:
            dues = [d for d in (probe_due_at(b) for b in outage.breakers) if d is not None]
            if dues:
                return now + max(0.0, min(dues) - time.time())
        return now + outage.backoff

    def _rewind(self, outage: Outage, key: _Key, offset: int) -> None:
        """Pause the partition and make it re-deliver from the lowest refused offset, so that
        no record is ever skipped while it stays paused."""
        lowest = min(offset, outage.rewind.get(key, offset))
        outage.rewind[key] = lowest
        tp = TopicPartition(key[0], key[1], lowest)
        super().pause([tp])
        super().seek(tp)

    def _admit_during_outage(self, msg: Message) -> bool:
        """The trial record passes (its partition is paused again behind it); a record that
        slipped out of another paused partition is rewound to, not handed out."""
        outage = self._outage
        assert outage is not None
        key = (msg.topic(), msg.partition())
        if key == outage.trial and outage.trial_msg is None:
            due = headers.due(msg) if key[0] in self._tiers else None
            if due is not None and due > time.time() * 1000:  # not due: try another partition
                self._rewind(outage, key, msg.offset())
                outage.trial = None
                outage.probing = False
                outage.next_probe = time.monotonic()
                return False
            outage.trial_msg = msg
            super().pause([TopicPartition(*key)])
            super().seek(TopicPartition(key[0], key[1], msg.offset() + 1))
            held = outage.held
            if held is None or (held.topic(), held.partition()) != key:
                outage.rewind.pop(key, None)  # a skip-ahead trial keeps the held record's
            self._opens_at_handout = self._watch.opens
            log.info("probing the downstream with %s [%d] @%d", *key, msg.offset())
            return True
        if key in outage.partitions:
            self._rewind(outage, key, msg.offset())
            return False
        return True

    def _abandon_trial(self) -> None:
        """The trial record was not handed out (not due, undeserializable): try again soon."""
        outage = self._outage
        assert outage is not None
        if outage.trial is not None:
            super().pause([TopicPartition(*outage.trial)])
        outage.trial = outage.trial_msg = None
        outage.probing = False
        outage.next_probe = time.monotonic()

    def _tend_outage(self, now: float) -> None:
        outage = self._outage
        assert outage is not None
        if outage.probing:
            trial_silent = outage.trial is not None and outage.trial_msg is None
            if trial_silent and now >= outage.probe_deadline:
                # nothing arrived from the trial partition (empty, or a retry not due): next one
                topic, partition = outage.trial  # type: ignore[misc]
                super().pause([TopicPartition(topic, partition)])
                outage.trial = None
                outage.probing = False
                outage.next_probe = now
            return
        if outage.breakers and now - self._last_breaker_check >= _BREAKER_CHECK_INTERVAL:
            self._last_breaker_check = now
            if all(b.current_state == CLOSED for b in outage.breakers):
                self._end_outage(seek_past=None)  # closed elsewhere (shared state)
                return
        if now < outage.next_probe:
            return
        # Alternate the held record with a one-record trial from another paused partition: a
        # record that fails on its own must not keep the breaker open for everyone.
        k = outage.probes
        outage.probes += 1
        held = outage.held
        held_key = (held.topic(), held.partition()) if held is not None else None
        # partitions known to hold refused records first: an empty one only costs a wait
        others = sorted(
            outage.partitions - {held_key} - self._waiting.keys(),
            key=lambda key: (key not in outage.rewind, key),
        )
        outage.probing = True
        if held is not None and k % 2 == 0:
            self._probe_ready = held
            return
        outage.trial_msg = None
        outage.probe_deadline = now + _TRIAL_WAIT
        if others:
            outage.trial = others[(k // 2) % len(others)]
        elif held_key is not None:
            # nothing else to try: the record after the held one (the held record may be poison)
            outage.trial = held_key
            super().seek(TopicPartition(held_key[0], held_key[1], held.offset() + 1))
        else:
            outage.probing = False
            outage.next_probe = now + outage.backoff
            return
        super().resume([TopicPartition(*outage.trial)])

    def _end_outage(self, seek_past: Message | None) -> None:
        outage = self._outage
        if outage is None:
            return
        self._outage = None
        self._probe_ready = None
        if seek_past is not None:
            key = (seek_past.topic(), seek_past.partition())
            target = seek_past.offset() + 1
            if seek_past is not outage.held and key in outage.rewind:
                target = min(target, outage.rewind[key])  # a skip-ahead trial: held comes again
            super().seek(TopicPartition(key[0], key[1], target))
        keys = outage.partitions - self._user_paused - self._waiting.keys()
        if keys:
            super().resume([TopicPartition(t, p) for t, p in keys])
        if self._flood is not None:
            self._flood.reset()
        log.warning(
            "downstream recovered after %.1fs: resuming %d partition(s)",
            time.monotonic() - outage.started,
            len(keys),
        )

    @property
    def outage(self) -> Outage | None:
        """The current outage (partitions paused because the downstream is down), or None."""
        return self._outage

    # -- exactly-once ------------------------------------------------------------------------

    def _commit_transaction(self) -> None:
        """Commit the open transaction with the offsets of every record done in it (abort and
        replay it if that fails). Called between records, never with a record in hand."""
        txn = self._txn
        assert txn is not None
        if not txn.open:
            return
        if self._forwards:
            self._send_forwards()
        if self._in_flight or self._txn_failed:
            # a forward's ack is what makes its source offset committable; and an abort right
            # after a produce can fail fatally in librdkafka (its issue #4849): flush first
            self._producer.flush(self._forward_timeout)
        if self._txn_failed or self._in_flight:
            if self._in_flight:
                log.error(
                    "%d forward(s) unacknowledged after %.0fs: aborting the transaction",
                    self._in_flight,
                    self._forward_timeout,
                )
            self._abort_and_replay()
            return
        points = self._barrier.replay_points()  # before advanced(): if the commit fails
        offsets = [TopicPartition(t, p, o) for t, p, o in self._barrier.advanced()]
        now = time.monotonic()
        wrote = self._txn_forwarded or self._producer.produced != self._txn_produced
        if not offsets and not wrote:
            self._txn_started = now  # nothing written, nothing consumed: keep it open
            return
        if txn.commit(offsets, self.consumer_group_metadata()):
            if self._metrics is not None:
                self._metrics.commit(time.monotonic() - now)
                self._metrics.transaction("committed")
            self._begin_transaction()
        else:
            if self._metrics is not None:
                self._metrics.commit(time.monotonic() - now, "TransactionAborted")
            self._replay(points)

    def _begin_transaction(self) -> None:
        assert self._txn is not None
        self._txn.begin()
        self._txn_started = time.monotonic()
        self._txn_produced = self._producer.produced
        self._txn_forwarded = 0

    def _abort_and_replay(self) -> None:
        assert self._txn is not None
        self._txn.abort()
        self._replay()

    def _replay(self, points: list[tuple[str, int, int]] | None = None) -> None:
        """The open transaction was aborted: forget what it did and rewind every partition to
        where it began (the offset committed with the last transaction), so its records come
        again; then open the next one."""
        if self._metrics is not None:
            self._metrics.transaction("aborted")
        self._txn_generation += 1  # delivery reports of the aborted forwards are ignored
        self._forwards.clear()
        self._in_flight = 0
        self._txn_failed = False
        outage = self._outage
        if outage is not None:  # a probe in progress is void: its record comes again
            if outage.trial is not None:
                super().pause([TopicPartition(*outage.trial)])
            outage.trial = outage.trial_msg = None
            outage.probing = False
            outage.next_probe = time.monotonic()
            self._probe_ready = None
        self._drop_in_hand()
        assigned = {(tp.topic, tp.partition) for tp in self.assignment()}
        rewound = 0
        if points is None:
            points = self._barrier.replay_points()
        for topic, partition, offset in points:
            key = (topic, partition)
            self._barrier.forget(topic, partition)
            if key not in assigned:
                continue
            rewound += 1
            self._waiting.pop(key, None)
            self._seeked.add(key)  # run(): the rest of the batch is not rewound over this
            # a replay inside a rebalance callback, mid poll()/consume(): the records that call
            # fetched for this partition are dropped and the partition rewound again
            self._replayed[key] = (self._txn_generation, offset)
            self._rewind_for_replay(key, offset)
        self._batch_break = True
        log.warning("transaction aborted: replaying %d partition(s)", rewound)
        self._begin_transaction()

    def _rewind_for_replay(self, key: _Key, offset: int) -> None:
        outage = self._outage
        if outage is not None and key in outage.partitions:
            held = outage.held
            if held is not None and (held.topic(), held.partition()) == key:
                outage.held = None  # it comes again from the rewound position
            self._rewind(outage, key, offset)
            return
        try:
            super().seek(TopicPartition(key[0], key[1], offset))
            if key not in self._user_paused:  # paused for a retry's due time, maybe
                super().resume([TopicPartition(*key)])
        except KafkaException as exc:  # going on would commit past the aborted records
            raise TransactionError(
                f"cannot rewind {key[0]} [{key[1]}] to {offset} after an aborted "
                f"transaction: {exc}; stopping (a restart resumes from the committed offsets)"
            ) from exc

    def _replayed_since(self, generation: int, msg: Message) -> bool:
        """True (and the partition rewound again) if ``msg`` was fetched by a call during
        which a replay rewound its partition: it may predate the rewind, so it comes again."""
        entry = self._replayed.get((msg.topic(), msg.partition()))
        if entry is None or entry[0] <= generation or msg.error() is not None:
            return False
        self._rewind_for_replay((msg.topic(), msg.partition()), entry[1])
        return True

    # -- committing --------------------------------------------------------------------------

    def commit(
        self,
        message: Message | None = None,
        offsets: list[TopicPartition] | None = None,
        asynchronous: bool = True,
    ) -> list[TopicPartition] | None:
        """Commit, but never past a record that is not done, whatever is passed.

        Messages in hand that were not failed count as processed (commit follows processing).
        In exactly-once mode this commits the open transaction, with the offsets of every
        record done (``message``/``offsets`` cannot pick others; ``asynchronous`` is ignored).
        """
        if self._txn is not None:
            if message is not None or offsets is not None:
                raise ResilientKafkaError(
                    "in exactly-once mode offsets commit with the transaction, past every "
                    "record done; call commit() without message= or offsets="
                )
            self._finish_in_hand()
            self._commit_transaction()
            return None
        self._finish_in_hand()
        self._producer.poll(0)
        self._sync_offset_store()
        safe = {(t, p): o for t, p, o in self._barrier.committable()}
        if message is not None:
            requested = [TopicPartition(message.topic(), message.partition(), message.offset() + 1)]
        elif offsets is not None:
            requested = offsets
        else:
            requested = [TopicPartition(t, p, o) for (t, p), o in safe.items()]
        clamped = []
        for tp in requested:
            limit = safe.get((tp.topic, tp.partition), -1)
            if limit >= 0:
                clamped.append(TopicPartition(tp.topic, tp.partition, min(tp.offset, limit)))
        if not clamped:
            return None
        started = time.monotonic()
        try:
            result: list[TopicPartition] | None = super().commit(
                offsets=clamped, asynchronous=asynchronous
            )
        except KafkaException as exc:
            if self._metrics is not None:
                error = exc.args[0] if exc.args else None
                name = error.name() if isinstance(error, KafkaError) else type(exc).__name__
                self._metrics.commit(time.monotonic() - started, name)
            raise
        if self._metrics is not None and not asynchronous:
            self._metrics.commit(time.monotonic() - started)
        return result

    def assign(self, partitions: list[TopicPartition]) -> None:
        """``Consumer.assign``; source topics get their retry/DLQ topics prepared, and retry
        tiers assigned alongside are recognised as tiers (due times honoured)."""
        topics = {tp.topic for tp in partitions}
        derived: set[str] = set()
        for topic in topics:
            try:
                derived.update(self.retry_topics(topic))
                derived.add(self.dead_letter_topic(topic))
            except ConfigurationError:
                continue  # names that cannot have tiers (e.g. a tier of a tier)
        sources = sorted(t for t in topics - derived if t not in self._prepared)
        if sources:
            try:
                self._prepare_topics(sources)
            except ResilientKafkaError as exc:
                log.error("cannot prepare retry/DLQ topics for %s: %s", sources, exc)
        self._batch_break = True  # run(): the new assignment's positions are the application's
        self._seeked.update((tp.topic, tp.partition) for tp in partitions)
        super().assign(partitions)

    def unassign(self) -> None:
        if self._txn is not None:
            self._commit_transaction()  # the offsets of the partitions given up, with it
        self._batch_break = True
        self._forget({(tp.topic, tp.partition) for tp in self.assignment()})
        super().unassign()

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        self._batch_break = True
        self._seeked.update((tp.topic, tp.partition) for tp in partitions)
        super().incremental_assign(partitions)

    def incremental_unassign(self, partitions: list[TopicPartition]) -> None:
        if self._txn is not None:
            self._commit_transaction()
        self._batch_break = True
        self._forget({(tp.topic, tp.partition) for tp in partitions})
        super().incremental_unassign(partitions)

    def pause(self, partitions: list[TopicPartition]) -> None:
        self._user_paused.update((tp.topic, tp.partition) for tp in partitions)
        self._maintain_at = 0.0
        self._batch_break = True  # run(): the records behind in the batch are rewound
        super().pause(partitions)

    def seek(self, partition: TopicPartition) -> None:
        self._seeked.add((partition.topic, partition.partition))
        self._batch_break = True  # run(): the rest of the batch is not handed out
        super().seek(partition)

    def resume(self, partitions: list[TopicPartition]) -> None:
        keys = {(tp.topic, tp.partition) for tp in partitions}
        self._user_paused -= keys
        self._maintain_at = 0.0
        # partitions holding a retry record that is not due yet resume when it is
        super().resume([tp for tp in partitions if (tp.topic, tp.partition) not in self._waiting])

    # -- handler mode ------------------------------------------------------------------------

    def run(self, handler: Handler, *, poll_timeout: float = 0.5) -> None:
        """Process messages with ``handler`` until :meth:`stop`, SIGINT or SIGTERM.

        ``handler(msg)`` returning means success; raising routes the message to its next retry
        tier or the DLQ. On the way out: finish the message in hand, wait for pending forwards,
        commit, close.
        """
        restore = self._install_signal_handlers()
        self._running = True
        try:
            while not self._stop.is_set():
                if self._outage is None:
                    self._run_batch(handler, poll_timeout)
                    continue
                msg = self.poll(poll_timeout)  # an outage: one record at a time, probes
                if msg is not None and self._usable(msg):
                    self._handle(handler, msg)
        finally:
            restore()
            self.close()

    def _run_batch(self, handler: Handler, timeout: float) -> None:
        """Fetch a batch and hand its records to ``handler`` one by one, admitting each only
        when its turn comes (so a pause, an outage or a due time met mid-batch applies to the
        records behind it, exactly as with one poll() per record)."""
        if self._in_hand:
            self._finish_in_hand()
        now = time.monotonic()
        wait = self._maintain(now + timeout, now)
        if self._outage is not None or self._probe_ready is not None:
            return
        self._batch_break = False
        self._seeked.clear()
        # what is already fetched, without waiting for a full batch (latency); else wait for one
        started = time.monotonic()
        generation = self._txn_generation
        batch = super().consume(self._batch_size, 0) or super().consume(1, wait)
        if self._txn_generation != generation:
            batch = [m for m in batch if not self._replayed_since(generation, m)]
        if not batch:
            return
        fetched = time.monotonic()
        metrics = self._metrics
        polled = metrics is None  # the poll duration is recorded once a record is handed out
        admit = self._admit_checked
        in_hand = self._in_hand
        stop = self._stop
        handled = 0
        for i, msg in enumerate(batch):
            if (
                self._batch_break
                or self._outage is not None
                or stop.is_set()
                or time.monotonic() - fetched > _BATCH_DEADLINE
            ):
                self._rewind_unhandled(batch, i)
                break
            if msg.error() is not None and not self._usable(msg):
                continue
            admitted = admit(msg)  # no outage here (the loop stops when one starts)
            if admitted is None:
                continue
            in_hand.append(admitted)
            self._opens_at_handout = self._watch.opens
            if metrics is not None:
                if not polled:
                    polled = True
                    metrics.poll(admitted.topic(), fetched - started)
                metrics.consumed(admitted.topic())
            self._handle(handler, admitted)
            handled += 1
        if handled:  # size the next batch to take about _BATCH_SECONDS
            per_record = max((time.monotonic() - fetched) / handled, 1e-7)
            self._batch_size = max(1, min(_BATCH_MAX, int(_BATCH_SECONDS / per_record)))

    @staticmethod
    def _usable(msg: Message) -> bool:
        """False for consumer events (logged); a fatal error is raised."""
        error = msg.error()
        if error is None:
            return True
        if error.fatal():
            raise KafkaException(error)
        log.debug("consumer event: %s", error)
        return False

    def _rewind_unhandled(self, batch: list[Message], start: int) -> None:
        """Records from ``start`` on were fetched but never handed out: make their partitions
        deliver them again, unless a lower position is already set (a record waiting for its
        due time, an outage's held record, the application's own seek)."""
        first: dict[_Key, int] = {}
        for msg in batch[start:]:
            if msg.error() is None:
                first.setdefault((msg.topic(), msg.partition()), msg.offset())
        outage = self._outage
        if not first:
            return
        assigned = {(tp.topic, tp.partition) for tp in self.assignment()}
        for key, offset in first.items():
            if key in self._waiting or key in self._seeked or key not in assigned:
                continue
            if outage is not None and key in outage.partitions:
                self._rewind(outage, key, offset)  # keeps the lowest refused offset
                continue
            try:
                super().seek(TopicPartition(key[0], key[1], offset))
            except KafkaException as exc:
                log.warning(
                    "cannot rewind %s [%d] to %d (records from there are redelivered only "
                    "after a restart or rebalance): %s",
                    *key,
                    offset,
                    exc,
                )

    def _handle(self, handler: Handler, msg: Message) -> None:
        """One handler call: success finishes the record, an exception fails it."""
        claim = None
        if self._dedup is not None:
            claim = self._claim(msg)
            if claim is _SKIP:
                return
            if claim is _LATER:
                self._seek_back(msg)
                return
        if self._tracing is not None:
            self._run_traced(handler, msg, claim)
            return
        started = time.monotonic()
        try:
            self._call(handler, msg)
        except Exception as exc:
            if self._metrics is not None:
                self._metrics.process(
                    msg.topic(), time.monotonic() - started, headers.exception_type(exc)
                )
            self._unclaim(claim)
            self.fail(msg, exc)
        else:
            if self._metrics is not None:
                self._metrics.process(msg.topic(), time.monotonic() - started, "")
            self._claimed_done(claim, msg)
            self._finish_in_hand()  # the handler returned: done

    # -- dedup -------------------------------------------------------------------------------

    def _claim(self, msg: Message, key: str | None = None) -> str | None:
        """Claim ``msg`` in the dedup store: its key (run the handler), None (run it without a
        claim: the store failed and on_dedup_error="process"), or _SKIP (a duplicate, or held
        back because the store failed)."""
        assert self._dedup is not None
        if key is None:
            key = self._identity(msg)
            if key is None:
                return _SKIP
        waited_until = time.monotonic() + self._dedup_lease + 1
        while True:
            try:
                verdict = self._dedup.claim(key, self._owner, self._dedup_lease)
            except DedupStoreError as exc:
                if self._metrics is not None:
                    self._metrics.dedup(msg.topic(), "error")
                if self._dedup_fail_open:
                    log.error("dedup store failed; processing %s without a claim: %s", key, exc)
                    return None
                log.error("dedup store failed; holding %s and pausing: %s", key, exc)
                self._take_out_of_hand(msg)
                self._hold(msg, DEDUP_STORE)
                return _SKIP
            if verdict == NEW:
                if self._metrics is not None:
                    self._metrics.dedup(msg.topic(), "miss")
                assert self._leases is not None
                self._leases.hold(key)
                return key
            if verdict == DONE:
                if self._metrics is not None:
                    self._metrics.dedup(msg.topic(), "hit")
                    self._metrics.outcome(msg.topic(), "duplicate_skipped", "")
                log.info("skipping %s: already processed", key)
                self._take_out_of_hand(msg)
                self._barrier.complete(msg.topic(), msg.partition(), msg.offset())
                if self._outage is not None and self._outage.is_probe(msg):
                    self._end_outage(seek_past=msg)  # the store answered
                return _SKIP
            assert verdict == BUSY  # another consumer holds a live claim: wait it out
            if self._stop.is_set() or time.monotonic() > waited_until:
                self._take_out_of_hand(msg)  # not done: redelivered, never committed
                if self._outage is not None and self._outage.is_probe(msg):
                    self._end_outage(seek_past=None)  # the store answered
                return _LATER  # the caller seeks back to it
            self._stop.wait(0.05)

    def _identity(self, msg: Message) -> str | None:
        """``msg``'s dedup key in this group; None if ``dedup_key`` raised (then the record is
        dead-lettered: without an identity it cannot be processed once)."""
        try:
            return f"{self._group}|{self._dedup_key(msg)}"
        except Exception as exc:
            error = DedupKeyError(
                f"dedup_key failed for {msg.topic()} [{msg.partition()}] @{msg.offset()}: "
                f"{type(exc).__name__}: {exc}"
            )
            error.__cause__ = exc
            log.warning("%s; sending it to the DLQ", error)
            self._take_out_of_hand(msg)
            held = self._route(msg, error, reason=headers.NON_RETRYABLE)
            if not held and self._outage is not None and self._outage.is_probe(msg):
                self._end_outage(seek_past=msg)
            return None

    def _seek_back(self, msg: Message) -> None:
        """Deliver ``msg`` again (it was fetched, never handed out); the rest of a run() batch
        is not rewound over this position."""
        key = (msg.topic(), msg.partition())
        try:
            super().seek(TopicPartition(key[0], key[1], msg.offset()))
        except KafkaException as exc:
            log.warning(
                "cannot rewind %s [%d] to %d (records from there are redelivered only after a "
                "restart or rebalance): %s",
                *key,
                msg.offset(),
                exc,
            )
        self._seeked.add(key)
        self._batch_break = True

    def _claimed_for_loop(self, msg: Message) -> bool:
        """The drop-in loop's dedup: claim ``msg`` (in hand) before handing it out; False if
        it is not handed out (a duplicate, skipped; or held back). Claims complete when the
        application asks for more, and are released by :meth:`fail`."""
        if self._dedup is None or self._running:  # run() claims around its handler
            return True
        key = self._identity(msg)
        if key is None:
            return False
        if key in self._loop_keys:
            raise _NotNow  # its twin is in hand, not done yet: it comes again after
        claim = self._claim(msg, key)
        if claim is _SKIP:
            return False
        if claim is _LATER:
            raise _NotNow
        if claim is not None:
            self._loop_claims[id(msg)] = (msg, claim)
            self._loop_keys.add(claim)
        return True

    def _claimed_or_rewound(self, msg: Message) -> bool:
        """poll(): :meth:`_claimed_for_loop` for one record in hand; a record that is not handed
        out now, or whose claim raised, leaves the hand and is delivered again."""
        try:
            return self._claimed_for_loop(msg)
        except _NotNow:
            self._take_out_of_hand(msg)
            self._seek_back(msg)
            return False
        except BaseException:
            self._take_out_of_hand(msg)
            self._seek_back(msg)
            raise

    def _pop_loop_claim(self, msg: Message) -> str | None:
        """The drop-in loop's claim on ``msg`` (forgotten here), or None."""
        entry = self._loop_claims.pop(id(msg), None)
        if entry is None:
            return None
        self._loop_keys.discard(entry[1])
        return entry[1]

    def _take_out_of_hand(self, msg: Message) -> None:
        in_hand = self._in_hand
        for i in range(len(in_hand) - 1, -1, -1):  # from the end: usually the newest
            if in_hand[i] is msg:
                del in_hand[i]
                self._raw.pop(id(msg), None)
                return

    def _claimed_done(self, claim: str | None, msg: Message) -> None:
        if claim is None:
            return
        assert self._dedup is not None and self._leases is not None
        kept = self._leases.drop(claim)
        try:
            ours = self._dedup.complete(claim, self._owner)
        except DedupStoreError as exc:  # the side effect happened: nothing to undo
            if self._metrics is not None:
                self._metrics.dedup(msg.topic(), "error")
            log.error("dedup store failed to record %s as processed: %s", claim, exc)
            return
        if not kept or ours is False:
            if self._metrics is not None:
                self._metrics.dedup(msg.topic(), "lease_lost")
            log.warning(
                "the dedup claim on %s ran out before its handler finished (dedup_lease=%.0fs, "
                "renewed every third of it): another consumer may have run it too",
                claim,
                self._dedup_lease,
            )

    def _unclaim(self, claim: str | None) -> None:
        if claim is None:
            return
        assert self._dedup is not None and self._leases is not None
        self._leases.drop(claim)
        try:
            self._dedup.release(claim, self._owner)
        except DedupStoreError as exc:  # the lease runs out on its own
            log.warning("dedup store failed to release %s: %s", claim, exc)

    def _call(self, handler: Handler, msg: Message) -> None:
        if self._blocking is None:
            handler(msg)
        else:
            self._blocking(handler, msg)  # tenacity: retries in place first

    def _run_traced(self, handler: Handler, msg: Message, claim: str | None = None) -> None:
        """One handler call inside ``process {topic}``; forwards become its children."""
        assert self._tracing is not None
        span = self._tracing.start_process(
            msg, self._group, parent_on_creation=self._parent_on_creation
        )
        token = otel_context.attach(otel_trace.set_span_in_context(span))
        started = time.monotonic()
        try:
            try:
                self._call(handler, msg)
            except Exception as exc:
                error_type = headers.exception_type(exc)
                span.set_attribute("error.type", error_type)
                span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
                span.record_exception(exc)
                if isinstance(exc, CircuitBreakerError):
                    span.add_event("resilient_kafka.circuit_breaker.rejected")
                if self._metrics is not None:
                    self._metrics.process(msg.topic(), time.monotonic() - started, error_type)
                self._unclaim(claim)
                self.fail(msg, exc)
            else:
                span.set_attribute("resilient_kafka.outcome", "success")
                if self._metrics is not None:
                    self._metrics.process(msg.topic(), time.monotonic() - started, "")
                self._claimed_done(claim, msg)
                self._finish_in_hand()
        finally:
            otel_context.detach(token)
            span.end()

    def stop(self) -> None:
        """Ask :meth:`run` to finish the message in hand and shut down (any thread)."""
        self._stop.set()

    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def on_signal(signum: int, frame: object) -> None:
            log.info("signal %d: stopping after the message in hand", signum)
            self.stop()

        for sig in previous:
            signal.signal(sig, on_signal)

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    def close(self) -> None:
        """Finish the message in hand, wait (bounded) for forwards, commit what is safe, close."""
        if self._closed:
            return
        self._closed = True
        # records still in hand were not reported processed (no next poll, no commit): they
        # are redelivered, never committed unseen (a handler may have crashed on them)
        safe = []
        if self._txn is not None:
            self._close_transaction()
        else:
            self._drop_in_hand()
            self._drain(self._forward_timeout)
            self._sync_offset_store()
            safe = [TopicPartition(t, p, o) for t, p, o in self._barrier.committable()]
        if safe:
            try:
                super().commit(offsets=safe, asynchronous=False)
            except KafkaException as exc:
                log.warning("final commit failed (records will be redelivered): %s", exc)
        super().close()  # may run the revoke callback, which still needs the producer
        self._producer.close()  # flushes what is left, then releases the connection
        if self._leases is not None:
            self._leases.close()
        if self._metrics is not None:
            self._metrics.retire()
        server = getattr(self, "_metrics_server", None)
        if server is not None:
            server.shutdown()

    def _close_transaction(self) -> None:
        """Commit what is done; output written for records still in hand is aborted with it
        (those records were not reported processed and are redelivered)."""
        txn = self._txn
        assert txn is not None
        wrote = bool(self._in_hand) and self._producer.produced != self._produced_mark
        self._drop_in_hand()
        if not txn.open:
            return  # fenced: nothing can commit
        try:
            if wrote:
                txn.abort()
                if self._metrics is not None:
                    self._metrics.transaction("aborted")
            else:
                self._commit_transaction()
        except ResilientKafkaError as exc:
            log.error("final transaction not committed (records will be redelivered): %s", exc)

    def __repr__(self) -> str:  # never the config: it may hold secrets
        return f"<ResilientConsumer group={self._group!r} {self._where}>"
