"""``make demo``: issue a demo license for this very machine and start the daemon on it.

The license is signed with the bundled demo vendor key (``lmgrd/vendor/demo_keys/demo_vendor.key``), which is public and
therefore NEVER fit for production: anyone can sign licenses with it.
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path

from lmgrd.cli import main as lmgrd_main
from lmgrd.storage.activations import record_activation
from lmgrd.storage.files import this_host
from lmgrd.storage.host import this_fingerprint
from lmgrd.vendor.signing import CUSTOMER_ID_RANDOM_BYTES, load_private_key, new_customer_id, sign_license
from protocol.license import License, Product
from protocol.validation import hostname_problem, short_hostname

DEMO_DIR = Path(__file__).with_name("demo_keys")


def _demo_ip(addresses: tuple[str, ...]) -> str:
    for addr in addresses:
        if "." in addr and not addr.startswith("127."):
            return addr
    return "127.0.0.1"


def main() -> int:
    port = int(os.environ.get("LMGRD_DEMO_PORT", "27000"))
    state = Path(os.environ.get("LMGRD_DEMO_STATE", "demo-state")).resolve()
    state.mkdir(parents=True, exist_ok=True)
    host = this_host()
    hostname = short_hostname(socket.gethostname())
    problem = hostname_problem(hostname)
    if problem:
        print(f"make demo: {problem}", file=sys.stderr)
        return 1
    ip = _demo_ip(host.addresses)
    key = load_private_key((DEMO_DIR / "demo_vendor.key").read_bytes())
    lic = License(
        customer_id=new_customer_id(os.urandom(CUSTOMER_ID_RANDOM_BYTES)), license_type="multi",
        customer="Demo Customer",
        hostname=hostname, ip=ip, products=(Product("CADPRO", "2.1", 5), Product("VIEWER", "11.0", 20)),
        issued_at=datetime.now(UTC), expires=None, site_networks=(), share="user_host",
    )
    lic_path = state / "demo.lic"
    lic_path.write_text(sign_license(lic, key), encoding="utf-8")
    # A fresh license is pending for 24 hours; the demo activates it at once, as `lmutil activate` would.
    record_activation(state, lic, "make demo", this_fingerprint())
    print(f"""
  lmgrd demo: license {lic.customer_id} for {hostname} ({ip}), CADPRO 2.1 x5 and VIEWER 11.0 x20
  signed with the bundled DEMO vendor key: never use it in production.

  From a second terminal:
    .venv/bin/lmclient checkout CADPRO --version 2.1 -c {port}@localhost
    .venv/bin/lmclient status -c {port}@localhost
  or, in Python:
    from client_stub import LicenseClient
    with LicenseClient("{port}@localhost") as lm, lm.checkout("CADPRO", version="2.1") as seat:
        print(seat.token)

  Ctrl-C stops the daemon (leases are kept in {state}).
""", flush=True)
    return lmgrd_main([
        "--license", str(lic_path), "--vendor-key", str(DEMO_DIR / "demo_vendor.pub"), "--port", str(port),
        "--state-dir", str(state), "--heartbeat-interval", "5", "--lease-timeout", "15",
    ])


if __name__ == "__main__":
    sys.exit(main())
