"""The backup archive: one gzip-compressed tar file with a manifest first.

Members, in order:

``manifest.json``
    what the archive holds (see :class:`Manifest`), with the SHA-256 and
    size of every other member
``database/<table>.jsonl``
    one part per table (see :mod:`calejo_server.ops.dump`)
``config/...``
    the configuration file, and the certificate and trust folders

An archive is written to a temporary file in the target folder (mode
0600), flushed to disk and then linked to its final name, so a reader
never sees half an archive and an existing archive is never overwritten.
It is read as a stream, member by member; a problem (not a gzip file, a
first member that is not our manifest, another format version, a part
missing, cut short, or whose digest differs) is an :class:`ArchiveError`
that names the part.

The digests show damage and tampering by anyone who does not also
rewrite the manifest; the audit log inside carries its own hash chain,
which :mod:`calejo_server.ops.backup` verifies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import gzip
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import threading
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, Any, Final, Literal

from calejo_server.ops.dump import Cancelled, DumpError, Table

FORMAT: Final = "calejo-backup"
FORMAT_VERSION: Final = 1
MANIFEST: Final = "manifest.json"

Kind = Literal["full", "database", "config"]
KINDS: Final[tuple[Kind, ...]] = ("full", "database", "config")

MAX_MANIFEST_BYTES: Final = 16 * 1024 * 1024
MAX_CONFIG_BYTES: Final = 64 * 1024 * 1024
"""The most the configuration parts of one archive may hold together."""

CHUNK: Final = 1 << 20

_HEX64 = re.compile(r"[0-9a-f]{64}")
_PART = re.compile(r"(database|config)/[^\x00]{1,900}")
_NAME = re.compile(
    r"calejo-(?P<kind>full|database|config)-(?P<stamp>\d{8}T\d{6}Z)(?:-(?P<n>\d+))?"
    r"\.tar\.gz"
)


class ArchiveError(Exception):
    """An archive cannot be used; ``part`` names where the problem is."""

    def __init__(self, part: str, message: str) -> None:
        super().__init__(f"{part}: {message}")
        self.part = part
        self.reason = message


# ---------------------------------------------------------------------------
# The manifest.


@dataclasses.dataclass(frozen=True, slots=True)
class Content:
    """One member after the manifest."""

    path: str
    sha256: str
    size: int
    mode: int = 0o600


@dataclasses.dataclass(frozen=True, slots=True)
class TableEntry:
    table: Table
    rows: int


@dataclasses.dataclass(frozen=True, slots=True)
class DatabaseSection:
    """The database part: where it came from, its schema, its tables."""

    backend: str
    source: dict[str, Any]
    schema_version: int
    tables: tuple[TableEntry, ...]
    chain_head: tuple[int, str]

    def table(self, part: str) -> TableEntry | None:
        for entry in self.tables:
            if entry.table.part == part:
                return entry
        return None

    @property
    def rows(self) -> int:
        return sum(entry.rows for entry in self.tables)


@dataclasses.dataclass(frozen=True, slots=True)
class ConfigFolder:
    """A folder of the configuration part: certificates or a trust list."""

    role: str
    source: str
    mode: int


@dataclasses.dataclass(frozen=True, slots=True)
class ConfigSection:
    """The configuration part: the file in use and the folders beside it."""

    file: str | None
    source: str | None
    mode: int
    folders: tuple[ConfigFolder, ...]

    @property
    def file_part(self) -> str | None:
        return f"config/{self.file}" if self.file is not None else None


@dataclasses.dataclass(frozen=True, slots=True)
class Manifest:
    """What an archive holds; the first member, ``manifest.json``."""

    kind: Kind
    created_at: dt.datetime
    adapter_version: str
    host: str
    created_by: str
    backend: str
    database: DatabaseSection | None
    config: ConfigSection | None
    contents: tuple[Content, ...]

    def content(self, path: str) -> Content | None:
        for content in self.contents:
            if content.path == path:
                return content
        return None

    def to_json(self) -> dict[str, Any]:
        database = None
        if self.database is not None:
            db = self.database
            database = {
                "backend": db.backend,
                "source": db.source,
                "schema_version": db.schema_version,
                "tables": [
                    {
                        **entry.table.to_json(),
                        "part": entry.table.part,
                        "rows": entry.rows,
                    }
                    for entry in db.tables
                ],
                "audit_chain_head": {"id": db.chain_head[0], "hash": db.chain_head[1]},
            }
        config = None
        if self.config is not None:
            config = {
                "file": self.config.file,
                "source": self.config.source,
                "mode": self.config.mode,
                "folders": [
                    {"role": f.role, "source": f.source, "mode": f.mode}
                    for f in self.config.folders
                ],
            }
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "created_at": self.created_at.isoformat(timespec="microseconds"),
            "adapter_version": self.adapter_version,
            "host": self.host,
            "created_by": self.created_by,
            "backend": self.backend,
            "database": database,
            "config": config,
            "contents": [
                {"path": c.path, "sha256": c.sha256, "size": c.size, "mode": c.mode}
                for c in self.contents
            ],
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), indent=1, sort_keys=False).encode() + b"\n"


def parse_manifest(data: bytes) -> Manifest:
    """The manifest in ``data``; ArchiveError naming manifest.json."""
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArchiveError(
            MANIFEST, f"expected JSON, got unreadable text ({exc})"
        ) from None
    if not isinstance(document, dict):
        raise ArchiveError(MANIFEST, "expected a JSON object")

    if document.get("format") != FORMAT:
        raise ArchiveError(
            MANIFEST,
            f"not a calejo backup: expected format {FORMAT!r}, got "
            f"{document.get('format')!r:.60}",
        )
    version = document.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArchiveError(
            MANIFEST, f"expected an integer format_version, got {version!r:.40}"
        )
    if version > FORMAT_VERSION:
        raise ArchiveError(
            MANIFEST,
            f"archive format version {version} is newer than this adapter reads "
            f"(version {FORMAT_VERSION}); use a newer adapter",
        )
    if version != FORMAT_VERSION:
        raise ArchiveError(
            MANIFEST,
            f"archive format version {version} is not one this adapter reads "
            f"(version {FORMAT_VERSION})",
        )

    reader = _Reader(document)
    kind = reader.choice("kind", KINDS)
    contents = tuple(reader.content(entry) for entry in reader.list("contents"))
    paths = [c.path for c in contents]
    if len(set(paths)) != len(paths):
        raise ArchiveError(MANIFEST, "contents: a part is listed twice")

    manifest = Manifest(
        kind=kind,
        created_at=reader.time("created_at"),
        adapter_version=reader.text("adapter_version"),
        host=reader.text("host"),
        created_by=reader.text("created_by"),
        backend=reader.text("backend"),
        database=reader.database(document.get("database")),
        config=reader.config(document.get("config")),
        contents=contents,
    )
    _check_consistent(manifest)
    return manifest


def _check_consistent(manifest: Manifest) -> None:
    has_database = manifest.database is not None
    has_config = manifest.config is not None
    if manifest.kind in ("full", "database") and not has_database:
        raise ArchiveError(MANIFEST, f"a {manifest.kind} archive without a database")
    if manifest.kind == "config" and (has_database or not has_config):
        raise ArchiveError(
            MANIFEST, "a config archive must hold a config section and no database"
        )
    if manifest.kind == "database" and has_config:
        raise ArchiveError(MANIFEST, "a database archive with a config section")

    listed = {c.path for c in manifest.contents}
    if manifest.database is not None:
        for entry in manifest.database.tables:
            if entry.table.part not in listed:
                raise ArchiveError(
                    entry.table.part, "named by the manifest's tables, not in contents"
                )
    file_part = manifest.config.file_part if manifest.config is not None else None
    if file_part is not None and file_part not in listed:
        raise ArchiveError(file_part, "named as the config file, not in contents")
    for content in manifest.contents:
        if content.path.startswith("database/") and (
            manifest.database is None or manifest.database.table(content.path) is None
        ):
            raise ArchiveError(content.path, "in contents but not one of the tables")
        if content.path.startswith("config/") and manifest.config is None:
            raise ArchiveError(content.path, "in contents but there is no config part")


class _Reader:
    """Checks the fields of a manifest, naming each in its errors."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document

    def fail(self, key: str, expected: str, got: object) -> ArchiveError:
        return ArchiveError(MANIFEST, f"{key}: expected {expected}, got {got!r:.80}")

    def text(self, key: str, node: dict[str, Any] | None = None) -> str:
        value = (node if node is not None else self.document).get(key)
        if not isinstance(value, str):
            raise self.fail(key, "a text", value)
        return value

    def integer(self, key: str, node: dict[str, Any], low: int = 0) -> int:
        value = node.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise self.fail(key, f"an integer of at least {low}", value)
        return value

    def choice(self, key: str, choices: Sequence[Any]) -> Any:
        value = self.document.get(key)
        if value not in choices:
            raise self.fail(key, f"one of {', '.join(map(str, choices))}", value)
        return value

    def list(self, key: str, node: dict[str, Any] | None = None) -> list[Any]:
        value = (node if node is not None else self.document).get(key)
        if not isinstance(value, list):
            raise self.fail(key, "a list", value)
        return value

    def mapping(self, key: str, value: object) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, "an object", value)
        return value

    def time(self, key: str) -> dt.datetime:
        text = self.text(key)
        try:
            moment = dt.datetime.fromisoformat(text)
        except ValueError:
            raise self.fail(key, "an ISO 8601 time", text) from None
        if moment.tzinfo is None:
            raise self.fail(key, "an ISO 8601 time with its zone", text)
        return moment

    def content(self, entry: object) -> Content:
        node = self.mapping("contents[]", entry)
        path = self.text("path", node)
        pure = PurePosixPath(path)
        if (
            _PART.fullmatch(path) is None
            or pure.is_absolute()
            or any(p in ("..", ".", "") for p in path.split("/"))
        ):
            raise self.fail("contents[].path", "database/... or config/...", path)
        digest = self.text("sha256", node)
        if _HEX64.fullmatch(digest) is None:
            raise self.fail(f"contents[{path}].sha256", "64 hex digits", digest)
        return Content(
            path=path,
            sha256=digest,
            size=self.integer("size", node),
            mode=self.integer("mode", node) & 0o777,
        )

    def database(self, value: object) -> DatabaseSection | None:
        if value is None:
            return None
        node = self.mapping("database", value)
        tables = []
        for index, item in enumerate(self.list("tables", node)):
            try:
                table = Table.from_json(item, f"database.tables[{index}]")
            except DumpError as exc:
                raise ArchiveError(MANIFEST, str(exc)) from None
            entry = self.mapping("database.tables[]", item)
            if entry.get("part") != table.part:
                raise self.fail(f"database.tables[{index}].part", table.part, entry)
            tables.append(TableEntry(table, self.integer("rows", entry)))
        head = self.mapping("database.audit_chain_head", node.get("audit_chain_head"))
        head_hash = self.text("hash", head)
        if _HEX64.fullmatch(head_hash) is None:
            raise self.fail(
                "database.audit_chain_head.hash", "64 hex digits", head_hash
            )
        return DatabaseSection(
            backend=self.text("backend", node),
            source=self.mapping("database.source", node.get("source")),
            schema_version=self.integer("schema_version", node, 1),
            tables=tuple(tables),
            chain_head=(self.integer("id", head), head_hash),
        )

    def config(self, value: object) -> ConfigSection | None:
        if value is None:
            return None
        node = self.mapping("config", value)
        file = node.get("file")
        if file is not None and (
            not isinstance(file, str) or "/" in file or file in ("", ".", "..")
        ):
            raise self.fail("config.file", "a file name", file)
        source = node.get("source")
        if source is not None and not isinstance(source, str):
            raise self.fail("config.source", "a path", source)
        folders = []
        for item in self.list("folders", node):
            entry = self.mapping("config.folders[]", item)
            role = self.text("role", entry)
            if role not in FOLDER_ROLES:
                raise self.fail("config.folders[].role", "a known folder role", role)
            folders.append(
                ConfigFolder(
                    role=role,
                    source=self.text("source", entry),
                    mode=self.integer("mode", entry) & 0o777,
                )
            )
        return ConfigSection(
            file=file,
            source=source,
            mode=self.integer("mode", node) & 0o777,
            folders=tuple(folders),
        )


FOLDER_ROLES: Final = ("certificates", "opcua_trusted", "opcua_crl")
"""The folders a configuration part may hold, by role."""


# ---------------------------------------------------------------------------
# Names of archives.


def archive_name(kind: Kind, created_at: dt.datetime, number: int = 0) -> str:
    """``calejo-<kind>-<YYYYmmddTHHMMSSZ>[-n].tar.gz``."""
    stamp = created_at.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    suffix = f"-{number}" if number else ""
    return f"calejo-{kind}-{stamp}{suffix}.tar.gz"


def parse_archive_name(name: str) -> tuple[Kind, dt.datetime] | None:
    """The kind and creation time (UTC, to the second) an archive name holds."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    try:
        created = dt.datetime.strptime(match["stamp"], "%Y%m%dT%H%M%SZ")
    except ValueError:
        return None
    kind: Kind = match["kind"]  # type: ignore[assignment]
    return kind, created.replace(tzinfo=dt.UTC)


TEMP_PREFIX: Final = ".calejo-backup-"
TEMP_SUFFIX: Final = ".tmp"


# ---------------------------------------------------------------------------
# Writing.


@dataclasses.dataclass(frozen=True, slots=True)
class Staged:
    """A member waiting to be written: where its bytes are, or the bytes."""

    path: str
    source: Path | None = None
    data: bytes | None = None
    mode: int = 0o600


def digest_file(path: Path) -> tuple[str, int]:
    """SHA-256 (hex) and size of a file."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def content_of(member: Staged) -> Content:
    """The manifest entry of a staged member."""
    if member.data is not None:
        return Content(
            member.path,
            hashlib.sha256(member.data).hexdigest(),
            len(member.data),
            member.mode,
        )
    assert member.source is not None
    digest, size = digest_file(member.source)
    return Content(member.path, digest, size, member.mode)


def write_archive(
    folder: Path,
    kind: Kind,
    manifest: Manifest,
    members: Sequence[Staged],
    cancel: threading.Event | None = None,
) -> Path:
    """Write the archive into ``folder`` atomically; its final path.

    The manifest's contents must list ``members`` (see :func:`content_of`).
    Stops (removing the temporary file) when ``cancel`` is set.
    """
    folder.mkdir(parents=True, exist_ok=True)
    mtime = manifest.created_at.timestamp()
    fd, temp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=folder)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            with (
                gzip.GzipFile(
                    filename="",
                    mode="wb",
                    fileobj=raw,
                    compresslevel=6,
                    mtime=int(mtime),
                ) as compressed,
                tarfile.open(
                    fileobj=compressed, mode="w|", format=tarfile.PAX_FORMAT
                ) as tar,
            ):
                _add(tar, MANIFEST, io.BytesIO(manifest.to_bytes()), 0o600, mtime)
                for member in members:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("stopped: the adapter is shutting down")
                    if member.data is not None:
                        _add(
                            tar,
                            member.path,
                            io.BytesIO(member.data),
                            member.mode,
                            mtime,
                        )
                    else:
                        assert member.source is not None
                        with member.source.open("rb") as source:
                            _add(tar, member.path, source, member.mode, mtime)
            raw.flush()
            os.fsync(raw.fileno())
        return _publish(temp, folder, kind, manifest.created_at)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def _add(
    tar: tarfile.TarFile, name: str, source: IO[bytes], mode: int, mtime: float
) -> None:
    source.seek(0, os.SEEK_END)
    size = source.tell()
    source.seek(0)
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = mode
    info.mtime = int(mtime)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, source)


def _publish(temp: Path, folder: Path, kind: Kind, created_at: dt.datetime) -> Path:
    """Link ``temp`` to the first free archive name; never overwrite one."""
    for number in range(1000):
        final = folder / archive_name(kind, created_at, number)
        try:
            os.link(temp, final)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            if final.exists():
                continue
            os.rename(temp, final)
        _sync_folder(folder)
        return final
    raise OSError(f"{folder}: no free archive name for {kind} at {created_at}")


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# Reading.


class Part:
    """One member after the manifest, read as a stream and checked at its end."""

    def __init__(self, content: Content, stream: IO[bytes], guard: Any) -> None:
        self.content = content
        self.path = content.path
        self._stream = stream
        self._guard = guard
        self._digest = hashlib.sha256()
        self._size = 0
        self._done = False

    def chunks(self) -> Iterator[bytes]:
        """The bytes of the part, a chunk at a time."""
        while True:
            with self._guard(self.path):
                chunk = self._stream.read(CHUNK)
            if not chunk:
                return
            self._size += len(chunk)
            if self._size > self.content.size:
                raise ArchiveError(
                    self.path,
                    f"longer than the {self.content.size} bytes the manifest lists",
                )
            self._digest.update(chunk)
            yield chunk

    def read(self, limit: int) -> bytes:
        """The whole part (at most ``limit`` bytes), checked."""
        if self.content.size > limit:
            raise ArchiveError(
                self.path,
                f"expected at most {limit} bytes, the manifest lists "
                f"{self.content.size}",
            )
        data = b"".join(self.chunks())
        self.finish()
        return data

    def finish(self) -> None:
        """Read what is left and check size and SHA-256 against the manifest."""
        if self._done:
            return
        for _ in self.chunks():
            pass
        self._done = True
        if self._size != self.content.size:
            raise ArchiveError(
                self.path,
                f"size {self._size} bytes, the manifest lists {self.content.size}",
            )
        digest = self._digest.hexdigest()
        if digest != self.content.sha256:
            raise ArchiveError(
                self.path,
                f"sha256 mismatch: the manifest lists {self.content.sha256[:16]}..., "
                f"the archive holds {digest[:16]}... (damaged or altered)",
            )


class ArchiveReader:
    """Reads an archive once, in order: the manifest, then each part.

    ::

        with ArchiveReader(path) as archive:
            manifest = archive.manifest
            for part in archive.parts():
                ...  # consume part.chunks(), then part.finish()
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._raw: IO[bytes] | None = None
        self._gzip: gzip.GzipFile | None = None
        self._stream: _Decompressed | None = None
        self._tar: tarfile.TarFile | None = None
        self._manifest: Manifest | None = None

    def __enter__(self) -> ArchiveReader:
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def manifest(self) -> Manifest:
        assert self._manifest is not None
        return self._manifest

    def _open(self) -> None:
        try:
            self._raw = self.path.open("rb")
        except OSError as exc:
            raise ArchiveError(
                "archive", f"cannot read {self.path}: {exc.strerror or exc}"
            ) from exc
        head = self._raw.read(4)
        if not head:
            raise ArchiveError("archive", f"{self.path} is empty")
        if head[:2] != b"\x1f\x8b":
            raise ArchiveError(
                "archive",
                f"not a calejo backup: expected a gzip-compressed tar archive, got "
                f"{_describe_magic(head)}",
            )
        self._raw.seek(0)
        self._gzip = gzip.GzipFile(fileobj=self._raw, mode="rb")
        self._stream = _Decompressed(self._gzip)
        with self.guard("archive"):
            try:
                # Held open across parts(); close() closes it.
                self._tar = tarfile.open(  # noqa: SIM115
                    fileobj=self._stream, mode="r|"
                )
            except tarfile.ReadError as exc:
                if "end of data" in str(exc):
                    raise
                raise ArchiveError(
                    "archive",
                    "not a calejo backup: the gzip file does not hold a tar "
                    f"archive ({exc})",
                ) from exc

        with self.guard(MANIFEST):
            member = self._tar.next()
        if member is None:
            raise ArchiveError(
                "archive", "not a calejo backup: the tar archive is empty"
            )
        if member.name != MANIFEST:
            raise ArchiveError(
                MANIFEST,
                f"not a calejo backup: the first member is {member.name!r:.80}, "
                f"expected {MANIFEST}",
            )
        if not member.isreg() or member.size > MAX_MANIFEST_BYTES:
            raise ArchiveError(MANIFEST, "expected a regular file of at most 16 MiB")
        with self.guard(MANIFEST):
            stream = self._tar.extractfile(member)
            assert stream is not None
            data = stream.read()
        if len(data) != member.size:
            raise ArchiveError(MANIFEST, "archive truncated: it ends inside this part")
        self._manifest = parse_manifest(data)

    @contextlib.contextmanager
    def guard(self, part: str) -> Iterator[None]:
        """Turn a read failure into an ArchiveError naming ``part``."""
        try:
            yield
        except ArchiveError:
            raise
        except (EOFError, tarfile.ReadError) as exc:
            if isinstance(exc, tarfile.ReadError) and not (
                "end of data" in str(exc) or "truncated" in str(exc)
            ):
                raise ArchiveError(part, f"archive corrupt: {exc}") from exc
            raise ArchiveError(
                part, "archive truncated: it ends inside this part"
            ) from exc
        except (tarfile.TarError, zlib.error, gzip.BadGzipFile) as exc:
            raise ArchiveError(part, f"archive corrupt: {exc}") from exc
        except OSError as exc:
            raise ArchiveError(part, f"cannot read: {exc.strerror or exc}") from exc

    def parts(self) -> Iterator[Part]:
        """Each part in archive order; checks that every listed part came."""
        assert self._tar is not None and self._manifest is not None
        manifest = self._manifest
        seen: set[str] = set()
        while True:
            upcoming = [c.path for c in manifest.contents if c.path not in seen]
            with self.guard(upcoming[0] if upcoming else "archive"):
                member = self._tar.next()
            if member is None:
                break
            content = manifest.content(member.name)
            if content is None:
                raise ArchiveError(
                    member.name[:200], "in the archive but not listed in the manifest"
                )
            if member.name in seen:
                raise ArchiveError(member.name, "in the archive twice")
            if not member.isreg():
                raise ArchiveError(member.name, "expected a regular file")
            if member.size != content.size:
                raise ArchiveError(
                    member.name,
                    f"size {member.size} bytes, the manifest lists {content.size}",
                )
            seen.add(member.name)
            with self.guard(member.name):
                stream = self._tar.extractfile(member)
            assert stream is not None
            part = Part(content, stream, self.guard)
            yield part
            part.finish()

        missing = [c.path for c in manifest.contents if c.path not in seen]
        if missing:
            raise ArchiveError(
                missing[0],
                "missing from the archive (truncated?)"
                + (f"; {len(missing) - 1} more missing" if len(missing) > 1 else ""),
            )
        assert self._stream is not None
        with self.guard("archive"):
            while self._stream.read(CHUNK):
                pass
        if self._stream.truncated:
            raise ArchiveError(
                "archive", "archive truncated: it ends after the last part"
            )

    def close(self) -> None:
        for item in (self._tar, self._stream, self._gzip, self._raw):
            if item is not None:
                with contextlib.suppress(Exception):
                    item.close()
        self._tar = self._stream = self._gzip = self._raw = None


class _Decompressed(io.RawIOBase):
    """The gzip stream, ending quietly where the file was cut short.

    The tar reader reads ahead; were the cut reported by the gzip layer, it
    would surface in whatever part the reader happens to be on. Ended
    quietly, the tar reader finds the end of data inside the member the
    cut is really in, and names it. ``truncated`` tells that it happened.
    """

    def __init__(self, source: gzip.GzipFile) -> None:
        super().__init__()
        self._source = source
        self.truncated = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.truncated:
            return 0
        try:
            data = self._source.read1(len(buffer))
        except EOFError:
            self.truncated = True
            return 0
        buffer[: len(data)] = data
        return len(data)


def _describe_magic(head: bytes) -> str:
    if head.startswith(b"PK"):
        return "a zip file"
    if head.startswith(b"BZh"):
        return "a bzip2 file"
    if head.startswith(b"\xfd7zX"):
        return "an xz file"
    if head.startswith(b"SQLi"):
        return "an SQLite database"
    if head[:1] in (b"{", b"["):
        return "JSON text"
    return f"a file starting {head!r}"
