"""This license server's machine, as the operating system reports it: the fingerprint activation binds to.

Reads ``/etc/machine-id`` (or the Windows MachineGuid) and the interface addresses (psutil); the hashing
and matching are :mod:`protocol.fingerprint`'s. Imports ``protocol``, psutil and the standard library;
never ``client_stub`` (which reads its own PC in ``client_stub.machine``).
"""

from __future__ import annotations

import contextlib
import socket
import sys
from pathlib import Path

from protocol.fingerprint import MACHINE_ID_FILES, Fingerprint, usable_macs

__all__ = ["mac_addresses", "machine_id", "this_fingerprint"]


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
