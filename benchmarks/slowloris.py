"""Slowloris benchmark (issue 9): honest clients' latency with and without slow connections held open.

One command, JSON on stdout:

    .venv/bin/python benchmarks/slowloris.py [--slow 5000] [--honest 100] [--out FILE]

Starts ``lmgrd`` (its default handshake and monitoring timeouts, no per-address cap) on a fresh license with
``--honest`` seats, then for each port:

- license port: ``--honest`` clients each hello, check out, heartbeat 3 times and check in (6 round trips),
  first alone (unloaded, after one warm-up run that is not reported), then while ``--slow`` silent and ``--slow``
  trickling connections (a hello a byte every 0.5 s) are held open (loaded);
- monitoring port: the same clients GET /healthz 3 times each, unloaded, then against ``--slow`` + ``--slow``
  slow HTTP connections.

Reports p50/p99/max per run, the loaded/unloaded p99 ratio, failures, and what became of the slow connections
(dropped by the server, with HANDSHAKE_TIMEOUT). The load generator shares the machine with the daemon: the CPU
both used is reported. Nothing is asserted; tests/integration/test_slowloris.py checks the counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from harness import Daemon, write_keys, write_license  # noqa: E402
from slowloris import (  # noqa: E402
    TRICKLED_HEAD,
    TRICKLED_HELLO,
    Honest,
    honest_http_client,
    honest_license_client,
    run_attack,
)

from lmgrd.storage.host import raise_nofile  # noqa: E402


async def _unloaded(honest: Any, clients: int) -> Honest:
    out = Honest()
    await asyncio.gather(*(honest(i, out) for i in range(clients)))
    return out


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def scenario(name: str, port: int, honest: Any, payload: bytes, slow: int, clients: int,
             daemon: psutil.Process, drop_within: float) -> dict[str, Any]:
    me = psutil.Process()
    result: dict[str, Any] = {}
    asyncio.run(_unloaded(honest, clients))  # warm-up, not reported: the first connections pay one-time costs
    for phase in ("unloaded", "loaded"):
        d0, g0, t0 = _cpu(daemon), _cpu(me), time.monotonic()
        if phase == "unloaded":
            out = asyncio.run(_unloaded(honest, clients))
            attack = None
        else:
            attack, out = asyncio.run(run_attack("127.0.0.1", port, silent=slow, trickling=slow, payload=payload,
                                                 trickle_interval=0.5, honest=honest, honest_clients=clients,
                                                 drop_within=drop_within))
        wall = time.monotonic() - t0
        result[phase] = {**out.summary(), "wall_s": round(wall, 3),
                         "daemon_cpu_s": round(_cpu(daemon) - d0, 3), "generator_cpu_s": round(_cpu(me) - g0, 3)}
        if attack is not None:
            result[phase]["slow"] = attack.summary()
    un, lo = result["unloaded"]["p99_ms"], result["loaded"]["p99_ms"]
    result["p99_ratio_loaded_to_unloaded"] = round(lo / un, 2) if un and lo else None
    print(f"{name}: p99 unloaded {un} ms, loaded {lo} ms, ratio {result['p99_ratio_loaded_to_unloaded']}",
          file=sys.stderr, flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slow", type=int, default=5000, help="slow connections of each kind per port (default 5000)")
    p.add_argument("--honest", type=int, default=100, help="honest clients (default 100)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    ns = p.parse_args()
    limit = raise_nofile()
    work = Path(tempfile.mkdtemp(prefix="lmgrd-slowloris-"))
    key, pub = write_keys(work / "vendor")
    lic = work / "site.lic"
    write_license(lic, key, (("CADPRO", "2.1", ns.honest),), share="none")
    d = Daemon(work, [lic], pub, heartbeat=30.0, lease_timeout=90.0,
               extra=["--metrics-port", "auto", "--max-connections-per-address", "0", "--log-level", "info"])
    d.start()
    try:
        assert d.proc is not None
        daemon = psutil.Process(d.proc.pid)
        mport = urlsplit(d.metrics_url()).port
        assert mport is not None

        async def lic_client(i: int, out: Honest) -> None:
            await honest_license_client("127.0.0.1", d.port, i, "CADPRO", "2.1", 3, out)

        async def http_client(i: int, out: Honest) -> None:
            await honest_http_client("127.0.0.1", mport, i, 3, out)

        report: dict[str, Any] = {
            "command": " ".join(["benchmarks/slowloris.py", *sys.argv[1:]]),
            "cores": os.cpu_count(), "open_file_limit": limit, "slow_per_kind": ns.slow, "honest_clients": ns.honest,
            "daemon_defaults": {"handshake_timeout_s": 10, "metrics_header_timeout_s": 5,
                                "metrics_max_connections": 512},
            "license_port": scenario("license port", d.port, lic_client, TRICKLED_HELLO, ns.slow, ns.honest, daemon,
                                     drop_within=40),
            "monitoring_port": scenario("monitoring port", mport, http_client, TRICKLED_HEAD, ns.slow, ns.honest,
                                        daemon, drop_within=40),
            "daemon_alive": d.proc.poll() is None,
        }
    finally:
        d.stop()
    text = json.dumps(report, indent=2)
    print(text)
    if ns.out:
        ns.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
