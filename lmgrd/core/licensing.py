"""Which licenses this daemon serves, and the ordered licensing checks for one checkout.

The order is the handbook's, and a refusal names the first check that fails: signature and file validity,
revocation, host and site, activation, expiry, product, version, policy (include/exclude), seats. Signature,
revocation and host are decided when the files are loaded (``lmgrd.storage.files``); site, activation,
expiry, product, version and include/exclude per checkout in :meth:`Licensing.candidates`; seats (and the
policy's reserve/max, which depend on who holds what) by the ledger, whose verdict :func:`seat_refusal`
turns into the reply. Also here: what a reload keeps (:meth:`Licensing.merged_with`). Pure: no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from lmgrd.core.activation import ACTIVE, Activations
from lmgrd.core.ledger import PoolKey
from lmgrd.core.policy import Policy
from lmgrd.core.site import Network, Site
from protocol.errors import ErrorCode, ProtocolError
from protocol.license import License, Revocation, evaluate_use

logger = logging.getLogger(__name__)

#: Rank of the per-license refusals: with several licenses for one product, the reply names the one that
#: got furthest through the checks (an expired license is less relevant than a version that is too new).
_RANK = {ErrorCode.OUTSIDE_SITE: -3, ErrorCode.LICENSE_MOVED: -2, ErrorCode.LICENSE_NOT_ACTIVATED: -1,
         ErrorCode.LICENSE_EXPIRED: 0, ErrorCode.UNKNOWN_PRODUCT: 1, ErrorCode.BAD_REQUEST: 2,
         ErrorCode.VERSION_NOT_PERMITTED: 3}

_HINTS = {
    ErrorCode.LICENSE_EXPIRED: "ask the software vendor for a renewed license",
    ErrorCode.UNKNOWN_PRODUCT: "check the product name, or ask the vendor to add the product to the license",
    ErrorCode.VERSION_NOT_PERMITTED: "run a permitted version, or ask the vendor for an upgraded license",
    ErrorCode.BAD_REQUEST: "versions are dot-separated integers such as 2.1",
    ErrorCode.HOST_NOT_LICENSED: "the license must be issued for this license server's hostname and address",
    ErrorCode.LICENSE_INVALID: "ask the administrator to run 'lmgrd --check' and replace the license file",
    ErrorCode.LICENSE_REVOKED: "the vendor revoked this license; install the reissued license it was replaced by",
    ErrorCode.EXCLUDED: "ask the license administrator to change the usage policy (lmgrd config 'policy')",
    ErrorCode.OUTSIDE_SITE: "run the product from a PC inside the licensed site, or ask the vendor to add your "
                            "network to the license (site_networks)",
}


#: At most this many (customer ID, product, version) verdicts are remembered; then they are forgotten at once.
_VERDICTS_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class Refusal:
    """A license file the daemon does not serve, and why."""

    source: str
    code: ErrorCode
    reasons: tuple[str, ...]
    customer_id: str = ""
    products: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"source": self.source, "code": str(self.code), "reasons": list(self.reasons),
                "customer_id": self.customer_id, "products": list(self.products)}


class Decision(NamedTuple):
    """Either the licenses that may serve this checkout, best first, or the error to answer.

    A NamedTuple, not a frozen dataclass: one is made per checkout (0.1 us against 0.5 us here)."""

    licenses: tuple[License, ...]
    error: tuple[ErrorCode, str, str] | None = None


class Licensing:
    """The served licenses, indexed by product, plus the refused ones.

    ``activations`` (None: every license counts as active), ``revoked`` (customer ID -> its verified
    revocation) and ``daemon_site`` (the config's ``site_networks``, narrowing every license's site) come
    from the loader; ``Server.reload`` carries them over.
    """

    def __init__(self, served: list[tuple[Path, License]], refused: list[Refusal], *,
                 activations: Activations | None = None, revoked: Mapping[str, Revocation] | None = None,
                 daemon_site: Sequence[Network] = (), policy: Policy | None = None) -> None:
        self.served = served
        #: The usage policy (config ``groups``, ``host_groups``, ``policy``); reloaded with the licenses.
        self.policy = policy or Policy()
        self.refused = refused
        self.activations = activations
        self.revoked: dict[str, Revocation] = dict(revoked or {})
        self.daemon_site = tuple(daemon_site)
        self._sites = {lic.customer_id: Site(lic.site_networks, self.daemon_site) for _p, lic in served}
        self._by_product: dict[str, list[License]] = {}
        self._pools: dict[PoolKey, int] = {}
        self._lic_by_pool: dict[PoolKey, License] = {}
        for _path, lic in served:
            for prod in lic.products:
                self._by_product.setdefault(prod.name, []).append(lic)
                pool = (lic.customer_id, prod.name)
                self._pools[pool] = prod.count
                self._lic_by_pool[pool] = lic
        self._refused_by_product: dict[str, Refusal] = {}
        for ref in refused:
            for name in ref.products:
                self._refused_by_product.setdefault(name, ref)
        self._all_products = ", ".join(sorted(self._by_product)) or "none"
        self._customer_of: dict[str, str] | None = None
        #: Caches of :meth:`_use` (a Licensing is never changed after it is made; a reload makes a new one).
        self._expires_at: dict[str, datetime | None] = {lic.customer_id: lic.expires_at for _p, lic in served}
        self._verdicts: dict[tuple[str, str, str], tuple[ErrorCode, str] | None] = {}

    def pools(self) -> dict[PoolKey, int]:
        return self._pools

    def count(self, pool: PoolKey) -> int:
        return self._pools.get(pool, 0)

    def license_for(self, pool: PoolKey) -> License | None:
        return self._lic_by_pool.get(pool)

    def customer_of(self, product: str) -> str | None:
        """For labels and logs of a denial: ``None`` when no license (served or refused, say revoked) names
        ``product``; else the customer ID when exactly one license has it, ``""`` when several do.
        Built once per (re)load: a Licensing is never changed after it is made."""
        if self._customer_of is None:
            owners: dict[str, set[str]] = {}
            for cid, name in self._pools:
                owners.setdefault(name, set()).add(cid)
            for ref in self.refused:
                for name in ref.products:
                    owners.setdefault(name, set()).add(ref.customer_id)
            self._customer_of = {name: next(iter(c)) if len(c) == 1 else "" for name, c in owners.items()}
        return self._customer_of.get(product)

    def refusals(self) -> list[dict[str, Any]]:
        return [r.to_wire() for r in self.refused]

    def candidates(self, product: str, version: str, addr: str, user: str, host: str, now: datetime,
                   display: str = "") -> Decision:
        """Run every check before seats, in order; return the licenses that pass or the first refusal.

        ``addr`` and ``display`` are the client's, for the policy's include/exclude by address or display."""
        lics = self._by_product.get(product)
        if lics is None:
            ref = self._refused_by_product.get(product)
            if ref is None:
                unverifiable = [r for r in self.refused if r.code is ErrorCode.LICENSE_INVALID]
                if unverifiable:
                    ref = unverifiable[0]
            if ref is not None:
                return Decision((), (ref.code, f"{product} is not served: license {ref.source} is refused: "
                                     + "; ".join(ref.reasons), _HINTS.get(ref.code, "")))
            return Decision((), (ErrorCode.UNKNOWN_PRODUCT,
                                 f"product {product!r} is not licensed on this server (it serves: "
                                 f"{self._all_products})", _HINTS[ErrorCode.UNKNOWN_PRODUCT]))
        ok: list[License] = []
        worst: tuple[ErrorCode, str, str] | None = None
        for lic in lics:
            # Host (and signature, revocation) were decided at load; here: site, activation, then the rest.
            err = self._site_and_activation(lic, addr, now)
            if err is None:
                use = self._use(lic, product, version, now)
                err = None if use is None else (use[0], use[1], _HINTS.get(use[0], ""))
            if err is None:
                ok.append(lic)
            elif worst is None or _RANK.get(err[0], 0) > _RANK.get(worst[0], 0):
                worst = err
        if ok:
            pp = self.policy.get(product) if self.policy.active else None
            if pp is not None:  # the policy's include/exclude, after every license check
                why = pp.refusal(user, host, addr, display)
                if why is not None:
                    return Decision((), (ErrorCode.EXCLUDED, why, _HINTS[ErrorCode.EXCLUDED]))
            return Decision(tuple(ok))
        assert worst is not None
        if worst[0] is ErrorCode.OUTSIDE_SITE:
            logger.warning("OUTSIDE_SITE: refused %s from %s: %s", product, addr, worst[1])
        return Decision((), worst)

    def _use(self, lic: License, product: str, version: str, now: datetime) -> tuple[ErrorCode, str] | None:
        """:func:`evaluate_use`, remembered: once ``now`` is inside the license's term, the verdict depends on
        the product and version alone (pure), so it is kept per (customer ID, product, version); the expiry
        day's end is computed once per license. Bounded: versions are the clients' choice."""
        cid = lic.customer_id
        expires_at = self._expires_at[cid]
        if expires_at is not None and now > expires_at:
            return evaluate_use(lic, product, version, now)  # expired first, as evaluate_use checks it
        key = (cid, product, version)
        verdicts = self._verdicts
        if key in verdicts:
            return verdicts[key]
        if len(verdicts) >= _VERDICTS_LIMIT:
            verdicts.clear()
        verdict = verdicts[key] = evaluate_use(lic, product, version, now)
        return verdict

    def _site_and_activation(self, lic: License, addr: str, now: datetime) -> tuple[ErrorCode, str, str] | None:
        site = self._sites[lic.customer_id]
        if not site.allows(addr):
            return (ErrorCode.OUTSIDE_SITE,
                    f"client address {addr} is outside the site of license {lic.customer_id}; allowed: {site.text}",
                    _HINTS[ErrorCode.OUTSIDE_SITE])
        if self.activations is not None:
            return self.activations.check(lic, now)
        return None

    def activation_state(self, customer_id: str, now: datetime) -> str:
        """``pending``, ``active`` or ``moved`` for a served license (lmstat shows it)."""
        lic = next((lic for _p, lic in self.served if lic.customer_id == customer_id), None)
        if lic is None or self.activations is None:
            return ACTIVE
        return self.activations.state(lic, now)

    def activate(self, customer_id: str, now: datetime, how: str) -> dict[str, Any]:
        """``lmutil activate``: bind a served license to this machine now.

        Raises:
            ProtocolError: the license is not loaded, or is refused by an earlier check (its code:
                LICENSE_REVOKED, HOST_NOT_LICENSED, LICENSE_INVALID), or was activated elsewhere
                (LICENSE_MOVED), or the record cannot be written (INTERNAL_ERROR).
        """
        lic = next((lic for _p, lic in self.served if lic.customer_id == customer_id), None)
        if lic is None:
            ref = next((r for r in self.refused if r.customer_id == customer_id), None)
            if ref is not None:
                raise ProtocolError(ref.code, f"license {customer_id} cannot be activated: it is refused "
                                    f"({ref.source}): " + "; ".join(ref.reasons), _HINTS.get(ref.code, ""))
            loaded = ", ".join(lic.customer_id for _p, lic in self.served) or "none"
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"customer ID {customer_id} is not loaded on this license "
                                f"server (it serves: {loaded})", "check the customer ID (lmutil lmstat shows the "
                                "loaded ones), or add its license file and run lmutil lmreread")
        if self.activations is None:
            return {"customer_id": customer_id, "state": ACTIVE, "activated": True}
        try:
            rec = self.activations.activate(lic, now, how)
        except OSError as exc:
            raise ProtocolError(ErrorCode.INTERNAL_ERROR, f"cannot write the activation record "
                                f"{self.activations.path}: {exc.strerror or exc}; the license stays pending",
                                "check that the daemon's user can write its state directory") from None
        return {"customer_id": customer_id, "state": ACTIVE, "activated": True,
                "activated_at": rec.activated_at.strftime("%Y-%m-%dT%H:%M:%SZ"), "how": rec.how,
                "hostname": rec.hostname, "fingerprint": rec.fingerprint.digest[:16]}

    def merged_with(self, new: Licensing, problems: list[str]) -> Licensing:
        """What a reload serves: ``new``, plus each license served now whose file the reload refused.

        A license file that now fails validation keeps its previously loaded copy serving (a problem says
        so), unless the reload revoked it. ``new.activations`` is ``None`` when the vendor key could not be
        read: then the running activation state, revocations and site are kept. Appends to ``problems``.
        """
        new_paths = {str(p) for p, _ in new.served}
        kept = [(p, lic) for p, lic in self.served
                if str(p) not in new_paths and any(r.source == str(p) for r in new.refused)
                and lic.customer_id not in new.revoked]  # a revoked license never keeps serving
        for p, lic in kept:
            problems.append(f"{p}: the new file was refused; the previously loaded license {lic.customer_id} "
                            "keeps serving")
        kept_paths = {str(p) for p, _ in kept}
        fresh = new.activations is not None
        return Licensing(new.served + kept, [r for r in new.refused if r.source not in kept_paths],
                         activations=new.activations if fresh else self.activations,
                         revoked=new.revoked if fresh else self.revoked,
                         daemon_site=new.daemon_site if fresh else self.daemon_site,
                         policy=new.policy)


def revocation_reason(rev: Revocation) -> str:
    """One line saying what a revocation says."""
    text = (f"customer ID {rev.customer_id} was revoked by the vendor on "
            f"{rev.revoked_at.strftime('%Y-%m-%d %H:%M:%S')} UTC ({rev.reason})")
    if rev.replaced_by:
        text += f"; it is replaced by {rev.replaced_by}"
    return text


def seat_refusal(product: str, licenses: Sequence[License], reasons: set[str | None], policy: Policy, user: str,
                 host: str, addr: str = "", display: str = "") -> tuple[ErrorCode, str, str]:
    """Why no pool of ``product`` grants ``user``@``host`` a seat now, from the ledger's ``reasons`` (one per
    pool: ``"max"``, ``"reserved"`` or ``None`` for plain full). Cold path: after every pool said no."""
    count = sum(p.count for lic in licenses for p in lic.products if p.name == product)
    if reasons == {"max"}:
        pp = policy.get(product)
        rules = [f"max {r.seats} for {r.subject}" for r in (pp.max if pp else ())
                 if r.subject.matches(user, host, addr, display)]
        return (ErrorCode.MAX_REACHED,
                f"{user}@{host} already holds the most seats of {product} the usage policy allows "
                f"({', '.join(rules) or 'max'})",
                "check in a seat you hold first, or ask the license administrator to change the policy")
    if "reserved" in reasons:
        return (ErrorCode.RESERVED,
                f"the free seats of {product} are reserved for others by the usage policy",
                "try again later, check out with a wait, or ask the license administrator for a reservation")
    return (ErrorCode.NO_SEATS, f"all {count} seat(s) of {product} are in use",
            "try again later, check out with a wait, or ask the administrator who holds them "
            "(lmutil lmstat -a)")
