"""Deeply nested YAML and JSON in the files lmgrd and its tools read: a clear error naming the file, never a
``RecursionError`` traceback (issue 9). The real console scripts and real files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from harness import write_license

from client_stub.address import _from_config
from client_stub.errors import LicenseError
from lmgrd.config import ConfigInvalid, load_config_file
from lmgrd.core.documents import JSONTooDeep, load_json, load_yaml
from lmgrd.storage.activations import ACTIVATIONS_FILE, _read
from protocol import ErrorCode
from protocol.validation import MAX_NESTING_DEPTH

BIN = Path(sys.executable).parent
Vendor = tuple[Ed25519PrivateKey, Path]


def run(tool: str, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LMGRD_RUNTIME_DIR": str(cwd / "run")}
    return subprocess.run([str(BIN / tool), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)


def block_nested(key: str, depth: int) -> str:
    """``key:`` followed by ``depth`` block mappings, one inside the other (the outside tester's config)."""
    return f"{key}:\n" + "".join("  " * (i + 1) + "a:\n" for i in range(depth))


DEEP_YAML = {
    "block-policy-5000": block_nested("policy", 5000),
    "flow-5000": "policy: " + "[" * 5000 + "]" * 5000 + "\n",
    "flow-unclosed-100000": "groups: " + "{a: " * 100_000 + "\n",
}


@pytest.mark.parametrize("text", DEEP_YAML.values(), ids=DEEP_YAML.keys())
def test_lmgrd_check_names_the_config_file_and_the_line(tmp_path: Path, vendor: Vendor, text: str) -> None:
    key, pub = vendor
    lic = tmp_path / "site.lic"
    write_license(lic, key, (("CADPRO", "2.1", 3),))
    cfg = tmp_path / "lmgrd.yaml"
    cfg.write_text(f"licenses: [{lic}]\nvendor_key: {pub}\n" + text, encoding="utf-8")
    r = run("lmgrd", "--check", "-c", cfg, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "RecursionError" not in r.stderr, r.stderr[-2000:]
    assert str(cfg) in r.stderr and f"more than {MAX_NESTING_DEPTH} levels deep" in r.stderr, r.stderr[-2000:]
    assert "line 3" in r.stderr or "line 4" in r.stderr, r.stderr[-2000:]  # the line the limit was passed on


def test_lmissue_names_the_request_file(tmp_path: Path) -> None:
    req = tmp_path / "request.yaml"
    req.write_text("license_type: multi\ncustomer: Example\nproducts: " + "[" * 5000 + "]" * 5000 + "\n",
                   encoding="utf-8")
    r = run("lmissue", "issue", req, "--key", tmp_path / "none.key", "--out", tmp_path / "x.lic", cwd=tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert str(req) in r.stderr and "levels deep" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "x.lic").exists()


def test_nesting_up_to_the_limit_is_read(tmp_path: Path) -> None:
    # MAX_NESTING_DEPTH levels in all: the top mapping and 31 more.
    assert load_yaml("x: " + "[" * (MAX_NESTING_DEPTH - 1) + "]" * (MAX_NESTING_DEPTH - 1)) is not None
    with pytest.raises(Exception, match="levels deep"):
        load_yaml("x: " + "[" * MAX_NESTING_DEPTH + "]" * MAX_NESTING_DEPTH)
    assert load_json("[" * MAX_NESTING_DEPTH + "]" * MAX_NESTING_DEPTH) is not None
    with pytest.raises(JSONTooDeep):
        load_json("[" * (MAX_NESTING_DEPTH + 1) + "]" * (MAX_NESTING_DEPTH + 1))


def test_config_file_problem_names_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "deep.yaml"
    cfg.write_text(block_nested("policy", 5000), encoding="utf-8")
    with pytest.raises(ConfigInvalid) as caught:
        load_config_file(cfg)
    assert str(cfg) in str(caught.value) and "levels deep" in str(caught.value)


@pytest.mark.parametrize("doc", ["[" * 100_000 + "]" * 100_000, '{"activations": ' + "[" * 50 + "]" * 50 + "}"],
                         ids=["100000", "50"])
def test_deep_activation_records_are_a_problem_not_a_crash(tmp_path: Path, doc: str) -> None:
    path = tmp_path / ACTIVATIONS_FILE
    path.write_text(doc, encoding="utf-8")
    records, _raw, problems = _read(path)
    assert records == {} and len(problems) == 1 and str(path) in problems[0] and "levels deep" in problems[0]


def test_deep_client_config_is_client_config_invalid(tmp_path: Path) -> None:
    path = tmp_path / "client.yaml"
    path.write_text("servers: " + "[" * 5000 + "]" * 5000 + "\n", encoding="utf-8")
    with pytest.raises(LicenseError) as caught:
        _from_config(path)
    assert caught.value.code is ErrorCode.CLIENT_CONFIG_INVALID and str(path) in str(caught.value)


# Found by make fuzz: PyYAML raises a plain ValueError (not a YAMLError) for a scalar that looks like a date but is
# none, and for an integer past Python's 4,300-digit limit; lmissue and lmgrd --check ended in a traceback.
@pytest.mark.parametrize("value", ["2099-12-62", "9" * 5000], ids=["bad-date", "huge-int"])
def test_a_value_yaml_cannot_hold_names_the_file_and_line(tmp_path: Path, value: str) -> None:
    cfg = tmp_path / "lmgrd.yaml"
    cfg.write_text(f"port: 27000\nnote: {value}\n", encoding="utf-8")
    r = run("lmgrd", "--check", "-c", cfg, cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert str(cfg) in r.stderr and "cannot read this value" in r.stderr and "line 2" in r.stderr, r.stderr[-2000:]
    req = tmp_path / "request.yaml"
    req.write_text(f"license_type: multi\ncustomer: Example\nexpires: {value}\n", encoding="utf-8")
    r = run("lmissue", "issue", req, "--key", tmp_path / "none.key", "--out", tmp_path / "x.lic", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert str(req) in r.stderr and "line 3" in r.stderr, r.stderr[-2000:]
