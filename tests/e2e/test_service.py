"""Running as a service: the example systemd unit passes ``systemd-analyze verify`` (where systemd is
installed) and carries the settings the README promises; the example config is a valid lmgrd config."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness import REPO

from lmgrd.config import build_config, load_config_file

UNIT = REPO / "deploy" / "lmgrd.service"
CONFIG = REPO / "deploy" / "lmgrd.yaml"


def _settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_unit_has_the_documented_settings() -> None:
    s = _settings(UNIT.read_text(encoding="utf-8"))
    assert s["User"] == ["lmgrd"] and s["Group"] == ["lmgrd"]
    assert s["Restart"] == ["on-failure"]
    assert s["StateDirectory"] == ["lmgrd"] and s["RuntimeDirectory"] == ["lmgrd"]
    assert s["LimitNOFILE"] == ["65536"]
    assert s["ExecStart"][0].endswith("/lmgrd -c /etc/lmgrd/lmgrd.yaml")
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["Environment"] == ["LMGRD_RUNTIME_DIR=/run/lmgrd"]
    assert s["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian package 'systemd'); the unit is not verified")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at this checkout's lmgrd entry point.
    lmgrd = Path(sys.executable).parent / "lmgrd"
    assert lmgrd.exists(), "the lmgrd console script is not installed in this environment (pip install -e .)"
    unit = tmp_path / "lmgrd.service"
    unit.write_text(UNIT.read_text(encoding="utf-8").replace("/opt/lmgrd/bin/lmgrd", str(lmgrd)), encoding="utf-8")
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys or bad values; it reports them on stderr, naming the file.
    problems = [ln for ln in (r.stdout + r.stderr).splitlines() if "lmgrd.service" in ln]
    assert r.returncode == 0 and problems == [], r.stdout + r.stderr
    # And it does catch a mistake (so this test can fail).
    unit.write_text(unit.read_text(encoding="utf-8").replace("Restart=on-failure", "Restart=sometimes"))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "restart specifier" in r.stderr


def test_example_config_is_valid() -> None:
    cfg = build_config(load_config_file(CONFIG), {}, str(CONFIG))
    assert cfg.port == 27000 and cfg.state_dir == Path("/var/lib/lmgrd")
    assert cfg.admin_token_file == Path("/run/lmgrd/admin-27000.token")
    assert cfg.usage_log == Path("/var/log/lmgrd/usage.log")
    assert (cfg.usage_log_max_bytes, cfg.usage_log_backups) == (10 * 1024 * 1024, 5)


HA_UNIT = REPO / "deploy" / "lmgrd-etcd.service"
HA_CONFIG = REPO / "deploy" / "lmgrd-ha.yaml"


def test_ha_examples_etcd_unit_compacts_and_the_node_config_is_valid(tmp_path: Path) -> None:
    s = _settings(HA_UNIT.read_text(encoding="utf-8"))
    start = " ".join(HA_UNIT.read_text(encoding="utf-8").split("ExecStart=", 1)[1].split("\\\n"))
    assert "--auto-compaction-mode revision --auto-compaction-retention 10000" in " ".join(start.split())
    assert s["Restart"] == ["on-failure"] and s["EnvironmentFile"] == ["/etc/lmgrd/etcd.env"]
    cfg = build_config(load_config_file(HA_CONFIG), {}, str(HA_CONFIG))
    assert cfg.store == "etcd" and len(cfg.etcd_endpoints) == 3
    if shutil.which("systemd-analyze") and shutil.which("etcd"):
        unit = tmp_path / "lmgrd-etcd.service"
        unit.write_text(HA_UNIT.read_text(encoding="utf-8").replace("/usr/bin/etcd", shutil.which("etcd") or ""))
        r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
        problems = [ln for ln in (r.stdout + r.stderr).splitlines() if "lmgrd-etcd.service" in ln]
        assert r.returncode == 0 and problems == [], r.stdout + r.stderr
