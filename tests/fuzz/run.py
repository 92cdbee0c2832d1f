"""``make fuzz``: coverage-guided fuzzing (atheris, libFuzzer) of every target in tests/fuzz/targets.py.

Each target runs in its own process for its share of the inputs (``RUNS``: 1,000,000 in all, more for the
targets that run fast; ``--scale`` multiplies every share, ``--runs`` sets one count for all), starting from the
committed seed corpus (tests/fuzz/corpus/TARGET, read only) and keeping what it learns in a scratch corpus
(``--work``, default a temporary directory). A target that lets anything but the project's own error escape
stops its run: libFuzzer writes the input to ``--work``/TARGET/crash-*, this script prints the path and exits 1.
At the end a JSON summary: inputs and seconds per target and in all.

    .venv/bin/python tests/fuzz/run.py [--scale 1.0 | --runs N] [--targets frame_decoder,config_file] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

#: Inputs per target for ``make fuzz``: 1,000,000 in all, weighted by how fast each target runs instrumented (the
#: wire parsers take thousands a second, the YAML and options-file parsers hundreds).
RUNS = {
    "frame_decoder": 250_000,
    "server_connection": 250_000,
    "client_connection": 250_000,
    "license_file": 80_000,
    "revocation_file": 60_000,
    "config_file": 40_000,
    "registration_request": 30_000,
    "activation_records": 20_000,
    "options_file": 20_000,
}


def fuzz_one(name: str, runs: int, max_len: int, work: Path) -> None:
    """Run inside the child process: instrument the project and fuzz one target."""
    import atheris

    with atheris.instrument_imports(include=["protocol", "lmgrd"]):
        from tests.fuzz.targets import CORPUS, TARGETS
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    args = [sys.argv[0], f"-runs={runs}", f"-max_len={max_len}", "-timeout=20", "-rss_limit_mb=2048",
            f"-artifact_prefix={out}/", "-print_final_stats=1", str(out), str(CORPUS / name)]
    atheris.Setup(args, TARGETS[name])
    atheris.Fuzz()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, help="inputs per target (default: each target's share of 1,000,000)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every target's share (default 1)")
    p.add_argument("--targets", default="", help="comma-separated target names (default: all)")
    p.add_argument("--max-len", type=int, default=1500, help="largest input in bytes (default 1500)")
    p.add_argument("--work", type=Path, help="scratch corpus and crash files (default: a temporary directory)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    ns = p.parse_args()
    work = ns.work or Path(tempfile.mkdtemp(prefix="lmgrd-fuzz-"))
    if ns.one:
        fuzz_one(ns.one, ns.runs, ns.max_len, work)
        return 0
    from tests.fuzz.targets import TARGETS

    assert set(RUNS) == set(TARGETS), "RUNS must give every target its share"

    names = [n for n in ns.targets.split(",") if n] or list(TARGETS)
    summary: dict[str, dict[str, float]] = {}
    failed: list[str] = []
    start = time.monotonic()
    for name in names:
        t0 = time.monotonic()
        runs = ns.runs if ns.runs is not None else max(1, int(RUNS[name] * ns.scale))
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--runs", str(runs), "--max-len",
                               str(ns.max_len), "--work", str(work)], capture_output=True, text=True, cwd=REPO)
        took = time.monotonic() - t0
        log = proc.stderr + proc.stdout
        done = re.search(r"Done (\d+) runs in (\d+) second", log)
        execs = int(done.group(1)) if done else 0
        summary[name] = {"inputs": execs, "seconds": round(took, 1)}
        print(f"{name}: {execs} inputs in {took:.1f} s, exit {proc.returncode}", flush=True)
        if proc.returncode != 0 or not done:
            failed.append(name)
            crash = re.findall(r"Test unit written to (\S+)", log)
            print(log[-4000:], file=sys.stderr)
            print(f"{name}: FAILED; input: {', '.join(crash) or '(none written)'}", file=sys.stderr)
    total = sum(int(v["inputs"]) for v in summary.values())
    print(json.dumps({"targets": summary, "inputs": total, "seconds": round(time.monotonic() - start, 1),
                      "work": str(work), "failed": failed}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
