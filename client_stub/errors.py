"""The client stub's exceptions: one root, ``LicenseError``, and a subclass per kind of outcome.

Imports only ``protocol``, :mod:`client_stub.i18n` and the standard library; never ``lmgrd``. Products catch
``LicenseError`` and match on ``.code`` (a stable :class:`protocol.ErrorCode`), never on the message text.
``str(error)`` says what happened and what to do, in the user's language (:mod:`client_stub.i18n`: English or
Japanese), so a product may show it to its user as it is; ``.message`` and ``.hint`` stay the English text
the server (or this library) gave, for logs.

Localized by code: the server's refusals arrive in English with details only the server knows (counts,
names, dates). In Japanese, ``localized_message`` is the code's Japanese sentence (:data:`CODE_MESSAGES`)
followed by that English detail, and ``localized_hint`` is the code's Japanese hint (:data:`DEFAULT_HINTS`).

    LicenseError            root; ``.code``, ``.message``, ``.hint``, ``.retryable``
      ServerUnavailable     no license server could be reached or it is shutting down (retryable)
      SeatDenied            the server (or a node-locked license) refused the checkout
      LicenseLost           a seat held earlier is gone: the server said so, or it could not be renewed
      ProtocolMismatch      the client and the server do not understand each other
"""

from __future__ import annotations

from client_stub.i18n import N_, gettext_, language
from protocol import RETRYABLE, ErrorCode

__all__ = [
    "CODE_MESSAGES",
    "DEFAULT_HINTS",
    "LicenseError",
    "LicenseLost",
    "ProtocolMismatch",
    "SeatDenied",
    "ServerUnavailable",
    "error_for",
]

#: What happened, one English sentence per code (the msgids of the Japanese catalog). The server's own message,
#: with its details, stays the English ``.message``; these are what a person reads first in their language.
CODE_MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.BAD_REQUEST: N_("The request was not valid."),
    ErrorCode.FRAME_TOO_LARGE: N_("A message was larger than the license server accepts."),
    ErrorCode.UNSUPPORTED_PROTOCOL: N_("The license client and the license server use different protocol versions."),
    ErrorCode.UNEXPECTED_MESSAGE: N_("The license client and the license server did not understand each other."),
    ErrorCode.HANDSHAKE_TIMEOUT: N_("The connection to the license server took too long to start."),
    ErrorCode.TOO_MANY_CONNECTIONS: N_("There are too many connections from this computer to the license server."),
    ErrorCode.RATE_LIMITED: N_("The license client sent requests to the license server too quickly."),
    ErrorCode.LICENSE_INVALID: N_("The license file is not valid."),
    ErrorCode.LICENSE_REVOKED: N_("This license has been revoked by the vendor."),
    ErrorCode.HOST_NOT_LICENSED: N_("This license is not issued for this computer."),
    ErrorCode.OUTSIDE_SITE: N_("This computer is outside the network the license is issued for."),
    ErrorCode.INVALID_HOSTNAME: N_("This computer's host name cannot be licensed."),
    ErrorCode.LICENSE_NOT_ACTIVATED: N_("The license is not activated yet."),
    ErrorCode.LICENSE_MOVED: N_("The license was activated on another machine."),
    ErrorCode.LICENSE_EXPIRED: N_("The license has expired."),
    ErrorCode.UNKNOWN_PRODUCT: N_("The license does not include this product."),
    ErrorCode.VERSION_NOT_PERMITTED: N_("This version of the product is not licensed."),
    ErrorCode.EXCLUDED: N_("The usage policy does not allow this user or computer to use the product."),
    ErrorCode.MAX_REACHED: N_("The usage limit set for this user or group has been reached."),
    ErrorCode.RESERVED: N_("The free seats are reserved for other users."),
    ErrorCode.NO_SEATS: N_("All seats of the license are in use."),
    ErrorCode.LEASE_NOT_FOUND: N_("The license server no longer holds this seat."),
    ErrorCode.LEASE_EXPIRED: N_("The seat expired because it was not renewed in time."),
    ErrorCode.SEAT_REMOVED: N_("The license administrator freed this seat."),
    ErrorCode.NOT_AUTHORIZED: N_("This operation is not permitted."),
    ErrorCode.IDLE_TIMEOUT: N_("The seat was freed because the product was idle too long."),
    ErrorCode.ACTIVATION_CONFLICT: N_("The license is already activated on another machine."),
    ErrorCode.SEAT_MOVED: N_("The seat moved to another connection of this license client."),
    ErrorCode.SHUTTING_DOWN: N_("The license server is shutting down."),
    ErrorCode.SERVER_UNAVAILABLE: N_("The license server cannot be reached."),
    ErrorCode.STORE_UNAVAILABLE: N_("The license server cannot record new seats right now."),
    ErrorCode.CLIENT_CONFIG_INVALID: N_("The license client's settings are not valid."),
    ErrorCode.INTERNAL_ERROR: N_("An internal error occurred in the license server."),
}

#: What to do, per code: used when the server (or this library) gave no hint of its own, and in Japanese
#: always (the server's English hint is generic advice for its code; its details are in the message).
DEFAULT_HINTS: dict[ErrorCode, str] = {
    ErrorCode.BAD_REQUEST: N_("check the product name, version and options passed to the license client"),
    ErrorCode.FRAME_TOO_LARGE: N_("send smaller messages; the limit is announced in the welcome reply"),
    ErrorCode.UNSUPPORTED_PROTOCOL: N_(
        "upgrade the product's license client or the license server so they match"),
    ErrorCode.UNEXPECTED_MESSAGE: N_(
        "upgrade the product's license client or the license server so they match"),
    ErrorCode.HANDSHAKE_TIMEOUT: N_("the connection was too slow to start; check the network and try again"),
    ErrorCode.TOO_MANY_CONNECTIONS: N_(
        "too many connections from this address; close unused clients or ask the license administrator "
        "to raise --max-connections-per-address"),
    ErrorCode.RATE_LIMITED: N_("wait a moment and try again; the product sent too many requests"),
    ErrorCode.LICENSE_INVALID: N_(
        "ask the vendor for a fresh copy of the license file and its vendor public key"),
    ErrorCode.LICENSE_REVOKED: N_("this license was revoked by the vendor; ask for its replacement"),
    ErrorCode.HOST_NOT_LICENSED: N_(
        "use the license on the computer it was issued for, or ask the vendor to reissue it"),
    ErrorCode.OUTSIDE_SITE: N_(
        "run the product from a PC inside the licensed site, or ask the vendor to add your network to the "
        "license"),
    ErrorCode.INVALID_HOSTNAME: N_("rename this computer using only ASCII letters, digits and hyphens"),
    ErrorCode.LICENSE_NOT_ACTIVATED: N_(
        "it activates automatically 24 hours after it was issued; to activate it now, the administrator runs "
        "'lmutil activate CUSTOMER_ID' on the license server"),
    ErrorCode.LICENSE_MOVED: N_(
        "a license moved to another machine needs a reissued license: ask the vendor to reissue it for this "
        "machine"),
    ErrorCode.LICENSE_EXPIRED: N_("ask the vendor to renew the license"),
    ErrorCode.UNKNOWN_PRODUCT: N_(
        "ask the license administrator or the vendor for a license that includes this product"),
    ErrorCode.VERSION_NOT_PERMITTED: N_(
        "use a permitted version of the product or ask the vendor for an upgraded license"),
    ErrorCode.EXCLUDED: N_("ask the license administrator to change the usage policy"),
    ErrorCode.MAX_REACHED: N_(
        "end another session of the product, or ask the license administrator to raise the limit"),
    ErrorCode.RESERVED: N_("try again later, or ask the license administrator about the reservations"),
    ErrorCode.NO_SEATS: N_(
        "all seats are in use: try again later, pass wait=SECONDS to queue for a seat, or ask the license "
        "administrator for more seats"),
    ErrorCode.LEASE_NOT_FOUND: N_("the server no longer holds this seat; check out again"),
    ErrorCode.LEASE_EXPIRED: N_("the seat was not renewed in time; check out again"),
    ErrorCode.SEAT_REMOVED: N_("the license administrator removed this seat; check out again or ask them why"),
    ErrorCode.NOT_AUTHORIZED: N_("contact your license administrator"),
    ErrorCode.IDLE_TIMEOUT: N_("check out again when you resume work"),
    ErrorCode.SEAT_MOVED: N_("nothing to do if this program reconnected; otherwise check out again"),
    ErrorCode.ACTIVATION_CONFLICT: N_(
        "a license can be active on one machine only; to move the license server, ask the vendor to reissue "
        "the license for the new machine"),
    ErrorCode.SHUTTING_DOWN: N_("the license server is restarting; try again in a moment"),
    ErrorCode.STORE_UNAVAILABLE: N_(
        "seats already in use keep running; the license administrator should check the license server's "
        "disk space or its HA store, then try again"),
    ErrorCode.SERVER_UNAVAILABLE: N_(
        "check that lmgrd is running and reachable from this computer (firewall, port), and that "
        "LM_LICENSE_SERVER or the client config file names it as PORT@HOST"),
    ErrorCode.CLIENT_CONFIG_INVALID: N_(
        "name the license server as PORT@HOST (for example 27000@licsrv) in the program, in the "
        "LM_LICENSE_SERVER environment variable, or with 'lmclient set-server'"),
    ErrorCode.INTERNAL_ERROR: N_("contact your license administrator"),
}
if set(CODE_MESSAGES) != set(ErrorCode) or set(DEFAULT_HINTS) != set(ErrorCode):
    raise TypeError("CODE_MESSAGES and DEFAULT_HINTS must cover every ErrorCode")


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
        self.hint = hint or DEFAULT_HINTS[code]

    @property
    def localized_message(self) -> str:
        """What happened, in the user's language: in English ``.message`` as it is; in Japanese the code's
        sentence, then the English message for its details (names, counts, dates only the sender knows)."""
        if language() == "en":
            return self.message
        summary = gettext_(CODE_MESSAGES[self.code])
        if not self.message:
            return summary
        return gettext_("{summary} (details: {detail})").format(summary=summary, detail=self.message)

    @property
    def localized_hint(self) -> str:
        """What to do, in the user's language: in English ``.hint``; in Japanese the code's hint."""
        return self.hint if language() == "en" else gettext_(DEFAULT_HINTS[self.code])

    def __str__(self) -> str:
        return gettext_("{code}: {message}. What to do: {hint}").format(
            code=self.code, message=self.localized_message, hint=self.localized_hint)

    def __reduce__(self) -> tuple[object, ...]:
        # Keep the exception picklable (multiprocessing, concurrent.futures) despite the custom __init__.
        return (type(self), (self.code, self.message, self.hint))


class ServerUnavailable(LicenseError):
    """No license server answered, the connection broke, the server is shutting down, or it refused requests
    sent too quickly (RATE_LIMITED, after the client's own retries). Retryable.

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
