"""Durable state and the audit log: one interface, SQLite or PostgreSQL.

:func:`open_storage` picks the backend from the database URL; the caller
then awaits :meth:`Storage.open` and, at the end, :meth:`Storage.close`.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from calejo_server.storage.base import Storage, StorageError

__all__ = ["DEFAULT_SQLITE_FILE", "Storage", "StorageError", "open_storage"]

DEFAULT_SQLITE_FILE = "calejo.db"
"""The SQLite file in the data folder when no database URL is given."""


def open_storage(database_url: str | None, data_dir: Path) -> Storage:
    """The storage for ``database_url``, not yet opened.

    ``None`` or ``""``: SQLite in ``data_dir/calejo.db``.
    ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``:
    SQLite in that file (``sqlite://`` alone: the default file).
    ``postgresql://user:password@host:port/database`` (or ``postgres://``):
    PostgreSQL through asyncpg; without a database name, ``calejo``.
    The spool for outages lives in ``data_dir/spool/`` either way.
    """
    data_dir = Path(data_dir)
    if not database_url:
        from calejo_server.storage.sqlite import SQLiteStorage

        return SQLiteStorage(data_dir / DEFAULT_SQLITE_FILE, data_dir)

    scheme = database_url.split(":", 1)[0].lower() if ":" in database_url else ""
    if scheme == "sqlite":
        from calejo_server.storage.sqlite import SQLiteStorage

        return SQLiteStorage(_sqlite_path(database_url, data_dir), data_dir)
    if scheme in ("postgresql", "postgres", "postgresql+asyncpg"):
        from calejo_server.storage.postgres import PostgresStorage

        return PostgresStorage(database_url, data_dir)
    raise StorageError(
        "expected a database url starting sqlite:// or postgresql://, "
        f"got {_redact(database_url)!r}"
    )


def _sqlite_path(url: str, data_dir: Path) -> Path:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise StorageError(
            f"expected sqlite:///path (no host), got host {parts.netloc!r} in {url!r}"
        )
    if parts.query or parts.fragment:
        raise StorageError(f"expected sqlite:///path without options, got {url!r}")
    path = unquote(parts.path)
    if path in ("", "/"):
        return data_dir / DEFAULT_SQLITE_FILE
    if path == "/:memory:":
        raise StorageError(
            "expected a database file, got sqlite:///:memory: (an in-memory "
            "database is not durable)"
        )
    return Path(path[1:])


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)
