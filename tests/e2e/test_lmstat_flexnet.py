"""``lmutil lmstat`` against FlexNet's genuine output: for each layout case in ``golden/`` the same situation is
built on the real daemon (same features, counts, users, hosts, displays, versions, reservations) and the output
compared line by line; only values that must differ between two servers may (server names, times, handles,
software versions), plus the FlexNet version differences each case names."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
from flexnet import GOLDEN, Rig, blocks, check_grammar, classify, compare, lmstat, lmutil, section
from harness import Holder

from lmgrd.lmstat_text import render_lmstat

#: Lines of the genuine MATLAB (MLM) file that lmgrd never prints, and why.
MLM_EXTRA = {
    # a vendor-defined string on the FEATURE line; lmgrd licenses have none
    "vendor_string": r"  vendor_string: .*",
    # an uncounted node-locked feature is not served by a license server (lmgrd serves counted floating ones)
    "uncounted": r"Users of \S+:  \(Uncounted, node-locked\)",
}


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def test_the_genuine_files_are_made_of_the_line_kinds_the_tests_know() -> None:
    """The patterns come from FlexNet: every line of every genuine file is one of them (or a named exception)."""
    for name in ("flexlm10.8-lmstat-a.txt", "flexnet11.13-lmstat-a-triad.txt", "flexnet-lmstat-a-2.txt"):
        lines = classify((GOLDEN / name).read_text(), MLM_EXTRA)
        check_grammar(lines, vendor_columns="triad" not in name)  # its "vendor1" is an anonymised name
        assert sum(x.kind == "user" for x in lines) > 0


def test_one_server_one_seat_as_flexlm_10_8_prints_it(rig: Rig) -> None:
    """flexlm10.8-lmstat-a.txt: three features of 10, one seat in use, the whole output."""
    d = rig.start([([("rvd_arm", "4.0", 10), ("rvd_rtos", "4.0", 10), ("rvd_trace", "4.0", 10)], None)])
    rig.hold(d, "rvd_arm", "4.0", "ngnere", "clientpc", "CLIENTPC")
    ours = classify(lmstat(d, "-a"))
    check_grammar(ours)
    genuine = classify((GOLDEN / "flexlm10.8-lmstat-a.txt").read_text())
    i_server = next(i for i, x in enumerate(genuine) if x.kind == "server_up")
    i_feature = next(i for i, x in enumerate(genuine) if x.kind == "feature_line")
    compare(ours, genuine, {
        # FlexNet 11.19 indents a lone server's line by two, FLEXlm 10.8 by four
        (i_server, "indent"): "FlexNet version",
        # FLEXlm 10.8 predates the `, expiry:` field on the feature line
        (i_feature, "expiry"): "FlexNet version",
    })
    assert ours[i_feature].fields["expiry"] == "permanent(no expiration date)"
    assert ours[i_server].fields["indent"] == "  " and ours[i_server].fields["master"] == " (MASTER)"
    # exactly one user line, no `, 1 licenses`, a decimal handle
    (user,) = [x for x in ours if x.kind == "user"]
    assert user.fields["licenses"] is None and user.fields["handle_any"] and user.fields["port_any"] == str(d.port)


def test_many_users_as_flexnet_11_13_prints_them(rig: Rig) -> None:
    """flexnet11.13-lmstat-a-triad.txt, from ``Feature usage info:`` on (lmgrd is one server, not a triad):
    ten features, 22, 15 and 1 seats held by the same users, hosts, displays and client versions."""
    genuine_all = classify((GOLDEN / "flexnet11.13-lmstat-a-triad.txt").read_text())
    genuine = section(genuine_all, "feature_usage")
    products = [(str(x.fields["feature"]), "31.0", int(str(x.fields["issued"])))
                for x in genuine if x.kind == "users_of"]
    d = rig.start([(products, None)], heartbeat=10, lease_timeout=30)
    feature = ""
    for x in genuine:
        if x.kind == "users_of":
            feature = str(x.fields["feature"])
        if x.kind == "user":
            f = x.fields
            rig.hold(d, feature, str(f["version"]), str(f["user"]), str(f["host"]), str(f["display"]))
    ours = section(classify(lmstat(d, "-a")), "feature_usage")
    check_grammar(ours)
    # the lmutil of this file (2005) printed no `, expiry:`; FlexNet 11's does
    compare(ours, genuine, {(-1, "expiry"): "lmutil version"})
    handles = [x.fields["handle_any"] for x in ours if x.kind == "user"]
    assert len(handles) == 38 and all(h and h.isdigit() for h in handles)
    assert len(set(handles)) == 38  # unique among live seats


def test_reservations_expiry_and_singular_as_flexnet_11_19_prints_them(rig: Rig) -> None:
    """flexnet-lmstat-a-2.txt (FlexNet 11.19, MATLAB's MLM), four of its features: a reservation for a group
    and nobody holding a seat (the reserved seat counts as in use), a floating feature with an expiry date,
    singular counts. The file is double-spaced (a blank line after every line), so blanks are not compared."""
    genuine_all = [x for x in classify((GOLDEN / "flexnet-lmstat-a-2.txt").read_text(), MLM_EXTRA)
                   if x.kind not in ("blank", "vendor_string")]
    wanted = ("Symbolic_Toolbox", "Aerospace_Blockset", "Aerospace_Toolbox", "Power_System_Blocks")
    gb = blocks(genuine_all)
    d = rig.start(
        [([("Symbolic_Toolbox", "52", 4), ("Aerospace_Blockset", "52", 1), ("Aerospace_Toolbox", "52", 1)],
          date(2099, 1, 1)),
         ([("Power_System_Blocks", "12", 5)], None)],
        config="groups:\n  DED: [ded1, ded2]\npolicy:\n  Power_System_Blocks:\n    reserve:\n"
               "      - {seats: 1, group: DED}\n")
    rig.hold(d, "Symbolic_Toolbox", "48", "USER5", "F1UXXXX", "F1UXXXX")
    rig.hold(d, "Aerospace_Toolbox", "52", "USER33", "F1UXXXX", "F1UXXXX")
    ours_all = [x for x in classify(lmstat(d, "-a")) if x.kind != "blank"]
    check_grammar(ours_all)
    ob = blocks(ours_all)
    assert list(ob) == list(wanted)  # license-file order, as FlexNet
    for name in wanted:
        genuine = gb[name]
        allowed: dict[tuple[int, str], str] = {}
        if name == "Power_System_Blocks":
            # the genuine v12 line is a node-locked one whose permanence FlexNet writes 01-jan-0000; lmgrd
            # serves floating licenses and writes a permanent one as FlexNet 11 does elsewhere
            allowed = {(1, "expiry"): "nodelocked", (2, "type"): "nodelocked"}
        compare(ob[name], genuine, allowed)
    # The head of the output: the same lines as FlexNet 11.19's, down to Feature usage info.
    head_g = genuine_all[:next(i for i, x in enumerate(genuine_all) if x.kind == "feature_usage") + 1]
    head_o = ours_all[:next(i for i, x in enumerate(ours_all) if x.kind == "feature_usage") + 1]
    compare(head_o, head_g)
    vendor = next(x for x in head_o if x.kind == "vendor_up")
    assert vendor.text == f"     lmgrd: UP v{vendor.fields['version_any']}"  # right-aligned in ten columns
    # FlexNet counts the reservation as in use; the JSON keeps lmgrd's own numbers
    assert ob["Power_System_Blocks"][0].fields["used"] == "1"


def test_a_reservation_goes_when_its_group_takes_the_seat(rig: Rig) -> None:
    d = rig.start([([("CADPRO", "2.1", 5)], None)],
                  config="groups:\n  designers: [carol, dave]\npolicy:\n  CADPRO:\n    reserve:\n"
                         "      - {seats: 2, group: designers}\n      - {seats: 1, user: erin}\n")
    text = lmstat(d, "-a")
    assert "        2 RESERVATIONs for GROUP designers (" in text and "        1 RESERVATION for USER erin (" in text
    assert "Total of 3 licenses in use" in text
    rig.hold(d, "CADPRO", "2.1", "carol", "pc1")
    text = lmstat(d, "-a")
    assert "        1 RESERVATION for GROUP designers (" in text and "Total of 3 licenses in use" in text
    assert "    carol pc1 pc1 (v2.1) (" in text


def test_handles_are_stable_for_a_seat_and_lmremove_h_frees_it(rig: Rig) -> None:
    d = rig.start([([("CADPRO", "2.1", 5)], None)], heartbeat=10, lease_timeout=30)
    rig.hold(d, "CADPRO", "2.1", "alice", "pc1")
    rig.hold(d, "CADPRO", "2.1", "bob", "pc2")

    def handles() -> dict[str, str]:
        return {str(x.fields["user"]): str(x.fields["handle_any"]) for x in classify(lmstat(d, "-a"))
                if x.kind == "user"}

    first = handles()
    rig.hold(d, "CADPRO", "2.1", "carol", "pc3")
    rig.hold(d, "CADPRO", "2.1", "alice", "pc1")  # a second checkout shares alice's seat: still one line
    now = handles()
    assert {k: now[k] for k in first} == first and len(set(now.values())) == 3
    r = lmutil(d, "lmremove", "-h", "CADPRO", "anyhost", str(d.port), now["bob"])
    assert r.returncode == 0, r.stderr
    after = handles()
    assert "bob" not in after and after == {k: v for k, v in now.items() if k != "bob"}
    # FlexNet's other form, FEATURE USER HOST DISPLAY
    r = lmutil(d, "lmremove", "CADPRO", "carol", "pc3", "pc3")
    assert r.returncode == 0, r.stderr
    assert set(handles()) == {"alice"}
    r = lmutil(d, "lmremove", "-h", "CADPRO", "anyhost", str(d.port), now["bob"])
    assert r.returncode == 1 and f"no seat of CADPRO has handle {now['bob']}" in r.stderr
    r = lmutil(d, "lmremove", "-h", "CADPRO", "anyhost", str(d.port + 1), now["alice"])
    assert r.returncode == 2 and "give -c" in r.stderr
    # the handle survives a restart of the daemon (the seat is restored from the journal)
    d.stop()
    d.start()
    assert handles() == {"alice": now["alice"]}


def test_options_i_f_s_v_and_the_server_down_line(rig: Rig) -> None:
    d = rig.start([([("CADPRO", "2.1", 25), ("VIEWER", "1.0", 1)], date(2027, 12, 31))])
    rig.hold(d, "VIEWER", "1.0", "alice", "pc1")
    plain = classify(lmstat(d))
    assert "feature_usage" not in [x.kind for x in plain] and "vendor_up" in [x.kind for x in plain]
    f = lmstat(d, "-f", "VIEWER")
    assert "License server status" not in f and "Users of CADPRO" not in f
    assert 'Users of VIEWER:  (Total of 1 license issued;  Total of 1 license in use)' in f
    assert '  "VIEWER" v1.0, vendor: lmgrd, expiry: 31-dec-2027' in f
    assert "Users of CADPRO" in lmstat(d, "-S", "lmgrd") and "    alice pc1 pc1 (v1.0)" in lmstat(d, "-S")
    r = lmutil(d, "lmstat", "-S", "MLM")
    assert r.returncode == 1 and "only the vendor daemon 'lmgrd'" in r.stderr
    i = lmstat(d, "-i").splitlines()
    assert i[3:] == ["Feature                         Version     #licenses    Expires      Vendor",
                     "_______                         _________   _________    __________   ______",
                     "CADPRO                          2.1          25          31-dec-2027  lmgrd",
                     "VIEWER                          1.0          1           31-dec-2027  lmgrd"]
    assert lmstat(d, "-i", "VIEWER").splitlines()[5:] == i[6:]
    v = lmstat(d, "-v").splitlines()
    assert v[0].startswith("lmutil - Copyright") and v[1].startswith("lmstat v0.")
    assert "-t" in lmutil(d, "lmstat", "--help").stdout
    assert lmstat(d, "-a", "-t", "5")
    ext = lmstat(d, "-a", "--extended")
    assert "lmgrd details" in ext and "customer CID-" in ext and "lmgrd details" not in lmstat(d, "-a")
    d.stop()
    r = lmutil(d, "lmstat", "-a")
    assert r.returncode == 3
    assert r.stdout.splitlines()[-1] == ('Error getting status: Cannot connect to license server system. '
                                         '(-15,570:111 "Connection refused")')


def test_formatter_prints_nodelocked_and_multi_license_checkouts_as_flexnet() -> None:
    """Shapes lmgrd's daemon never produces (node-locked, a checkout of 16 licenses) but the formatter keeps
    FlexNet's text for (pure; no daemon)."""
    from datetime import datetime

    data = {"hostname": "srv", "server_version": "1.0", "license_files": ["/l.lic"], "pools": [
        {"customer_id": "C", "product": "P", "version": "2", "count": 20, "in_use": 1, "license_type": "single",
         "expires": "2030-02-03"}],
        "leases": [{"customer_id": "C", "product": "P", "user": "u", "host": "h", "display": "", "version": "2",
                    "checkout_at": 0.0, "handle": 101, "token": "t"}]}
    text = render_lmstat(data, port=27000, now=datetime(2026, 12, 1, 18, 7), features=True, users=True)
    assert '  "P" v2, vendor: lmgrd, expiry: 03-feb-2030\n  nodelocked license\n' in text
    assert "Flexible License Manager status on Tue 12/1/2026 18:07" in text
    assert "(srv/27000 101), start " in text and ", 1 licenses" not in text


def test_a_server_that_never_answers_times_out_after_t_seconds_with_flexnets_line(tmp_path: Path) -> None:
    """``-t`` is lmstat's connection timeout: the value given is the one on the connection (the error names
    it), and its expiry is reported as FlexNet reports a timeout. No wall time is asserted."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(2)
        port = silent.getsockname()[1]
        for t in ("1", "1.5"):
            r = subprocess.run([sys.executable, "-m", "lmgrd.lmutil", "lmstat", "-a", "-t", t,
                                "-c", f"{port}@127.0.0.1"], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "LMGRD_RUNTIME_DIR": str(tmp_path), "LMGRD_LANG": "en"})
            assert r.returncode == 3, r.stderr
            assert r.stdout.splitlines()[-1] == ('Error getting status: Cannot connect to license server system. '
                                                 '(-15,570:110 "Connection timed out")')
            assert f"license server at {port}@127.0.0.1 did not answer within {t} s" in r.stderr, r.stderr
            assert "lmstat -t SECONDS" in r.stderr


def test_seat_handles_stay_unique_and_fixed_through_collisions_releases_and_restore() -> None:
    """The ledger's handles (pure, no daemon): 20,000 seats in the 8-digit space collide a few times, so the
    next-free-handle path runs; releasing seats never moves another seat's handle; a restore gives each seat
    the handle it had. (The journal does not keep handles: a seat that got the next free handle because its own
    was taken gets its own back after a restart if that is free by then; these seats include no such one.)"""
    import itertools
    import zlib

    from lmgrd.core.ledger import HANDLE_MAX, HANDLE_MIN, Ledger, share_key_for

    tokens = (f"tok{i}" for i in itertools.count())
    ledger = Ledger(30.0, lambda: next(tokens))
    pool = ("CID-TEST", "CADPRO")
    ledger.set_pool(pool, 30_000)
    leases = []
    for i in range(20_000):
        h = Holder(f"user{i}", "pc", 1, "", 1)
        lease = ledger.checkout(pool, share_key_for("user_host", h.user, h.host), h, "1.0", 0.0, 0.0)
        assert lease is not None
        leases.append(lease)
    handles = {x.token: ledger.handle(pool, x.share_key) for x in leases}
    assert len(set(handles.values())) == len(leases)
    assert all(HANDLE_MIN <= v <= HANDLE_MAX for v in handles.values())
    span = HANDLE_MAX - HANDLE_MIN + 1
    derived = [HANDLE_MIN + zlib.crc32("\x1f".join((*pool, *x.share_key)).encode()) % span for x in leases]
    assert len(set(derived)) < len(derived), "no collision: the probing path was not exercised"
    for x in leases[::2]:
        ledger.release(x.token, 0.0, 0.0)
    kept = leases[1::2]
    assert all(ledger.handle(pool, x.share_key) == handles[x.token] for x in kept)
    assert ledger.seat_of(handles[leases[0].token]) is None
    restored = Ledger(30.0, lambda: next(tokens))
    restored.set_pool(pool, 30_000)
    restored.restore([x.to_record() for x in kept], 0.0)
    assert all(restored.handle(pool, x.share_key) == handles[x.token] for x in kept)


def test_c_takes_a_license_file_as_flexnet_does(tmp_path: Path) -> None:
    # FlexNet's lmstat -c takes PORT@HOST or a license file; an lmgrd license names its server, not a port, so the
    # default port 27000 is dialled there. What is not a license file is a usage error naming it.
    import os
    import subprocess
    import sys

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from harness import write_license

    from lmgrd.lmutil import server_of

    lic = tmp_path / "site.lic"
    write_license(lic, Ed25519PrivateKey.generate(), hostname="licsrv07")
    assert server_of(str(lic)) == ("licsrv07", 27000)
    assert server_of("27010@licsrv08,27010@licsrv09") == ("licsrv08", 27010)
    (tmp_path / "notes.txt").write_text("not a license\n")
    r = subprocess.run([sys.executable, "-m", "lmgrd.lmutil", "lmstat", "-a", "-c", str(tmp_path / "notes.txt")],
                       capture_output=True, text=True, timeout=30,
                       env={**os.environ, "LMGRD_RUNTIME_DIR": str(tmp_path), "LMGRD_LANG": "en"})
    assert r.returncode == 2
    assert r.stderr.startswith(f"lmutil lmstat: -c {tmp_path / 'notes.txt'}: not a license server (PORT@HOST) nor a "
                               "readable license file: ")
