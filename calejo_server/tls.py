"""TLS for the REST API: the ``tls:`` section, its certificate, live reload.

The ``tls:`` section of the configuration (every key optional)::

    tls:
      enabled: false
      cert_file: <certificate folder>/rest.pem
      key_file: <certificate folder>/rest.key
      hostnames: []          # extra names for a certificate issued here
      reload_interval: 10    # seconds between looks at the files; 0: never

With ``enabled: true`` the REST API answers HTTPS only (TLS 1.2 or newer).
When neither file exists the adapter issues them at start from the local
CA of the certificate folder (see :mod:`calejo_server.certs`), for this
host's name, ``localhost``, ``127.0.0.1``, the bind address and
``hostnames``; a certificate the local CA issued is reissued at start
when it expires within 30 days. A certificate from another authority is
used as it is (a warning is logged when it nears its expiry).

The running adapter looks at both files every ``reload_interval`` seconds;
when they have changed (``calejo certs rotate``) and stayed unchanged for
one more interval, and form a valid pair, new connections get the new
certificate, while open connections keep theirs. A pair that does not
load is logged and the old one stays in service.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import ssl
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import rsa

from calejo_server import certs
from calejo_server.config import Config, ConfigError

logger = logging.getLogger(__name__)

REST_CERT: Final = "rest.pem"
REST_KEY: Final = "rest.key"
RELOAD_INTERVAL: Final = 10.0
CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:!aNULL:!MD5:!DSS"
"""TLS 1.2 cipher suites: forward secrecy and AEAD only (TLS 1.3 has its own)."""

_KEYS: Final = frozenset(
    {"enabled", "cert_file", "key_file", "hostnames", "reload_interval"}
)


class TlsError(Exception):
    """The REST API's certificate cannot be used; the message names the file."""


@dataclasses.dataclass(frozen=True, slots=True)
class TlsConfig:
    """The ``tls:`` section, checked, with defaults filled in."""

    enabled: bool
    cert_file: Path
    key_file: Path
    certificate_dir: Path
    hostnames: tuple[str, ...]
    reload_interval: float
    bind: str

    @property
    def scheme(self) -> str:
        return "https" if self.enabled else "http"

    def names(self) -> tuple[str, ...]:
        """Host names and addresses for a certificate issued here."""
        return certs.default_hostnames([self.bind, *self.hostnames])


def parse_tls(config: Config, data_dir: Path | None = None) -> TlsConfig:
    """Read and check the ``tls:`` section; raises ConfigError."""
    where = str(config.source) if config.source else "<demonstration configuration>"
    folder = certs.certificate_folder(config, data_dir)
    section = config.raw.get("tls")
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise _error(where, "tls", "a mapping", section)

    unknown = sorted(str(key) for key in section if key not in _KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: tls.{unknown[0]}: unknown key; expected one of "
            f"{', '.join(sorted(_KEYS))}",
            source=where,
            key_path=f"tls.{unknown[0]}",
        )

    enabled = section.get("enabled", False)
    if not isinstance(enabled, bool):
        raise _error(where, "tls.enabled", "true or false", enabled)

    interval = section.get("reload_interval", RELOAD_INTERVAL)
    if (
        isinstance(interval, bool)
        or not isinstance(interval, int | float)
        or not 0 <= interval <= 86400
    ):
        raise _error(where, "tls.reload_interval", "seconds from 0 to 86400", interval)

    hostnames = section.get("hostnames", [])
    if not isinstance(hostnames, list) or not all(
        isinstance(name, str) and 0 < len(name) <= 253 for name in hostnames
    ):
        raise _error(where, "tls.hostnames", "a list of host names", hostnames)

    return TlsConfig(
        enabled=enabled,
        cert_file=_path(section, "cert_file", folder / REST_CERT, where),
        key_file=_path(section, "key_file", folder / REST_KEY, where),
        certificate_dir=folder,
        hostnames=tuple(hostnames),
        reload_interval=float(interval),
        bind=config.server.bind,
    )


def _path(section: Mapping[str, Any], key: str, default: Path, where: str) -> Path:
    value = section.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or not value:
        raise _error(where, f"tls.{key}", "a file path", value)
    return Path(value)


def _error(where: str, key_path: str, expected: str, got: object) -> ConfigError:
    shown = repr(got) if not isinstance(got, dict | list) else type(got).__name__
    return ConfigError(
        f"{where}: {key_path}: expected {expected}, got {shown}",
        source=where,
        key_path=key_path,
        expected=expected,
        got=shown,
    )


# The certificate.


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca`` signed ``cert``."""
    if cert.issuer != ca.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def issue_rest_certificate(
    settings: TlsConfig,
    *,
    hostnames: Sequence[str] | None = None,
    lifetime: dt.timedelta = certs.SERVER_LIFETIME,
    cert_path: Path | None = None,
    key_path: Path | None = None,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """Issue the REST API's certificate from the local CA (created if missing).

    Written to ``cert_path``/``key_path`` (default: the configured files).
    """
    moment = now or dt.datetime.now(dt.UTC)
    ca_cert, ca_key = certs.ensure_authority(settings.certificate_dir, now=moment)
    names = tuple(hostnames) if hostnames is not None else settings.names()
    return certs.issue_certificate(
        ca_cert,
        ca_key,
        cert_path or settings.cert_file,
        key_path or settings.key_file,
        application_uri=rest_uri(names[0]),
        common_name=f"Calejo Control Adapter REST API ({names[0]})",
        hostnames=names,
        server=True,
        lifetime=lifetime,
        now=moment,
    )


def rest_uri(hostname: str) -> str:
    """The URI in the subject alternative names of the REST certificate."""
    return f"urn:{hostname}:calejo:control-adapter:rest"


def ensure_rest_certificate(
    settings: TlsConfig,
    *,
    renew_within: dt.timedelta = certs.RENEW_WITHIN,
    now: dt.datetime | None = None,
) -> certs.CertificateInfo:
    """Make sure the REST API has a usable certificate and key; see the module.

    Raises TlsError naming the file that is missing, unreadable, expired or
    does not match its key.
    """
    moment = now or dt.datetime.now(dt.UTC)
    cert_path, key_path = settings.cert_file, settings.key_file
    have_cert, have_key = cert_path.exists(), key_path.exists()

    try:
        if not have_cert and not have_key:
            logger.info("creating the REST API certificate %s", cert_path)
            issue_rest_certificate(settings, now=moment)
            return certs.certificate_info(cert_path)

        if not have_cert or not have_key:
            missing = key_path if have_cert else cert_path
            raise TlsError(
                f"rest api certificate: expected both {cert_path} and {key_path}, "
                f"{missing} is missing; restore it, or remove both to have the "
                "adapter issue a new pair"
            )

        cert = certs.load_certificate(cert_path)
        key = certs.load_private_key(key_path)
        local = _local_ca(settings)
        ours = local is not None and issued_by(cert, local)
        problem = _problem(cert, key, moment, renew_within)

        if problem is not None and ours:
            logger.warning(
                "reissuing the REST API certificate %s: %s", cert_path, problem
            )
            issue_rest_certificate(settings, now=moment)
            return certs.certificate_info(cert_path)

        if problem is not None and not cert_matches(cert, key):
            raise TlsError(f"rest api certificate {cert_path}: {problem}")
        if problem is not None and cert.not_valid_after_utc <= moment:
            raise TlsError(
                f"rest api certificate {cert_path}: {problem}; it was not issued "
                "by the local CA, so replace it with one from its authority"
            )
        if problem is not None:
            logger.warning("rest api certificate %s: %s", cert_path, problem)
        return certs.certificate_info(cert_path)
    except certs.CertificateError as exc:
        raise TlsError(f"rest api certificate: {exc}") from exc


def cert_matches(cert: x509.Certificate, key: rsa.RSAPrivateKey) -> bool:
    """Whether ``key`` is the private key of ``cert``."""
    mine = key.public_key().public_numbers()
    theirs = cert.public_key()
    return isinstance(theirs, rsa.RSAPublicKey) and theirs.public_numbers() == mine


def _problem(
    cert: x509.Certificate,
    key: rsa.RSAPrivateKey,
    now: dt.datetime,
    renew_within: dt.timedelta,
) -> str | None:
    if not cert_matches(cert, key):
        return "its private key does not match it"
    if cert.not_valid_after_utc <= now:
        return f"expired {cert.not_valid_after_utc.isoformat()}"
    if cert.not_valid_after_utc - renew_within <= now:
        return f"expires {cert.not_valid_after_utc.isoformat()}"
    return None


def _local_ca(settings: TlsConfig) -> x509.Certificate | None:
    path = settings.certificate_dir / certs.CA_CERT
    if not path.exists():
        return None
    return certs.load_certificate(path)


# Serving.


class ServerTls:
    """The REST API's TLS: uvicorn's options, hardening, and live reload.

    ``uvicorn_options()`` goes into ``uvicorn.Config``; once the config is
    loaded, :meth:`attach` takes its ``SSLContext`` and starts watching the
    files; :meth:`detach` stops that.
    """

    def __init__(self, settings: TlsConfig) -> None:
        self.settings = settings
        self.context: ssl.SSLContext | None = None
        self.reloads = 0
        self.reload_failures = 0
        self.last_reload_error: str | None = None
        self._seen: tuple[object, ...] | None = None
        self._task: asyncio.Task[None] | None = None

    def uvicorn_options(self) -> dict[str, Any]:
        return {
            "ssl_certfile": str(self.settings.cert_file),
            "ssl_keyfile": str(self.settings.key_file),
            "ssl_ciphers": CIPHERS,
        }

    def attach(self, context: ssl.SSLContext) -> None:
        """Harden ``context`` (TLS 1.2 or newer) and watch the files."""
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.options |= ssl.OP_NO_COMPRESSION
        self.context = context
        self._seen = self._signature()
        if self.settings.reload_interval > 0:
            self._task = asyncio.create_task(self._watch(), name="rest-tls-reload")

    async def detach(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self) -> None:
        settling: tuple[object, ...] | None = None
        while True:
            await asyncio.sleep(self.settings.reload_interval)
            signature = self._signature()
            if signature == self._seen:
                settling = None
                continue
            if signature != settling:
                # Changed since the last look: wait one more interval, so a
                # pair being copied in file by file is read once it is whole.
                settling = signature
                continue
            self._seen = signature
            settling = None
            # In the event loop's thread: OpenSSL contexts are not to be
            # changed while another thread makes connections from them.
            self.reload()

    def _signature(self) -> tuple[object, ...]:
        signature: list[object] = []
        for path in (self.settings.cert_file, self.settings.key_file):
            try:
                st = path.stat()
            except OSError:
                signature.append(None)
            else:
                signature.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(signature)

    def reload(self) -> bool:
        """Load the certificate and key into the live context, if they pair.

        The files are copied first, checked in a scratch context, and the
        live context loads the same copies, so a rotation half done never
        reaches a client. Returns whether the new pair is in service.
        """
        if self.context is None:
            return False

        cert_file, key_file = self.settings.cert_file, self.settings.key_file
        try:
            with tempfile.TemporaryDirectory(prefix="calejo-tls-") as scratch:
                cert_copy = Path(scratch) / "cert.pem"
                key_copy = Path(scratch) / "key.pem"
                fd = os.open(key_copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(key_file.read_bytes())
                cert_copy.write_bytes(cert_file.read_bytes())

                trial = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                trial.load_cert_chain(cert_copy, key_copy)
                self.context.load_cert_chain(cert_copy, key_copy)
                info = certs.certificate_info(cert_copy)
        except (OSError, ssl.SSLError, certs.CertificateError) as exc:
            self.reload_failures += 1
            self.last_reload_error = f"{cert_file}, {key_file}: {exc}"
            logger.warning(
                "rest api: the changed certificate %s (key %s) does not load, "
                "keeping the one in service: %s",
                cert_file,
                key_file,
                exc,
            )
            return False

        self.reloads += 1
        self.last_reload_error = None
        logger.info(
            "rest api: serving the new certificate %s (serial %x, expires %s)",
            cert_file,
            info.serial_number,
            info.not_after.isoformat(),
        )
        return True


def prepare_server_tls(config: Config) -> ServerTls | None:
    """The REST API's TLS for ``config``, certificate made ready; None if off.

    Blocking (key generation): run it in a thread. Raises TlsError.
    """
    settings = parse_tls(config)
    if not settings.enabled:
        return None
    info = ensure_rest_certificate(settings)
    logger.info(
        "rest api certificate %s: %s, expires %s",
        settings.cert_file,
        info.subject,
        info.not_after.isoformat(),
    )
    return ServerTls(settings)


# Clients.


def client_context(
    cafile: Path | None = None, *, insecure: bool = False
) -> ssl.SSLContext:
    """A client context that trusts ``cafile`` (or the system's authorities).

    ``insecure`` checks neither the certificate nor the host name.
    """
    if insecure:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context

    if cafile is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(cafile))
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(
            f"certificate authority {cafile}: expected a readable PEM file of "
            f"certificates, could not load it ({exc})"
        ) from exc
