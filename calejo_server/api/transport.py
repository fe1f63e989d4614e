"""uvicorn's httptools protocol, with each answer sent in one write.

uvicorn writes the status line and headers of an answer as soon as the
application starts it, and the body in a second write. On loopback and
on a busy host each write is a system call that also wakes the client,
which then reads half an answer. :class:`CombinedWrites` holds what the
protocol writes during one step of the event loop and hands it to the
socket in one write at the end of that step, so that an answer whose
body follows its start at once (every answer of this API) leaves in one
segment. Nothing waits longer than that one step; closing, aborting and
the write end of the stream send or drop what is held first, as the
socket's own transport would.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["CombinedWrites", "HttpProtocol"]


class CombinedWrites(asyncio.Transport):
    """A transport that passes each loop step's writes on as one write."""

    def __init__(
        self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []

    # -- writing

    def write(self, data: bytes | bytearray | memoryview[Any]) -> None:
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Write what is held now (called at the end of the loop step)."""
        if not self._held:
            return

        held, self._held = self._held, []
        if self._transport.is_closing():
            return
        self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def get_write_buffer_size(self) -> int:
        held = sum(len(data) for data in self._held)
        return self._transport.get_write_buffer_size() + held

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(
        self, high: int | None = None, low: int | None = None
    ) -> None:
        self._transport.set_write_buffer_limits(high, low)

    # -- closing

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = []
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    # -- the rest, as the socket's transport has it

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing through :class:`CombinedWrites`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        socket_transport = cast(asyncio.Transport, transport)
        super().connection_made(CombinedWrites(socket_transport, self.loop))
