"""This PC as the operating system reports it: hostname, addresses and the fingerprint activation binds to.

Single-user mode checks a license against this PC (never against a hostname the product passes, which
would be a bypass) and binds its activation to :func:`this_fingerprint`. The hashing and matching are
:mod:`protocol.fingerprint`'s; this module only reads the OS (``/etc/machine-id`` or the Windows
MachineGuid, interface addresses through psutil, imported lazily). Imports ``protocol``, psutil and the
standard library; never ``lmgrd`` (the license server reads its own machine in ``lmgrd.storage.host``).
"""

from __future__ import annotations

import contextlib
import socket
import sys
from pathlib import Path

from protocol.fingerprint import MACHINE_ID_FILES, Fingerprint, usable_macs

__all__ = ["mac_addresses", "machine_id", "this_fingerprint", "this_machine"]


def this_machine() -> tuple[str, tuple[str, ...]]:
    """This PC's hostname and interface addresses (loopback included) as the operating system reports them."""
    import psutil  # lazily: only single-user mode needs it

    addresses: list[str] = []
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                addr = entry.address.split("%", 1)[0]
                if addr not in addresses:
                    addresses.append(addr)
    return socket.gethostname(), tuple(addresses)


def machine_id() -> str:
    """This PC's stable id, or ``""`` if the OS keeps none (matching then rests on hostname and MACs)."""
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
    """This PC's MAC addresses (see :func:`protocol.fingerprint.usable_macs`)."""
    import psutil  # lazily: only single-user mode needs it

    return usable_macs(entry.address for entries in psutil.net_if_addrs().values() for entry in entries
                       if entry.family == psutil.AF_LINK)


def this_fingerprint() -> Fingerprint:
    """This PC's fingerprint as the operating system reports it."""
    return Fingerprint.of(socket.gethostname(), machine_id(), mac_addresses())
