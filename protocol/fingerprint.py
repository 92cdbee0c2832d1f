"""This machine's fingerprint: short hostname, a stable machine id and MAC addresses, each hashed.

Shared by the license server (``lmgrd.core.activation``, ``lmutil activate``) and the client stub (single-user
``lmclient activate``), so both bind an activation to a machine the same way. Pure computation plus reading
what the operating system reports (``/etc/machine-id``, the Windows MachineGuid, interface addresses via
psutil); no sockets, no asyncio.

Matching tolerates a changed set of network interfaces (container bridges come and go): two fingerprints
match when the hostname and machine id are the same and at least one MAC address is common (or neither
side has any).
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from protocol.validation import short_hostname

__all__ = ["Fingerprint", "this_fingerprint"]

_MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")
_DOMAIN = b"lmgrd-fingerprint-v1\0"


def _hash(kind: str, value: str) -> str:
    return hashlib.sha256(_DOMAIN + kind.encode() + b"\0" + value.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """This machine, hashed: short hostname, machine id and MAC addresses (each a sha256 hex digest)."""

    host: str
    machine: str
    macs: frozenset[str]

    @classmethod
    def of(cls, hostname: str, machine_id: str, macs: Iterable[str]) -> Fingerprint:
        return cls(_hash("host", short_hostname(hostname) if hostname else ""),
                   _hash("machine", machine_id.strip().lower()),
                   frozenset(_hash("mac", m) for m in macs))

    @property
    def digest(self) -> str:
        """One value naming the whole fingerprint (shown to admins; matching uses the parts)."""
        return _hash("all", "|".join([self.host, self.machine, *sorted(self.macs)]))

    def matches(self, other: Fingerprint) -> bool:
        """Same machine: hostname and machine id equal, and a MAC address in common (or none on either side)."""
        macs_ok = bool(self.macs & other.macs) or (not self.macs and not other.macs)
        return self.host == other.host and self.machine == other.machine and macs_ok


def _machine_id() -> str:
    for path in _MACHINE_ID_FILES:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            value = Path(path).read_text(encoding="ascii").strip()
            if value:
                return value
    if sys.platform == "win32":  # pragma: no cover - not run on the CI platform
        with contextlib.suppress(OSError, ImportError):
            import winreg

            with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SOFTWARE\Microsoft\Cryptography") as k:
                return str(winreg.QueryValueEx(k, "MachineGuid")[0])
    return ""  # matching then rests on the hostname and MAC addresses


def _mac_addresses() -> list[str]:
    import psutil  # lazily: only fingerprinting needs it

    macs: set[str] = set()
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family != psutil.AF_LINK or not entry.address:
                continue
            mac = entry.address.lower().replace("-", ":")
            if mac.strip("0:") and len(mac) >= 11:  # skip loopback's 00:00:00:00:00:00 and odd entries
                macs.add(mac)
    return sorted(macs)


def this_fingerprint() -> Fingerprint:
    """This machine's fingerprint as the operating system reports it."""
    return Fingerprint.of(socket.gethostname(), _machine_id(), _mac_addresses())
