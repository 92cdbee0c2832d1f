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

Fingerprint matching tolerates a changed set of network interfaces (container bridges come and go): it
matches when the hostname and machine id are the same and at least one recorded MAC address is still
present (or neither side has any).

The clock: the daemon's wall clock is ``time.time()`` plus ``LMGRD_CLOCK_OFFSET_SECONDS`` (default 0). The
offset exists for tests and for operators rehearsing the 24-hour rule; it may only move time FORWARD
(a negative value is refused), so it can bring expiry nearer but never extend a license.

Never imports ``client_stub``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lmgrd import LmgrdError
from protocol.activation import AUTO_ACTIVATION_AFTER, ActivationRecord, auto_activation_at
from protocol.errors import ErrorCode, ProtocolError
from protocol.fingerprint import Fingerprint
from protocol.license import License

__all__ = [
    "ACTIVATIONS_FILE",
    "AUTO_ACTIVATION_AFTER",
    "CLOCK_OFFSET_ENV",
    "ActivationRecord",
    "Activations",
    "Fingerprint",
    "auto_activation_at",
    "clock_offset",
    "daemon_wall_clock",
]

logger = logging.getLogger(__name__)

ACTIVATIONS_FILE = "activations.json"
CLOCK_OFFSET_ENV = "LMGRD_CLOCK_OFFSET_SECONDS"
_MAX_STATE_BYTES = 16 * 1024 * 1024

PENDING, ACTIVE, MOVED = "pending", "active", "moved"


# --------------------------------------------------------------------------- the clock
def clock_offset(environ: dict[str, str] | None = None) -> float:
    """Seconds added to the daemon's wall clock (``LMGRD_CLOCK_OFFSET_SECONDS``; tests and rehearsals only).

    Raises:
        LmgrdError: the value is not a number, or is negative (the clock may only be moved forward).
    """
    raw = (os.environ if environ is None else environ).get(CLOCK_OFFSET_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise LmgrdError(f"{CLOCK_OFFSET_ENV}={raw!r} is not a number of seconds; unset it") from None
    if not value >= 0 or value == float("inf"):
        raise LmgrdError(f"{CLOCK_OFFSET_ENV}={raw!r}: the clock may only be moved forward (0 or more seconds); "
                         "unset it")
    return value


def daemon_wall_clock(offset: float = 0.0) -> Callable[[], float]:
    """The daemon's wall clock: epoch seconds, moved forward by ``offset``."""
    if not offset:
        return time.time
    logger.warning("%s=%g: the daemon's clock runs %g s ahead of the system clock (test/rehearsal setting)",
                   CLOCK_OFFSET_ENV, offset, offset)
    return lambda: time.time() + offset


# --------------------------------------------------------------------------- the records
def _fmt(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class Activations:
    """The activation state of the served licenses, backed by ``STATE_DIR/activations.json``.

    ``problems`` lists what was wrong with the file when it was read (it is then treated as empty for the
    licenses it could not describe; nothing is written until an activation happens).
    """

    def __init__(self, state_dir: Path, fingerprint: Fingerprint, hostname: str | None = None) -> None:
        self.path = state_dir / ACTIVATIONS_FILE
        self.fingerprint = fingerprint  # this machine's, read by the caller (lmgrd.storage.host)
        self.hostname = hostname or socket.gethostname()
        self.problems: list[str] = []
        self.records: dict[str, ActivationRecord] = {}
        self._raw: dict[str, Any] = {}
        self._state: dict[str, str] = {}
        self._load()

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                data = f.read(_MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return
        except OSError as exc:
            self.problems.append(f"{self.path}: cannot read the activation records: {exc.strerror or exc}")
            return
        try:
            doc = json.loads(data)
            entries = doc["activations"]
            if not isinstance(entries, dict):
                raise TypeError("'activations' is not a mapping")
        except (ValueError, KeyError, TypeError) as exc:
            self.problems.append(f"{self.path}: the activation records are damaged ({exc}); licenses are pending "
                                 "again until activated (lmutil activate CUSTOMER_ID)")
            return
        for cid, entry in entries.items():
            try:
                self.records[str(cid)] = ActivationRecord.from_json(str(cid), entry)
                self._raw[str(cid)] = entry
            except (ValueError, TypeError) as exc:
                self.problems.append(f"{self.path}: {exc}; that license is pending again until activated")

    def _save(self) -> None:
        doc = {"format": 1, "activations": self._raw}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".activations.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def state(self, lic: License, now: datetime) -> str:
        """``pending``, ``active`` or ``moved``; a pending license past its 24 hours is activated (and recorded)."""
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
            self._save()
        except OSError:
            del self._raw[lic.customer_id]
            raise
        self.records[lic.customer_id] = rec
        self._state[lic.customer_id] = ACTIVE
        logger.info("ACTIVATED license %s (%s) on this machine (%s): %s; fingerprint %s recorded in %s",
                    lic.customer_id, lic.customer, self.hostname, how, self.fingerprint.digest[:16], self.path)
        return rec


def record_activation(state_dir: Path, lic: License, how: str, fingerprint: Fingerprint,
                      now: datetime | None = None) -> ActivationRecord:
    """Activate ``lic`` on this machine (``fingerprint``) before the daemon starts (``make demo``)."""
    return Activations(state_dir, fingerprint).activate(lic, now or datetime.now(UTC), how)
