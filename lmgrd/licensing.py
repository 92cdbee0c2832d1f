"""Which licenses this daemon serves, and the ordered licensing checks for one checkout.

The order is the handbook's, and a refusal names the first check that fails: signature and file validity,
revocation, host and site, activation, expiry, product, version, policy, seats. Seats are the ledger's
business; everything before them is decided here, without I/O (licenses are loaded by ``lmgrd.license``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from lmgrd.ledger import PoolKey
from protocol.errors import ErrorCode
from protocol.license import License, evaluate_use

logger = logging.getLogger(__name__)

#: Rank of the per-license refusals: with several licenses for one product, the reply names the one that
#: got furthest through the checks (an expired license is less relevant than a version that is too new).
_RANK = {ErrorCode.LICENSE_EXPIRED: 0, ErrorCode.UNKNOWN_PRODUCT: 1, ErrorCode.BAD_REQUEST: 2,
         ErrorCode.VERSION_NOT_PERMITTED: 3}

_HINTS = {
    ErrorCode.LICENSE_EXPIRED: "ask the software vendor for a renewed license",
    ErrorCode.UNKNOWN_PRODUCT: "check the product name, or ask the vendor to add the product to the license",
    ErrorCode.VERSION_NOT_PERMITTED: "run a permitted version, or ask the vendor for an upgraded license",
    ErrorCode.BAD_REQUEST: "versions are dot-separated integers such as 2.1",
    ErrorCode.HOST_NOT_LICENSED: "the license must be issued for this license server's hostname and address",
    ErrorCode.LICENSE_INVALID: "ask the administrator to run 'lmgrd --check' and replace the license file",
}


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


@dataclass(frozen=True, slots=True)
class Decision:
    """Either the licenses that may serve this checkout, best first, or the error to answer."""

    licenses: tuple[License, ...]
    error: tuple[ErrorCode, str, str] | None = None


class Licensing:
    """The served licenses, indexed by product, plus the refused ones."""

    def __init__(self, served: list[tuple[Path, License]], refused: list[Refusal]) -> None:
        self.served = served
        self.refused = refused
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

    def pools(self) -> dict[PoolKey, int]:
        return self._pools

    def count(self, pool: PoolKey) -> int:
        return self._pools.get(pool, 0)

    def license_for(self, pool: PoolKey) -> License | None:
        return self._lic_by_pool.get(pool)

    def refusals(self) -> list[dict[str, Any]]:
        return [r.to_wire() for r in self.refused]

    def candidates(self, product: str, version: str, addr: str, now: datetime) -> Decision:
        """Run every check before seats, in order; return the licenses that pass or the first refusal."""
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
        worst: tuple[ErrorCode, str] | None = None
        for lic in lics:
            err = evaluate_use(lic, product, version, now)
            if err is None:
                ok.append(lic)
            elif worst is None or _RANK.get(err[0], 0) > _RANK.get(worst[0], 0):
                worst = err
        if ok:
            return Decision(tuple(ok))
        assert worst is not None
        return Decision((), (worst[0], worst[1], _HINTS.get(worst[0], "")))
