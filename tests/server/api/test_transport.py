"""Answers sent in one write: the bytes on the wire are uvicorn's own."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import uvicorn
import uvloop
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from calejo_server.api.transport import CombinedWrites, HttpProtocol

DATE = re.compile(rb"\r\ndate: [^\r]*", re.IGNORECASE)


class FakeTransport(asyncio.Transport):
    """Records what reaches the socket."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.eof = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def write_eof(self) -> None:
        self.eof = True

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 4000)}.get(name, default)


def _step(loop: asyncio.AbstractEventLoop) -> None:
    loop.run_until_complete(asyncio.sleep(0))


def test_the_writes_of_one_step_leave_as_one() -> None:
    loop = uvloop.new_event_loop()
    try:
        inner = FakeTransport()
        combined = CombinedWrites(inner, loop)

        combined.write(b"HTTP/1.1 200 OK\r\n\r\n")
        combined.write(bytearray(b"body"))
        assert inner.writes == []
        assert combined.get_write_buffer_size() == 23
        _step(loop)

        assert inner.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
        combined.writelines([b"a", memoryview(b"b")])
        _step(loop)
        assert inner.writes[1:] == [b"ab"]
        assert combined.get_extra_info("peername") == ("127.0.0.1", 4000)
    finally:
        loop.close()


def test_closing_sends_what_is_held_and_aborting_drops_it() -> None:
    loop = uvloop.new_event_loop()
    try:
        inner = FakeTransport()
        combined = CombinedWrites(inner, loop)
        combined.write(b"last words")
        combined.close()
        assert inner.writes == [b"last words"] and inner.closed
        _step(loop)
        assert inner.writes == [b"last words"]

        inner = FakeTransport()
        combined = CombinedWrites(inner, loop)
        combined.write(b"never sent")
        combined.abort()
        _step(loop)
        assert inner.writes == [] and inner.aborted

        inner = FakeTransport()
        combined = CombinedWrites(inner, loop)
        combined.write(b"then eof")
        combined.write_eof()
        assert inner.writes == [b"then eof"] and inner.eof

        inner = FakeTransport()
        combined = CombinedWrites(inner, loop)
        combined.write(b"too late")
        inner.closed = True
        _step(loop)
        assert inner.writes == []
    finally:
        loop.close()


# -- the same bytes as uvicorn's own protocol, over real sockets -------------


async def _json(request: Request) -> Response:
    body = await request.body()
    return JSONResponse({"got": len(body), "path": request.url.path})


async def _stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"one,", b"two,", b"three"):
            await asyncio.sleep(0.01)
            yield part

    return StreamingResponse(chunks(), media_type="text/plain")


async def _empty(request: Request) -> Response:
    return Response(status_code=204)


APP = Starlette(
    routes=[
        Route("/json", _json, methods=["GET", "PUT", "POST"]),
        Route("/stream", _stream),
        Route("/empty", _empty),
    ]
)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.contextmanager
def _serve(http: Any) -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _Server(
        uvicorn.Config(
            APP,
            loop="none",
            http=http,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
        )
    )

    def run() -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(server.serve(sockets=[sock]))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return DATE.sub(b"", b"".join(chunks))


def _get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


EXCHANGES = {
    "pipelined keep-alive, then close": (
        _get("/json")
        + b"PUT /json HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        + _get("/empty")
        + _get("/nowhere")
        + _get("/json", "Connection: close\r\n")
    ),
    "streamed answer": _get("/stream", "Connection: close\r\n"),
    "a large body": (
        b"POST /json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Length: 300000\r\n\r\n" + b"x" * 300_000
    ),
    "http/1.0": b"GET /json HTTP/1.0\r\n\r\n",
    "head": b"HEAD /json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "malformed": b"GET /json HTTP/1.1\r\nHost x\r\n\r\n",
    "expect 100-continue": (
        b"PUT /json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\nok"
    ),
}


@pytest.mark.parametrize("name", list(EXCHANGES))
def test_answers_are_byte_for_byte_uvicorns(name: str) -> None:
    payload = EXCHANGES[name]
    with _serve("httptools") as stock, _serve(HttpProtocol) as combined:
        expected = _exchange(stock, payload)
        got = _exchange(combined, payload)

    assert expected.startswith(b"HTTP/1.")
    assert got == expected
