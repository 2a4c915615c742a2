"""A local S3 server (moto) that gives the embedded broker storage surviving a broker kill."""

from __future__ import annotations

import importlib.util
import re
import sys
import time
import urllib.error
import urllib.request

from resilient_kafka.errors import BrokerStartError, MissingDependencyError
from resilient_kafka.testing._process import ManagedProcess

_LISTENING = re.compile(r"Running on http://([\d.]+):(\d+)")

# Dummy credentials: moto accepts anything, and the broker's S3 client insists on having some.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "resilient-kafka",
    "AWS_SECRET_ACCESS_KEY": "resilient-kafka",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


class S3Server:
    """``moto_server`` on a free loopback port, with one bucket created."""

    def __init__(self, bucket: str = "tansu", host: str = "127.0.0.1") -> None:
        for module in ("moto", "flask", "werkzeug"):
            if importlib.util.find_spec(module) is None:
                raise MissingDependencyError(
                    "EmbeddedKafka(durable=True) stores data in a local S3 server from "
                    f"'moto[server]', and {module!r} is not installed. "
                    "Install it with: pip install 'resilient-kafka[embedded]'"
                )
        self.bucket = bucket
        self.host = host
        self.port = 0
        self._process = ManagedProcess(
            "moto",
            [sys.executable, "-m", "moto.server", "-H", host, "-p", "0"],
        )

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def start(self, timeout: float = 60.0) -> None:
        self._process.start()
        deadline = time.monotonic() + timeout
        while True:
            match = _LISTENING.search(self._process.log_text())
            if match:
                self.port = int(match.group(2))
                break
            if not self._process.running() or time.monotonic() >= deadline:
                reason = (
                    f"exited with code {self._process.returncode}"
                    if not self._process.running()
                    else f"did not start listening within {timeout:.0f}s"
                )
                self._process.stop()
                raise BrokerStartError(
                    f"the S3 server (moto) {reason}; its log ends with:\n{self._process.log_tail()}"
                )
            time.sleep(0.05)
        self._create_bucket(deadline)

    def stop(self) -> None:
        self._process.stop()
        self._process.remove_log()

    def _create_bucket(self, deadline: float) -> None:
        request = urllib.request.Request(f"{self.endpoint}/{self.bucket}", method="PUT")
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5):
                    return
            except (urllib.error.URLError, ConnectionError) as exc:
                if time.monotonic() >= deadline:
                    self._process.stop()
                    raise BrokerStartError(
                        f"could not create bucket {self.bucket!r} on {self.endpoint}: {exc}"
                    ) from exc
                time.sleep(0.05)
