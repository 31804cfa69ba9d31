"""A tiny real HTTP server on loopback that answers from a script and records what it received.

For the behaviour the real service cannot be made to show on demand (a 503 with ``Retry-After`` twice, then
success; a reply slower than the client's timeout; a run that fails), with real sockets and real HTTP.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # JSON-encoded unless bytes
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0

    @classmethod
    def problem(cls, status: int, code: str, detail: str = "", **headers: str) -> Reply:
        body = {
            "type": f"https://ragadapt.dev/problems/{code}",
            "title": code.replace("_", " "),
            "status": status,
            "detail": detail or code,
            "code": code,
            "request_id": "server-side-id",
        }
        return cls(status, body, {"Content-Type": "application/problem+json", **headers})


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    time: float


class ScriptedServer:
    """Replies pop from ``script`` in order; when it is empty, ``respond(received)`` answers."""

    def __init__(self, *, listening: bool = True) -> None:
        """``listening=False``: the port is bound (no one else can take it) but refuses connections until
        ``listen()``."""
        self.script: list[Reply] = []
        self.respond: Callable[[Received], Reply] = lambda received: Reply(200, {"status": "alive"})
        self.received: list[Received] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                received = Received(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                    time.monotonic(),
                )
                with server._lock:
                    server.received.append(received)
                    reply = server.script.pop(0) if server.script else None
                if reply is None:
                    reply = server.respond(received)
                if reply.delay:
                    time.sleep(reply.delay)
                payload = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                try:
                    self.send_response(reply.status)
                    headers = {"Content-Type": "application/json", **reply.headers}
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout); nothing to answer

            do_GET = do_POST = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=listening)
        if not listening:
            self._httpd.server_bind()
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)

        self._listening = listening

    def __enter__(self) -> ScriptedServer:
        if self._listening:
            self._thread.start()
        return self

    def listen(self) -> ScriptedServer:
        self._httpd.server_activate()
        self._listening = True
        return self.__enter__()

    def __exit__(self, *exc_info: object) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()

    def paths(self) -> list[str]:
        return [f"{r.method} {r.path}" for r in self.received]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
