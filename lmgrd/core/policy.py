"""Usage policy: the FlexLM options-file equivalents, in the daemon's YAML.

Pure: parsing and matching only; the ledger enforces ``reserve`` and ``max`` when it grants a seat (so
queued waiters obey them too), the server applies ``include``/``exclude`` and the idle ``timeout``.

.. code-block:: yaml

    groups:                       # user groups (user names compare case-insensitively)
      designers: [alice, bob]
    host_groups:                  # host groups (short host names, case-insensitive)
      lab: [lab-pc1, lab-pc2]
    policy:
      CADPRO:                     # a product name, as in the license
        reserve:                  # these seats never go to anyone else
          - {seats: 2, group: designers}
          - {seats: 1, user: carol}
        max:                      # never more seats than this for these users/hosts together
          - {seats: 3, host_group: lab}
        include: [{group: designers}, {host: cad-ws1}]   # only these may use it (omit: everyone)
        exclude: [{user: mallory}]                       # never these (exclude wins over include)
        timeout: 3600             # reclaim seats of clients idle this long (>= MIN_IDLE_TIMEOUT s)

Each rule names exactly one subject: ``user``, ``group``, ``host`` or ``host_group``. A FlexNet options file
(config ``options:``, parsed by :mod:`lmgrd.core.options`) adds two more kinds, ``display`` and ``internet``
(an IP address pattern such as ``192.0.2.*``, matched against the client's address), and rules for every
product at once (``INCLUDEALL``, ``EXCLUDEALL``, ``TIMEOUTALL``: :attr:`Policy.every_product`). Refusals name the
rule: ``EXCLUDED`` (exclude, or not in include), ``MAX_REACHED`` (a max rule is full), ``RESERVED`` (seats
are free but reserved for others). Reserved seats count towards the product's ``count``: with 10 seats
and ``reserve 2 for designers`` the other users share 8.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from protocol.validation import shown

__all__ = ["MIN_IDLE_TIMEOUT", "Policy", "ProductPolicy", "Rule", "Subject", "address_matches", "combine_policies",
           "parse_policy"]

#: The shortest idle timeout accepted (FlexLM's TIMEOUT minimum is 900 s too): shorter ones would reclaim
#: seats from people reading a drawing.
MIN_IDLE_TIMEOUT = 900.0
SUBJECT_KINDS = ("user", "group", "host", "host_group")
_MERGED_CACHE_LIMIT = 4096


def _host(name: str) -> str:
    return name.split(".", 1)[0].lower()


def address_matches(addr: str, patterns: tuple[str, ...]) -> bool:
    """True if the client address ``addr`` matches one of ``patterns``: an IPv4 address whose parts may be
    ``*`` (``192.0.2.*``, FlexNet's INTERNET form), or an exact IPv4/IPv6 address. ``addr`` as the daemon saw
    it (an IPv4-mapped IPv6 address counts as its IPv4 address)."""
    if not addr or not patterns:
        return False
    text = addr.split("%", 1)[0].lower()
    if text.startswith("::ffff:") and "." in text:
        text = text[7:]
    parts = text.split(".")
    for pat in patterns:
        if pat == text:
            return True
        pp = pat.split(".")
        if len(pp) == 4 and len(parts) == 4 and all(a == "*" or a == b for a, b in zip(pp, parts, strict=True)):
            return True
    return False


@dataclass(frozen=True, slots=True)
class Subject:
    """Who a rule is about: one user, a user group, one host or a host group (members resolved); from an
    options file also one display or an address pattern (``internet``)."""

    kind: str
    name: str
    members: frozenset[str]  # lower-case user names, short host names or display names
    #: IP address patterns matched against the client's address (``internet``, and a ``host`` or
    #: ``host_group`` member written as an address, which FlexNet allows).
    addresses: tuple[str, ...] = ()
    #: Where the rule was written, for refusal messages ("site.opt line 4"); "" for the YAML policy.
    origin: str = ""

    def matches(self, user: str, host: str, addr: str = "", display: str = "") -> bool:
        kind = self.kind
        if kind in ("user", "group"):
            return user.lower() in self.members
        if kind == "display":
            return display.lower() in self.members
        if kind == "internet":
            return address_matches(addr, self.addresses)
        return _host(host) in self.members or (bool(self.addresses) and address_matches(addr, self.addresses))

    @property
    def needs_client_details(self) -> bool:
        """True when matching needs the client's address or display, which the seat ledger does not keep
        (so such a subject can restrict access, but not name a ``reserve`` or ``max`` rule)."""
        return self.kind in ("display", "internet") or bool(self.addresses)

    def __str__(self) -> str:
        return f"{self.kind} {self.name}" + (f", {self.origin}" if self.origin else "")


@dataclass(frozen=True, slots=True)
class Rule:
    seats: int
    subject: Subject


@dataclass(frozen=True, slots=True)
class ProductPolicy:
    product: str
    reserve: tuple[Rule, ...] = ()
    max: tuple[Rule, ...] = ()
    include: tuple[Subject, ...] = ()
    exclude: tuple[Subject, ...] = ()
    timeout: float | None = None

    @property
    def reserved_total(self) -> int:
        return sum(r.seats for r in self.reserve)

    @property
    def limits_seats(self) -> bool:
        """True when the ledger must enforce something (reserve or max) for this product."""
        return bool(self.reserve or self.max)

    def refusal(self, user: str, host: str, addr: str = "", display: str = "") -> str | None:
        """``None`` if ``user``@``host`` (at ``addr``, on ``display``) may use the product at all, else why
        not (for EXCLUDED)."""
        for s in self.exclude:
            if s.matches(user, host, addr, display):
                return f"{user}@{host} is excluded from {self.product} by the usage policy (exclude {s})"
        if self.include and not any(s.matches(user, host, addr, display) for s in self.include):
            allowed = ", ".join(str(s) for s in self.include)
            return (f"{user}@{host} is not in the include list of {self.product} in the usage policy "
                    f"(allowed: {allowed})")
        return None


@dataclass(frozen=True, slots=True)
class Policy:
    """The usage policy: rules per product, plus (from an options file) rules for every product.

    :meth:`get` is the one way to read a product's rules: it merges ``every_product`` in (its include and
    exclude lists after the product's own; the product's own ``timeout`` wins over ``TIMEOUTALL``).
    """

    products: Mapping[str, ProductPolicy] = field(default_factory=dict)
    #: INCLUDEALL / EXCLUDEALL / TIMEOUTALL (``product`` is "*"); None when there are none.
    every_product: ProductPolicy | None = None
    _merged: dict[str, ProductPolicy] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def active(self) -> bool:
        """True when there is any rule at all (the daemon skips policy work otherwise)."""
        return bool(self.products) or self.every_product is not None

    def get(self, product: str) -> ProductPolicy | None:
        every = self.every_product
        if every is None:
            return self.products.get(product)
        hit = self._merged.get(product)
        if hit is None:  # built once per product per (re)load: a Policy never changes after it is made
            own = self.products.get(product) or ProductPolicy(product)
            hit = ProductPolicy(product, own.reserve, own.max, own.include + every.include,
                                own.exclude + every.exclude, own.timeout if own.timeout is not None else every.timeout)
            if len(self._merged) < _MERGED_CACHE_LIMIT:  # callers pass licensed products; never unbounded
                self._merged[product] = hit
        return hit


def combine_policies(first: Policy, second: Policy) -> Policy:
    """One policy from two (the YAML ``policy:`` first, then the options file): per product, every list is
    ``first``'s rules then ``second``'s, so reservations fill the count in that order; a ``timeout`` in
    ``first`` wins (the caller reports the clash). ``every_product`` comes from ``second`` alone (the YAML
    has no rules for every product)."""
    products = dict(first.products)
    for name, b in second.products.items():
        a = products.get(name)
        products[name] = b if a is None else ProductPolicy(
            name, a.reserve + b.reserve, a.max + b.max, a.include + b.include, a.exclude + b.exclude,
            a.timeout if a.timeout is not None else b.timeout)
    return Policy(products, second.every_product if second.every_product is not None else first.every_product)


def _subject(raw: Any, where: str, groups: dict[str, frozenset[str]], host_groups: dict[str, frozenset[str]],
             problems: list[str], allow_seats: bool) -> tuple[Subject | None, Any]:
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping such as {{user: alice}}"
                        + (" with 'seats: N'" if allow_seats else "") + f", got {shown(raw)}")
        return None, None
    keys = [k for k in raw if k in SUBJECT_KINDS]
    unknown = [k for k in raw if k not in SUBJECT_KINDS and not (allow_seats and k == "seats")]
    if unknown:
        problems.append(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; expected one of "
                        f"{', '.join(SUBJECT_KINDS)}" + (" and seats" if allow_seats else ""))
        return None, None
    if len(keys) != 1:
        problems.append(f"{where}: name exactly one of {', '.join(SUBJECT_KINDS)}, got {shown(raw)}")
        return None, None
    kind = keys[0]
    name = raw[kind]
    if not isinstance(name, str) or not name:
        problems.append(f"{where}.{kind}: expected a name, got {shown(name)}")
        return None, None
    if kind == "user":
        members = frozenset({name.lower()})
    elif kind == "host":
        members = frozenset({_host(name)})
    else:
        table = groups if kind == "group" else host_groups
        if name not in table:
            section = "groups" if kind == "group" else "host_groups"
            problems.append(f"{where}.{kind}: no {kind} named {shown(name)} in '{section}' "
                            f"(defined: {', '.join(sorted(table)) or 'none'})")
            return None, None
        members = table[name]
    return Subject(kind, name, members), raw.get("seats")


def _groups(raw: Any, key: str, problems: list[str], host: bool) -> dict[str, frozenset[str]]:
    out: dict[str, frozenset[str]] = {}
    if raw is None:
        return out
    if not isinstance(raw, dict):
        problems.append(f"{key}: expected a mapping of group name to a list of names, got {shown(raw)}")
        return out
    for name, members in raw.items():
        if not isinstance(members, list) or not all(isinstance(m, str) and m for m in members):
            problems.append(f"{key}.{name}: expected a list of {'host' if host else 'user'} names, got "
                            f"{shown(members)}")
            continue
        out[str(name)] = frozenset(_host(m) if host else m.lower() for m in members)
    return out


def parse_policy(extra: Mapping[str, Any]) -> tuple[Policy, list[str]]:
    """Build the policy from the config's ``groups``, ``host_groups`` and ``policy`` sections.

    Returns the policy and every problem found, each naming its key path (an empty list means valid).
    """
    problems: list[str] = []
    groups = _groups(extra.get("groups"), "groups", problems, host=False)
    host_groups = _groups(extra.get("host_groups"), "host_groups", problems, host=True)
    raw = extra.get("policy")
    products: dict[str, ProductPolicy] = {}
    if raw is None:
        return Policy(products), problems
    if not isinstance(raw, dict):
        problems.append(f"policy: expected a mapping of product name to its rules, got {shown(raw)}")
        return Policy(products), problems
    for product, rules in raw.items():
        base = f"policy.{product}"
        if not isinstance(rules, dict):
            problems.append(f"{base}: expected a mapping with reserve, max, include, exclude or timeout, got "
                            f"{shown(rules)}")
            continue
        unknown = sorted(set(map(str, rules)) - {"reserve", "max", "include", "exclude", "timeout"})
        if unknown:
            problems.append(f"{base}: unknown key(s) {', '.join(unknown)}; expected reserve, max, include, "
                            "exclude, timeout")
        counted: dict[str, list[Rule]] = {"reserve": [], "max": []}
        for kind in ("reserve", "max"):
            items = rules.get(kind, [])
            if not isinstance(items, list):
                problems.append(f"{base}.{kind}: expected a list of rules such as [{{seats: 2, group: designers}}]")
                continue
            for i, item in enumerate(items):
                where = f"{base}.{kind}[{i}]"
                subj, seats = _subject(item, where, groups, host_groups, problems, allow_seats=True)
                if subj is None:
                    continue
                if isinstance(seats, bool) or not isinstance(seats, int) or seats < (1 if kind == "reserve" else 0):
                    low = 1 if kind == "reserve" else 0
                    problems.append(f"{where}.seats: expected an integer >= {low}, got {shown(seats)}")
                    continue
                counted[kind].append(Rule(seats, subj))
        lists: dict[str, list[Subject]] = {"include": [], "exclude": []}
        for kind in ("include", "exclude"):
            items = rules.get(kind, [])
            if not isinstance(items, list):
                problems.append(f"{base}.{kind}: expected a list such as [{{group: designers}}, {{host: ws1}}]")
                continue
            for i, item in enumerate(items):
                subj, _ = _subject(item, f"{base}.{kind}[{i}]", groups, host_groups, problems, allow_seats=False)
                if subj is not None:
                    lists[kind].append(subj)
        timeout = rules.get("timeout")
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < MIN_IDLE_TIMEOUT:
                problems.append(f"{base}.timeout: expected seconds >= {MIN_IDLE_TIMEOUT:g} (the minimum idle "
                                f"timeout), got {shown(timeout)}")
                timeout = None
            else:
                timeout = float(timeout)
        products[str(product)] = ProductPolicy(str(product), tuple(counted["reserve"]), tuple(counted["max"]),
                                               tuple(lists["include"]), tuple(lists["exclude"]), timeout)
    return Policy(products), problems
