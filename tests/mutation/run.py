"""Mutation testing of the core paths: run mutmut, score each module, list the survivors.

``make mutation`` runs this (it is not part of ``make test``). The modules are ``only_mutate`` in
``[tool.mutmut]`` of pyproject.toml: adding a module is one line there. mutmut copies ``lmgrd/`` and
``protocol/`` into ``mutants/``, records which unit tests (``tests/unit/lmgrd``, ``tests/unit/protocol``)
execute each function, then for every mutant forks a warm pytest that runs only those tests, with the
hypothesis ``mutation`` profile of ``tests/mutation/plugin.py``.

Score: killed / total per module, where *killed* counts mutants a test failed on (or that timed out)
and *total* every mutant generated, so a mutant no test reaches counts against the score. Lines that
``do_not_mutate_patterns`` excludes (log calls) produce no mutants. Exit status 1 when a module scores
below ``--threshold`` (85 %), 2 when mutmut itself failed.

Usage::

    python tests/mutation/run.py                 # fresh run (deletes mutants/), 2 workers
    python tests/mutation/run.py --keep          # reuse mutants/: only new or changed mutants run
    python tests/mutation/run.py --rerun-survivors   # run again only what survived last time
    python tests/mutation/run.py --report        # print the last run's scores, run nothing
    python tests/mutation/run.py --keep --module lmgrd/core/ledger.py   # run (and score) one module only

``--module`` (repeatable, a path from ``only_mutate``) runs only that module's mutants, again every time:
mutmut still copies and traces every module, and the report scores only the modules named. Use it with
``--keep`` to score the modules one after another into the same mutants/.

Environment: ``MUTATION_WORKERS`` (default 2), ``MUTATION_MAX_EXAMPLES`` (hypothesis cap, default 25).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MUTANTS = ROOT / "mutants"
LOG = MUTANTS / "mutmut-run.log"
SURVIVORS = MUTANTS / "survivors.txt"
#: Survivors reviewed and explained: ``mutant-name  reason`` per line. mutmut numbers mutants per function,
#: so an edit to a function renumbers its mutants: review the list again after changing a module.
EXPLAINED = Path(__file__).with_name("survivors.txt")

# mutmut's exit-code vocabulary (mutmut/stats.py): 1 and 3 a failing test, 36/24/-24/152/255 a timeout
# (SIGXCPU), 37 rejected by the type checker; 0 survived; 5/33 no test ran it; None never run.
KILLED = {1, 3, 36, 24, -24, 152, 255, 37}
SURVIVED = {0}
NO_TESTS = {5, 33}


@dataclass
class Score:
    module: str
    killed: int = 0
    survived: list[str] = field(default_factory=list)
    no_tests: list[str] = field(default_factory=list)
    other: list[tuple[str, object]] = field(default_factory=list)  # not run, suspicious, segfault...

    @property
    def total(self) -> int:
        return self.killed + len(self.survived) + len(self.no_tests) + len(self.other)

    @property
    def percent(self) -> float:
        return 100.0 * self.killed / self.total if self.total else 0.0


def modules() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["tool"]["mutmut"]
    return list(config["only_mutate"])


def mutant_glob(module: str) -> str:
    """mutmut's name pattern for every mutant of one module: ``lmgrd/core/ledger.py`` -> ``lmgrd.core.ledger.*``."""
    return module.removesuffix(".py").replace("/", ".") + ".*"


def score(module: str) -> Score:
    meta = MUTANTS / (module + ".meta")
    s = Score(module)
    if not meta.exists():
        return s
    for name, code in json.loads(meta.read_text("utf-8"))["exit_code_by_key"].items():
        if code in KILLED:
            s.killed += 1
        elif code in SURVIVED:
            s.survived.append(name)
        elif code in NO_TESTS:
            s.no_tests.append(name)
        else:
            s.other.append((name, code))
    return s


def mutmut(args: list[str], env: dict[str, str]) -> int:
    exe = Path(sys.executable).with_name("mutmut")
    MUTANTS.mkdir(exist_ok=True)
    with LOG.open("ab") as log:
        return subprocess.call([str(exe), *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def explained() -> dict[str, str]:
    out: dict[str, str] = {}
    if EXPLAINED.exists():
        for line in EXPLAINED.read_text("utf-8").splitlines():
            if line.strip() and not line.startswith("#"):
                name, _, reason = line.partition("  ")
                out[name.strip()] = reason.strip()
    return out


def diff_lines(names: list[str]) -> dict[str, list[str]]:
    """The changed lines of each mutant (``-`` original, ``+`` mutant), read from mutants/."""
    os.chdir(ROOT)
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    out: dict[str, list[str]] = {}
    for name in names:
        try:
            diff = get_diff_for_mutant(name)
        except Exception as exc:  # a report must not die on one unreadable mutant
            out[name] = [f"(no diff: {exc})"]
            continue
        out[name] = [
            line for line in diff.splitlines()
            if line[:1] in "+-" and not line.startswith(("+++", "---"))
        ]  # fmt: skip
    return out


def report(threshold: float, only: list[str] | None = None) -> int:
    scores = [score(m) for m in (only or modules())]
    width = max(len(s.module) for s in scores)
    print()
    print(f"{'module':<{width}}  killed / total   score  survived  no tests  other")
    for s in scores:
        print(f"{s.module:<{width}}  {s.killed:>6} / {s.total:<5}  {s.percent:5.1f}%  {len(s.survived):>8}  "
              f"{len(s.no_tests):>8}  {len(s.other):>5}")
    killed = sum(s.killed for s in scores)
    total = sum(s.total for s in scores)
    print(f"{'overall':<{width}}  {killed:>6} / {total:<5}  {100.0 * killed / total if total else 0.0:5.1f}%")

    losers = [name for s in scores for name in (*s.survived, *s.no_tests)]
    diffs = diff_lines(losers)
    reasons = explained()
    lines: list[str] = []
    unexplained = 0
    for s in scores:
        for kind, names in (("survived", s.survived), ("no tests", s.no_tests)):
            for name in names:
                lines.append(f"{kind:8}  {name}")
                lines.extend(f"          {d}" for d in diffs.get(name, []))
                if name in reasons:
                    lines.append(f"          why: {reasons[name]}")
                else:
                    unexplained += 1
                    lines.append(f"          why: NOT EXPLAINED in {EXPLAINED.relative_to(ROOT)}")
        for name, code in s.other:
            lines.append(f"{'other':8}  {name} (mutmut exit code {code})")
    SURVIVORS.write_text("\n".join(lines) + "\n", "utf-8")
    if lines:
        print()
        print(f"Not killed: {len(losers) + sum(len(s.other) for s in scores)}; "
              f"`.venv/bin/mutmut show NAME` prints a full diff. Also in {SURVIVORS.relative_to(ROOT)}:")
        print("\n".join(lines))

    failed = [s for s in scores if s.total == 0 or s.percent < threshold]
    print()
    if unexplained:
        print(f"{unexplained} of the mutants not killed are not explained in {EXPLAINED.relative_to(ROOT)}")
    if failed:
        for s in failed:
            why = "no mutants were generated or run" if s.total == 0 else f"{s.percent:.1f}% < {threshold:g}%"
            print(f"FAIL {s.module}: {why}")
        return 1
    print(f"OK: every module at or above {threshold:g}% killed")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=int(os.environ.get("MUTATION_WORKERS", "2")))
    ap.add_argument("--threshold", type=float, default=85.0, help="minimum %% killed per module (85)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--keep", action="store_true", help="reuse mutants/ and its results")
    mode.add_argument("--rerun-survivors", action="store_true", help="run again the mutants not killed last time")
    mode.add_argument("--report", action="store_true", help="only print the last run's scores")
    ap.add_argument("--module", action="append", default=[], metavar="PATH",
                    help="run and score only this module of only_mutate (repeatable)")
    args = ap.parse_args(argv)
    unknown = [m for m in args.module if m not in modules()]
    if unknown:
        ap.error(f"--module {', '.join(unknown)} is not in only_mutate of pyproject.toml ({', '.join(modules())}): "
                 "name one of those, or add the module there")
    chosen: list[str] = args.module or modules()

    if not args.report:
        env = dict(os.environ)
        env.setdefault("HYPOTHESIS_PROFILE", "mutation")
        names: list[str] = []
        if args.rerun_survivors:
            names = [n for m in chosen for n in (*score(m).survived, *score(m).no_tests)]
            if not names:
                print("nothing survived the last run")
                return report(args.threshold, chosen)
        elif args.module:
            names = [mutant_glob(m) for m in chosen]
        if not args.keep and not args.rerun_survivors and MUTANTS.exists():
            shutil.rmtree(MUTANTS)
        started = time.monotonic()
        print(f"mutmut run --max-children {args.workers} on {', '.join(chosen)} (log: {LOG.relative_to(ROOT)})",
              flush=True)
        rc = mutmut(["run", "--max-children", str(args.workers), *names], env)
        print(f"mutmut finished in {time.monotonic() - started:.0f} s (exit status {rc})")
        if rc != 0:
            print(LOG.read_text("utf-8", "replace")[-3000:])
            return 2
    return report(args.threshold, chosen)


if __name__ == "__main__":
    sys.exit(main())
