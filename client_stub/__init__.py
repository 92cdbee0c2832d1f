"""client_stub: the library products embed to get seats from lmgrd (or from a single-user license file).

Imports ``protocol`` and never ``lmgrd``. Three lines protect a product::

    from client_stub import LicenseClient, LicenseError

    with LicenseClient("27000@licsrv") as lm:
        with lm.checkout("CADPRO", version="2.1", wait=30) as seat:
            ...   # heartbeats run in the background

``AsyncLicenseClient`` is the asyncio flavour with the same methods (``async with``, ``await``). The server
list comes from the argument, else ``LM_LICENSE_SERVER``, else the per-user client config file; an entry
that is a license file path selects single-user mode (verified on this PC against ``vendor_key=`` or
``LM_VENDOR_KEY``). Every failure raises :class:`LicenseError` with a stable ``.code``.
"""

from client_stub.address import LicenseFile, ServerAddress, ServerList, resolve_servers
from client_stub.aio import AsyncLicenseClient, AsyncSeat, Ping
from client_stub.backoff import Backoff
from client_stub.errors import LicenseError, LicenseLost, ProtocolMismatch, SeatDenied, ServerUnavailable
from client_stub.sync import LicenseClient, Seat
from protocol import ErrorCode

__all__ = [
    "AsyncLicenseClient",
    "AsyncSeat",
    "Backoff",
    "ErrorCode",
    "LicenseClient",
    "LicenseError",
    "LicenseFile",
    "LicenseLost",
    "Ping",
    "ProtocolMismatch",
    "Seat",
    "SeatDenied",
    "ServerAddress",
    "ServerList",
    "ServerUnavailable",
    "resolve_servers",
]
