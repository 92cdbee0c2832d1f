"""The import rule, read from every module's syntax tree (``ast``: every import statement anywhere in the
file, inside functions and ``if TYPE_CHECKING:`` blocks too, so not even a type-only back-edge slips by).

- ``lmgrd`` and ``client_stub`` never import each other.
- Inside ``lmgrd``: core <- storage <- daemon <- admin / monitoring <- the CLIs (``cli``, ``lmutil``,
  ``report``, ``vendor``). A module imports only its own layer or lower ones; ``admin`` never imports
  ``monitoring`` (monitoring may use admin's registry); nothing outside ``lmgrd.vendor`` imports it.
- The vendor's activation service (``lmgrd.vendor.lmcloud``) imports ``protocol``, ``lmgrd.storage`` and the rest of
  ``lmgrd.vendor``, never the daemon's modules (``DAEMON_SIDE``): it runs on the vendor's machine, not a license server.

``protocol``'s own rule (pure, and importing neither end) is ``tests/unit/protocol/test_purity.py``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: The rank of each lmgrd layer: a module may import modules of the same or a lower rank only.
LAYERS: dict[str, int] = {
    "lmgrd": 0,  # the package root: __version__, LmgrdError
    "lmgrd.config": 0,  # the validated, frozen daemon config (a data object every layer reads)
    "lmgrd.core": 0,
    "lmgrd.storage": 1,
    "lmgrd.daemon": 2,
    "lmgrd.admin": 3,
    "lmgrd.monitoring": 3,
    "lmgrd.cli": 4,
    "lmgrd.__main__": 4,
    "lmgrd.lmutil": 4,
    "lmgrd.lmstat_text": 4,  # lmutil's FlexNet lmstat text (pure formatting; imports only the standard library)
    "lmgrd.i18n": 4,  # lmutil's gettext catalog (standard library only; the daemon never translates)
    "lmgrd.report": 4,
    "lmgrd.cloudcheck": 4,  # lmutil cloud-check's diagnosis (uses the daemon's HTTP settings)
    "lmgrd.vendor": 4,
}

#: What the activation service may not import: the license server's own modules.
DAEMON_SIDE = ("lmgrd.daemon", "lmgrd.admin", "lmgrd.monitoring", "lmgrd.cli", "lmgrd.lmutil", "lmgrd.config",
               "lmgrd.core")


@dataclass(frozen=True)
class Edge:
    module: str  # the importing module, dotted
    imported: str  # what it imports, dotted (absolute)
    line: int

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.imported}"


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> Iterator[Edge]:
    """Every import in ``path`` as an absolute dotted name (``from a import b`` yields ``a.b`` too)."""
    mod = module_name(path, root)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Edge(mod, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(p for p in [*base_parts, node.module or ""] if p)
            else:
                base = node.module or ""
            yield Edge(mod, base, node.lineno)
            for alias in node.names:
                yield Edge(mod, f"{base}.{alias.name}", node.lineno)


def layer_of(name: str) -> str | None:
    if name in ("lmgrd", "lmgrd.LmgrdError", "lmgrd.__version__"):
        return "lmgrd"
    best = None
    for layer in LAYERS:
        if layer != "lmgrd" and (name == layer or name.startswith(layer + ".")) and (
                best is None or len(layer) > len(best)):
            best = layer
    return best


def violations(root: Path) -> list[str]:
    """Every forbidden edge under ``root`` (a tree with protocol/, lmgrd/ and client_stub/)."""
    found: list[str] = []
    for top in ("lmgrd", "client_stub"):
        for path in sorted((root / top).rglob("*.py")):
            for e in imports_of(path, root):
                imp_top = e.imported.split(".")[0]
                if top == "client_stub" and imp_top == "lmgrd":
                    found.append(f"{e}: client_stub and lmgrd meet only on the wire")
                elif top == "lmgrd":
                    if imp_top == "client_stub":
                        found.append(f"{e}: lmgrd and client_stub meet only on the wire")
                        continue
                    if imp_top != "lmgrd":
                        continue
                    src, dst = layer_of(e.module), layer_of(e.imported)
                    if src is None or dst is None:
                        found.append(f"{e}: module not in any layer (add it to LAYERS in tests/unit/test_layers.py)")
                        continue
                    if LAYERS[dst] > LAYERS[src]:
                        found.append(f"{e}: {src} (layer {LAYERS[src]}) may not import {dst} (layer {LAYERS[dst]})")
                    elif src == "lmgrd.admin" and dst == "lmgrd.monitoring":
                        found.append(f"{e}: admin may not import monitoring")
                    elif dst == "lmgrd.vendor" and src != "lmgrd.vendor":
                        found.append(f"{e}: only the vendor's tools import lmgrd.vendor")
                    elif e.module.startswith("lmgrd.vendor.lmcloud") and any(
                            e.imported == d or e.imported.startswith(d + ".") for d in DAEMON_SIDE):
                        found.append(f"{e}: the activation service never imports the daemon's modules")
    return found


def test_the_code_keeps_the_import_rule() -> None:
    problems = violations(ROOT)
    assert not problems, "forbidden imports:\n" + "\n".join(problems)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for top in ("protocol", "lmgrd", "client_stub"):
        (tmp_path / top).mkdir(exist_ok=True)
        (tmp_path / top / "__init__.py").touch()
    return tmp_path


@pytest.mark.parametrize(("rel", "text", "expect"), [
    ("lmgrd/core/ledger.py", "from lmgrd.daemon.server import Server\n", "lmgrd.core (layer 0) may not import"),
    ("lmgrd/core/ledger.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
     "    from lmgrd.storage.journal import X\n", "may not import lmgrd.storage"),
    ("lmgrd/daemon/server.py", "def f():\n    import lmgrd.monitoring.metrics\n", "lmgrd.daemon (layer 2)"),
    ("lmgrd/daemon/server.py", "from ..admin import commands\n", "may not import lmgrd.admin"),
    ("lmgrd/admin/commands.py", "from lmgrd.monitoring import metrics\n", "admin may not import monitoring"),
    ("lmgrd/cli.py", "from lmgrd.vendor import demo\n", "only the vendor's tools"),
    ("lmgrd/monitoring/http.py", "import client_stub.aio\n", "meet only on the wire"),
    ("client_stub/aio.py", "from lmgrd.core.ledger import Ledger\n", "meet only on the wire"),
    ("lmgrd/newthing.py", "from lmgrd.core import ledger\n", "not in any layer"),
    ("lmgrd/vendor/lmcloud/app.py", "from lmgrd.daemon.server import Server\n", "never imports the daemon"),
])
def test_a_forbidden_import_is_caught(tmp_path: Path, rel: str, text: str, expect: str) -> None:
    root = _tree(tmp_path, {rel: text})
    problems = violations(root)
    assert any(expect in p for p in problems), problems


def test_allowed_imports_pass(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "lmgrd/daemon/server.py": "from lmgrd.core.ledger import Ledger\nfrom lmgrd.storage import journal\n",
        "lmgrd/monitoring/http.py": "from lmgrd.admin import commands\nfrom lmgrd.daemon.api import DaemonView\n",
        "lmgrd/vendor/demo.py": "from lmgrd.cli import main\n",
        "client_stub/aio.py": "from protocol import Hello\n",
    })
    assert violations(root) == []
