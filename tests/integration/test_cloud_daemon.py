"""The license server and the single-user client against the vendor's real activation service.

Real processes only: ``lmcloud serve`` (uvicorn, HTTPS from a trustme CA, SQLite), ``lmgrd`` and ``lmutil`` as
subprocesses, a second machine made with ``unshare`` (another /etc/machine-id), Debian's tinyproxy as the
HTTPS_PROXY. Intervals are 1 s so the schedule runs within the test; certificates are valid 60 s (the
service's minimum), and "after valid_until" is reached by running the daemon's clock ahead
(LMGRD_CLOCK_OFFSET_SECONDS), never by sleeping a minute.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lmgrd.cloudcheck import MAX_SKEW_SECONDS
from protocol import CheckedIn, Checkin, Checkout, ErrorReply, Granted, Heartbeat, HeartbeatAck
from tests.cloud_client_harness import (
    TLS,
    Service,
    TinyProxy,
    cloud_license,
    free_port,
    lmcloud,
    show,
    write_private_key,
)
from tests.harness import REPO, Daemon, RawClient, write_keys, write_license

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs Linux (unshare, tinyproxy)")

FAST = ("--cloud-poll-interval", "1", "--cloud-check-in-interval", "1")


class World:
    """One vendor, one CA, one service database, and the two service instances every test shares: ``svc``
    (the service's clock) and ``svc24`` (its clock 25 hours ahead: every license is 24 h old there)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.key, self.pub = write_keys(root / "vendor")
        self.key_file = write_private_key(self.key, root / "vendor" / "vendor.key")
        self.tls = TLS(root / "tls")
        self.db = f"sqlite:///{root / 'lmcloud.sqlite3'}"
        res = lmcloud(self.db, "db", "upgrade")
        assert res.returncode == 0, res.stderr
        self.services: list[Service] = []
        self.svc = self.service()
        self.svc24 = self.service(clock_offset=25 * 3600)
        self.n = 0

    def service(self, **kw: Any) -> Service:
        s = Service(self.root / "svc", self.key_file, self.tls, self.db, **kw)
        self.services.append(s)
        return s.start()

    def license(self, url: str, *, register: bool = True, **kw: Any) -> tuple[Path, str]:
        self.n += 1
        path = self.root / "licenses" / f"site{self.n}.lic"
        path.parent.mkdir(exist_ok=True)
        lic = cloud_license(path, self.key, url, **kw)
        if register:
            res = lmcloud(self.db, "register", str(path))
            assert res.returncode == 0, res.stderr
        return path, lic.customer_id


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("cloud"))
    yield w
    for s in w.services:
        s.stop()


class CloudDaemon(Daemon):
    """lmgrd with the test CA trusted, extra environment, and optionally a command prefix (unshare)."""

    def __init__(self, *args: Any, env: dict[str, str] | None = None, prefix: list[str] | None = None,
                 **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.extra_env = env or {}
        self.prefix = prefix or []

    def args(self) -> list[str]:
        return [*self.prefix, *super().args()]

    def env(self) -> dict[str, str]:
        base = {k: v for k, v in super().env().items() if not k.lower().endswith("_proxy")}
        return {**base, **self.extra_env}


@pytest.fixture
def daemons(tmp_path: Path, world: World) -> Iterator[Callable[..., CloudDaemon]]:
    started: list[CloudDaemon] = []

    def make(licenses: list[Path], *, name: str = "d", extra: tuple[str, ...] = FAST, start: bool = True,
             **kw: Any) -> CloudDaemon:
        work = tmp_path / f"{name}{len(started)}"
        work.mkdir()
        d = CloudDaemon(work, licenses, world.pub, extra=[*extra, "--cloud-ca-file", str(world.tls.ca_file)], **kw)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)


def lmutil(d: Daemon, *args: str, server: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lmgrd.lmutil", *args, *(["-c", d.address] if server else [])],
                          capture_output=True, text=True, timeout=60, env=d.env(), cwd=REPO)


def checkout(d: Daemon, user: str = "alice") -> tuple[RawClient, Any]:
    c = d.connect()
    c.hello(user=user)
    return c, c.request(Checkout(c.id(), "CADPRO", "2.1", 0))


def code_of(reply: object) -> str:
    return str(reply.code) if isinstance(reply, ErrorReply) else type(reply).__name__


def cloud_status(d: Daemon) -> dict[str, Any]:
    r = lmutil(d, "lmstat", "--json")
    assert r.returncode == 0, r.stderr
    (entry,) = json.loads(r.stdout)["cloud"]
    return dict(entry)


def wait_until(what: str, fn: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------- activation
def test_pending_refuses_then_lmutil_activate_asks_the_service(world: World, daemons: Callable[..., CloudDaemon]
                                                               ) -> None:
    lic, cid = world.license(world.svc.url)
    d = daemons([lic])
    d.wait_for_log(rf"license {cid} is pending at the activation service")
    _c, reply = checkout(d)
    assert code_of(reply) == "LICENSE_NOT_ACTIVATED"
    assert world.svc.url in reply.message and f"lmutil activate {cid}" in reply.hint
    r = lmutil(d, "activate", cid, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["state"] == "active" and out["how"] == "manual" and out["service"] == world.svc.url
    _c, reply = checkout(d)
    assert isinstance(reply, Granted)
    st = show(world.db, cid)
    assert st["state"] == "active" and st["activations"][0]["how"] == "manual"
    # The certificate is in the state directory, as the vendor signed it.
    stored = json.loads((d.state_dir / "cloud" / f"{cid}.json").read_text())
    assert stored["certificate"]["document"]["customer_id"] == cid
    # Checking in every second renews it: the sequence grows.
    wait_until("two check-ins", lambda: (cloud_status(d)["sequence"] or 0) >= 3)


def test_automatic_activation_24_hours_after_issue_by_the_service_clock(world: World,
                                                                        daemons: Callable[..., CloudDaemon]) -> None:
    # Issued 5 minutes ago by the daemon's clock; the service's clock is 25 hours ahead: it decides.
    lic, cid = world.license(world.svc24.url)
    d = daemons([lic])
    d.wait_for_log(rf"ACTIVATED license {cid}: automatic by the activation service")
    _c, reply = checkout(d)
    assert isinstance(reply, Granted)
    assert show(world.db, cid)["activations"][0]["how"] == "automatic"


def test_lmreread_adding_the_first_cloud_license_starts_the_agent_and_activates_it(
        world: World, daemons: Callable[..., CloudDaemon], tmp_path: Path) -> None:
    plain = tmp_path / "plain.lic"
    write_license(plain, world.key, (("VIEWER", "1.0", 2),))  # 25 hours old, no cloud_url: no agent
    config = tmp_path / "lmgrd.yaml"
    config.write_text(f"licenses: [{plain}]\n", encoding="utf-8")
    d = daemons([], extra=(*FAST, "--config", str(config)))
    _c, reply = checkout(d)
    assert code_of(reply) != "Granted"
    assert "activation service" not in d.log()  # no cloud license: no agent started
    # The service's clock is 25 h ahead: the agent the reread starts activates it with no admin action, with
    # the settings of the config as reread (the cloud_proxy added beside the license).
    proxy = TinyProxy(tmp_path / "proxy", [world.svc24.port]).start()
    try:
        lic, cid = world.license(world.svc24.url)
        config.write_text(f"licenses: [{plain}, {lic}]\ncloud_proxy: {proxy.url}\n", encoding="utf-8")
        r = lmutil(d, "lmreread")
        assert r.returncode == 0, r.stdout + r.stderr
        d.wait_for_log(rf"activation service: {world.svc24.url}")
        d.wait_for_log(rf"ACTIVATED license {cid}: automatic by the activation service")
        assert f"CONNECT 127.0.0.1:{world.svc24.port}" in proxy.connects()
    finally:
        proxy.stop()
    _c, reply = checkout(d)
    assert isinstance(reply, Granted), reply
    assert cloud_status(d)["state"] == "active"
    assert show(world.db, cid)["activations"][0]["how"] == "automatic"
    # The proxy is gone; a reread that drops cloud_proxy gives the running agent a direct client: check-ins
    # succeed again (through the dead proxy they could not).
    config.write_text(f"licenses: [{plain}, {lic}]\n", encoding="utf-8")
    assert lmutil(d, "lmreread").returncode == 0
    d.wait_for_log(r"new HTTP settings from the reread configuration .*cloud_proxy none")
    seq = cloud_status(d)["sequence"]
    wait_until("two check-ins without the proxy", lambda: (cloud_status(d)["sequence"] or 0) >= seq + 2)


def test_supersede_ends_held_seats_within_a_check_in_and_a_heartbeat(world: World,
                                                                      daemons: Callable[..., CloudDaemon]) -> None:
    lic, cid = world.license(world.svc.url)
    new_lic, new_cid = world.license(world.svc.url)
    d = daemons([lic], lease_timeout=30.0)  # the seat outlives the lmcloud command's start-up
    assert lmutil(d, "activate", cid).returncode == 0
    c, reply = checkout(d)
    assert isinstance(reply, Granted)
    res = lmcloud(world.db, "supersede", cid, new_cid, "--reason", "license server replaced")
    assert res.returncode == 0, res.stderr
    superseded = time.monotonic()
    # The holder heartbeats as a product does; within a check-in interval and a heartbeat its seat is gone.
    ack: Any = None
    deadline = superseded + 30
    while time.monotonic() < deadline:
        ack = c.request(Heartbeat(c.id()))
        assert isinstance(ack, HeartbeatAck)
        if ack.lost:
            break
        time.sleep(0.5)
    assert ack is not None and ack.renewed == 0 and len(ack.lost) == 1, ack
    assert str(ack.lost[0].code) == "LICENSE_REVOKED" and new_cid in ack.lost[0].message
    d.wait_for_log(r"REVOKED by the activation service: .*replaced by customer ID " + new_cid)
    _c2, reply = checkout(d, user="bob")
    assert code_of(reply) == "LICENSE_REVOKED" and new_cid in reply.message
    # Stored: a restart does not revive it (and nothing is asked of the service for it any more).
    d.stop()
    d.start()
    _c3, reply = checkout(d, user="carol")
    assert code_of(reply) == "LICENSE_REVOKED" and new_cid in reply.message
    assert cloud_status(d)["state"] == "revoked"
    kinds = [e["kind"] for e in show(world.db, cid)["events"]]
    assert "superseded" in kinds
    assert new_lic.exists()


def test_service_down_serves_until_valid_until_then_refuses_naming_the_service_and_recovers(
        world: World, daemons: Callable[..., CloudDaemon]) -> None:
    svc = world.service(valid_for=60)
    lic, cid = world.license(svc.url)
    d = daemons([lic], extra=("--cloud-poll-interval", "1", "--cloud-check-in-interval", "1",
                              "--metrics-port", "auto"))
    assert lmutil(d, "activate", cid).returncode == 0
    svc.stop()  # refused connections from now on
    d.wait_for_log(rf"check-in of license {cid}: could not reach the activation service: .*{svc.port}")
    _c, reply = checkout(d)
    assert isinstance(reply, Granted)  # an outage is not the service's word
    st = cloud_status(d)
    assert st["state"] == "active" and st["last_error"] and st["warning"]  # 60 s left: inside the 7 days
    d.wait_for_log(r"CLOUD WARNING")
    import urllib.request

    metrics = urllib.request.urlopen(d.metrics_url() + "metrics", timeout=10).read().decode()
    assert f'lmgrd_cloud_unreachable_warning{{customer_id="{cid}"}} 1.0' in metrics
    # The same daemon two minutes later (its clock run ahead): past valid_until, no new seats.
    d.stop()
    d.extra_env["LMGRD_CLOCK_OFFSET_SECONDS"] = "120"
    d.start()
    _c, reply = checkout(d, user="bob")
    assert code_of(reply) == "LICENSE_NOT_ACTIVATED", reply
    assert svc.url in reply.message and "last reached" in reply.message and "expired" in reply.message
    # The service comes back (its clock as far ahead as the daemon's): the next check-in renews.
    back = Service(svc.workdir, svc.vendor_key, svc.tls, svc.db, valid_for=60, clock_offset=120, port=svc.port)
    world.services.append(back)
    back.start()
    d.wait_for_log(rf"ACTIVATED license {cid}: manual by the activation service", timeout=30)
    _c, reply = checkout(d, user="carol")
    assert isinstance(reply, Granted)


def test_held_seats_keep_running_past_valid_until_in_a_running_daemon(world: World,
                                                                      daemons: Callable[..., CloudDaemon]) -> None:
    # Certificates are valid 60 s by the service's clock; the daemon's clock runs 57 s ahead, so a certificate
    # the daemon holds expires 3 s after its last renewal: the same daemon, not a restarted one, crosses it.
    svc = world.service(valid_for=60)
    lic, cid = world.license(svc.url)
    d = daemons([lic], env={"LMGRD_CLOCK_OFFSET_SECONDS": "57"}, lease_timeout=3.0)
    assert lmutil(d, "activate", cid).returncode == 0
    c, reply = checkout(d)
    assert isinstance(reply, Granted)

    def beat() -> None:  # the holder heartbeats as a product does (every half second)
        ack = c.request(Heartbeat(c.id()))
        assert isinstance(ack, HeartbeatAck) and ack.renewed == 1 and not ack.lost, ack

    svc.stop()  # the outage: check-ins are refused from now on
    deadline = time.monotonic() + 30
    while True:
        _c2, refused = checkout(d, user="bob")
        if not isinstance(refused, Granted):
            break
        # Granted while the certificate still held: bob gives it back at once.
        assert isinstance(_c2.request(Checkin(_c2.id(), refused.token)), CheckedIn)
        assert time.monotonic() < deadline, "the certificate never expired"
        beat()
        time.sleep(0.5)
    assert code_of(refused) == "LICENSE_NOT_ACTIVATED", refused
    assert svc.url in refused.message and "expired" in refused.message and "last reached" in refused.message
    # The held seat outlives its lease timeout past valid_until: every heartbeat renews it, none ends it.
    until = time.monotonic() + d.lease_timeout + 0.5
    while time.monotonic() < until:
        beat()
        time.sleep(0.5)
    r = lmutil(d, "lmstat", "--json")
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    (pool,) = status["pools"]
    assert pool["activation"] == "expired" and pool["in_use"] == 1, pool  # alice's seat
    assert status["cloud"][0]["state"] == "expired"


# --------------------------------------------------------------------------- one machine per customer ID
def test_a_second_machine_gets_activation_conflict(world: World, daemons: Callable[..., CloudDaemon],
                                                   tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.fail("needs root and unshare (CI runs as root)")
    lic, cid = world.license(world.svc.url)
    first = daemons([lic])
    assert lmutil(first, "activate", cid).returncode == 0
    other_id = tmp_path / "machine-id"
    other_id.write_text("0123456789abcdef0123456789abcdef\n")
    shell = (f"mount --bind {other_id} /etc/machine-id && "
             f"mount --bind {other_id} /var/lib/dbus/machine-id 2>/dev/null; exec \"$@\"")
    second = daemons([lic], name="other", prefix=["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                                  shell, "sh"])
    second.wait_for_log(rf"activation \(automatic\) of license {cid} refused by the activation service .*"
                        r"ACTIVATION_CONFLICT")
    _c, reply = checkout(second)
    assert code_of(reply) == "ACTIVATION_CONFLICT"
    assert "reissue" in (reply.message + reply.hint)
    r = lmutil(second, "activate", cid)
    assert r.returncode == 1 and "ACTIVATION_CONFLICT" in r.stdout + r.stderr
    _c, reply = checkout(first)
    assert isinstance(reply, Granted)  # the first machine keeps working
    assert "conflict" in [e["kind"] for e in show(world.db, cid)["events"]]


def test_a_copied_state_directory_is_caught_as_a_clone(world: World, daemons: Callable[..., CloudDaemon]) -> None:
    lic, cid = world.license(world.svc.url)
    original = daemons([lic])
    assert lmutil(original, "activate", cid).returncode == 0
    original.stop()
    copy_dir = original.workdir.parent / "copied-state"
    shutil.copytree(original.state_dir, copy_dir)  # the cloned disk: its key and its certificate
    original.start()
    seq = cloud_status(original)["sequence"]
    wait_until("two check-ins of the original", lambda: (cloud_status(original)["sequence"] or 0) >= seq + 2)
    clone = daemons([lic], name="clone", state_dir=copy_dir)
    clone.wait_for_log(r"check-in of license .* refused by the activation service .*ACTIVATION_CONFLICT")
    _c, reply = checkout(clone)
    assert code_of(reply) == "ACTIVATION_CONFLICT"
    _c, reply = checkout(original)
    assert isinstance(reply, Granted)  # the instance with the latest token keeps working
    assert cloud_status(original)["state"] == "active"
    assert "suspected_clone" in [e["kind"] for e in show(world.db, cid)["events"]]


# --------------------------------------------------------------------------- trust
def test_tampered_certificate_and_revocation_in_the_state_directory_are_refused(
        world: World, daemons: Callable[..., CloudDaemon]) -> None:
    lic, cid = world.license(world.svc.url)
    d = daemons([lic])
    assert lmutil(d, "activate", cid).returncode == 0
    d.stop()
    path = d.state_dir / "cloud" / f"{cid}.json"
    doc = json.loads(path.read_text())
    doc["certificate"]["document"]["valid_until"] = "2099-12-31T00:00:00Z"
    doc["revocation"] = {"document": {"format": 1, "kind": "cloud_revocation", "customer_id": cid,
                                      "revoked_at": "2026-01-01T00:00:00Z", "reason": "forged",
                                      "replaced_by": None}, "signature": doc["certificate"]["signature"]}
    path.write_text(json.dumps(doc))
    d.start()
    d.wait_for_log(r"the stored revocation is refused and revokes nothing")
    d.wait_for_log(r"the stored activation certificate is refused .*does not verify")
    # Neither the forged revocation nor the stretched certificate is believed; the service is asked again.
    d.wait_for_log(rf"ACTIVATED license {cid}")
    st = cloud_status(d)
    assert st["state"] == "active" and st["valid_until"] != "2099-12-31T00:00:00Z"


def test_requests_go_through_a_real_connect_proxy_and_cloud_check_passes(
        world: World, daemons: Callable[..., CloudDaemon], tmp_path: Path) -> None:
    proxy = TinyProxy(tmp_path / "proxy", [world.svc.port]).start()
    try:
        lic, cid = world.license(world.svc.url)
        env = {"HTTPS_PROXY": proxy.url, "NO_PROXY": ""}
        d = daemons([lic], env=env)
        assert lmutil(d, "activate", cid).returncode == 0
        assert f"CONNECT 127.0.0.1:{world.svc.port}" in proxy.connects()
        r = subprocess.run([sys.executable, "-m", "lmgrd.lmutil", "cloud-check", "--license", str(lic),
                            "--cloud-ca-file", str(world.tls.ca_file)], capture_output=True, text=True, timeout=60,
                           env={**d.env(), **env}, cwd=REPO)
        assert r.returncode == 0, r.stdout + r.stderr
        lines = r.stdout.splitlines()[1:]
        assert [x.split(":")[0] for x in lines] == ["dns", "proxy", "tls", "clock", "reachability"]
        assert all(": ok: " in x for x in lines), lines
        assert "HTTPS_PROXY" in lines[1]
        # Without the CA the TLS line fails, and the exit code says so.
        r = subprocess.run([sys.executable, "-m", "lmgrd.lmutil", "cloud-check", world.svc.url],
                           capture_output=True, text=True, timeout=60, env=d.env(), cwd=REPO)
        assert r.returncode == 1 and "tls: FAILED" in r.stdout, r.stdout
        # A dead port: reachability fails.
        r = subprocess.run([sys.executable, "-m", "lmgrd.lmutil", "cloud-check", f"https://127.0.0.1:{free_port()}",
                            "--cloud-ca-file", str(world.tls.ca_file)], capture_output=True, text=True,
                           timeout=60, env=d.env(), cwd=REPO)
        assert r.returncode == 1 and "reachability: FAILED" in r.stdout and "refused" in r.stdout, r.stdout
    finally:
        proxy.stop()


def test_cloud_proxy_setting_and_flag_then_no_proxy_bypasses_a_dead_https_proxy(
        world: World, daemons: Callable[..., CloudDaemon], tmp_path: Path) -> None:
    proxy = TinyProxy(tmp_path / "proxy", [world.svc.port]).start()
    connect = f"CONNECT 127.0.0.1:{world.svc.port}"
    try:
        # cloud_proxy in the config file, HTTPS_PROXY unset (CloudDaemon drops every *_proxy variable).
        config = tmp_path / "lmgrd.yaml"
        config.write_text(f"cloud_proxy: {proxy.url}\n", encoding="utf-8")
        lic, cid = world.license(world.svc.url)
        d = daemons([lic], extra=(*FAST, "--config", str(config)))
        assert "HTTPS_PROXY" not in d.env() and "https_proxy" not in d.env()
        assert lmutil(d, "activate", cid).returncode == 0
        seen = proxy.connects().count(connect)
        assert seen >= 1, proxy.connects()
        # The same through --cloud-proxy: the activation request the agent makes at start goes through it.
        lic2, cid2 = world.license(world.svc.url)
        d2 = daemons([lic2], extra=(*FAST, "--cloud-proxy", proxy.url))
        d2.wait_for_log(rf"license {cid2} is pending at the activation service")
        assert proxy.connects().count(connect) > seen, proxy.connects()
    finally:
        proxy.stop()
    # HTTPS_PROXY names a dead port; NO_PROXY names the service's host: the request goes direct, and works.
    dead = f"http://127.0.0.1:{free_port()}"
    lic3, cid3 = world.license(world.svc.url)
    d3 = daemons([lic3], env={"HTTPS_PROXY": dead, "NO_PROXY": "127.0.0.1"})
    r = lmutil(d3, "activate", cid3, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["state"] == "active"
    assert "could not reach" not in d3.log()
    # The control: without NO_PROXY the dead proxy is used, and the service is not reached.
    lic4, cid4 = world.license(world.svc.url)
    d4 = daemons([lic4], env={"HTTPS_PROXY": dead, "NO_PROXY": ""})
    d4.wait_for_log(rf"activation \(automatic\) of license {cid4}: could not reach the activation service")


def test_cloud_check_fails_on_clock_skew_and_says_so(world: World) -> None:
    # svc24's clock runs 25 hours ahead of this machine's: far beyond the tolerated skew.
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    r = subprocess.run([sys.executable, "-m", "lmgrd.lmutil", "cloud-check", world.svc24.url, "--cloud-ca-file",
                        str(world.tls.ca_file)], capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = dict(x.split(": ", 1) for x in r.stdout.splitlines()[1:])
    assert list(lines) == ["dns", "proxy", "tls", "clock", "reachability"], r.stdout
    assert all(lines[k].startswith("ok: ") for k in ("dns", "proxy", "tls", "reachability")), r.stdout
    clock = lines["clock"]
    assert clock.startswith("FAILED: "), clock
    m = re.search(r"clock is (\d+) s behind the service's \(more than (\d+) s: set the clock", clock)
    assert m is not None, clock
    assert abs(int(m.group(1)) - 25 * 3600) < 60 and int(m.group(2)) == int(MAX_SKEW_SECONDS), clock


# --------------------------------------------------------------------------- offline
def test_offline_request_and_response_round_trip(world: World, daemons: Callable[..., CloudDaemon],
                                                 tmp_path: Path) -> None:
    # The site has no internet: the license's service URL answers nothing from here.
    offline_url = f"https://127.0.0.1:{free_port()}"
    lic, cid = world.license(offline_url)
    d = daemons([lic])
    req = tmp_path / "request.json"
    r = lmutil(d, "activate", cid, "--offline-request", str(req))
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(req.read_bytes()) < 1024  # fits a QR code (version 40 holds 2953 bytes)
    resp = tmp_path / "response.json"
    res = lmcloud(world.db, "offline-response", str(req), "--key", str(world.key_file), "--out", str(resp))
    assert res.returncode == 0, res.stderr
    r = lmutil(d, "activate", "--offline-response", str(resp), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["how"] == "offline"
    _c, reply = checkout(d)
    assert isinstance(reply, Granted)
    st = cloud_status(d)
    assert st["state"] == "active" and st["how"] == "offline" and st["next_check_in"] is None
    # Installing another installation's response is refused.
    other = tmp_path / "other.json"
    doc = json.loads(resp.read_text())
    doc["document"]["hostname"] = "elsewhere"
    other.write_text(json.dumps(doc))
    r = lmutil(d, "activate", "--offline-response", str(other))
    assert r.returncode == 1 and "LICENSE_INVALID" in r.stdout + r.stderr


# --------------------------------------------------------------------------- single-user PCs
def _single(world: World, url: str, data_home: Path) -> tuple[Path, str, dict[str, str]]:
    lic, cid = world.license(url, license_type="single", products=(("CADPRO", "2.1", 1),))
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update({"XDG_DATA_HOME": str(data_home), "LM_CLOUD_CA_FILE": str(world.tls.ca_file),
                "LM_VENDOR_KEY": str(world.pub)})
    return lic, cid, env


PRODUCT = """
import sys
from pathlib import Path
from client_stub.nodelock import check_license_file, load_vendor_key
from client_stub import cloud
lic = check_license_file(Path(sys.argv[1]), "CADPRO", "2.1", load_vendor_key(None))
# The product has started: is a check-in still running behind it?
print("started; check-in in the background:", any(t.is_alive() for t in cloud._background.values()), flush=True)
if sys.argv[2:] != ["nowait"]:
    cloud.wait_for_background()
"""


def test_single_user_lmclient_activate_then_the_product_runs(world: World, tmp_path: Path) -> None:
    svc = world.service(valid_for=3600)
    lic, cid, env = _single(world, svc.url, tmp_path / "data")
    run = [sys.executable, "-c", PRODUCT, str(lic)]
    r = subprocess.run(run, capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert r.returncode == 1 and "LICENSE_NOT_ACTIVATED" in r.stderr and svc.url in r.stderr
    r = subprocess.run([sys.executable, "-m", "client_stub.cli", "activate", str(lic)], capture_output=True,
                       text=True, timeout=60, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert svc.url in r.stdout
    assert show(world.db, cid)["activations"][0]["how"] == "manual"
    # Once the certificate is older than the check-in interval, the product checks in in the background.
    env["LM_CLOUD_CHECK_IN_INTERVAL"] = "1"
    time.sleep(1.1)
    r = subprocess.run(run, capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert r.returncode == 0 and r.stdout.startswith("started"), r.stdout + r.stderr
    state = tmp_path / "data" / "lmgrd" / "cloud" / f"{cid}.json"
    assert json.loads(state.read_text())["certificate"]["document"]["sequence"] == 2
    # The service hangs (a black hole: connections accepted, nothing answered): the product still starts at
    # once on its valid certificate, the check-in left running behind it.
    svc.stop()
    import socket

    with socket.create_server(("127.0.0.1", svc.port)) as hole:
        time.sleep(1.1)
        r = subprocess.run([*run, "nowait"], capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.strip() == "started; check-in in the background: True"
        assert hole.fileno() >= 0


def test_single_user_product_activates_by_itself_once_24_hours_old(world: World, tmp_path: Path) -> None:
    lic, cid, env = _single(world, world.svc24.url, tmp_path / "data")
    r = subprocess.run([sys.executable, "-c", PRODUCT, str(lic)], capture_output=True, text=True, timeout=60,
                       env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert show(world.db, cid)["activations"][0]["how"] == "automatic"
