"""An HTTP server that answers like parts of an adapter's REST API, for the
operations commands' tests: real sockets, answers chosen by the test, every
request recorded.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

Answer = tuple[int, Mapping[str, str], bytes]
Route = Answer | Callable[[str, str, bytes], Answer]


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes


def json_answer(body: object, status: int = 200) -> Answer:
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()


def text_answer(text: str, status: int = 200) -> Answer:
    return status, {"Content-Type": "text/plain"}, text.encode()


class FakeAdapter:
    """Serves ``routes`` (``"GET /api/v1/health"`` -> answer) on 127.0.0.1."""

    def __init__(self, routes: Mapping[str, Route]) -> None:
        self.routes = dict(routes)
        self.requests: list[Request] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True
            wbufsize = 1 << 16

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?", 1)[0]
                owner.requests.append(
                    Request(self.command, path, dict(self.headers), body)
                )
                route = owner.routes.get(f"{self.command} {path}")
                if route is None:
                    status, headers, payload = json_answer(
                        {"error": "not_found", "detail": "no such path"}, 404
                    )
                elif callable(route):
                    status, headers, payload = route(self.command, path, body)
                else:
                    status, headers, payload = route
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


@contextmanager
def fake_adapter(routes: Mapping[str, Route]) -> Iterator[FakeAdapter]:
    server = FakeAdapter(routes)
    try:
        yield server
    finally:
        server.close()
