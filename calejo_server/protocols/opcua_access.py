"""Who may talk to the OPC UA server, and as whom.

asyncua checks users synchronously and leaves certificate trust, policy
selection and request permissions to whoever runs it. This module puts the
adapter's rules into its message processing, in one place:

- OpenSecureChannel: only the configured security policies and modes; the
  client certificate must pass the trust list, else the channel is refused
  with an OPC UA error message and closed. A channel without security is
  always allowed for discovery (GetEndpoints, FindServers), as clients use
  it to learn the endpoints; sessions on it need ``allow_none_endpoint``.
- CreateSession: the certificate in the request must be the channel's, and
  name the client's application URI.
- ActivateSession: a user name token is checked with
  :meth:`Security.check_password` (the adapter's users, roles, lockout,
  throttling and audit) before asyncua sees it; anonymous tokens only when
  configured, as the ``viewer`` role. A session that opens is audited as
  LOGIN_SUCCESS (protocol OPCUA).
- Every other request: allowed by kind (reading, browsing, subscribing,
  calling methods) and only while the user is active and its role grants
  ``read_pump_status``; writes and node management are refused. The first
  refusal of each kind of request in a session is audited as
  ACCESS_DENIED; the rest are counted, so a client that keeps asking
  cannot flood the audit log.

The hooks replace asyncua's per-connection processor; they are exercised
by the OPC UA tests with a real client, which is what guards them across
asyncua releases.
"""

# asyncua's message processor is not annotated; its methods are called here.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import datetime as dt
import logging
import socket
import weakref
from collections.abc import Collection, Sequence
from typing import Any, Protocol

from asyncua import ua
from asyncua.common.connection import TransportLimits
from asyncua.common.utils import Buffer, ServiceError
from asyncua.crypto.permission_rules import SimpleRoleRuleset, User, UserRole
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
from asyncua.server.internal_server import InternalServer
from asyncua.server.server import Server
from asyncua.server.subscription_service import SubscriptionService
from asyncua.server.uaprocessor import UaProcessor
from asyncua.server.user_managers import UserManager
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.ua_binary import struct_from_binary, uatcp_to_binary
from asyncua.ua.uaerrors import UaError

from calejo_server import audit
from calejo_server.protocols.opcua_link import PROTOCOL
from calejo_server.protocols.opcua_trust import Refusal, TrustList, first_certificate
from calejo_server.security.directory import (
    AuthError,
    Principal,
    SecurityError,
    UnknownUser,
)
from calejo_server.security.roles import READ_PUMP_STATUS, VIEWER
from calejo_server.storage.base import AuditRecord, StorageError

logger = logging.getLogger(__name__)

MAX_USERNAME = 256
MAX_PASSWORD = 1024
BUFFER_BYTES = 65535
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Largest OPC UA message either side may send (asyncua allows 100 MiB)."""
NONE_POLICY_URI = "http://opcfoundation.org/UA/SecurityPolicy#None"


def numeric_node_id(identifier: int) -> ua.NodeId:
    """A node id of namespace 0 (asyncua annotates its ints as its own type)."""
    return ua.NodeId(identifier)  # type: ignore[arg-type]


def status(code: int) -> ua.StatusCode:
    """An OPC UA status code (asyncua annotates its ints as its own type)."""
    return ua.StatusCode(code)  # type: ignore[arg-type]


def _ids(*names: str) -> frozenset[ua.NodeId]:
    return frozenset(
        numeric_node_id(getattr(ObjectIds, f"{name}Request_Encoding_DefaultBinary"))
        for name in names
    )


DISCOVERY = _ids("GetEndpoints", "FindServers", "FindServersOnNetwork")
"""Requests answered on any channel, without a session."""

CREATE_SESSION = numeric_node_id(ObjectIds.CreateSessionRequest_Encoding_DefaultBinary)
ACTIVATE_SESSION = numeric_node_id(
    ObjectIds.ActivateSessionRequest_Encoding_DefaultBinary
)
CALL = numeric_node_id(ObjectIds.CallRequest_Encoding_DefaultBinary)
REGISTER_SERVER = _ids("RegisterServer", "RegisterServer2")
"""Discovery-server services: the adapter is not a discovery server."""

READ_SERVICES = _ids(
    "Read",
    "Browse",
    "BrowseNext",
    "TranslateBrowsePathsToNodeIds",
    "RegisterNodes",
    "UnregisterNodes",
    "CreateSubscription",
    "ModifySubscription",
    "DeleteSubscriptions",
    "TransferSubscriptions",
    "CreateMonitoredItems",
    "ModifyMonitoredItems",
    "DeleteMonitoredItems",
    "SetMonitoringMode",
    "SetPublishingMode",
    "SetTriggering",
    "Publish",
    "Republish",
    "CloseSecureChannel",
)
"""Requests a user with ``read_pump_status`` may make. Write, history and
node management are not among them: every variable is read-only."""


@dataclasses.dataclass
class SessionUser(User):
    """The user of an OPC UA session: an adapter user, or anonymous.

    ``role`` stays asyncua's plain User role, never its Admin (which would
    let a client add and delete nodes).
    """

    principal: Principal | None = None

    @property
    def username(self) -> str | None:
        return self.principal.username if self.principal else None


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """Who makes the request being processed, for method handlers."""

    user: SessionUser | None
    address: str | None


_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "calejo_opcua_caller", default=None
)
_LOGIN: contextvars.ContextVar[_Login | None] = contextvars.ContextVar(
    "calejo_opcua_login", default=None
)


def current_caller() -> Caller | None:
    """The caller of the request being processed (None outside one)."""
    return _CALLER.get()


@dataclasses.dataclass(frozen=True, slots=True)
class _Login:
    """The verdict on the identity token of one ActivateSession request.

    ``username`` None: the token carried no user (anonymous). A refused
    user token has no principal.
    """

    username: str | None
    principal: Principal | None


_ANONYMOUS = _Login(None, None)
_REFUSED = _Login("", None)


class Account(Protocol):
    """A user as far as access goes."""

    @property
    def active(self) -> bool: ...

    @property
    def role(self) -> str: ...


class Directory(Protocol):
    """The users and roles that sessions are checked against.

    :class:`~calejo_server.security.Security` is one; the OPC UA worker
    process has one that asks the adapter.
    """

    async def check_password(
        self, username: str, password: str, source: str | None, protocol: str
    ) -> Principal: ...

    async def deny(
        self,
        *,
        status: int,
        reason: str,
        principal: Principal | None,
        source: str | None,
        protocol: str,
        method: str,
        path: str,
        permission: str | None = None,
    ) -> None: ...

    def user(self, user_id: str) -> Account: ...

    def permissions_of(self, role: str) -> frozenset[str]: ...


class AuditSink(Protocol):
    """Where the audit records of sessions go (the adapter's storage)."""

    async def write(self, records: Sequence[Any]) -> Any: ...


class ChannelRefused(Exception):
    """A secure channel the server will not open; ``code`` says why."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class Access(UserManager):
    """The adapter's rules for OPC UA clients (see the module doc)."""

    def __init__(
        self,
        security: Directory,
        trust: TrustList,
        *,
        policy_uris: Collection[str],
        allow_none: bool,
        allow_anonymous: bool,
        storage: AuditSink | None = None,
    ) -> None:
        self.security = security
        self.trust = trust
        self.storage = storage
        self.policy_uris = frozenset(policy_uris)
        self.allow_none = allow_none
        self.allow_anonymous = allow_anonymous
        self.refused_channels = 0
        self.refused_logins = 0
        self.refused_requests = 0
        self._refused: weakref.WeakKeyDictionary[Any, set[str]] = (
            weakref.WeakKeyDictionary()
        )

    # Channels.

    def check_channel(self, policy_uri: str, certificate: bytes | None) -> None:
        """Raise ChannelRefused unless a channel with this policy may open."""
        if policy_uri == NONE_POLICY_URI:
            return

        if policy_uri not in self.policy_uris:
            raise ChannelRefused(
                StatusCodes.BadSecurityPolicyRejected,
                f"security policy {policy_uri!r} is not offered; expected one of "
                f"{sorted(self.policy_uris)}",
            )

        if not certificate:
            raise ChannelRefused(
                StatusCodes.BadCertificateInvalid,
                f"security policy {policy_uri!r} needs a client certificate, "
                "none was sent",
            )

        try:
            self.trust.check(certificate)
        except Refusal as refusal:
            raise ChannelRefused(_status(refusal.code), str(refusal)) from None

    def check_request(self, policy_uri: str, typeid: ua.NodeId) -> None:
        """Refuse everything but discovery on an unsecured channel, unless allowed."""
        if policy_uri != NONE_POLICY_URI or self.allow_none:
            return
        if typeid in DISCOVERY:
            return
        raise ServiceError(StatusCodes.BadSecurityPolicyRejected)

    def check_session_certificate(
        self,
        policy_uri: str,
        channel_certificate: bytes | None,
        params: ua.CreateSessionParameters,
    ) -> None:
        """The certificate of CreateSession must be the channel's, and trusted."""
        if policy_uri == NONE_POLICY_URI:
            return

        sent = first_certificate(params.ClientCertificate or b"")
        channel = first_certificate(channel_certificate or b"")
        if not sent or sent != channel:
            logger.warning(
                "opc ua session refused: the certificate of CreateSession is not "
                "the one of its secure channel"
            )
            raise ServiceError(StatusCodes.BadCertificateInvalid)

        description = params.ClientDescription
        uri = description.ApplicationUri if description is not None else None
        try:
            self.trust.check(sent, application_uri=uri or "")
        except Refusal as refusal:
            raise ServiceError(_status(refusal.code)) from None

    # Logins.

    async def login(
        self,
        session: Any,
        params: ua.ActivateSessionParameters,
        address: str | None,
        iserver: InternalServer,
    ) -> _Login:
        """Check the identity token of ActivateSession."""
        token = params.UserIdentityToken
        if isinstance(token, ua.UserNameIdentityToken):
            return await self._password_login(session, token, address, iserver)

        if isinstance(token, ua.X509IdentityToken):
            await self._refuse(address, "certificate identity tokens are not accepted")
            return _REFUSED

        if not self.allow_anonymous:
            await self._refuse(address, "anonymous login refused")
            return _REFUSED
        return _ANONYMOUS

    async def _password_login(
        self,
        session: Any,
        token: ua.UserNameIdentityToken,
        address: str | None,
        iserver: InternalServer,
    ) -> _Login:
        try:
            username, password = iserver.decrypt_user_token(session, token)
        except Exception:
            await self._refuse(address, "user name token could not be decrypted")
            return _REFUSED

        if not isinstance(username, str) or not isinstance(password, str):
            await self._refuse(address, "user name token without name or password")
            return _REFUSED

        if len(username) > MAX_USERNAME or len(password) > MAX_PASSWORD:
            await self._refuse(address, "user name or password too long")
            return _REFUSED

        try:
            principal = await self.security.check_password(
                username, password, address, PROTOCOL
            )
        except (AuthError, SecurityError) as exc:
            self.refused_logins += 1
            logger.info(
                "opc ua login of %r from %s refused: %s", username, address, exc
            )
            return _Login(username, None)

        if principal.must_change_password:
            self.refused_logins += 1
            await self.security.deny(
                status=403,
                reason="password change required before other use",
                principal=principal,
                source=address,
                protocol=PROTOCOL,
                method="ActivateSession",
                path="session",
            )
            return _Login(username, None)

        logger.info(
            "opc ua session of %r (%s) from %s", username, principal.role, address
        )
        await self.record(
            audit.LOGIN_SUCCESS,
            username,
            address,
            details={"action": "session", "role": principal.role},
        )
        return _Login(username, principal)

    async def record(
        self,
        event_type: str,
        user: str | None,
        address: str | None,
        *,
        outcome: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        """Write one audit record of an OPC UA session (when storage is given)."""
        if self.storage is None:
            return
        row = AuditRecord(
            event_type=event_type,
            severity=audit.severity_of(event_type),
            timestamp=dt.datetime.now(dt.UTC),
            user=user,
            source_address=address,
            protocol=PROTOCOL,
            outcome=outcome,
            details=details or {},
        )
        try:
            await self.storage.write([row])
        except StorageError as exc:
            logger.error("opc ua: could not record %s: %s", event_type, exc)

    async def refused_request(
        self, session: Any, typeid: ua.NodeId, address: str | None
    ) -> None:
        """Count a refused request; audit the first of its kind in a session."""
        self.refused_requests += 1
        service = _service_name(typeid)
        seen = self._refused.setdefault(session, set())
        if service in seen:
            return
        seen.add(service)

        user = getattr(session, "user", None)
        username = user.username if isinstance(user, SessionUser) else None
        logger.warning(
            "opc ua %s refused for %s from %s",
            service,
            repr(username) if username else "an anonymous session",
            address,
        )
        await self.record(
            audit.ACCESS_DENIED,
            username,
            address,
            outcome="denied",
            details={
                "reason": "not permitted for the session's user",
                "method": service,
                "path": "session",
            },
        )

    async def _refuse(self, address: str | None, reason: str) -> None:
        self.refused_logins += 1
        logger.warning("opc ua login from %s refused: %s", address, reason)
        await self.security.deny(
            status=401,
            reason=reason,
            principal=None,
            source=address,
            protocol=PROTOCOL,
            method="ActivateSession",
            path="session",
        )

    def get_user(
        self,
        iserver: InternalServer,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        """asyncua's user manager: the verdict :meth:`login` reached."""
        login = _LOGIN.get()
        if login is None:
            return None

        if login is _ANONYMOUS and username is None and self.allow_anonymous:
            return SessionUser(role=UserRole.User, name=None, principal=None)

        if login.principal is None or login.username != username:
            return None
        return SessionUser(role=UserRole.User, name=username, principal=login.principal)

    # Requests.

    def permissions(self, user: object) -> frozenset[str] | None:
        """What ``user`` may do now; None when it may do nothing at all."""
        if not isinstance(user, SessionUser):
            return None

        principal = user.principal
        if principal is None:
            return (
                self.security.permissions_of(VIEWER) if self.allow_anonymous else None
            )

        try:
            view = self.security.user(principal.user_id)
        except UnknownUser:
            return None
        if not view.active:
            return None
        return self.security.permissions_of(view.role)


class Ruleset(SimpleRoleRuleset):
    """asyncua's permission hook: which requests a session user may make."""

    def __init__(self, access: Access) -> None:
        super().__init__()
        self._access = access

    def check_validity(self, user: Any, action_type_id: Any, body: Any) -> bool:
        if action_type_id not in READ_SERVICES and action_type_id != CALL:
            return False

        permissions = self._access.permissions(user)
        if permissions is None:
            return False
        if action_type_id == CALL:
            return True
        return READ_PUMP_STATUS in permissions


class Subscriptions(SubscriptionService):
    """Subscriptions with a floor under the publishing interval (ms)."""

    def __init__(self, iserver: InternalServer, min_interval_ms: float) -> None:
        super().__init__(iserver.aspace, iserver=iserver)
        self.min_interval_ms = min_interval_ms

    async def create_subscription(
        self,
        params: ua.CreateSubscriptionParameters,
        callback: Any,
        session_id: ua.NodeId,
        request_callback: Any = None,
    ) -> ua.CreateSubscriptionResult:
        requested = params.RequestedPublishingInterval
        if not requested >= self.min_interval_ms:  # also NaN
            params.RequestedPublishingInterval = self.min_interval_ms
        return await super().create_subscription(
            params, callback, session_id, request_callback=request_callback
        )


class _Processor(UaProcessor):
    """asyncua's processor of one connection, with the adapter's checks."""

    def __init__(
        self,
        iserver: InternalServer,
        transport: asyncio.Transport,
        limits: Any,
        access: Access,
    ) -> None:
        super().__init__(iserver, transport, limits)
        self._access = access
        self._raw_transport = transport
        peer = transport.get_extra_info("peername")
        self.address: str | None = str(peer[0]) if peer else None

    @property
    def _policy_uri(self) -> str:
        return str(self._connection.security_policy.URI)

    async def process(self, header: Any, body: Buffer) -> bool:
        """One message; False closes the connection.

        Errors that escape asyncua's processing are transport or security
        errors (a bad token id, an undecodable chunk): the client gets an
        OPC UA error message and the connection is closed, as the
        specification asks, instead of staying open in an unknown state.
        """
        try:
            if header.MessageType == ua.MessageType.SecureOpen:
                self._check_open(header, body)
            return bool(await super().process(header, body))
        except ChannelRefused as refused:
            self._access.refused_channels += 1
            logger.warning(
                "opc ua secure channel from %s refused: %s", self.address, refused
            )
            self._send_error(refused.code, str(refused))
            return False
        except Exception as exc:
            code = getattr(exc, "code", None)
            if not isinstance(code, int):
                code = StatusCodes.BadSecurityChecksFailed
            logger.warning(
                "opc ua connection from %s closed: %s message refused (%s)",
                self.address,
                getattr(header, "MessageType", b"?"),
                exc,
            )
            self._send_error(code, "message refused")
            return False

    def _send_error(self, code: int, reason: str) -> None:
        error = ua.ErrorMessage(status(code), ua.String(reason[:256]))
        data = uatcp_to_binary(ua.MessageType.Error, error)  # type: ignore[arg-type]
        with contextlib.suppress(Exception):
            self._raw_transport.write(data)

    def _check_open(self, header: Any, body: Buffer) -> None:
        if self._connection.is_open():
            return
        try:
            peek = body.copy(header.body_size)
            algorithm = struct_from_binary(ua.AsymmetricAlgorithmHeader, peek)
        except Exception:
            raise ChannelRefused(
                StatusCodes.BadDecodingError,
                "OpenSecureChannel with an unreadable security header",
            ) from None
        self._access.check_channel(
            algorithm.SecurityPolicyURI or "", algorithm.SenderCertificate
        )

    def open_secure_channel(self, algohdr: Any, seqhdr: Any, body: Any) -> None:
        try:
            super().open_secure_channel(algohdr, seqhdr, body)
        except UaError as exc:
            raise ChannelRefused(
                StatusCodes.BadSecurityModeRejected,
                f"security mode not offered with policy "
                f"{algohdr.SecurityPolicyURI!r}: {exc}",
            ) from None

    async def _process_message(
        self, typeid: ua.NodeId, requesthdr: Any, seqhdr: Any, body: Buffer
    ) -> Any:
        self._access.check_request(self._policy_uri, typeid)
        if typeid in REGISTER_SERVER:
            raise ServiceError(StatusCodes.BadServiceUnsupported)

        if typeid == CREATE_SESSION:
            params = struct_from_binary(ua.CreateSessionParameters, body.copy())
            self._access.check_session_certificate(
                self._policy_uri,
                self._connection.security_policy.peer_certificate,
                params,
            )
            return await super()._process_message(typeid, requesthdr, seqhdr, body)

        if typeid == ACTIVATE_SESSION:
            return await self._activate(typeid, requesthdr, seqhdr, body)

        try:
            if typeid != CALL:
                return await super()._process_message(typeid, requesthdr, seqhdr, body)

            user = self.session.user if self.session is not None else None
            caller = Caller(
                user if isinstance(user, SessionUser) else None, self.address
            )
            token = _CALLER.set(caller)
            try:
                return await super()._process_message(typeid, requesthdr, seqhdr, body)
            finally:
                _CALLER.reset(token)
        except ua.uaerrors.BadUserAccessDenied:
            if self.session is not None:
                await self._access.refused_request(self.session, typeid, self.address)
            raise

    async def _activate(
        self, typeid: ua.NodeId, requesthdr: Any, seqhdr: Any, body: Buffer
    ) -> Any:
        params = struct_from_binary(ua.ActivateSessionParameters, body.copy())
        session = self.session or self.iserver.lookup_external_session(
            requesthdr.AuthenticationToken
        )
        if session is None:
            raise ServiceError(StatusCodes.BadSessionIdInvalid)

        login = await self._access.login(session, params, self.address, self.iserver)
        token = _LOGIN.set(login)
        try:
            return await super()._process_message(typeid, requesthdr, seqhdr, body)
        finally:
            _LOGIN.reset(token)


class _Protocol(OPCUAProtocol):
    """One client connection, processed by :class:`_Processor`."""

    access: Access

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.processor is None or self.transport is None:
            return
        processor = _Processor(self.iserver, self.transport, self.limits, self.access)
        processor.set_policies(self.policies)
        self.processor = processor


class _BinaryServer(BinaryServer):
    def __init__(
        self,
        iserver: InternalServer,
        hostname: str | None,
        port: int | None,
        limits: Any,
        access: Access,
    ) -> None:
        super().__init__(iserver, hostname or "", port or 0, limits)
        self.access = access
        self.sock: socket.socket | None = None

    async def start(self) -> None:
        """Listen on :attr:`sock` when one is given, else as asyncua does."""
        sock, self.sock = self.sock, None
        if sock is None:
            await super().start()
            return

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._make_protocol, sock=sock)
        self.hostname, self.port = sock.getsockname()[:2]
        self.cleanup_task = asyncio.create_task(self._close_task_loop())

    def _make_protocol(self) -> OPCUAProtocol:
        protocol = _Protocol(
            iserver=self.iserver,
            policies=self._policies,
            clients=self.clients,
            closing_tasks=self.closing_tasks,
            limits=self.limits,
        )
        protocol.access = self.access
        return protocol


class AdapterUaServer(Server):
    """asyncua's server, listening through the adapter's access checks."""

    def __init__(self, access: Access, min_publishing_interval_ms: float) -> None:
        super().__init__(user_manager=access)
        self.access = access
        self.limits = TransportLimits(
            max_recv_buffer=BUFFER_BYTES,
            max_send_buffer=BUFFER_BYTES,
            max_chunk_count=MAX_MESSAGE_BYTES // BUFFER_BYTES + 1,
            max_message_size=MAX_MESSAGE_BYTES,
        )
        subscriptions = Subscriptions(self.iserver, min_publishing_interval_ms)
        self.iserver.subscription_service = subscriptions
        self.iserver.isession.subscription_service = subscriptions

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on ``sock`` (bound, not listening) or on the endpoint's port."""
        await self._setup_server_nodes()
        await self.iserver.start()

        host, port = self._get_bind_socket_info()
        self.bserver = _BinaryServer(self.iserver, host, port, self.limits, self.access)
        self.bserver.set_policies(self._policies)
        self.bserver.sock = sock
        try:
            await self.bserver.start()
        except BaseException:
            if sock is not None:
                sock.close()
            await self.iserver.stop()
            raise

    async def stop(self) -> None:
        """asyncua's stop, without waiting up to a second for its clock task."""
        task = self.iserver.time_task
        if task is not None:
            self.iserver.time_task = None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await super().stop()

    def sessions(self) -> tuple[int, int]:
        """Open connections and activated sessions."""
        if self.bserver is None:
            return 0, 0
        clients = list(self.bserver.clients)
        active = 0
        for client in clients:
            processor = client.processor
            session = processor.session if processor is not None else None
            if session is not None and session.is_activated():
                active += 1
        return len(clients), active


_SUFFIX = "Request_Encoding_DefaultBinary"
_SERVICES = {
    value: name.removesuffix(_SUFFIX)
    for name, value in vars(ObjectIds).items()
    if name.endswith(_SUFFIX) and isinstance(value, int)
}


def _service_name(typeid: ua.NodeId) -> str:
    identifier = typeid.Identifier
    if typeid.NamespaceIndex == 0 and isinstance(identifier, int):
        return _SERVICES.get(identifier, f"request {identifier}")
    return f"request {typeid.to_string()}"


def _status(name: str) -> int:
    return int(getattr(StatusCodes, name, StatusCodes.BadCertificateInvalid))
