"""lmclient as a user runs it, against the real daemon: server list, ping, checkout, run, hostid, activate."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from harness import Daemon, RawClient, write_license

from client_stub.cli import EXIT_CONFIG, EXIT_DENIED, EXIT_LOST, EXIT_UNREACHABLE
from protocol import Checkout, Granted

PY = sys.executable


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A user's environment of its own: config and data directories in the test's tmp dir."""
    e = {k: v for k, v in os.environ.items() if k not in ("LM_LICENSE_SERVER", "LM_VENDOR_KEY")}
    e["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    e["XDG_DATA_HOME"] = str(tmp_path / "data")
    return e


def lmclient(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "client_stub.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def in_use(d: Daemon) -> int:
    r = subprocess.run([PY, "-m", "lmgrd.lmutil", "lmstat", "--json", "-c", d.address], capture_output=True,
                       text=True, timeout=30, env=d.env())
    assert r.returncode == 0, r.stderr
    n: int = json.loads(r.stdout)["pools"][0]["in_use"]
    return n


def wait_for(pred: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_set_server_then_show_names_the_file_and_the_environment_wins(env: dict[str, str]) -> None:
    r = lmclient(env, "set-server", "27000@licsrv01,27001@licsrv02")
    assert r.returncode == 0, r.stderr
    path = Path(env["XDG_CONFIG_HOME"]) / "lmgrd" / "client.yaml"
    assert str(path) in r.stdout and path.exists()
    r = lmclient(env, "show", "--json")
    data = json.loads(r.stdout)
    assert data["servers"] == ["27000@licsrv01", "27001@licsrv02"] and data["source"] == f"config file {path}"
    r = lmclient({**env, "LM_LICENSE_SERVER": "27005@other"}, "show")
    assert "27005@other" in r.stdout and "environment variable LM_LICENSE_SERVER" in r.stdout
    r = lmclient(env, "show", "-c", "27009@argued")
    assert "27009@argued" in r.stdout and "from: argument" in r.stdout
    bad = lmclient(env, "set-server", "27000@licsrv01,not a server")
    assert bad.returncode == EXIT_CONFIG and "CLIENT_CONFIG_INVALID" in bad.stderr
    assert "licsrv01" in path.read_text()  # the bad list did not replace the good one


def test_show_without_any_server_says_how_to_set_one(env: dict[str, str]) -> None:
    r = lmclient(env, "show")
    assert r.returncode == EXIT_CONFIG and "lmclient set-server" in r.stderr


def test_ping_reports_version_round_trip_and_host(daemon_factory: Callable[..., Daemon],
                                                   env: dict[str, str]) -> None:
    d = daemon_factory()
    lmclient(env, "set-server", d.address)
    r = lmclient(env, "ping")  # from the config file
    assert r.returncode == 0, r.stderr
    assert f"license server {d.address}: lmgrd " in r.stdout and "round trip: " in r.stdout
    assert f"this host: {socket.gethostname().split('.')[0].lower()}" in r.stdout.lower()


def test_ping_to_a_closed_port_fails_clearly(env: dict[str, str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = lmclient(env, "ping", "-c", f"{port}@127.0.0.1")
    assert r.returncode == EXIT_UNREACHABLE and "SERVER_UNAVAILABLE" in r.stderr


def test_checkout_prints_the_grant_and_frees_the_seat(daemon_factory: Callable[..., Daemon],
                                                      env: dict[str, str]) -> None:
    d = daemon_factory((("CADPRO", "2.1", 1),))
    r = lmclient(env, "checkout", "CADPRO", "--version", "2.1", "-c", d.address)
    assert r.returncode == 0, r.stderr
    assert "granted CADPRO 2.1 from license server" in r.stdout and "checked in" in r.stdout
    assert in_use(d) == 0
    r = lmclient(env, "checkout", "CADPRO", "--version", "9.0", "-c", d.address)
    assert r.returncode == EXIT_DENIED and "VERSION_NOT_PERMITTED" in r.stderr


def test_run_returns_the_childs_exit_code_and_frees_the_seat(daemon_factory: Callable[..., Daemon],
                                                             env: dict[str, str], tmp_path: Path) -> None:
    d = daemon_factory((("CADPRO", "2.1", 1),))
    marker = tmp_path / "held.txt"
    code = ("import json, subprocess, sys; "
            f"r = subprocess.run([sys.executable, '-m', 'lmgrd.lmutil', 'lmstat', '--json', '-c', '{d.address}'], "
            "capture_output=True, text=True); "
            f"open(r'{marker}', 'w').write(str(json.loads(r.stdout)['pools'][0]['in_use'])); sys.exit(7)")
    r = lmclient({**env, "LMGRD_RUNTIME_DIR": d.env()["LMGRD_RUNTIME_DIR"]}, "run", "CADPRO", "--version", "2.1",
                 "-c", d.address, "--", PY, "-c", code)
    assert r.returncode == 7, r.stderr
    assert marker.read_text() == "1"  # the seat was held while the command ran
    assert in_use(d) == 0


def test_run_without_a_seat_does_not_start_the_command(daemon_factory: Callable[..., Daemon],
                                                      env: dict[str, str], tmp_path: Path) -> None:
    d = daemon_factory((("CADPRO", "2.1", 1),))
    holder = RawClient(d.port)
    holder.hello(user="someone-else")
    assert isinstance(holder.request(Checkout(holder.id(), "CADPRO", "2.1", 0)), Granted)
    marker = tmp_path / "started"
    r = lmclient(env, "run", "CADPRO", "--version", "2.1", "-c", d.address, "--", PY, "-c",
                 f"open(r'{marker}', 'w').write('x')")
    assert r.returncode == EXIT_DENIED and "NO_SEATS" in r.stderr
    assert not marker.exists()


def _start_run(d: Daemon, env: dict[str, str], script: str, **kw: Any) -> subprocess.Popen[bytes]:
    kw.setdefault("stderr", subprocess.DEVNULL)
    return subprocess.Popen([PY, "-m", "client_stub.cli", "run", "CADPRO", "--version", "2.1", "-c", d.address,
                             "--", PY, "-c", script], env=env, stdout=subprocess.DEVNULL, **kw)


def _signal_script(signame: str, got: Path, ready: Path, code: int) -> str:
    """A child that reports readiness, then on ``signame`` writes the signal number to ``got`` and exits."""
    return ("import signal, sys, time\n"
            "def handler(signum, frame):\n"
            f"    open(r'{got}', 'w').write(str(signum)); sys.exit({code})\n"
            f"signal.signal(signal.{signame}, handler)\n"
            f"open(r'{ready}', 'w').write('ok')\n"
            "time.sleep(60)\n")


def test_run_forwards_sigterm_and_frees_the_seat(daemon_factory: Callable[..., Daemon], env: dict[str, str],
                                                 tmp_path: Path) -> None:
    d = daemon_factory((("CADPRO", "2.1", 1),))
    ready, got = tmp_path / "ready", tmp_path / "got-term"
    script = ("import signal, sys, time\n"
              "def term(signum, frame):\n"
              f"    open(r'{got}', 'w').write(str(signum)); sys.exit(42)\n"
              "signal.signal(signal.SIGTERM, term)\n"
              f"open(r'{ready}', 'w').write('ok')\n"
              "time.sleep(60)\n")
    proc = _start_run(d, env, script)
    try:
        wait_for(ready.exists)
        assert in_use(d) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 42
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert got.read_text() == str(int(signal.SIGTERM))
    assert in_use(d) == 0


def test_run_without_a_terminal_forwards_sigint(daemon_factory: Callable[..., Daemon], env: dict[str, str],
                                               tmp_path: Path) -> None:
    """Started in a session of its own (no controlling terminal, as under a service manager), a SIGINT sent to
    lmclient alone is meant for COMMAND: it is passed on, and lmclient exits with COMMAND's code."""
    d = daemon_factory((("CADPRO", "2.1", 1),))
    ready, got = tmp_path / "ready", tmp_path / "got-int"
    proc = _start_run(d, env, _signal_script("SIGINT", got, ready, 43), start_new_session=True)
    try:
        wait_for(ready.exists)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 43
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert got.read_text() == str(int(signal.SIGINT))
    assert in_use(d) == 0


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_run_on_a_terminal_ctrl_c_reaches_the_command_once(daemon_factory: Callable[..., Daemon],
                                                            env: dict[str, str], tmp_path: Path) -> None:
    """lmclient the foreground job of a terminal: Ctrl-C reaches COMMAND straight from the terminal, and lmclient
    does not pass it on a second time."""
    import pty
    import select

    d = daemon_factory((("CADPRO", "2.1", 1),))
    ready, count = tmp_path / "ready", tmp_path / "count"
    script = ("import signal, sys, time\n"
              "n = 0\n"
              "def handler(signum, frame):\n"
              "    global n\n"
              "    n += 1\n"
              "signal.signal(signal.SIGINT, handler)\n"
              f"open(r'{ready}', 'w').write('ok')\n"
              "deadline = time.monotonic() + 30\n"
              "while n == 0 and time.monotonic() < deadline:\n"
              "    time.sleep(0.05)\n"
              "time.sleep(1.0)  # time for a second, forwarded SIGINT to arrive\n"
              f"open(r'{count}', 'w').write(str(n))\n"
              "sys.exit(5)\n")
    argv = [PY, "-m", "client_stub.cli", "run", "CADPRO", "--version", "2.1", "-c", d.address, "--", PY, "-c", script]
    pid, fd = pty.fork()
    if pid == 0:  # the child: session leader with the pty as its controlling terminal, foreground job
        try:
            os.execve(PY, argv, env)
        finally:
            os._exit(127)
    status = None
    try:
        wait_for(ready.exists)
        os.write(fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT to its foreground process group
        deadline = time.monotonic() + 20
        while status is None and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.1)[0]:
                with contextlib.suppress(OSError):
                    os.read(fd, 4096)  # keep the terminal drained
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
    finally:
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert status is not None, "lmclient did not end after Ctrl-C"
    assert os.waitstatus_to_exitcode(status) == 5
    assert count.read_text() == "1"
    assert in_use(d) == 0


def test_run_whose_seat_is_lost_stops_the_command(daemon_factory: Callable[..., Daemon], env: dict[str, str],
                                                  tmp_path: Path) -> None:
    """An admin removes the seat (lmutil lmremove): at its next heartbeat lmclient learns the seat is gone,
    says so, sends COMMAND SIGTERM and exits with EXIT_LOST, whatever COMMAND's own exit code."""
    d = daemon_factory((("CADPRO", "2.1", 1),))  # heartbeat every 1 s
    ready, got = tmp_path / "ready", tmp_path / "got-term"
    proc = _start_run(d, env, _signal_script("SIGTERM", got, ready, 0), stderr=subprocess.PIPE)
    try:
        wait_for(ready.exists)
        st = subprocess.run([PY, "-m", "lmgrd.lmutil", "lmstat", "-a", "--json", "-c", d.address],
                            capture_output=True, text=True, timeout=30, env=d.env())
        assert st.returncode == 0, st.stderr
        (lease,) = json.loads(st.stdout)["leases"]
        rm = subprocess.run([PY, "-m", "lmgrd.lmutil", "lmremove", "--token", lease["token"][:8], "-c", d.address],
                            capture_output=True, text=True, timeout=30, env=d.env())
        assert rm.returncode == 0, rm.stderr
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
            proc.wait(10)
    assert proc.returncode == EXIT_LOST, err
    assert got.read_text() == str(int(signal.SIGTERM))
    text = err.decode()
    assert "the seat of CADPRO was lost: SEAT_REMOVED" in text and "stopping" in text


def test_run_whose_child_is_killed_reports_128_plus_the_signal_and_frees_the_seat(
        daemon_factory: Callable[..., Daemon], env: dict[str, str], tmp_path: Path) -> None:
    d = daemon_factory((("CADPRO", "2.1", 1),))
    pidfile = tmp_path / "pid"
    script = f"import os, time; open(r'{pidfile}', 'w').write(str(os.getpid())); time.sleep(60)"
    proc = _start_run(d, env, script)
    try:
        wait_for(lambda: pidfile.exists() and pidfile.read_text() != "")
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
        assert proc.wait(15) == 128 + int(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert in_use(d) == 0


def test_hostid_prints_what_a_registration_request_needs(env: dict[str, str]) -> None:
    r = lmclient(env, "hostid", "--json")
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    assert data["short_hostname"] == socket.gethostname().split(".")[0] and data["licensable"] is True
    assert len(data["fingerprint"]) == 64 and "127.0.0.1" in data["addresses"]


def _single(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path], issued_at: datetime) -> Path:
    key, _ = vendor
    lic = tmp_path / "single.lic"
    write_license(lic, key, (("CADPRO", "2.1", 1),), license_type="single", issued_at=issued_at)
    return lic


def test_single_user_license_needs_activation_until_24_hours_after_issue(
        tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path], env: dict[str, str]) -> None:
    lic = _single(tmp_path, vendor, datetime.now(UTC) - timedelta(hours=1))
    e = {**env, "LM_VENDOR_KEY": str(vendor[1])}
    r = lmclient(e, "checkout", "CADPRO", "--version", "2.1", "-c", str(lic))
    assert r.returncode == EXIT_DENIED and "LICENSE_NOT_ACTIVATED" in r.stderr
    assert f"lmclient activate {lic}" in r.stderr and "activates by itself at" in r.stderr
    r = lmclient(e, "activate", str(lic))
    assert r.returncode == 0, r.stderr
    record = Path(env["XDG_DATA_HOME"]) / "lmgrd" / "activations.json"
    assert str(record) in r.stdout and record.exists()
    r = lmclient(e, "checkout", "CADPRO", "--version", "2.1", "-c", str(lic))
    assert r.returncode == 0, r.stderr
    assert "granted CADPRO 2.1 from single-user license" in r.stdout
    # Another user's data directory holds no activation: still pending there.
    other = {**e, "XDG_DATA_HOME": str(tmp_path / "other-user")}
    r = lmclient(other, "checkout", "CADPRO", "--version", "2.1", "-c", str(lic))
    assert r.returncode == EXIT_DENIED and "LICENSE_NOT_ACTIVATED" in r.stderr


def test_single_user_activation_refusals_keep_the_order(
        tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path], env: dict[str, str]) -> None:
    key, pub = vendor
    e = {**env, "LM_VENDOR_KEY": str(pub)}
    foreign = tmp_path / "foreign.lic"
    write_license(foreign, key, (("CADPRO", "2.1", 1),), license_type="single", hostname="otherpc",
                  ip="192.0.2.99", issued_at=datetime.now(UTC))
    r = lmclient(e, "activate", str(foreign))
    assert r.returncode == EXIT_DENIED and "HOST_NOT_LICENSED" in r.stderr
    lic = _single(tmp_path, vendor, datetime.now(UTC))
    text = lic.read_text().replace("count: 1", "count: 9") if "count: 1" in lic.read_text() else \
        lic.read_text().replace("CADPRO", "CADPRX")
    tampered = tmp_path / "tampered.lic"
    tampered.write_text(text)
    r = lmclient(e, "activate", str(tampered))
    assert r.returncode == EXIT_CONFIG and "LICENSE_INVALID" in r.stderr
    assert not (Path(env["XDG_DATA_HOME"]) / "lmgrd" / "activations.json").exists()


def test_an_activation_copied_from_another_machine_is_refused(
        tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path], env: dict[str, str]) -> None:
    lic = _single(tmp_path, vendor, datetime.now(UTC) - timedelta(hours=30))  # even past the 24 hours
    e = {**env, "LM_VENDOR_KEY": str(vendor[1])}
    assert lmclient(e, "activate", str(lic)).returncode == 0
    record = Path(env["XDG_DATA_HOME"]) / "lmgrd" / "activations.json"
    data = json.loads(record.read_text())
    for rec in data.values():
        rec["machine"] = "f" * 64  # as if activated on a machine with another machine id
    record.write_text(json.dumps(data))
    r = lmclient(e, "checkout", "CADPRO", "--version", "2.1", "-c", str(lic))
    assert r.returncode == EXIT_DENIED and "LICENSE_MOVED" in r.stderr
