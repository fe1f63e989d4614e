"""``calejo health-check``: ask a running adapter how it is, one line each.

The command reads ``GET /api/v1/health/detailed`` and prints the
adapter's status, then one line for the REST API itself (did it answer,
how fast, over what) and one line for each component: storage, Modbus,
OPC UA, watchdog, alerts and certificates first, then any other the
adapter reports (the engine). A component the adapter does not report is
printed as ``unknown``. Exit codes: 0 ok, 1 degraded, 2 down or
unreachable.

Over HTTPS the adapter's certificate is checked against ``--cafile``,
else against the local CA of the certificate folder of the configuration
(``ca.crt``) when it exists, else against the system's authorities;
``--insecure`` checks nothing (the line says so).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Final, TextIO

from calejo_server import certs
from calejo_server.config import Config, ConfigError, load_config
from calejo_server.tls import TlsError, client_context, parse_tls

EXIT_OK: Final = 0
EXIT_DEGRADED: Final = 1
EXIT_DOWN: Final = 2

COMPONENTS: Final = ("storage", "modbus", "opcua", "watchdog", "alerts", "certificates")
"""Components printed even when the adapter does not report them."""


@dataclasses.dataclass(frozen=True, slots=True)
class Trust:
    """How the adapter's certificate is checked over HTTPS."""

    context: ssl.SSLContext
    description: str


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Ask a running adapter for its health (GET /api/v1/health/detailed) "
        "and print one line for the REST API and one per component: storage, "
        "modbus, opcua, watchdog, alerts, certificates and the engine. Exit 0 "
        "ok, 1 degraded, 2 down or unreachable."
    )
    parser.add_argument(
        "--url",
        help="the adapter's base URL (default: http(s)://127.0.0.1:<http_port> "
        "from the configuration)",
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait (default 5)"
    )
    parser.add_argument(
        "--cafile",
        type=Path,
        help="PEM file of the authorities to trust over https (default: the "
        "local CA, ca.crt in the certificate folder, if it exists)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="over https, check neither the certificate nor the host name",
    )


def run(args: argparse.Namespace) -> int:
    """``calejo health-check``."""
    config: Config | None = None
    base = args.url
    if base is None:
        config = load_config(getattr(args, "config", None))
        base = default_url(config)

    trust: Trust | None = None
    if base.lower().startswith("https:"):
        try:
            trust = _trust(args, config)
        except TlsError as exc:
            print(f"calejo: {exc}", file=sys.stderr)
            return EXIT_DOWN

    return health_check(base, args.timeout, sys.stdout, trust)


def default_url(config: Config) -> str:
    """The adapter's base URL on this host, from the configuration."""
    host = config.server.bind
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{parse_tls(config).scheme}://{host}:{config.server.http_port}"


def _trust(args: argparse.Namespace, config: Config | None) -> Trust:
    if args.insecure:
        return Trust(client_context(insecure=True), "certificate not checked")
    if args.cafile is not None:
        return Trust(client_context(args.cafile), f"verified against {args.cafile}")

    if config is None:
        try:
            config = load_config(getattr(args, "config", None))
        except ConfigError as exc:
            print(
                f"calejo: not using the local CA, the configuration does not "
                f"load: {exc}",
                file=sys.stderr,
            )
    if config is not None:
        local = certs.certificate_folder(config) / certs.CA_CERT
        if local.exists():
            return Trust(client_context(local), f"verified against {local}")
    return Trust(client_context(), "verified against the system's authorities")


def health_check(
    base_url: str, timeout: float, out: TextIO, trust: Trust | None = None
) -> int:
    """Print the adapter's health; return 0 ok, 1 degraded, 2 down."""
    url = base_url.rstrip("/")
    if not url.endswith("/api/v1"):
        url += "/api/v1"
    url += "/health/detailed"

    started = time.monotonic()
    try:
        status_code, body = _get_json(url, timeout, trust)
    except (OSError, ValueError) as exc:
        print(f"adapter: down (cannot reach {url}: {_reason(exc)})", file=out)
        print(f"rest: down - no answer from {url}", file=out)
        for name in COMPONENTS:
            print(f"{name}: unknown - the adapter did not answer", file=out)
        return EXIT_DOWN
    elapsed = (time.monotonic() - started) * 1000

    status = str(body.get("status", "down")) if isinstance(body, dict) else "down"
    if status_code >= 500 and status == "ok":
        status = "down"
    print(f"adapter: {status}", file=out)

    over = f"https, {trust.description}" if trust is not None else "http"
    print(
        f"rest: ok - {url} answered {status_code} in {elapsed:.1f} ms ({over})",
        file=out,
    )

    components = body.get("components", {}) if isinstance(body, dict) else {}
    lines = dict(component_lines(components))
    for name in COMPONENTS:
        print(
            f"{name}: {lines.pop(name, 'unknown - not reported by the adapter')}",
            file=out,
        )
    for name, line in lines.items():
        print(f"{name}: {line}", file=out)

    if status == "ok":
        return EXIT_OK
    if status == "degraded":
        return EXIT_DEGRADED
    return EXIT_DOWN


def _get_json(url: str, timeout: float, trust: Trust | None) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    context = trust.context if trust is not None else None
    try:
        with urllib.request.urlopen(
            request, timeout=timeout, context=context
        ) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        with error:
            payload = error.read()
        try:
            return error.code, json.loads(payload)
        except ValueError:
            return error.code, {"status": "down"}


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def component_lines(components: Any) -> list[tuple[str, str]]:
    """``(name, "state - detail (key=value, ...)")`` per component."""
    if not isinstance(components, dict):
        return []

    lines = []
    for name, value in components.items():
        if not isinstance(value, dict):
            lines.append((str(name), str(value)))
            continue

        state = value.get("state", value.get("status", "unknown"))
        text = str(state)
        detail = value.get("detail")
        if detail:
            text += f" - {detail}"
        figures = [
            f"{key}={_compact(item)}"
            for key, item in value.items()
            if key not in ("state", "status", "detail")
            and isinstance(item, int | float | str)
        ]
        if figures:
            text += f" ({', '.join(figures)})"
        lines.append((str(name), text))
    return lines


def _compact(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
