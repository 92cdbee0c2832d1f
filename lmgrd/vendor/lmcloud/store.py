"""The service's decisions, each in one database transaction: register, activate, check in, supersede, revoke,
answer an offline request, and read back (list, show).

Every operation locks the customer's row first (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN
IMMEDIATE`` serialises all writers), so two requests for one customer ID, on one service instance or on
several sharing a PostgreSQL database, are decided one after the other: of two machines racing to activate,
exactly one wins and the other is told who. A refused request rolls back: nothing is written, except the
event it is about (a conflict, a suspected clone), which is committed on its own.

The clock is passed in (``now``, epoch seconds: the service's clock, ``LMCLOUD_CLOCK_OFFSET_SECONDS`` ahead
of the system's); the vendor key signs what the service answers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, Final, Literal

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from lmgrd.vendor.lmcloud.db import activations, customers, events, nonces
from protocol.activation import AUTO_ACTIVATION_AFTER
from protocol.cloud import (
    ActivationCertificate,
    ActivationRequest,
    CheckInRequest,
    CloudRevocation,
    OfflineRequest,
    canonical_bytes,
    nonce_text,
    signed_json,
)
from protocol.errors import ErrorCode
from protocol.fingerprint import Fingerprint
from protocol.license import License, LicenseFileError, format_timestamp, host_mismatch, parse_license
from protocol.validation import short_hostname

__all__ = [
    "EVENT_KINDS",
    "MAX_REQUEST_AGE_SECONDS",
    "MAX_RETRY_STREAK",
    "RETRY_GRACE_SECONDS",
    "Outcome",
    "Refusal",
    "Store",
]

#: A retried check-in (its reply was lost) may present the previous token this long after the rotation ...
RETRY_GRACE_SECONDS: Final = 300
#: ... unless the certificates of this many rotations in a row were already fetched twice: two copies of one
#: installation checking in in lockstep look like a retry each time, and are caught by the third round.
MAX_RETRY_STREAK: Final = 2
#: Requests whose ``sent_at`` is further than this from the service's clock are refused; nonces are kept as long.
MAX_REQUEST_AGE_SECONDS: Final = 7 * 86_400
#: The longest a certificate waits for its next check-in (the service's suggestion; half the validity if shorter).
MAX_CHECK_IN_GAP_SECONDS: Final = 86_400
#: Event kinds (the ``lmcloud show --json`` contract names the first six).
EVENT_KINDS: Final = ("activated", "check_in", "conflict", "suspected_clone", "superseded", "revoked",
                      "registered")

State = Literal["pending", "active", "superseded", "revoked"]


@dataclasses.dataclass(eq=False)
class Refusal(Exception):
    """A request the service refuses: HTTP status, wire code, message and hint (and the other machine)."""

    http_status: int
    code: ErrorCode
    message: str
    hint: str = ""
    conflict_hostname: str | None = None
    conflict_since: int | None = None
    metric: str = "refused"


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """What an activation or check-in came to: ``active`` (a signed certificate), ``pending`` or ``revoked``."""

    status: Literal["active", "pending", "revoked"]
    metric: str
    certificate: dict[str, Any] | None = None
    revocation: dict[str, Any] | None = None
    activates_at: int | None = None
    message: str = ""
    hint: str = ""


def _ts(epoch: int | None) -> str | None:
    return None if epoch is None else format_timestamp(datetime.fromtimestamp(epoch, UTC))


def _dt(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _epoch(moment: datetime) -> int:
    return int(moment.timestamp())


def _updated(row: Any, values: dict[str, Any]) -> Any:
    """``row`` with ``values`` applied (what the UPDATE just wrote), without reading it back."""
    return SimpleNamespace(**{**row._mapping, **values})


def _fingerprint(row: Any) -> Fingerprint:
    return Fingerprint(row.fp_host, row.fp_machine, frozenset(json.loads(row.fp_macs)))


class Store:
    """The decisions over one database. ``valid_for`` is the online certificates' validity (seconds)."""

    def __init__(self, engine: AsyncEngine, vendor_key: Ed25519PrivateKey | None, valid_for: int) -> None:
        self.engine = engine
        self.vendor_key = vendor_key
        self.valid_for = valid_for
        self._postgres = engine.dialect.name == "postgresql"
        #: The servers of each HA license seen (a customer ID's license text never changes once registered).
        self._servers: dict[str, tuple[tuple[str, str], ...]] = {}

    # ------------------------------------------------------------------ helpers

    def _sign(self, doc: ActivationCertificate | CloudRevocation) -> dict[str, Any]:
        if self.vendor_key is None:
            raise RuntimeError("this operation needs the vendor key")
        return signed_json(doc, self.vendor_key.sign(canonical_bytes(doc)))

    async def _customer(self, conn: AsyncConnection, customer_id: str) -> Any:
        query = sa.select(customers).where(customers.c.customer_id == customer_id)
        if self._postgres:
            query = query.with_for_update()
        return (await conn.execute(query)).first()

    def _servers_of(self, row: Any) -> tuple[tuple[str, str], ...]:
        """The license's HA servers (``hosts:`` of its request), or ``()`` for a license of one server."""
        servers = self._servers.get(row.customer_id)
        if servers is None:
            servers = self._servers[row.customer_id] = parse_license(row.license_text, row.customer_id)[0].servers
        return servers

    def _listed_host(self, row: Any, hostname: str, addresses: Sequence[str]) -> str | None:
        """For an HA license, the server of its list this machine is (the name as the license spells it); None
        for a license of one server. Each listed server has its own activation.

        Raises:
            Refusal: an HA license and this machine is none of its servers (403 ``HOST_NOT_LICENSED``).
        """
        servers = self._servers_of(row)
        if not servers:
            return None
        lic = parse_license(row.license_text, row.customer_id)[0]
        for name, ip in servers:
            if not host_mismatch(dataclasses.replace(lic, hostname=name, ip=ip, servers=()), hostname, addresses):
                return name
        raise Refusal(403, ErrorCode.HOST_NOT_LICENSED, host_mismatch(lic, hostname, addresses)[0],
                      "activate it on one of the servers the license names; to add or move a server, ask the "
                      "vendor to reissue the license", metric="refused")

    async def _current(self, conn: AsyncConnection, row: Any, server: str | None) -> Any:
        """The activation in force: the customer's one, or for an HA license that of the listed ``server``."""
        if server is None:
            return await self._activation(conn, row.active_activation_id)
        acts = (await conn.execute(sa.select(activations).where(
            activations.c.customer_id == row.customer_id, activations.c.ended_at.is_(None)).order_by(
            activations.c.id.desc()))).all()
        mine = short_hostname(server).lower()
        return next((a for a in acts if short_hostname(a.hostname).lower() == mine), None)

    @staticmethod
    async def _activation(conn: AsyncConnection, activation_id: int | None) -> Any:
        if activation_id is None:
            return None
        return (await conn.execute(sa.select(activations).where(activations.c.id == activation_id))).first()

    @staticmethod
    async def _event(conn: AsyncConnection, customer_id: str, now: int, kind: str, hostname: str | None,
                     detail: str) -> None:
        await conn.execute(events.insert().values(customer_id=customer_id, at=now, kind=kind, hostname=hostname,
                                                  detail=detail))

    async def _record_event(self, customer_id: str, now: int, kind: str, hostname: str | None, detail: str) -> None:
        """An event of a refused request, committed on its own after the refusal's rollback."""
        async with self.engine.begin() as conn:
            await self._event(conn, customer_id, now, kind, hostname, detail)

    async def _use_nonce(self, conn: AsyncConnection, nonce: str, customer_id: str, now: int) -> None:
        # INSERT … ON CONFLICT DO NOTHING: a replay is told by the row count, with no savepoint round trips.
        insert = (postgresql.insert(nonces) if self._postgres else sqlite.insert(nonces)).values(
            nonce=nonce, customer_id=customer_id, seen_at=now).on_conflict_do_nothing(index_elements=["nonce"])
        if (await conn.execute(insert)).rowcount != 1:
            raise Refusal(400, ErrorCode.BAD_REQUEST, f"replayed request: the nonce {nonce} was already used",
                          "send every request (retries too) with a fresh nonce") from None

    @staticmethod
    def _check_age(sent_at: datetime, now: int) -> None:
        skew = _epoch(sent_at) - now
        if abs(skew) > MAX_REQUEST_AGE_SECONDS:
            side = "ahead of" if skew > 0 else "behind"
            raise Refusal(400, ErrorCode.BAD_REQUEST,
                          f"the request was sent at {format_timestamp(sent_at)}, {abs(skew) // 86_400} days {side} "
                          f"the service's clock ({_ts(now)}): the machine's clock is wrong, or this is an old "
                          "request replayed", "set the machine's clock (NTP), then try again")

    def _revocation(self, row: Any) -> Outcome:
        assert row.revoked_at is not None
        rev = CloudRevocation(row.customer_id, _dt(row.revoked_at), row.revoke_reason or "revoked by the vendor",
                              row.replaced_by)
        if row.replaced_by:
            message = (f"license {row.customer_id} was superseded by {row.replaced_by} at {_ts(row.revoked_at)}: "
                       f"{rev.reason}")
            hint = f"install the license of {row.replaced_by} the vendor issued in its place"
        else:
            message = f"license {row.customer_id} was revoked by the vendor at {_ts(row.revoked_at)}: {rev.reason}"
            hint = "contact the software vendor"
        return Outcome("revoked", "revoked", revocation=self._sign(rev), message=message, hint=hint)

    @staticmethod
    def _unknown(customer_id: str) -> Refusal:
        return Refusal(404, ErrorCode.LICENSE_INVALID,
                       f"customer ID {customer_id} is not registered with this activation service",
                       "check the license file; the vendor registers every license it issues (lmcloud register)")

    @staticmethod
    def _expired(row: Any, now: int) -> Refusal | None:
        if row.expires_at is not None and now > row.expires_at:
            return Refusal(403, ErrorCode.LICENSE_EXPIRED,
                           f"license {row.customer_id} expired at {_ts(row.expires_at)}", "ask the vendor to renew it")
        return None

    def _conflict(self, row: Any, act: Any, hostname: str, server: str | None = None) -> Refusal:
        return Refusal(409, ErrorCode.ACTIVATION_CONFLICT,
                       f"license {row.customer_id} is already active on host {act.hostname!r} since "
                       f"{_ts(act.activated_at)}; this machine ({hostname!r}) cannot activate it as well"
                       + ("" if server is None else f" (the HA license's server {server!r} is another machine)"),
                       "one license server per customer ID (per listed server of an HA license): to move a license "
                       "server, ask the vendor to reissue the license for the new machine (a new customer ID)",
                       conflict_hostname=act.hostname, conflict_since=act.activated_at, metric="conflict")

    def _certificate(self, act: Any) -> dict[str, Any]:
        cert = ActivationCertificate(
            customer_id=act.customer_id, hostname=act.hostname, fingerprint=_fingerprint(act),
            installation_key=act.installation_key, issued_at=_dt(act.cert_issued_at),
            valid_until=None if act.valid_until is None else _dt(act.valid_until),
            next_check_in=None if act.next_check_in is None else _dt(act.next_check_in),
            token=act.token, sequence=act.sequence, how=act.how, request_nonce=act.request_nonce)
        return self._sign(cert)

    def _terms(self, row: Any, now: int) -> dict[str, Any]:
        """A fresh online certificate's validity, token and check-in time."""
        valid_until = now + self.valid_for
        if row.expires_at is not None:
            valid_until = min(valid_until, row.expires_at)
        return {"cert_issued_at": now, "valid_until": valid_until,
                "next_check_in": now + min(self.valid_for // 2, MAX_CHECK_IN_GAP_SECONDS),
                "token": nonce_text(os.urandom(32))}

    async def _activate(self, conn: AsyncConnection, row: Any, req: ActivationRequest | OfflineRequest, how: str,
                        now: int, previous: Any) -> Any:
        """Insert the activation, point the customer at it (ending ``previous``, the one it replaces: the
        customer's, or for an HA license that of the same listed server), record the event."""
        if how == "offline":
            terms: dict[str, Any] = {"cert_issued_at": now, "valid_until": row.expires_at, "next_check_in": None,
                                     "token": None}
            sequence = 0
        else:
            terms, sequence = self._terms(row, now), 1
        fp = req.fingerprint
        result = await conn.execute(activations.insert().values(
            customer_id=row.customer_id, hostname=req.hostname, addresses=json.dumps(list(req.addresses)),
            fp_host=fp.host, fp_machine=fp.machine, fp_macs=json.dumps(sorted(fp.macs)), fingerprint=fp.digest,
            installation_key=req.installation_key, how=how, activated_at=now, last_check_in=None,
            sequence=sequence, request_nonce=req.nonce, prev_token=None, rotated_at=now, **terms))
        new_id = result.inserted_primary_key[0] if result.inserted_primary_key else None
        if previous is not None:
            await conn.execute(activations.update().where(activations.c.id == previous.id).values(
                ended_at=now, ended_reason=f"replaced by a new installation on {req.hostname}"))
        await conn.execute(customers.update().where(customers.c.customer_id == row.customer_id).values(
            state="active", active_activation_id=new_id))
        await self._event(conn, row.customer_id, now, "activated", req.hostname,
                          f"{how} activation on {req.hostname} ({', '.join(req.addresses) or 'no addresses'})")
        return await self._activation(conn, new_id)

    # ------------------------------------------------------------------ the vendor's commands

    async def register(self, text: str, source: str, now: int) -> tuple[str, bool, License]:
        """Record an issued license. Idempotent: the same file again changes nothing.

        Returns:
            (customer ID, whether it was new, the license).

        Raises:
            Refusal: unreadable license, or the customer ID is registered with another license.
        """
        try:
            lic, _ = parse_license(text, source)
        except LicenseFileError as exc:
            raise Refusal(400, exc.code, exc.message, exc.hint) from None
        async with self.engine.begin() as conn:
            row = await self._customer(conn, lic.customer_id)
            if row is not None:
                if row.license_text.strip() == text.strip():
                    return lic.customer_id, False, lic
                raise Refusal(409, ErrorCode.BAD_REQUEST,
                              f"{source}: customer ID {lic.customer_id} is already registered with a different "
                              "license file", "a reissued license has a new customer ID; register that one")
            await conn.execute(customers.insert().values(
                customer_id=lic.customer_id, license_text=text, customer=lic.customer,
                license_type=lic.license_type, issued_at=_epoch(lic.issued_at),
                expires_at=None if lic.expires_at is None else _epoch(lic.expires_at), cloud_url=lic.cloud_url,
                registered_at=now, state="pending"))
            await self._event(conn, lic.customer_id, now, "registered", lic.hostname,
                              f"registered {lic.license_type} license for {lic.customer}")
        return lic.customer_id, True, lic

    async def end(self, customer_id: str, now: int, reason: str, replaced_by: str | None) -> None:
        """``lmcloud revoke`` (``replaced_by`` None) and ``lmcloud supersede``.

        Raises:
            Refusal: unknown customer ID, already revoked or superseded, or an unregistered successor.
        """
        async with self.engine.begin() as conn:
            row = await self._customer(conn, customer_id)
            if row is None:
                raise self._unknown(customer_id)
            if row.state in ("revoked", "superseded"):
                raise Refusal(409, ErrorCode.LICENSE_REVOKED,
                              f"customer ID {customer_id} is already {row.state} (at {_ts(row.revoked_at)})")
            if replaced_by is not None:
                if replaced_by == customer_id:
                    raise Refusal(400, ErrorCode.BAD_REQUEST, f"{customer_id} cannot supersede itself")
                if (await self._customer(conn, replaced_by)) is None:
                    raise Refusal(404, ErrorCode.LICENSE_INVALID,
                                  f"the successor {replaced_by} is not registered",
                                  "register its license first: lmcloud register NEW.lic")
            state: State = "superseded" if replaced_by else "revoked"
            await conn.execute(customers.update().where(customers.c.customer_id == customer_id).values(
                state=state, revoked_at=now, revoke_reason=reason, replaced_by=replaced_by))
            detail = f"superseded by {replaced_by}: {reason}" if replaced_by else f"revoked: {reason}"
            await self._event(conn, customer_id, now, state, None, detail)

    # ------------------------------------------------------------------ the API

    async def activate(self, req: ActivationRequest, now: int) -> Outcome:
        """``POST /v1/activations`` (the request's signature already verified). Raises Refusal."""
        self._check_age(req.sent_at, now)
        conflict: Refusal | None = None
        async with self.engine.begin() as conn:
            row = await self._customer(conn, req.customer_id)
            if row is None:
                raise self._unknown(req.customer_id)
            if row.state in ("revoked", "superseded"):
                return self._revocation(row)
            expired = self._expired(row, now)
            if expired:
                raise expired
            server = self._listed_host(row, req.hostname, req.addresses)
            await self._use_nonce(conn, req.nonce, req.customer_id, now)
            act = await self._current(conn, row, server)
            if act is not None:
                if not _fingerprint(act).matches(req.fingerprint):
                    conflict = self._conflict(row, act, req.hostname, server)
                elif act.installation_key == req.installation_key and act.how != "offline":
                    # The same installation asks again (it lost its certificate): a fresh one, the token rotates.
                    values = {"sequence": act.sequence + 1, "prev_token": act.token, "rotated_at": now,
                              "last_check_in": now, "retried": False, "retry_streak": 0, "request_nonce": req.nonce,
                              **self._terms(row, now)}
                    await conn.execute(activations.update().where(activations.c.id == act.id).values(**values))
                    return Outcome("active", "already_active", certificate=self._certificate(_updated(act, values)))
                else:  # the same machine, a new installation (reinstalled, or moving off an offline activation)
                    new = await self._activate(conn, row, req, req.mode, now, act)
                    return Outcome("active", "activated", certificate=self._certificate(new))
            else:
                activates_at = row.issued_at + int(AUTO_ACTIVATION_AFTER.total_seconds())
                if req.mode == "manual" or now >= activates_at:
                    how = "manual" if req.mode == "manual" else "automatic"
                    new = await self._activate(conn, row, req, how, now, None)
                    return Outcome("active", "activated", certificate=self._certificate(new))
                return Outcome("pending", "pending", activates_at=activates_at,
                               message=f"license {row.customer_id} is not active yet: the activation service "
                                       f"activates it by itself at {_ts(activates_at)} (24 hours after it was "
                                       "issued)",
                               hint="wait, or activate it now: lmutil activate CUSTOMER_ID on the license server")
        assert conflict is not None  # the transaction above committed only the nonce
        await self._record_event(req.customer_id, now, "conflict", req.hostname,
                                 f"activation refused: already active on {conflict.conflict_hostname}")
        raise conflict

    async def check_in(self, req: CheckInRequest, verify: Callable[[str], None], now: int) -> Outcome:
        """``POST /v1/check-ins``. ``verify(installation_key)`` checks the request's signature (raises).

        Raises:
            Refusal: unknown, not activated, another installation, stale token (suspected clone), mismatch.
        """
        self._check_age(req.sent_at, now)
        event: tuple[str, str] | None = None
        refusal: Refusal | None = None
        async with self.engine.begin() as conn:
            row = await self._customer(conn, req.customer_id)
            if row is None:
                raise self._unknown(req.customer_id)
            if row.state in ("revoked", "superseded"):
                return self._revocation(row)
            server = self._listed_host(row, req.hostname, req.addresses)
            act = await self._current(conn, row, server)
            if act is None or act.how == "offline":
                raise Refusal(409, ErrorCode.LICENSE_NOT_ACTIVATED,
                              f"license {req.customer_id} has no online activation to check in to",
                              "activate it first (the daemon does so by itself)", metric="not_activated")
            if act.installation_key != req.installation_key:
                verify(req.installation_key)  # a well-formed request of that other installation, or 400
                await self._use_nonce(conn, req.nonce, req.customer_id, now)
                refusal = Refusal(409, ErrorCode.ACTIVATION_CONFLICT,
                                  f"license {req.customer_id} is now active on host {act.hostname!r} (since "
                                  f"{_ts(act.activated_at)}) with another installation; this one was replaced",
                                  "to move a license server, ask the vendor to reissue the license",
                                  conflict_hostname=act.hostname, conflict_since=act.activated_at, metric="conflict")
                event = ("conflict", f"check-in of a replaced installation from {req.hostname}")
            else:
                verify(act.installation_key)
                await self._use_nonce(conn, req.nonce, req.customer_id, now)
                if not _fingerprint(act).matches(req.fingerprint):
                    refusal = self._conflict(row, act, req.hostname, server)
                    event = ("conflict", f"check-in from another machine ({req.hostname}) with this installation's "
                             "key: a copied state directory")
                elif req.token == act.token and req.sequence == act.sequence:
                    fp = req.fingerprint  # keep the latest readings, so MAC drift never accumulates
                    values = {"sequence": act.sequence + 1, "prev_token": act.token, "rotated_at": now,
                              "last_check_in": now, "retried": False,
                              "retry_streak": act.retry_streak + 1 if act.retried else 0, "hostname": req.hostname,
                              "addresses": json.dumps(list(req.addresses)), "fp_host": fp.host,
                              "fp_machine": fp.machine, "fp_macs": json.dumps(sorted(fp.macs)),
                              "fingerprint": fp.digest, **self._terms(row, now)}
                    await conn.execute(activations.update().where(activations.c.id == act.id).values(**values))
                    await self._event(conn, req.customer_id, now, "check_in", req.hostname,
                                      f"sequence {act.sequence} -> {act.sequence + 1}")
                    return Outcome("active", "renewed", certificate=self._certificate(_updated(act, values)))
                elif (req.token == act.prev_token and req.sequence == act.sequence - 1
                      and now - (act.rotated_at or 0) <= RETRY_GRACE_SECONDS and act.retry_streak < MAX_RETRY_STREAK):
                    # The reply to the last check-in was lost: the same certificate again, nothing rotates.
                    await conn.execute(activations.update().where(activations.c.id == act.id).values(retried=True))
                    return Outcome("active", "retry", certificate=self._certificate(act))
                else:
                    refusal = Refusal(409, ErrorCode.ACTIVATION_CONFLICT,
                                      f"license {req.customer_id}: this installation presented check-in token "
                                      f"{req.sequence}, but token {act.sequence} was issued since (last check-in "
                                      f"{_ts(act.last_check_in) or 'none'} from {act.hostname!r}): a copy of this "
                                      "license server (cloned VM or disk) is running",
                                      "run one copy of a license server only; the copy holding the latest token "
                                      "keeps working", conflict_hostname=act.hostname,
                                      conflict_since=act.activated_at, metric="suspected_clone")
                    event = ("suspected_clone", f"stale token {req.sequence} (latest {act.sequence}) presented by "
                             f"{req.hostname}")
        assert refusal is not None and event is not None
        await self._record_event(req.customer_id, now, event[0], req.hostname, event[1])
        raise refusal

    async def offline(self, req: OfflineRequest, now: int) -> dict[str, Any]:
        """``lmcloud offline-response``: activate ``how: offline`` and return the signed offline response."""
        self._check_age(req.sent_at, now)
        async with self.engine.begin() as conn:
            row = await self._customer(conn, req.customer_id)
            if row is None:
                raise self._unknown(req.customer_id)
            if row.state in ("revoked", "superseded"):
                raise Refusal(410, ErrorCode.LICENSE_REVOKED, self._revocation(row).message)
            expired = self._expired(row, now)
            if expired:
                raise expired
            server = self._listed_host(row, req.hostname, req.addresses)
            await self._use_nonce(conn, req.nonce, req.customer_id, now)
            act = await self._current(conn, row, server)
            if act is not None and not _fingerprint(act).matches(req.fingerprint):
                raise self._conflict(row, act, req.hostname, server)
            new = await self._activate(conn, row, req, "offline", now, act)
            return self._certificate(new)

    async def prune_nonces(self, now: int) -> int:
        """Forget nonces older than the request age limit (a request that old is refused anyway)."""
        async with self.engine.begin() as conn:
            result = await conn.execute(nonces.delete().where(nonces.c.seen_at < now - MAX_REQUEST_AGE_SECONDS - 60))
            return int(result.rowcount or 0)

    # ------------------------------------------------------------------ reading

    async def list_customers(self) -> list[dict[str, Any]]:
        """Every customer ID with its state and current activation (``lmcloud list``)."""
        query = (sa.select(customers.c.customer_id, customers.c.state, customers.c.customer,
                           customers.c.license_type, activations.c.hostname, activations.c.last_check_in,
                           activations.c.valid_until)
                 .select_from(customers.outerjoin(activations, activations.c.id == customers.c.active_activation_id))
                 .order_by(customers.c.registered_at, customers.c.customer_id))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [{"customer_id": r.customer_id, "state": r.state, "customer": r.customer,
                 "license_type": r.license_type, "hostname": r.hostname, "last_check_in": _ts(r.last_check_in),
                 "valid_until": _ts(r.valid_until)} for r in rows]

    async def show(self, customer_id: str) -> dict[str, Any]:
        """One customer ID in full (the ``lmcloud show --json`` contract). Raises Refusal if unknown."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(customers).where(customers.c.customer_id == customer_id))).first()
            if row is None:
                raise self._unknown(customer_id)
            acts: Sequence[Any] = (await conn.execute(sa.select(activations).where(
                activations.c.customer_id == customer_id).order_by(activations.c.id))).all()
            evs: Sequence[Any] = (await conn.execute(sa.select(events).where(
                events.c.customer_id == customer_id).order_by(events.c.id))).all()
        servers = self._servers_of(row)
        ha = bool(servers)

        def server_of(hostname: str) -> str | None:  # the listed server an HA activation is for
            return next((n for n, _ip in servers if short_hostname(n).lower() == short_hostname(hostname).lower()),
                        None)

        return {
            "customer_id": row.customer_id, "state": row.state, "customer": row.customer,
            "license_type": row.license_type, "issued_at": _ts(row.issued_at),
            "activates_at": _ts(row.issued_at + int(AUTO_ACTIVATION_AFTER.total_seconds())),
            "expires_at": _ts(row.expires_at), "cloud_url": row.cloud_url, "registered_at": _ts(row.registered_at),
            "revoked_at": _ts(row.revoked_at), "reason": row.revoke_reason, "replaced_by": row.replaced_by,
            "servers": [{"hostname": n, "ip": ip} for n, ip in servers],
            "activations": [{
                "hostname": a.hostname, "addresses": json.loads(a.addresses), "fingerprint": a.fingerprint,
                "how": a.how, "activated_at": _ts(a.activated_at), "last_check_in": _ts(a.last_check_in),
                "valid_until": _ts(a.valid_until), "sequence": a.sequence, "installation_key": a.installation_key,
                "current": (a.ended_at is None and row.state == "active") if ha else a.id == row.active_activation_id,
                "server": server_of(a.hostname) if ha else None, "ended_at": _ts(a.ended_at),
                "ended_reason": a.ended_reason} for a in acts],
            "events": [{"at": _ts(e.at), "kind": e.kind, "hostname": e.hostname, "detail": e.detail} for e in evs],
        }
