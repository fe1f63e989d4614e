"""The link between the adapter and its OPC UA worker process.

It also holds what both ends agree on without asyncua (which only the
worker loads): the namespace, the protocol name in audit records, the
listening socket the adapter binds for the worker.

The two ends talk over a Unix socket pair that the adapter creates and
hands to the worker when it starts it. Each frame is a 4-byte big-endian
length and one JSON object (orjson, NumPy arrays allowed) with an ``op``.
A frame with an ``id`` is a request: the other end answers it with one
``{"op": "reply", "id": ..., ...}`` frame, or ``{"error": "<sentence>"}``
when it could not. Every other frame is a message, handled in the order it
arrived. Requests are handled as tasks of their own, so a slow one (a
password check) never holds up the messages behind it.

Neither end trusts the other's frames blindly: a frame over
:data:`MAX_FRAME` bytes, or one that is not a JSON object with a string
``op``, closes the link, which stops the worker (the adapter starts a new
one).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson

logger = logging.getLogger(__name__)

NAMESPACE_URI: Final = "urn:calejo:control-adapter"
PRODUCT_URI: Final = "urn:calejo:control-adapter:product"
PROTOCOL: Final = "OPCUA"
"""The protocol named in the audit records of OPC UA sessions."""
VERSION: Final = 1
"""The version of the messages; ``init`` carries it, and a worker of another
version refuses to start (the adapter was upgraded without a restart)."""
MAX_FRAME: Final = 256 * 1024 * 1024
"""Largest frame either end accepts (the address space of 10,000 pumps and
their first values take a few MB)."""
_HEADER: Final = struct.Struct(">I")
_OPTIONS: Final = orjson.OPT_SERIALIZE_NUMPY

Message = dict[str, Any]
Handler = Callable[[Message], Awaitable[Message | None] | Message | None]


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: a free port), not listening yet."""
    family, kind, protocol, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, protocol)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class LinkClosed(ConnectionError):
    """The other end is gone; nothing more can be sent or answered."""


class LinkError(Exception):
    """The other end could not answer a request; the message says why."""


class Link:
    """One end of the link.

    ``on_message`` is called with each message in order (awaited when it
    returns an awaitable); ``on_request`` with each request, whose return
    value (a dict, or None for no fields) is the reply.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        on_message: Handler,
        on_request: Handler,
        name: str = "opc ua link",
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._on_message = on_message
        self._on_request = on_request
        self.name = name
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def backlog(self) -> int:
        """Bytes written but not yet taken by the other end."""
        transport = self._writer.transport
        return 0 if transport.is_closing() else transport.get_write_buffer_size()

    def send(self, message: Message) -> None:
        """Queue one message; raises LinkClosed when the link is down."""
        if self._closed:
            raise LinkClosed(f"{self.name} is closed")

        body = orjson.dumps(message, option=_OPTIONS)
        if len(body) > MAX_FRAME:
            raise ValueError(
                f"{self.name}: a {message.get('op')!r} frame of {len(body)} bytes "
                f"is over the limit of {MAX_FRAME}"
            )
        self._writer.write(_HEADER.pack(len(body)) + body)

    async def request(self, op: str, timeout: float, **fields: Any) -> Message:
        """Send a request and wait at most ``timeout`` seconds for its reply.

        Raises LinkClosed, TimeoutError, or LinkError with the other end's
        sentence.
        """
        ident = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        try:
            self.send({**fields, "op": op, "id": ident})
            async with asyncio.timeout(timeout):
                reply = await future
        finally:
            self._waiting.pop(ident, None)

        error = reply.get("error")
        if error is not None:
            raise LinkError(str(error))
        return reply

    async def run(self) -> None:
        """Read and handle frames until the other end closes the link."""
        try:
            while True:
                message = await self._read()
                if message is None:
                    return
                await self._handle(message)
        finally:
            self.close()

    def close(self) -> None:
        """Close the socket; pending requests fail with LinkClosed."""
        if self._closed:
            return
        self._closed = True
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(LinkClosed(f"{self.name} closed"))
        self._waiting.clear()
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            self._writer.close()

    async def drain(self) -> None:
        """Wait until what was sent has been taken by the socket."""
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()

    async def _read(self) -> Message | None:
        try:
            header = await self._reader.readexactly(_HEADER.size)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

        (size,) = _HEADER.unpack(header)
        if size > MAX_FRAME:
            logger.error(
                "%s: frame of %d bytes is over the limit of %d; closing",
                self.name,
                size,
                MAX_FRAME,
            )
            return None

        try:
            body = await self._reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

        try:
            message = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            logger.error("%s: frame is not JSON (%s); closing", self.name, exc)
            return None
        if not isinstance(message, dict) or not isinstance(message.get("op"), str):
            logger.error(
                "%s: expected a JSON object with a string 'op', got %s; closing",
                self.name,
                type(message).__name__,
            )
            return None
        return message

    async def _handle(self, message: Message) -> None:
        op = message["op"]
        ident = message.get("id")

        if op == "reply":
            future = self._waiting.get(ident) if isinstance(ident, int) else None
            if future is not None and not future.done():
                future.set_result(message)
            return

        if isinstance(ident, int):
            task = asyncio.create_task(self._answer(ident, message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return

        try:
            result = self._on_message(message)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("%s: %r message failed", self.name, op)

    async def _answer(self, ident: int, message: Message) -> None:
        try:
            result = self._on_request(message)
            if inspect.isawaitable(result):
                result = await result
            reply: Message = dict(result or {})
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("%s: %r request failed", self.name, message["op"])
            reply = {"error": f"{message['op']} failed: {exc}"}

        reply.update(op="reply", id=ident)
        with contextlib.suppress(LinkClosed, ConnectionError):
            self.send(reply)


async def open_link(
    sock: Any, *, on_message: Handler, on_request: Handler, name: str
) -> Link:
    """A :class:`Link` over a connected Unix stream socket."""
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
    return Link(reader, writer, on_message=on_message, on_request=on_request, name=name)
