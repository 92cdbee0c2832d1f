"""FlexNet 11's ``lmstat`` text, made from the daemon's ``lmstat`` admin reply: pure formatting, no I/O.

Sites run Prometheus exporters, Nagios checks, munin plugins and scheduler agents that read ``lmutil lmstat``
text line by line, so the default output is FlexNet's layout and nothing else (the reference output is in
``tests/e2e/golden/``; the genuine FlexNet files it is checked against are cited there). What lmgrd knows
beyond FlexNet (customer IDs, activation, the queue, heartbeats, leases) goes to ``--json`` and to the
``--extended`` section, never between FlexNet's lines, where a parser would trip on it.

How lmgrd's facts map onto FlexNet's:

* the vendor daemon is ``lmgrd`` itself (license manager and vendor daemon are one process), always UP and
  the MASTER of a one-server "triad";
* ``Users of P`` sums every license serving product ``P``; one feature line per license that has seats in
  use or reserved, as FlexNet prints one per FEATURE/INCREMENT line;
* one user line per *seat* (leases sharing a seat, FlexNet's duplicate grouping, are shown once: "licenses
  shared due to duplicate grouping are not returned by lmstat"), with the seat's decimal handle;
* free seats held by a ``reserve`` rule print as ``N RESERVATION(s) for KIND name`` and, as in FlexNet,
  count as in use: ``Total of M licenses in use`` is seats held plus reserved;
* ``, N licenses`` follows a user line only when the checkout holds more than one license (an lmgrd seat is
  one license, so lmgrd never prints it).

Imports only the standard library.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

__all__ = [
    "VENDOR",
    "connect_error",
    "expiry_text",
    "feature_info",
    "header",
    "render_extended",
    "render_lmstat",
    "status_time",
    "user_time",
    "version_text",
]

#: The vendor daemon's name in every FlexNet line that names one.
VENDOR = "lmgrd"
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_KINDS = {"user": "USER", "group": "GROUP", "host": "HOST", "host_group": "HOST_GROUP"}


def _plural(n: int) -> str:
    return f"{n} license" if n == 1 else f"{n} licenses"


def status_time(t: datetime) -> str:
    """``Tue 12/1/2026 18:27``: the header's date, the only place FlexNet prints the year."""
    return f"{t:%a} {t.month}/{t.day}/{t.year} {t.hour}:{t.minute:02d}"


def user_time(t: datetime) -> str:
    """``Tue 12/1 18:27``: a user line's checkout time."""
    return f"{t:%a} {t.month}/{t.day} {t.hour}:{t.minute:02d}"


def expiry_text(expires: str | None, *, permanent: str = "permanent(no expiration date)") -> str:
    """FlexNet's ``DD-mon-YYYY`` (``31-dec-2027``) from an ISO date, or ``permanent`` for none."""
    if not expires:
        return permanent
    d = date.fromisoformat(expires)
    return f"{d.day:02d}-{_MONTHS[d.month - 1]}-{d.year}"


def header(now: datetime) -> list[str]:
    """The two lines every lmstat output starts with, and the blank line after them."""
    return [f"lmutil - Copyright (c) 2024-{now.year} lmgrd authors. All Rights Reserved.",
            f"Flexible License Manager status on {status_time(now)}", ""]


def connect_error(errno: int, strerror: str) -> str:
    """FlexNet's line for a server that cannot be reached (``-15,570:111 "Connection refused"``)."""
    return f'Error getting status: Cannot connect to license server system. (-15,570:{errno} "{strerror}")'


def version_text(version: str) -> str:
    """``lmstat -v``: FlexNet's ``lmstat vX.Y build N ARCH`` line (exporters read the version from it)."""
    machine = platform.machine().lower()
    system = platform.system().lower()
    arch = {("x86_64", "linux"): "x64_lsb", ("amd64", "windows"): "x64_n6", ("aarch64", "linux"): "a64_lsb"}.get(
        (machine, system), "".join(c if c.isalnum() else "_" for c in f"{machine}_{system}"))
    return f"lmstat v{version} build 0 {arch}"


@dataclass(frozen=True, slots=True)
class _Seat:
    user: str
    host: str
    display: str
    version: str
    handle: int
    start: float
    licenses: int = 1
    node: str = ""  # HA: the node holding the client (shown where FlexNet shows the server)


def _seats(leases: Iterable[dict[str, Any]]) -> list[_Seat]:
    """One entry per seat, from the first (oldest) of the leases holding it, in grant order."""
    out: dict[object, _Seat] = {}
    for x in leases:
        key = (x.get("node", ""), x.get("handle", x["token"]))
        if key not in out:
            out[key] = _Seat(x["user"], x["host"], x.get("display") or x["host"], x["version"],
                             int(x.get("handle", 0)), float(x["checkout_at"]), node=x.get("node", ""))
    return list(out.values())


def render_lmstat(data: dict[str, Any], *, port: int, now: datetime, features: bool, users: bool,
                  product: str | None = None, server_block: bool = True) -> str:
    """The whole ``lmstat`` text.

    Args:
        data: the ``lmstat`` admin reply (``pools``, ``hostname``, ``license_files``, ``leases`` with
            ``handle`` when users are wanted, ``server_version``).
        port: the server's port, as in ``PORT@HOST``.
        now: the local time to print in the header.
        features: print ``Feature usage info`` (``-a``, ``-f``, ``-S``); without it only the server and
            vendor daemon status, as plain ``lmstat`` does.
        users: print feature, reservation and user lines under each ``Users of`` line.
        product: only this product (``-f FEATURE``).
        server_block: print the server and vendor daemon status (``-f FEATURE`` does not).
    """
    host = data.get("hostname") or "localhost"
    version = f"v{data.get('server_version', '0')}"
    lines = header(now)
    if server_block:
        files = "".join(f"{p}:" for p in data.get("license_files", [])) or ":"
        # A single server as FlexNet 11.19 prints it: the server line indented by two, the vendor daemon's
        # name right-aligned in ten columns (``       MLM: UP``, ``    armlmd: UP``).
        nodes = (data.get("cluster") or {}).get("nodes") or []
        if nodes:
            # HA: every node, as FlexNet shows a triad: this one the MASTER, the others UP or DOWN.
            lines += ["[Detecting lmgrd processes...]",
                      "License server status: " + ",".join(f"{n.get('port') or port}@{n['node']}" for n in nodes),
                      f"    License file(s) on {host}: {files}", ""]
            for n in nodes:
                state = "UP (MASTER)" if n.get("this") else "UP" if n.get("up") else "DOWN"
                lines.append(f"  {n['node']}: license server {state}" + (f" {version}" if n.get("up") else ""))
            lines += ["", f"Vendor daemon status (on {host}):", "", f"{VENDOR:>10}: UP {version}", ""]
        else:
            lines += ["[Detecting lmgrd processes...]", f"License server status: {port}@{host}",
                      f"    License file(s) on {host}: {files}", "",
                      f"  {host}: license server UP (MASTER) {version}", "",
                      f"Vendor daemon status (on {host}):", "", f"{VENDOR:>10}: UP {version}", ""]
        if features:
            lines += ["Feature usage info:", ""]
    if not features:
        return "\n".join(lines) + "\n"
    by_product: dict[str, list[dict[str, Any]]] = {}
    for pool in sorted(data.get("pools", []), key=lambda p: tuple(p.get("license_order", ()))):
        if product is None or pool["product"] == product:
            by_product.setdefault(pool["product"], []).append(pool)
    leases = data.get("leases", [])
    for name, pools in by_product.items():
        issued = sum(int(p["count"]) for p in pools)
        reserved = [sum(int(r["seats"]) for r in p.get("reservations", [])) for p in pools]
        in_use = sum(int(p["in_use"]) for p in pools) + sum(reserved)
        lines += [f"Users of {name}:  (Total of {_plural(issued)} issued;  Total of {_plural(in_use)} in use)", ""]
        if not users:
            continue
        for pool, held_back in zip(pools, reserved, strict=True):
            if not pool["in_use"] and not held_back:
                continue
            kind = "nodelocked" if pool.get("license_type") == "single" else "floating"
            lines += [f'  "{name}" v{pool["version"]}, vendor: {VENDOR}, expiry: {expiry_text(pool.get("expires"))}',
                      f"  {kind} license", ""]
            mine = [x for x in leases if x["product"] == name and x["customer_id"] == pool["customer_id"]]
            for s in _seats(mine):
                more = f", {s.licenses} licenses" if s.licenses > 1 else ""
                lines.append(f"    {s.user} {s.host} {s.display} (v{s.version}) ({s.node or host}/{port} {s.handle}), "
                             f"start {user_time(datetime.fromtimestamp(s.start))}{more}")
            for r in pool.get("reservations", []):
                n = int(r["seats"])
                lines.append(f"        {n} RESERVATION{'s' if n > 1 else ''} for {_KINDS.get(r['kind'], r['kind'])} "
                             f"{r['name']} ({host}/{port})")
            lines.append("")
    return "\n".join(lines) + "\n"


def feature_info(data: dict[str, Any], now: datetime, product: str | None = None) -> str:
    """``lmstat -i [FEATURE]``: one row per license line, FlexNet 11's columns (Expires before Vendor)."""
    lines = header(now)
    lines += ["Feature                         Version     #licenses    Expires      Vendor",
              "_______                         _________   _________    __________   ______"]
    for pool in sorted(data.get("pools", []), key=lambda p: tuple(p.get("license_order", ()))):
        if product is None or pool["product"] == product:
            lines.append(f"{pool['product']:<32}{pool['version']:<13}{pool['count']!s:<12}"
                         f"{expiry_text(pool.get('expires'), permanent='1-jan-0'):<13}{VENDOR}")
    return "\n".join(lines) + "\n"


def render_extended(data: dict[str, Any], now_wall: float) -> str:
    """What lmgrd knows beyond FlexNet's layout (``--extended``): printed after it, under its own title."""
    del now_wall  # the reply carries its own relative times
    lines = ["lmgrd details (not part of FlexNet's layout):",
             f"  uptime {int(data.get('uptime_seconds', 0))} s, {data.get('connections', 0)} client connection(s), "
             f"heartbeat every {data.get('heartbeat_interval', 0):g} s, lease timeout "
             f"{data.get('lease_timeout', 0):g} s"]
    for pool in data.get("pools", []):
        lines.append(f"  {pool['product']}: customer {pool['customer_id']}, version {pool['version']}, "
                     f"{pool['count']} seats, {pool['in_use']} held, reserved {pool.get('reserved', 0)}, "
                     f"queued {pool['queued']}, expires {pool.get('expires') or 'never'}, "
                     f"state {pool.get('activation', 'active')}, share {pool.get('share', '')}")
        for x in data.get("leases", []):
            if x["product"] == pool["product"] and x["customer_id"] == pool["customer_id"]:
                beat = user_time(datetime.fromtimestamp(x["last_heartbeat_at"]))
                link = "connected" if x["connected"] else "disconnected"
                lines.append(f"    lease {x['token'][:8]} handle {x.get('handle', '?')}: {x['user']}@{x['host']} "
                             f"pid {x['pid']}, last heartbeat {beat}, {link}, lease expires in {x['expires_in']:.0f} s")
        for w in data.get("queue", []):
            if w["product"] == pool["product"] and w["customer_id"] == pool["customer_id"]:
                lines.append(f"    queued #{w['position']}: {w['user']}@{w['host']} pid {w['pid']} (v{w['version']}), "
                             f"waiting {w['waiting_s']:.0f} s")
    for ref in data.get("refused_licenses", []):
        lines.append(f"  refused license: {ref}")
    for c in data.get("cloud", []):
        cert = (f"certificate ({c['how']}) valid until {c.get('valid_until') or 'the license expires'}"
                if c.get("how") else "no certificate")
        lines.append(f"  activation service {c['url']}: license {c['customer_id']} {c['state']}, {cert}, last "
                     f"reached {c.get('last_reached_at') or 'never'}"
                     + (f", last error: {c['last_error']}" if c.get("last_error") else ""))
        if c.get("warning"):
            lines.append(f"  WARNING: {c['warning']}")
    return "\n".join(lines) + "\n"
