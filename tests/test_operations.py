"""Running it in production: the alert rules under promtool, the Kubernetes manifests against
Kubernetes' own schemas, a real Prometheus scraping a consumer (every series the alerts and the
Grafana dashboard use is there), and kcat reading retry and DLQ records with their headers."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Message
from prometheus_client import CollectorRegistry

from resilient_kafka import CircuitBreaker, ResilientConsumer, RetryPolicy
from resilient_kafka.testing import KafkaCluster
from resilient_kafka.testing.mock_cluster import MockCluster
from tests.helpers import produce, records_in, wait_for

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
K8S = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.30"


def _tool(name: str) -> str:
    """The path of a Debian tool the set-up installs (`make servers`); missing is a failure."""
    found = shutil.which(name)
    assert found, f"{name} is not installed: run `make servers` (Debian's package {name})"
    return found


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=60)


# -- alert rules ---------------------------------------------------------------------------------


def test_the_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    promtool = _tool("promtool")
    checked = _run(promtool, "check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 5 rules found" in checked.stdout
    tested = _run(promtool, "test", "rules", str(DEPLOY / "prometheus" / "alerts.test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    """(The check above can fail: a rule with a parse error does not pass.)"""
    broken = tmp_path / "broken.yml"
    broken.write_text(RULES.read_text().replace("== 1", "== ", 1))
    assert _run(_tool("promtool"), "check", "rules", str(broken)).returncode != 0


# -- Kubernetes manifests ------------------------------------------------------------------------


def _documents() -> dict[str, dict[str, Any]]:
    """Every manifest in deploy/kubernetes, by kind."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert document["kind"] not in found, f"two {document['kind']} manifests"
            found[document["kind"]] = document
    return found


def test_the_manifests_are_valid_kubernetes_objects() -> None:
    import kubernetes_validate

    documents = _documents()
    assert set(documents) == {"Deployment", "PodDisruptionBudget", "PodMonitor", "PrometheusRule"}
    for kind in ("Deployment", "PodDisruptionBudget"):  # strict: an unknown field fails
        kubernetes_validate.validate(documents[kind], KUBERNETES_VERSION, strict=True)
    broken = json.loads(json.dumps(documents["Deployment"]))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["timeout"] = 5
    with pytest.raises(kubernetes_validate.ValidationError, match="timeout"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_manifests_fit_together_and_the_consumer() -> None:
    """What a schema cannot see: labels, port names, probe paths, the grace period against the
    consumer's own shutdown bounds, the Prometheus Operator objects."""
    import inspect

    documents = _documents()
    deployment = documents["Deployment"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert all(len(name) <= 15 for name in ports)  # a Kubernetes port name limit
    probes = {
        kind: container[kind]["httpGet"]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert {kind: probe["path"] for kind, probe in probes.items()} == {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    assert all(probe["port"] == "metrics" for probe in probes.values())
    assert "metrics" in ports
    # SIGTERM: running handlers get drain_timeout, unacknowledged forwards forward_timeout
    drain = inspect.signature(ResilientConsumer.run).parameters["drain_timeout"].default
    forward = inspect.signature(ResilientConsumer).parameters["forward_timeout"].default
    assert pod["spec"]["terminationGracePeriodSeconds"] > drain + forward
    assert documents["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= (
        labels.items()
    )

    monitor = documents["PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")

    rule = documents["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == yaml.safe_load(RULES.read_text()), (
        "prometheusrule.yaml differs from deploy/prometheus/alerts.yml: run "
        "`python deploy/kubernetes/render_rules.py`"
    )


def test_the_prometheusrule_file_is_what_the_render_script_writes() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_rules", K8S / "render_rules.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (K8S / "prometheusrule.yaml").read_text() == module.render()


# -- a real Prometheus ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _api(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    return answer["data"]


def _dashboard_queries() -> list[str]:
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr":
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text()))
    return found


def _metric_names(query: str) -> set[str]:
    """The metric names a PromQL query reads (the library's: resilient_kafka_*, messaging_*)."""
    # (messaging_* names are metrics only as messaging_client_* and messaging_process_*: the
    # others are semconv label names)
    return set(re.findall(r"\b(?:resilient_kafka|messaging_client|messaging_process)_\w+", query))


@pytest.fixture
def prometheus(tmp_path: Path) -> Any:
    """Start Debian's Prometheus scraping what the test names; stop it at the end."""
    binary = _tool("prometheus")
    started: list[subprocess.Popen[bytes]] = []

    def start(target: str) -> str:
        port = _free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(RULES)],
                    "scrape_configs": [
                        {"job_name": "consumer", "static_configs": [{"targets": [target]}]}
                    ],
                }
            )
        )
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "prometheus.log").open("wb"),
        )
        started.append(process)
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(base + "/-/ready", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_for(ready, 30, "Prometheus to be ready")
        return base

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_prometheus_scrapes_a_consumer_and_has_every_series_the_alerts_and_dashboard_use(
    kafka: KafkaCluster, topic_factory, prometheus: Any
) -> None:
    topic = topic_factory(2)
    produce(kafka.client_config(), topic, [(f"k{i}", f"v{i}") for i in range(50)])
    consumer = ResilientConsumer(
        kafka.client_config(
            group_id=f"ops-{topic[-8:]}", auto_offset_reset="earliest", statistics_interval_ms=1000
        ),
        registry=CollectorRegistry(),
        metrics_port=0,
        retry=RetryPolicy(delays=(0.2,)),
        breakers=[CircuitBreaker("downstream")],
    )
    assert consumer.metrics_url is not None
    handled: list[str] = []

    def handler(msg: Message) -> None:
        if msg.value() == b"v13":
            raise ValueError("poison")  # a retry hop, then the DLQ
        handled.append(msg.value().decode())  # type: ignore[union-attr]

    consumer.subscribe([topic])  # (its series are there at 0 from now on)
    base = prometheus(urllib.parse.urlsplit(consumer.metrics_url).netloc)

    def scraped(query: str) -> list[dict[str, Any]]:
        return _api(base, "/api/v1/query", query=query)["result"]  # type: ignore[no-any-return]

    wait_for(lambda: scraped("resilient_kafka_dead_letters_total == 0"), 30, "the first scrape")
    thread = threading.Thread(target=consumer.run, args=(handler,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(handled) == 49, 60, "the records")
        assert [s["value"][1] for s in scraped("up")] == ["1"]
        exposition = urllib.request.urlopen(consumer.metrics_url, timeout=10).read().decode()
        linted = _run(_tool("promtool"), "check", "metrics", stdin=exposition)
        assert linted.returncode == 0, linted.stderr

        wait_for(
            lambda: scraped("resilient_kafka_dead_letters_total == 1"),
            60,
            "the dead-lettered record in Prometheus",
        )
        wanted: set[str] = set()
        for rule in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]:
            wanted |= _metric_names(rule["expr"])
        queries = _dashboard_queries()
        for query in queries:
            wanted |= _metric_names(query)
        wanted |= {"resilient_kafka_consumer_poll_age_seconds", "resilient_kafka_build_info"}
        wanted.add("resilient_kafka_consumer_lag")  # from statistics, every second here

        def missing() -> set[str]:
            return wanted - set(_api(base, "/api/v1/label/__name__/values"))

        try:
            wait_for(lambda: not missing(), 30, "every series the alerts and dashboard use")
        except AssertionError:
            assert not missing(), f"series Prometheus never scraped: {sorted(missing())}"
        for query in queries:  # Grafana's variables as it fills them in
            filled = query.replace("$__rate_interval", "1m").replace('"$group"', '".*"')
            _api(base, "/api/v1/query", query=filled)

        def rules_evaluated() -> list[dict[str, Any]]:
            groups = _api(base, "/api/v1/rules")["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            return (
                rules
                if rules and all(r.get("lastEvaluation", "").startswith("2") for r in rules)
                else []
            )

        wait_for(lambda: rules_evaluated(), 30, "the alert rules to be evaluated")
        assert {(r["name"], r["health"]) for r in rules_evaluated()} == {
            (r["alert"], "ok") for r in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
        }

        def firing() -> set[str]:
            alerts = _api(base, "/api/v1/alerts")["alerts"]
            return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}

        wait_for(lambda: "ResilientKafkaDeadLetters" in firing(), 30, "the DLQ alert")
        assert firing() == {"ResilientKafkaDeadLetters"}  # and no other
    finally:
        consumer.stop()
        thread.join(60)


# -- kcat ----------------------------------------------------------------------------------------


def test_kcat_reads_retry_and_dlq_records_with_their_headers(mock_cluster: MockCluster) -> None:
    """Debian's kcat (librdkafka 2.0) reads what docs/headers.md says a retry and a DLQ copy
    carry. (On the librdkafka mock cluster: Debian's kcat cannot parse Tansu's ApiVersions
    answer, docs/testing.md.)"""
    kcat = _tool("kcat")
    topic, group = "payments", "kcat-check"
    retry = RetryPolicy(delays=(0.2,))
    probe = ResilientConsumer(
        mock_cluster.client_config(group_id=group), retry=retry, metrics=False
    )
    try:
        tiers = [*probe.retry_topics(topic), probe.dead_letter_topic(topic)]
    finally:
        probe.close()
    for name in [topic, *tiers]:
        mock_cluster.create_topic(name, 1)
    produce(mock_cluster.client_config(), topic, [("order-7", "poison")])
    consumer = ResilientConsumer(
        mock_cluster.client_config(group_id=group, auto_offset_reset="earliest"),
        retry=retry,
        metrics=False,
    )
    calls: list[int] = []

    def handler(msg: Message) -> None:
        calls.append(1)
        raise ValueError("card declined")

    consumer.subscribe([topic])
    thread = threading.Thread(target=consumer.run, args=(handler,), daemon=True)
    thread.start()

    def read(name: str) -> list[dict[str, Any]]:
        out = _run(
            kcat,
            "-C",
            "-b",
            mock_cluster.bootstrap_servers,
            "-t",
            name,
            "-o",
            "beginning",
            "-e",
            "-q",
            "-J",
        )
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    try:
        wait_for(lambda: len(calls) >= 2 and read(tiers[-1]), 60, "the DLQ copy")
    finally:
        consumer.stop()
        thread.join(60)
    (retry_copy,) = read(tiers[0])
    (dead,) = read(tiers[-1])
    for record in (retry_copy, dead):
        assert (record["key"], record["payload"]) == ("order-7", "poison")
        names = record["headers"][0::2]
        values = dict(zip(names, record["headers"][1::2], strict=True))
        assert values["rk.original.topic"] == topic
        assert values["rk.original.partition"] == "0"
        assert values["rk.original.offset"] == "0"
        assert values["rk.exception.type"] == "ValueError"
        assert values["rk.exception.message"] == "card declined"
        assert values["rk.consumer.group"] == group
        assert int(values["rk.first.failure"]) > 0
    retry_headers = dict(zip(retry_copy["headers"][0::2], retry_copy["headers"][1::2], strict=True))
    dead_headers = dict(zip(dead["headers"][0::2], dead["headers"][1::2], strict=True))
    assert retry_headers["rk.attempt"] == "1" and int(retry_headers["rk.due"]) > 0
    assert "rk.reason" not in retry_headers and "rk.exception.stacktrace" not in retry_headers
    assert dead_headers["rk.attempt"] == "2" and dead_headers["rk.reason"] == "exhausted"
    assert "Traceback" in dead_headers["rk.exception.stacktrace"] and "rk.due" not in dead_headers
    assert time.time() * 1000 >= int(dead_headers["rk.first.failure"])


# -- SIGTERM --------------------------------------------------------------------------------------

_TERMINATED = """
import sys, threading, time
from resilient_kafka import ResilientConsumer, RetryPolicy
lock = threading.Lock()

def say(*words):  # one whole line at a time: handlers print from several threads
    with lock:
        print(*words, flush=True)

bootstrap, topic, group = sys.argv[1:4]
consumer = ResilientConsumer(
    {"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
     "enable.auto.commit": False, "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
    retry=RetryPolicy(delays=(30.0,)),
    metrics=False,
)

def handle(msg):
    value = msg.value().decode()
    say("start", value)
    time.sleep(0.3)  # a downstream call in flight when SIGTERM comes
    if value == "v3":
        say("failed", value)
        raise ValueError("v3 fails: its retry copy is forwarded")
    say("done", value)

consumer.subscribe([topic])
consumer.run(handle, concurrency=4)
say("stopped")
"""


def test_sigterm_finishes_handlers_in_flight_flushes_forwards_and_commits_in_time(
    kafka: KafkaCluster, topic_factory
) -> None:
    """What the Deployment's terminationGracePeriodSeconds gives a pod: SIGTERM in the middle of
    concurrent handlers and a retry forward. Every handler that started finishes, the retry
    copy is acknowledged, and the commit covers exactly what was done, well within the grace
    period; the next owner starts right after it."""
    import os
    import signal
    import sys

    from confluent_kafka import Consumer, TopicPartition

    topic, group = topic_factory(2), f"term-{uuid.uuid4().hex[:8]}"
    produce(kafka.client_config(), topic, [(f"k{i}", f"v{i}") for i in range(40)])
    child = subprocess.Popen(
        [sys.executable, "-c", _TERMINATED, kafka.bootstrap_servers, topic, group],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines: list[str] = []
    try:
        assert child.stdout is not None
        while "failed v3" not in lines or sum(x.startswith("done") for x in lines) < 8:
            line = child.stdout.readline()
            assert line, f"the consumer ended early: {lines}"
            lines.append(line.strip())
        signalled = time.monotonic()
        child.send_signal(signal.SIGTERM)
        rest = child.stdout.read()  # (not communicate(): it would skip what readline buffered)
        child.wait(60)
        elapsed = time.monotonic() - signalled
        lines += [line.strip() for line in rest.splitlines()]
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 0 and lines[-1] == "stopped", lines[-5:]
    assert elapsed < 15, f"{elapsed:.1f}s to stop (the Deployment allows 75 s)"
    words = [line.split() for line in lines if " " in line]
    started = {value for kind, value in words if kind == "start"}
    finished = {value for kind, value in words if kind in ("done", "failed")}
    assert started == finished, f"handlers cut off: {sorted(started - finished)}"
    reader = Consumer(kafka.client_config(group_id=group))
    try:
        committed = reader.committed([TopicPartition(topic, p) for p in (0, 1)], timeout=10)
    finally:
        reader.close()
    # each offset's value (records are spread over the partitions by key)
    by_offset = {
        (m.partition(), m.offset()): m.value().decode()  # type: ignore[union-attr]
        for m in records_in(kafka, topic)
    }
    for tp in committed:  # the commit ends exactly at the first record not done
        offsets = sorted(o for p, o in by_offset if p == tp.partition)
        first_not_done = next(
            (o for o in offsets if by_offset[(tp.partition, o)] not in finished), len(offsets)
        )
        assert max(tp.offset, 0) == first_not_done, (tp, sorted(finished))
    # v3 failed before the signal: its retry copy was acknowledged before the commit covered it
    retry_topic = f"{topic}.{group}.retry.1"
    assert [m.value() for m in records_in(kafka, retry_topic)] == [b"v3"]
