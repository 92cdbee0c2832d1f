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

Each rule names exactly one subject: ``user``, ``group``, ``host`` or ``host_group``. Refusals name the
rule: ``EXCLUDED`` (exclude, or not in include), ``MAX_REACHED`` (a max rule is full), ``RESERVED`` (seats
are free but reserved for others). Reserved seats count towards the product's ``count``: with 10 seats
and ``reserve 2 for designers`` the other users share 8.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MIN_IDLE_TIMEOUT", "Policy", "ProductPolicy", "Rule", "Subject", "parse_policy"]

#: The shortest idle timeout accepted (FlexLM's TIMEOUT minimum is 900 s too): shorter ones would reclaim
#: seats from people reading a drawing.
MIN_IDLE_TIMEOUT = 900.0
SUBJECT_KINDS = ("user", "group", "host", "host_group")


def _host(name: str) -> str:
    return name.split(".", 1)[0].lower()


@dataclass(frozen=True, slots=True)
class Subject:
    """Who a rule is about: one user, a user group, one host or a host group (members resolved)."""

    kind: str
    name: str
    members: frozenset[str]  # lower-case user names or short host names

    def matches(self, user: str, host: str) -> bool:
        if self.kind in ("user", "group"):
            return user.lower() in self.members
        return _host(host) in self.members

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


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

    def refusal(self, user: str, host: str) -> str | None:
        """``None`` if ``user``@``host`` may use the product at all, else why not (for EXCLUDED)."""
        for s in self.exclude:
            if s.matches(user, host):
                return f"{user}@{host} is excluded from {self.product} by the usage policy (exclude {s})"
        if self.include and not any(s.matches(user, host) for s in self.include):
            allowed = ", ".join(str(s) for s in self.include)
            return (f"{user}@{host} is not in the include list of {self.product} in the usage policy "
                    f"(allowed: {allowed})")
        return None


@dataclass(frozen=True, slots=True)
class Policy:
    products: Mapping[str, ProductPolicy] = field(default_factory=dict)

    def get(self, product: str) -> ProductPolicy | None:
        return self.products.get(product)


def _subject(raw: Any, where: str, groups: dict[str, frozenset[str]], host_groups: dict[str, frozenset[str]],
             problems: list[str], allow_seats: bool) -> tuple[Subject | None, Any]:
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping such as {{user: alice}}"
                        + (" with 'seats: N'" if allow_seats else "") + f", got {raw!r}")
        return None, None
    keys = [k for k in raw if k in SUBJECT_KINDS]
    unknown = [k for k in raw if k not in SUBJECT_KINDS and not (allow_seats and k == "seats")]
    if unknown:
        problems.append(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; expected one of "
                        f"{', '.join(SUBJECT_KINDS)}" + (" and seats" if allow_seats else ""))
        return None, None
    if len(keys) != 1:
        problems.append(f"{where}: name exactly one of {', '.join(SUBJECT_KINDS)}, got {raw!r}")
        return None, None
    kind = keys[0]
    name = raw[kind]
    if not isinstance(name, str) or not name:
        problems.append(f"{where}.{kind}: expected a name, got {name!r}")
        return None, None
    if kind == "user":
        members = frozenset({name.lower()})
    elif kind == "host":
        members = frozenset({_host(name)})
    else:
        table = groups if kind == "group" else host_groups
        if name not in table:
            section = "groups" if kind == "group" else "host_groups"
            problems.append(f"{where}.{kind}: no {kind} named {name!r} in '{section}' "
                            f"(defined: {', '.join(sorted(table)) or 'none'})")
            return None, None
        members = table[name]
    return Subject(kind, name, members), raw.get("seats")


def _groups(raw: Any, key: str, problems: list[str], host: bool) -> dict[str, frozenset[str]]:
    out: dict[str, frozenset[str]] = {}
    if raw is None:
        return out
    if not isinstance(raw, dict):
        problems.append(f"{key}: expected a mapping of group name to a list of names, got {raw!r}")
        return out
    for name, members in raw.items():
        if not isinstance(members, list) or not all(isinstance(m, str) and m for m in members):
            problems.append(f"{key}.{name}: expected a list of {'host' if host else 'user'} names, got {members!r}")
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
        problems.append(f"policy: expected a mapping of product name to its rules, got {raw!r}")
        return Policy(products), problems
    for product, rules in raw.items():
        base = f"policy.{product}"
        if not isinstance(rules, dict):
            problems.append(f"{base}: expected a mapping with reserve, max, include, exclude or timeout, got {rules!r}")
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
                    problems.append(f"{where}.seats: expected an integer >= {low}, got {seats!r}")
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
                                f"timeout), got {timeout!r}")
                timeout = None
            else:
                timeout = float(timeout)
        products[str(product)] = ProductPolicy(str(product), tuple(counted["reserve"]), tuple(counted["max"]),
                                               tuple(lists["include"]), tuple(lists["exclude"]), timeout)
    return Policy(products), problems
