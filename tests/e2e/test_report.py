"""``lmutil report`` on a synthetic usage log whose figures were worked out by hand, run as an operator runs it
(no daemon, no -c, no token): text, --json, --since/--until, --product, rotated and .gz files, and --plot, with
the ``report`` extra (matplotlib) and, with matplotlib hidden from the interpreter, without it.

The log (hours after 2024-04-01T00:00Z), pool CID-A/CADPRO with 3 seats:
    0 alice out (1 in use)   1 bob out (2)   2 carol out (3)   2.5 dave denied NO_SEATS
    3 alice in (2)           4 bob expires (1)                 10 carol in (0)
and CID-A/VIEWER with 5 seats: 12 eve out (1), 20 eve in (0). The period is 0 .. 20 h.

CADPRO seats in use: 1 for 1 h, 2 for 1 h, 3 for 1 h, 2 for 1 h, 1 for 6 h, 0 for 10 h. So time at each level:
0: 10 h, 1: 7 h, 2: 2 h, 3: 1 h (20 h). Peak 3. 95 % of 20 h is 19 h; cumulated 10, 17, 19 h: the 95th
percentile is 2. At the limit (3 of 3): 1 h. Seat-hours: carol 8 (2..10), alice 3 (0..3), bob 3 (1..4).
VIEWER: 0 for 12 h, 1 for 8 h; peak 1, 95th percentile 1 (12 h < 19 h), never at the limit.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import struct
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

T0 = datetime(2024, 4, 1, tzinfo=UTC).timestamp()
H = 3600.0


def ev(hours: float, event: str, user: str, product: str = "CADPRO", **kw: Any) -> dict[str, Any]:
    t = T0 + hours * H
    return {"ts": datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z"), "epoch": t, "event": event,
            "customer_id": "CID-A", "product": product, "version": "2.1", "user": user, "host": "pc-" + user, **kw}


EVENTS = [
    ev(0, "checkout", "alice", lease="a1", count=3, in_use=1),
    ev(1, "checkout", "bob", lease="b1", count=3, in_use=2),
    ev(2, "checkout", "carol", lease="c1", count=3, in_use=3),
    ev(2.5, "denial", "dave", reason="NO_SEATS"),
    ev(3, "checkin", "alice", lease="a1", in_use=2, held_s=3 * H),
    ev(4, "expiry", "bob", lease="b1", in_use=1, held_s=3 * H),
    ev(10, "checkin", "carol", lease="c1", in_use=0, held_s=8 * H),
    ev(12, "checkout", "eve", "VIEWER", lease="e1", count=5, in_use=1),
    ev(20, "checkin", "eve", "VIEWER", lease="e1", in_use=0, held_s=8 * H),
]


def write_log(path: Path, events: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    return path


def report(*args: str) -> subprocess.CompletedProcess[str]:
    # No -c and no token: report reads files only (a daemon is not running anywhere in this test).
    return subprocess.run([sys.executable, "-m", "lmgrd.lmutil", "report", *args], capture_output=True, text=True,
                          timeout=120)


def products(r: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    assert r.returncode == 0, r.stderr
    return {p["product"]: p for p in json.loads(r.stdout)["products"]}


def test_figures_match_the_hand_computed_ones(tmp_path: Path) -> None:
    log = write_log(tmp_path / "usage.log", EVENTS)
    r = report(str(log), "--json")
    data = json.loads(r.stdout)
    assert data["period"]["hours"] == 20 and data["period"]["start"] == "2024-04-01T00:00:00Z"
    p = products(r)
    cad = p["CADPRO"]
    assert (cad["customer_id"], cad["count"], cad["peak"], cad["p95"]) == ("CID-A", 3, 3, 2)
    assert cad["hours_at_limit"] == pytest.approx(1.0)
    assert cad["checkouts"] == 3 and cad["denials"] == {"NO_SEATS": 1}
    assert [(u["user"], u["seat_hours"], u["checkouts"]) for u in cad["top_users"]] == [
        ("carol", 8.0, 1), ("alice", 3.0, 1), ("bob", 3.0, 1)]
    assert cad["recommendation"] == "peak 3 of 3, at the limit 1.0 h, 1 NO_SEATS denials: consider buying more seats"
    view = p["VIEWER"]
    assert (view["count"], view["peak"], view["p95"], view["hours_at_limit"], view["checkouts"]) == (5, 1, 1, 0, 1)
    assert view["recommendation"] == "95th percentile 1 of 5: 4 seats unused most of the time"


def test_text_output(tmp_path: Path) -> None:
    log = write_log(tmp_path / "usage.log", EVENTS)
    r = report(str(log))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Usage report 2024-04-01T00:00:00Z .. 2024-04-01T20:00:00Z (20.0 h) from 1 file(s), 9 event(s)" in out
    assert "CADPRO (customer CID-A): 3 seats" in out
    assert "  peak 3, 95th percentile 2, at the limit 1.0 h (5.0 % of the period)" in out
    assert "  checkouts 3; denials: NO_SEATS 1" in out
    assert "  top users (seat-hours): carol 8.0 h, alice 3.0 h, bob 3.0 h" in out
    assert "  -> peak 3 of 3, at the limit 1.0 h, 1 NO_SEATS denials: consider buying more seats" in out
    assert "  -> 95th percentile 1 of 5: 4 seats unused most of the time" in out


def test_since_until_and_product(tmp_path: Path) -> None:
    log = write_log(tmp_path / "usage.log", EVENTS)
    # 02:00 .. 04:00: 3 in use for 1 h, then 2 for 1 h. The level at 02:00 comes from the lines before it.
    p = products(report(str(log), "--json", "--since", "2024-04-01T02:00", "--until", "2024-04-01T04:00Z"))
    assert set(p) == {"CADPRO"}  # VIEWER has no use in this window
    cad = p["CADPRO"]
    assert (cad["peak"], cad["p95"], cad["hours_at_limit"], cad["checkouts"]) == (3, 3, 1.0, 1)
    assert cad["denials"] == {"NO_SEATS": 1}
    assert [(u["user"], u["seat_hours"]) for u in cad["top_users"]] == [("bob", 2.0), ("carol", 2.0), ("alice", 1.0)]
    # A bare --until date includes that whole day: the period is 24 h.
    r = report(str(log), "--json", "--product", "VIEWER", "--until", "2024-04-01")
    data = json.loads(r.stdout)
    assert data["period"]["hours"] == 24 and [x["product"] for x in data["products"]] == ["VIEWER"]
    assert data["products"][0]["p95"] == 1  # 0 for 16 h, 1 for 8 h: 95 % of 24 h needs level 1


def test_shared_seat_counts_once_and_lines_without_in_use_count_leases(tmp_path: Path) -> None:
    events = [  # alice runs two processes on one PC (one shared seat); the log has no in_use or lease fields
        ev(0, "checkout", "alice", count=2),
        ev(1, "checkout", "alice", count=2),
        ev(2, "checkin", "alice"),
        ev(4, "checkin", "alice"),
    ]
    log = write_log(tmp_path / "old-format.log", [{k: v for k, v in e.items() if k != "in_use"} for e in events])
    cad = products(report(str(log), "--json"))["CADPRO"]
    # Counting leases: 1 for 1 h, 2 for 1 h, 1 for 2 h; the seat-hours are the union: 4 h, not 5.
    assert (cad["peak"], cad["p95"], cad["hours_at_limit"]) == (2, 2, 1.0)
    assert cad["top_users"] == [{"user": "alice", "seat_hours": 4.0, "checkouts": 2}]


def test_rotated_and_gzipped_files_read_together(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "usage.log.2.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(e) + "\n" for e in EVENTS[:3])
    write_log(tmp_path / "usage.log.1", EVENTS[3:6])
    (tmp_path / "usage.log").write_text("".join(json.dumps(e) + "\n" for e in EVENTS[6:]) + '{"torn line\n')
    r = report(str(tmp_path / "usage.log"), str(tmp_path / "usage.log.1"), str(tmp_path / "usage.log.2.gz"),
               "--json")
    data = json.loads(r.stdout)
    assert data["skipped_lines"] == 1
    whole = products(report(str(write_log(tmp_path / "whole.log", EVENTS)), "--json"))
    assert products(r) == whole


def test_bad_input_is_reported(tmp_path: Path) -> None:
    r = report(str(tmp_path / "missing.log"))
    assert r.returncode == 2 and "cannot read the usage log" in r.stderr and "missing.log" in r.stderr
    empty = tmp_path / "empty.log"
    empty.write_text("not json\n")
    r = report(str(empty))
    assert r.returncode == 1 and "no usage events" in r.stderr
    r = report(str(write_log(tmp_path / "u.log", EVENTS)), "--since", "yesterday")
    assert r.returncode == 2 and "cannot read the date 'yesterday'" in r.stderr


def test_plot_is_a_png(tmp_path: Path) -> None:
    log = write_log(tmp_path / "usage.log", EVENTS)
    png = tmp_path / "usage.png"
    r = report(str(log), "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert f"plot written to {png}" in r.stdout
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width == 1000 and height == 620  # 10 x 6.2 inches at 100 dpi: two panels
    assert len(data) > 20_000  # lines, labels and titles drawn, not an empty canvas


# Run lmutil as if the report extra were not installed: every finder on sys.meta_path is wrapped so that
# matplotlib is not found (find_spec answers None, ``import matplotlib`` raises ModuleNotFoundError), exactly as
# in a venv made with ``pip install lmgrd``. Everything else imports as usual.
HIDE_MATPLOTLIB = """
import sys

class Hidden:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find is not None else None

    def invalidate_caches(self):
        getattr(self.finder, "invalidate_caches", lambda: None)()

sys.meta_path[:] = [Hidden(f) for f in sys.meta_path]
"""


def without_matplotlib(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", HIDE_MATPLOTLIB + code, *args], capture_output=True, text=True,
                          timeout=120)


def report_without_matplotlib(*args: str) -> subprocess.CompletedProcess[str]:
    return without_matplotlib("from lmgrd.lmutil import main\nsys.exit(main(['report', *sys.argv[1:]]))", *args)


def test_matplotlib_is_really_hidden_by_the_helper() -> None:
    # The tests below would pass vacuously if the helper did not hide it: check that it does, and that it is
    # installed here otherwise (make's dev install has the report extra).
    r = without_matplotlib("import matplotlib")
    assert r.returncode == 1 and "ModuleNotFoundError: No module named 'matplotlib'" in r.stderr, r.stderr
    r = without_matplotlib("import importlib.util; sys.exit(importlib.util.find_spec('matplotlib') is not None)")
    assert r.returncode == 0, r.stderr
    assert subprocess.run([sys.executable, "-c", "import matplotlib"], timeout=120).returncode == 0


def test_plot_without_the_report_extra_names_it_and_does_nothing_else(tmp_path: Path) -> None:
    log = write_log(tmp_path / "usage.log", EVENTS)
    png = tmp_path / "usage.png"
    r = report_without_matplotlib(str(log), "--plot", str(png))
    assert r.returncode == 2, r.stdout + r.stderr  # lmutil's usage / bad-arguments code
    assert r.stderr == ("lmutil report: --plot needs matplotlib, which is not installed; install the report extra: "
                        "pip install 'lmgrd[report]'\n"), r.stderr
    assert r.stdout == "" and not png.exists()  # refused up front: no half-done report
    r = report_without_matplotlib(str(log), "--plot", str(png), "--json")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = json.loads(r.stdout)  # one JSON document, as for every other refusal
    assert err["error"] == "ERROR" and "pip install 'lmgrd[report]'" in err["message"]


def test_the_report_itself_needs_no_matplotlib(tmp_path: Path) -> None:
    log = write_log(tmp_path / "usage.log", EVENTS)
    r = report_without_matplotlib(str(log), "--json")
    assert r.returncode == 0, r.stderr
    assert {p["product"]: p["peak"] for p in json.loads(r.stdout)["products"]} == {"CADPRO": 3, "VIEWER": 1}
    # Nothing the daemon or lmutil imports pulls in the plotting stack (only write_plot imports it).
    r = without_matplotlib("import lmgrd.cli, lmgrd.lmutil, lmgrd.report, lmgrd.monitoring.http, "
                           "lmgrd.monitoring.usage\n"
                           "print(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'numpy', 'PIL'}))")
    assert r.returncode == 0 and r.stdout == "[]\n", r.stdout + r.stderr


def test_matplotlib_is_the_report_extra_not_a_dependency_of_the_daemon() -> None:
    requires = importlib.metadata.requires("lmgrd") or []
    base = [x for x in requires if "extra ==" not in x]
    assert base and not [x for x in base if x.lower().startswith(("matplotlib", "numpy"))], base
    assert 'matplotlib>=3.7; extra == "report"' in requires, requires
