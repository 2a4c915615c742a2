"""``ResilientConsumer``: a drop-in confluent-kafka Consumer with retry topics, a DLQ and a
commit barrier.

Failed messages are copied to delay topics (``T.G.retry.n``) and finally to a dead-letter topic
(``T.G.dlq``); the consumer consumes its own retry tiers and never hands a retry record out before
its due time. No offset is stored or committed past a record that is not done: handled, or its
retry/DLQ copy acknowledged by the broker.

This module is the facade: the confluent methods, ``run()`` and the wiring. The life of a record
and what each module owns: docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_INVALID,
    Consumer,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.serialization import SerializationContext

from resilient_kafka import _config, _offset_metadata, _transaction
from resilient_kafka._admission import Admission
from resilient_kafka._batch import (
    AsyncBatchRunner,
    BatchCalls,
    BatchExecutor,
    InlineBatchRunner,
    ThreadBatchRunner,
    check_batch_options,
)
from resilient_kafka._claims import Claims
from resilient_kafka._committer import OffsetCommitter
from resilient_kafka._executor import InlineExecutor
from resilient_kafka._forwarding import Forwarder
from resilient_kafka._loop import Loop
from resilient_kafka._outage import Outage, OutageControl
from resilient_kafka._partitions import APPLICATION, WITH_APPLICATION, Key, PartitionControl
from resilient_kafka._routing import Router
from resilient_kafka._settings import Settings
from resilient_kafka._settle import Settlement
from resilient_kafka._topics import Topics
from resilient_kafka._work import AsyncRunner, Attempts, ThreadRunner, WorkManager, check_options
from resilient_kafka.dedup import DedupStore
from resilient_kafka.errors import (
    ConfigurationError,
    DedupKeyError,
    DeserializationError,
    ResilientKafkaError,
)
from resilient_kafka.health import (
    CLOSED,
    FAILED,
    RUNNING,
    STARTING,
    STOPPING,
    Health,
    HealthReport,
    Signals,
)
from resilient_kafka.metrics import ConsumerMetrics, NoMetrics, families
from resilient_kafka.policies import DeadLetterPolicy, RetryPolicy
from resilient_kafka.producer import ResilientProducer, client_config

__all__ = [
    "BatchHandler",
    "DedupKeyError",
    "DeserializationError",
    "Deserializer",
    "Handler",
    "ResilientConsumer",
]

log = logging.getLogger("resilient_kafka.consumer")

Handler = Callable[[Message], object]
BatchHandler = Callable[[list[Message]], object]
Deserializer = Callable[[bytes | None, SerializationContext], Any]


class ResilientConsumer(Consumer):
    """``confluent_kafka.Consumer`` that routes failures to retry topics and a DLQ.

    Use it as a drop-in (``poll()``/``consume()``, calling :meth:`fail` on a message that could
    not be processed) or hand :meth:`run` a handler. A message counts as processed once the
    application asks for the next one (or commits) without having called :meth:`fail` on it.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        /,
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
        metrics_addr: str = "127.0.0.1",
        stall_timeout: float = 60.0,
        tracer_provider: Any = None,
        trace_parent: str = "creation_context",
        dedup: DedupStore | None = None,
        dedup_key: Callable[[Message], str] | None = None,
        dedup_lease: float = 60.0,
        on_dedup_error: str = "pause",
        exactly_once: bool = False,
        transaction_interval: float = 0.1,
        **kwargs: Any,
    ) -> None:
        # every setting is checked before the native consumer exists: a refusal leaks nothing
        settings = Settings(
            client_config(config, kwargs),
            retry=retry,
            dead_letter=dead_letter,
            producer_config=producer_config,
            topic_replication_factor=topic_replication_factor,
            forward_timeout=forward_timeout,
            breakers=breakers,
            breaker_scope=breaker_scope,
            trace_parent=trace_parent,
            dedup=dedup,
            dedup_key=dedup_key,
            dedup_lease=dedup_lease,
            on_dedup_error=on_dedup_error,
            exactly_once=exactly_once,
            transaction_interval=transaction_interval,
        )
        self._settings = settings
        self._group = settings.group
        self._where = settings.where
        self._failure: BaseException | None = None  # what ended run(): the consumer is not live
        interval = _config.number(settings.consumer_config.get("max.poll.interval.ms", 300000))
        self._health = Health(
            Signals(
                state=self._health_state,
                failure=lambda: None if self._failure is None else _described(self._failure),
                polled_at=lambda: self._loop.polled_at,
                joined=lambda: self._control.assignments > 0,
                assigned=lambda: len(self._control.assigned),
                outstanding=lambda: self._committer.barrier.outstanding(),
                progress=lambda: self._committer.barrier.progress(),
            ),
            max_poll_interval=(interval if interval == interval else 300000) / 1000,
            stall_timeout=stall_timeout,
        )
        self._closed = False  # close() has begun
        self._handle_closed = False  # the native consumer is closed
        self.metrics_url: str | None = None
        conf = dict(settings.consumer_config)
        self._metrics: Any = NoMetrics()
        if metrics:
            self._metrics = ConsumerMetrics(families(registry), settings.group)
            # the application's stats_cb gets statistics only if it asked for them, as with
            # confluent's class (the interval set below is the metrics')
            wanted = _config.number(conf.get("statistics.interval.ms", 0)) > 0
            conf["stats_cb"] = _chained_stats(
                self._metrics, conf.get("stats_cb") if wanted else None
            )
            # lag comes from statistics. With a token callback, none may come during the 10 s
            # confluent's constructor waits for a token: a stats callback run after a failed
            # oauth_cb turns its KafkaException into a SystemError (a confluent-kafka bug)
            conf.setdefault("statistics.interval.ms", 15000 if "oauth_cb" in conf else 5000)
        from resilient_kafka.tracing import tracer_for

        tracing = tracer_for(tracer_provider)
        self._tracing = tracing
        super().__init__(conf)
        with contextlib.ExitStack() as undo:  # a failure from here on closes what was opened
            undo.callback(Consumer.close, self)
            self._producer = ResilientProducer(
                settings.producer_config,
                metrics=metrics,
                registry=registry,
                tracer_provider=tracer_provider,
            )
            undo.callback(self._producer.close)
            self._txn: _transaction.Transactions | None = None
            if exactly_once:
                self._txn = _transaction.Transactions(
                    self._producer,
                    settings.producer_config["transactional.id"],
                    settings.forward_timeout,
                    settings.transaction_timeout,
                )
                self._txn.begin()
            self._wire(settings, key_deserializer, value_deserializer)
            if metrics:
                self._metrics.fam.health.watch(self, settings.group, self._health.report)
            if metrics_port is not None:
                from resilient_kafka.metrics import serve_metrics

                self._metrics_server, self.metrics_url = serve_metrics(
                    metrics_port, metrics_addr, registry=registry, health=self._health.report
                )
                undo.callback(self._metrics_server.shutdown)
            undo.pop_all()

    def _wire(
        self,
        settings: Settings,
        key_deserializer: Deserializer | None,
        value_deserializer: Deserializer | None,
    ) -> None:
        """Build the parts (each owns its state; see docs/architecture.md)."""
        metrics = self._metrics
        self._stop = threading.Event()
        self._user_callbacks: dict[str, Callable[..., Any] | None] = {}
        self._rebalance_fresh: set[Key] | None = None  # fresh retry tiers, during on_assign
        self._skip_completed = False  # run(): skip records the commit metadata says are done
        self._warned_metadata = False
        self._assigned_by_app = False
        self._rebalance_tiers: list[TopicPartition] = []  # see _own()
        self._control = control = PartitionControl(self)
        self._topics = topics = Topics(settings, self, metrics)
        self._outage = outage = OutageControl(
            settings, control, topics, lambda: Consumer.assignment(self)
        )
        if metrics.fam is not None:
            for breaker in settings.breakers:
                outage.watch.track(breaker, metrics.fam)
        committer: Any
        forwarder = Forwarder(
            self._producer,
            topics,
            # an acknowledged copy completes its record in the tracking it was made in: a copy
            # acked after its partition was revoked and assigned again changes nothing there
            lambda forward: committer.barrier.done(forward.progress, forward.source[2]),
            max_bytes=settings.max_bytes,
            transactional=self._txn is not None,
            metrics=metrics,
        )
        self._forwarder = forwarder
        if self._txn is not None:
            committer = _transaction.TransactionalCommitter(
                self, self._txn, self._producer, forwarder, control, outage, settings, metrics
            )
        else:
            committer = OffsetCommitter(
                self, settings.auto_commit, metrics, settings.commit_interval
            )
        self._committer = committer
        self._claims = (
            Claims(settings, settings.dedup, metrics, self._stop)
            if settings.dedup is not None
            else None
        )
        from resilient_kafka.tracing import NoTracing

        router = Router(settings, topics, outage.flood, metrics, self._tracing or NoTracing())
        self._settle = settle = Settlement(
            committer, self._claims, outage, router, forwarder, control, metrics
        )
        self._admission = admission = Admission(
            topics,
            control,
            outage,
            committer,
            settle,
            metrics,
            settings.retry.delays,
            settings.retry.jitter,
            key_deserializer,
            value_deserializer,
        )
        self._loop = Loop(
            self,
            topics=topics,
            control=control,
            admission=admission,
            settle=settle,
            claims=self._claims,
            committer=committer,
            forwarder=forwarder,
            outage=outage,
            producer=self._producer,
            metrics=metrics,
            stop=self._stop,
        )
        if self._txn is not None:
            committer.on_replay = self._loop.replayed
        # poll() and consume() go straight to the loop: one call less per record (unless a
        # subclass overrides them)
        if type(self).poll is ResilientConsumer.poll:
            self.poll = self._loop.poll  # type: ignore[method-assign]
        if type(self).consume is ResilientConsumer.consume:
            self.consume = self._loop.consume  # type: ignore[method-assign]

    # -- subscription ------------------------------------------------------------------------

    def subscribe(
        self,
        topics: list[str],
        on_assign: Callable[..., Any] | None = None,
        on_revoke: Callable[..., Any] | None = None,
        on_lost: Callable[..., Any] | None = None,
    ) -> None:
        """``Consumer.subscribe``; the topics' retry tiers are subscribed alongside.

        Returns at once, as confluent's does, even while the cluster is unreachable: the
        retry/DLQ topics are created in the background and tried again with back-off (a topic
        that does not exist gets librdkafka's usual UNKNOWN_TOPIC_OR_PART event, and an error
        in the log). The callbacks see the application's partitions only, never a tier's.
        Pattern subscriptions (``^...``) raise :class:`ConfigurationError`: tiers are named per
        source topic.
        """
        if self._handle_closed or not isinstance(topics, list):
            # confluent's own errors: RuntimeError when closed, TypeError for a non-list
            super().subscribe(topics, on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost)
        for name, callback in (
            ("on_assign", on_assign),
            ("on_revoke", on_revoke),
            ("on_lost", on_lost),
        ):
            if callback is not None and not callable(callback):
                raise TypeError(f"{name} expects a callable")
        patterns = [t for t in topics if isinstance(t, str) and t.startswith("^")]
        if patterns:
            raise ConfigurationError(
                f"pattern subscriptions ({patterns}) are not supported: retry and DLQ topics "
                "are created per source topic at subscribe time; list the topics"
            )
        tier_topics = self._topics.declare(topics)
        self._topics.subscribed = True
        self._user_callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}
        super().subscribe(
            topics + tier_topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    def unsubscribe(self) -> None:
        """``Consumer.unsubscribe``: the retry tiers are unsubscribed with the topics."""
        super().unsubscribe()
        self._topics.subscribed = False

    def retry_topics(self, topic: str) -> list[str]:
        """The retry tier topics of ``topic`` for this consumer's group, tier 1 first."""
        return self._topics.retry_topics(topic)

    def dead_letter_topic(self, topic: str) -> str:
        """The DLQ of ``topic`` for this consumer's group."""
        return self._topics.dead_letter_topic(topic)

    @property
    def producer(self) -> ResilientProducer:
        """The consumer's producer, for the handler's output records. In exactly-once mode
        they commit in the same transaction as the consumed offsets (don't call flush() or the
        transaction methods on it: the consumer drives them)."""
        return self._producer

    @property
    def outage(self) -> Outage | None:
        """The current outage (partitions paused because the downstream is down), or None."""
        return self._outage.current

    # -- rebalance ---------------------------------------------------------------------------
    # The application's callbacks get its own partitions; the tiers' are set aside in
    # _rebalance_tiers, so that its assign()/incremental_assign()/incremental_unassign() from
    # inside a callback takes them along.

    def _own(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """The application's partitions among ``partitions`` (retry tiers are the library's);
        the tiers' are kept for a call from inside the rebalance callback."""
        tiers = self._topics.tiers
        self._rebalance_tiers = [tp for tp in partitions if tp.topic in tiers]
        return [tp for tp in partitions if tp.topic not in tiers]

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = {(tp.topic, tp.partition) for tp in partitions}
        self._control.assigned_now(keys, replace=not self._settings.cooperative)
        self._outage.assigned(keys)
        self._metrics.rebalance("assign", len(self._control.assigned))
        # A retry tier partition this group never committed on is read from its start,
        # whatever auto.offset.reset says for the source topics (latest would skip retry copies
        # written before this member got the partition). The application's own on_assign may
        # assign: its assign() call gets the same start (see assign()); else it is done here.
        fresh = self._read_commits(partitions)
        for tp in partitions:
            if (tp.topic, tp.partition) in fresh:
                tp.offset = OFFSET_BEGINNING
        self._rebalance_fresh, self._assigned_by_app = fresh, False
        try:
            callback = self._user_callbacks.get("assign")
            if callback is not None:
                callback(self, self._own(partitions))
        finally:  # even if the callback raised: confluent would assign without our offsets
            self._rebalance_fresh = None
            self._rebalance_tiers = []
            if fresh and not self._assigned_by_app:
                if self._settings.cooperative:
                    Consumer.incremental_assign(self, partitions)
                else:
                    Consumer.assign(self, partitions)
            self._tiers_follow_pause()

    def _read_commits(self, partitions: list[TopicPartition]) -> set[Key]:
        """The group's commits on newly assigned partitions: returns the retry tier partitions
        with no committed offset; under ``run()``, hands admission the records that an earlier
        owner completed above its committed offset (the commit metadata names them)."""
        tiers = self._topics.tiers
        wanted = [
            TopicPartition(tp.topic, tp.partition)
            for tp in partitions
            if self._skip_completed or tp.topic in tiers
        ]
        if not wanted:
            return set()
        try:
            committed = Consumer.committed(self, wanted, timeout=10)
        except KafkaException as exc:
            log.warning("cannot read the committed offsets of %d partitions: %s", len(wanted), exc)
            return set()
        if self._skip_completed:
            for tp in committed:
                if tp.offset >= 0 and tp.metadata:
                    self._skip_done((tp.topic, tp.partition), tp.offset, tp.metadata)
        return {(tp.topic, tp.partition) for tp in committed if tp.offset < 0 and tp.topic in tiers}

    def _skip_done(self, key: Key, offset: int, metadata: str) -> None:
        try:
            done = _offset_metadata.decode(metadata, offset)
        except _offset_metadata.NotOurs as exc:
            if not self._warned_metadata:
                self._warned_metadata = True
                log.warning(
                    "the commit of %s [%d] has metadata resilient-kafka did not write (%s): "
                    "ignored, its records are handled from the committed offset on (logged "
                    "once)",
                    *key,
                    exc,
                )
            return
        self._admission.skip_completed(key, done)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = {(tp.topic, tp.partition) for tp in partitions}
        self._loop.drop_in_hand()  # only when closing: a poll() finished them before this
        self._loop.give_up(keys, lost=False)  # run()'s concurrent handlers: awaited, bounded
        self._forwarder.drain(self._settings.forward_timeout)  # into this commit/transaction
        self._committer.revoke(keys)  # while this member still owns the partitions
        self._forget(keys)
        self._metrics.rebalance("revoke", len(self._control.assigned))
        self._call_back("revoke", partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = {(tp.topic, tp.partition) for tp in partitions}
        self._loop.give_up(keys, lost=True)
        self._forget(keys)
        self._committer.lost(keys)
        self._metrics.rebalance("lost", len(self._control.assigned))
        self._call_back("lost" if self._user_callbacks.get("lost") else "revoke", partitions)

    def _call_back(self, which: str, partitions: list[TopicPartition]) -> None:
        callback = self._user_callbacks.get(which)
        if callback is None:
            return
        try:
            callback(self, self._own(partitions))
        finally:
            self._rebalance_tiers = []

    def _forget(self, keys: set[Key]) -> None:
        """Partitions given up: their records, claims on the way and outage state are gone."""
        self._committer.forget(keys)
        self._admission.forget(keys)
        self._control.revoked(keys)
        self._outage.forget(keys)
        self._tiers_follow_pause()

    # -- consuming ---------------------------------------------------------------------------

    def poll(self, timeout: float | None = None) -> Message | None:
        """``Consumer.poll``: the next message (retry records only once due), or None.

        The message handed out before counts as processed now, unless :meth:`fail` was called
        on it. Events (errors, end of partition) of retry tiers are the library's and are not
        returned."""
        if self._handle_closed:
            return super().poll() if timeout is None else super().poll(timeout)
        return self._loop.poll(timeout)

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        """``Consumer.consume``: up to ``num_messages`` messages (retry records only once due);
        those handed out before count as processed now, unless :meth:`fail` was called."""
        if self._handle_closed:
            return super().consume(num_messages, timeout)  # confluent's RuntimeError
        return self._loop.consume(num_messages, timeout)

    def fail(self, msg: Message, exc: BaseException) -> None:
        """Route ``msg`` to its next retry tier or the DLQ; its offset waits for the ack."""
        self._loop.fail(msg, exc)

    def commit(
        self,
        message: Message | None = None,
        offsets: list[TopicPartition] | None = None,
        asynchronous: bool = True,
    ) -> list[TopicPartition] | None:
        """``Consumer.commit``, but never past a record that is not done, whatever is passed.

        Messages in hand that were not failed count as processed (commit follows processing).
        A partition's offset is lowered to its first record not done (a failed record whose
        retry/DLQ copy is not acknowledged yet), or to the end of what was handed out;
        partitions no record was handed out of commit as given; metadata is kept. In
        exactly-once mode this commits the open transaction, with the offsets of every record
        done (``message``/``offsets`` cannot pick others; ``asynchronous`` is ignored).
        """
        if message is not None and offsets is not None:
            raise ValueError("message and offsets are mutually exclusive")
        if (
            self._handle_closed
            or (message is not None and not isinstance(message, Message))
            or (offsets is not None and not _partition_list(offsets))
        ):  # confluent's own errors: RuntimeError when closed, TypeError for bad arguments
            return super().commit(  # type: ignore[no-any-return]
                message=message, offsets=offsets, asynchronous=asynchronous
            )
        if self._txn is not None and (message is not None or offsets is not None):
            raise ResilientKafkaError(
                "in exactly-once mode offsets commit with the transaction, past every "
                "record done; call commit() without message= or offsets="
            )
        self._loop.finish_in_hand()
        self._producer.poll(0)
        result: list[TopicPartition] | None = self._committer.commit(message, offsets, asynchronous)
        return result

    # -- assignment and partition control ----------------------------------------------------

    def assignment(self) -> list[TopicPartition]:
        """``Consumer.assignment``: the application's partitions (retry tiers left out)."""
        tiers = self._topics.tiers
        return [tp for tp in super().assignment() if tp.topic not in tiers]

    def assign(self, partitions: list[TopicPartition]) -> None:
        """``Consumer.assign``; returns at once. The retry/DLQ topics of the source topics are
        created in the background; retry tiers assigned alongside are recognised as tiers (due
        times honoured). From inside ``on_assign``, the tiers of that rebalance come along."""
        if self._handle_closed or not _partition_list(partitions):
            return super().assign(partitions)  # confluent's own RuntimeError or TypeError
        fresh = self._rebalance_fresh
        if fresh is not None:  # the application assigns from its on_assign callback
            self._assigned_by_app = True
            partitions = _with_tiers(partitions, self._rebalance_tiers)
            _start_fresh_tiers(partitions, fresh)
        else:
            topics = {tp.topic for tp in partitions}
            derived = self._topics.derived(topics) | set(self._topics.tiers)
            sources = sorted(t for t in topics - derived if not self._topics.prepared(t))
            if sources:
                try:
                    self._topics.declare(sources)
                except ResilientKafkaError as exc:  # a name that cannot have tiers
                    log.error("no retry/DLQ topics for %s: %s", sources, exc)
        self._control.assigned_now([(tp.topic, tp.partition) for tp in partitions], replace=True)
        super().assign(partitions)
        self._tiers_follow_pause()

    def unassign(self) -> None:
        """``Consumer.unassign``: what is done commits first (exactly-once: with the
        transaction)."""
        if self._handle_closed:
            return super().unassign()
        if self._txn is not None:
            self._committer.commit_transaction()  # the offsets given up, with it
        self._forget(set(self._control.assigned))
        super().unassign()

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        """``Consumer.incremental_assign``; from inside ``on_assign``, the tiers of that
        rebalance come along."""
        if self._handle_closed or not _partition_list(partitions):
            return super().incremental_assign(partitions)
        fresh = self._rebalance_fresh
        if fresh is not None:
            self._assigned_by_app = True
            partitions = _with_tiers(partitions, self._rebalance_tiers)
            _start_fresh_tiers(partitions, fresh)
        self._control.assigned_now([(tp.topic, tp.partition) for tp in partitions], replace=False)
        super().incremental_assign(partitions)
        self._tiers_follow_pause()

    def incremental_unassign(self, partitions: list[TopicPartition]) -> None:
        """``Consumer.incremental_unassign``; from inside ``on_revoke``/``on_lost``, the tiers
        of that rebalance go along."""
        if self._handle_closed or not _partition_list(partitions):
            return super().incremental_unassign(partitions)
        partitions = _with_tiers(partitions, self._rebalance_tiers)
        if self._txn is not None:
            self._committer.commit_transaction()
        self._forget({(tp.topic, tp.partition) for tp in partitions})
        super().incremental_unassign(partitions)

    def pause(self, partitions: list[TopicPartition]) -> None:
        """``Consumer.pause``: the partitions stay paused until :meth:`resume`, whatever else
        pauses and resumes them meanwhile (retry due times, outages).

        Retry tiers hold the copies of every partition of their topic, so they pause only with
        the whole assignment (``pause(assignment())`` stops everything, as with confluent's
        class); with some partitions paused, retry records still come when due."""
        if self._handle_closed or not _partition_list(partitions):
            return super().pause(partitions)
        self._control.pause([(tp.topic, tp.partition) for tp in partitions], APPLICATION)
        self._tiers_follow_pause()

    def resume(self, partitions: list[TopicPartition]) -> None:
        """``Consumer.resume``: a partition that is also paused for another reason (a retry
        record not due, an outage) resumes once that reason is gone too."""
        if self._handle_closed or not _partition_list(partitions):
            return super().resume(partitions)
        self._control.release([(tp.topic, tp.partition) for tp in partitions], APPLICATION)
        self._tiers_follow_pause()

    def _tiers_follow_pause(self) -> None:
        """Retry tier partitions are paused while the application has paused all of its own."""
        tiers = self._topics.tiers
        control = self._control
        own = [key for key in control.assigned if key[0] not in tiers]
        held = [key for key in control.assigned if key[0] in tiers]
        if own and all(control.paused_for(key, APPLICATION) for key in own):
            control.pause(
                [k for k in held if not control.paused_for(k, WITH_APPLICATION)], WITH_APPLICATION
            )
        else:
            control.release(held, WITH_APPLICATION)

    def seek(self, partition: TopicPartition) -> None:
        """``Consumer.seek``; in ``run()``, the rest of a fetched batch of that partition is
        not handed out."""
        if self._handle_closed or not isinstance(partition, TopicPartition):
            return super().seek(partition)
        self._control.seek((partition.topic, partition.partition), partition.offset, partition)

    # -- handler mode ------------------------------------------------------------------------

    def run(
        self,
        handler: Handler,
        *,
        concurrency: int = 1,
        ordering: str = "key",
        max_buffered: int | None = None,
        max_buffered_per_partition: int | None = None,
        drain_timeout: float = 30.0,
        poll_timeout: float = 0.5,
    ) -> None:
        """Process messages with ``handler`` until :meth:`stop`, SIGINT or SIGTERM.

        ``handler(msg)`` returning means success; raising routes the message to its next retry
        tier or the DLQ. An ``async def`` handler runs on an event loop of its own.

        ``concurrency`` > 1 runs that many handlers at once (threads; tasks for an ``async
        def`` handler) while this thread keeps polling. ``ordering``: ``"key"`` (records of a
        key in a partition one at a time, in offset order), ``"partition"`` or
        ``"unordered"``. ``max_buffered`` (default 50 x concurrency, 1,000 to 20,000) bounds
        the records held, running or waiting; ``max_buffered_per_partition`` (default a
        quarter of it) bounds a partition's records queued behind a busy key, and pauses only
        that partition. ``drain_timeout``: how long a revocation
        or the shutdown waits for running handlers. See docs/concurrency.md.

        On the way out: finish (or await) what is running, wait for pending forwards, commit,
        close.
        """
        self._run(
            handler,
            concurrency=concurrency,
            ordering=ordering,
            max_buffered=max_buffered,
            max_buffered_per_partition=max_buffered_per_partition,
            drain_timeout=drain_timeout,
            poll_timeout=poll_timeout,
            loop=None,
        )

    async def run_async(
        self,
        handler: Callable[[Message], Awaitable[object]],
        *,
        concurrency: int = 1,
        ordering: str = "key",
        max_buffered: int | None = None,
        max_buffered_per_partition: int | None = None,
        drain_timeout: float = 30.0,
        poll_timeout: float = 0.5,
    ) -> None:
        """:meth:`run` for an ``async def`` handler inside the application's event loop: the
        handlers are tasks on this loop, the polling runs on a thread of its own. Cancelling
        the awaiting task stops the consumer (what runs is awaited, bounded) and closes it."""
        if not inspect.iscoroutinefunction(handler):
            raise ConfigurationError(
                "run_async() needs an async def handler; give a plain function to run()"
            )
        loop = asyncio.get_running_loop()
        await self._run_in(
            loop,
            functools.partial(
                self._run,
                handler,
                concurrency=concurrency,
                ordering=ordering,
                max_buffered=max_buffered,
                max_buffered_per_partition=max_buffered_per_partition,
                drain_timeout=drain_timeout,
                poll_timeout=poll_timeout,
                loop=loop,
            ),
        )

    def run_batches(
        self,
        handler: BatchHandler,
        *,
        max_records: int = 500,
        max_wait: float = 0.0,
        concurrency: int = 1,
        ordering: str = "partition",
        max_buffered: int | None = None,
        drain_timeout: float = 30.0,
        poll_timeout: float = 0.5,
    ) -> None:
        """Process messages ``max_records`` at a time with ``handler(list_of_messages)`` until
        :meth:`stop`, SIGINT or SIGTERM: bulk writes to a database or a search index.

        Returning means every message is done. Raising :class:`~resilient_kafka.BatchFailed`
        names the ones that failed (and why): they follow the retry policy one by one, the
        others are done. Any other exception: the batch is handed over again in halves until
        the failing messages are found alone, so a good message is never retried or
        dead-lettered for a bad one. ``max_wait``: how long to wait for a batch to fill once
        a message is there (0: take what has been fetched). An ``async def`` handler runs on
        an event loop of its own.

        With one handler at a time a batch is what one fetch brought, across partitions.
        ``concurrency`` > 1 runs that many batches at once: ``ordering="partition"`` gives
        each partition a batch at a time, ``"key"`` splits each partition by key (a key's
        messages stay in order), ``"unordered"`` any. ``max_buffered`` (default 4 x
        max_records x concurrency) bounds the messages held. See docs/batches.md.
        """
        self._run(
            handler,
            concurrency=concurrency,
            ordering=ordering,
            max_buffered=max_buffered,
            max_buffered_per_partition=None,
            drain_timeout=drain_timeout,
            poll_timeout=poll_timeout,
            loop=None,
            batch=check_batch_options(max_records, max_wait),
        )

    async def run_batches_async(
        self,
        handler: Callable[[list[Message]], Awaitable[object]],
        *,
        max_records: int = 500,
        max_wait: float = 0.0,
        concurrency: int = 1,
        ordering: str = "partition",
        max_buffered: int | None = None,
        drain_timeout: float = 30.0,
        poll_timeout: float = 0.5,
    ) -> None:
        """:meth:`run_batches` for an ``async def`` handler inside the application's event
        loop (see :meth:`run_async`)."""
        if not inspect.iscoroutinefunction(handler):
            raise ConfigurationError(
                "run_batches_async() needs an async def handler; give a plain function to "
                "run_batches()"
            )
        await self._run_in(
            asyncio.get_running_loop(),
            functools.partial(
                self._run,
                handler,
                concurrency=concurrency,
                ordering=ordering,
                max_buffered=max_buffered,
                max_buffered_per_partition=None,
                drain_timeout=drain_timeout,
                poll_timeout=poll_timeout,
                loop=asyncio.get_running_loop(),
                batch=check_batch_options(max_records, max_wait),
            ),
        )

    async def _run_in(self, loop: asyncio.AbstractEventLoop, run: Callable[[], None]) -> None:
        """Poll on a thread of its own; cancelling the awaiting task stops the consumer."""
        polling = loop.run_in_executor(None, run)
        try:
            await asyncio.shield(polling)
        except asyncio.CancelledError:
            self.stop()
            await polling
            raise

    def _run(
        self,
        handler: Any,
        *,
        concurrency: int,
        ordering: str,
        max_buffered: int | None,
        max_buffered_per_partition: int | None,
        drain_timeout: float,
        poll_timeout: float,
        loop: asyncio.AbstractEventLoop | None,
        batch: tuple[int, float] | None = None,
    ) -> None:
        if batch is not None and max_buffered is None:
            max_buffered = 4 * batch[0] * concurrency
        total, per_partition = check_options(
            concurrency, ordering, max_buffered, max_buffered_per_partition
        )
        asynchronous = inspect.iscoroutinefunction(handler)
        if concurrency == 1 and not asynchronous:
            self._settings.check_blocking_fits()
        elif self._txn is not None:
            self._settings.check_blocking_fits_transaction()
        if batch is not None:
            executor: Any = self._batch_executor(
                handler, asynchronous, concurrency, ordering, total, drain_timeout, loop, batch
            )
        else:
            executor = self._executor(
                handler,
                asynchronous,
                concurrency,
                ordering,
                total,
                per_partition,
                drain_timeout,
                loop,
            )
        if isinstance(executor, WorkManager | BatchExecutor):
            if self._txn is not None:
                self._committer.quiesce_with(executor)
            else:
                self._committer.keep_completed()
        self._skip_completed = self._txn is None
        restore = self._install_signal_handlers() if loop is None else (lambda: None)
        self._loop.running = True
        self._loop.executor = executor
        try:
            self._loop.run(executor, poll_timeout)
        except Exception as exc:  # what ends run() is fatal: no longer live
            self._failure = exc
            raise
        finally:
            try:
                executor.shutdown()
            finally:
                self._loop.executor = None
                restore()
                self.close()

    def _executor(
        self,
        handler: Any,
        asynchronous: bool,
        concurrency: int,
        ordering: str,
        total: int,
        per_partition: int,
        drain_timeout: float,
        loop: asyncio.AbstractEventLoop | None,
    ) -> Any:
        """Inline for one plain handler at a time (today's cost); else the work manager."""
        settings = self._settings
        if concurrency == 1 and not asynchronous:
            return InlineExecutor(
                handler,
                self._settle,
                retry=settings.retry,
                outage=self._outage,
                committer=self._committer,
                stop=self._stop,
                metrics=self._metrics,
                tracing=self._tracing,
                group=settings.group,
                parent_on_creation=settings.parent_on_creation,
            )
        attempts = Attempts(
            settings.retry,
            self._outage,
            self._stop,
            self._metrics,
            self._tracing,
            settings.group,
            settings.parent_on_creation,
            self._claims,
            transactional=self._txn is not None,
        )
        runner = (
            AsyncRunner(handler, attempts, concurrency, loop)
            if asynchronous
            else ThreadRunner(handler, attempts, concurrency)
        )
        return WorkManager(
            runner,
            self._settle,
            self._control,
            self._outage,
            self._claims,
            self._metrics,
            concurrency=concurrency,
            ordering=ordering,
            max_buffered=total,
            max_buffered_per_partition=per_partition,
            drain_timeout=drain_timeout,
        )

    def _batch_executor(
        self,
        handler: Any,
        asynchronous: bool,
        concurrency: int,
        ordering: str,
        total: int,
        drain_timeout: float,
        loop: asyncio.AbstractEventLoop | None,
        batch: tuple[int, float],
    ) -> BatchExecutor:
        settings = self._settings

        def calls(cancelled: set[int]) -> BatchCalls:
            return BatchCalls(
                handler,
                settings.retry,
                self._outage,
                self._stop,
                self._metrics,
                self._claims,
                transactional=self._txn is not None and (concurrency > 1 or asynchronous),
                cancelled=cancelled,
                wrote=self._committer.wrote_for,
            )

        cancelled: set[int] = set()
        runner: Any
        if asynchronous:
            runner = AsyncBatchRunner(lambda: calls(cancelled), loop)
        elif concurrency == 1:
            runner = InlineBatchRunner(calls(cancelled))
        else:
            runner = ThreadBatchRunner(lambda: calls(cancelled), concurrency)
        runner.cancelled = cancelled
        max_records, max_wait = batch
        return BatchExecutor(
            runner,
            self._settle,
            self._control,
            self._outage,
            self._claims,
            self._metrics,
            max_records=max_records,
            max_wait=max_wait,
            concurrency=concurrency,
            ordering=ordering,
            max_buffered=total,
            drain_timeout=drain_timeout,
        )

    def stop(self) -> None:
        """Ask :meth:`run` to finish the message in hand and shut down (any thread)."""
        self._stop.set()

    def health(self) -> HealthReport:
        """Live, ready, stalled, and why: what ``/healthz`` and ``/readyz`` answer on the
        metrics port (docs/operations.md)."""
        return self._health.report()

    def _health_state(self) -> str:
        if self._failure is not None:
            return FAILED
        if self._closed:
            return CLOSED
        if self._stop.is_set():
            return STOPPING
        return RUNNING if self._loop.polled_at is not None else STARTING

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

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Wait (bounded) for forwards, commit what is safe, close. Records still in hand were
        not reported processed (no next poll, no commit): they are redelivered, never
        committed unseen. The native consumer and the producer are closed even when a step
        before fails (its exception is raised afterwards)."""
        if self._closed:
            return
        self._closed = True
        self._topics.close()
        try:
            wrote = self._txn is not None and self._loop.wrote_in_hand()
            self._loop.drop_in_hand()
            if self._txn is None:
                self._drain(self._settings.forward_timeout)
            self._committer.close(wrote)
        finally:
            try:
                super().close()  # may run the revoke callback, which still needs the producer
            finally:
                # from now on every method answers as confluent's closed consumer does
                self._handle_closed = True
                self.__dict__.pop("poll", None)
                self.__dict__.pop("consume", None)
                try:
                    if self._txn is not None and self._txn.stuck is not None:
                        # a transactional call never returned: close() would block on it too
                        log.error("forwarding producer left open: %s", self._txn.stuck)
                    else:
                        self._producer.close()  # flushes what is left, releases the connection
                except KafkaException as exc:
                    # a fatal producer (fenced) says so again: the error that stopped the
                    # consumer (TransactionError) must not be replaced by this one
                    log.warning("closing the forwarding producer: %s", exc)
                if self._claims is not None:
                    self._claims.close()
                self._metrics.retire()
                if self._metrics.enabled:  # a closed consumer is no group's stall
                    self._metrics.fam.health.forget(self)
                server = getattr(self, "_metrics_server", None)
                if server is not None:
                    server.shutdown()

    # -- for tests and tools -----------------------------------------------------------------

    def _drain(self, timeout: float) -> bool:
        """Wait until every retry/DLQ copy is acknowledged; False if ``timeout`` passed."""
        return self._forwarder.drain(timeout)

    def __repr__(self) -> str:  # never the config: it may hold secrets
        return f"<ResilientConsumer group={self._group!r} {self._where}>"


def _partition_list(partitions: object) -> bool:
    """Whether confluent would take ``partitions`` as a list of TopicPartition."""
    return isinstance(partitions, list) and all(isinstance(tp, TopicPartition) for tp in partitions)


def _with_tiers(
    partitions: list[TopicPartition], tiers: list[TopicPartition]
) -> list[TopicPartition]:
    """``partitions`` and the rebalance's retry tier partitions not among them."""
    if not tiers:
        return partitions
    named = {(tp.topic, tp.partition) for tp in partitions}
    return partitions + [tp for tp in tiers if (tp.topic, tp.partition) not in named]


def _start_fresh_tiers(partitions: list[TopicPartition], fresh: set[Key]) -> None:
    for tp in partitions:
        if (tp.topic, tp.partition) in fresh and tp.offset == OFFSET_INVALID:
            tp.offset = OFFSET_BEGINNING


def _chained_stats(metrics: ConsumerMetrics, user_stats_cb: Any) -> Callable[[str], None]:
    def stats_cb(stats_json: str) -> None:
        metrics.stats(stats_json)
        if user_stats_cb is not None:
            user_stats_cb(stats_json)

    return stats_cb


def _described(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]
