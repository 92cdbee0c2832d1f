"""protocol/ stays pure: it imports only the standard library's pure modules, msgpack and cryptography.

No sockets, asyncio, threads, files, environment, clock reads or psutil, and neither ``lmgrd`` nor
``client_stub``: both ends use it, so it may depend on neither. Read with ``ast``, not grep, so an import
inside a function or a ``TYPE_CHECKING`` block counts too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PROTOCOL = Path(__file__).resolve().parents[3] / "protocol"
THIRD_PARTY = {"msgpack", "cryptography"}
#: Standard-library modules that do I/O, read the clock or the environment, or run concurrently.
IMPURE_STDLIB = {
    "asyncio", "contextvars", "ctypes", "fcntl", "glob", "io", "logging", "mmap", "multiprocessing", "os",
    "pathlib", "platform", "random", "secrets", "select", "selectors", "shutil", "signal", "socket",
    "socketserver", "ssl", "subprocess", "sys", "tempfile", "threading", "time", "urllib", "uuid", "winreg",
}
#: Calls that read a file or the clock even without an import of their own.
IMPURE_CALLS = {"open", "now", "utcnow", "today", "getenv", "fromtimestamp"}
#: A developer script that regenerates the checked-in vectors; neither end imports it.
EXEMPT = {"make_vectors.py"}


def problems(source: str) -> list[str]:
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top in ("protocol", "__future__"):
                continue
            if top in ("lmgrd", "client_stub"):
                found.append(f"imports {name}: protocol may import neither end")
            elif top in IMPURE_STDLIB or (top not in sys.stdlib_module_names and top not in THIRD_PARTY):
                found.append(f"imports {name}")
        if isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if called in IMPURE_CALLS:
                found.append(f"calls {called}() on line {node.lineno}")
        if isinstance(node, ast.Attribute) and node.attr == "environ":
            found.append(f"reads environ on line {node.lineno}")
    return found


@pytest.mark.parametrize("path", sorted(p for p in PROTOCOL.glob("*.py") if p.name not in EXEMPT),
                         ids=lambda p: p.name)
def test_protocol_module_is_pure(path: Path) -> None:
    assert problems(path.read_text(encoding="utf-8")) == [], path.name


@pytest.mark.parametrize("source", [
    "import psutil",
    "from lmgrd.core import ledger",
    "def f():\n    import client_stub\n",
    "from pathlib import Path",
    "import os",
    "from datetime import datetime\nx = datetime.now()",
    "data = open('/etc/machine-id').read()",
    "import time",
    "import socket",
    "import yaml",
])
def test_the_checker_catches_what_it_forbids(source: str) -> None:
    assert problems(source), source
