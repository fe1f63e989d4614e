"""TLS for the REST API: the ``tls:`` section, its certificate, live reload."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import shutil
import ssl
import subprocess
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from cryptography import x509

from calejo_server import certs
from calejo_server.app import HttpService
from calejo_server.config import Config, ConfigError, load_config
from calejo_server.ops import certs as ops_certs
from calejo_server.tls import (
    CIPHERS,
    ServerTls,
    TlsError,
    client_context,
    ensure_rest_certificate,
    parse_tls,
)

T = TypeVar("T")
TIMEOUT = 30.0


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, TIMEOUT)

    return asyncio.run(bounded())


def make_config(tmp_path: Path, tls: dict[str, Any] | None = None) -> Config:
    document: dict[str, Any] = {
        "server": {"data_dir": str(tmp_path / "data"), "bind": "127.0.0.1"}
    }
    if tls is not None:
        document["tls"] = tls
    path = tmp_path / "calejo.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return load_config(path, environ={})


# The section.


def test_defaults_put_the_files_in_the_certificate_folder(tmp_path: Path) -> None:
    settings = parse_tls(make_config(tmp_path))

    assert not settings.enabled
    assert settings.scheme == "http"
    assert settings.cert_file == tmp_path / "data" / "certs" / "rest.pem"
    assert settings.key_file == tmp_path / "data" / "certs" / "rest.key"
    assert settings.reload_interval == 10


@pytest.mark.parametrize(
    ("section", "key_path"),
    [
        ({"enabled": "yes"}, "tls.enabled"),
        ({"cert_file": 3}, "tls.cert_file"),
        ({"key_file": ""}, "tls.key_file"),
        ({"reload_interval": -1}, "tls.reload_interval"),
        ({"hostnames": "host"}, "tls.hostnames"),
        ({"ciphers": "ALL"}, "tls.ciphers"),
    ],
)
def test_bad_values_name_the_key(
    tmp_path: Path, section: dict[str, Any], key_path: str
) -> None:
    config = make_config(tmp_path, section)

    with pytest.raises(ConfigError) as error:
        parse_tls(config)

    assert error.value.key_path == key_path
    assert str(tmp_path / "calejo.yaml") in str(error.value)


# The certificate.


def test_first_start_issues_a_certificate_from_the_local_ca(tmp_path: Path) -> None:
    settings = parse_tls(
        make_config(tmp_path, {"enabled": True, "hostnames": ["scada.example"]})
    )

    info = ensure_rest_certificate(settings)

    ca = certs.load_certificate(settings.certificate_dir / "ca.crt")
    cert = certs.load_certificate(settings.cert_file)
    cert.verify_directly_issued_by(ca)
    assert "127.0.0.1" in info.ip_addresses
    assert {"localhost", "scada.example"} <= set(info.dns_names)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in usage
    assert settings.key_file.stat().st_mode & 0o077 == 0

    if shutil.which("openssl"):
        verify = subprocess.run(
            [
                "openssl",
                "verify",
                "-CAfile",
                str(settings.certificate_dir / "ca.crt"),
                str(settings.cert_file),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert verify.returncode == 0, verify.stderr


def test_a_valid_certificate_is_kept_and_one_near_expiry_reissued(
    tmp_path: Path,
) -> None:
    settings = parse_tls(make_config(tmp_path, {"enabled": True}))
    first = ensure_rest_certificate(settings)

    again = ensure_rest_certificate(settings)
    late = first.not_after - dt.timedelta(days=10)
    renewed = ensure_rest_certificate(settings, now=late)

    assert again.serial_number == first.serial_number
    assert renewed.serial_number != first.serial_number
    assert renewed.not_after > first.not_after


def test_half_a_pair_is_an_error_naming_the_missing_file(tmp_path: Path) -> None:
    settings = parse_tls(make_config(tmp_path, {"enabled": True}))
    ensure_rest_certificate(settings)
    settings.key_file.unlink()

    with pytest.raises(TlsError) as error:
        ensure_rest_certificate(settings)

    assert str(settings.key_file) in str(error.value)
    assert "missing" in str(error.value)


def test_a_certificate_of_another_authority_is_used_but_not_reissued(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    now = dt.datetime.now(dt.UTC)
    certs.self_signed_certificate(
        foreign / "api.pem",
        foreign / "api.key",
        application_uri="urn:foreign",
        common_name="foreign",
        hostnames=["127.0.0.1"],
        server=True,
        lifetime=dt.timedelta(days=20),
        now=now,
    )
    settings = parse_tls(
        make_config(
            tmp_path,
            {
                "enabled": True,
                "cert_file": str(foreign / "api.pem"),
                "key_file": str(foreign / "api.key"),
            },
        )
    )
    before = certs.certificate_info(settings.cert_file)

    with caplog.at_level(logging.WARNING, logger="calejo_server.tls"):
        info = ensure_rest_certificate(settings)
    assert info.serial_number == before.serial_number
    assert "expires" in caplog.text

    with pytest.raises(TlsError) as error:
        ensure_rest_certificate(settings, now=now + dt.timedelta(days=30))
    assert str(settings.cert_file) in str(error.value)
    assert "not issued by the local CA" in str(error.value)


def test_a_file_that_is_not_a_certificate_is_named(tmp_path: Path) -> None:
    settings = parse_tls(make_config(tmp_path, {"enabled": True}))
    ensure_rest_certificate(settings)
    settings.cert_file.write_text("not a certificate\n", encoding="utf-8")

    with pytest.raises(TlsError) as error:
        ensure_rest_certificate(settings)

    assert str(settings.cert_file) in str(error.value)
    assert "expected a PEM or DER x509 certificate" in str(error.value)


# Serving and reloading.


async def _hello(scope: Any, receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
        }
    )
    await send({"type": "http.response.body", "body": b"ok"})


class Client:
    """One kept-alive HTTPS connection to the service."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.port = port
        self.context = context
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> int:
        """Connect; the serial number of the certificate the server showed."""
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=self.context, server_hostname="127.0.0.1"
        )
        der = self.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return int(x509.load_der_x509_certificate(der).serial_number)

    async def get(self) -> bytes:
        assert self.reader is not None and self.writer is not None
        self.writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        return await self.reader.readexactly(2)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def _wait_for_serial(port: int, context: ssl.SSLContext, serial: int) -> None:
    for _ in range(200):
        client = Client(port, context)
        seen = await client.connect()
        await client.close()
        if seen == serial:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the service never showed serial {serial:x}")


def test_rotation_reaches_new_connections_and_spares_open_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path, {"enabled": True, "reload_interval": 0.05})
    settings = parse_tls(config)
    first = ensure_rest_certificate(settings)
    trust = client_context(settings.certificate_dir / "ca.crt")

    async def scenario() -> None:
        tls = ServerTls(settings)
        service = HttpService(_hello, "127.0.0.1", 0, tls=tls, graceful_timeout=1)
        await service.start()
        try:
            assert service.addresses() == [f"https://127.0.0.1:{service.port}/api/v1"]
            assert tls.context is not None
            assert tls.context.minimum_version == ssl.TLSVersion.TLSv1_2

            kept = Client(service.port, trust)
            assert await kept.connect() == first.serial_number
            assert await kept.get() == b"ok"

            (change,) = await asyncio.to_thread(ops_certs.rotate, config, "rest")
            new_serial = change.info.serial_number
            await _wait_for_serial(service.port, trust, new_serial)
            assert await kept.get() == b"ok"
            await kept.close()
            assert tls.reloads == 1

            # A broken pair (the previous key under the new certificate) is
            # refused; the new certificate stays in service.
            previous_key = settings.key_file.with_name("rest.key.previous")
            shutil.copyfile(previous_key, settings.key_file)
            for _ in range(200):
                if tls.reload_failures:
                    break
                await asyncio.sleep(0.02)
            assert tls.reload_failures == 1
            fresh = Client(service.port, trust)
            assert await fresh.connect() == new_serial
            assert await fresh.get() == b"ok"
            await fresh.close()
        finally:
            await service.stop()

    with caplog.at_level(logging.INFO, logger="calejo_server.tls"):
        run(scenario())
    assert "serving the new certificate" in caplog.text
    assert "does not load, keeping the one in service" in caplog.text


def test_an_untrusted_client_is_refused_and_insecure_skips_the_check(
    tmp_path: Path,
) -> None:
    settings = parse_tls(make_config(tmp_path, {"enabled": True}))
    ensure_rest_certificate(settings)
    other = tmp_path / "other"
    certs.ensure_authority(other)

    async def scenario() -> None:
        service = HttpService(_hello, "127.0.0.1", 0, tls=ServerTls(settings))
        await service.start()
        try:
            stranger = Client(service.port, client_context(other / "ca.crt"))
            with pytest.raises(ssl.SSLCertVerificationError):
                await stranger.connect()
            blind = Client(service.port, client_context(insecure=True))
            await blind.connect()
            assert await blind.get() == b"ok"
            await blind.close()
        finally:
            await service.stop()

    run(scenario())


def test_client_context_names_an_unreadable_ca_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.crt"

    with pytest.raises(TlsError) as error:
        client_context(missing)

    assert str(missing) in str(error.value)


def test_ciphers_are_accepted_by_openssl() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers(CIPHERS)

    names = {cipher["name"] for cipher in context.get_ciphers()}
    assert any("GCM" in name for name in names)
    assert not any("CBC" in name or "RC4" in name for name in names)
