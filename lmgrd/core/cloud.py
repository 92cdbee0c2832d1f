"""Activation by the vendor's activation service: what a license with a signed ``cloud_url`` may serve, and
when the daemon next talks to the service. Pure decisions; time is passed in.

The service is the only authority for such a license (the local 24-hour rule of
:mod:`lmgrd.core.activation` never applies to it, and the signature covers ``cloud_url``). The rules:

* A license serves while this daemon holds an **activation certificate** that verifies with the vendor key,
  names this customer ID and this installation's key, and whose fingerprint matches this machine, until its
  ``valid_until`` (an offline certificate: until the license's expiry).
* No certificate yet: ``LICENSE_NOT_ACTIVATED``, saying when the service activates it by itself (it said
  ``pending``), or why it could not be asked, and that ``lmutil activate CUSTOMER_ID`` activates it now.
* **Could not reach the service** (refused, timeout, 5xx, 429, bad TLS, an answer whose signature fails) is
  never taken for the service's word: the certificate keeps serving until ``valid_until``; from
  :data:`WARN_BEFORE` before it, :meth:`CloudActivations.warning` says so (log, lmstat, metric); after it,
  no new seat (``LICENSE_NOT_ACTIVATED`` naming the service URL and when it was last reached). Held seats
  are not touched: an outage must not kill work in progress.
* **The service said no**: a signed revocation (stored for good: ``LICENSE_REVOKED`` naming the successor;
  the daemon ends held seats), ``ACTIVATION_CONFLICT`` (another machine holds the customer ID, or this
  installation presented a stale token: it is a copy, and stops granting new seats), or another 4xx, shown
  as the reason while no certificate is held.

The records are read and written by :mod:`lmgrd.storage.cloud` (``persist`` is injected); the HTTP calls
are :mod:`lmgrd.daemon.cloud`'s. Never imports ``client_stub``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol.cloud import (
    ActivationCertificate,
    Answer,
    CloudDocumentError,
    CloudRevocation,
    verify_certificate,
    verify_cloud_revocation,
)
from protocol.errors import ErrorCode
from protocol.fingerprint import Fingerprint
from protocol.license import License, format_timestamp, parse_timestamp

__all__ = ["WARN_BEFORE", "CloudActivations", "CloudLicense", "Due", "jittered"]

logger = logging.getLogger(__name__)

#: From this long before a certificate's ``valid_until``, an unreachable service is warned about.
WARN_BEFORE = timedelta(days=7)
#: Intervals are shortened by up to this share at random, so thousands of servers do not call at once.
JITTER = 0.1

PENDING, ACTIVE, EXPIRED, MOVED, REVOKED, CONFLICT = "pending", "active", "expired", "moved", "revoked", "conflict"


def _fmt(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if moment is not None else "never"


def jittered(interval: float, rand: float) -> float:
    """``interval`` shortened by up to :data:`JITTER` (``rand`` uniform in [0, 1)); never under 1 s."""
    return max(1.0, interval * (1.0 - JITTER * rand))


@dataclass(slots=True)
class CloudLicense:
    """What this daemon knows about one cloud license: its certificate and revocation (verified, with the
    signed JSON they came in, as stored), when the service was last reached and tried, the last failure to
    reach it, and the service's last refusal."""

    customer_id: str
    url: str
    certificate: ActivationCertificate | None = None
    certificate_json: dict[str, Any] | None = None
    revocation: CloudRevocation | None = None
    revocation_json: dict[str, Any] | None = None
    last_reached_at: datetime | None = None
    last_attempt_at: datetime | None = None
    #: Why the last attempt did not reach the service ("" when it did).
    last_error: str = ""
    #: The service's last "no" (code, message, hint), cleared by a certificate.
    refusal: tuple[ErrorCode, str, str] | None = None
    #: The service said "pending": it activates the license by itself then.
    activates_at: datetime | None = None
    #: When the current certificate was obtained (the check-in interval counts from here).
    certified_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        def ts(moment: datetime | None) -> str | None:
            return format_timestamp(moment) if moment is not None else None

        return {"customer_id": self.customer_id, "url": self.url, "certificate": self.certificate_json,
                "revocation": self.revocation_json, "last_reached_at": ts(self.last_reached_at),
                "last_attempt_at": ts(self.last_attempt_at), "last_error": self.last_error,
                "refusal": list(map(str, self.refusal)) if self.refusal else None,
                "activates_at": ts(self.activates_at), "certified_at": ts(self.certified_at)}


def read_cloud_license(lic: License, stored: Mapping[str, Any], vendor_key: Ed25519PublicKey, installation_key: str,
                       where: str) -> tuple[CloudLicense, list[str]]:
    """Rebuild the state of ``lic`` from its stored JSON, verifying the certificate and the revocation again
    (a stored part that no longer verifies, or is another license's or installation's, is dropped with a
    problem; a dropped certificate means asking the service again, never serving on it)."""
    assert lic.cloud_url is not None
    st = CloudLicense(lic.customer_id, lic.cloud_url)
    problems: list[str] = []

    def when(key: str) -> datetime | None:
        v = stored.get(key)
        return parse_timestamp(v) if isinstance(v, str) else None

    st.last_reached_at, st.last_attempt_at = when("last_reached_at"), when("last_attempt_at")
    st.activates_at, st.certified_at = when("activates_at"), when("certified_at")
    st.last_error = str(stored.get("last_error") or "")
    ref = stored.get("refusal")
    if isinstance(ref, list) and len(ref) == 3 and all(isinstance(x, str) for x in ref):
        with contextlib.suppress(ValueError):
            st.refusal = (ErrorCode(ref[0]), ref[1], ref[2])
    rev_json = stored.get("revocation")
    if rev_json is not None:
        try:
            rev = verify_cloud_revocation(rev_json, vendor_key, f"{where} revocation")
            if rev.customer_id != lic.customer_id:
                raise CloudDocumentError("revocation.customer_id", f"is {rev.customer_id}, not {lic.customer_id}")
            st.revocation, st.revocation_json = rev, dict(rev_json)
        except CloudDocumentError as exc:
            problems.append(f"{where}: the stored revocation is refused and revokes nothing: {exc.message}")
    cert_json = stored.get("certificate")
    if cert_json is not None:
        try:
            cert = verify_certificate(cert_json, vendor_key, f"{where} certificate")
            _check_mine(cert, lic.customer_id, installation_key)
            st.certificate, st.certificate_json = cert, dict(cert_json)
        except CloudDocumentError as exc:
            problems.append(f"{where}: the stored activation certificate is refused ({exc.message}); the license "
                            "asks the activation service again")
    return st, problems


def _check_mine(cert: ActivationCertificate, customer_id: str, installation_key: str) -> None:
    if cert.customer_id != customer_id:
        raise CloudDocumentError("certificate.customer_id", f"is {cert.customer_id}, not {customer_id}")
    if cert.installation_key != installation_key:
        raise CloudDocumentError("certificate.installation_key", "is another installation's key, not this "
                                 "license server's", ErrorCode.LICENSE_INVALID)


Due = tuple[Literal["activate", "check_in"], datetime]


class CloudActivations:
    """The cloud licenses of this daemon: decisions over their :class:`CloudLicense` records, which
    ``persist(customer_id, json)`` writes durably (raising OSError when it cannot)."""

    def __init__(self, licenses: Mapping[str, CloudLicense], *, fingerprint: Fingerprint, installation_key: str,
                 vendor_key: Ed25519PublicKey, persist: Callable[[str, dict[str, Any]], None],
                 problems: list[str] | None = None) -> None:
        self.licenses: dict[str, CloudLicense] = dict(licenses)
        self.fingerprint = fingerprint
        self.installation_key = installation_key
        self.vendor_key = vendor_key
        self.persist = persist
        self.problems: list[str] = list(problems or ())

    # -- decisions -----------------------------------------------------------------------------------------
    def state(self, lic: License, now: datetime) -> str:
        """``pending``, ``active``, ``expired`` (certificate past valid_until), ``moved``, ``revoked`` or
        ``conflict``."""
        st = self.licenses[lic.customer_id]
        if st.revocation is not None:
            return REVOKED
        if st.refusal is not None and st.refusal[0] is ErrorCode.ACTIVATION_CONFLICT:
            return CONFLICT
        cert = st.certificate
        if cert is None:
            return PENDING
        if not cert.fingerprint.matches(self.fingerprint):
            return MOVED
        return ACTIVE if cert.valid_at(now) else EXPIRED

    def check(self, lic: License, now: datetime) -> tuple[ErrorCode, str, str] | None:
        """The activation check for one checkout: ``None`` if the license may serve, else the refusal."""
        st = self.licenses[lic.customer_id]
        state = self.state(lic, now)
        if state == ACTIVE:
            return None
        url = st.url
        if state == REVOKED:
            assert st.revocation is not None
            return self.revoked_error(st.revocation)
        if state == CONFLICT:
            assert st.refusal is not None
            code, message, hint = st.refusal
            return (code, f"license {lic.customer_id}: the activation service {url} refused it: {message}",
                    hint or "moving a license server needs a reissued license from the vendor")
        if state == MOVED:
            assert st.certificate is not None
            return (ErrorCode.LICENSE_MOVED,
                    f"license {lic.customer_id} was activated on another machine ({st.certificate.hostname}, "
                    f"fingerprint {_digest(st.certificate.fingerprint)}), and this machine's fingerprint is "
                    f"{_digest(self.fingerprint)}: the license and its state were moved, so it serves nothing",
                    "moving a license server needs a reissued license: ask the software vendor")
        if state == EXPIRED:
            assert st.certificate is not None
            return (ErrorCode.LICENSE_NOT_ACTIVATED,
                    f"license {lic.customer_id}: its activation certificate expired at "
                    f"{_fmt(st.certificate.valid_until)} because the activation service {url} could not be "
                    f"reached to renew it (last reached {_fmt(st.last_reached_at)}"
                    + (f"; last error: {st.last_error}" if st.last_error else "") + "); seats already held keep "
                    "running, new ones are granted again as soon as the service is reached",
                    f"let this license server reach {url} (firewall, proxy: lmutil cloud-check); it retries by "
                    "itself, or run lmutil activate " + lic.customer_id)
        # pending
        if st.refusal is not None:
            code, message, hint = st.refusal
            return (ErrorCode.LICENSE_NOT_ACTIVATED if code is ErrorCode.LICENSE_NOT_ACTIVATED else code,
                    f"license {lic.customer_id} is not activated: the activation service {url} answered: "
                    f"{message}", hint or f"lmutil activate {lic.customer_id}")
        if st.activates_at is not None and not st.last_error:
            why = f"the vendor's activation service {url} activates it automatically at {_fmt(st.activates_at)}"
        elif st.last_error:
            why = (f"the vendor's activation service {url} could not be reached ({st.last_error}; last reached "
                   f"{_fmt(st.last_reached_at)}); the license server keeps asking")
        else:
            why = f"the license server is asking the vendor's activation service {url}"
        return (ErrorCode.LICENSE_NOT_ACTIVATED,
                f"license {lic.customer_id} ({lic.customer}) is not activated on this license server yet: {why}",
                f"to activate it now, the administrator runs on the license server: lmutil activate "
                f"{lic.customer_id}")

    def revoked_error(self, rev: CloudRevocation) -> tuple[ErrorCode, str, str]:
        text = (f"customer ID {rev.customer_id} was revoked by the vendor's activation service on "
                f"{_fmt(rev.revoked_at)} ({rev.reason})")
        if rev.replaced_by:
            text += f"; it is replaced by customer ID {rev.replaced_by}"
        hint = (f"install the license of customer ID {rev.replaced_by} the vendor issued in its place"
                if rev.replaced_by else "ask the software vendor for a new license")
        return ErrorCode.LICENSE_REVOKED, text, hint

    def warning(self, lic: License, now: datetime) -> str | None:
        """A warning while the service is unreachable and the certificate ends within :data:`WARN_BEFORE`
        (or has ended); ``None`` otherwise."""
        st = self.licenses[lic.customer_id]
        cert = st.certificate
        if cert is None or cert.offline or cert.valid_until is None or not st.last_error or st.revocation:
            return None
        if now < cert.valid_until - WARN_BEFORE:
            return None
        if now > cert.valid_until:
            return (f"license {lic.customer_id}: the activation service {st.url} has not been reached since "
                    f"{_fmt(st.last_reached_at)} ({st.last_error}); its certificate expired at "
                    f"{_fmt(cert.valid_until)}: no new seats are granted until the service is reached")
        return (f"license {lic.customer_id}: the activation service {st.url} has not been reached since "
                f"{_fmt(st.last_reached_at)} ({st.last_error}); the license stops granting new seats at "
                f"{_fmt(cert.valid_until)} unless it is reached before")

    def view(self, lic: License, now: datetime) -> dict[str, Any]:
        """What lmstat --json / --extended and the metrics show about one cloud license."""
        st = self.licenses[lic.customer_id]
        cert = st.certificate

        def ts(moment: datetime | None) -> str | None:
            return format_timestamp(moment) if moment is not None else None

        return {"customer_id": lic.customer_id, "url": st.url, "state": self.state(lic, now),
                "how": cert.how if cert else None, "valid_until": ts(cert.valid_until) if cert else None,
                "valid_until_epoch": cert.valid_until.timestamp() if cert and cert.valid_until else None,
                "next_check_in": ts(cert.next_check_in) if cert else None,
                "sequence": cert.sequence if cert else None,
                "last_reached_at": ts(st.last_reached_at),
                "last_reached_epoch": st.last_reached_at.timestamp() if st.last_reached_at else None,
                "last_attempt_at": ts(st.last_attempt_at), "last_error": st.last_error,
                "activates_at": ts(st.activates_at),
                "refusal": {"code": str(st.refusal[0]), "message": st.refusal[1]} if st.refusal else None,
                "replaced_by": st.revocation.replaced_by if st.revocation else None,
                "warning": self.warning(lic, now)}

    def due(self, customer_id: str, *, poll_interval: float, check_in_interval: float, rand: float
            ) -> Due | None:
        """What to ask the service next for ``customer_id``, and when; ``None``: nothing, ever (revoked, or
        an offline certificate, which needs no check-in)."""
        st = self.licenses[customer_id]
        if st.revocation is not None:
            return None
        cert = st.certificate
        if cert is not None and cert.offline:
            return None
        refused = st.refusal[0] if st.refusal is not None else None
        if cert is None or refused in (ErrorCode.ACTIVATION_CONFLICT, ErrorCode.LICENSE_NOT_ACTIVATED):
            base = st.last_attempt_at
            wait = jittered(poll_interval, rand)
            when = base + timedelta(seconds=wait) if base is not None else datetime.min.replace(tzinfo=UTC)
            if refused is ErrorCode.ACTIVATION_CONFLICT and cert is not None:
                return ("check_in", when)  # a copy keeps presenting its token: the service records each attempt
            # No certificate, or the service knows no activation for this installation any more: activate.
            return ("activate", when)
        # Active: check in every interval (or sooner if the service asks), retrying sooner after a failure.
        start = st.certified_at or cert.issued_at
        when = start + timedelta(seconds=jittered(check_in_interval, rand))
        if cert.next_check_in is not None:
            when = min(when, cert.next_check_in)
        if st.last_error and st.last_attempt_at is not None:
            when = max(when, st.last_attempt_at + timedelta(seconds=jittered(min(poll_interval, check_in_interval),
                                                                              rand)))
        return ("check_in", when)

    # -- what the service said -----------------------------------------------------------------------------
    def accept(self, customer_id: str, answer: Answer, signed: Mapping[str, Any] | None, now: datetime) -> str:
        """Apply the service's (verified) answer; returns what it meant: ``active``, ``pending``, ``revoked``,
        ``refused`` (a 4xx: the service's word) or ``unreachable`` (a 5xx or 429: a fault, retried).

        ``signed`` is the reply's JSON body (the certificate and revocation are stored as signed). The new
        state is written before it is used (a new check-in token must survive a crash); a write failure is
        logged and the state is used anyway, the old token being dead at the service already.
        """
        st = self.licenses[customer_id]
        st.last_attempt_at = now
        if not answer.service_said_no and answer.status != "active":
            why = f"HTTP {answer.http_status} {answer.code}: {answer.message}" if answer.code else \
                f"HTTP {answer.http_status}"
            return self.unreachable(customer_id, why, now)
        if answer.status == "active":
            cert = answer.certificate
            assert cert is not None and signed is not None
            try:
                _check_mine(cert, customer_id, self.installation_key)
                if not cert.fingerprint.matches(self.fingerprint):
                    raise CloudDocumentError("certificate.fingerprint", "does not match this machine",
                                             ErrorCode.LICENSE_INVALID)
                if st.certificate is not None and not st.certificate.offline and cert.sequence < \
                        st.certificate.sequence:
                    raise CloudDocumentError("certificate.sequence", f"{cert.sequence} is older than the "
                                             f"{st.certificate.sequence} held", ErrorCode.LICENSE_INVALID)
            except CloudDocumentError as exc:
                return self.unreachable(customer_id, f"the answer was refused: {exc.message}", now)
            st.certificate, st.certificate_json = cert, dict(signed["certificate"])
            st.certified_at, st.refusal, st.activates_at = now, None, None
            result = "active"
        elif answer.status == "revoked":
            rev = answer.revocation
            assert rev is not None and signed is not None
            if rev.customer_id != customer_id:
                return self.unreachable(customer_id, f"the answer was refused: a revocation of {rev.customer_id}, "
                                        f"not {customer_id}", now)
            st.revocation, st.revocation_json = rev, dict(signed["revocation"])
            result = "revoked"
        elif answer.status == "pending":
            st.activates_at, st.refusal = answer.activates_at, None
            result = "pending"
        else:
            assert answer.code is not None
            st.refusal = (answer.code, answer.message, answer.hint)
            result = "refused"
        st.last_reached_at, st.last_error = now, ""
        self._save(st)
        return result

    def install_offline(self, customer_id: str, cert: ActivationCertificate, signed: Mapping[str, Any],
                        now: datetime) -> None:
        """Install a verified offline certificate (``lmutil activate --offline-response``).

        Raises:
            CloudDocumentError: it is another license's or installation's, or for another machine.
        """
        _check_mine(cert, customer_id, self.installation_key)
        if not cert.offline:
            raise CloudDocumentError("certificate.how", "is not an offline certificate")
        if not cert.fingerprint.matches(self.fingerprint):
            raise CloudDocumentError("certificate.fingerprint", "is another machine's: the offline request was "
                                     "made on another machine", ErrorCode.LICENSE_MOVED)
        st = self.licenses[customer_id]
        st.certificate, st.certificate_json = cert, dict(signed)
        st.certified_at, st.refusal, st.activates_at, st.last_error = now, None, None, ""
        self._save(st)

    def unreachable(self, customer_id: str, why: str, now: datetime) -> str:
        """The service could not be reached (or its answer could not be trusted): nothing changes but that."""
        st = self.licenses[customer_id]
        st.last_attempt_at, st.last_error = now, why
        self._save(st)
        return "unreachable"

    def _save(self, st: CloudLicense) -> None:
        try:
            self.persist(st.customer_id, st.to_json())
        except OSError as exc:
            logger.error("cannot write the activation service state of %s: %s; a restart would present an old "
                         "check-in token", st.customer_id, exc)


def _digest(fp: Fingerprint) -> str:
    return fp.digest[:16]
