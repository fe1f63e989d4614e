"""The signature of webhook deliveries, and how a receiver checks it.

Each delivery is an HTTP POST of a JSON body with these headers::

    Content-Type: application/json
    X-Calejo-Timestamp: 1767225600              (Unix seconds, UTC)
    X-Calejo-Signature: sha256=<64 hex digits>
    X-Calejo-Alert-Id: <alert id>
    X-Calejo-Attempt: 1

The signature is HMAC-SHA256, keyed with the configured ``alerts.webhook
.secret`` (UTF-8), over the text ``f"{timestamp}.{body}"``: the timestamp
header exactly as sent, a full stop, and the body bytes exactly as they
arrived (before any JSON parsing). A receiver should:

1. read the raw body and the two headers; refuse the request when either
   header is missing or the signature does not start with ``sha256=``;
2. compute the HMAC over ``timestamp + "." + body`` and compare it with
   the hex digest in the header in constant time
   (:func:`hmac.compare_digest`); refuse on mismatch;
3. refuse a timestamp more than a few minutes from its own clock (the
   replay window; 300 seconds here), so that a recorded request cannot be
   played again later;
4. within the window, treat a second request with the same alert id and
   attempt as a replay (or a retry after a lost answer) and answer it
   with 2xx without acting twice.

Every attempt is signed afresh with its own timestamp, so a retry after
a long backoff still lands inside the window. :func:`verify_signature`
does steps 1 to 3 for a receiver written in Python.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Final

__all__ = [
    "ALERT_ID_HEADER",
    "ATTEMPT_HEADER",
    "REPLAY_WINDOW",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "SignatureError",
    "sign",
    "signature_header",
    "verify_signature",
]

TIMESTAMP_HEADER: Final = "X-Calejo-Timestamp"
SIGNATURE_HEADER: Final = "X-Calejo-Signature"
ALERT_ID_HEADER: Final = "X-Calejo-Alert-Id"
ATTEMPT_HEADER: Final = "X-Calejo-Attempt"
REPLAY_WINDOW: Final = 300.0
"""Seconds a receiver should accept between the timestamp and its clock."""

_PREFIX: Final = "sha256="


class SignatureError(ValueError):
    """A webhook request whose signature or timestamp does not check out."""


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``f"{timestamp}.{body}"`` keyed with ``secret``."""
    message = timestamp.encode("ascii") + b"." + body
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: str, body: bytes) -> str:
    """The value of the ``X-Calejo-Signature`` header: ``sha256=<hex>``."""
    return _PREFIX + sign(secret, timestamp, body)


def verify_signature(
    secret: str,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    *,
    now: float | None = None,
    window: float = REPLAY_WINDOW,
) -> None:
    """Check a received webhook request; raise :class:`SignatureError` if bad.

    ``timestamp`` and ``signature`` are the header values as received,
    ``body`` the raw body, ``now`` the receiver's Unix time (default: the
    clock), ``window`` the replay window in seconds.
    """
    if not timestamp or not signature:
        raise SignatureError(
            f"expected both {TIMESTAMP_HEADER} and {SIGNATURE_HEADER} headers"
        )
    if not signature.startswith(_PREFIX):
        raise SignatureError(
            f"expected {SIGNATURE_HEADER} to start with {_PREFIX!r}, "
            f"got {signature[:16]!r}"
        )

    try:
        stamp = int(timestamp)
    except ValueError:
        raise SignatureError(
            f"expected {TIMESTAMP_HEADER} to be Unix seconds, got {timestamp[:32]!r}"
        ) from None

    expected = sign(secret, timestamp, body)
    if not hmac.compare_digest(expected, signature[len(_PREFIX) :]):
        raise SignatureError("signature does not match the body and timestamp")

    moment = time.time() if now is None else now
    skew = moment - stamp
    if abs(skew) > window:
        raise SignatureError(
            f"expected a timestamp within {window:g} s of now, got one "
            f"{abs(skew):.0f} s {'old' if skew > 0 else 'ahead'}"
        )
