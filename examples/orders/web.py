"""JSON over HTTP for the system's small APIs (orders, view, the payment gateway) and their
clients: the standard library's server, one thread per request."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# (method, path, body or None, headers) -> (status, JSON body)
Route = Callable[[str, str, Any, Mapping[str, str]], tuple[int, Any]]


class HttpError(Exception):
    """A JSON API answered with an error status, or could not be reached (``status`` 0)."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.body = body


def serve(port: int, route: Route, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Serve ``route`` on ``host:port`` from a daemon thread; returns the server."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, method: str) -> None:
            body: Any = None
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                try:
                    body = json.loads(self.rfile.read(length))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    return self._send(400, {"error": f"body is not JSON: {exc}"})
            try:
                status, payload = route(method, self.path, body, dict(self.headers))
            except Exception as exc:  # a bug or a dead database: say so, keep serving
                status, payload = 500, {"error": f"{type(exc).__name__}: {exc}"}
            self._send(status, payload)

        def _send(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._answer("GET")

        def do_POST(self) -> None:
            self._answer("POST")

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request would drown the service's log

    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"http-{port}", daemon=True).start()
    return server


def call(
    method: str,
    url: str,
    body: Any = None,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
) -> Any:
    """One JSON request; raises :class:`HttpError` (status 0 when nothing answered)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            payload = json.loads(exc.read() or b"null")
        except (json.JSONDecodeError, OSError):
            payload = None
        message = payload.get("error", exc.reason) if isinstance(payload, dict) else exc.reason
        raise HttpError(exc.code, str(message), payload) from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise HttpError(0, f"{method} {url}: {reason}") from None
