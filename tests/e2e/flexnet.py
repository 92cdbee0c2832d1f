"""Helpers for the FlexNet ``lmstat`` tests: FlexNet's line kinds, a structural comparison, and a rig that builds
a situation (licenses, policy, seat holders with their user, host, display and version) on the real daemon.

The line kinds are written from the genuine FlexNet outputs in ``golden/`` (see ``golden/README.md``); the tests
check first that every line of those files is one of these kinds, so the patterns are FlexNet's, not ours.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from harness import Daemon, RawClient, write_keys, write_license

from protocol import Checkout, Granted, Hello, Welcome

GOLDEN = Path(__file__).resolve().parent / "golden"

#: Every line FlexNet's ``lmstat -a`` prints for a served, counted license, by kind. Field names ending in
#: ``_any`` are values that must differ between two servers (names of the server, times, handles, versions
#: of the license manager software); every other field is a fact of the situation and must be equal.
KINDS: list[tuple[str, re.Pattern[str]]] = [(k, re.compile(p)) for k, p in [
    ("copyright", r"lmutil - Copyright \(c\) (?P<text_any>.+)"),
    ("status_on", r"Flexible License Manager status on (?P<date_any>\w{3} \d{1,2}/\d{1,2}/\d{4} \d{1,2}:\d\d)"),
    ("detecting", r"\[Detecting lmgrd processes\.\.\.\]"),
    ("server_status", r"License server status: (?P<servers_any>\S+)"),
    # (the ARM transcription of FLEXlm 10.8 lost the colon after the host and the backslashes of the path)
    ("license_files", r"    License file\(s\) on (?P<host_any>[^\s:]+):? (?P<path_any>.+):"),
    ("server_up", r"(?P<indent> *)(?P<host_any>[^\s:]+): license server UP(?P<master> \(MASTER\))? "
                  r"v(?P<version_any>[\d.]+)"),
    ("vendor_status_on", r"Vendor daemon status \(on (?P<host_any>\S+)\):"),
    ("vendor_up", r"(?P<indent_any> +)(?P<vendor_any>\S+): UP v(?P<version_any>[\d.]+)"),
    ("feature_usage", r"Feature usage info:"),
    ("users_of", r"Users of (?P<feature>[^:]+):  \(Total of (?P<issued>\d+) license(?P<s1>s?) issued;  "
                 r"Total of (?P<used>\d+) license(?P<s2>s?) in use\)"),
    ("feature_line", r'  "(?P<feature>[^"]+)" v(?P<version>\S+), vendor: (?P<vendor_any>\S+)'
                     r"(?:, expiry: (?P<expiry>\S+(?: ?\(no expiration date\))?))?"),
    ("license_type", r"  (?P<type>floating|nodelocked) license(?P<lock_any>, locked to .*)?"),
    ("reservation", r"        (?P<n>\d+) RESERVATION(?P<s>s?) for (?P<kind>USER|HOST|GROUP|HOST_GROUP) "
                    r"(?P<name>\S+) \((?P<server_any>[^/\s]+)/(?P<port_any>\d+)\)"),
    ("user", r"    (?P<user>\S+) (?P<host>\S+) (?P<display>\S+) \(v(?P<version>[^)\s]+)\) "
             r"\((?P<server_any>[^/\s]+)/(?P<port_any>\d+) (?P<handle_any>\d+)\), "
             r"start (?P<start_any>\w{3} \d{1,2}/\d{1,2} \d{1,2}:\d\d)(?:, (?P<licenses>\d+) licenses)?"),
    ("blank", r""),
]]


@dataclass
class Line:
    kind: str
    fields: dict[str, str | None]
    text: str

    def facts(self) -> dict[str, str | None]:
        """The fields that must be equal for the same situation (hosts compare case-insensitively)."""
        out = {k: v for k, v in self.fields.items() if not k.endswith("_any")}
        if self.kind == "user" and out.get("host"):
            out["host"] = (out["host"] or "").lower()
        return out


def classify(text: str, extra: dict[str, str] | None = None) -> list[Line]:
    """Each line of an lmstat output as a :class:`Line`; a line of no known kind fails the test, unless it
    matches one of ``extra`` (kind -> regex: lines a genuine file has that lmgrd never prints, said why)."""
    extra_rx = {k: re.compile(v) for k, v in (extra or {}).items()}
    out = []
    for n, raw in enumerate(text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"), 1):
        for kind, rx in KINDS:
            m = rx.fullmatch(raw)
            if m:
                out.append(Line(kind, m.groupdict(), raw))
                break
        else:
            for kind, rx in extra_rx.items():
                if rx.fullmatch(raw):
                    out.append(Line(kind, {}, raw))
                    break
            else:
                raise AssertionError(f"line {n} is no line FlexNet prints: {raw!r}")
    return out


def check_grammar(lines: list[Line], vendor_columns: bool = True) -> None:
    """FlexNet's number agreement and column rules, on any output (``vendor_columns``: not for a file whose
    vendor name was anonymised with one of another length)."""
    for ln in lines:
        f = ln.fields
        if ln.kind == "users_of":
            assert (f["s1"] == "") == (f["issued"] == "1"), ln.text
            assert (f["s2"] == "") == (f["used"] == "1"), ln.text
        if ln.kind == "reservation":
            assert (f["s"] == "") == (f["n"] == "1"), ln.text
        if ln.kind == "user" and f["licenses"] is not None:
            assert int(f["licenses"]) > 1, f"', N licenses' only when N > 1: {ln.text}"
        if vendor_columns and ln.kind == "vendor_up" and len(f["vendor_any"] or "") < 10:
            # the vendor daemon's name is right-aligned in ten columns
            assert len(f["indent_any"] or "") + len(f["vendor_any"] or "") == 10, ln.text


def compare(ours: list[Line], genuine: list[Line], allowed: dict[tuple[int, str], str] | None = None) -> None:
    """Line for line: the same kinds in the same order with the same facts. ``allowed`` maps (index in the
    genuine list, field) to the reason a fact may differ there (a FlexNet version difference, say)."""
    allowed = allowed or {}
    # Trailing blank lines vary between the genuine files (one after 10.8's output, two after 11.13's).
    while ours and ours[-1].kind == "blank":
        ours = ours[:-1]
    while genuine and genuine[-1].kind == "blank":
        genuine = genuine[:-1]
    assert [x.kind for x in ours] == [x.kind for x in genuine], (
        "line kinds differ:\n" + "\n".join(f"{a.kind:16} {a.text!r:90} | {b.kind:16} {b.text!r}"
                                           for a, b in zip(ours, genuine, strict=False)))
    for i, (a, b) in enumerate(zip(ours, genuine, strict=True)):
        fa, fb = a.facts(), b.facts()
        for k in fa.keys() | fb.keys():
            if (i, k) in allowed or (-1, k) in allowed:
                continue
            assert fa.get(k) == fb.get(k), f"line {i}: {k} differs: ours {a.text!r}, FlexNet {b.text!r}"


def section(lines: list[Line], start_kind: str) -> list[Line]:
    """From the first line of ``start_kind`` to the end."""
    i = next(i for i, x in enumerate(lines) if x.kind == start_kind)
    return lines[i:]


def blocks(lines: list[Line]) -> dict[str, list[Line]]:
    """The ``Users of`` blocks by feature name (each from its ``Users of`` line to the next one)."""
    out: dict[str, list[Line]] = {}
    current: list[Line] | None = None
    for ln in lines:
        if ln.kind == "users_of":
            current = out.setdefault(str(ln.fields["feature"]), [])
        if current is not None:
            current.append(ln)
    return out


# --------------------------------------------------------------------------- the rig
@dataclass
class Rig:
    """Licenses, a policy and seat holders on a real daemon; every daemon it starts is stopped at the end."""

    workdir: Path
    daemons: list[Daemon] = field(default_factory=list)
    clients: dict[tuple[str, str, str], RawClient] = field(default_factory=dict)

    def start(self, licenses: list[tuple[list[tuple[str, str, int]], date | None]], config: str | None = None,
              **kw: Any) -> Daemon:
        key, pub = write_keys(self.workdir / "vendor")
        paths = []
        for i, (products, expires) in enumerate(licenses):
            path = self.workdir / f"site{i}.lic"
            write_license(path, key, products, expires=expires)
            paths.append(path)
        extra = list(kw.pop("extra", []))
        if config is not None:
            cfg = self.workdir / "lmgrd.yaml"
            cfg.write_text(config, encoding="utf-8")
            extra += ["--config", str(cfg)]
        # The holders are raw clients that never heartbeat: by default a lease that cannot lapse while the
        # test runs its lmstat processes (seconds apiece on a loaded machine). A test may pass its own.
        kw.setdefault("heartbeat", 10.0)
        kw.setdefault("lease_timeout", 300.0)
        d = Daemon(self.workdir / f"d{len(self.daemons)}", paths, pub, extra=extra, **kw)
        d.workdir.mkdir(parents=True, exist_ok=True)
        self.daemons.append(d)
        return d.start()

    def hold(self, d: Daemon, product: str, version: str, user: str, host: str, display: str = "") -> Granted:
        """A seat of ``product`` for ``user`` on ``host`` (one connection per user, host and display)."""
        who = (user, host, display)
        c = self.clients.get(who)
        if c is None:
            c = self.clients[who] = d.connect()
            w = c.request(Hello(c.id(), (1,), host, user, os.getpid(), "test", display))
            assert isinstance(w, Welcome), w
        g = c.request(Checkout(c.id(), product, version, 0))
        assert isinstance(g, Granted), (who, product, g)
        return g

    def close(self) -> None:
        for d in self.daemons:
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait(10)


def lmutil(d: Daemon, *args: str, argv0: list[str] | None = None, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    cmd = argv0 or [sys.executable, "-m", "lmgrd.lmutil"]
    return subprocess.run([*cmd, *args, "-c", d.address], capture_output=True, text=True, timeout=60,
                          env=env or d.env())


def lmstat(d: Daemon, *args: str) -> str:
    r = lmutil(d, "lmstat", *args)
    assert r.returncode == 0, r.stderr
    return r.stdout
