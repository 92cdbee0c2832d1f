"""This license server's machine, as the operating system reports it: the fingerprint activation binds to,
the daemon's wall clock, and the open-file limit.

The clock: the daemon's wall clock is ``time.time()`` plus ``LMGRD_CLOCK_OFFSET_SECONDS`` (default 0). The
offset exists for tests and for operators rehearsing the 24-hour rule; it may only move time FORWARD
(a negative value is refused), so it can bring expiry nearer but never extend a license.

Reads ``/etc/machine-id`` (or the Windows MachineGuid) and the interface addresses (psutil); the hashing
and matching are :mod:`protocol.fingerprint`'s. Imports ``protocol``, psutil and the standard library;
never ``client_stub`` (which reads its own PC in ``client_stub.machine``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lmgrd import LmgrdError
from protocol.fingerprint import MACHINE_ID_FILES, Fingerprint, usable_macs

__all__ = ["CLOCK_OFFSET_ENV", "clock_offset", "daemon_wall_clock", "mac_addresses", "machine_id", "raise_nofile",
           "this_fingerprint"]

logger = logging.getLogger(__name__)

CLOCK_OFFSET_ENV = "LMGRD_CLOCK_OFFSET_SECONDS"


def machine_id() -> str:
    """This machine's stable id, or ``""`` if the OS keeps none (matching then rests on hostname and MACs)."""
    for path in MACHINE_ID_FILES:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            value = Path(path).read_text(encoding="ascii").strip()
            if value:
                return value
    if sys.platform == "win32":  # pragma: no cover - not run on the CI platform
        with contextlib.suppress(OSError, ImportError):
            import winreg

            with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SOFTWARE\Microsoft\Cryptography") as k:
                return str(winreg.QueryValueEx(k, "MachineGuid")[0])
    return ""


def mac_addresses() -> list[str]:
    """This machine's MAC addresses (see :func:`protocol.fingerprint.usable_macs`)."""
    import psutil  # lazily: only fingerprinting needs it

    return usable_macs(entry.address for entries in psutil.net_if_addrs().values() for entry in entries
                       if entry.family == psutil.AF_LINK)


def this_fingerprint() -> Fingerprint:
    """This machine's fingerprint as the operating system reports it."""
    return Fingerprint.of(socket.gethostname(), machine_id(), mac_addresses())


def clock_offset(environ: dict[str, str] | None = None, name: str = CLOCK_OFFSET_ENV) -> float:
    """Seconds added to the daemon's wall clock (``LMGRD_CLOCK_OFFSET_SECONDS``; tests and rehearsals only).

    ``name`` picks another variable with the same rule (the activation service reads
    ``LMCLOUD_CLOCK_OFFSET_SECONDS``).

    Raises:
        LmgrdError: the value is not a number, or is negative (the clock may only be moved forward).
    """
    raw = (os.environ if environ is None else environ).get(name, "").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise LmgrdError(f"{name}={raw!r} is not a number of seconds; unset it") from None
    if not value >= 0 or value == float("inf"):
        raise LmgrdError(f"{name}={raw!r}: the clock may only be moved forward (0 or more seconds); "
                         "unset it")
    return value


def daemon_wall_clock(offset: float = 0.0) -> Callable[[], float]:
    """The daemon's wall clock: epoch seconds, moved forward by ``offset``."""
    if not offset:
        return time.time
    logger.warning("%s=%g: the daemon's clock runs %g s ahead of the system clock (test/rehearsal setting)",
                   CLOCK_OFFSET_ENV, offset, offset)
    return lambda: time.time() + offset


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit (thousands of clients, one socket each);
    returns the soft limit in force afterwards. Never fails: a platform without the call keeps its limit."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 1_048_576
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):
        return -1
