"""Health: live, ready and stalled, as /healthz and /readyz answer them. The state machine
against scripted signals; the endpoints against a consumer on the embedded broker."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from typing import Any

import pytest
from confluent_kafka import Message
from prometheus_client import CollectorRegistry

from resilient_kafka import ConfigurationError, ResilientConsumer
from resilient_kafka.health import (
    CLOSED,
    FAILED,
    RUNNING,
    STARTING,
    STOPPING,
    Health,
    Signals,
)
from resilient_kafka.testing import KafkaCluster
from tests.helpers import metric_total, produce, rdk_threads, wait_for


class Scripted:
    """Signals a test sets by hand, and the clock they are read against."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.state = STARTING
        self.failure: str | None = None
        self.polled_at: float | None = None
        self.joined = False
        self.assigned = 0
        self.outstanding = 0
        self.progress = 0

    def health(self, **kwargs: Any) -> Health:
        return Health(
            Signals(
                state=lambda: self.state,
                failure=lambda: self.failure,
                polled_at=lambda: self.polled_at,
                joined=lambda: self.joined,
                assigned=lambda: self.assigned,
                outstanding=lambda: self.outstanding,
                progress=lambda: self.progress,
            ),
            max_poll_interval=300.0,
            clock=lambda: self.now,
            **kwargs,
        )

    def polls(self) -> None:
        self.state, self.polled_at = RUNNING, self.now


def test_a_new_consumer_is_live_and_becomes_ready_once_the_group_assigns_it() -> None:
    s = Scripted()
    health = s.health()
    report = health.report()
    assert (report.live, report.ready, report.state) == (True, False, STARTING)
    assert report.reasons == ["not polled yet", "waiting for the group to assign partitions"]
    s.polls()
    assert not health.report().ready  # polling, not joined yet
    s.joined, s.assigned = True, 0  # more members than partitions: legitimately idle
    report = health.report()
    assert (report.live, report.ready, report.reasons) == (True, True, [])
    assert report.assigned_partitions == 0


def test_no_poll_within_max_poll_interval_is_not_live() -> None:
    s = Scripted()
    health = s.health()
    s.polls()
    s.joined = True
    s.now += 299
    assert health.report().live
    s.now += 2
    report = health.report()
    assert not report.live and not report.ready
    assert report.reasons[0].startswith("no poll for 301 s (max.poll.interval.ms is 300 s)")
    assert report.seconds_since_poll == pytest.approx(301)


def test_a_consumer_never_polled_is_not_live_after_max_poll_interval() -> None:
    s = Scripted()
    health = s.health()
    s.now += 301
    report = health.report()
    assert not report.live
    assert report.reasons == ["never polled in the 301 s since it was created"]


def test_a_fatal_error_or_a_close_ends_liveness_and_stopping_ends_readiness() -> None:
    s = Scripted()
    health = s.health()
    s.polls()
    s.joined = True
    s.state = STOPPING
    report = health.report()
    assert (report.live, report.ready, report.reasons) == (True, False, ["stopping"])
    s.now += 1000  # finishing in-flight work polls nothing: still live
    assert health.report().live
    s.state, s.failure = FAILED, "KafkaException: fenced"
    report = health.report()
    assert not report.live and report.reasons == ["failed: KafkaException: fenced"]
    s.state = CLOSED
    assert health.report().reasons == ["closed"]


def test_outstanding_records_with_no_progress_for_stall_timeout_are_a_stall() -> None:
    s = Scripted()
    health = s.health(stall_timeout=60)
    s.polls()
    s.joined = True
    s.outstanding, s.progress = 5, 10
    assert not health.report().stalled
    s.now += 59
    s.polled_at = s.now
    assert not health.report().stalled
    s.now += 1
    report = health.report()
    assert report.stalled and report.live and report.ready  # a signal, not a probe answer
    assert report.reasons == ["stalled: 5 record(s) outstanding, none done for 60 s"]
    s.progress = 11  # a record done: the clock starts again
    assert not health.report().stalled
    s.now += 100
    s.outstanding = 0  # nothing waits: idle, not stalled
    assert not health.report().stalled
    assert health.report().seconds_since_progress is None


@pytest.mark.parametrize("bad", [0, -1, float("nan"), "60", True, None])
def test_stall_timeout_is_checked(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="stall_timeout must be a positive number"):
        Scripted().health(stall_timeout=bad)


# -- the endpoints, on a consumer ------------------------------------------------------------


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_closed_consumer_frees_its_metrics_port_and_a_taken_port_is_a_clear_error() -> None:
    """Kubernetes names a fixed metrics port: a consumer restarted in the same process (after
    run() failed, say) must bind it again, and a port another process holds is named in the
    error, the native handles not leaked."""
    port = _free_port()
    config = {"bootstrap.servers": "127.0.0.1:1", "group.id": "g-health-port"}
    for _ in range(2):
        consumer = ResilientConsumer(config, registry=CollectorRegistry(), metrics_port=port)
        try:
            assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200  # live: starting
        finally:
            consumer.close()
    threads = rdk_threads()
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the probes' TIME_WAIT
        holder.bind(("127.0.0.1", port))
        holder.listen()
        with pytest.raises(ConfigurationError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            ResilientConsumer(config, registry=CollectorRegistry(), metrics_port=port)
    wait_for(lambda: rdk_threads() <= threads, 10, "the refused consumer's handles closed")


def test_the_metrics_port_answers_probes_and_shows_a_stall(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic = topic_factory(2)
    produce(kafka.client_config(), topic, [(f"k{i}", f"v{i}") for i in range(20)])
    registry = CollectorRegistry()
    consumer = ResilientConsumer(
        kafka.client_config(
            group_id=f"health-{topic[-8:]}", auto_offset_reset="earliest", enable_auto_commit=False
        ),
        registry=registry,
        metrics_port=0,
        stall_timeout=1.0,
    )
    base = consumer.metrics_url.removesuffix("/metrics")  # type: ignore[union-attr]
    status, body = _get(base + "/readyz")
    assert status == 503 and body["state"] == "starting" and not body["ready"]
    assert _get(base + "/healthz")[0] == 200
    release = threading.Event()
    handled: list[str] = []

    def handler(msg: Message) -> None:
        if msg.value() == b"v7":
            release.wait(60)  # the downstream call hangs
        handled.append(msg.value().decode())  # type: ignore[union-attr]

    consumer.subscribe([topic])
    thread = threading.Thread(
        target=consumer.run, args=(handler,), kwargs={"concurrency": 2}, daemon=True
    )
    thread.start()
    try:
        wait_for(lambda: _get(base + "/readyz")[0] == 200, 30, "readiness once assigned")
        status, body = _get(base + "/readyz")
        assert body["state"] == "running" and body["assigned_partitions"] >= 2
        wait_for(lambda: _get(base + "/healthz")[1]["stalled"], 30, "the stall to show")
        status, body = _get(base + "/healthz")
        assert status == 200, "a stall is not a reason to restart"
        assert body["outstanding_records"] >= 1
        assert any(reason.startswith("stalled:") for reason in body["reasons"])
        name = "resilient_kafka_consumer_stalled"
        with urllib.request.urlopen(consumer.metrics_url, timeout=10) as response:
            assert f'{name}{{messaging_consumer_group_name="health-' in response.read().decode()
        assert metric_total(registry, name) == 1
        release.set()
        wait_for(lambda: len(handled) == 20, 30, "the records after the hang")
        wait_for(lambda: not _get(base + "/healthz")[1]["stalled"], 30, "the stall to end")
        assert metric_total(registry, name) == 0
    finally:
        release.set()
        consumer.stop()
        thread.join(60)
    assert consumer.health().state == "closed" and not consumer.health().live


def test_a_handler_stuck_past_max_poll_interval_is_not_live(
    kafka: KafkaCluster, topic_factory
) -> None:
    topic = topic_factory(1)
    produce(kafka.client_config(), topic, [("k", "stuck")])
    consumer = ResilientConsumer(
        kafka.client_config(
            group_id=f"stuck-{topic[-8:]}",
            auto_offset_reset="earliest",
            max_poll_interval_ms=6000,  # (not below session.timeout.ms)
        ),
        registry=CollectorRegistry(),
        metrics_port=0,
    )
    base = consumer.metrics_url.removesuffix("/metrics")  # type: ignore[union-attr]
    entered, release = threading.Event(), threading.Event()

    def handler(msg: Message) -> None:
        entered.set()
        release.wait(60)

    consumer.subscribe([topic])
    thread = threading.Thread(target=consumer.run, args=(handler,), daemon=True)
    thread.start()
    try:
        assert entered.wait(30)
        assert _get(base + "/healthz")[0] == 200
        wait_for(lambda: _get(base + "/healthz")[0] == 503, 30, "liveness to fail")
        status, body = _get(base + "/healthz")
        assert status == 503 and not body["live"] and not body["ready"]
        assert body["reasons"][0].startswith("no poll for")
    finally:
        release.set()
        consumer.stop()
        thread.join(60)
