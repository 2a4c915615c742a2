"""The resilient-kafka command: broker in the foreground, the demo, clear errors."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from resilient_kafka import __version__
from resilient_kafka.cli import main
from resilient_kafka.demo import run_demo
from resilient_kafka.errors import MissingDependencyError
from resilient_kafka.testing import KafkaCluster
from resilient_kafka.testing._embedded import metadata_answered
from tests.helpers import pid_alive, wait_for

CLI = [sys.executable, "-m", "resilient_kafka.cli"]
_ENV = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}


def test_broker_command_serves_until_ctrl_c() -> None:
    proc = subprocess.Popen(
        [*CLI, "broker"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_ENV
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        match = re.fullmatch(r"bootstrap.servers=127\.0\.0\.1:(\d+)\n", first)
        assert match, first
        port = int(match.group(1))
        second = proc.stdout.readline()
        broker_pid = int(re.search(r"pid (\d+)", second).group(1))  # type: ignore[union-attr]
        assert metadata_answered("127.0.0.1", port)

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert "Stopping the broker." in proc.stdout.read()
        wait_for(lambda: not pid_alive(broker_pid), 10, "the broker to stop")
    finally:
        proc.kill()
        proc.wait()


def test_broker_command_on_a_busy_port_fails_clearly() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        done = subprocess.run(
            [*CLI, "broker", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            env=_ENV,
        )
    assert done.returncode == 1
    assert f"error: cannot start the embedded broker: port {port} on 127.0.0.1" in done.stderr


def test_demo_accounts_for_every_order_on_the_embedded_broker() -> None:
    done = subprocess.run(
        [*CLI, "demo", "--messages", "400", "--rate", "2000", "--delays", "0.2,0.4,0.6"],
        capture_output=True,
        text=True,
        timeout=180,
        env=_ENV,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "Using the embedded Tansu broker" in out
    assert re.search(r"produced \(acknowledged\)\s+│\s+400\b", out), out
    assert re.search(r"in the DLQ \(non_retryable\)\s+│\s+[1-9]", out), out
    assert re.search(r"in the DLQ \(exhausted\)\s+│\s+[1-9]", out), out
    assert re.search(r"retries from tier 3\s+│\s+[1-9]", out), out
    assert re.search(r"lost\s+│\s+0\b", out), out
    assert "OK: every order was paid or is in the DLQ; 0 lost." in out


def test_demo_against_an_external_cluster(kafka: KafkaCluster, capsys) -> None:
    args = ["demo", "--messages", "60", "--rate", "1000", "--delays", "0.1"]
    assert main([*args, "-b", kafka.bootstrap_servers]) == 0
    out = capsys.readouterr().out
    assert f"Using the cluster at {kafka.bootstrap_servers}" in out
    assert "0 lost" in out


def test_demo_rejects_bad_arguments(capsys) -> None:
    assert main(["demo", "--messages", "0"]) == 1
    assert "--messages and --rate must be positive" in capsys.readouterr().err
    assert main(["demo", "--delays", "1,soon"]) == 1
    assert "--delays takes seconds separated by commas" in capsys.readouterr().err
    assert main(["demo", "--outage", "soon"]) == 1
    assert "--outage takes START,DURATION" in capsys.readouterr().err


def test_demo_without_its_extra_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "rich.console", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'resilient-kafka\[demo\]'"):
        run_demo(messages=1)


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"resilient-kafka {__version__}"


def test_demo_counts_dead_letters_when_the_dlq_appears_late(
    kafka: KafkaCluster, monkeypatch
) -> None:
    """The consumer creates its DLQ in the background after subscribe(). The demo's DLQ reader
    must still see it: a subscription made before the topic existed is only rechecked at the
    next full metadata refresh (5 minutes by default), which left every dead-lettered order
    unaccounted for when the creation was slow (CI)."""
    from resilient_kafka import _topics
    from resilient_kafka.demo import OrderPipeline

    prepare = _topics.Topics._prepare

    def slow_prepare(self, topics):  # type: ignore[no-untyped-def]
        time.sleep(3.0)  # the reader subscribes well before the DLQ exists
        return prepare(self, topics)

    monkeypatch.setattr(_topics.Topics, "_prepare", slow_prepare)
    pipeline = OrderPipeline(kafka, messages=60, rate=1000, delays=(0.1,), outage=None)
    pipeline.start()
    try:
        wait_for(pipeline.settled, 60, "every order paid or dead-lettered")
    finally:
        pipeline.stop()
    assert pipeline.accounting.dead_lettered, "no order was dead-lettered: the test shows nothing"
