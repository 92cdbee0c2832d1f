"""The benchmark scripts still run and still check what they report (``make bench`` itself is not part of
``make test``): a tiny ``benchmarks/run.py bench`` against the real daemon and both ceilings, and the
in-process hot-path meter. Correctness only (exact seat counts, no client errors, every checkin released);
nothing here looks at time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_smoke_counts_are_exact_for_lmgrd_and_the_ceiling(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "bench", "--quick", "--no-netns", "--only", "burst,churn",
         "--targets", "lmgrd,ceiling", "--clients", "60", "--seats", "48", "--burst-runs", "2", "--churn-connections",
         "5", "--duration", "0.3", "--warmup", "0.1", "--json", str(out)],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bench = json.loads(out.read_text())["bench"]
    for target in ("lmgrd", "ceiling"):
        assert len(bench["burst"][target]) == 2  # --burst-runs, alternating the targets
        for burst in bench["burst"][target]:
            assert (burst["granted"], burst["no_seats"], burst["other"]) == (48, 12, 0), (target, burst["outcomes"])
        (churn,) = bench["churn_5"][target]
        # load.py fails a client on any unexpected reply, including a checkin that releases nothing
        assert churn["ok"] and not churn["errors"], (target, churn.get("errors"))
        # a cycle whose checkout went out before the window opened counts one request in it
        assert churn["cycles"] > 0 and churn["requests"] >= 2 * churn["cycles"] - 5, (target, churn)
    assert (tmp_path / "results.png").exists()  # the chart is written next to --json, never into benchmarks/

    # A later run of one scenario keeps the others' records, each with the run that measured it.
    again = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "bench", "--quick", "--no-netns", "--only", "churn",
         "--targets", "lmgrd", "--churn-connections", "3", "--duration", "0.2", "--warmup", "0.1", "--json",
         str(out)], capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    after = json.loads(out.read_text())["bench"]
    assert after["burst"] == bench["burst"] and after["churn_5"] == bench["churn_5"]
    assert set(after["churn_3"]) == {"lmgrd"}
    assert after["carried"] == {"burst": bench["meta"], "churn_5": bench["meta"]}
    assert after["meta"]["command"].endswith("--json " + str(out)) and "--only churn" in after["meta"]["command"]


def test_hotpath_meter_runs_the_real_handlers(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "hotpath.py"), "--connections", "5", "--rounds", "3", "--repeat",
         "1", "--held", "200", "--products", "3"],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    # it exits non-zero when the fill does not hold every lease or a checkin releases nothing
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lmgrd CPU per request" in proc.stdout
