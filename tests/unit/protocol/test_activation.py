"""protocol.activation: one record format for the license server and single-user activation.

A record written by one side is read by the other, through each side's real file code (in a temp dir).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from client_stub import activation as single_user
from client_stub.errors import SeatDenied
from lmgrd.storage.activations import ACTIVATIONS_FILE, open_activations
from protocol import ErrorCode
from protocol.activation import AUTO_ACTIVATION_AFTER, ActivationRecord, auto_activation_at
from protocol.fingerprint import Fingerprint
from protocol.license import License, Product

ISSUED = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
SOON = ISSUED + timedelta(hours=1)  # well before the automatic activation
HERE = Fingerprint.of("pc1", "0123456789abcdef", ["02:00:00:00:00:01", "02:00:00:00:00:02"])
ELSEWHERE = Fingerprint.of("pc2", "fedcba9876543210", ["02:00:00:00:00:09"])
FIELDS = {"customer_id", "fingerprint", "host", "machine", "macs", "hostname", "activated_at", "how"}


def lic(license_type: str = "single") -> License:
    return License("CID-ABCD-EFGH-IJKL-MNOP", license_type, "Example", "pc1", "192.0.2.10",  # type: ignore[arg-type]
                   (Product("CADPRO", "2.1", 1),), ISSUED, None, (), "user_host")


def test_auto_activation_is_24_hours_after_issue() -> None:
    assert timedelta(hours=24) == AUTO_ACTIVATION_AFTER
    assert auto_activation_at(lic()) == datetime(2026, 3, 2, 12, 0, 0, tzinfo=UTC)


def test_to_json_writes_exactly_the_stored_fields_and_reads_back() -> None:
    at = datetime(2026, 3, 1, 21, 30, 5, 999, tzinfo=UTC).astimezone(datetime.now().astimezone().tzinfo)
    rec = ActivationRecord("CID-ABCD-EFGH-IJKL-MNOP", HERE, "pc1.corp.example", at, "lmutil activate")
    data = rec.to_json()
    assert set(data) == FIELDS
    assert data["activated_at"] == "2026-03-01T21:30:05Z"  # UTC, whole seconds, whatever zone was passed
    assert data["fingerprint"] == HERE.digest and data["macs"] == sorted(HERE.macs)
    assert (data["host"], data["machine"], data["hostname"]) == (HERE.host, HERE.machine, "pc1.corp.example")
    back = ActivationRecord.from_json(rec.customer_id, json.loads(json.dumps(data)))
    assert back == ActivationRecord(rec.customer_id, HERE, rec.hostname, at.replace(microsecond=0), rec.how)
    assert back.activated_at.tzinfo is UTC


@pytest.mark.parametrize(("data", "fragment"), [
    ([], "not a mapping"),
    ({"host": "h", "machine": "m", "macs": "aa", "activated_at": "2026-03-01T12:00:00Z"}, "'macs'"),
    ({"host": "h", "machine": "m", "macs": [1], "activated_at": "2026-03-01T12:00:00Z"}, "'macs'"),
    ({"host": 1, "machine": "m", "activated_at": "2026-03-01T12:00:00Z"}, "'host' and 'machine'"),
    ({"host": "h", "activated_at": "2026-03-01T12:00:00Z"}, "'host' and 'machine'"),
    ({"host": "h", "machine": "m", "activated_at": "yesterday"}, "yesterday"),
])
def test_a_damaged_record_is_a_value_error(data: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        ActivationRecord.from_json("CID-X", data)


def test_a_record_the_license_server_writes_is_read_by_single_user_activation(tmp_path: Path) -> None:
    server = open_activations(tmp_path / "state", fingerprint=HERE, hostname="pc1")
    server.activate(lic(), SOON, "lmutil activate")
    doc = json.loads((tmp_path / "state" / ACTIVATIONS_FILE).read_text(encoding="utf-8"))
    assert doc["format"] == 1  # the daemon's container
    written = doc["activations"][lic().customer_id]
    assert set(written) == FIELDS
    user_file = tmp_path / "user" / "activations.json"
    user_file.parent.mkdir()
    user_file.write_text(json.dumps({lic().customer_id: written}), encoding="utf-8")  # the client's container
    single_user.check_activation(lic(), "pc.lic", SOON, user_file, HERE)  # active on this PC, before the 24 h
    with pytest.raises(SeatDenied) as info:
        single_user.check_activation(lic(), "pc.lic", SOON, user_file, ELSEWHERE)
    assert info.value.code is ErrorCode.LICENSE_MOVED and "(pc1)" in info.value.message
    again = single_user.activate(lic(), SOON + timedelta(minutes=5), user_file, HERE, "pc1")
    assert again == ActivationRecord.from_json(lic().customer_id, written)  # idempotent: the server's record


def test_a_record_single_user_activation_writes_is_read_by_the_license_server(tmp_path: Path) -> None:
    user_file = tmp_path / "user" / "activations.json"
    rec = single_user.activate(lic(), SOON, user_file, HERE, "pc1")
    written = json.loads(user_file.read_text(encoding="utf-8"))[lic().customer_id]
    assert written == rec.to_json() and set(written) == FIELDS and written["how"] == "lmclient activate"
    state = tmp_path / "state"
    state.mkdir()
    (state / ACTIVATIONS_FILE).write_text(json.dumps({"format": 1, "activations": {lic().customer_id: written}}),
                                          encoding="utf-8")
    here = open_activations(state, fingerprint=HERE, hostname="pc1")
    assert here.problems == [] and here.records[lic().customer_id] == rec.__class__(
        rec.customer_id, rec.fingerprint, rec.hostname, rec.activated_at.replace(microsecond=0), rec.how)
    assert here.state(lic("multi"), SOON) == "active"
    moved = open_activations(state, fingerprint=ELSEWHERE, hostname="pc2")
    assert moved.state(lic("multi"), SOON) == "moved"


def test_both_sides_write_the_same_record_for_the_same_activation(tmp_path: Path) -> None:
    server = open_activations(tmp_path / "state", fingerprint=HERE, hostname="pc1").activate(lic(), SOON, "x")
    client = single_user.activate(lic(), SOON, tmp_path / "user.json", HERE, "pc1")
    assert {**server.to_json(), "how": ""} == {**client.to_json(), "how": ""}
