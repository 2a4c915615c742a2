"""Proxies: a listener, and for each client two links through the toxic chains.

Mirrors Toxiproxy's ``proxy.go``, ``link.go`` and ``toxic_collection.go``. A proxy accepts a
client first and only then dials the upstream (a refused dial closes the client: connect, then
EOF). Each connection gets an *upstream* link (client to server) and a *downstream* link (server
to client); a link is ``read -> hidden noop -> toxics... -> write``. Toxic changes are pushed
into every live link. An end of stream is passed on as a full close, so one FIN ends the whole
proxied connection, as in Toxiproxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from resilient_kafka.toxiproxy._toxics import (
    CHUNK_SIZE,
    DOWNSTREAM,
    NOOP,
    UPSTREAM,
    Channel,
    Chunk,
    ResetPeerToxic,
    Stub,
    ToxicSpec,
)

log = logging.getLogger("resilient_kafka.toxiproxy")

_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


class AddressError(Exception):
    """An address Go's ``net`` package would reject; the text is Go's."""


class ListenError(Exception):
    """A proxy could not listen; the API answers 500 with this text (Go's error string)."""


class AlreadyStartedError(Exception):
    """``start()`` on a running proxy (Toxiproxy's ``ErrProxyAlreadyStarted``)."""


# --- addresses -----------------------------------------------------------------------------


def split_host_port(address: str) -> tuple[str, str]:
    """Go's ``net.SplitHostPort``: ``host:port`` or ``[host]:port``, with Go's error texts."""
    if address.startswith("["):
        end = address.find("]")
        if end < 0:
            raise AddressError(f"address {address}: missing ']' in address")
        host, rest = address[1:end], address[end + 1 :]
        if not rest:
            raise AddressError(f"address {address}: missing port in address")
        if not rest.startswith(":"):
            raise AddressError(f"address {address}: unexpected ']' in address")
        return host, rest[1:]
    colon = address.rfind(":")
    if colon < 0:
        raise AddressError(f"address {address}: missing port in address")
    host, port = address[:colon], address[colon + 1 :]
    if ":" in host:
        raise AddressError(f"address {address}: too many colons in address")
    return host, port


def _parse_port(port: str) -> int:
    if port == "":
        return 0
    if port.isascii() and port.isdigit():
        number = int(port)
        if number > 65535:
            raise AddressError(f"address {port}: invalid port")
        return number
    try:
        return socket.getservbyname(port, "tcp")
    except OSError:
        raise AddressError(f"lookup tcp/{port}: unknown port") from None


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM):
            return True
    except OSError:
        return False


def format_address(sockaddr: tuple[Any, ...]) -> str:
    """``ip:port``, or ``[ip]:port`` for IPv6, as Go's ``Addr.String()`` prints it."""
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve_listen(address: str) -> tuple[int, tuple[Any, ...], bool]:
    """Where ``net.Listen("tcp", address)`` would bind: ``(family, sockaddr, dual_stack)``.

    Empty and unspecified hosts listen on every interface, dual-stack when IPv6 exists (Go then
    reports ``[::]:PORT``); a name resolves to its first IPv4 address if it has one, so
    ``localhost:P`` becomes ``127.0.0.1:P``.
    """
    host, port_text = ("", "0") if address == "" else split_host_port(address)
    port = _parse_port(port_text)
    if host in _WILDCARD_HOSTS:
        if _ipv6_available():
            return socket.AF_INET6, ("::", port), True
        return socket.AF_INET, ("0.0.0.0", port), False
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    else:
        if ip.version == 6:
            return socket.AF_INET6, (host, port, 0, 0), False
        return socket.AF_INET, (host, port), False
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        raise AddressError(f"lookup {host}: no such host") from None
    if not infos:
        raise AddressError(f"lookup {host}: no such host")
    family, _, _, _, sockaddr = next(
        (info for info in infos if info[0] == socket.AF_INET), infos[0]
    )
    return family, sockaddr, False


async def canonical_listen(address: str) -> str:
    """The address a listen would report, for comparing ``localhost:P`` with ``127.0.0.1:P``."""
    _, sockaddr, _ = await resolve_listen(address)
    return format_address(sockaddr)


async def listen_socket(address: str) -> tuple[socket.socket, str]:
    """A bound, listening, non-blocking socket for ``address`` and its resolved ``ip:port``."""
    try:
        family, sockaddr, dual_stack = await resolve_listen(address)
    except AddressError as exc:
        raise ListenError(f"listen tcp: {exc}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Go does on listeners
        if dual_stack:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        reason = reason[:1].lower() + reason[1:]  # Go's syscall errors are lower case
        raise ListenError(f"listen tcp {format_address(sockaddr)}: bind: {reason}") from None
    return sock, format_address(sock.getsockname())


async def dial(upstream: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``net.Dial("tcp", upstream)``: the upstream string is resolved on every connection."""
    host, port_text = split_host_port(upstream)
    port = _parse_port(port_text)
    if host in _WILDCARD_HOSTS:
        host = "localhost"  # Go dials the local system for an empty or unspecified host
    return await asyncio.open_connection(host, port)


def _tune(writer: asyncio.StreamWriter, linger_zero: bool) -> None:
    """Go's TCP defaults (no-delay, 15 s keep-alive), and ``SO_LINGER=0`` for ``reset_peer``."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 15)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 15)
    if linger_zero:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # Go writes straight to the kernel; so a write here is done once the kernel has it all.
    writer.transport.set_write_buffer_limits(high=0)


def _close_transport(writer: asyncio.StreamWriter) -> None:
    """Close now: a buffer the peer is not reading must not keep the socket open."""
    transport = writer.transport
    if transport.is_closing():
        return
    if transport.get_write_buffer_size():
        transport.abort()
    else:
        transport.close()


# --- links ---------------------------------------------------------------------------------


class Link:
    """One direction of one connection: socket reader, stubs (hidden noop first), writer."""

    def __init__(
        self,
        collection: ToxicCollection,
        direction: str,
        source: asyncio.StreamReader,
        dest: asyncio.StreamWriter,
        rng: random.Random,
        on_done: Callable[[Link], None],
    ) -> None:
        self.collection = collection
        self.direction = direction
        self.source = source
        self.dest = dest
        self.rng = rng
        self.on_done = on_done
        self.dead = False
        specs: list[ToxicSpec | None] = [None, *collection.chains[direction]]
        self.input: Channel[Chunk | None] = Channel(1)
        self.stubs: list[Stub] = []
        current = self.input
        for index, spec in enumerate(specs):
            after = specs[index + 1] if index + 1 < len(specs) else None
            following: Channel[Chunk | None] = Channel(after.toxic.buffer_size if after else 0)
            stub = Stub(current, following, spec)
            if spec is not None:
                stub.state = spec.toxic.new_state()
            self.stubs.append(stub)
            current = following
        self.output = current
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        collection.links[direction].add(self)

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read())
        for stub in self.stubs:
            self._run(stub)
        self._writer = asyncio.create_task(self._write())

    def teardown(self, *, include_writer: bool) -> None:
        """Stop every task of this link and forget it; toxic changes no longer reach it."""
        self.dead = True
        self.collection.links[self.direction].discard(self)
        tasks = [self._reader, *(stub.task for stub in self.stubs)]
        if include_writer:
            tasks.append(self._writer)
        for stub in self.stubs:
            stub.dead = True
        for task in tasks:
            if task is not None and not task.done():
                task.cancel()

    # The two ends.

    async def _read(self) -> None:
        try:
            while True:
                data = await self.source.read(CHUNK_SIZE)
                if not data:
                    break
                await self.input.put(Chunk(data, time.monotonic()))
        except OSError:
            pass
        self.input.force_put(None)

    async def _write(self) -> None:
        try:
            while True:
                chunk = await self.output.get()
                if chunk is None:
                    break
                if chunk.data:
                    self.dest.write(chunk.data)
                    await self.dest.drain()
        except OSError:
            pass
        _close_transport(self.dest)  # a full close, as Go's dest.Close()
        self.on_done(self)

    # The stubs.

    def _run(self, stub: Stub) -> None:
        if self.dead or stub.closed:
            return
        stub.task = asyncio.create_task(self._pipe(stub))

    async def _pipe(self, stub: Stub) -> None:
        toxic = stub.spec.choose(self.rng) if stub.spec is not None else NOOP
        try:
            await toxic.pipe(stub, self.rng)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("toxic %s failed; closing its stream", toxic.type_name)
            stub.close()

    async def _interrupt(self, stub: Stub) -> bool:
        """Stop the stub's toxic and flush what it held; False if its stream has ended."""
        if stub.closed:
            return False
        task, stub.task = stub.task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})
        stub.flush()
        return not stub.closed and not self.dead

    def _find(self, spec: ToxicSpec) -> int | None:
        for index, stub in enumerate(self.stubs):
            if stub.spec is spec:
                return index
        return None

    async def add_toxic(self, spec: ToxicSpec) -> None:
        last = self.stubs[-1]
        stub = Stub(Channel(spec.toxic.buffer_size), last.output, spec)
        stub.state = spec.toxic.new_state()
        self.stubs.append(stub)
        if await self._interrupt(last):
            last.output = stub.input
            self._run(stub)
            self._run(last)
        else:  # the stream already ended; the new stub stays inert, as in Go
            stub.closed = True

    async def update_toxic(self, spec: ToxicSpec) -> None:
        index = self._find(spec)
        if index is not None and await self._interrupt(self.stubs[index]):
            self._run(self.stubs[index])

    async def remove_toxic(self, spec: ToxicSpec) -> None:
        index = self._find(spec)
        if index is None:
            return
        stub = self.stubs[index]
        if not await self._interrupt(stub):
            return
        if spec.toxic.closes_on_removal:
            stub.close()
            return
        previous = self.stubs[index - 1]
        await self._interrupt(previous)  # its held data lands in stub.input, after the rest
        for item in stub.input.take_all():
            stub.output.force_put(item)
        if stub.input_eof:
            stub.output.force_put(None)
        previous.output = stub.output
        self.stubs.remove(stub)
        self._run(previous)


class Connection:
    """A proxied client: its two sockets and the two links between them."""

    def __init__(
        self,
        proxy: Proxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.client_writer = client[1]
        self.upstream_writer = upstream[1]
        collection = proxy.toxics
        # Toxiproxy sets SO_LINGER=0 on both sockets when a reset_peer toxic exists at start.
        linger_zero = any(
            isinstance(spec.toxic, ResetPeerToxic)
            for chain in collection.chains.values()
            for spec in chain
        )
        _tune(self.client_writer, linger_zero)
        _tune(self.upstream_writer, linger_zero)
        self.links = [
            Link(collection, UPSTREAM, client[0], upstream[1], proxy.rng, self._link_done),
            Link(collection, DOWNSTREAM, upstream[0], client[1], proxy.rng, self._link_done),
        ]
        self._done: set[Link] = set()

    def start(self) -> None:
        for link in self.links:
            link.start()

    def _link_done(self, link: Link) -> None:
        link.teardown(include_writer=False)
        self._done.add(link)
        if len(self._done) == len(self.links):
            self.proxy.connections.discard(self)

    def close(self) -> None:
        """Drop the connection: both sockets closed now, every task stopped."""
        for link in self.links:
            link.teardown(include_writer=True)
        _close_transport(self.client_writer)
        _close_transport(self.upstream_writer)
        self.proxy.connections.discard(self)


class ToxicCollection:
    """A proxy's toxics per direction, in order, and the live links they must reach."""

    def __init__(self) -> None:
        self.chains: dict[str, list[ToxicSpec]] = {UPSTREAM: [], DOWNSTREAM: []}
        self.links: dict[str, set[Link]] = {UPSTREAM: set(), DOWNSTREAM: set()}

    def find(self, name: str) -> ToxicSpec | None:
        return next((spec for spec in self.all() if spec.name == name), None)

    def all(self) -> list[ToxicSpec]:
        """Upstream toxics first, then downstream, each in insertion order (as the API lists)."""
        return [*self.chains[UPSTREAM], *self.chains[DOWNSTREAM]]

    async def _each_link(self, direction: str, change: Callable[[Link], Awaitable[None]]) -> None:
        # Snapshot now: links created from here on already see the new chain.
        results = await asyncio.gather(
            *(change(link) for link in list(self.links[direction])), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("changing a toxic on a live connection failed", exc_info=result)

    async def add(self, spec: ToxicSpec) -> None:
        self.chains[spec.direction].append(spec)
        await self._each_link(spec.direction, lambda link: link.add_toxic(spec))

    async def update(self, spec: ToxicSpec, toxic: Any, toxicity: float) -> None:
        spec.toxic = toxic
        spec.toxicity = toxicity
        await self._each_link(spec.direction, lambda link: link.update_toxic(spec))

    async def remove(self, spec: ToxicSpec) -> None:
        self.chains[spec.direction].remove(spec)
        await self._each_link(spec.direction, lambda link: link.remove_toxic(spec))

    async def reset(self) -> None:
        for direction in (UPSTREAM, DOWNSTREAM):
            while self.chains[direction]:
                await self.remove(self.chains[direction][0])


class Proxy:
    """A named proxy: ``listen`` (rewritten to the bound address once started), ``upstream``."""

    def __init__(self, name: str, listen: str, upstream: str, rng: random.Random) -> None:
        self.name = name
        self.listen = listen
        self.upstream = upstream
        self.enabled = False
        self.rng = rng
        self.toxics = ToxicCollection()
        self.connections: set[Connection] = set()
        self._server: asyncio.Server | None = None
        self._handshakes: set[asyncio.Task[Any]] = set()
        self._dial_lock = asyncio.Lock()  # Go accepts and dials in one loop, one at a time
        self._generation = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "listen": self.listen,
            "upstream": self.upstream,
            "enabled": self.enabled,
        }

    async def start(self) -> None:
        if self.enabled:
            raise AlreadyStartedError(self.name)
        sock, resolved = await listen_socket(self.listen)
        try:
            self._server = await asyncio.start_server(self._accept, sock=sock)
        except BaseException:
            sock.close()
            raise
        self.listen = resolved
        self.enabled = True

    async def stop(self) -> None:
        """Close the listener and every live connection (both sockets); toxics are kept."""
        if not self.enabled:
            return
        self.enabled = False
        self._generation += 1
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._handshakes):
            task.cancel()
        for connection in list(self.connections):
            connection.close()

    async def differs(self, listen: str, upstream: str) -> bool:
        """Whether ``listen``/``upstream`` would need a restart (resolved listens compared)."""
        if upstream != self.upstream:
            return True
        if listen == self.listen:
            return False
        return await canonical_listen(listen) != await canonical_listen(self.listen)

    async def update(self, listen: str, upstream: str, enabled: bool) -> None:
        """Toxiproxy's ``Proxy.Update``: restart on a new address, then reconcile ``enabled``."""
        try:
            restart = await self.differs(listen, upstream)
        except AddressError:
            restart = True  # the start below reports the bad address
        if restart:
            await self.stop()
            self.listen = listen
            self.upstream = upstream
        if enabled != self.enabled:
            if enabled:
                await self.start()
            else:
                await self.stop()

    async def _accept(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handshakes.add(task)
        generation = self._generation
        try:
            async with self._dial_lock:
                upstream = await dial(self.upstream)
        except (OSError, AddressError, ValueError) as exc:
            log.info("proxy %s: cannot reach upstream %s: %s", self.name, self.upstream, exc)
            _close_transport(client_writer)  # the client sees connect, then EOF
            return
        except asyncio.CancelledError:  # the proxy stopped while dialling
            _close_transport(client_writer)
            raise
        finally:
            if task is not None:
                self._handshakes.discard(task)
        if generation != self._generation:  # stopped (and maybe restarted) meanwhile
            _close_transport(client_writer)
            _close_transport(upstream[1])
            return
        connection = Connection(self, (client_reader, client_writer), upstream)
        self.connections.add(connection)
        connection.start()
