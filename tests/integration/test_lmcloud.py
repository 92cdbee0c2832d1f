"""The activation service (lmcloud) as the vendor runs it: ``lmcloud serve`` as a uvicorn subprocess on loopback
with TLS from a CA made in the test, against SQLite and against a throwaway PostgreSQL cluster (the same tests
for both), driven over real HTTPS with signed requests as a license server makes them.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cloud_harness import TLS, CloudService, Installation, PostgresCluster, lmcloud, lmcloud_here
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lmgrd.vendor.signing import dump_private_key, new_customer_id, sign_license
from protocol.cloud import (
    MAX_BODY_BYTES,
    Answer,
    dumps_document,
    parse_answer,
    verify_certificate,
)
from protocol.errors import ErrorCode
from protocol.license import License, Product

pytestmark = pytest.mark.timeout(240)

VALID_FOR = 120
DAY = 86_400


# --------------------------------------------------------------------------------------------------
# Fixtures: one PostgreSQL cluster per session; per backend, one database and the services on it


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lmcloud")


@pytest.fixture(scope="module")
def vendor(work: Path) -> tuple[Ed25519PrivateKey, Path]:
    key = Ed25519PrivateKey.generate()
    path = work / "vendor.key"
    path.write_bytes(dump_private_key(key))
    path.chmod(0o600)
    return key, path


@pytest.fixture(scope="module")
def tls(work: Path) -> TLS:
    return TLS(work / "tls")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, work: Path) -> str:
    unique = os.urandom(4).hex()  # a fresh database each time the fixture is set up
    if request.param == "sqlite":
        url = f"sqlite:///{work}/lmcloud-{unique}.sqlite3"
    else:
        cluster: PostgresCluster = request.getfixturevalue("postgres")
        url = cluster.create_database(f"lmcloud_{unique}")
    done = lmcloud("db", "upgrade", "--db", url)
    assert done.returncode == 0, done.stderr
    return url


class Site:
    """The services on one database and an HTTPS client that trusts the test CA."""

    def __init__(self, db: str, work: Path, vendor: tuple[Ed25519PrivateKey, Path], tls: TLS) -> None:
        self.db, self.work, self.tls = db, work, tls
        self.vendor_key, self.key_path = vendor
        self.services: list[CloudService] = []
        self.main = self.service()
        # The same database seen by a second instance whose clock runs 24 h and 2 min ahead.
        self.later = self.service(clock_offset=DAY + 120)
        self.http = httpx.Client(verify=tls.client_context(), timeout=30)
        # Licenses made and registered up front, with one lmcloud register (each command is a process).
        now = datetime.now(UTC)
        self.pool: dict[str, list[str]] = {"fresh": [], "old": [], "expiring": []}
        files = []
        for kind, count, issued, expires in (("fresh", 36, now - timedelta(hours=1), date(2031, 12, 31)),
                                             ("old", 2, now - timedelta(hours=25), date(2031, 12, 31)),
                                             ("expiring", 2, now - timedelta(hours=1), date(2030, 6, 30))):
            for _ in range(count):
                cid, path = self.license(issued_at=issued, expires=expires, register=False)
                self.pool[kind].append(cid)
                files.append(str(path))
        done = lmcloud_here("register", *files, "--db", self.db)
        assert done.returncode == 0, done.stderr

    def service(self, **kw: Any) -> CloudService:
        svc = CloudService(self.db, self.key_path, self.tls, valid_for=VALID_FOR,
                           log=self.work / f"svc{len(self.services)}-{self.db[:6]}.log", **kw)
        self.services.append(svc)
        return svc.start()

    def close(self) -> None:
        self.http.close()
        for svc in self.services:
            svc.stop()

    def license(self, *, issued_at: datetime | None = None, expires: date | None = date(2031, 12, 31),
                register: bool = True) -> tuple[str, Path]:
        lic = License(new_customer_id(os.urandom(10)), "multi", "Test Customer", "licsrv01", "192.0.2.10",
                      (Product("CADPRO", "2.1", 5),), issued_at or datetime.now(UTC), expires, (), "user_host",
                      self.main.url)
        path = self.work / f"{lic.customer_id}.lic"
        path.write_text(sign_license(lic, self.vendor_key))
        if register:
            done = lmcloud_here("register", str(path), "--db", self.db)
            assert done.returncode == 0, done.stderr
        return lic.customer_id, path

    def registered(self, kind: str = "fresh") -> str:
        """A registered customer ID no test has used: ``fresh`` (issued an hour ago: pending), ``old`` (issued
        25 hours ago), ``expiring`` (fresh, expires 2030-06-30)."""
        return self.pool[kind].pop()

    def post(self, path: str, body: Any, service: CloudService | None = None) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.http.post((service or self.main).url + path, content=content,
                              headers={"content-type": "application/json"})

    def answer(self, path: str, body: Any, service: CloudService | None = None) -> Answer:
        response = self.post(path, body, service)
        return parse_answer(response.status_code, response.content, self.vendor_key.public_key())

    def activate(self, inst: Installation, mode: str = "manual", service: CloudService | None = None) -> Answer:
        answer = self.answer("/v1/activations", inst.activation(mode), service)
        if answer.certificate is not None:
            inst.certificate = answer.certificate
        return answer

    def check_in(self, inst: Installation, service: CloudService | None = None, **kw: Any) -> Answer:
        answer = self.answer("/v1/check-ins", inst.check_in(**kw), service)
        if answer.certificate is not None:
            inst.certificate = answer.certificate
        return answer

    def show(self, cid: str) -> dict[str, Any]:
        done = lmcloud_here("show", cid, "--json", "--db", self.db)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def site(db: str, work: Path, vendor: tuple[Ed25519PrivateKey, Path], tls: TLS) -> Iterator[Site]:
    s = Site(db, work, vendor, tls)
    try:
        yield s
    finally:
        s.close()


# --------------------------------------------------------------------------------------------------
# Activation


def test_manual_activation_and_check_in_rotate_the_token(site: Site) -> None:
    cid = site.registered()
    inst = Installation(cid)
    answer = site.activate(inst, "manual")
    assert answer.status == "active" and answer.http_status == 200
    cert = answer.certificate
    assert cert is not None and cert.how == "manual" and cert.customer_id == cid
    assert cert.fingerprint.matches(inst.fingerprint) and cert.installation_key == inst.key_text
    assert cert.sequence == 1 and cert.valid_until is not None and cert.next_check_in is not None
    assert (cert.valid_until - cert.issued_at).total_seconds() == VALID_FOR
    assert cert.next_check_in - cert.issued_at == timedelta(seconds=VALID_FOR // 2)
    renewed = site.check_in(inst)
    assert renewed.status == "active" and renewed.certificate is not None
    assert renewed.certificate.sequence == 2 and renewed.certificate.token != cert.token
    info = site.show(cid)
    assert info["state"] == "active" and info["customer_id"] == cid
    [act] = info["activations"]
    assert act["hostname"] == "licsrv01" and act["how"] == "manual" and act["fingerprint"] == inst.fingerprint.digest
    assert act["activated_at"] and act["last_check_in"] and act["valid_until"]
    assert [e["kind"] for e in info["events"]] == ["registered", "activated", "check_in"]
    assert all(e["at"] for e in info["events"])


def test_pending_until_24_hours_by_the_service_clock_then_automatic(site: Site) -> None:
    cid = site.registered()
    inst = Installation(cid)
    pending = site.activate(inst, "automatic")
    assert pending.status == "pending" and pending.http_status == 202
    assert pending.code is ErrorCode.LICENSE_NOT_ACTIVATED and pending.activates_at is not None
    assert site.show(cid)["state"] == "pending"
    assert site.show(cid)["activations"] == []
    # A check-in before any activation is refused, not answered with a certificate.
    refused = site.check_in(inst, token="A" * 43, sequence=1)
    assert refused.code is ErrorCode.LICENSE_NOT_ACTIVATED and refused.http_status == 409
    # The service whose clock is 24 h ahead activates it, with no admin action, as automatic.
    active = site.activate(inst, "automatic", service=site.later)
    assert active.status == "active" and active.certificate is not None and active.certificate.how == "automatic"
    info = site.show(cid)
    assert info["state"] == "active" and info["activations"][0]["how"] == "automatic"


def test_a_license_older_than_24_hours_activates_automatically_at_once(site: Site) -> None:
    cid = site.registered("old")
    answer = site.activate(Installation(cid), "automatic")
    assert answer.status == "active" and answer.certificate is not None and answer.certificate.how == "automatic"


def test_one_machine_per_customer_id(site: Site) -> None:
    cid = site.registered()
    first = Installation(cid, hostname="licsrv01")
    assert site.activate(first).status == "active"
    second = Installation(cid, hostname="licsrv02")
    refused = site.activate(second)
    assert refused.http_status == 409 and refused.code is ErrorCode.ACTIVATION_CONFLICT
    assert refused.conflict_hostname == "licsrv01" and refused.conflict_since is not None
    assert "licsrv01" in refused.message and "reissue" in refused.hint
    # The same machine after a NIC change (one MAC in common) is the same machine: a check-in renews.
    first.fingerprint = type(first.fingerprint)(first.fingerprint.host, first.fingerprint.machine,
                                                frozenset(sorted(first.fingerprint.macs)[:1]))
    assert site.check_in(first).status == "active"
    info = site.show(cid)
    assert [e["kind"] for e in info["events"]].count("conflict") == 1
    assert len(info["activations"]) == 1


def test_an_ha_license_activates_on_each_of_its_servers_separately(site: Site) -> None:
    """An HA license names 2-3 servers (hosts:): each activates for itself (one activation per customer ID and
    listed server); a machine not listed is refused; another machine posing as a listed server conflicts with
    that server's activation only; a reinstall on one server replaces that server's activation only."""
    import dataclasses

    from lmgrd.vendor.signing import sign_license as sign

    servers = (("node-a", "192.0.2.21"), ("node-b", "192.0.2.22"))
    lic = dataclasses.replace(
        License(new_customer_id(os.urandom(10)), "multi", "HA Customer", "node-a", "192.0.2.21",
                (Product("CADPRO", "2.1", 5),), datetime.now(UTC) - timedelta(hours=1), date(2031, 12, 31), (),
                "user_host", site.main.url), servers=servers)
    path = site.work / f"{lic.customer_id}.lic"
    path.write_text(sign(lic, site.vendor_key))
    done = lmcloud_here("register", str(path), "--db", site.db)
    assert done.returncode == 0, done.stderr
    cid = lic.customer_id
    a = Installation(cid, hostname="node-a", machine_id="machine-a", addresses=("192.0.2.21",))
    b = Installation(cid, hostname="node-b.example.com", machine_id="machine-b", addresses=("192.0.2.22",))
    for inst in (a, b):
        answer = site.activate(inst)
        assert answer.status == "active" and answer.certificate is not None, answer.message
        assert answer.certificate.hostname == inst.hostname and answer.certificate.fingerprint.matches(inst.fingerprint)
    # Not one of the servers (another name, or a listed name at an address the license does not give it).
    for stranger in (Installation(cid, hostname="node-c", addresses=("192.0.2.23",)),
                     Installation(cid, hostname="node-b", addresses=("192.0.2.99",))):
        refused = site.activate(stranger)
        assert refused.http_status == 403 and refused.code is ErrorCode.HOST_NOT_LICENSED, refused.message
        assert "node-a" in refused.message and "node-b" in refused.message
    # Another machine posing as node-a: a conflict with node-a's activation, which keeps working.
    impostor = Installation(cid, hostname="node-a", machine_id="machine-x", addresses=("192.0.2.21",))
    refused = site.activate(impostor)
    assert refused.http_status == 409 and refused.code is ErrorCode.ACTIVATION_CONFLICT
    assert refused.conflict_hostname == "node-a"
    # Each server's token rotates on its own.
    assert site.check_in(a).certificate.sequence == 2  # type: ignore[union-attr]
    assert site.check_in(b).certificate.sequence == 2  # type: ignore[union-attr]
    assert site.check_in(a).certificate.sequence == 3  # type: ignore[union-attr]
    # node-b reinstalled (same machine, new installation key): only node-b's old installation is replaced.
    b2 = Installation(cid, hostname="node-b.example.com", machine_id="machine-b", addresses=("192.0.2.22",))
    assert site.activate(b2).status == "active"
    replaced = site.check_in(b)
    assert replaced.http_status == 409 and replaced.code is ErrorCode.ACTIVATION_CONFLICT
    assert site.check_in(a).certificate.sequence == 4  # type: ignore[union-attr]
    assert site.check_in(b2).certificate.sequence == 2  # type: ignore[union-attr]
    info = site.show(cid)
    assert info["state"] == "active" and info["servers"] == [{"hostname": n, "ip": ip} for n, ip in servers]
    current = sorted((act["server"], act["installation_key"]) for act in info["activations"] if act["current"])
    assert current == [("node-a", a.key_text), ("node-b", b2.key_text)]
    assert len(info["activations"]) == 3  # a, b (ended: replaced by b2), b2
    kinds = [e["kind"] for e in info["events"]]
    assert kinds.count("activated") == 3 and kinds.count("conflict") == 2


def test_a_clone_with_a_stale_token_is_caught_and_the_latest_token_keeps_working(site: Site) -> None:
    cid = site.registered()
    original = Installation(cid)
    assert site.activate(original).status == "active"
    clone = original.clone()  # the state directory copied while it held sequence 1
    assert site.check_in(original).certificate.sequence == 2  # type: ignore[union-attr]
    assert site.check_in(original).certificate.sequence == 3  # type: ignore[union-attr]
    caught = site.check_in(clone)
    assert caught.http_status == 409 and caught.code is ErrorCode.ACTIVATION_CONFLICT
    assert "copy" in caught.message
    assert site.check_in(original).certificate.sequence == 4  # type: ignore[union-attr]
    kinds = [e["kind"] for e in site.show(cid)["events"]]
    assert kinds.count("suspected_clone") == 1


def test_a_lost_reply_is_retried_without_a_false_clone_but_lockstep_copies_are_caught(site: Site) -> None:
    cid = site.registered()
    inst = Installation(cid)
    assert site.activate(inst).status == "active"
    before = inst.certificate
    assert before is not None
    first = site.check_in(inst)
    assert first.certificate is not None
    # The reply was lost: the installation presents its old token again and gets the same certificate.
    inst.certificate = before
    again = site.check_in(inst)
    assert again.status == "active" and again.certificate == first.certificate
    # Two copies checking in in lockstep: each round looks like a retry; by the third round they are caught.
    twin = inst.clone()
    statuses = []
    for _ in range(3):
        held = inst.certificate
        statuses.append(site.check_in(inst).status)  # rotates the token
        twin.certificate = held  # the copy still holds what both held before
        statuses.append(site.check_in(twin).status)  # the previous token again: a retry, or a copy?
    assert statuses[:3] == ["active"] * 3 and "error" in statuses
    assert "suspected_clone" in [e["kind"] for e in site.show(cid)["events"]]


def test_supersede_and_revoke_answer_the_next_check_in_with_a_signed_revocation(site: Site) -> None:
    old, new = site.registered(), site.registered()
    inst = Installation(old)
    assert site.activate(inst).status == "active"
    done = lmcloud_here("supersede", old, new, "--db", site.db)
    assert done.returncode == 0, done.stderr
    answer = site.check_in(inst)
    assert answer.status == "revoked" and answer.http_status == 410 and answer.code is ErrorCode.LICENSE_REVOKED
    assert answer.revocation is not None and answer.revocation.replaced_by == new
    assert new in answer.message
    assert site.activate(Installation(old)).status == "revoked"
    info = site.show(old)
    assert info["state"] == "superseded" and info["replaced_by"] == new
    assert "superseded" in [e["kind"] for e in info["events"]]
    # revoke: no successor, the reason travels.
    cid = site.registered()
    inst = Installation(cid)
    assert site.activate(inst).status == "active"
    assert lmcloud_here("revoke", cid, "--reason", "use at an unlicensed site", "--db", site.db).returncode == 0
    answer = site.check_in(inst)
    assert answer.revocation is not None and answer.revocation.replaced_by is None
    assert answer.revocation.reason == "use at an unlicensed site"
    assert site.show(cid)["state"] == "revoked"
    again = lmcloud_here("revoke", cid, "--reason", "twice", "--db", site.db)
    assert again.returncode == 1 and "already revoked" in again.stderr


def test_offline_request_and_response_round_trip(site: Site) -> None:
    cid = site.registered("expiring")
    inst = Installation(cid)
    request = site.work / f"{cid}.offline-request"
    request.write_text(dumps_document(inst.offline_request()))
    response = site.work / f"{cid}.offline-response"
    done = lmcloud_here("offline-response", str(request), "--key", str(site.key_path), "--out", str(response),
                   "--db", site.db)
    assert done.returncode == 0, done.stderr
    cert = verify_certificate(json.loads(response.read_text()), site.vendor_key.public_key())
    assert cert.how == "offline" and cert.offline and cert.token is None and cert.next_check_in is None
    assert cert.valid_until == datetime(2030, 6, 30, 23, 59, 59, tzinfo=UTC)
    assert cert.fingerprint.matches(inst.fingerprint)
    assert site.show(cid)["activations"][0]["how"] == "offline"
    replay = lmcloud_here("offline-response", str(request), "--key", str(site.key_path), "--out",
                     str(response) + ".2", "--db", site.db)
    assert replay.returncode == 1 and "replayed" in replay.stderr
    other = Installation(cid, hostname="elsewhere")
    request2 = site.work / f"{cid}.offline-request-2"
    request2.write_text(dumps_document(other.offline_request()))
    conflict = lmcloud_here("offline-response", str(request2), "--key", str(site.key_path), "--out",
                       str(response) + ".3", "--db", site.db)
    assert conflict.returncode == 1 and "ACTIVATION_CONFLICT" in conflict.stderr
    assert not Path(str(response) + ".3").exists()
    # An offline activation has nothing to check in to.
    inst.certificate = cert
    assert site.check_in(inst, token="A" * 43, sequence=1).code is ErrorCode.LICENSE_NOT_ACTIVATED


# --------------------------------------------------------------------------------------------------
# Refusals: tampered, malformed, oversized, unknown, replayed; a clear 4xx and nothing written


def _status_and_code(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    assert body["status"] == "error" and body["error"]["message"]
    return response.status_code, body["error"]["code"]


def test_bad_input_is_a_clear_4xx_and_writes_nothing(site: Site) -> None:
    cid = site.registered()
    inst = Installation(cid)
    good = inst.activation("manual")
    tampered = json.loads(json.dumps(good))
    tampered["document"]["hostname"] = "elsewhere"
    foreign = Installation(cid).activation("manual")
    foreign["document"]["installation_key"] = inst.key_text  # signed by another key than the one it names
    wrong_type = json.loads(json.dumps(good))
    wrong_type["document"]["addresses"] = "192.0.2.10"
    unknown = Installation(new_customer_id(os.urandom(10))).activation("manual")
    stale = inst.activation("manual", sent_at=datetime.now(UTC) - timedelta(days=8))
    cases: list[tuple[Any, int, str, str]] = [
        (b"{not json", 400, "BAD_REQUEST", "not valid JSON"),
        (b"[1, 2]", 400, "BAD_REQUEST", "JSON object"),
        (b"\xff\xfe", 400, "BAD_REQUEST", "JSON"),
        ({"document": {}, "signature": "x"}, 400, "BAD_REQUEST", "missing field"),
        (wrong_type, 400, "BAD_REQUEST", "addresses"),
        (tampered, 400, "LICENSE_INVALID", "does not verify"),
        (foreign, 400, "LICENSE_INVALID", "does not verify"),
        (b"x" * (MAX_BODY_BYTES + 1), 413, "BAD_REQUEST", str(MAX_BODY_BYTES)),
        (unknown, 404, "LICENSE_INVALID", "not registered"),
        (stale, 400, "BAD_REQUEST", "clock"),
    ]
    for body, status, code, words in cases:
        for path in ("/v1/activations", "/v1/check-ins"):
            response = site.post(path, body)
            assert response.status_code < 500, (path, body, response.text)
            if path == "/v1/activations":
                assert _status_and_code(response) == (status, code), (body, response.text)
                assert words in response.json()["error"]["message"], response.text
    assert site.show(cid)["activations"] == []
    assert [e["kind"] for e in site.show(cid)["events"]] == ["registered"]
    # Replay: the same signed request twice. The first activates; the second is refused and changes nothing.
    assert site.post("/v1/activations", good).status_code == 200
    replay = site.post("/v1/activations", good)
    assert _status_and_code(replay) == (400, "BAD_REQUEST") and "replayed" in replay.json()["error"]["message"]
    info = site.show(cid)
    assert len(info["activations"]) == 1 and [e["kind"] for e in info["events"]] == ["registered", "activated"]
    # Unknown paths and methods are JSON too.
    assert _status_and_code(site.http.get(site.main.url + "/v1/nothing")) == (404, "BAD_REQUEST")
    assert _status_and_code(site.http.get(site.main.url + "/v1/activations")) == (405, "BAD_REQUEST")


def test_rate_limits_answer_429_with_retry_after(site: Site) -> None:
    limited = site.service(rate_limit_customer=3, rate_limit_address=0)
    cid = site.registered()
    inst = Installation(cid)
    codes = [site.post("/v1/activations", inst.activation("automatic"), limited).status_code for _ in range(5)]
    assert codes == [202, 202, 202, 429, 429]
    response = site.post("/v1/activations", inst.activation("automatic"), limited)
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "RATE_LIMITED" and response.json()["retry_after_seconds"] >= 1
    by_address = site.service(rate_limit_customer=0, rate_limit_address=2)
    codes = [site.post("/v1/activations", b"{}", by_address).status_code for _ in range(3)]
    assert codes == [400, 400, 429]
    metrics = site.http.get(by_address.url + "/metrics").text
    assert 'lmcloud_rate_limited_total{scope="address"} 1.0' in metrics


def test_healthz_and_metrics(site: Site) -> None:
    health = site.http.get(site.later.url + "/healthz").json()
    assert health["status"] == "ok" and health["service"] == "lmcloud"
    ahead = datetime.strptime(health["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) - datetime.now(UTC)
    assert timedelta(hours=24) < ahead < timedelta(hours=25)  # the service's clock, offset included

    def sample(name: str) -> float:
        for line in site.http.get(site.main.url + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    activated = 'lmcloud_activations_total{result="activated"}'
    renewed = 'lmcloud_check_ins_total{result="renewed"}'
    before = (sample(activated), sample(renewed), sample("lmcloud_conflicts_total"))
    cid = site.registered()
    inst = Installation(cid)
    site.activate(inst)
    site.check_in(inst)
    site.activate(Installation(cid, hostname="other"))
    after = (sample(activated), sample(renewed), sample("lmcloud_conflicts_total"))
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 1]
    text = site.http.get(site.main.url + "/metrics").text
    assert 'lmcloud_request_duration_seconds_count{endpoint="activations"}' in text
    assert "lmcloud_suspected_clones_total" in text


# --------------------------------------------------------------------------------------------------
# Two service instances on one database, two machines racing: exactly one wins


def test_two_instances_two_machines_racing_exactly_one_wins(site: Site) -> None:
    second = site.service()
    rounds = 5
    cids = [site.registered() for _ in range(rounds)]
    jobs = []
    for cid in cids:
        a, b = Installation(cid, hostname="racer-a"), Installation(cid, hostname="racer-b")
        jobs += [(cid, a.activation("manual"), site.main), (cid, b.activation("manual"), second)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda job: (job[0], site.post("/v1/activations", job[1], job[2])), jobs))
    listed = {r["customer_id"]: r for r in json.loads(lmcloud_here("list", "--json", "--db", site.db).stdout)}
    for cid in cids:
        statuses = sorted(r.status_code for c, r in results if c == cid)
        assert statuses == [200, 409], (cid, statuses)
        winner = next(r for c, r in results if c == cid and r.status_code == 200).json()
        loser = next(r for c, r in results if c == cid and r.status_code == 409).json()
        assert listed[cid]["state"] == "active"
        assert loser["conflict"]["hostname"] == listed[cid]["hostname"] == winner["certificate"]["document"][
            "hostname"]
    assert len(site.show(cids[0])["activations"]) == 1


# --------------------------------------------------------------------------------------------------
# The commands


def test_register_is_idempotent_and_refuses_another_license_under_the_same_id(site: Site) -> None:
    cid, path = site.license()
    again = lmcloud("register", str(path), "--db", site.db)
    assert again.returncode == 0 and "already registered" in again.stdout
    edited = path.read_text().replace("Test Customer", "Someone Else")
    other = site.work / "edited.lic"
    other.write_text(edited)
    refused = lmcloud_here("register", str(other), "--db", site.db)
    assert refused.returncode == 1 and "different license" in refused.stderr
    listed = json.loads(lmcloud_here("list", "--json", "--db", site.db).stdout)
    assert [r["customer_id"] for r in listed].count(cid) == 1


def test_serve_refuses_a_database_without_the_schema(site: Site, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh.sqlite3"
    done = lmcloud("serve", "--db", str(fresh), "--key", str(site.key_path), "--port", "0")
    assert done.returncode == 1 and "lmcloud db upgrade --db" in done.stderr
    assert lmcloud_here("db", "upgrade", "--db", str(fresh)).returncode == 0
    with sqlite3.connect(fresh) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0000'")
    done = lmcloud_here("serve", "--db", str(fresh), "--key", str(site.key_path), "--port", "0")
    assert done.returncode == 1 and "revision 0000" in done.stderr and "lmcloud db upgrade" in done.stderr
    bad = lmcloud_here("serve", "--db", str(fresh), "--key", str(site.key_path), "--valid-for", "59")
    assert bad.returncode == 1 and "at least 60" in bad.stderr
    negative = lmcloud_here("list", "--db", site.db, env={"LMCLOUD_CLOCK_OFFSET_SECONDS": "-5"})
    assert negative.returncode == 0  # list reads no clock
    refused = lmcloud_here("revoke", "CID-AAAA-AAAA-AAAA-AAAA", "--reason", "x", "--db", site.db,
                      env={"LMCLOUD_CLOCK_OFFSET_SECONDS": "-5"})
    assert refused.returncode == 1 and "forward" in refused.stderr


def test_lmissue_issue_register(site: Site, tmp_path: Path) -> None:
    (tmp_path / "req.yaml").write_text(
        "license_type: multi\ncustomer: Example\nhost: {hostname: licsrv01, ip: 192.0.2.10}\n"
        'products:\n  - {name: CADPRO, version: "2.1", count: 5}\ncloud_url: https://activation.vendor.example\n')
    lmissue = str(Path(sys.executable).parent / "lmissue")
    done = subprocess.run([lmissue, "issue", str(tmp_path / "req.yaml"), "--key", str(site.key_path), "--out",
                           str(tmp_path / "x.lic"), "--register", site.db], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    cid = done.stdout.strip().splitlines()[-1]
    assert "registered " + cid in done.stdout
    assert site.show(cid)["state"] == "pending"


def test_a_database_outage_is_503_store_unavailable_and_the_service_recovers(
        site: Site, request: pytest.FixtureRequest) -> None:
    if not site.db.startswith("postgresql"):
        pytest.skip("the outage is made by closing the PostgreSQL database to connections under the running service")
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    cid = site.registered()
    inst = Installation(cid)
    assert site.activate(inst).status == "active"
    name = site.db.rsplit("/", 1)[1]

    def psql(sql: str) -> None:
        subprocess.run([str(cluster.bindir / "psql"), "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "lmcloud",
                        "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c", sql], check=True, timeout=60,
                       capture_output=True)

    psql(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
    psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
    try:
        response = site.post("/v1/check-ins", inst.check_in())
        assert _status_and_code(response) == (503, "STORE_UNAVAILABLE"), response.text
        health = site.http.get(site.main.url + "/healthz")
        assert _status_and_code(health) == (503, "STORE_UNAVAILABLE")
        outage = parse_answer(response.status_code, response.content, site.vendor_key.public_key())
        assert not outage.service_said_no  # for the daemon: could not reach the service, keep serving
    finally:
        psql(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
    renewed = site.check_in(inst)  # the same token: the failed check-in changed nothing
    assert renewed.status == "active" and renewed.certificate is not None and renewed.certificate.sequence == 2
    assert site.http.get(site.main.url + "/healthz").status_code == 200
