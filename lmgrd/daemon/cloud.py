"""The cloud agent: the daemon's conversation with the vendor's activation service, beside the hot path.

For every served license with a signed ``cloud_url`` it asks for activation at start and then every
``cloud_poll_interval`` until active (``mode: automatic``: the service activates it 24 h after issue by its
own clock), then checks in every ``cloud_check_in_interval`` (signed by this installation's key, presenting
the last token). ``lmutil activate CUSTOMER_ID`` asks now (``mode: manual``) through :meth:`activate_now`.
Offline sites: :meth:`offline_request` and :meth:`install_offline`.

What the service said is decided by :class:`lmgrd.core.cloud.CloudActivations` (always the one the current
``server.licensing`` holds: a reload replaces it, reading the same state back from disk); the HTTP is
:mod:`lmgrd.daemon.cloudhttp`. A revocation ends the held seats of that customer ID through
``LeaseLifecycle.end_pool`` (their holders learn it at their next heartbeat), at once and again at every
start, so neither a restart nor a later outage revives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lmgrd.config import DaemonConfig
from lmgrd.core.cloud import CloudActivations
from lmgrd.daemon.cloudhttp import (
    ACTIVATIONS_PATH,
    CHECK_INS_PATH,
    TIMEOUT_SECONDS,
    CloudHttp,
    Reached,
    Unreachable,
    proxy_text,
)
from lmgrd.daemon.events import EndReason
from lmgrd.daemon.server import Server
from protocol.cloud import (
    ActivationRequest,
    CheckInRequest,
    CloudDocumentError,
    OfflineRequest,
    canonical_bytes,
    dumps_document,
    installation_key_text,
    loads_document,
    nonce_text,
    parse_answer,
    signed_json,
    verify_certificate,
)
from protocol.errors import ErrorCode, ProtocolError
from protocol.fingerprint import Fingerprint
from protocol.license import License, format_timestamp

__all__ = ["OFFLINE_MAX_MACS", "CloudAgent"]

logger = logging.getLogger(__name__)

#: The longest the agent sleeps between looks at its schedule (a stepped wall clock is noticed within this).
MAX_SLEEP_SECONDS = 60.0
#: MAC digests and addresses put in an offline request: enough to match (one MAC in common suffices), few
#: enough that the file stays under 1 KB (about 950 bytes at most: a QR code holds 2953).
OFFLINE_MAX_MACS = 4
OFFLINE_MAX_ADDRESSES = 4
_MAX_ADDRESSES = 64


class CloudAgent:
    """Talks to the activation service for the daemon ``server`` (started by :mod:`lmgrd.cli`)."""

    def __init__(self, server: Server, key: Ed25519PrivateKey, host: Callable[[], tuple[str, list[str]]], *,
                 cfg: DaemonConfig | None = None, rand: Callable[[], float] = random.random) -> None:
        self.server = server
        self.key = key
        self.key_text = installation_key_text(key.public_key())
        self.host = host  # () -> (hostname, addresses), read from the OS when a request is made
        self.rand = rand
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._busy: dict[str, asyncio.Lock] = {}
        self._jitter: dict[str, float] = {}
        self._retired: set[asyncio.Task[None]] = set()
        self._http_settings: tuple[Path | None, str | None] | None = None
        self.configure(cfg or server.cfg)

    def configure(self, cfg: DaemonConfig) -> None:
        """Take the cloud settings of ``cfg`` (at start, and from the config a reread produced): the intervals,
        and the HTTP client when ``cloud_ca_file`` or ``cloud_proxy`` changed."""
        self.poll_interval = cfg.cloud_poll_interval
        self.check_in_interval = cfg.cloud_check_in_interval
        settings = (cfg.cloud_ca_file, cfg.cloud_proxy)
        if settings == self._http_settings:
            return
        old = getattr(self, "http", None)
        self.http = CloudHttp(*settings)
        self._http_settings = settings
        if old is not None:
            # A request already under way finishes on the old client; it is closed once that budget has passed.
            task = self.server.loop.create_task(self._close_later(old), name="lmgrd-cloud-http-close")
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)
            logger.info("activation service: new HTTP settings from the reread configuration (cloud_ca_file %s, "
                        "cloud_proxy %s)", cfg.cloud_ca_file or "none", proxy_text(cfg.cloud_proxy))

    @staticmethod
    async def _close_later(http: CloudHttp) -> None:
        try:
            await asyncio.sleep(TIMEOUT_SECONDS + 1)
        finally:
            await http.close()

    # -- the licenses -----------------------------------------------------------------------------------------
    @property
    def cloud(self) -> CloudActivations | None:
        acts = self.server.licensing.activations
        return acts.cloud if acts is not None else None

    def _license(self, customer_id: str) -> License | None:
        return next((lic for _p, lic in self.server.licensing.served
                     if lic.customer_id == customer_id and lic.cloud_url is not None), None)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.server.wall(), UTC).replace(microsecond=0)

    # -- running -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.end_revoked()  # a revocation stored before a restart ends the seats the journal brought back
        self._task = self.server.loop.create_task(self._run(), name="lmgrd-cloud")

    def wake(self) -> None:
        """Look at the schedule now (after a reload added a license)."""
        self._wake.set()

    async def close(self) -> None:
        for task in [*([self._task] if self._task is not None else []), *self._retired]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.http.close()

    async def _run(self) -> None:
        while not self.server.closing:
            delay = MAX_SLEEP_SECONDS
            cloud = self.cloud
            if cloud is not None:
                now = self._now()
                for cid in list(cloud.licenses):
                    if self._license(cid) is None:
                        continue
                    due = cloud.due(cid, poll_interval=self.poll_interval, check_in_interval=self.check_in_interval,
                                    rand=self._jitter.setdefault(cid, self.rand()))
                    if due is None:
                        continue
                    kind, when = due
                    wait = (when - now).total_seconds()
                    if wait <= 0:
                        self._jitter[cid] = self.rand()  # a fresh jitter for the next interval
                        try:
                            await (self.check_in(cid) if kind == "check_in" else self.request(cid, "automatic"))
                        except asyncio.CancelledError:
                            raise
                        except Exception:  # a bug here must not stop the agent, nor the daemon
                            logger.exception("activation service call for %s failed", cid)
                        wait = 0.0
                    delay = min(delay, max(wait, 0.0))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(delay, 0.05))

    # -- the requests ---------------------------------------------------------------------------------------
    def _machine(self) -> tuple[str, list[str], Fingerprint]:
        hostname, addresses = self.host()
        fp = self.server.licensing.activations.fingerprint if self.server.licensing.activations else None
        assert fp is not None
        return hostname, addresses[:_MAX_ADDRESSES], fp

    def _signed(self, doc: ActivationRequest | CheckInRequest | OfflineRequest) -> dict[str, Any]:
        return signed_json(doc, self.key.sign(canonical_bytes(doc)))

    async def request(self, customer_id: str, mode: str) -> str:
        """Ask the service to activate ``customer_id`` (``manual``: now; ``automatic``: once 24 h old);
        returns what came of it (:meth:`CloudActivations.accept`'s words)."""
        lic = self._license(customer_id)
        assert lic is not None and lic.cloud_url is not None
        hostname, addresses, fp = self._machine()
        doc = ActivationRequest(customer_id, hostname, tuple(addresses), fp, self.key_text,
                                nonce_text(secrets.token_bytes(16)), self._now(), mode)  # type: ignore[arg-type]
        async with self._busy.setdefault(customer_id, asyncio.Lock()):
            return await self._post(lic, ACTIVATIONS_PATH, self._signed(doc), f"activation ({mode})")

    async def check_in(self, customer_id: str) -> str:
        lic = self._license(customer_id)
        cloud = self.cloud
        assert lic is not None and lic.cloud_url is not None and cloud is not None
        cert = cloud.licenses[customer_id].certificate
        if cert is None or cert.token is None:
            return await self.request(customer_id, "automatic")
        hostname, addresses, fp = self._machine()
        doc = CheckInRequest(customer_id, hostname, tuple(addresses), fp, self.key_text, cert.token, cert.sequence,
                             nonce_text(secrets.token_bytes(16)), self._now())
        async with self._busy.setdefault(customer_id, asyncio.Lock()):
            return await self._post(lic, CHECK_INS_PATH, self._signed(doc), "check-in")

    async def _post(self, lic: License, path: str, body: dict[str, Any], what: str) -> str:
        assert lic.cloud_url is not None
        reply = await self.http.post(lic.cloud_url, path, body)
        cloud = self.cloud  # after the await: a reload may have replaced it
        if cloud is None or lic.customer_id not in cloud.licenses:
            return "unreachable"
        now = self._now()
        cid = lic.customer_id
        before = cloud.state(lic, now)
        if isinstance(reply, Unreachable):
            result = cloud.unreachable(cid, reply.why, now)
        else:
            result = self._answer(cloud, cid, reply, now)
        st = cloud.licenses[cid]
        if result == "unreachable":
            logger.warning("%s of license %s: could not reach the activation service: %s", what, cid, st.last_error)
            warning = cloud.warning(lic, now)
            if warning:
                logger.warning("CLOUD WARNING %s", warning)
        elif result == "active":
            cert = st.certificate
            assert cert is not None
            level = logging.INFO if before == "active" else logging.WARNING
            logger.log(level, "%s license %s: %s by the activation service %s (after its %s: certificate sequence "
                       "%d, valid until %s)", "ACTIVATED" if before != "active" else "CHECKED IN", cid, cert.how,
                       lic.cloud_url, what, cert.sequence,
                       format_timestamp(cert.valid_until) if cert.valid_until else "the license expires")
        elif result == "pending":
            logger.info("license %s is pending at the activation service %s: it activates automatically at %s",
                        cid, lic.cloud_url, format_timestamp(st.activates_at) if st.activates_at else "?")
        elif result == "revoked":
            self.end_revoked()
        else:
            assert st.refusal is not None
            logger.error("%s of license %s refused by the activation service %s: %s: %s", what, cid, lic.cloud_url,
                         st.refusal[0], st.refusal[1])
        return result

    def _answer(self, cloud: CloudActivations, cid: str, reply: Reached, now: datetime) -> str:
        try:
            answer = parse_answer(reply.status, reply.body, cloud.vendor_key)
            signed = json.loads(reply.body)
        except (CloudDocumentError, ValueError) as exc:
            # Not the service's word: a proxy's error page, a tampered or forged answer.
            message = exc.message if isinstance(exc, CloudDocumentError) else str(exc)
            return cloud.unreachable(cid, f"HTTP {reply.status}: the answer cannot be trusted: {message}", now)
        return cloud.accept(cid, answer, signed, now)

    def end_revoked(self) -> int:
        """End every held seat of a revoked cloud license (LeaseLifecycle.end_pool); returns how many."""
        cloud = self.cloud
        if cloud is None:
            return 0
        ended = 0
        for cid, st in cloud.licenses.items():
            if st.revocation is None:
                continue
            code, why, hint = cloud.revoked_error(st.revocation)
            for pool in [p for p in self.server.ledger.pools() if p[0] == cid]:
                n = self.server.leases.end_pool(pool, EndReason.REVOKED, why, code, hint)
                # The license stays loaded (lmstat shows it revoked); its pool stays, empty: the activation
                # check refuses every checkout before the ledger is asked.
                self.server.ledger.set_pool(pool, self.server.licensing.count(pool))
                ended += n
                if n:
                    logger.warning("REVOKED by the activation service: %s; %d held seat(s) of %s ended", why, n,
                                   pool[1])
        return ended

    # -- what lmutil asks -------------------------------------------------------------------------------------
    async def activate_now(self, customer_id: str) -> dict[str, Any]:
        """``lmutil activate CUSTOMER_ID``: ask the service to activate now (``manual``).

        Raises:
            ProtocolError: the service said no (its code: ACTIVATION_CONFLICT, LICENSE_REVOKED, ...), or could
                not be reached (SERVER_UNAVAILABLE, naming the URL and why).
        """
        lic = self._license(customer_id)
        if lic is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"customer ID {customer_id} is not a served license with a "
                                "cloud_url")
        cloud = self.cloud
        assert cloud is not None
        st = cloud.licenses[customer_id]
        if st.certificate is not None and cloud.state(lic, self._now()) == "active":
            return self._activated(lic, cloud)
        result = await self.request(customer_id, "manual")
        cloud = self.cloud
        assert cloud is not None
        st = cloud.licenses[customer_id]
        if result == "active":
            return self._activated(lic, cloud)
        if result == "unreachable":
            raise ProtocolError(ErrorCode.SERVER_UNAVAILABLE, f"could not reach the vendor's activation service: "
                                f"{st.last_error}; license {customer_id} is not activated",
                                "check the firewall and proxy (lmutil cloud-check), or activate offline: lmutil "
                                f"activate {customer_id} --offline-request FILE")
        refusal = cloud.check(lic, self._now())
        assert refusal is not None
        raise ProtocolError(*refusal)

    def _activated(self, lic: License, cloud: CloudActivations) -> dict[str, Any]:
        cert = cloud.licenses[lic.customer_id].certificate
        assert cert is not None
        return {"customer_id": lic.customer_id, "state": "active", "activated": True, "how": cert.how,
                "activated_at": format_timestamp(cert.issued_at), "hostname": cert.hostname,
                "fingerprint": cert.fingerprint.digest[:16], "service": lic.cloud_url,
                "valid_until": format_timestamp(cert.valid_until) if cert.valid_until else None}

    def offline_request(self, customer_id: str) -> dict[str, Any]:
        """``lmutil activate CUSTOMER_ID --offline-request FILE``: the signed request, as compact JSON text."""
        lic = self._license(customer_id)
        if lic is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"customer ID {customer_id} is not a served license with a "
                                "cloud_url")
        hostname, addresses, fp = self._machine()
        fp = Fingerprint(fp.host, fp.machine, frozenset(sorted(fp.macs)[:OFFLINE_MAX_MACS]))
        doc = OfflineRequest(customer_id, hostname, tuple(addresses[:OFFLINE_MAX_ADDRESSES]), fp, self.key_text,
                             nonce_text(secrets.token_bytes(16)), self._now())
        return {"customer_id": customer_id, "request": dumps_document(self._signed(doc))}

    def install_offline(self, text: str) -> dict[str, Any]:
        """``lmutil activate --offline-response FILE``: verify and install the vendor's offline response.

        Raises:
            ProtocolError: it does not verify, or is for another license, installation or machine.
        """
        cloud = self.cloud
        if cloud is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "this license server serves no license with a cloud_url")
        try:
            signed = loads_document(text, "offline response")
            cert = verify_certificate(signed, cloud.vendor_key, "offline response")
            if cert.customer_id not in cloud.licenses or self._license(cert.customer_id) is None:
                raise CloudDocumentError("offline response.customer_id", f"{cert.customer_id} is not a served "
                                         "license with a cloud_url")
            cloud.install_offline(cert.customer_id, cert, signed, self._now())
        except CloudDocumentError as exc:
            raise ProtocolError(exc.code if exc.code is not ErrorCode.BAD_REQUEST else ErrorCode.LICENSE_INVALID,
                                f"the offline response is refused: {exc.message}",
                                "install the response the vendor made for this license server's own request "
                                "(lmutil activate CUSTOMER_ID --offline-request FILE)") from None
        lic = self._license(cert.customer_id)
        assert lic is not None
        logger.warning("ACTIVATED license %s offline (response installed; valid until %s; no check-in)",
                       cert.customer_id, format_timestamp(cert.valid_until) if cert.valid_until else "never")
        return self._activated(lic, cloud)
