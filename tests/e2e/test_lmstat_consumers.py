"""Open-source consumers of FlexNet's lmstat text run against ``lmutil lmstat`` on the real daemon, each expected
to find the users and counts the daemon holds; Debian's ``check_flexlm`` must say CRITICAL once it is down.
Each parser is first run on a genuine FlexNet file, so a failure against lmgrd is lmgrd's, not the port's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
from flexnet import GOLDEN, Rig, lmstat, lmutil
from harness import Daemon
from lmstat_parsers import (
    CHECK_FLEXLM,
    EXPORTER,
    exporter_parse,
    flexlmjs_parse,
    lm_agent_parse,
    stat_json_parse,
)


def require(path: Path, what: str) -> Path:
    """``path``; skip when absent, unless CI is set: then its absence fails the test."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{what} is required when CI is set; run .ci/install-deps.sh")
        pytest.skip(f"{what} is not installed (.ci/install-deps.sh)")
    return path


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


@pytest.fixture
def site(rig: Rig) -> tuple[Rig, Daemon, str]:
    """Three of 25 CADPRO seats, the only VIEWER seat, nothing of SOLVER; the server's host name."""
    d = rig.start([([("CADPRO", "2.1", 25), ("VIEWER", "1.0", 1), ("SOLVER", "3.0", 4)], date(2030, 6, 30))],
                  heartbeat=10, lease_timeout=30)
    for user, host in (("alice", "pc1"), ("bob", "pc2"), ("carol", "pc3")):
        rig.hold(d, "CADPRO", "2.1", user, host)
    rig.hold(d, "VIEWER", "1.0", "alice", "pc1")
    host = lmutil(d, "lmhostid", "--json").stdout.split('"short_hostname": "')[1].split('"')[0]
    return rig, d, host


def lmutil_script() -> Path:
    """The ``lmutil`` console script of this environment (pip install -e puts it beside the interpreter)."""
    path = Path(sys.executable).parent / "lmutil"
    assert path.exists(), f"no lmutil console script beside {sys.executable}; pip install -e ."
    return path


def test_flexlm_exporter_finds_servers_vendor_features_users_and_version(site: tuple[Rig, Daemon, str]) -> None:
    genuine = exporter_parse((GOLDEN / "flexnet11.13-lmstat-a-triad.txt").read_text())
    assert genuine["features"]["feature2"] == {"issued": 144, "used": 22}
    assert sum(genuine["users"]["feature2"].values()) == 22 and genuine["servers"]["host2"]["master"]
    _rig, d, host = site
    got = exporter_parse(lmstat(d, "-a"))
    assert got["servers"] == {host: {"fqdn": host, "port": str(d.port), "status": True, "master": True,
                                     "version": got["servers"][host]["version"]}}
    assert set(got["vendors"]) == {"lmgrd"} and got["vendors"]["lmgrd"]["status"]
    assert got["features"] == {"CADPRO": {"issued": 25, "used": 3}, "VIEWER": {"issued": 1, "used": 1},
                               "SOLVER": {"issued": 4, "used": 0}}
    assert got["users"] == {"CADPRO": {"alice": 1, "bob": 1, "carol": 1}, "VIEWER": {"alice": 1}}
    # lmstat -v (the exporter's lmstat_info metric) and lmstat -i (its feature expiry collector)
    (ver,) = [m for line in lmstat(d, "-v").splitlines() if (m := EXPORTER["version"].search(line))]
    assert ver["version"].startswith("v0.") and ver["build"].isdigit() and ver["arch"]
    rows = [m.groupdict() for line in lmstat(d, "-i").splitlines() if (m := EXPORTER["feature_exp"].search(line))]
    assert [(r["feature"], r["licenses"], r["expires"], r["vendor"]) for r in rows] == [
        ("CADPRO", "25", "30-jun-2030", "lmgrd"), ("VIEWER", "1", "30-jun-2030", "lmgrd"),
        ("SOLVER", "4", "30-jun-2030", "lmgrd")]


def test_flexlm_exporter_and_flexlmjs_read_reservations(rig: Rig) -> None:
    genuine = exporter_parse((GOLDEN / "flexnet-lmstat-a-2.txt").read_text())
    assert genuine["groups"]["Power_System_Blocks"] == {"DED": 1}
    d = rig.start([([("SOLVER", "3.0", 4)], None)],
                  config="groups:\n  DED: [ded1]\npolicy:\n  SOLVER:\n    reserve:\n      - {seats: 2, group: DED}\n")
    rig.hold(d, "SOLVER", "3.0", "ded1", "pc9")
    text = lmstat(d, "-a")
    got = exporter_parse(text)
    assert got["groups"] == {"SOLVER": {"DED": 1}}  # one still free; ded1 holds the other
    assert got["features"] == {"SOLVER": {"issued": 4, "used": 2}} and got["users"] == {"SOLVER": {"ded1": 1}}
    js = flexlmjs_parse(text)
    assert js["SOLVER"]["used"] == "2" and [t["username"] for t in js["SOLVER"]["tokens"]] == ["ded1"]


def test_flexlmjs_finds_features_users_vendor_and_expiry(site: tuple[Rig, Daemon, str]) -> None:
    genuine = flexlmjs_parse((GOLDEN / "flexnet-lmstat-a-2.txt").read_text())
    assert genuine["MATLAB"]["used"] == "60" and len(genuine["MATLAB"]["tokens"]) == 59
    _rig, d, _host = site
    got = flexlmjs_parse(lmstat(d, "-a"))
    assert {k: (v["total"], v["used"]) for k, v in got.items()} == {
        "CADPRO": ("25", "3"), "VIEWER": ("1", "1"), "SOLVER": ("4", "0")}
    assert [(t["username"], t["machine"]) for t in got["CADPRO"]["tokens"]] == [
        ("alice", "pc1"), ("bob", "pc2"), ("carol", "pc3")]
    (tok,) = got["VIEWER"]["tokens"]
    assert (tok["username"], tok["vendorname"], tok["version"], tok["expiry"]) == ("alice", "lmgrd", "v1.0",
                                                                                  "30-jun-2030")
    assert tok["started"].count("/") == 1 and ":" in tok["started"]


def test_flexlm_stat_json_reads_the_layout_blank_line_for_blank_line(site: tuple[Rig, Daemon, str]) -> None:
    genuine = stat_json_parse((GOLDEN / "flexlm10.8-lmstat-a.txt").read_text())
    assert genuine["server"] == "8224@myserver" and genuine["vendor"] == "armlmd:"
    # (its first entry is an empty one, made of the blank line before the first "Users of ")
    assert [u["userid"] for u in genuine["feature_usage"][1]["users"]] == ["ngnere"]
    _rig, d, host = site
    got = stat_json_parse(lmstat(d, "-a"))
    assert (got["server"], got["server_status"], got["vendor"], got["vendor_status"]) == (
        f"{d.port}@{host}", "UP", "lmgrd:", "UP")
    assert got["server_version"].startswith("v0.")
    by = {f["feature"]: f for f in got["feature_usage"] if f["feature"]}
    assert {k: (f["issued_lics"], f["used_lics"]) for k, f in by.items()} == {
        "CADPRO": ("25", "3"), "VIEWER": ("1", "1"), "SOLVER": ("4", "0")}
    assert [(u["userid"], u["host"], u["display"], u["server_host"], u["server_port"])
            for u in by["CADPRO"]["users"]] == [(n, h, h, host, str(d.port))
                                                for n, h in (("alice", "pc1"), ("bob", "pc2"), ("carol", "pc3"))]


def test_license_manager_agent_reads_the_counts_as_from_flexnet(site: tuple[Rig, Daemon, str]) -> None:
    """lm_agent (license-manager-agent 3.0.12 on PyPI, the Slurm license agent) runs ``lmstat -c S -f FEATURE``
    and books the totals; its user pattern wants a `, N licenses` suffix, which FlexNet prints only for a
    checkout of several licenses, so a single seat is no booking there: the same on FlexNet's own output."""
    require(Path(__file__).resolve().parents[2] / ".ci" / "parsers" / "lm_agent", "license-manager-agent")
    genuine = lm_agent_parse((GOLDEN / "flexnet11.13-lmstat-a-triad.txt").read_text())
    assert genuine["uses"] == []
    _rig, d, _host = site
    got = lm_agent_parse(lmstat(d, "-f", "CADPRO"))
    assert got == {"uses": [], "total": {"total": 25, "used": 3, "feature": "cadpro"}}


def check_flexlm(tmp_path: Path, d: Daemon) -> subprocess.CompletedProcess[str]:
    """Debian's check_flexlm, unchanged, with its utils.pm pointing PATH_TO_LMSTAT at an ``lmstat`` symlink
    to lmutil (how an operator configures it)."""
    plugin = require(CHECK_FLEXLM, "check_flexlm (Debian monitoring-plugins-standard)")
    work = tmp_path / "nagios"
    (work / "bin").mkdir(parents=True, exist_ok=True)
    tool = work / "bin" / "lmstat"
    if not tool.exists():
        tool.symlink_to(lmutil_script())
    shutil.copy(plugin, work / "check_flexlm")
    utils = (plugin.parent / "utils.pm").read_text()
    (work / "utils.pm").write_text(utils.replace('$PATH_TO_LMSTAT  = "" ;', f'$PATH_TO_LMSTAT  = "{tool}" ;'))
    return subprocess.run(["perl", str(work / "check_flexlm"), "-F", d.address, "-t", "30"], capture_output=True,
                          text=True, timeout=60, env=d.env())


def test_check_flexlm_is_ok_while_up_and_critical_when_the_daemon_is_down(site: tuple[Rig, Daemon, str],
                                                                          tmp_path: Path) -> None:
    _rig, d, host = site
    up = check_flexlm(tmp_path, d)
    assert up.returncode == 0, up.stdout + up.stderr
    assert up.stdout.startswith(f"License Servers running:{host},") and "up:1;down:0" in up.stdout
    d.stop()
    down = check_flexlm(tmp_path, d)
    assert down.returncode == 2, down.stdout + down.stderr  # CRITICAL
    assert "License servers NOT running:" in down.stdout and "up:0;down:1" in down.stdout


def test_flexnet_tool_names_run_lmutil(site: tuple[Rig, Daemon, str], tmp_path: Path) -> None:
    _rig, d, _host = site
    for name in ("lmstat", "lmremove", "lmreread", "lmdown", "lmhostid", "lmver"):
        (tmp_path / name).symlink_to(lmutil_script())
    r = lmutil(d, "-a", argv0=[str(tmp_path / "lmstat")])
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[2:] == lmstat(d, "-a").splitlines()[2:]  # all but the date line
    r = subprocess.run([str(tmp_path / "lmver")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "lmver v" in r.stdout
    r = lmutil(d, "CADPRO", "bob", "pc2", argv0=[str(tmp_path / "lmremove")])
    assert r.returncode == 0 and "removed CADPRO seat of bob@pc2" in r.stdout
    assert "    bob " not in lmstat(d, "-a")
    r = lmutil(d, "--json", argv0=[str(tmp_path / "lmhostid")])
    assert r.returncode == 0 and "short_hostname" in r.stdout
    r = lmutil(d, argv0=[str(tmp_path / "lmdown")])
    assert r.returncode == 0 and d.proc is not None and d.proc.wait(10) == 0
