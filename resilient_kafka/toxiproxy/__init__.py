"""Toxiproxy for the chaos tests: a faithful server in Python and a client for any Toxiproxy.

``ToxiproxyServer`` runs an implementation of Toxiproxy 2.x's HTTP API and TCP proxying on an
event loop in a background thread, so tests and tools need no Go binary or container.
``Toxiproxy`` is a small ``urllib`` client that speaks the same API to this server or to a real
Toxiproxy (``TOXIPROXY_URL``), which is what lets the chaos suite run unchanged against either.

    with ToxiproxyServer() as server:
        toxiproxy = Toxiproxy(server.url)
        kafka = toxiproxy.create_proxy("kafka", "127.0.0.1:0", "127.0.0.1:9092")
        toxiproxy.add_toxic("kafka", "latency", {"latency": 100, "jitter": 10})
        ...  # clients connect to kafka.listen

See docs/toxiproxy.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http.client
import json
import os
import random
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from resilient_kafka.errors import ResilientKafkaError
from resilient_kafka.toxiproxy._proxy import ListenError
from resilient_kafka.toxiproxy._server import VERSION, ApiServer

__all__ = [
    "VERSION",
    "Proxy",
    "Toxic",
    "Toxiproxy",
    "ToxiproxyError",
    "ToxiproxyServer",
    "running_toxiproxy",
]

DEFAULT_URL = "http://127.0.0.1:8474"


class ToxiproxyError(ResilientKafkaError):
    """A Toxiproxy API call failed: ``status`` (``None`` if no HTTP answer) and the message.

    ``payload`` is the decoded error body when it was JSON (``/populate`` errors also carry the
    proxies created before the failure under ``"proxies"``).
    """

    def __init__(
        self, status: int | None, message: str, payload: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(f"HTTP {status}: {message}" if status is not None else message)
        self.status = status
        self.message = message
        self.payload = dict(payload) if payload is not None else None


@dataclass(frozen=True)
class Toxic:
    """A toxic as the API reports it."""

    name: str
    type: str
    stream: str
    toxicity: float
    attributes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Toxic:
        return cls(
            name=data["name"],
            type=data["type"],
            stream=data["stream"],
            toxicity=float(data["toxicity"]),
            attributes=dict(data.get("attributes") or {}),
        )


@dataclass(frozen=True)
class Proxy:
    """A proxy as the API reports it; ``listen`` is the bound address once it has started."""

    name: str
    listen: str
    upstream: str
    enabled: bool
    toxics: tuple[Toxic, ...] = ()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Proxy:
        return cls(
            name=data["name"],
            listen=data["listen"],
            upstream=data["upstream"],
            enabled=bool(data["enabled"]),
            toxics=tuple(Toxic.from_json(t) for t in data.get("toxics") or ()),
        )

    @property
    def host(self) -> str:
        """The listen host, without IPv6 brackets (a wildcard stays a wildcard)."""
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    @property
    def address(self) -> tuple[str, int]:
        """Where a client on this machine connects: wildcard listens (Go's ``[::]`` is
        dual-stack) map to 127.0.0.1."""
        host = self.host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        return host, self.port


class Toxiproxy:
    """A client for Toxiproxy's HTTP API; works against this package's server or a real one.

    ``url`` defaults to ``$TOXIPROXY_URL``, then ``http://127.0.0.1:8474``; a URL without a
    scheme gets ``http://`` (as Toxiproxy's Go client does). Updates use ``POST``, which every
    2.x server accepts (``PATCH`` exists only since 2.6).
    """

    def __init__(self, url: str | None = None, *, timeout: float = 30.0) -> None:
        url = url or os.environ.get("TOXIPROXY_URL") or DEFAULT_URL
        if "://" not in url:
            url = f"http://{url}"
        self.url = url.rstrip("/")
        self.timeout = timeout
        # Never route API calls through an HTTP proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        return f"Toxiproxy({self.url!r})"

    def _request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={
                "Content-Type": "application/json",
                "User-Agent": "resilient-kafka-toxiproxy",
            },
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            payload: Any = None
            with contextlib.suppress(ValueError):
                payload = json.loads(raw)
            if isinstance(payload, dict) and isinstance(payload.get("error"), str):
                message = payload["error"]
            else:
                payload = None
                message = raw.decode("utf-8", errors="replace").strip() or str(exc.reason)
            raise ToxiproxyError(exc.code, message, payload) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise ToxiproxyError(None, f"cannot reach Toxiproxy at {self.url}: {reason}") from None

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        _, raw = self._request(method, path, body)
        return json.loads(raw)

    @staticmethod
    def _quote(name: str) -> str:
        return urllib.parse.quote(name, safe="")

    # Server.

    def version(self) -> str:
        """The server's version (``/version`` is JSON since 2.6, a bare string before)."""
        _, raw = self._request("GET", "/version")
        text = raw.decode().strip()
        try:
            return str(json.loads(text)["version"])
        except (ValueError, KeyError, TypeError):
            try:  # 2.6.0 sent a literal backslash-n
                return str(json.loads(text.replace("\\n", ""))["version"])
            except (ValueError, KeyError, TypeError):
                return text

    def reset(self) -> None:
        """Enable every proxy and remove every toxic."""
        self._request("POST", "/reset")

    # Proxies.

    def proxies(self) -> dict[str, Proxy]:
        data = self._json("GET", "/proxies")
        return {name: Proxy.from_json(value) for name, value in data.items()}

    def get_proxy(self, name: str) -> Proxy:
        return Proxy.from_json(self._json("GET", f"/proxies/{self._quote(name)}"))

    def create_proxy(self, name: str, listen: str, upstream: str, enabled: bool = True) -> Proxy:
        """Create a proxy; ask for ``"127.0.0.1:0"`` and read the port back from ``listen``."""
        body = {"name": name, "listen": listen, "upstream": upstream, "enabled": enabled}
        return Proxy.from_json(self._json("POST", "/proxies", body))

    def update_proxy(self, name: str, **fields: Any) -> Proxy:
        """Change ``listen``, ``upstream`` and/or ``enabled`` (a new address drops connections)."""
        return Proxy.from_json(self._json("POST", f"/proxies/{self._quote(name)}", fields))

    def enable_proxy(self, name: str) -> Proxy:
        return self.update_proxy(name, enabled=True)

    def disable_proxy(self, name: str) -> Proxy:
        """Refuse new connections and close the live ones; toxics are kept."""
        return self.update_proxy(name, enabled=False)

    def delete_proxy(self, name: str) -> None:
        self._request("DELETE", f"/proxies/{self._quote(name)}")

    def populate(self, proxies: Iterable[Mapping[str, Any]]) -> list[Proxy]:
        """Create or replace proxies in bulk; identical existing ones are kept as they are."""
        data = self._json("POST", "/populate", [dict(p) for p in proxies])
        return [Proxy.from_json(p) for p in data.get("proxies") or ()]

    # Toxics.

    def toxics(self, proxy: str) -> list[Toxic]:
        data = self._json("GET", f"/proxies/{self._quote(proxy)}/toxics")
        return [Toxic.from_json(t) for t in data]

    def get_toxic(self, proxy: str, name: str) -> Toxic:
        path = f"/proxies/{self._quote(proxy)}/toxics/{self._quote(name)}"
        return Toxic.from_json(self._json("GET", path))

    def add_toxic(
        self,
        proxy: str,
        type: str,
        attributes: Mapping[str, Any] | None = None,
        stream: str = "downstream",
        toxicity: float = 1.0,
        name: str | None = None,
    ) -> Toxic:
        """Add a toxic; ``name`` defaults to ``<type>_<stream>`` (unique per proxy)."""
        body = {
            "name": name or "",  # the server names it <type>_<stream>
            "type": type,
            "stream": stream,
            "toxicity": toxicity,
            "attributes": dict(attributes or {}),
        }
        return Toxic.from_json(self._json("POST", f"/proxies/{self._quote(proxy)}/toxics", body))

    def update_toxic(
        self,
        proxy: str,
        name: str,
        attributes: Mapping[str, Any] | None = None,
        toxicity: float | None = None,
    ) -> Toxic:
        """Change some attributes and/or the toxicity; the others keep their values."""
        body: dict[str, Any] = {"attributes": dict(attributes or {})}
        if toxicity is not None:
            body["toxicity"] = toxicity
        path = f"/proxies/{self._quote(proxy)}/toxics/{self._quote(name)}"
        return Toxic.from_json(self._json("POST", path, body))

    def remove_toxic(self, proxy: str, name: str) -> None:
        self._request("DELETE", f"/proxies/{self._quote(proxy)}/toxics/{self._quote(name)}")


@contextlib.contextmanager
def running_toxiproxy(url: str | None = None) -> Iterator[Toxiproxy]:
    """A client for the Toxiproxy at ``url`` or ``$TOXIPROXY_URL``; without either, for a
    ``ToxiproxyServer`` started here and stopped on exit. The chaos suite's entry point."""
    url = url or os.environ.get("TOXIPROXY_URL")
    if url:
        yield Toxiproxy(url)
        return
    with ToxiproxyServer() as server:
        yield server.client()


class ToxiproxyServer:
    """Toxiproxy's API and proxies on an event loop in a daemon thread.

    Binds ``host:port`` (port 0: a free one; read ``url``). Use as a context manager, or
    ``start()``/``stop()``; ``serve_forever()`` blocks until ``shutdown()`` (for the CLI).
    ``seed`` makes jitter, slicing and toxicity draws reproducible (Toxiproxy's ``-seed``).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, seed: int | None = None) -> None:
        self.host = host
        self.requested_port = port
        self.seed = seed
        self.port = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._stopped = threading.Event()
        self._stop_requested = threading.Event()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"ToxiproxyServer({self.host!r}, port={self.port or self.requested_port}, {state})"

    @property
    def url(self) -> str:
        """The API's base URL (wildcard hosts are reached through loopback)."""
        if not self.port:
            raise RuntimeError("the Toxiproxy server is not started")
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopped.is_set()

    def client(self) -> Toxiproxy:
        return Toxiproxy(self.url)

    def start(self) -> ToxiproxyServer:
        """Start the thread and wait until the API listens; ``ToxiproxyError`` if it cannot."""
        with self._lock:
            if self._thread is not None:
                return self
            ready: concurrent.futures.Future[int] = concurrent.futures.Future()
            self._stopped.clear()
            self._stop_requested.clear()
            thread = threading.Thread(
                target=self._run, args=(ready,), name="toxiproxy-server", daemon=True
            )
            self._thread = thread
            thread.start()
        try:
            self.port = ready.result(timeout=30)
        except BaseException:
            self.shutdown()
            thread.join(timeout=30)
            self._thread = None
            raise
        return self

    def _run(self, ready: concurrent.futures.Future[int]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main(ready))
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())  # getaddrinfo's
            finally:
                loop.close()
                self._stopped.set()

    async def _main(self, ready: concurrent.futures.Future[int]) -> None:
        self._stop_event = asyncio.Event()
        rng = random.Random(self.seed)
        api = ApiServer(rng)
        try:
            address = await api.start(self.host, self.requested_port)
        except ListenError as exc:
            ready.set_exception(ToxiproxyError(None, f"cannot start the Toxiproxy API: {exc}"))
            return
        except BaseException as exc:
            ready.set_exception(exc)
            raise
        ready.set_result(int(address.rsplit(":", 1)[1]))
        if self._stop_requested.is_set():  # shutdown() came before the loop was ready
            self._stop_event.set()
        try:
            await self._stop_event.wait()
        finally:
            await api.close()

    def shutdown(self) -> None:
        """Ask the server to stop without waiting; safe from a signal handler."""
        self._stop_requested.set()
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                loop.call_soon_threadsafe(event.set)

    def stop(self) -> None:
        """Stop the API and every proxy (live connections are closed); idempotent."""
        thread = self._thread
        if thread is None:
            return
        self.shutdown()
        thread.join(timeout=30)
        with self._lock:
            self._thread = None
            self._loop = None

    def serve_forever(self) -> None:
        """Start if needed and block until ``shutdown()`` or ``stop()``; then clean up."""
        self.start()
        try:
            while not self._stopped.wait(0.5):
                pass
        finally:
            self.stop()

    def __enter__(self) -> ToxiproxyServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
