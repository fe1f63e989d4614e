"""The local-disk spool that holds records while the database is away.

One file per backend under ``<data_dir>/spool/``; one JSON line per
:meth:`~calejo_server.storage.base.Storage.write` call (a batch), written,
flushed and fsynced before the call returns. The file is read back in order
when the database answers again and removed once all of it is delivered.
A line that does not parse (a write torn by a crash, which was never
acknowledged) is skipped with a logged error naming the file and line.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from calejo_server.storage.base import (
    AlertRecord,
    AuditRecord,
    EmergencyStopRecord,
    PlanRecord,
    Record,
    RoleRecord,
    SetpointRecord,
    StationRecord,
    StationStateRecord,
    TokenRecord,
    UserRecord,
)

logger = logging.getLogger(__name__)

SPOOL_FORMAT = 1
"""The version written in each spool line as ``"v"``."""

RECORD_TYPES: dict[str, type[Any]] = {
    "audit": AuditRecord,
    "setpoint": SetpointRecord,
    "plan": PlanRecord,
    "emergency_stop": EmergencyStopRecord,
    "station_state": StationStateRecord,
    "station": StationRecord,
    "user": UserRecord,
    "role": RoleRecord,
    "token": TokenRecord,
    "alert": AlertRecord,
}
"""The tag of each record type in a spool line."""

_TAG_OF = {cls: tag for tag, cls in RECORD_TYPES.items()}


@dataclasses.dataclass(frozen=True, slots=True)
class _FieldCodec:
    name: str
    is_datetime: bool
    is_tuple: bool


def _codecs_of(cls: type[Any]) -> tuple[_FieldCodec, ...]:
    # base.py postpones annotations, so the field types are their source text.
    return tuple(
        _FieldCodec(
            name=field.name,
            is_datetime="datetime" in str(field.type),
            is_tuple=str(field.type).startswith("tuple"),
        )
        for field in dataclasses.fields(cls)
    )


_FIELDS = {cls: _codecs_of(cls) for cls in RECORD_TYPES.values()}


class SpoolFormatError(ValueError):
    """A spool line that does not describe a batch of records."""


def record_to_json(record: Record) -> dict[str, Any]:
    """``record`` as a JSON-ready dict tagged with its ``"type"``."""
    cls = type(record)
    item: dict[str, Any] = {"type": _TAG_OF[cls]}
    for codec in _FIELDS[cls]:
        value = getattr(record, codec.name)
        if codec.is_datetime and value is not None:
            value = value.isoformat()
        elif codec.is_tuple:
            value = list(value)
        item[codec.name] = value
    return item


def record_from_json(item: object) -> Record:
    """The record that :func:`record_to_json` made ``item`` from."""
    if not isinstance(item, dict):
        raise SpoolFormatError(f"expected a record object, got {type(item).__name__}")
    tag = item.get("type")
    if not isinstance(tag, str) or tag not in RECORD_TYPES:
        raise SpoolFormatError(f"expected a known record type, got {tag!r}")
    cls = RECORD_TYPES[tag]

    values: dict[str, Any] = {}
    for codec in _FIELDS[cls]:
        if codec.name not in item:
            raise SpoolFormatError(f"{tag} record: missing field {codec.name!r}")
        value = item[codec.name]
        if codec.is_datetime and value is not None:
            if not isinstance(value, str):
                raise SpoolFormatError(
                    f"{tag} record: expected an ISO 8601 time in {codec.name!r}, "
                    f"got {value!r}"
                )
            value = _parse_time(tag, codec.name, value)
        elif codec.is_tuple:
            if not isinstance(value, list):
                raise SpoolFormatError(
                    f"{tag} record: expected a list in {codec.name!r}, got {value!r}"
                )
            value = tuple(value)
        values[codec.name] = value
    record: Record = cls(**values)
    return record


def _parse_time(tag: str, name: str, text: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise SpoolFormatError(
            f"{tag} record: expected an ISO 8601 time in {name!r}, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        raise SpoolFormatError(
            f"{tag} record: expected a time with its UTC offset in {name!r}, "
            f"got {text!r}"
        )
    return moment


def encode_batch(records: Sequence[Record]) -> bytes:
    """One spool line (ending in a newline) holding ``records``."""
    line = {"v": SPOOL_FORMAT, "records": [record_to_json(r) for r in records]}
    return json.dumps(line, separators=(",", ":")).encode("utf-8") + b"\n"


def decode_batch(line: bytes) -> list[Record]:
    """The records of one spool line; :class:`SpoolFormatError` if it is not one."""
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SpoolFormatError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("v") != SPOOL_FORMAT:
        raise SpoolFormatError(f"expected a batch of spool format {SPOOL_FORMAT}")
    items = data.get("records")
    if not isinstance(items, list) or not items:
        raise SpoolFormatError("expected a non-empty list of records")
    try:
        return [record_from_json(item) for item in items]
    except TypeError as exc:
        raise SpoolFormatError(str(exc)) from None


@dataclasses.dataclass(slots=True)
class SpoolChunk:
    """Batches read from the spool, and where reading stopped."""

    batches: list[tuple[int, list[Record]]]
    """(line number, records) of each good line, in order."""
    end: int
    """Byte offset just past the last complete line read."""
    line: int
    """Number of the last complete line read (1-based)."""
    records: int
    """Records in ``batches``."""


class Spool:
    """An append-only file of record batches; every method blocks on disk.

    Call the methods from a worker thread, never from the event loop.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __repr__(self) -> str:
        return f"Spool({str(self.path)!r})"

    def size(self) -> int:
        """Bytes in the spool file (0 when there is none)."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def append(self, batches: Sequence[Sequence[Record]]) -> None:
        """Append one line per batch, then flush and fsync the file."""
        data = b"".join(encode_batch(records) for records in batches)
        fd = self._open()
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)

    def _open(self) -> int:
        if self._fd is not None:
            return self._fd

        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            self._terminate_torn_line(fd)
            if created:
                _fsync_directory(self.path.parent)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return fd

    def _terminate_torn_line(self, fd: int) -> None:
        # A crash can leave a last line without its newline; end it, so the
        # next batch starts a line of its own and only the torn one is lost.
        size = os.fstat(fd).st_size
        if size == 0:
            return
        with open(self.path, "rb") as f:
            f.seek(size - 1)
            last = f.read(1)
        if last != b"\n":
            os.write(fd, b"\n")
            os.fsync(fd)

    def read(
        self,
        offset: int,
        first_line: int,
        max_bytes: int = 1 << 20,
        *,
        log: bool = True,
    ) -> SpoolChunk:
        """Complete lines from byte ``offset`` (line ``first_line`` + 1 on).

        Reads about ``max_bytes`` (more if one line is longer); a trailing
        part without its newline is left for a later call. Lines that do
        not parse are skipped, and logged when ``log``.
        """
        batches: list[tuple[int, list[Record]]] = []
        records = 0
        line_no = first_line
        end = offset
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                data = f.read(max_bytes)
                while data and not data.endswith(b"\n"):
                    more = f.read(max_bytes)
                    if not more:
                        break
                    data += more
        except FileNotFoundError:
            return SpoolChunk(batches, end, line_no, records)

        for raw in data.split(b"\n")[:-1]:
            line_no += 1
            end += len(raw) + 1
            if not raw.strip():
                continue
            try:
                batch = decode_batch(raw)
            except SpoolFormatError as exc:
                if not log:
                    continue
                logger.error(
                    "spool %s line %d skipped: %s (%d bytes)",
                    self.path,
                    line_no,
                    exc,
                    len(raw),
                )
                continue
            batches.append((line_no, batch))
            records += len(batch)
        return SpoolChunk(batches, end, line_no, records)

    def tail(self, offset: int) -> bytes:
        """The bytes from ``offset`` to the end (a torn last line, if any)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                return f.read()
        except FileNotFoundError:
            return b""

    def count_records(self) -> int:
        """Records in all good lines of the file."""
        total = 0
        offset = 0
        line = 0
        while True:
            chunk = self.read(offset, line, log=False)
            if chunk.end == offset:
                return total
            total += chunk.records
            offset = chunk.end
            line = chunk.line

    def remove(self) -> None:
        """Close and delete the spool file."""
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        _fsync_directory(self.path.parent)

    def close(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.close(fd)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RejectedLog:
    """Where batches the database refused (bad data) are kept for an operator."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, records: Sequence[Record], reason: str) -> None:
        line = json.dumps(
            {
                "reason": reason,
                "at": dt.datetime.now(dt.UTC).isoformat(),
                "records": [record_to_json(r) for r in records],
            },
            separators=(",", ":"),
        )
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode("utf-8") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
