"""Where a chaos run happens: an embedded broker behind a Toxiproxy-API proxy, a real cluster
behind a real Toxiproxy (network faults go through the Toxiproxy HTTP API), or librdkafka's
mock cluster of three brokers (protocol faults: leaders, brokers, error codes)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from resilient_kafka.errors import ConfigurationError
from resilient_kafka.toxiproxy import Toxiproxy, ToxiproxyError, ToxiproxyServer

log = logging.getLogger("resilient_kafka.chaos")

PROXY = "rk-chaos-kafka"


def client_config(bootstrap: str, external: bool) -> dict[str, Any]:
    """A chaos client's settings: against a real cluster, those of the file named by
    ``KAFKA_CLIENT_PROPERTIES`` (TLS, SASL) too. The workers and the load's producer read the
    file themselves (they inherit the environment), so no secret is put on a command line."""
    from resilient_kafka._config import extra_config_from_env

    return {**(extra_config_from_env() if external else {}), "bootstrap.servers": bootstrap}


class Stack:
    """Bootstrap address, the Toxiproxy client and the proxies every client byte crosses."""

    def __init__(self) -> None:
        self.bootstrap = ""
        self.toxiproxy: Toxiproxy | None = None
        self.proxies: list[str] = []
        self.broker: Any = None  # EmbeddedKafka when embedded
        self.cluster: Any = None  # MockCluster for protocol faults
        self._server: ToxiproxyServer | None = None
        self._errors_pushed: set[int] = set()  # api keys with queued errors (mock)
        self._leader_shift = 0  # leader-move: how far the leaders have moved round (mock)

    @property
    def embedded(self) -> bool:
        return self.broker is not None

    @property
    def external(self) -> bool:
        """A real cluster (``--bootstrap``): clients take ``KAFKA_CLIENT_PROPERTIES`` too."""
        return not self.embedded and not self.mock

    def client_config(self) -> dict[str, Any]:
        return client_config(self.bootstrap, self.external)

    @property
    def mock(self) -> bool:
        return self.cluster is not None

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
        ``chaos/docker-compose.yml``); faults apply to every proxy the server has. Clients
        take the settings of ``KAFKA_CLIENT_PROPERTIES`` (TLS, SASL) too."""
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

    @classmethod
    def mock_stack(cls, brokers: int = 3) -> Stack:
        """librdkafka's mock cluster (``brokers`` brokers on loopback ports, in this process);
        no proxy: its faults are its own (leaders, brokers, request errors)."""
        from resilient_kafka.testing.mock_cluster import MockCluster

        stack = cls()
        stack.cluster = MockCluster(brokers).start()
        stack.bootstrap = stack.cluster.bootstrap_servers
        return stack

    def create_topics(self, topics: dict[str, int]) -> None:
        """Create ``topics`` (name -> partitions); the mock cluster answers no CreateTopics, so
        there the retry tiers and the DLQ are made here too (the runner names them)."""
        if self.mock:
            self.cluster.create_topics(topics)
            return
        from confluent_kafka.admin import AdminClient

        from resilient_kafka import _admin

        admin = AdminClient({**self.client_config(), "log_level": 0})
        _admin.create_topics(admin, topics, where=self.bootstrap)

    def move_leaders(self, topics: dict[str, int]) -> None:
        """Every partition of ``topics`` gets the next broker as its leader (mock)."""
        self._leader_shift += 1
        count = self.cluster.broker_count
        for topic, partitions in topics.items():
            for partition in range(partitions):
                leader = (partition + self._leader_shift) % count + 1
                self.cluster.set_leader(topic, partition, leader)

    def broker_down(self, broker: int) -> None:
        self.cluster.broker_down(broker)

    def broker_up(self, broker: int) -> None:
        self.cluster.broker_up(broker)

    def push_request_errors(self, request: str, errors: tuple[str, ...]) -> None:
        """The next ``len(errors)`` requests of type ``request`` fail with these (mock)."""
        from confluent_kafka import KafkaError

        from resilient_kafka.testing.mock_cluster import ApiKey

        api_key = ApiKey[request]
        self._errors_pushed.add(api_key)
        self.cluster.push_request_errors(api_key, *(getattr(KafkaError, e) for e in errors))

    def clear_request_errors(self, request: str) -> None:
        from resilient_kafka.testing.mock_cluster import ApiKey

        self.cluster.clear_request_errors(ApiKey[request])

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
        """Every proxy enabled and free of toxics (between scenarios, after interruptions);
        on the mock cluster every broker up and no error left queued."""
        if self.mock:
            self.cluster.broker_up(-1)
            for api_key in self._errors_pushed:
                self.cluster.clear_request_errors(api_key)
            self._errors_pushed.clear()
        for proxy in self.proxies:
            self.client.update_proxy(proxy, enabled=True)
            for toxic in self.client.toxics(proxy):
                self.client.remove_toxic(proxy, toxic.name)

    def kill_broker(self) -> None:
        self.broker.kill()

    def restart_broker(self) -> None:
        self.broker.restart()

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
        if self.broker is not None:
            self.broker.stop()
        if self._server is not None:
            self._server.stop()
