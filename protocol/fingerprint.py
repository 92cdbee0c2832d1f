"""Machine fingerprints: hashing what the operating system reports about a machine, and matching two of them.

Pure: imports only the standard library and ``protocol.validation`` (never ``lmgrd`` or ``client_stub``).
It reads nothing itself: the callers read the OS (``lmgrd.storage.host`` for the license server,
``client_stub.machine`` for a single-user PC) and pass the hostname, the machine id and the MAC addresses
to :meth:`Fingerprint.of`, so both ends bind an activation to a machine the same way.

Matching tolerates a changed set of network interfaces (container bridges come and go): two fingerprints
match when the hostname and machine id are the same and at least one MAC address is common (or neither
side has any).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from protocol.validation import short_hostname

__all__ = ["MACHINE_ID_FILES", "Fingerprint", "usable_macs"]

#: Where Linux keeps the stable machine id, in the order the callers try them (the first non-empty wins;
#: on Windows the callers read the MachineGuid registry value instead).
MACHINE_ID_FILES: tuple[str, ...] = ("/etc/machine-id", "/var/lib/dbus/machine-id")
_DOMAIN = b"lmgrd-fingerprint-v1\0"


def _hash(kind: str, value: str) -> str:
    return hashlib.sha256(_DOMAIN + kind.encode() + b"\0" + value.encode()).hexdigest()


def usable_macs(link_addresses: Iterable[str]) -> list[str]:
    """The MAC addresses a fingerprint uses, from the link-layer addresses the OS lists for its interfaces.

    Lowercased, ``-`` written as ``:``, loopback's all-zero address and short odd entries dropped, each once,
    sorted.

    Args:
        link_addresses: the ``AF_LINK`` addresses of every interface, as reported (empty ones allowed).
    """
    macs: set[str] = set()
    for raw in link_addresses:
        if not raw:
            continue
        mac = raw.lower().replace("-", ":")
        if mac.strip("0:") and len(mac) >= 11:  # skip loopback's 00:00:00:00:00:00 and odd entries
            macs.add(mac)
    return sorted(macs)


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """A machine, hashed: short hostname, machine id and MAC addresses (each a sha256 hex digest)."""

    host: str
    machine: str
    macs: frozenset[str]

    @classmethod
    def of(cls, hostname: str, machine_id: str, macs: Iterable[str]) -> Fingerprint:
        """Hash what the OS reports about a machine.

        Args:
            hostname: its hostname (compared by short form, case-insensitively).
            machine_id: its stable machine id (``/etc/machine-id``, the Windows MachineGuid), or ``""``.
            macs: its MAC addresses (pass them through :func:`usable_macs`).

        Returns:
            The fingerprint.
        """
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
