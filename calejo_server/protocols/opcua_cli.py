"""``calejo opcua``: browse and read an OPC UA server from the command line.

::

    calejo opcua browse opc.tcp://host:4840 [NODE]
    calejo opcua read opc.tcp://host:4840 NODE

``NODE`` is a node id (``ns=2;s=PumpStations/north``, ``i=2253``) or a
browse path from the Objects folder (``PumpStations/north/Pumps/p1``).
A path element may name its namespace (``0:Server``); one that does not
is in the adapter's namespace (``urn:calejo:control-adapter``) when the
server has it, else in namespace 0. ``browse`` lists Objects without one.

Security: ``--policy`` Basic256Sha256 (default), Aes256_Sha256_RsaPss,
Aes128_Sha256_RsaOaep or None; ``--mode`` SignAndEncrypt (default) or
Sign; ``--user`` with ``--password``, else ``CALEJO_OPCUA_PASSWORD``,
else a prompt on a terminal. Without ``--cert`` and ``--key`` the command
uses a client certificate of its own, made on first use in
``$XDG_CONFIG_HOME/calejo/opcua-client`` (``~/.config`` when unset) or,
where that cannot be written, in a temporary folder; an adapter trusts it
once it is copied into its trusted folder (``<data_dir>/opcua/trusted``).

Exit codes: 0 done; 1 refused (login, certificate, policy), unreachable,
timed out, or no such node; 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import getpass
import json
import logging
import math
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

if TYPE_CHECKING:
    from asyncua.client.client import Client

logger = logging.getLogger(__name__)

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
PASSWORD_VARIABLE: Final = "CALEJO_OPCUA_PASSWORD"
POLICIES: Final = (
    "Basic256Sha256",
    "Aes256_Sha256_RsaPss",
    "Aes128_Sha256_RsaOaep",
    "None",
)
MODES: Final = ("SignAndEncrypt", "Sign")
ADAPTER_NAMESPACE: Final = "urn:calejo:control-adapter"
CLIENT_FOLDER: Final = Path("calejo") / "opcua-client"
CLIENT_CERT: Final = "cert.pem"
CLIENT_KEY: Final = "key.pem"
MAX_CHILDREN: Final = 10_000
_NODE_ID_PREFIXES: Final = ("ns=", "i=", "s=", "g=", "b=", "nsu=")


class OpcUaCliError(Exception):
    """The command could not do what was asked; the message says why."""


@dataclasses.dataclass(frozen=True, slots=True)
class ClientCertificate:
    cert: Path
    key: Path
    application_uri: str
    generated: bool


# Arguments.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``calejo opcua browse|read`` on ``parser``."""
    parser.description = (
        "Browse or read a running OPC UA server (the adapter's or another) "
        "over a secure channel, as a SCADA client would."
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    browse = actions.add_parser("browse", help="list the children of a node")
    browse.add_argument("url", help="the endpoint, opc.tcp://HOST:PORT")
    browse.add_argument(
        "node",
        nargs="?",
        default=None,
        help="a node id or a browse path from Objects (default: Objects)",
    )

    read = actions.add_parser("read", help="read the value of a variable")
    read.add_argument("url", help="the endpoint, opc.tcp://HOST:PORT")
    read.add_argument("node", help="a node id or a browse path from Objects")

    for sub in (browse, read):
        _security_arguments(sub)
        sub.add_argument(
            "--json", action="store_true", help="print JSON instead of text"
        )


def _security_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", help="user name (default: an anonymous session)")
    parser.add_argument(
        "--password",
        help=f"the user's password (default: ${PASSWORD_VARIABLE}, else asked for)",
    )
    parser.add_argument("--policy", choices=POLICIES, default=POLICIES[0])
    parser.add_argument("--mode", choices=MODES, default=MODES[0])
    parser.add_argument(
        "--cert", type=Path, help="client certificate, PEM or DER (with --key)"
    )
    parser.add_argument("--key", type=Path, help="the client certificate's key, PEM")
    parser.add_argument(
        "--server-cert",
        type=Path,
        help="the server certificate to expect (default: the one it announces)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds to wait for the server (default 10)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``calejo opcua``; the exit code."""
    from calejo_server.cli import EXIT_USAGE, CommandError

    if (args.cert is None) != (args.key is None):
        raise CommandError("--cert and --key go together", EXIT_USAGE)
    if not 0 < args.timeout <= 3600 or math.isnan(args.timeout):
        raise CommandError(
            f"--timeout: expected 0 to 3600 seconds, got {args.timeout}", EXIT_USAGE
        )

    password = _password(args)
    # asyncua logs refusals and closed channels as warnings; the command
    # explains them in one line of its own instead.
    logging.getLogger("asyncua").setLevel(logging.CRITICAL + 1)
    try:
        return asyncio.run(_run(args, password, sys.stdout))
    except OpcUaCliError as exc:
        raise CommandError(str(exc)) from None


def _password(args: argparse.Namespace) -> str | None:
    if args.user is None:
        return None
    if args.password is not None:
        return str(args.password)
    from_env = os.environ.get(PASSWORD_VARIABLE)
    if from_env:
        return from_env
    if sys.stdin.isatty():
        return getpass.getpass(f"password of {args.user!r}: ")

    from calejo_server.cli import EXIT_USAGE, CommandError

    raise CommandError(
        f"--user {args.user}: expected --password or ${PASSWORD_VARIABLE}, "
        "got neither (and no terminal to ask on)",
        EXIT_USAGE,
    )


# Running.


async def _run(args: argparse.Namespace, password: str | None, out: TextIO) -> int:
    certificate = None
    if args.policy != "None":
        certificate = await asyncio.to_thread(_certificate, args.cert, args.key)
        if certificate.generated:
            print(
                f"calejo opcua: made a client certificate {certificate.cert} "
                f"({certificate.application_uri}); a server trusts it once it "
                "is in its trusted folder",
                file=sys.stderr,
            )

    client = await _connect(args, password, certificate)
    try:
        if args.action == "browse":
            return await _browse(client, args.node, args.json, out)
        return await _read(client, args.node, args.json, out)
    except Exception as exc:
        raise OpcUaCliError(_explain(exc, args, certificate, "node")) from None
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(args.timeout):
                await client.disconnect()


async def _connect(
    args: argparse.Namespace,
    password: str | None,
    certificate: ClientCertificate | None,
) -> Client:
    from asyncua import ua
    from asyncua.client.client import Client
    from asyncua.crypto import security_policies

    client = Client(args.url, timeout=args.timeout)
    if args.user is not None:
        client.set_user(args.user)
        client.set_password(password or "")

    try:
        async with asyncio.timeout(args.timeout * 2):
            if certificate is not None:
                name = args.policy.replace("_", "")
                policy = getattr(security_policies, f"SecurityPolicy{name}")
                client.application_uri = certificate.application_uri
                await client.set_security(
                    policy,
                    str(certificate.cert),
                    str(certificate.key),
                    server_certificate=(
                        str(args.server_cert) if args.server_cert else None
                    ),
                    mode=getattr(ua.MessageSecurityMode, args.mode),
                )
            await client.connect()
    except Exception as exc:
        with contextlib.suppress(Exception):
            await client.disconnect()
        raise OpcUaCliError(_explain(exc, args, certificate, "connect")) from None
    return client


async def _browse(client: Client, node: str | None, as_json: bool, out: TextIO) -> int:
    from asyncua import ua
    from asyncua.ua.attribute_ids import AttributeIds
    from asyncua.ua.object_ids import ObjectIds

    parent = await _resolve(client, node)
    children = await parent.get_children_descriptions(
        refs=ObjectIds.HierarchicalReferences
    )
    children = children[:MAX_CHILDREN]

    variables = [
        child for child in children if child.NodeClass == ua.NodeClass.Variable
    ]
    values: dict[str, Any] = {}
    if variables:
        nodes = [client.get_node(child.NodeId) for child in variables]
        read = await client.read_attributes(nodes, AttributeIds.Value)
        for child, data in zip(variables, read, strict=True):
            values[child.NodeId.to_string()] = data

    rows = []
    for child in children:
        node_id = child.NodeId.to_string()
        row: dict[str, Any] = {
            "browse_name": child.BrowseName.to_string(),
            "node_class": child.NodeClass.name,
            "node_id": node_id,
        }
        if node_id in values:
            row.update(_value(values[node_id]))
        rows.append(row)

    if as_json:
        print(json.dumps(rows, indent=2), file=out)
        return EXIT_OK

    for row in rows:
        line = f"{row['node_class']:<8} {row['browse_name']:<28} {row['node_id']}"
        if "value" in row:
            line += f"  = {_shown(row)}"
        print(line, file=out)
    if not rows:
        print("(no children)", file=out)
    return EXIT_OK


async def _read(client: Client, node: str, as_json: bool, out: TextIO) -> int:
    from asyncua.ua.attribute_ids import AttributeIds

    target = await _resolve(client, node)
    data = await target.read_attribute(AttributeIds.Value, raise_on_bad_status=False)
    row = {"node_id": target.nodeid.to_string(), **_value(data)}
    if as_json:
        print(json.dumps(row, indent=2), file=out)
    else:
        print(
            f"{row['node_id']} = {_shown(row)} ({row['type']}, {row['status']}"
            + (f", {row['source_timestamp']}" if row["source_timestamp"] else "")
            + ")",
            file=out,
        )
    return EXIT_OK if row["status"] == "Good" else EXIT_FAILED


async def _resolve(client: Client, node: str | None) -> Any:
    """The node named by a node id or a browse path from Objects."""
    from asyncua import ua

    if node is None or node in ("", "/", "Objects"):
        return client.nodes.objects

    text = node.strip()
    if text.startswith(_NODE_ID_PREFIXES):
        try:
            node_id = ua.NodeId.from_string(text)
        except Exception as exc:
            raise OpcUaCliError(
                f"node {text!r}: expected a node id such as ns=2;s=NAME or i=85"
            ) from exc
        found = client.get_node(node_id)
        await found.read_browse_name()
        return found

    default = 0
    with contextlib.suppress(Exception):
        default = int(await client.get_namespace_index(ADAPTER_NAMESPACE))
    path = []
    for part in text.strip("/").split("/"):
        if not part:
            raise OpcUaCliError(
                f"node {text!r}: expected a path such as PumpStations/north"
            )
        prefix, colon, name = part.partition(":")
        if colon and prefix.isdigit():
            path.append(f"{int(prefix)}:{name}")
        else:
            path.append(f"{default}:{part}")
    if path and path[0].split(":", 1)[1] == "Objects":
        path = path[1:]
    if not path:
        return client.nodes.objects
    return await client.nodes.objects.get_child(path)


def _value(data: Any) -> dict[str, Any]:
    variant = data.Value
    value = variant.Value if variant is not None else None
    kind = variant.VariantType.name if variant is not None else "Null"
    status = data.StatusCode.name if data.StatusCode is not None else "Good"
    stamp = data.SourceTimestamp
    return {
        "value": _json_ready(value),
        "type": kind,
        "status": status,
        "source_timestamp": stamp.isoformat() if stamp is not None else None,
    }


def _json_ready(value: object) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    return str(value)


def _shown(row: dict[str, Any]) -> str:
    if row["status"] != "Good" and row["value"] is None:
        return "(no value)"
    return (
        json.dumps(row["value"]) if isinstance(row["value"], str) else str(row["value"])
    )


# Client certificates.


def _certificate(cert: Path | None, key: Path | None) -> ClientCertificate:
    from calejo_server import certs

    if cert is not None and key is not None:
        try:
            uri = certs.certificate_application_uri(cert)
        except certs.CertificateError as exc:
            raise OpcUaCliError(f"--cert {cert}: {exc}") from None
        if uri is None:
            raise OpcUaCliError(
                f"--cert {cert}: expected an application uri (urn:...) among the "
                "subject alternative names, got none"
            )
        return ClientCertificate(cert, key, uri, generated=False)

    host = socket.gethostname() or "localhost"
    uri = f"urn:{host}:calejo:opcua-cli"
    for folder in _client_folders():
        made, key_path = folder / CLIENT_CERT, folder / CLIENT_KEY
        if made.is_file() and key_path.is_file():
            with contextlib.suppress(certs.CertificateError):
                uri = certs.certificate_application_uri(made) or uri
                return ClientCertificate(made, key_path, uri, generated=False)
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            certs.self_signed_certificate(
                made,
                key_path,
                application_uri=uri,
                common_name=f"calejo opcua on {host}",
                hostnames=[host, "localhost"],
            )
        except OSError as exc:
            logger.debug("cannot keep a client certificate in %s: %s", folder, exc)
            continue
        return ClientCertificate(made, key_path, uri, generated=True)

    raise OpcUaCliError(
        "cannot write a client certificate in the configuration folder nor in a "
        "temporary folder; give --cert and --key"
    )


def _client_folders() -> list[Path]:
    folders = []
    base = os.environ.get("XDG_CONFIG_HOME")
    if base:
        folders.append(Path(base) / CLIENT_FOLDER)
    with contextlib.suppress(RuntimeError, KeyError):
        folders.append(Path.home() / ".config" / CLIENT_FOLDER)
    folders.append(Path(tempfile.gettempdir()) / f"calejo-opcua-{os.getuid()}")
    return folders


# Errors.


def _explain(
    exc: BaseException,
    args: argparse.Namespace,
    certificate: ClientCertificate | None,
    stage: str,
) -> str:
    """One sentence naming what went wrong and what to do."""
    from asyncua import ua
    from asyncua.ua.status_codes import StatusCodes
    from asyncua.ua.uaerrors import UaError, UaStatusCodeError

    url = args.url
    if isinstance(exc, OpcUaCliError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return f"no answer from {url} within {args.timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return f"cannot connect to {url}: connection refused (is the server running?)"
    if isinstance(exc, socket.gaierror):
        return f"cannot connect to {url}: unknown host"
    if isinstance(exc, OSError) and not isinstance(exc, UaStatusCodeError):
        return f"cannot connect to {url}: {exc.strerror or exc}"

    if isinstance(exc, UaStatusCodeError):
        code = exc.code
        codes = StatusCodes
        name = ua.StatusCode(code).name
        if code in (
            codes.BadUserAccessDenied,
            codes.BadIdentityTokenRejected,
            codes.BadIdentityTokenInvalid,
        ):
            if stage != "connect":
                return f"{url}: the user {args.user!r} may not do this ({name})"
            if args.user is None:
                return (
                    f"{url} refused an anonymous session ({name}); "
                    "give --user and a password"
                )
            return (
                f"{url} refused the login of {args.user!r} ({name}): a wrong user "
                "name or password, a locked or deactivated account, or a password "
                "that must be changed first"
            )
        if code == codes.BadCertificateUntrusted and certificate is not None:
            return (
                f"{url} does not trust the client certificate {certificate.cert} "
                f"({name}); copy it into the server's trusted folder (on a Calejo "
                "adapter: <data_dir>/opcua/trusted) and try again"
            )
        if name.startswith("BadCertificate") and certificate is not None:
            return f"{url} refused the client certificate {certificate.cert} ({name})"
        if code in (codes.BadSecurityPolicyRejected, codes.BadSecurityModeRejected):
            if args.policy == "None":
                return f"{url} refuses sessions without security ({name})"
            return (
                f"{url} does not accept --policy {args.policy} --mode {args.mode} "
                f"({name})"
            )
        if code in (
            codes.BadNodeIdUnknown,
            codes.BadNoMatch,
            codes.BadNodeIdInvalid,
            codes.BadBrowseNameInvalid,
        ):
            return f"{url} has no node {args.node!r} ({name})"
        if code == codes.BadTimeout:
            return f"no answer from {url} within {args.timeout:g} s"
        return f"{url} answered {name}: {ua.StatusCode(code).doc}"

    if isinstance(exc, UaError) and "No matching endpoints" in str(exc):
        return (
            f"{url} offers no endpoint with --policy {args.policy} --mode {args.mode}"
        )
    return f"{url}: {type(exc).__name__}: {exc}"
