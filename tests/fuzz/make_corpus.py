"""Write the seed corpus of tests/fuzz (a few small, valid inputs per target) from the project's own encoders.

Run it again after a format change: ``.venv/bin/python tests/fuzz/make_corpus.py``. Deterministic (fixed
customer IDs and times, the public demo vendor key), so the committed files only change when a format does.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, date, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lmgrd.vendor.signing import load_private_key, sign_license, sign_revocation
from protocol import encode_frame
from protocol.license import License, Product, Revocation
from protocol.samples import REPLIES, REQUESTS
from tests.fuzz.targets import CORPUS, DEMO_KEYS

CID = "CID-AAAA-BBBB-CCCC-DDDD"
AT = datetime(2026, 1, 1, 9, 30, tzinfo=UTC)


def main() -> None:
    key = load_private_key((DEMO_KEYS / "demo_vendor.key").read_bytes())
    requests, replies = REQUESTS.values(), REPLIES.values()
    lic = License(customer_id=CID, license_type="multi", customer="Example Engineering", hostname="licsrv01",
                  ip="192.0.2.10", products=(Product("CADPRO", "2.1", 25), Product("VIEWER", "5", 100)),
                  issued_at=AT, expires=date(2099, 12, 31), site_networks=("192.0.2.0/24",), share="user_host")
    rev = Revocation(CID, AT, "moved to a new server", "CID-EEEE-FFFF-GGGG-HHHH")
    seeds: dict[str, list[bytes]] = {
        "frame_decoder": [b"".join(encode_frame(r.to_wire()) for r in requests)],
        "server_connection": [b"".join(encode_frame(r.to_wire()) for r in requests)],
        "client_connection": [b"".join(encode_frame(r.to_wire()) for r in replies)],
        "license_file": [sign_license(lic, key).encode()],
        "revocation_file": [sign_revocation(rev, key).encode(),
                            (sign_revocation(rev, key) + "\n" + sign_revocation(rev, key)).encode()],
        "options_file": [b"GROUP designers alice bob\nRESERVE 1 CADPRO GROUP designers\nMAX 1 CADPRO USER carol\n"
                         b"EXCLUDE VIEWER USER lori\nTIMEOUT VIEWER 900\nINCLUDE CADPRO HOST_GROUP lab\n"
                         b"HOST_GROUP lab lab-pc1 lab-pc2\nINCLUDEALL INTERNET 192.0.2.*\nNOLOG QUEUED\n"],
        "config_file": [b"port: 27000\nheartbeat_interval: 30\nlease_timeout: 90\nmetrics_port: auto\n"
                        b"groups: {designers: [alice, bob]}\nhost_groups: {lab: [lab-pc1]}\n"
                        b"policy:\n  CADPRO:\n    reserve: [{group: designers, seats: 1}]\n"
                        b"    max: [{user: carol, seats: 1}]\n    exclude: [{host_group: lab}]\n    timeout: 900\n"
                        b"site_networks: [192.0.2.0/24]\nrevocations: [a.rev]\n"],
        "registration_request": [b"license_type: multi\ncustomer: Example Engineering Tokyo\n"
                                 b"host: {hostname: licsrv01, ip: 192.0.2.10}\nproducts:\n"
                                 b"  - {name: CADPRO, version: \"2.1\", count: 25}\nexpires: 2099-12-31\n"
                                 b"site_networks: [192.0.2.0/24]\nshare: user_host\n"],
        "activation_records": [json.dumps({"format": 1, "activations": {CID: {
            "activated_at": "2026-01-01T09:30:00Z", "how": "auto", "fingerprint": "f" * 64}}}).encode()],
    }
    for target, items in seeds.items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("seed-*"):
            old.unlink()
        for i, data in enumerate(items):
            (folder / f"seed-{i}").write_bytes(data)
    print(f"wrote {sum(map(len, seeds.values()))} seeds to {CORPUS}")


if __name__ == "__main__":
    main()
