"""A FlexNet options file (config ``options:``) against the real daemon: its RESERVE, MAX, EXCLUDE, INCLUDEALL,
EXCLUDEALL and TIMEOUT lines take effect (by USER, GROUP, HOST_GROUP, DISPLAY and INTERNET), ``lmutil lmreread``
rereads it, ``lmgrd --check`` lists what it does not support, and a bad line is reported (file and line) while
the daemon keeps serving.

The option lines follow the shapes of Revenera's FlexNet Publisher License Administration Guide ("Simple
Options File Example": ``RESERVE 1 compile USER robert`` / ``EXCLUDE compile USER lori`` / ``NOLOG QUEUED``;
"Limiting Access for Multiple Users": ``GROUP Hackers bob howard james`` then ``EXCLUDE toothbrush GROUP
Hackers``) and of the FLEXnet Licensing End User Guide, chapter 5 (``MAX 5 f1 USER jan``, ``TIMEOUT f1 3600``,
``INCLUDEALL USER jane``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from harness import Daemon, RawClient

from protocol import Checkout, ErrorCode, ErrorReply, Granted, Heartbeat, HeartbeatAck

PRODUCTS = (("CADPRO", "2.1", 3), ("VIEWER", "1.0", 5))

SITE_OPT = """\
# CADPRO: one seat always free for the designers, carol never holds more than one.
GROUP designers alice bob
RESERVE 1 CADPRO GROUP designers
MAX 1 CADPRO USER carol
# VIEWER: lori may not use it; idle seats go back after 15 minutes.
EXCLUDE VIEWER USER lori
TIMEOUT VIEWER 900
NOLOG QUEUED
"""


def start(daemon_factory: Callable[..., Daemon], options: str) -> tuple[Daemon, Path]:
    d = daemon_factory(PRODUCTS, start=False, heartbeat=10.0, lease_timeout=30.0)
    opt = d.workdir / "site.opt"
    opt.write_text(options)
    cfg = d.workdir / "lmgrd.yaml"
    cfg.write_text(f"options: {opt}\n")
    d.extra += ["-c", str(cfg)]
    d.start()
    return d, opt


def client(d: Daemon, user: str, host: str = "pc1", source: str | None = None, display: str = "") -> RawClient:
    c = d.connect(source=source)
    c.hello(user=user, host=host, display=display)
    return c


def checkout(c: RawClient, product: str = "CADPRO") -> Granted | ErrorReply:
    r = c.request(Checkout(c.id(), product, "1.0" if product == "VIEWER" else "2.1", 0))
    assert isinstance(r, Granted | ErrorReply), r
    return r


def lmutil(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lmgrd.lmutil", *args, "-c", d.address], capture_output=True,
                          text=True, timeout=30, env=d.env())


def test_reserve_max_exclude_and_timeout_from_an_options_file_take_effect(
        daemon_factory: Callable[..., Daemon]) -> None:
    d, opt = start(daemon_factory, SITE_OPT)
    d.wait_for_log(rf"options file: {opt} line 8: NOLOG is not supported")  # listed, and the daemon serves
    assert isinstance(checkout(client(d, "erin")), Granted)
    assert isinstance(checkout(client(d, "carol")), Granted)
    r = checkout(client(d, "carol", host="pc2"))  # MAX 1 CADPRO USER carol
    assert isinstance(r, ErrorReply) and r.code is ErrorCode.MAX_REACHED, r
    assert "max 1 for user carol, site.opt line 4" in r.message
    r = checkout(client(d, "frank"))  # the last free seat is reserved for the designers
    assert isinstance(r, ErrorReply) and r.code is ErrorCode.RESERVED, r
    assert isinstance(checkout(client(d, "bob")), Granted)  # a designer takes it

    r = checkout(client(d, "lori"), "VIEWER")  # EXCLUDE VIEWER USER lori
    assert isinstance(r, ErrorReply) and r.code is ErrorCode.EXCLUDED
    assert "exclude user lori, site.opt line 6" in r.message
    alice = client(d, "alice")
    seat = checkout(alice, "VIEWER")
    assert isinstance(seat, Granted)
    ack = alice.request(Heartbeat(alice.id(), idle=True, idle_for=899))
    assert isinstance(ack, HeartbeatAck) and ack.lost == ()
    ack = alice.request(Heartbeat(alice.id(), idle=True, idle_for=901))  # TIMEOUT VIEWER 900
    assert isinstance(ack, HeartbeatAck)
    assert [(x.token, x.code) for x in ack.lost] == [(seat.token, ErrorCode.IDLE_TIMEOUT)]
    d.wait_for_log(r"IDLE VIEWER 1\.0 of alice@.* reclaimed")


def test_lmreread_rereads_the_options_file_and_a_bad_line_keeps_the_daemon_serving(
        daemon_factory: Callable[..., Daemon]) -> None:
    d, opt = start(daemon_factory, "EXCLUDE VIEWER USER lori\n")
    held = client(d, "erin")
    assert isinstance(checkout(held, "VIEWER"), Granted)
    assert isinstance(checkout(client(d, "lori"), "VIEWER"), ErrorReply)

    opt.write_text("GROUP Hackers mallory trudy\n"
                   "EXCLUDE VIEWER GROUP Hackerz\n"  # a typo: reported and ignored
                   "EXCLUDE VIEWER GROUP Hackers\n"
                   "INCLUDEALL USER jane\n"
                   "INCLUDEALL USER lori\n"
                   "INCLUDEALL USER erin\n")
    r = lmutil(d, "lmreread", "--json")
    assert r.returncode == 1, r.stdout + r.stderr  # reloaded, with a problem the operator must see
    problems = json.loads(r.stdout)["problems"]
    assert [p for p in problems if "site.opt" in p] == [
        f"{opt} line 2: EXCLUDE: no GROUP named 'Hackerz' in this file (did you mean 'Hackers'?); define it with "
        "a 'GROUP Hackerz ...' line; the line is ignored"]
    d.wait_for_log(r"site\.opt line 2: EXCLUDE: no GROUP named 'Hackerz'")
    assert isinstance(checkout(client(d, "lori"), "VIEWER"), Granted)  # the old EXCLUDE is gone
    r2 = checkout(client(d, "mallory"), "VIEWER")
    assert isinstance(r2, ErrorReply) and r2.code is ErrorCode.EXCLUDED and "group Hackers" in r2.message
    r2 = checkout(client(d, "frank"), "CADPRO")  # INCLUDEALL: only the listed users, on every product
    assert isinstance(r2, ErrorReply) and r2.code is ErrorCode.EXCLUDED and "include list" in r2.message
    assert isinstance(checkout(client(d, "jane"), "CADPRO"), Granted)
    ack = held.request(Heartbeat(held.id()))  # the seat held across both rereads is untouched
    assert isinstance(ack, HeartbeatAck) and ack.renewed == 1 and ack.lost == ()

    opt.write_text("EXCLUDEALL INTERNET 127.0.0.*\n")  # every client of this test connects from 127.0.0.1
    assert lmutil(d, "lmreread").returncode == 0
    r2 = checkout(client(d, "jane"), "CADPRO")
    assert isinstance(r2, ErrorReply) and r2.code is ErrorCode.EXCLUDED and "internet 127.0.0.*" in r2.message

    opt.unlink()  # an options file that disappears never lifts every rule: the running config stays
    r = lmutil(d, "lmreread", "--json")
    assert r.returncode == 1 and any("cannot read the options file" in p for p in json.loads(r.stdout)["problems"])
    assert isinstance(checkout(client(d, "jane"), "CADPRO"), ErrorReply)


LAB_OPT = """\
# The lab PC at 127.0.0.2 keeps one CADPRO seat for itself; the terminal-server client ts-17 holds at most one.
RESERVE 1 CADPRO INTERNET 127.0.0.2
MAX 1 CADPRO DISPLAY ts-17
# The render farm, by name and by address, never holds more than one.
HOST_GROUP farm rnode1 127.0.0.3
MAX 1 CADPRO HOST_GROUP farm
"""


def test_reserve_and_max_by_internet_and_display_are_enforced(daemon_factory: Callable[..., Daemon]) -> None:
    # Clients connect from 127.0.0.1 unless the test says otherwise (any 127/8 source reaches the daemon on
    # loopback), so the addresses are real socket addresses, not something the client claims.
    d, _ = start(daemon_factory, LAB_OPT)
    r = subprocess.run([*d.args(), "--check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "unsupported:" not in r.stdout, r.stdout + r.stderr
    assert isinstance(checkout(client(d, "erin", display="ts-17")), Granted)
    r1 = checkout(client(d, "frank", host="pc2", display="ts-17"))
    assert isinstance(r1, ErrorReply) and r1.code is ErrorCode.MAX_REACHED, r1
    assert "max 1 for display ts-17, site.opt line 3" in r1.message
    status = lmutil(d, "lmstat", "-a")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "        1 RESERVATION for INTERNET 127.0.0.2 (" in status.stdout
    assert isinstance(checkout(client(d, "gina", host="rnode1")), Granted)  # the second unreserved seat
    r2 = checkout(client(d, "hank", host="pc3"))  # the last seat is the lab PC's
    assert isinstance(r2, ErrorReply) and r2.code is ErrorCode.RESERVED, r2
    r3 = checkout(client(d, "ivan", host="lab7", source="127.0.0.3"))  # in the farm by its address
    assert isinstance(r3, ErrorReply) and r3.code is ErrorCode.MAX_REACHED and "host_group farm" in r3.message, r3
    assert isinstance(checkout(client(d, "lab", host="lab1", source="127.0.0.2")), Granted)
    users = [line.split()[:2] for line in lmutil(d, "lmstat", "-a").stdout.splitlines() if ", start " in line]
    assert sorted(users) == [["erin", "pc1"], ["gina", "rnode1"], ["lab", "lab1"]]


def test_check_lists_unsupported_lines_with_their_line_numbers(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(PRODUCTS, start=False)
    opt = d.workdir / "vendor.opt"
    opt.write_text("# exported from the old FlexNet server\n"
                   "REPORTLOG +/var/log/vendor.rl\n"
                   "RESERVE 1 CADPRO USER robert\n"
                   "LINGER CADPRO 60\n"
                   "MAX 2 CADPRO:VERSION=2.0 USER jan\n")
    cfg = d.workdir / "lmgrd.yaml"
    cfg.write_text(f"options: {opt}\n")
    r = subprocess.run([*d.args(), "-c", str(cfg), "--check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr  # unsupported lines are listed, not errors
    unsupported = [line for line in r.stdout.splitlines() if line.startswith("unsupported: ")]
    assert [u.split(": ")[1] for u in unsupported] == [f"{opt} line 2", f"{opt} line 4", f"{opt} line 5"]
    assert "REPORTLOG is not supported" in unsupported[0] and "LINGER" in unsupported[1]
    assert "3 line(s) of the options file" in r.stdout

    opt.write_text("RESERVE 1 CADPRO USER robert\nRESERVE lots CADPRO USER robert\n")
    r = subprocess.run([*d.args(), "-c", str(cfg), "--check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert (f"problem: {opt} line 2: RESERVE: the number of licenses 'lots' is not a whole number >= 1; the line is "
            "ignored") in r.stdout


def test_a_bad_line_at_start_is_logged_and_the_daemon_serves_the_rest(daemon_factory: Callable[..., Daemon]) -> None:
    d, opt = start(daemon_factory, "EXCLUDE VIEWER USR lori\nEXCLUDE VIEWER USER mallory\n")
    d.wait_for_log(rf"ERROR .*{opt} line 1: EXCLUDE: unknown type 'USR' \(did you mean USER\?\)")
    r = checkout(client(d, "mallory"), "VIEWER")
    assert isinstance(r, ErrorReply) and r.code is ErrorCode.EXCLUDED
    assert isinstance(checkout(client(d, "lori"), "VIEWER"), Granted)  # the ignored line excludes nobody
