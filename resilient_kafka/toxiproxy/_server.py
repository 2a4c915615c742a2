"""Toxiproxy's v2 HTTP API on asyncio: routes, status codes, JSON and errors as ``api.go`` has them.

The details clients and tests rely on are reproduced rather than approximated: gorilla/mux
routing (404 ``404 page not found``, 405 with an empty body, 301 to the cleaned path), the
middleware that only runs on matched routes (``X-Toxiproxy-Request-Id``, 403 for browsers, the
25 s handler timeout), Go ``encoding/json`` decoding (unknown keys ignored, ``null`` keeps the
default, case-insensitive keys, type errors are 400) and encoding (map keys sorted, float32
toxicity, HTML-safe escapes), and ``http.Error``'s ``text/plain`` error bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import email.utils
import http
import json
import logging
import os
import posixpath
import random
import re
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from resilient_kafka.toxiproxy._proxy import (
    AddressError,
    AlreadyStartedError,
    ListenError,
    Proxy,
    listen_socket,
)
from resilient_kafka.toxiproxy._toxics import DOWNSTREAM, TOXICS, UPSTREAM, Toxic, ToxicSpec

log = logging.getLogger("resilient_kafka.toxiproxy")

#: The Toxiproxy release whose API and behaviour this server reproduces.
VERSION = "2.12.0"

HANDLER_TIMEOUT = 25.0  # http.TimeoutHandler in api.go
READ_TIMEOUT = 15.0  # http.Server.ReadTimeout
IDLE_TIMEOUT = 60.0  # http.Server.IdleTimeout
MAX_HEADER_BYTES = (1 << 20) + 4096  # http.DefaultMaxHeaderBytes plus Go's slack
MAX_BODY_BYTES = 64 << 20  # not a Go limit: a guard against absurd bodies

_TIMEOUT_BODY = b"<html><head><title>Timeout</title></head><body><h1>Timeout</h1></body></html>"


class ApiError(Exception):
    """An error answer: ``{"error": message, "status": status}`` (Toxiproxy's ``ApiError``)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def joined(self, detail: str) -> ApiError:
        return ApiError(f"{self.message}: {detail}", self.status)


ERR_BAD_REQUEST_BODY = ApiError("bad request body", 400)
ERR_MISSING_FIELD = ApiError("missing required field", 400)
ERR_PROXY_NOT_FOUND = ApiError("proxy not found", 404)
ERR_PROXY_EXISTS = ApiError("proxy already exists", 409)
ERR_INVALID_STREAM = ApiError("stream was invalid, can be either upstream or downstream", 400)
ERR_INVALID_TOXIC_TYPE = ApiError("invalid toxic type", 400)
ERR_TOXIC_EXISTS = ApiError("toxic already exists", 409)
ERR_TOXIC_NOT_FOUND = ApiError("toxic not found", 404)


# --- Go encoding/json, the parts the API uses ------------------------------------------------


class GoJSONError(Exception):
    """A decoding error, worded like Go's ``encoding/json``."""


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def _go_char(char: str) -> str:
    if char == "'":
        return "'\\''"
    if char == '"':
        return "'\"'"
    return "'" + json.dumps(char)[1:-1] + "'"


#: Python's JSON syntax errors, as the context Go's ``SyntaxError`` names.
_GO_SYNTAX_CONTEXT = {
    "Expecting value": "looking for beginning of value",
    "Expecting ':' delimiter": "after object key",
    "Expecting ',' delimiter": "after object key:value pair",
    "Expecting property name enclosed in double quotes": (
        "looking for beginning of object key string"
    ),
}


def decode_json(body: bytes) -> Any:
    """The first JSON value in ``body``, as ``json.NewDecoder(body).Decode`` reads it.

    Trailing data after the value is ignored, as Go's decoder does; an empty body is ``EOF``.
    """
    text = body.decode("utf-8", errors="replace")
    stripped = text.lstrip(" \t\r\n")
    if not stripped:
        raise GoJSONError("EOF")
    decoder = json.JSONDecoder(parse_constant=_reject_constant, strict=True)
    try:
        value, _ = decoder.raw_decode(stripped)
    except json.JSONDecodeError as exc:
        if exc.pos >= len(stripped.rstrip(" \t\r\n")):
            raise GoJSONError("unexpected EOF") from None
        char = _go_char(stripped[exc.pos])
        context = _GO_SYNTAX_CONTEXT.get(
            exc.msg, "in string literal" if "control character" in exc.msg else "in value"
        )
        raise GoJSONError(f"invalid character {char} {context}") from None
    except ValueError:  # NaN, Infinity
        raise GoJSONError("invalid character 'N' looking for beginning of value") from None
    return value


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


_INT_RANGES = {"int64": (-(1 << 63), (1 << 63) - 1), "int": (-(1 << 63), (1 << 63) - 1)}
_FLOAT32_MAX = 3.4028234663852886e38


def _sanitize(text: str) -> str:
    """Go decodes a lone surrogate escape to U+FFFD; Python keeps it, and it cannot be encoded."""
    return re.sub("[\ud800-\udfff]", "\ufffd", text)


def _convert(value: Any, kind: str, where: str) -> Any:
    """``value`` as Go type ``kind``, or Go's ``UnmarshalTypeError`` text."""
    mismatch = f"json: cannot unmarshal {_json_kind(value)} into Go {where} of type {kind}"
    if kind == "string":
        if not isinstance(value, str):
            raise GoJSONError(mismatch)
        return _sanitize(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise GoJSONError(mismatch)
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise GoJSONError(mismatch)
    if kind == "float32":
        if abs(value) > _FLOAT32_MAX:
            raise GoJSONError(
                f"json: cannot unmarshal number {value} into Go {where} of type {kind}"
            )
        return _f32(float(value))
    low, high = _INT_RANGES[kind]
    if isinstance(value, float) or not low <= value <= high:
        raise GoJSONError(f"json: cannot unmarshal number {value} into Go {where} of type {kind}")
    return value


def decode_struct(
    value: Any, fields: dict[str, str], go_type: str, into: dict[str, Any]
) -> dict[str, Any]:
    """Decode a JSON object onto ``into`` (the defaults) as Go decodes into a struct.

    Keys match field names exactly or case-insensitively; unknown keys are ignored; ``null``
    leaves a field as it was; ``"object"`` fields are returned raw for a second pass.
    """
    if value is None:
        return into
    if not isinstance(value, dict):
        raise GoJSONError(
            f"json: cannot unmarshal {_json_kind(value)} into Go value of type {go_type}"
        )
    lowered = {name.lower(): name for name in fields}
    struct_name = go_type.rsplit(".", 1)[-1]
    for key, item in value.items():
        name = key if key in fields else lowered.get(key.lower())
        if name is None or item is None:
            continue
        kind = fields[name]
        if kind == "object":
            if not isinstance(item, dict):
                raise GoJSONError(
                    f"json: cannot unmarshal {_json_kind(item)} into Go struct field "
                    f"{struct_name}.{name} of type toxics.NoopToxic"
                )
            into[name] = item
        else:
            into[name] = _convert(item, kind, f"struct field {struct_name}.{name}")
    return into


def decode_attributes(toxic: Toxic, raw: Any) -> None:
    """The second pass of ``AddToxicJson``: ``attributes`` into the toxic's own struct."""
    if raw is None:
        return
    if not isinstance(raw, dict):
        raise GoJSONError(
            f"json: cannot unmarshal {_json_kind(raw)} into Go struct field "
            f"ToxicWrapper.attributes of type toxics.{toxic.go_name}"
        )
    kinds = dict(toxic.fields)
    values = decode_struct(raw, kinds, f"toxics.{toxic.go_name}", dict(toxic.values))
    toxic.values = {name: values[name] for name in kinds}


def _f32(value: float) -> float:
    return float(struct.unpack("f", struct.pack("f", value))[0])


_F32_1E_6 = _f32(1e-6)  # Go compares in float32
_F32_1E21 = _f32(1e21)


def _float32_text(value: float) -> str:
    """A float32 as Go's encoder writes it: shortest round-trip digits, 'e' only if tiny/huge."""
    packed = struct.pack("f", value)
    for digits in range(1, 10):
        text = f"{value:.{digits}g}"
        if struct.pack("f", float(text)) == packed:
            break
    number = decimal.Decimal(text)
    magnitude = abs(value)
    if magnitude != 0 and (magnitude < _F32_1E_6 or magnitude >= _F32_1E21):
        out = f"{number:e}"
        mantissa, exponent = out.split("e")
        sign = exponent[0] if exponent[0] in "+-" else "+"
        digits_text = exponent.lstrip("+-")
        if sign == "+" and len(digits_text) < 2:
            digits_text = digits_text.rjust(2, "0")
        return f"{mantissa}e{sign}{digits_text}"
    return f"{number:f}"


class _Float32(float):
    """Marks a float32 for ``encode_json``."""


def _go_string(text: str) -> str:
    quoted = json.dumps(text, ensure_ascii=False)
    for char, escape in _HTML_ESCAPES:
        quoted = quoted.replace(char, escape)
    return quoted


_HTML_ESCAPES = (
    ("<", "\\u003c"),
    (">", "\\u003e"),
    ("&", "\\u0026"),
    ("\u2028", "\\u2028"),
    ("\u2029", "\\u2029"),
)


def _encode(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, _Float32):
        return _float32_text(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _go_string(value)
    if isinstance(value, list):
        return "[" + ",".join(_encode(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{_go_string(k)}:{_encode(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot encode {type(value).__name__}")


def encode_json(value: Any) -> bytes:
    """Go ``json.Marshal`` output: compact, ``<>&`` and U+2028/9 escaped, float32 digits.

    Dicts keep their order (Go structs); callers sort the keys of what Go holds as a map.
    """
    return _encode(value).encode("utf-8")


# --- JSON shapes --------------------------------------------------------------------------------


def toxic_json(spec: ToxicSpec) -> dict[str, Any]:
    return {
        "attributes": spec.toxic.attributes(),
        "name": spec.name,
        "type": spec.type,
        "stream": spec.stream,
        "toxicity": _Float32(spec.toxicity),
    }


def proxy_json(proxy: Proxy) -> dict[str, Any]:
    return {**proxy.to_json(), "toxics": [toxic_json(spec) for spec in proxy.toxics.all()]}


_PROXY_FIELDS = {"name": "string", "listen": "string", "upstream": "string", "enabled": "bool"}
_TOXIC_FIELDS = {
    "attributes": "object",
    "name": "string",
    "type": "string",
    "stream": "string",
    "toxicity": "float32",
}
_TOXIC_UPDATE_FIELDS = {"attributes": "object", "toxicity": "float32"}


def _body_error(exc: GoJSONError) -> ApiError:
    return ERR_BAD_REQUEST_BODY.joined(str(exc))


# --- HTTP ---------------------------------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    query: str
    version: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)


def _json_response(status: int, value: Any) -> Response:
    return Response(status, encode_json(value), "application/json")


def _error_response(error: ApiError) -> Response:
    """``http.Error``: the JSON, a newline, ``text/plain``, ``nosniff``."""
    body = encode_json({"error": error.message, "status": error.status}) + b"\n"
    return Response(
        error.status,
        body,
        "text/plain; charset=utf-8",
        [("X-Content-Type-Options", "nosniff")],
    )


class _BadRequest(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


_counter = random.randrange(1 << 24)
_machine = os.urandom(3)


def request_id() -> str:
    """An xid (what hlog.RequestIDHandler puts in ``X-Toxiproxy-Request-Id``): 20 base32hex."""
    global _counter
    _counter = (_counter + 1) & 0xFFFFFF
    raw = (
        struct.pack(">I", int(time.time()) & 0xFFFFFFFF)
        + _machine
        + struct.pack(">H", os.getpid() & 0xFFFF)
        + _counter.to_bytes(3, "big")
    )
    alphabet = "0123456789abcdefghijklmnopqrstuv"
    number = int.from_bytes(raw, "big") << 4  # 96 bits padded to 100 = 20 symbols
    return "".join(alphabet[(number >> (5 * (19 - i))) & 31] for i in range(20))


def clean_path(path: str) -> str:
    """gorilla/mux's ``cleanPath``: ``path.Clean``, keeping a trailing slash."""
    if not path:
        return "/"
    cleaned = posixpath.normpath("/" + path.lstrip("/"))
    if path.endswith("/") and cleaned != "/":
        cleaned += "/"
    return cleaned


Handler = Callable[[Request, list[str]], Awaitable[Response]]


class ApiServer:
    """The API and the proxies behind it, all on one event loop."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self.proxies: dict[str, Proxy] = {}
        self._lock = asyncio.Lock()  # one change at a time, as Toxiproxy's collection locks do
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self.address = ""
        variable = None
        self._routes: list[tuple[tuple[str | None, ...], dict[str, Handler]]] = [
            (("reset",), {"POST": self.reset}),
            (("proxies",), {"GET": self.proxy_index, "POST": self.proxy_create}),
            (("populate",), {"POST": self.populate}),
            (
                ("proxies", variable),
                {
                    "GET": self.proxy_show,
                    "POST": self.proxy_update,
                    "PATCH": self.proxy_update,
                    "DELETE": self.proxy_delete,
                },
            ),
            (("proxies", variable, "toxics"), {"GET": self.toxic_index, "POST": self.toxic_create}),
            (
                ("proxies", variable, "toxics", variable),
                {
                    "GET": self.toxic_show,
                    "POST": self.toxic_update,
                    "PATCH": self.toxic_update,
                    "DELETE": self.toxic_delete,
                },
            ),
            (("version",), {"GET": self.version}),
        ]

    # Lifecycle.

    async def start(self, host: str, port: int) -> str:
        """Listen for API clients; returns the bound ``ip:port``."""
        listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        sock, self.address = await listen_socket(listen)
        self._server = await asyncio.start_server(self._serve, sock=sock, limit=MAX_HEADER_BYTES)
        return self.address

    async def close(self) -> None:
        """Stop listening, drop API clients, stop every proxy."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._clients):
            writer.transport.abort()
        for task in list(self._handlers):
            task.cancel()
        for proxy in list(self.proxies.values()):
            await proxy.stop()

    # The HTTP/1.1 connection loop.

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        first = True
        try:
            while True:
                try:
                    request = await self._read_request(reader, writer, first)
                except _BadRequest as exc:
                    await self._send(
                        writer,
                        Response(exc.status, exc.text.encode(), "text/plain; charset=utf-8"),
                        close=True,
                    )
                    return
                if request is None:
                    return
                first = False
                response = await self._dispatch(request)
                connection = request.headers.get("connection", "").lower()
                keep_alive = (
                    "close" not in connection
                    if request.version == "HTTP/1.1"
                    else "keep-alive" in connection
                )
                await self._send(
                    writer, response, close=not keep_alive, head=request.method == "HEAD"
                )
                if not keep_alive:
                    return
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self._clients.discard(writer)
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()
            else:
                writer.close()

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bool
    ) -> Request | None:
        try:
            async with asyncio.timeout(READ_TIMEOUT if first else IDLE_TIMEOUT):
                line = await reader.readline()
                while line in (b"\r\n", b"\n"):  # Go skips blank lines before a request
                    line = await reader.readline()
        except (asyncio.LimitOverrunError, ValueError):
            raise _BadRequest(431, "431 Request Header Fields Too Large") from None
        if not line:
            return None
        async with asyncio.timeout(READ_TIMEOUT):
            parts = line.decode("latin-1").rstrip("\r\n").split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                raise _BadRequest(400, "400 Bad Request")
            method, target, version = parts
            headers: dict[str, str] = {}
            size = len(line)
            while True:
                try:
                    header = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    raise _BadRequest(431, "431 Request Header Fields Too Large") from None
                size += len(header)
                if size > MAX_HEADER_BYTES:
                    raise _BadRequest(431, "431 Request Header Fields Too Large")
                if header in (b"\r\n", b"\n", b""):
                    break
                name, sep, value = header.decode("latin-1").partition(":")
                if not sep or not name or name != name.strip():
                    raise _BadRequest(400, "400 Bad Request: malformed MIME header line")
                key = name.lower()
                value = value.strip()
                headers[key] = f"{headers[key]}, {value}" if key in headers else value
            if version == "HTTP/1.1" and "host" not in headers:
                raise _BadRequest(400, "400 Bad Request: missing required Host header")
            if "100-continue" in headers.get("expect", "").lower():
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = await self._read_body(reader, headers)
        raw_path, _, query = target.partition("?")
        if raw_path.startswith(("http://", "https://")):
            raw_path = "/" + raw_path.split("://", 1)[1].partition("/")[2]
        return Request(method, unquote(raw_path), query, version, headers, body)

    async def _read_body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = bytearray()
            while True:
                size_line = await reader.readline()
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise _BadRequest(400, "400 Bad Request") from None
                if size == 0:
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(body)
                if len(body) + size > MAX_BODY_BYTES:
                    raise _BadRequest(413, "413 Request Entity Too Large")
                body += await reader.readexactly(size)
                await reader.readline()
        length_text = headers.get("content-length")
        if length_text is None:
            return b""
        if not length_text.isdigit():
            raise _BadRequest(400, "400 Bad Request: bad Content-Length")
        length = int(length_text)
        if length > MAX_BODY_BYTES:
            raise _BadRequest(413, "413 Request Entity Too Large")
        return await reader.readexactly(length)

    async def _send(
        self, writer: asyncio.StreamWriter, response: Response, *, close: bool, head: bool = False
    ) -> None:
        reason = http.HTTPStatus(response.status).phrase
        lines = [f"HTTP/1.1 {response.status} {reason}"]
        if response.content_type is not None:
            lines.append(f"Content-Type: {response.content_type}")
        lines.extend(f"{name}: {value}" for name, value in response.headers)
        lines.append(f"Date: {email.utils.formatdate(usegmt=True)}")
        if response.status != 204 and response.status >= 200:
            lines.append(f"Content-Length: {len(response.body)}")
        if close:
            lines.append("Connection: close")
        payload = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if response.status != 204 and not head:
            payload += response.body
        writer.write(payload)
        await writer.drain()

    # Routing and middleware.

    async def _dispatch(self, request: Request) -> Response:
        cleaned = clean_path(request.path)
        if cleaned != request.path:
            location = cleaned + (f"?{request.query}" if request.query else "")
            return Response(301, headers=[("Location", location)])
        segments = request.path[1:].split("/") if request.path.startswith("/") else []
        matched_path = False
        for pattern, methods in self._routes:
            if len(pattern) != len(segments):
                continue
            if any(
                (part is None and not segment) or (part is not None and part != segment)
                for part, segment in zip(pattern, segments, strict=True)
            ):
                continue
            matched_path = True
            handler = methods.get(request.method)
            if handler is None:
                continue
            variables = [
                segment for part, segment in zip(pattern, segments, strict=True) if part is None
            ]
            response = await self._middleware(handler, request, variables)
            response.headers.insert(0, ("X-Toxiproxy-Request-Id", request_id()))
            return response
        if matched_path:
            return Response(405)
        return Response(
            404,
            b"404 page not found\n",
            "text/plain; charset=utf-8",
            [("X-Content-Type-Options", "nosniff")],
        )

    async def _middleware(
        self, handler: Handler, request: Request, variables: list[str]
    ) -> Response:
        if request.headers.get("user-agent", "").startswith("Mozilla/"):
            return Response(
                403,
                b"User agent not allowed\n",
                "text/plain; charset=utf-8",
                [("X-Content-Type-Options", "nosniff")],
            )
        task = asyncio.ensure_future(self._guarded(handler, request, variables))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        done, _ = await asyncio.wait({task}, timeout=HANDLER_TIMEOUT)
        if not done:  # like http.TimeoutHandler: answer 503, let the handler finish on its own
            return Response(503, _TIMEOUT_BODY, "text/html; charset=utf-8")
        return task.result()

    async def _guarded(self, handler: Handler, request: Request, variables: list[str]) -> Response:
        try:
            return await handler(request, variables)
        except ApiError as exc:
            return _error_response(exc)
        except GoJSONError as exc:
            return _error_response(_body_error(exc))
        except (ListenError, AddressError) as exc:
            return _error_response(ApiError(str(exc), 500))
        except Exception as exc:
            log.exception("toxiproxy API handler failed")
            return _error_response(ApiError(str(exc) or type(exc).__name__, 500))

    # Handlers, one per route of api.go.

    def _proxy(self, name: str) -> Proxy:
        proxy = self.proxies.get(name)
        if proxy is None:
            raise ERR_PROXY_NOT_FOUND
        return proxy

    async def version(self, request: Request, variables: list[str]) -> Response:
        body = f'{{"version": "{VERSION}"}}\n'.encode()
        return Response(200, body, "application/json;charset=utf-8")

    async def proxy_index(self, request: Request, variables: list[str]) -> Response:
        return _json_response(
            200, {name: proxy_json(p) for name, p in sorted(self.proxies.items())}
        )

    async def proxy_create(self, request: Request, variables: list[str]) -> Response:
        fields = decode_struct(
            decode_json(request.body),
            _PROXY_FIELDS,
            "toxiproxy.Proxy",
            {"name": "", "listen": "", "upstream": "", "enabled": True},
        )
        if not fields["name"]:
            raise ERR_MISSING_FIELD.joined("name")
        if not fields["upstream"]:
            raise ERR_MISSING_FIELD.joined("upstream")
        async with self._lock:
            if fields["name"] in self.proxies:
                raise ERR_PROXY_EXISTS
            proxy = Proxy(fields["name"], fields["listen"], fields["upstream"], self.rng)
            if fields["enabled"]:
                await proxy.start()
            self.proxies[proxy.name] = proxy
            return _json_response(201, proxy_json(proxy))

    async def populate(self, request: Request, variables: list[str]) -> Response:
        """``POST /populate``: always JSON, ``{"error","status","proxies"}`` on failure."""
        created: list[Proxy] = []
        try:
            items = self._populate_items(request.body)
            async with self._lock:
                for item in items:
                    created.append(await self._populate_one(item))
        except (ApiError, GoJSONError, ListenError, AddressError) as exc:
            error = (
                exc
                if isinstance(exc, ApiError)
                else _body_error(exc)
                if isinstance(exc, GoJSONError)
                else ApiError(str(exc), 500)
            )
            return _json_response(
                error.status,
                {
                    "error": error.message,
                    "status": error.status,
                    "proxies": [proxy_json(p) for p in created] or None,
                },
            )
        return _json_response(201, {"proxies": [proxy_json(p) for p in created] or None})

    def _populate_items(self, body: bytes) -> list[dict[str, Any]]:
        value = decode_json(body)
        if value is None:
            return []
        if not isinstance(value, list):
            raise GoJSONError(
                f"json: cannot unmarshal {_json_kind(value)} into Go value of type "
                '[]struct { toxiproxy.Proxy; Enabled *bool "json:\\"enabled\\"" }'
            )
        items = [
            decode_struct(
                raw,
                _PROXY_FIELDS,
                "struct { toxiproxy.Proxy; Enabled *bool }",
                {"name": "", "listen": "", "upstream": "", "enabled": True},
            )
            for raw in value
        ]
        for number, item in enumerate(items, start=1):
            if not item["name"]:
                raise ERR_MISSING_FIELD.joined(f"name at proxy {number}")
            if not item["upstream"]:
                raise ERR_MISSING_FIELD.joined(f"upstream at proxy {number}")
        return items

    async def _populate_one(self, item: dict[str, Any]) -> Proxy:
        existing = self.proxies.get(item["name"])
        if existing is not None:
            if not await existing.differs(item["listen"], item["upstream"]):
                return existing  # kept untouched: its toxics and enabled state stay
            await existing.stop()
        proxy = Proxy(item["name"], item["listen"], item["upstream"], self.rng)
        if item["enabled"]:
            await proxy.start()
        self.proxies[proxy.name] = proxy
        return proxy

    async def proxy_show(self, request: Request, variables: list[str]) -> Response:
        return _json_response(200, proxy_json(self._proxy(variables[0])))

    async def proxy_update(self, request: Request, variables: list[str]) -> Response:
        proxy = self._proxy(variables[0])
        fields = decode_struct(
            decode_json(request.body),
            _PROXY_FIELDS,
            "toxiproxy.Proxy",
            {
                "name": proxy.name,
                "listen": proxy.listen,
                "upstream": proxy.upstream,
                "enabled": proxy.enabled,
            },
        )
        async with self._lock:
            proxy = self._proxy(variables[0])
            await proxy.update(fields["listen"], fields["upstream"], fields["enabled"])
            return _json_response(200, proxy_json(proxy))

    async def proxy_delete(self, request: Request, variables: list[str]) -> Response:
        async with self._lock:
            proxy = self._proxy(variables[0])
            await proxy.stop()
            del self.proxies[proxy.name]
        return Response(204)

    async def reset(self, request: Request, variables: list[str]) -> Response:
        async with self._lock:
            for proxy in list(self.proxies.values()):
                with contextlib.suppress(AlreadyStartedError):
                    await proxy.start()
                await proxy.toxics.reset()
        return Response(204)

    async def toxic_index(self, request: Request, variables: list[str]) -> Response:
        proxy = self._proxy(variables[0])
        return _json_response(200, [toxic_json(spec) for spec in proxy.toxics.all()])

    async def toxic_create(self, request: Request, variables: list[str]) -> Response:
        proxy = self._proxy(variables[0])
        fields = decode_struct(
            decode_json(request.body),
            _TOXIC_FIELDS,
            "toxics.ToxicWrapper",
            {"attributes": None, "name": "", "type": "", "stream": DOWNSTREAM, "toxicity": 1.0},
        )
        direction = fields["stream"].lower()
        if direction not in (UPSTREAM, DOWNSTREAM):
            raise ERR_INVALID_STREAM
        name = fields["name"] or f"{fields['type']}_{fields['stream']}"
        toxic_type = TOXICS.get(fields["type"])
        if toxic_type is None:
            raise ERR_INVALID_TOXIC_TYPE
        async with self._lock:
            proxy = self._proxy(variables[0])
            if proxy.toxics.find(name) is not None:
                raise ERR_TOXIC_EXISTS
            toxic = toxic_type()
            decode_attributes(toxic, fields["attributes"])
            spec = ToxicSpec(name, fields["stream"], direction, fields["toxicity"], toxic)
            await proxy.toxics.add(spec)
            return _json_response(200, toxic_json(spec))

    async def toxic_show(self, request: Request, variables: list[str]) -> Response:
        spec = self._proxy(variables[0]).toxics.find(variables[1])
        if spec is None:
            raise ERR_TOXIC_NOT_FOUND
        return _json_response(200, toxic_json(spec))

    async def toxic_update(self, request: Request, variables: list[str]) -> Response:
        async with self._lock:
            proxy = self._proxy(variables[0])
            spec = proxy.toxics.find(variables[1])
            if spec is None:
                raise ERR_TOXIC_NOT_FOUND
            toxic = spec.toxic.copy()
            fields = decode_struct(
                decode_json(request.body),
                _TOXIC_UPDATE_FIELDS,
                "struct { Attributes interface {}; Toxicity float32 }",
                {"attributes": None, "toxicity": spec.toxicity},
            )
            decode_attributes(toxic, fields["attributes"])
            await proxy.toxics.update(spec, toxic, fields["toxicity"])
            return _json_response(200, toxic_json(spec))

    async def toxic_delete(self, request: Request, variables: list[str]) -> Response:
        async with self._lock:
            proxy = self._proxy(variables[0])
            spec = proxy.toxics.find(variables[1])
            if spec is None:
                raise ERR_TOXIC_NOT_FOUND
            await proxy.toxics.remove(spec)
        return Response(204)
