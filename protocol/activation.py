"""The activation record: which machine a license was activated on, and when; and the 24-hour rule.

One format for both ends: the license server keeps its records in ``STATE_DIR/activations.json`` (inside
``{"format": 1, "activations": {CUSTOMER_ID: record}}``) and single-user activation keeps them in the
user's data directory (a plain ``{CUSTOMER_ID: record}`` mapping); each record is the JSON object written
by :meth:`ActivationRecord.to_json`. The containers and the files are the callers' business.

Pure: imports only the standard library and the rest of ``protocol`` (never ``lmgrd`` or ``client_stub``);
no file access, no clock reads (the caller passes the time).

The handbook's rule: a license is activated explicitly (``lmutil activate`` on a server, ``lmclient
activate`` on a PC) or by itself :data:`AUTO_ACTIVATION_AFTER` after its signed issue time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from protocol.fingerprint import Fingerprint
from protocol.license import License, format_timestamp

__all__ = ["AUTO_ACTIVATION_AFTER", "ActivationRecord", "auto_activation_at"]

#: A license activates by itself this long after its signed ``issued_at``.
AUTO_ACTIVATION_AFTER = timedelta(hours=24)
_TIMESTAMP = "%Y-%m-%dT%H:%M:%SZ"


def auto_activation_at(lic: License) -> datetime:
    """When ``lic`` activates by itself: 24 hours after its signed issue time (UTC)."""
    return lic.issued_at + AUTO_ACTIVATION_AFTER


@dataclass(frozen=True, slots=True)
class ActivationRecord:
    """License ``customer_id`` was activated on the machine ``fingerprint`` (named ``hostname``) at
    ``activated_at`` (timezone-aware), ``how`` (a short human note: who ran what, or "automatic")."""

    customer_id: str
    fingerprint: Fingerprint
    hostname: str
    activated_at: datetime
    how: str

    def to_json(self) -> dict[str, Any]:
        """The record as stored: the fingerprint's digest and parts, the hostname, UTC seconds, how.

        Returns:
            ``{"customer_id", "fingerprint", "host", "machine", "macs", "hostname", "activated_at", "how"}``.
        """
        return {"customer_id": self.customer_id, "fingerprint": self.fingerprint.digest,
                "host": self.fingerprint.host, "machine": self.fingerprint.machine,
                "macs": sorted(self.fingerprint.macs), "hostname": self.hostname,
                "activated_at": format_timestamp(self.activated_at), "how": self.how}

    @classmethod
    def from_json(cls, cid: str, data: Any) -> ActivationRecord:
        """Read a stored record of license ``cid``.

        Args:
            cid: the customer ID the record is stored under.
            data: the decoded JSON value.

        Returns:
            The record (``activated_at`` in UTC).

        Raises:
            ValueError: ``data`` is not a record (not a mapping; ``host``, ``machine`` or ``macs`` of the
                wrong type; ``activated_at`` not a UTC time like 2026-03-01T12:00:00Z). The message names ``cid``.
        """
        if not isinstance(data, dict):
            raise ValueError(f"activation of {cid} is not a mapping")
        macs = data.get("macs", [])
        if not isinstance(macs, list) or not all(isinstance(m, str) for m in macs):
            raise ValueError(f"activation of {cid}: 'macs' is not a list of strings")
        host, machine = data.get("host"), data.get("machine")
        if not isinstance(host, str) or not isinstance(machine, str):
            raise ValueError(f"activation of {cid}: 'host' and 'machine' must be strings")
        at = datetime.strptime(str(data.get("activated_at")), _TIMESTAMP).replace(tzinfo=UTC)
        return cls(cid, Fingerprint(host, machine, frozenset(macs)), str(data.get("hostname", "")), at,
                   str(data.get("how", "")))
