"""The adapter process: storage, security, engine and servers in one loop.

:class:`Adapter` composes the parts in the order they depend on each
other and stops them in reverse: storage, security, the control engine,
then the network services in :attr:`Adapter.services` (REST, Modbus TCP,
OPC UA). :func:`serve` runs an adapter on uvloop until
SIGTERM or Ctrl-C and shuts it down gracefully within
:data:`SHUTDOWN_BUDGET` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Generator, MutableMapping
from pathlib import Path
from typing import Any, Protocol, TextIO

import uvicorn
import uvloop

from calejo_server.api.health import HealthRegistry
from calejo_server.config import Config, ConfigError
from calejo_server.logs import parse_logging, setup_logging
from calejo_server.metrics import Metrics
from calejo_server.ops.certs import certificate_check
from calejo_server.storage.base import StorageError
from calejo_server.tls import ServerTls, TlsError, prepare_server_tls

logger = logging.getLogger(__name__)

SHUTDOWN_BUDGET = 5.0
"""Seconds from SIGTERM to exit: requests in flight, engine, storage."""
GRACEFUL_HTTP = 2.5
"""Of that budget, how long requests in flight may take to finish."""
STARTUP_TIMEOUT = 30.0
LOCK_FILE = "adapter.lock"

ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[MutableMapping[str, Any]]],
        Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ],
    Awaitable[None],
]


class AdapterError(Exception):
    """The adapter cannot start; the message says what to change."""


class Service(Protocol):
    """A network front end the adapter starts after the engine."""

    name: str

    async def start(self) -> None:
        """Start listening; raise AdapterError when that is impossible."""

    async def stop(self) -> None:
        """Stop accepting, let work in flight finish (bounded), close."""

    def addresses(self) -> list[str]:
        """Where clients reach it, for the log."""


class DataDirLock:
    """An exclusive lock on a data folder, held while an adapter runs on it.

    It keeps a second adapter (or a ``calejo users`` command) from writing
    the same embedded database and spool at the same time. The lock is an
    advisory ``flock`` on ``<data_dir>/adapter.lock``, released by the
    kernel even when the process is killed.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise AdapterError(
                f"cannot use data folder {self.path.parent}: {exc.strerror or exc}"
            ) from exc

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise AdapterError(
                    f"another adapter is running on data folder {self.path.parent}"
                    f"{f' (pid {holder})' if holder else ''}"
                ) from exc
            raise AdapterError(f"cannot lock {self.path}: {exc}") from exc

        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None

    @staticmethod
    def holder(data_dir: Path) -> int | None:
        """The pid of the adapter running on ``data_dir``, or None."""
        path = data_dir / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_pid(fd) or -1
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip() or "0") or None
    return None


class _UvicornServer(uvicorn.Server):
    """uvicorn's server without its own signal handling: the adapter's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class HttpService:
    """The REST API under uvicorn, in the adapter's event loop."""

    name = "http"

    def __init__(
        self,
        app: ASGIApp,
        host: str,
        port: int,
        *,
        access_log: bool = False,
        graceful_timeout: float = GRACEFUL_HTTP,
        tls: ServerTls | None = None,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.access_log = access_log
        self.graceful_timeout = graceful_timeout
        self.tls = tls
        self._server: _UvicornServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sock = listen_socket(self.host, self.port, "REST API")
        self.port = sock.getsockname()[1]

        config = uvicorn.Config(
            self.app,
            loop="none",
            http=_http_protocol(),
            lifespan="off",
            log_config=None,
            access_log=self.access_log,
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=max(1, round(self.graceful_timeout)),
            timeout_keep_alive=30,
            **(self.tls.uvicorn_options() if self.tls is not None else {}),
        )
        if self.tls is not None:
            config.load()
            assert config.ssl is not None
            self.tls.attach(config.ssl)
        server = _UvicornServer(config)
        self._server = server
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name="http")

        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not server.started:
            if self._task.done():
                await self._raise_start_failure()
            if time.monotonic() > deadline:
                raise AdapterError("the REST API did not start within 30 s")
            await asyncio.sleep(0.01)

    async def _raise_start_failure(self) -> None:
        assert self._task is not None
        try:
            await self._task
        except BaseException as exc:
            raise AdapterError(f"the REST API could not start: {exc!r}") from exc
        raise AdapterError("the REST API stopped while starting")

    async def stop(self) -> None:
        if self.tls is not None:
            await self.tls.detach()
        if self._server is None or self._task is None:
            return

        self._server.should_exit = True
        try:
            async with asyncio.timeout(self.graceful_timeout + 1.0):
                await asyncio.shield(self._task)
        except TimeoutError:
            logger.warning("REST API: requests still running at shutdown; closed")
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        except Exception:
            logger.exception("REST API: error while stopping")
        finally:
            self._server = None
            self._task = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def addresses(self) -> list[str]:
        return [f"{self.scheme}://{_host_for_url(self.host)}:{self.port}/api/v1"]


def _http_protocol() -> str | type[asyncio.Protocol]:
    """uvicorn's httptools protocol sending each answer in one write, else h11."""
    try:
        from calejo_server.api.transport import HttpProtocol
    except ImportError:
        return "h11"
    return HttpProtocol


def listen_socket(host: str, port: int, what: str) -> socket.socket:
    """A TCP socket bound to ``host:port``, ready for ``listen``.

    Raises AdapterError naming the address and the reason (in use,
    permission denied) instead of a traceback.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise AdapterError(
            f"{what}: cannot listen on {_host_for_url(host)}:{port}: "
            f"{exc.strerror or exc}"
        ) from exc

    sock.setblocking(False)
    return sock


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _login_host(host: str) -> str:
    if host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    return _host_for_url(host)


class Adapter:
    """One adapter: storage, security, engine and its network services."""

    def __init__(self, config: Config, *, out: TextIO | None = None) -> None:
        self.config = config
        self.out = out if out is not None else sys.stdout
        self.logging = parse_logging(config.raw, config.source)
        self.metrics = Metrics()
        self.health = HealthRegistry()
        self.services: list[Service] = []
        self.storage: Any = None
        self.security: Any = None
        self.engine: Any = None
        self.app: Any = None
        self.alerts: Any = None
        self._lock = DataDirLock(config.server.data_dir)
        self._started: list[Callable[[], Awaitable[None]]] = []

    async def start(self) -> None:
        """Start every part; on failure, stop what was started and raise."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        from calejo_server.api.app import create_app
        from calejo_server.engine import Engine
        from calejo_server.security import PasswordPolicyError, Security
        from calejo_server.storage import open_storage

        config = self.config
        self._lock.acquire()
        self._started.append(self._release_lock)

        self.storage = open_storage(config.database.url, config.server.data_dir)
        await self.storage.open()
        self._started.append(self.storage.close)
        logger.info(
            "storage: %s (data folder %s)",
            self.storage.backend,
            config.server.data_dir.resolve(),
        )

        self.security = Security(config.security, self.storage)
        await self.security.start()
        self._started.append(self.security.stop)
        try:
            password = await self.security.ensure_admin(config.security.admin_password)
        except PasswordPolicyError as exc:
            raise ConfigError(
                f"security.admin_password (CALEJO_ADMIN_PASSWORD): {exc}",
                key_path="security.admin_password",
            ) from None

        from calejo_server.alerts import AlertService

        self.alerts = AlertService.from_config(config, self.storage, health=self.health)
        await self.alerts.start()
        self._started.append(self.alerts.stop)
        self.alerts.watch_security(self.security)

        self.engine = Engine(config, self.storage)
        self.alerts.watch_engine(self.engine)
        await self.engine.start()
        self._started.append(self.engine.stop)

        self.metrics.bind_engine(self.engine)
        self.metrics.bind_storage(self.storage)
        self.app = create_app(
            engine=self.engine,
            security=self.security,
            storage=self.storage,
            config=config,
            metrics=self.metrics,
            health=self.health,
            alerts=self.alerts,
        )

        try:
            tls = await asyncio.to_thread(prepare_server_tls, config)
        except TlsError as exc:
            raise AdapterError(str(exc)) from exc
        http = HttpService(
            self.app,
            config.server.bind,
            config.server.http_port,
            access_log=self.logging.access_log,
            tls=tls,
        )

        from calejo_server.protocols.modbus import ModbusServer

        # Modbus first (it fails fast on a port it may not use), then OPC UA
        # (the slowest: certificates, its worker, the address space), REST
        # last, so that the REST API answering means the adapter is up.
        modbus = ModbusServer(self.engine, config)
        self.services.append(modbus)
        self.health.register("modbus", modbus.health_check)
        self.metrics.add_live_source(modbus.collect)

        from calejo_server.protocols.opcua import OpcUaServer

        opcua = OpcUaServer(self.engine, self.security, config, storage=self.storage)
        if opcua.options.enabled:
            self.services.append(opcua)
            self.health.register("opcua", opcua.health_check)
        self.services.append(http)
        self.health.register("certificates", certificate_check(config, self.services))

        from calejo_server.ops.backup_scheduler import BackupScheduler

        self.backups = BackupScheduler(self)
        await self.backups.start()
        self._started.append(self.backups.stop)

        for service in self.services:
            await service.start()
            self._started.append(service.stop)
            for address in service.addresses():
                logger.info("%s: listening on %s", service.name, address)

        if password is not None:
            self._print_admin(password, http)
        logger.info(
            "adapter started: %d station(s)%s",
            len(self.engine.stations()),
            " (demonstration configuration)" if config.demo else "",
        )

    async def _release_lock(self) -> None:
        self._lock.release()

    def _print_admin(self, password: str, http: HttpService) -> None:
        host = _login_host(self.config.server.bind)
        base = f"{http.scheme}://{host}:{http.port}/api/v1"
        line = "=" * 72
        body = f'{{"username": "admin", "password": "{password}"}}'
        trust = ""
        if http.tls is not None:
            trust = f"--cacert {http.tls.settings.certificate_dir / 'ca.crt'} "
        print(
            f"\n{line}\n"
            "An administrator account was created. Its password is shown\n"
            "only this once: keep it somewhere safe.\n\n"
            "    username: admin\n"
            f"    password: {password}\n\n"
            f"Log in:  POST {base}/auth/login\n\n"
            f"    curl -s {trust}-X POST {base}/auth/login \\\n"
            "         -H 'Content-Type: application/json' \\\n"
            f"         -d '{body}'\n"
            f"{line}\n",
            file=self.out,
            flush=True,
        )

    async def stop(self) -> None:
        """Stop what was started, newest first; never raises."""
        while self._started:
            stop = self._started.pop()
            try:
                await stop()
            except Exception:
                logger.exception("error while stopping the adapter")
        self.services.clear()


async def run(config: Config, *, out: TextIO | None = None) -> int:
    """Run an adapter until SIGTERM or SIGINT; the exit code."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        if stopping.is_set():
            logger.warning("%s again: already stopping", sig.name)
            return
        received.append(sig.name)
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    adapter = Adapter(config, out=out)
    try:
        await adapter.start()
    except (AdapterError, StorageError) as exc:
        logger.error("cannot start: %s", exc)
        return 1

    await stopping.wait()
    started = time.monotonic()
    logger.info("%s received: stopping", received[0] if received else "stop")
    try:
        async with asyncio.timeout(SHUTDOWN_BUDGET):
            await adapter.stop()
    except TimeoutError:
        logger.error("shutdown took longer than %.0f s; exiting", SHUTDOWN_BUDGET)
        return 1

    logger.info("adapter stopped in %.2f s", time.monotonic() - started)
    return 0


def serve(config: Config) -> int:
    """``calejo serve``: set up logging, run the adapter on uvloop."""
    setup_logging(parse_logging(config.raw, config.source))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run(config))
