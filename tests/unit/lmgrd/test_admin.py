"""Admin commands against a real Server without sockets (lmgrd.admin.commands.handle, plugged in by
enable_admin as lmgrd does): the token check, lmstat's view, lmremove through the lease lifecycle, lmreread."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from daemon_rig import Rig, run

from lmgrd.admin.commands import COMMANDS, enable_admin
from lmgrd.config import DaemonConfig
from lmgrd.core.licensing import Licensing
from lmgrd.daemon.events import EndReason
from lmgrd.storage.files import load_licensing
from protocol import Admin, ErrorCode, Heartbeat


def _enable(rig: Rig, tmp_path: Path) -> str:
    rig.server.ports = [27000]
    rig.server.cfg = dataclasses.replace(rig.server.cfg, admin_token_file=tmp_path / "admin.token")
    enable_admin(rig.server)
    token = (tmp_path / "admin.token").read_text().strip()
    assert token == rig.server.admin_token and len(token) > 30
    return token


def test_admin_needs_the_token_and_names_unknown_commands(tmp_path: Path, vendor: tuple[Ed25519PrivateKey, Path]
                                                          ) -> None:
    async def body(rig: Rig) -> None:
        token = _enable(rig, tmp_path)
        s = rig.connect("root")
        (wrong,) = rig.send(s, Admin(rig.rid(), "lmstat", {}, "not-the-token"))
        assert wrong["op"] == "error" and wrong["code"] == ErrorCode.NOT_AUTHORIZED
        (none,) = rig.send(s, Admin(rig.rid(), "lmstat", {}, ""))
        assert none["code"] == ErrorCode.NOT_AUTHORIZED
        (unknown,) = rig.send(s, Admin(rig.rid(), "lmfrobnicate", {}, token))
        assert unknown["code"] == ErrorCode.BAD_REQUEST and "lmfrobnicate" in unknown["message"]
        assert all(name in unknown["message"] for name in ("lmstat", "lmremove", "lmreread"))
        assert {"lmstat", "lmremove", "lmreread", "lmdown", "lmhostid", "activate"} <= set(COMMANDS)

    run(tmp_path, vendor, body)


def test_lmstat_shows_holders_and_lmremove_ends_through_the_lifecycle(tmp_path: Path,
                                                                      vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    async def body(rig: Rig) -> None:
        token = _enable(rig, tmp_path)
        alice = rig.connect("alice", "pc1", pid=77)
        g = rig.checkout(alice)
        op = rig.connect("root")
        (stat,) = rig.send(op, Admin(rig.rid(), "lmstat", {"all": True}, token))
        assert stat["op"] == "status"
        (lease,) = stat["data"]["leases"]
        assert (lease["user"], lease["host"], lease["pid"], lease["product"]) == ("alice", "pc1", 77, "CADPRO")
        assert stat["data"]["pools"][0]["in_use"] == 1
        (removed,) = rig.send(op, Admin(rig.rid(), "lmremove", {"token": g["token"][:8]}, token))
        assert [x["token"] for x in removed["data"]["removed"]] == [g["token"]]
        assert g["token"] not in rig.journal()
        assert ("release", (g["token"], EndReason.REMOVAL)) in rig.recorder.events
        (ack,) = rig.send(alice, Heartbeat(rig.rid(), False))
        assert [x["code"] for x in ack["lost"]] == [ErrorCode.SEAT_REMOVED]
        (again,) = rig.send(op, Admin(rig.rid(), "lmremove", {"token": g["token"]}, token))
        assert again["code"] == ErrorCode.LEASE_NOT_FOUND

    run(tmp_path, vendor, body)


def test_lmreread_keeps_a_license_whose_new_file_is_refused(tmp_path: Path,
                                                            vendor: tuple[Ed25519PrivateKey, Path]) -> None:
    def reload(cfg: DaemonConfig) -> tuple[Licensing, list[str]]:
        cfg.licenses[0].write_text("damaged\n")
        return load_licensing(cfg)

    async def body(rig: Rig) -> None:
        token = _enable(rig, tmp_path)
        alice = rig.connect("alice")
        g = rig.checkout(alice)
        (reply,) = rig.send(rig.connect("root"), Admin(rig.rid(), "lmreread", {}, token))
        data = reply["data"]
        assert data["reloaded"] is True and data["serving"] == [g["customer_id"]]
        assert any("keeps serving" in p for p in data["problems"])
        assert g["token"] in rig.journal()  # nothing ended

    run(tmp_path, vendor, body, reload=reload)
