"""FlexNet options files (``VENDOR.opt``), read into the daemon's usage policy.

Pure: text in, a :class:`~lmgrd.core.policy.Policy` and the list of what could not be applied out. The file is
read by :mod:`lmgrd.config` (config key ``options:``), which combines this policy with the YAML ``policy:``
(:func:`lmgrd.core.policy.combine_policies`). Imports only ``lmgrd.core.policy`` and ``protocol.validation``.

What is read (FlexNet's syntax, as in Revenera's *FlexNet Publisher License Administration Guide*)::

    # comment lines start with '#'; a line ending in '\\' continues on the next
    GROUP      designers alice bob          # several GROUP lines of one name add up; USER_GROUP = GROUP
    HOST_GROUP lab lab-pc1 lab-pc2 192.0.2.7
    RESERVE 2 CADPRO GROUP designers        # RESERVE num_lic feature type name
    MAX     3 CADPRO HOST_GROUP lab         # MAX num_lic feature type name
    INCLUDE VIEWER USER erin                # INCLUDE / EXCLUDE feature type name
    EXCLUDE VIEWER INTERNET 192.0.2.*
    INCLUDEALL USER jane                    # INCLUDEALL / EXCLUDEALL type name: every product
    TIMEOUT VIEWER 3600                     # TIMEOUT feature seconds
    TIMEOUTALL 7200                         # every product without its own TIMEOUT

Types: ``USER``, ``HOST`` (a host name, or an IP address with ``*`` parts), ``DISPLAY``, ``INTERNET`` (an IP
address with ``*`` parts), ``GROUP``, ``HOST_GROUP``. For a product, the allowed set is its INCLUDE lines plus
every INCLUDEALL line (either one existing excludes everyone else, as in FlexNet); EXCLUDE and EXCLUDEALL win
over both; a product's own TIMEOUT wins over TIMEOUTALL. Names compare case-insensitively (as FlexNet does with
``GROUPCASEINSENSITIVE ON``); group names exactly. Groups may be used before the line that defines them.

Three outcomes per line: applied; *unsupported* (a FlexNet keyword or form lmgrd does not implement, such as
``NOLOG``, ``LINGER``, ``feature:VERSION=...``, type ``PROJECT``, or ``RESERVE`` by display or address: the
line is ignored and ``lmgrd --check`` lists it); or a *problem* (the line is malformed or names an undefined
group: it is ignored too, and reported as an error). Each message names the file and the line.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from lmgrd.core.policy import MIN_IDLE_TIMEOUT, Policy, ProductPolicy, Rule, Subject
from protocol.validation import product_problem, shown

__all__ = ["OptionsFile", "parse_options"]

#: option type keyword -> the policy's subject kind
TYPES = {"USER": "user", "HOST": "host", "DISPLAY": "display", "INTERNET": "internet", "GROUP": "group",
         "HOST_GROUP": "host_group"}
SUPPORTED = ("EXCLUDE", "EXCLUDEALL", "GROUP", "GROUPCASEINSENSITIVE", "HOST_GROUP", "INCLUDE", "INCLUDEALL", "MAX",
             "RESERVE", "TIMEOUT", "TIMEOUTALL", "USER_GROUP")
#: FlexNet keywords lmgrd reads but does not apply, and why (``lmgrd --check`` lists every such line).
UNSUPPORTED = {
    "ACTIVATION_EXPIRY_DAYS": "lmgrd has no trusted-storage activation",
    "ACTIVATION_LOWWATER": "lmgrd has no trusted-storage activation",
    "AUTOMATIC_REREAD": "lmgrd rereads only on lmutil lmreread or SIGHUP",
    "AUTO_ROLLOVER": "lmgrd has no license rollover",
    "BORROW_LOWWATER": "lmgrd has no license borrowing",
    "DAEMON_SELECT_TIMEOUT": "not applicable to lmgrd",
    "DEBUGLOG": "lmgrd logs to stderr and writes its usage log (usage_log:)",
    "EXCLUDEALL_ENTITLEMENT": "lmgrd has no trusted-storage activation",
    "EXCLUDE_BORROW": "lmgrd has no license borrowing",
    "EXCLUDE_ENTITLEMENT": "lmgrd has no trusted-storage activation",
    "FQDN_MATCHING": "lmgrd compares short host names",
    "INCLUDEALL_ENTITLEMENT": "lmgrd has no trusted-storage activation",
    "INCLUDE_BORROW": "lmgrd has no license borrowing",
    "INCLUDE_ENTITLEMENT": "lmgrd has no trusted-storage activation",
    "LINGER": "lmgrd frees a seat at checkin",
    "MAX_BORROW_HOURS": "lmgrd has no license borrowing",
    "MAX_CONNECTIONS": "use max_connections_per_address in the lmgrd config",
    "MAX_OVERDRAFT": "lmgrd licenses have no overdraft",
    "NOLOG": "lmgrd logs every checkout and denial",
    "REPORTLOG": "use usage_log: in the lmgrd config and lmutil report",
    "TIMEZONE": "not applicable to lmgrd",
}
_IPV4_PATTERN = re.compile(r"(?:[0-9]{1,3}|\*)(?:\.(?:[0-9]{1,3}|\*)){3}")
_SEATS = re.compile(r"[0-9]{1,9}")


@dataclass(frozen=True, slots=True)
class OptionsFile:
    """One options file, read: its policy and what was not applied (each entry names the file and line)."""

    policy: Policy
    #: Malformed lines, unknown keywords, undefined groups: each ignored and reported as an error.
    problems: tuple[str, ...] = ()
    #: Lines lmgrd does not apply as written (FlexNet keywords or forms it does not implement).
    unsupported: tuple[str, ...] = ()
    #: product -> the line of its TIMEOUT (to name it when the YAML policy times the product too).
    timeout_lines: Mapping[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Rules:
    """One product's rules while the file is read."""

    reserve: list[Rule] = field(default_factory=list)
    max: list[Rule] = field(default_factory=list)
    include: list[Subject] = field(default_factory=list)
    exclude: list[Subject] = field(default_factory=list)


@dataclass(slots=True)
class _Line:
    first: int
    last: int
    words: list[str]

    @property
    def where(self) -> str:
        return f"line {self.first}" if self.first == self.last else f"lines {self.first}-{self.last}"


def _logical_lines(text: str) -> list[_Line]:
    """Physical lines joined at a trailing ``\\``; comment and blank lines dropped."""
    out: list[_Line] = []
    pending: _Line | None = None
    for n, raw in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):
        line = raw.strip()
        if pending is None and (not line or line.startswith("#")):
            continue
        cont = line.endswith("\\")
        words = line[:-1].split() if cont else line.split()
        if pending is None:
            pending = _Line(n, n, words)
        else:
            pending.last = n
            pending.words += words
        if not cont:
            if pending.words:
                out.append(pending)
            pending = None
    if pending is not None and pending.words:
        out.append(pending)  # a continuation on the last line: take what is there
    return out


def _address_pattern(value: str) -> str | None:
    """The normalised pattern if ``value`` is an IP address (IPv4 parts may be ``*``), else None."""
    if _IPV4_PATTERN.fullmatch(value):
        return value if all(p == "*" or int(p) <= 255 for p in value.split(".")) else None
    if ":" in value:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            return None
    return None


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[tuple[int, str]] = []  # (line, message): reported in line order
        self.unsupported: list[tuple[int, str]] = []
        self.groups: dict[str, set[str]] = {}
        self.host_groups: dict[str, list[str]] = {}

    def bad(self, line: _Line, what: str) -> None:
        self.problems.append((line.first, f"{self.source} {line.where}: {what}; the line is ignored"))

    def skip(self, line: _Line, what: str, ignored: bool = True) -> None:
        self.unsupported.append((line.first, f"{self.source} {line.where}: {what}"
                                 + ("; the line is ignored" if ignored else "")))

    def product(self, line: _Line, keyword: str, feature: str) -> str | None:
        if ":" in feature:
            self.skip(line, f"{keyword} {feature}: feature modifiers (FEATURE:keyword=value) are not supported; "
                      "lmgrd rules apply to the whole product")
            return None
        problem = product_problem(feature)
        if problem:
            self.bad(line, f"{keyword}: {problem}")
            return None
        return feature

    def subject(self, line: _Line, keyword: str, type_word: str, name: str, seats: bool) -> Subject | None:
        """The subject of a rule line, or None (the reason already reported)."""
        kind = TYPES.get(type_word.upper())
        origin = f"{self.source.rsplit('/', 1)[-1]} {line.where}"
        if kind is None:
            if type_word.upper() == "PROJECT":
                self.skip(line, f"{keyword} by PROJECT is not supported (lmgrd clients do not send LM_PROJECT)")
            else:
                near = difflib.get_close_matches(type_word.upper(), TYPES, n=1)
                self.bad(line, f"{keyword}: unknown type {shown(type_word)}" + (f" (did you mean {near[0]}?)" if near
                         else "") + f"; expected one of {', '.join(TYPES)}")
            return None
        if name in ("ALL_USERS", "ALL_GROUPS"):
            self.skip(line, f"{keyword} ... {type_word} {name} (a limit for each user or group separately) is not "
                      "supported; write one line per user or group")
            return None
        if kind in ("user", "display"):
            subj = Subject(kind, name, frozenset({name.lower()}), origin=origin)
        elif kind in ("host", "internet"):
            pattern = _address_pattern(name)
            if kind == "internet" and pattern is None:
                self.bad(line, f"{keyword}: INTERNET {shown(name)} is not an IP address such as 192.0.2.10 or "
                         "192.0.2.*")
                return None
            if pattern is not None:
                subj = Subject(kind, name, frozenset(), (pattern,), origin=origin)
            else:
                subj = Subject(kind, name, frozenset({name.split(".", 1)[0].lower()}), origin=origin)
        else:
            table: Mapping[str, object] = self.groups if kind == "group" else self.host_groups
            if name not in table:
                defining = "GROUP" if kind == "group" else "HOST_GROUP"
                near = difflib.get_close_matches(name, list(table), n=1)
                self.bad(line, f"{keyword}: no {defining} named {shown(name)} in this file"
                         + (f" (did you mean {shown(near[0])}?)" if near else "")
                         + f"; define it with a '{defining} {name} ...' line")
                return None
            if kind == "group":
                subj = Subject(kind, name, frozenset(self.groups[name]), origin=origin)
            else:
                hosts = self.host_groups[name]
                addrs = tuple(p for p in (_address_pattern(h) for h in hosts) if p is not None)
                names = frozenset(h.split(".", 1)[0].lower() for h in hosts if _address_pattern(h) is None)
                subj = Subject(kind, name, names, addrs, origin=origin)
        if seats and subj.needs_client_details:
            why = (f"HOST_GROUP {name} has members written as IP addresses ({', '.join(subj.addresses)})"
                   if kind == "host_group" else f"{keyword} by {type_word.upper()} {name} is not supported")
            self.skip(line, f"{why}: lmgrd counts reserved and limited seats by user and host name only (use "
                      "USER, HOST, GROUP or a HOST_GROUP of host names)")
            return None
        return subj


def _seconds(reader: _Reader, line: _Line, keyword: str, value: str) -> float | None:
    if not _SEATS.fullmatch(value):
        reader.bad(line, f"{keyword}: {shown(value)} is not a whole number of seconds")
        return None
    seconds = float(int(value))
    if seconds < MIN_IDLE_TIMEOUT:
        reader.skip(line, f"{keyword} {value} s is below lmgrd's minimum idle timeout: {MIN_IDLE_TIMEOUT:g} s is "
                    "used instead (FlexNet also raises a timeout to the vendor's minimum)", ignored=False)
        return MIN_IDLE_TIMEOUT
    return seconds


def parse_options(text: str, source: str) -> OptionsFile:
    """Read a FlexNet options file into a usage policy.

    Args:
        text: the file's text.
        source: the file's path, named in every message.

    Returns:
        The policy of the lines that apply, and one message per line that does not (see :class:`OptionsFile`).
    """
    r = _Reader(source)
    lines = _logical_lines(text)
    rules: list[_Line] = []
    for line in lines:  # pass 1: the groups (FlexNet lets a rule use a group defined further down)
        keyword = line.words[0].upper()
        if keyword in ("GROUP", "USER_GROUP", "HOST_GROUP"):
            if len(line.words) < 3:
                r.bad(line, f"{keyword} needs a name and at least one member ('{keyword} name member ...')")
                continue
            name, members = line.words[1], line.words[2:]
            if keyword == "HOST_GROUP":
                r.host_groups.setdefault(name, []).extend(members)
            else:
                r.groups.setdefault(name, set()).update(m.lower() for m in members)
        elif keyword == "GROUPCASEINSENSITIVE":
            value = line.words[1].upper() if len(line.words) == 2 else ""
            if value == "OFF":
                r.skip(line, "GROUPCASEINSENSITIVE OFF is not supported: lmgrd always compares user and host names "
                       "case-insensitively")
            elif value != "ON":
                r.bad(line, "GROUPCASEINSENSITIVE takes ON or OFF")
        else:
            rules.append(line)
    products: dict[str, _Rules] = {}
    timeouts: dict[str, float] = {}
    timeout_lines: dict[str, int] = {}
    every = _Rules()
    every_timeout: tuple[float, _Line] | None = None

    def rules_of(product: str) -> _Rules:
        return products.setdefault(product, _Rules())

    for line in rules:  # pass 2: the rules, in file order
        w = line.words
        keyword = w[0].upper()
        if keyword in ("RESERVE", "MAX"):
            if len(w) != 5:
                r.bad(line, f"{keyword} takes 4 fields ('{keyword} num_lic feature type name'), got {len(w) - 1}")
                continue
            if not _SEATS.fullmatch(w[1]) or (keyword == "RESERVE" and int(w[1]) < 1):
                low = 1 if keyword == "RESERVE" else 0
                r.bad(line, f"{keyword}: the number of licenses {shown(w[1])} is not a whole number >= {low}")
                continue
            product = r.product(line, keyword, w[2])
            subj = r.subject(line, keyword, w[3], w[4], seats=True) if product else None
            if product and subj:
                acc = rules_of(product)
                (acc.reserve if keyword == "RESERVE" else acc.max).append(Rule(int(w[1]), subj))
        elif keyword in ("INCLUDE", "EXCLUDE"):
            if len(w) != 4:
                r.bad(line, f"{keyword} takes 3 fields ('{keyword} feature type name'), got {len(w) - 1}")
                continue
            product = r.product(line, keyword, w[1])
            subj = r.subject(line, keyword, w[2], w[3], seats=False) if product else None
            if product and subj:
                acc = rules_of(product)
                (acc.include if keyword == "INCLUDE" else acc.exclude).append(subj)
        elif keyword in ("INCLUDEALL", "EXCLUDEALL"):
            if len(w) != 3:
                r.bad(line, f"{keyword} takes 2 fields ('{keyword} type name'), got {len(w) - 1}")
                continue
            subj = r.subject(line, keyword, w[1], w[2], seats=False)
            if subj:
                (every.include if keyword == "INCLUDEALL" else every.exclude).append(subj)
        elif keyword == "TIMEOUT":
            if len(w) != 3:
                r.bad(line, f"TIMEOUT takes 2 fields ('TIMEOUT feature seconds'), got {len(w) - 1}")
                continue
            product = r.product(line, keyword, w[1])
            if product is None:
                continue
            if product in timeout_lines:
                r.bad(line, f"TIMEOUT for {product} is already set on line {timeout_lines[product]}")
                continue
            seconds = _seconds(r, line, keyword, w[2])
            if seconds is not None:
                timeouts[product] = seconds
                timeout_lines[product] = line.first
                rules_of(product)
        elif keyword == "TIMEOUTALL":
            if len(w) != 2:
                r.bad(line, f"TIMEOUTALL takes 1 field ('TIMEOUTALL seconds'), got {len(w) - 1}")
                continue
            if every_timeout is not None:
                r.bad(line, f"TIMEOUTALL is already set on {every_timeout[1].where}")
                continue
            seconds = _seconds(r, line, keyword, w[1])
            if seconds is not None:
                every_timeout = (seconds, line)
        elif keyword in UNSUPPORTED:
            r.skip(line, f"{keyword} is not supported by lmgrd ({UNSUPPORTED[keyword]})")
        else:
            near = difflib.get_close_matches(keyword, [*SUPPORTED, *UNSUPPORTED], n=1)
            r.bad(line, f"unknown keyword {shown(w[0])}" + (f" (did you mean {near[0]}?)" if near else "")
                  + "; expected RESERVE, MAX, INCLUDE, EXCLUDE, INCLUDEALL, EXCLUDEALL, GROUP, HOST_GROUP, TIMEOUT "
                  "or TIMEOUTALL")
    policy = Policy(
        {name: ProductPolicy(name, tuple(x.reserve), tuple(x.max), tuple(x.include), tuple(x.exclude),
                             timeouts.get(name)) for name, x in products.items()},
        ProductPolicy("*", (), (), tuple(every.include), tuple(every.exclude),
                      every_timeout[0] if every_timeout else None)
        if every.include or every.exclude or every_timeout else None)
    return OptionsFile(policy, tuple(m for _, m in sorted(r.problems, key=lambda x: x[0])),
                       tuple(m for _, m in sorted(r.unsupported, key=lambda x: x[0])), timeout_lines)
