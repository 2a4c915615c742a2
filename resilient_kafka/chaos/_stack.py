"""Where a chaos run happens: an embedded broker behind a Toxiproxy-API proxy, or a real
cluster behind a real Toxiproxy. Every fault goes through the Toxiproxy HTTP API."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from resilient_kafka.errors import ConfigurationError
from resilient_kafka.toxiproxy import Toxiproxy, ToxiproxyError, ToxiproxyServer

log = logging.getLogger("resilient_kafka.chaos")

PROXY = "rk-chaos-kafka"


class Stack:
    """Bootstrap address, the Toxiproxy client and the proxies every client byte crosses."""

    def __init__(self) -> None:
        self.bootstrap = ""
        self.toxiproxy: Toxiproxy | None = None
        self.proxies: list[str] = []
        self.broker: Any = None  # EmbeddedKafka when embedded
        self._server: ToxiproxyServer | None = None

    @property
    def embedded(self) -> bool:
        return self.broker is not None

    @property
    def client(self) -> Toxiproxy:
        assert self.toxiproxy is not None
        return self.toxiproxy

    @classmethod
    def embedded_stack(
        cls, toxiproxy_url: str | None = None, seed: int | None = None, *, durable: bool = True
    ) -> Stack:
        """A Tansu broker advertising the proxy's address, and the proxy (this package's
        Toxiproxy-API server, or the one at ``toxiproxy_url``). ``durable``: storage in a local
        S3 server, which survives a broker kill; else in the broker's memory (much less CPU:
        the S3 server lists a prefix by scanning every object it holds)."""
        from resilient_kafka.testing._embedded import EmbeddedKafka, free_port

        stack = cls()
        try:
            if toxiproxy_url:
                stack.toxiproxy = Toxiproxy(toxiproxy_url)
            else:
                stack._server = ToxiproxyServer(seed=seed).start()
                stack.toxiproxy = stack._server.client()
            port = free_port()
            stack.broker = EmbeddedKafka(durable=durable, advertised_port=port).start()
            with contextlib.suppress(ToxiproxyError):  # left over from an interrupted run
                stack.client.delete_proxy(PROXY)
            stack.client.create_proxy(PROXY, f"127.0.0.1:{port}", stack.broker.listener)
            stack.proxies = [PROXY]
            stack.bootstrap = f"127.0.0.1:{port}"
        except BaseException:
            stack.close()
            raise
        return stack

    @classmethod
    def external_stack(cls, bootstrap: str, toxiproxy_url: str | None) -> Stack:
        """A real cluster whose advertised listeners are Toxiproxy proxies (see
        ``chaos/docker-compose.yml``); faults apply to every proxy the server has."""
        if not toxiproxy_url:
            raise ConfigurationError(
                "--bootstrap needs --toxiproxy-url (or TOXIPROXY_URL): faults are injected "
                "through the proxies in front of the brokers"
            )
        stack = cls()
        stack.bootstrap = bootstrap
        stack.toxiproxy = Toxiproxy(toxiproxy_url)
        stack.proxies = sorted(stack.client.proxies())
        if not stack.proxies:
            raise ConfigurationError(
                f"the Toxiproxy at {toxiproxy_url} has no proxies: create one per broker "
                "listener (chaos/docker-compose.yml does)"
            )
        return stack

    def set_enabled(self, enabled: bool) -> None:
        for name in self.proxies:
            self.client.update_proxy(name, enabled=enabled)

    def add_toxic(self, spec: dict[str, Any], name: str) -> None:
        for proxy in self.proxies:
            self.client.add_toxic(
                proxy,
                spec["type"],
                spec.get("attributes", {}),
                stream=spec.get("stream", "downstream"),
                toxicity=float(spec.get("toxicity", 1.0)),
                name=name,
            )

    def remove_toxic(self, name: str) -> None:
        for proxy in self.proxies:
            self.client.remove_toxic(proxy, name)

    def heal(self) -> None:
        """Every proxy enabled and free of toxics (between scenarios, after interruptions)."""
        for proxy in self.proxies:
            self.client.update_proxy(proxy, enabled=True)
            for toxic in self.client.toxics(proxy):
                self.client.remove_toxic(proxy, toxic.name)

    def kill_broker(self) -> None:
        self.broker.kill()

    def restart_broker(self) -> None:
        self.broker.restart()

    def close(self) -> None:
        if self.broker is not None:
            self.broker.stop()
        if self._server is not None:
            self._server.stop()
