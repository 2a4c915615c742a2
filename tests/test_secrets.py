"""Secrets stay secret: with SASL/SSL passwords in their configuration, the consumer, the
producer, the DLQ tool, the demo and the chaos runner never show them in logs, metrics,
exception texts, reprs, DLQ headers, output or the files they write.

The embedded broker speaks PLAINTEXT: the secrets are configured as a user's would be (librdkafka
ignores SASL settings under PLAINTEXT, with a warning), so every code path that handles the
configuration sees them while the clients still work.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaException, Message
from prometheus_client import CollectorRegistry, generate_latest

from resilient_kafka import ConfigurationError, ResilientConsumer, ResilientProducer, RetryPolicy
from resilient_kafka import dlq as dlq_tool
from resilient_kafka.dedup import MemoryStore
from resilient_kafka.testing import KafkaCluster
from tests.helpers import read_all, run_until

SECRETS = {
    "sasl.password": f"sasl-pw-{uuid.uuid4().hex}",
    "ssl.key.password": f"key-pw-{uuid.uuid4().hex}",
    "sasl.oauthbearer.client.secret": f"oauth-{uuid.uuid4().hex}",
}
SETTINGS = {"security.protocol": "PLAINTEXT", "sasl.username": "alice", **SECRETS}


def _leaks(text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [name for name, secret in SECRETS.items() if secret.encode() in data]


def _files_leaking(root: Path) -> list[str]:
    return [str(path) for path in root.rglob("*") if path.is_file() and _leaks(path.read_bytes())]


def test_the_consumer_and_producer_keep_secrets_out_of_everything(
    kafka: KafkaCluster,
    topic_factory,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    topic = topic_factory(1)
    group = f"g{uuid.uuid4().hex[:8]}"
    registry = CollectorRegistry()
    config = {**kafka.client_config(group_id=group, auto_offset_reset="earliest"), **SETTINGS}
    texts: list[str] = []
    with caplog.at_level(logging.DEBUG):
        producer = ResilientProducer(
            {**kafka.producer_config(), **SETTINGS}, registry=registry, logger=logging.getLogger()
        )
        for i in range(5):
            producer.produce(topic, value=f"v{i}")
        assert producer.flush(30) == 0
        texts.append(repr(producer))
        consumer = ResilientConsumer(
            config, retry=RetryPolicy(delays=()), registry=registry, logger=logging.getLogger()
        )
        texts += [repr(consumer), repr(consumer.producer)]
        seen: list[str] = []
        lock = threading.Lock()

        def handler(msg: Message) -> None:
            with lock:
                seen.append(msg.value().decode())  # type: ignore[union-attr]
            if msg.value() == b"v3":
                raise ValueError("v3 is poison")

        consumer.subscribe([topic])
        run_until(consumer, handler, lambda: len(seen) == 5)
        # the errors a user meets with this configuration
        for build in (
            lambda: ResilientConsumer(config, exactly_once=True, dedup=MemoryStore()),
            lambda: ResilientConsumer({**config, "no.such.property": "x"}),
            lambda: ResilientConsumer({**config, "group.id": ""}),
            lambda: ResilientProducer({**SETTINGS, "acks": "nonsense"}),
        ):
            with pytest.raises((ConfigurationError, KafkaException, ValueError)) as caught:
                build()
            texts += [str(caught.value), repr(caught.value)]
    dead = read_all(kafka, f"{topic}.{group}.dlq", 1)
    assert [m.value() for m in dead] == [b"v3"]
    texts += [str(dead[0].headers()), str(dlq_tool.decode(dead[0]).to_json())]
    texts.append(generate_latest(registry).decode())
    texts += [record.getMessage() for record in caplog.records]
    out, err = capfd.readouterr()
    texts += [out, err]
    assert any("alice" in t or "sasl" in t.lower() for t in texts[-2:] + texts), (
        "the secrets' neighbours show up somewhere: the capture works"
    )
    leaking = [t[:200] for t in texts if _leaks(t)]
    assert not leaking, leaking


def _properties(path: Path, bootstrap: str) -> dict[str, str]:
    path.write_text("".join(f"{k}={v}\n" for k, v in SETTINGS.items()))
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_CLIENT_PROPERTIES": str(path),
        "PYTHONPATH": os.getcwd(),
    }


def _cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "resilient_kafka.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        timeout=timeout,
    )


def test_the_demo_and_the_dlq_tool_keep_secrets_out_of_output_and_files(
    kafka: KafkaCluster, tmp_path: Path
) -> None:
    env = _properties(tmp_path / "client.properties", kafka.bootstrap_servers)
    work = tmp_path / "work"
    work.mkdir()
    demo = _cli(["demo", "--messages", "40", "--rate", "200", "--outage", "none"], env, work)
    assert demo.returncode == 0, demo.stderr.decode()[-2000:]
    found = re.search(rb"orders-[\w-]+\.payments-[\w-]+\.dlq", demo.stdout + demo.stderr)
    assert found, demo.stdout.decode()[-2000:]
    dlq = found.group().decode()
    listing = _cli(["dlq", "list", dlq], env, work)
    summary = _cli(["dlq", "stats", dlq], env, work)
    replay = _cli(["dlq", "replay", dlq, "--dry-run"], env, work)
    assert listing.returncode == summary.returncode == replay.returncode == 0, (
        listing.stderr + summary.stderr + replay.stderr
    )
    for run in (demo, listing, summary, replay):
        assert not _leaks(run.stdout + run.stderr), (run.args, _leaks(run.stdout + run.stderr))
    assert not _files_leaking(work)


def test_the_chaos_runner_uses_the_client_properties_and_keeps_them_secret(
    kafka: KafkaCluster, tmp_path: Path
) -> None:
    """``chaos run --bootstrap`` against a cluster that needs TLS/SASL: its workers and load
    producer read ``KAFKA_CLIENT_PROPERTIES`` themselves (no secret on a command line), and
    none of the secrets reaches the output, the report or the workers' logs."""
    from resilient_kafka.toxiproxy import ToxiproxyServer

    env = _properties(tmp_path / "client.properties", kafka.bootstrap_servers)
    work = tmp_path / "work"
    work.mkdir()
    (work / "tiny.toml").write_text("name = 'tiny'\nduration = 2\npoison = 2\n")
    with ToxiproxyServer() as server:  # the runner wants proxies to act on; none is used here
        server.client().create_proxy("kafka", "127.0.0.1:0", kafka.bootstrap_servers)
        run = _cli(
            [
                "chaos", "run", "-f", "tiny.toml", "--messages", "40", "--keep",
                "--bootstrap", kafka.bootstrap_servers, "--toxiproxy-url", server.url,
                "--report", "report",
            ],
            env,
            work,
            timeout=240,
        )  # fmt: skip
    output = (run.stdout + run.stderr).decode()
    assert run.returncode == 0, output[-3000:]
    kept = re.search(r"logs and ledgers kept in (\S+)", output)
    assert kept, output[-2000:]
    logs = Path(kept.group(1))
    try:
        texts = {path.name: path.read_text() for path in logs.rglob("*.log")}
        # the properties reached the workers and the producer: librdkafka warns about the SASL
        # user under PLAINTEXT in each of their logs
        users = [name for name, text in texts.items() if "`sasl.username`" in text]
        assert len(users) == len(texts) >= 3, sorted(texts)
        assert not _leaks(output), _leaks(output)
        assert not _files_leaking(work)
        assert not _files_leaking(logs)
        assert (work / "report" / "report.json").exists()
    finally:
        shutil.rmtree(logs, ignore_errors=True)
