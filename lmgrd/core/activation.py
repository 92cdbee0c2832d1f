"""License activation on the license server, and the machine fingerprint it binds to.

Handbook rules enforced here:

* A license the daemon loads is ``pending`` until activated: by ``lmutil activate CUSTOMER_ID`` (the admin
  command ``activate``) or by itself once 24 hours have passed since its signed ``issued_at``. The daemon
  notices the 24 hours without a restart: the state is decided lazily, against the wall clock, at each
  checkout and status request. A pending license grants no seat (``LICENSE_NOT_ACTIVATED``, saying how to
  activate and the exact UTC time of the automatic activation).
* Activation binds the license to this machine's fingerprint (short hostname, a stable machine id and the
  MAC addresses, each hashed) and records it in ``STATE_DIR/activations.json`` (atomic replace). If the
  recorded fingerprint is not this machine's (the license and state directory were copied elsewhere) the
  license serves nothing: ``LICENSE_MOVED``; moving a license server needs a reissued license.
* Activation refuses a license that fails an earlier check (revoked, foreign host): those never reach the
  served set, and ``activate`` answers with their refusal code.
* A license with a signed ``cloud_url`` is activated by the vendor's activation service only: its state and
  check are :class:`lmgrd.core.cloud.CloudActivations`' (``cloud``), and the 24-hour rule and the local
  record never apply to it.

Fingerprint matching tolerates a changed set of network interfaces (container bridges come and go): it
matches when the hostname and machine id are the same and at least one recorded MAC address is still
present (or neither side has any).

Pure: the records are read and written by :mod:`lmgrd.storage.activations`, time is passed in (the
daemon's wall clock, :func:`lmgrd.storage.host.daemon_wall_clock`). Never imports ``client_stub``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from lmgrd.core.cloud import CloudActivations
from protocol.activation import AUTO_ACTIVATION_AFTER, ActivationRecord, auto_activation_at
from protocol.errors import ErrorCode, ProtocolError
from protocol.fingerprint import Fingerprint
from protocol.license import License

__all__ = ["ACTIVE", "AUTO_ACTIVATION_AFTER", "MOVED", "PENDING", "ActivationRecord", "Activations", "Fingerprint",
           "auto_activation_at"]

logger = logging.getLogger(__name__)


PENDING, ACTIVE, MOVED = "pending", "active", "moved"


# --------------------------------------------------------------------------- the records
def _fmt(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class Activations:
    """The activation state of the served licenses: pure decisions over the records it is given, which
    :func:`lmgrd.storage.activations.open_activations` reads from and ``persist`` writes back to
    ``STATE_DIR/activations.json``.

    ``problems`` lists what was wrong with the file when it was read (it is then treated as empty for the
    licenses it could not describe; nothing is written until an activation happens).
    """

    def __init__(self, records: Mapping[str, ActivationRecord], raw: Mapping[str, Any], *, fingerprint: Fingerprint,
                 hostname: str, persist: Callable[[dict[str, Any]], None], where: str,
                 problems: list[str] | None = None, cloud: CloudActivations | None = None) -> None:
        #: The licenses with a ``cloud_url`` (None when there are none): the activation service decides them.
        self.cloud = cloud
        self.fingerprint = fingerprint  # this machine's, read by lmgrd.storage.host
        self.hostname = hostname
        #: Writes the records (customer ID -> JSON) durably; raises OSError when it cannot.
        self.persist = persist
        #: Where the records live, for messages (the file's path).
        self.path = where
        self.problems: list[str] = list(problems or ())
        self.records: dict[str, ActivationRecord] = dict(records)
        self._raw: dict[str, Any] = dict(raw)
        self._state: dict[str, str] = {}

    def state(self, lic: License, now: datetime) -> str:
        """``pending``, ``active`` or ``moved``; a pending license past its 24 hours is activated (and recorded).
        A cloud license: the states of :meth:`CloudActivations.state`."""
        if lic.cloud_url is not None:
            return self.cloud.state(lic, now) if self.cloud is not None else PENDING
        st = self._state.get(lic.customer_id)
        if st is None:
            rec = self.records.get(lic.customer_id)
            if rec is None:
                st = PENDING
            elif rec.fingerprint.matches(self.fingerprint):
                st = ACTIVE
            else:
                st = MOVED
                logger.error("license %s was activated on another machine (%s, fingerprint %s) and its state was "
                             "copied here (fingerprint %s): it serves nothing; moving a license server needs a "
                             "reissued license", lic.customer_id, rec.hostname or "?", rec.fingerprint.digest[:16],
                             self.fingerprint.digest[:16])
            self._state[lic.customer_id] = st
        if st == PENDING and now >= auto_activation_at(lic):
            try:
                self.activate(lic, now, "automatic, 24 hours after issue")
            except (ProtocolError, OSError) as exc:
                # The 24 hours have passed: serving must not hinge on the state directory being writable.
                logger.error("license %s activates automatically but the record cannot be written: %s",
                             lic.customer_id, exc)
                self._state[lic.customer_id] = ACTIVE
            st = ACTIVE
        return st

    def check(self, lic: License, now: datetime) -> tuple[ErrorCode, str, str] | None:
        """The activation check for one checkout: ``None`` if the license may serve, else the refusal."""
        if lic.cloud_url is not None:
            if self.cloud is None:  # the installation key could not be read (a problem at load says why)
                return (ErrorCode.LICENSE_NOT_ACTIVATED, f"license {lic.customer_id} is activated by the vendor's "
                        f"activation service {lic.cloud_url}, and this license server's installation key cannot be "
                        "used", "see the daemon's log; check that its user can write the state directory")
            return self.cloud.check(lic, now)
        st = self._state.get(lic.customer_id)
        if st == ACTIVE:
            return None
        st = self.state(lic, now)
        if st == ACTIVE:
            return None
        if st == MOVED:
            return self.moved_error(lic)
        at = auto_activation_at(lic)
        return (ErrorCode.LICENSE_NOT_ACTIVATED,
                f"license {lic.customer_id} ({lic.customer}) is not activated on this license server yet; it "
                f"activates automatically at {_fmt(at)} (24 hours after it was issued at {_fmt(lic.issued_at)})",
                f"to activate it now, the administrator runs on the license server: lmutil activate "
                f"{lic.customer_id}")

    def moved_error(self, lic: License) -> tuple[ErrorCode, str, str]:
        rec = self.records[lic.customer_id]
        return (ErrorCode.LICENSE_MOVED,
                f"license {lic.customer_id} was activated on another machine ({rec.hostname or 'unknown'}, "
                f"fingerprint {rec.fingerprint.digest[:16]}) and this machine's fingerprint is "
                f"{self.fingerprint.digest[:16]}: the license and its state were moved, so it serves nothing",
                "moving a license server needs a reissued license: ask the software vendor to reissue it for "
                "this machine (lmissue reissue)")

    def activate(self, lic: License, now: datetime, how: str) -> ActivationRecord:
        """Activate ``lic`` on this machine now and record it.

        Raises:
            ProtocolError: LICENSE_MOVED if it is already bound to another machine.
            OSError: the record cannot be written (the license stays pending).
        """
        if lic.cloud_url is not None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"license {lic.customer_id} is activated by the vendor's "
                                f"activation service {lic.cloud_url}, not locally", "run lmutil activate "
                                f"{lic.customer_id} against the running license server")
        st = self._state.get(lic.customer_id) or self.state(lic, datetime.min.replace(tzinfo=UTC))
        rec = self.records.get(lic.customer_id)
        if st == MOVED:
            code, message, hint = self.moved_error(lic)
            raise ProtocolError(code, message, hint)
        if st == ACTIVE and rec is not None:
            return rec
        rec = ActivationRecord(lic.customer_id, self.fingerprint, self.hostname, now.astimezone(UTC), how)
        self._raw[lic.customer_id] = rec.to_json()
        try:
            self.persist(dict(self._raw))
        except OSError:
            del self._raw[lic.customer_id]
            raise
        self.records[lic.customer_id] = rec
        self._state[lic.customer_id] = ACTIVE
        logger.info("ACTIVATED license %s (%s) on this machine (%s): %s; fingerprint %s recorded in %s",
                    lic.customer_id, lic.customer, self.hostname, how, self.fingerprint.digest[:16], self.path)
        return rec
