"""The client stub's exceptions: one root, ``LicenseError``, and a subclass per kind of outcome.

Imports only ``protocol`` and the standard library; never ``lmgrd``. Products catch ``LicenseError`` and
match on ``.code`` (a stable :class:`protocol.ErrorCode`), never on the message text. ``str(error)``
says what happened and what to do, so a product may show it to its user as it is.

    LicenseError            root; ``.code``, ``.message``, ``.hint``, ``.retryable``
      ServerUnavailable     no license server could be reached or it is shutting down (retryable)
      SeatDenied            the server (or a node-locked license) refused the checkout
      LicenseLost           a seat held earlier is gone: the server said so, or it could not be renewed
      ProtocolMismatch      the client and the server do not understand each other
"""

from __future__ import annotations

from protocol import RETRYABLE, ErrorCode

__all__ = [
    "LicenseError",
    "LicenseLost",
    "ProtocolMismatch",
    "SeatDenied",
    "ServerUnavailable",
    "error_for",
]

#: What to do, for codes the server (or this library) may report without a hint of its own.
DEFAULT_HINTS: dict[ErrorCode, str] = {
    ErrorCode.SERVER_UNAVAILABLE: (
        "check that lmgrd is running and reachable from this computer (firewall, port), and that "
        "LM_LICENSE_SERVER or the client config file names it as PORT@HOST"
    ),
    ErrorCode.SHUTTING_DOWN: "the license server is restarting; try again in a moment",
    ErrorCode.TOO_MANY_CONNECTIONS: (
        "too many connections from this address; close unused clients or ask the license administrator "
        "to raise --max-connections-per-address"
    ),
    ErrorCode.HANDSHAKE_TIMEOUT: "the connection was too slow to start; check the network and try again",
    ErrorCode.NO_SEATS: (
        "all seats are in use: try again later, pass wait=SECONDS to queue for a seat, or ask the license "
        "administrator for more seats"
    ),
    ErrorCode.UNKNOWN_PRODUCT: "ask the license administrator or the vendor for a license that includes this product",
    ErrorCode.VERSION_NOT_PERMITTED: "use a permitted version of the product or ask the vendor for an upgraded license",
    ErrorCode.LICENSE_EXPIRED: "ask the vendor to renew the license",
    ErrorCode.LICENSE_INVALID: "ask the vendor for a fresh copy of the license file and its vendor public key",
    ErrorCode.HOST_NOT_LICENSED: "use the license on the computer it was issued for, or ask the vendor to reissue it",
    ErrorCode.INVALID_HOSTNAME: "rename this computer using only ASCII letters, digits and hyphens",
    ErrorCode.UNSUPPORTED_PROTOCOL: "upgrade the product's license client or the license server so they match",
    ErrorCode.LEASE_EXPIRED: "the seat was not renewed in time; check out again",
    ErrorCode.LEASE_NOT_FOUND: "the server no longer holds this seat; check out again",
    ErrorCode.SEAT_REMOVED: "the license administrator removed this seat; check out again or ask them why",
    ErrorCode.LICENSE_REVOKED: "this license was revoked by the vendor; ask for its replacement",
    ErrorCode.CLIENT_CONFIG_INVALID: (
        "name the license server as PORT@HOST (for example 27000@licsrv) in the program, in the "
        "LM_LICENSE_SERVER environment variable, or with 'lmclient set-server'"
    ),
}
_FALLBACK_HINT = "contact your license administrator"


class LicenseError(Exception):
    """Root of every client stub error.

    Attributes:
        code: stable :class:`protocol.ErrorCode`; match on it.
        message: what happened.
        hint: what to do.
        retryable: true if the same call may succeed later without anyone changing anything.
    """

    retryable = False

    def __init__(self, code: ErrorCode, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint or DEFAULT_HINTS.get(code, _FALLBACK_HINT)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}. What to do: {self.hint}"

    def __reduce__(self) -> tuple[object, ...]:
        # Keep the exception picklable (multiprocessing, concurrent.futures) despite the custom __init__.
        return (type(self), (self.code, self.message, self.hint))


class ServerUnavailable(LicenseError):
    """No license server answered, the connection broke, or the server is shutting down. Retryable.

    Its codes are those of :data:`protocol.RETRYABLE`; ``error_for`` maps exactly those codes here.
    """

    retryable = True

    def __init__(self, message: str, hint: str = "", code: ErrorCode = ErrorCode.SERVER_UNAVAILABLE) -> None:
        super().__init__(code, message, hint)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.message, self.hint, self.code))


class SeatDenied(LicenseError):
    """A checkout was refused: ``code`` says why (NO_SEATS, UNKNOWN_PRODUCT, VERSION_NOT_PERMITTED, ...)."""


class LicenseLost(LicenseError):
    """A seat the product held is gone (LEASE_EXPIRED, LEASE_NOT_FOUND, SEAT_REMOVED, LICENSE_REVOKED, ...)."""


class ProtocolMismatch(LicenseError):
    """The client and the server do not speak a common protocol, or one of them sent something invalid."""


_MISMATCH = frozenset({
    ErrorCode.UNSUPPORTED_PROTOCOL, ErrorCode.FRAME_TOO_LARGE, ErrorCode.UNEXPECTED_MESSAGE,
})


def error_for(code: ErrorCode, message: str, hint: str = "", *, decision: type[LicenseError] = LicenseError
              ) -> LicenseError:
    """Build the right exception for a code the server (or a local check) reported.

    Args:
        code: the error code.
        message: what happened.
        hint: what to do (empty: a default for the code).
        decision: the class for licensing decisions in this context: ``SeatDenied`` for a checkout,
            ``LicenseLost`` for a seat that was held.

    Returns:
        ``ServerUnavailable`` (the one retryable class) for the codes in :data:`protocol.RETRYABLE`,
        ``ProtocolMismatch`` for protocol codes, else an instance of ``decision``.
    """
    if code in RETRYABLE:
        return ServerUnavailable(message, hint, code)
    if code in _MISMATCH:
        return ProtocolMismatch(code, message, hint)
    return decision(code, message, hint)
