"""Stable error codes and the protocol exception root.

Pure: imports only the standard library (never ``lmgrd`` or ``client_stub``). Every reply that is not a
result carries one of the codes below by *name* (the string is the stable wire value; clients match on it,
never on the message). Numbers group the codes for documentation and logs: 1xxx protocol, 2xxx licensing,
3xxx server state, 9xxx internal.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Every error a peer can be told, with a stable wire name."""

    # 1xxx: the conversation itself went wrong
    BAD_REQUEST = "BAD_REQUEST"
    FRAME_TOO_LARGE = "FRAME_TOO_LARGE"
    UNSUPPORTED_PROTOCOL = "UNSUPPORTED_PROTOCOL"
    UNEXPECTED_MESSAGE = "UNEXPECTED_MESSAGE"
    HANDSHAKE_TIMEOUT = "HANDSHAKE_TIMEOUT"
    TOO_MANY_CONNECTIONS = "TOO_MANY_CONNECTIONS"
    RATE_LIMITED = "RATE_LIMITED"
    # 2xxx: licensing decisions, in the order the checks run
    LICENSE_INVALID = "LICENSE_INVALID"
    LICENSE_REVOKED = "LICENSE_REVOKED"
    HOST_NOT_LICENSED = "HOST_NOT_LICENSED"
    OUTSIDE_SITE = "OUTSIDE_SITE"
    INVALID_HOSTNAME = "INVALID_HOSTNAME"
    LICENSE_NOT_ACTIVATED = "LICENSE_NOT_ACTIVATED"
    LICENSE_MOVED = "LICENSE_MOVED"
    LICENSE_EXPIRED = "LICENSE_EXPIRED"
    UNKNOWN_PRODUCT = "UNKNOWN_PRODUCT"
    VERSION_NOT_PERMITTED = "VERSION_NOT_PERMITTED"
    EXCLUDED = "EXCLUDED"
    MAX_REACHED = "MAX_REACHED"
    RESERVED = "RESERVED"
    NO_SEATS = "NO_SEATS"
    LEASE_NOT_FOUND = "LEASE_NOT_FOUND"
    LEASE_EXPIRED = "LEASE_EXPIRED"
    SEAT_REMOVED = "SEAT_REMOVED"
    NOT_AUTHORIZED = "NOT_AUTHORIZED"
    IDLE_TIMEOUT = "IDLE_TIMEOUT"
    ACTIVATION_CONFLICT = "ACTIVATION_CONFLICT"
    SEAT_MOVED = "SEAT_MOVED"
    # 3xxx: the server's own state
    SHUTTING_DOWN = "SHUTTING_DOWN"
    SERVER_UNAVAILABLE = "SERVER_UNAVAILABLE"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
    # 4xxx: the client's own configuration (raised by client_stub; never sent by the server)
    CLIENT_CONFIG_INVALID = "CLIENT_CONFIG_INVALID"
    # 9xxx
    INTERNAL_ERROR = "INTERNAL_ERROR"


#: Documentation numbers; a duplicate would be a bug, checked at import.
ERROR_NUMBERS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 1000,
    ErrorCode.FRAME_TOO_LARGE: 1001,
    ErrorCode.UNSUPPORTED_PROTOCOL: 1002,
    ErrorCode.UNEXPECTED_MESSAGE: 1003,
    ErrorCode.HANDSHAKE_TIMEOUT: 1004,
    ErrorCode.TOO_MANY_CONNECTIONS: 1005,
    ErrorCode.RATE_LIMITED: 1006,
    ErrorCode.LICENSE_INVALID: 2000,
    ErrorCode.LICENSE_REVOKED: 2001,
    ErrorCode.HOST_NOT_LICENSED: 2002,
    ErrorCode.OUTSIDE_SITE: 2003,
    ErrorCode.INVALID_HOSTNAME: 2004,
    ErrorCode.LICENSE_NOT_ACTIVATED: 2005,
    ErrorCode.LICENSE_MOVED: 2006,
    ErrorCode.LICENSE_EXPIRED: 2007,
    ErrorCode.UNKNOWN_PRODUCT: 2008,
    ErrorCode.VERSION_NOT_PERMITTED: 2009,
    ErrorCode.EXCLUDED: 2010,
    ErrorCode.MAX_REACHED: 2011,
    ErrorCode.RESERVED: 2012,
    ErrorCode.NO_SEATS: 2013,
    ErrorCode.LEASE_NOT_FOUND: 2014,
    ErrorCode.LEASE_EXPIRED: 2015,
    ErrorCode.SEAT_REMOVED: 2016,
    ErrorCode.NOT_AUTHORIZED: 2017,
    ErrorCode.IDLE_TIMEOUT: 2018,
    ErrorCode.ACTIVATION_CONFLICT: 2019,
    ErrorCode.SEAT_MOVED: 2020,
    ErrorCode.SHUTTING_DOWN: 3000,
    ErrorCode.SERVER_UNAVAILABLE: 3001,
    ErrorCode.STORE_UNAVAILABLE: 3002,
    ErrorCode.CLIENT_CONFIG_INVALID: 4000,
    ErrorCode.INTERNAL_ERROR: 9000,
}
if len(set(ERROR_NUMBERS.values())) != len(ERROR_NUMBERS) or set(ERROR_NUMBERS) != set(ErrorCode):
    raise TypeError("ERROR_NUMBERS must give every ErrorCode exactly one distinct number")

#: Codes a client may retry after a reconnect or a wait: the connection failed, or the request was not run
#: (RATE_LIMITED), not decided (everything else is a decision or a protocol fault). ``client_stub`` raises
#: ``ServerUnavailable`` for exactly these.
RETRYABLE: frozenset[ErrorCode] = frozenset(
    {ErrorCode.SHUTTING_DOWN, ErrorCode.SERVER_UNAVAILABLE, ErrorCode.TOO_MANY_CONNECTIONS,
     ErrorCode.HANDSHAKE_TIMEOUT, ErrorCode.RATE_LIMITED}
)


class ProtocolError(Exception):
    """Root of every protocol failure. Carries a stable code and a human message."""

    def __init__(self, code: ErrorCode, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" + (f" ({self.hint})" if self.hint else "")


class LocalProtocolError(ProtocolError):
    """This end tried to send a message the conversation does not allow now (a bug in the caller, not the peer).

    Raised by :meth:`protocol.Connection.send`; the connection is then in ERROR.
    """

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(ErrorCode.UNEXPECTED_MESSAGE, message, hint)


class MalformedMessage(ProtocolError):
    """The peer sent bytes that are not a valid frame or message (the peer's fault)."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_REQUEST, hint: str = "") -> None:
        super().__init__(code, message, hint)


class FrameTooLarge(MalformedMessage):
    """A length prefix announced more than the maximum frame size; the stream cannot continue."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"frame of {size} bytes exceeds the maximum of {limit} bytes",
            ErrorCode.FRAME_TOO_LARGE,
            "send smaller messages; the limit is announced in the welcome reply",
        )
        self.size = size
        self.limit = limit
