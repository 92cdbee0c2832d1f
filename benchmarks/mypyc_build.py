"""Compile the request hot path with mypyc, in place, for measurement only (benchmarks/NOTES.md, "Compiling
the hot path with mypyc"). Not a supported build: the measured gain was below the 20 % that would justify one.

    .venv/bin/pip install -q 'setuptools>=77' wheel   # the venv's own setuptools 65 refuses pyproject.toml
    .venv/bin/python benchmarks/mypyc_build.py          # about 1 min; writes *.so beside the .py files
    .venv/bin/python benchmarks/mypyc_build.py --clean  # removes them (they shadow the .py files)

protocol/messages.py, protocol/connection.py and lmgrd/daemon/events.py are left out: mypyc refuses or
miscompiles them as written (see the notes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODULES = [
    "protocol/framing.py",
    "protocol/errors.py",
    "protocol/validation.py",
    "lmgrd/daemon/transport.py",
    "lmgrd/daemon/session.py",
    "lmgrd/daemon/leases.py",
    "lmgrd/daemon/outbox.py",
    "lmgrd/core/ledger.py",
    "lmgrd/core/licensing.py",
    "lmgrd/storage/journal.py",
    "lmgrd/monitoring/metrics.py",
]


def clean() -> None:
    for so in [*ROOT.glob("*__mypyc*.so"), *ROOT.glob("protocol/**/*.so"), *ROOT.glob("lmgrd/**/*.so")]:
        so.unlink()
    shutil.rmtree(ROOT / "build", ignore_errors=True)


def build(modules: list[str]) -> None:
    from mypyc.build import mypycify  # mypy (the dev extra) ships mypyc
    from setuptools import setup

    setup(name="lmgrd-mypyc-experiment", ext_modules=mypycify(modules, opt_level="3"),
          script_args=["build_ext", "--inplace"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clean", action="store_true", help="remove the compiled modules and build/")
    ap.add_argument("modules", nargs="*", help=f"the modules to compile (default: {' '.join(MODULES)})")
    ns = ap.parse_args()
    clean()
    if not ns.clean:
        sys.path.insert(0, str(ROOT))
        os.chdir(ROOT)
        build(ns.modules or MODULES)


if __name__ == "__main__":
    main()
