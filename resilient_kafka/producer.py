"""``ResilientProducer``: a confluent-kafka Producer with safe defaults and no silent failures."""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from resilient_kafka import _config
from resilient_kafka.headers import ID

log = logging.getLogger("resilient_kafka.producer")


DeliveryCallback = Callable[[KafkaError | None, Message], None]
# what an aborted transaction's records report: expected, not a delivery failure
_PURGED = (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT)


# Exactly-once with concurrent handlers: each worker counts what its handler produced (a
# context variable is per thread and per asyncio task), so a failed record whose output is in
# the open transaction is told apart from the others running beside it.
WRITES: ContextVar[list[int] | None] = ContextVar("resilient_kafka_writes", default=None)


class ResilientProducer(Producer):
    """``confluent_kafka.Producer`` with ``enable.idempotence=true`` and ``acks=all`` by default.

    A delivery failure is never silent: it is counted in :attr:`delivery_failures`, logged at
    ERROR (unless the caller's own ``on_delivery`` callback receives it) and passed to the
    optional ``on_delivery_failure`` hook.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        /,
        *,
        on_delivery_failure: DeliveryCallback | None = None,
        metrics: bool = True,
        registry: Any = None,
        tracer_provider: Any = None,
        message_ids: bool = True,
        **kwargs: Any,
    ) -> None:
        conf = safe_config(client_config(config, kwargs))
        self._message_ids = message_ids
        # one config-level delivery callback serves every record produced without its own
        # (no per-record callback object); a config-level callback of the caller is chained
        self._default_callback: DeliveryCallback | None = conf.pop("on_delivery", None)
        conf["on_delivery"] = self._report
        super().__init__(conf)
        from resilient_kafka.tracing import tracer_for

        self._tracing = tracer_for(tracer_provider)
        self._fam = None
        if metrics:
            from resilient_kafka.metrics import families

            self._fam = families(registry)
        self._sent: dict[str, Any] = {}
        self._where = str(conf.get("bootstrap.servers", "?"))
        self._on_failure = on_delivery_failure
        self._transactional = bool(conf.get("transactional.id"))
        self.delivery_failures = 0
        self.produced = 0  # produce() calls: exactly-once mode sees whether a handler wrote

    def produce(
        self,
        topic: str,
        value: Any = None,
        key: Any = None,
        partition: int = -1,
        on_delivery: DeliveryCallback | None = None,
        timestamp: int = 0,
        headers: Any = None,
        *,
        callback: DeliveryCallback | None = None,
    ) -> None:
        """``Producer.produce``, stamping an ``rk.id`` header (unless ``message_ids=False`` or
        one is there) and, with tracing, a producer span and its context in the headers.

        The record's delivery report goes to ``on_delivery`` (or its alias ``callback``, which
        wins when both are given, as with confluent's class), else to the config-level
        ``on_delivery``; a failure is counted and logged either way (see the class)."""
        if callback is None:  # given both, confluent's class calls callback=
            callback = on_delivery
        self.produced += 1
        writes = WRITES.get()
        if writes is not None:  # a concurrent handler's output, counted for its record
            writes[0] += 1
        if self._message_ids:
            headers = with_message_id(headers)
        if self._tracing is not None:
            span, headers = self._tracing.start_send(topic, headers, key)
            report = self._ending(span, self._reporter(callback))
            self._produce_untraced(topic, value, key, partition, report, timestamp, headers)
        elif callback is None:  # the config-level callback (_report) reports it
            super().produce(topic, value, key, partition, timestamp=timestamp, headers=headers)
        else:
            super().produce(
                topic,
                value,
                key,
                partition,
                on_delivery=self._reporter(callback),
                timestamp=timestamp,
                headers=headers,
            )

    def _produce_untraced(
        self,
        topic: str,
        value: Any,
        key: Any,
        partition: int,
        on_delivery: DeliveryCallback,
        timestamp: int,
        headers: Any,
    ) -> None:
        """Produce with a ready delivery callback; callers that trace do it themselves."""
        super().produce(
            topic,
            value=value,
            key=key,
            partition=partition,
            on_delivery=on_delivery,
            timestamp=timestamp,
            headers=headers,
        )

    def _ending(self, span: Any, report: DeliveryCallback) -> DeliveryCallback:
        from resilient_kafka.tracing import Tracing

        def delivered(err: KafkaError | None, msg: Message) -> None:
            Tracing.end_send(span, err, msg)
            report(err, msg)

        return delivered

    def _reporter(self, callback: DeliveryCallback | None) -> DeliveryCallback:
        if callback is None:
            return self._report

        def report(err: KafkaError | None, msg: Message) -> None:
            if self._fam is not None:
                self._count(err, msg)
            if err is not None:
                self.delivery_failures += 1
                if self._on_failure is not None:
                    self._on_failure(err, msg)
            callback(err, msg)

        return report

    def _count(self, err: KafkaError | None, msg: Message) -> None:
        """Sent-messages counter and send duration, at the delivery report."""
        fam = self._fam
        assert fam is not None
        topic = msg.topic() or ""
        if err is None:
            children = self._sent.get(topic)
            if children is None:
                children = self._sent[topic] = (
                    fam.sent.labels("kafka", "send", topic, "").inc,
                    fam.operation_duration.labels("kafka", "send", "send", topic, "", "").observe,
                )
            children[0]()
            latency = msg.latency()
            if latency is not None:
                children[1](latency)
            return
        error_type = fam.error_type(err.name())
        fam.sent.labels("kafka", "send", topic, error_type).inc()

    def _report(self, err: KafkaError | None, msg: Message) -> None:
        if self._fam is not None:
            self._count(err, msg)
        if self._default_callback is not None:  # the caller's config-level on_delivery
            if err is not None:
                self.delivery_failures += 1
                if self._on_failure is not None:
                    self._on_failure(err, msg)
            self._default_callback(err, msg)
            return
        if err is None:
            return
        if self._transactional and err.code() in _PURGED:
            log.info("record for %s discarded with its aborted transaction", msg.topic())
            return
        self.delivery_failures += 1
        log.error(
            "delivery to %s [%s] on %s failed: %s",
            msg.topic(),
            msg.partition(),
            self._where,
            err.str(),
        )
        if self._on_failure is not None:
            self._on_failure(err, msg)

    def __repr__(self) -> str:  # never the config: it may hold secrets
        return f"<ResilientProducer {self._where}>"


def client_config(config: Mapping[str, Any] | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """confluent's constructor forms: a dict, keyword arguments (``**conf``, ``logger=``), or
    both (keywords win); anything else is the TypeError confluent raises."""
    if config is None and not kwargs:
        raise TypeError("expected configuration dict")
    if config is not None and not isinstance(config, Mapping):
        raise TypeError("expected configuration dict")
    conf = {**(config or {}), **kwargs}
    for key in conf:
        if not isinstance(key, str):  # librdkafka's own answer, before our code reads keys
            raise KafkaException(
                KafkaError(KafkaError._INVALID_ARG, f'No such configuration property: "{key}"')
            )
    return conf


def safe_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with idempotence and ``acks=all`` unless the application chose otherwise.

    An explicit ``acks`` other than all (or ``enable.idempotence=false``) is honoured, with a
    warning: without idempotence a retried send can duplicate or reorder records. So are
    settings idempotence cannot have (more than 5 requests in flight, no retries): the
    producer constructs as confluent's does, without idempotence, and says so.
    """
    conf = dict(config)
    acks = conf.get("acks", conf.get("request.required.acks"))
    if acks is None:
        conf["acks"] = "all"
    if "enable.idempotence" not in conf:
        conflict = _without_idempotence(conf, acks)
        if conflict is None:
            conf["enable.idempotence"] = True
        else:
            warnings.warn(
                f"{conflict} turns off the idempotent producer resilient-kafka enables by "
                "default: a broker failover can lose acknowledged records, and retried sends can "
                "be duplicated or reordered",
                stacklevel=3,
            )
    return conf


def _without_idempotence(conf: Mapping[str, Any], acks: Any) -> str | None:
    """The application's setting that idempotence cannot go with, if any."""
    if acks is not None and str(acks).lower() not in ("all", "-1"):
        return f"acks={acks}"
    for name in ("max.in.flight.requests.per.connection", "max.in.flight"):
        if name in conf and _config.number(conf[name]) > 5:
            return f"{name}={conf[name]}"
    for name in ("retries", "message.send.max.retries"):
        if name in conf and _config.number(conf[name]) == 0:
            return f"{name}={conf[name]}"
    return None


def with_message_id(headers: Any) -> Any:
    """``headers`` (None, a list of pairs or a dict) with an ``rk.id`` unless one is there: the
    identity consumers deduplicate on, kept on every retry and DLQ copy."""
    if headers is None:
        return [(ID, os.urandom(16).hex().encode())]
    if isinstance(headers, dict):
        return headers if ID in headers else {**headers, ID: os.urandom(16).hex().encode()}
    try:
        pairs = list(headers)
        for key, _value in pairs:
            if key == ID:
                return pairs
    except (TypeError, ValueError):  # malformed: produce() raises confluent's own TypeError
        return headers
    pairs.append((ID, os.urandom(16).hex().encode()))
    return pairs


# Consumer settings that a side-channel producer should share (connection and security).
_SHARED_PREFIXES = (
    "bootstrap.servers",
    "metadata.broker.list",
    "client.id",
    "client.rack",
    "client.dns.lookup",
    "security.protocol",
    "ssl.",
    "ssl_",
    "sasl.",
    "enable.ssl.",
    "socket.",
    "broker.",
    "api.version.",
    "reconnect.",
    "retry.backoff",
    "connections.max.idle.ms",
    "logger",  # librdkafka's log lines of every client go where the application sends them
    "log_level",
    "debug",
)
# Not shared: error_cb (the application's is for the client it made; the forwarding producer's
# errors surface as ForwardError and in the log), oauth_cb (shared through a SharedToken).


def producer_config_from(consumer_config: Mapping[str, Any]) -> dict[str, Any]:
    """The connection and security part of a consumer config, for its forwarding producer.

    A token callback (``oauth_cb``) of the consumer config must already be a
    :class:`SharedToken`'s ``fetch``: the producer gets its ``reuse``.
    """
    shared = {
        key: value for key, value in consumer_config.items() if key.startswith(_SHARED_PREFIXES)
    }
    oauth_cb = consumer_config.get("oauth_cb")
    token = getattr(oauth_cb, "__self__", None)
    if isinstance(token, SharedToken):
        shared["oauth_cb"] = token.reuse
    return shared


class SharedToken:
    """One OAUTHBEARER token for a consumer and the clients it makes for itself.

    The application's ``oauth_cb`` runs for the consumer (``fetch``), as with confluent's class;
    the forwarding producer and the admin client take the consumer's token while it has at least
    ``REUSE_MARGIN`` seconds left (``reuse``), so the callback runs once per token, not once per
    internal client, and a callback that fails only on a second call cannot stall construction.
    """

    REUSE_MARGIN = 60.0

    def __init__(self, callback: Callable[[str], Any]) -> None:
        self._callback = callback
        self._token: Any = None

    def fetch(self, config: str) -> Any:
        token = self._callback(config)
        self._token = token
        return token

    def reuse(self, config: str) -> Any:
        token = self._token
        try:
            if token is not None and float(token[1]) - time.time() > self.REUSE_MARGIN:
                return token
        except (TypeError, ValueError, IndexError):  # a malformed token: librdkafka says why
            pass
        return self.fetch(config)
