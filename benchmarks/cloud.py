"""Activation service throughput: activations and check-ins per second against ``lmcloud serve`` over HTTPS, on
SQLite and on PostgreSQL, with 1 and 2 service processes, p50/p99 latency, and the headroom over the 1.2
check-ins/s a vendor with 100,000 installations checking in daily needs on average.

    .venv/bin/python benchmarks/cloud.py [--installations 300] [--seconds 5] [--concurrency 32]

Each configuration gets a fresh database (``lmcloud db upgrade``), its licenses registered with one
``lmcloud register``, and fresh ``lmcloud serve`` processes (TLS from a trustme CA, rate limits off, PostgreSQL
with its default durable commits; SQLite in WAL mode). The load generator is this process: asyncio with one
httpx client per service process (keep-alive connections), ``--concurrency`` requests in flight, requests signed
ahead of time so that the client spends its CPU on HTTP. Every installation activates once (manual), then
checks in again and again with its latest token for ``--seconds``; every answer is checked (200 and the
expected sequence), so a wrong answer fails the run rather than counting. It reports, never asserts, times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cloud_harness import TLS, CloudService, Installation, PostgresCluster, lmcloud

from lmgrd.vendor.signing import dump_private_key, new_customer_id, sign_license
from protocol.license import License, Product

NEEDED_CHECK_INS_PER_SECOND = 100_000 / 86_400


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _run_load(services: list[CloudService], tls: TLS, installations: list[Installation], seconds: float,
                    concurrency: int) -> dict[str, Any]:
    ctx = tls.client_context()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    clients = [httpx.AsyncClient(verify=ctx, timeout=60, limits=limits, base_url=s.url) for s in services]
    headers = {"content-type": "application/json"}
    try:
        # Activations: every installation once, `concurrency` at a time, spread over the services.
        bodies = [json.dumps(inst.activation("manual")).encode() for inst in installations]
        latencies: list[float] = []
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(installations)):
            queue.put_nowait(i)

        async def activate_worker(w: int) -> None:
            while not queue.empty():
                i = queue.get_nowait()
                client = clients[i % len(clients)]
                t0 = time.perf_counter()
                response = await client.post("/v1/activations", content=bodies[i], headers=headers)
                latencies.append(time.perf_counter() - t0)
                if response.status_code != 200:
                    raise RuntimeError(f"activation {i}: HTTP {response.status_code} {response.text[:300]}")
                doc = response.json()["certificate"]["document"]
                installations[i].certificate = doc  # type: ignore[assignment]  # the raw document is enough here

        t0 = time.perf_counter()
        await asyncio.gather(*(activate_worker(w) for w in range(concurrency)))
        activation_seconds = time.perf_counter() - t0
        act = {"count": len(latencies), "per_second": len(latencies) / activation_seconds,
               "p50_ms": _percentile(latencies, 0.5) * 1000, "p99_ms": _percentile(latencies, 0.99) * 1000}

        # Check-ins: each worker owns a slice of the installations and checks them in round-robin.
        check_latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        def check_in_body(inst: Installation) -> bytes:
            doc: Any = inst.certificate
            return json.dumps(inst.check_in(token=doc["token"], sequence=doc["sequence"])).encode()

        async def check_in_worker(w: int) -> None:
            mine = installations[w::concurrency]
            n = 0
            while time.perf_counter() < deadline and mine:
                inst = mine[n % len(mine)]
                n += 1
                body = check_in_body(inst)
                client = clients[n % len(clients)]
                t0 = time.perf_counter()
                response = await client.post("/v1/check-ins", content=body, headers=headers)
                check_latencies.append(time.perf_counter() - t0)
                expected = inst.certificate["sequence"] + 1  # type: ignore[index]
                if response.status_code != 200:
                    raise RuntimeError(f"check-in: HTTP {response.status_code} {response.text[:300]}")
                doc = response.json()["certificate"]["document"]
                if doc["sequence"] != expected:
                    raise RuntimeError(f"check-in: sequence {doc['sequence']}, expected {expected}")
                inst.certificate = doc

        t0 = time.perf_counter()
        await asyncio.gather(*(check_in_worker(w) for w in range(concurrency)))
        check_seconds = time.perf_counter() - t0
        chk = {"count": len(check_latencies), "per_second": len(check_latencies) / check_seconds,
               "p50_ms": _percentile(check_latencies, 0.5) * 1000,
               "p99_ms": _percentile(check_latencies, 0.99) * 1000}
        return {"activations": act, "check_ins": chk}
    finally:
        for client in clients:
            await client.aclose()


def _licenses(work: Path, key: Ed25519PrivateKey, n: int) -> tuple[list[str], list[str]]:
    cids, files = [], []
    issued = datetime.now(UTC) - timedelta(hours=1)
    for _ in range(n):
        lic = License(new_customer_id(os.urandom(10)), "multi", "Bench", "licsrv01", "192.0.2.10",
                      (Product("CADPRO", "2.1", 5),), issued, date(2031, 12, 31), (), "user_host",
                      "https://127.0.0.1:8443")
        path = work / f"{lic.customer_id}.lic"
        path.write_text(sign_license(lic, key))
        cids.append(lic.customer_id)
        files.append(str(path))
    return cids, files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--installations", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lmcloud-bench-"))
    key = Ed25519PrivateKey.generate()
    key_path = work / "vendor.key"
    key_path.write_bytes(dump_private_key(key))
    tls = TLS(work / "tls")
    cluster = PostgresCluster(fsync=True).start()
    results: list[dict[str, Any]] = []
    load_start = os.getloadavg()
    try:
        for backend in ("sqlite", "postgresql"):
            for processes in (1, 2):
                name = f"{backend}_{processes}"
                db = (f"sqlite:///{work}/{name}.sqlite3" if backend == "sqlite"
                      else cluster.create_database(f"bench_{name}"))
                done = lmcloud("db", "upgrade", "--db", db)
                if done.returncode:
                    raise RuntimeError(done.stderr)
                cids, files = _licenses(work, key, args.installations)
                done = lmcloud("register", *files, "--db", db, timeout=600)
                if done.returncode:
                    raise RuntimeError(done.stderr)
                services = [CloudService(db, key_path, tls, valid_for=30 * 86_400, log=work / f"{name}-{i}.log")
                            for i in range(processes)]
                for s in services:
                    s.start()
                try:
                    procs = [psutil.Process(s.proc.pid) for s in services if s.proc is not None]
                    cpu0 = [p.cpu_times() for p in procs]
                    wall0 = time.perf_counter()
                    client0 = time.process_time()
                    out = asyncio.run(_run_load(services, tls, [Installation(c) for c in cids], args.seconds,
                                                args.concurrency))
                    wall = time.perf_counter() - wall0
                    cpu = sum((b.user + b.system) - (a.user + a.system)
                              for a, b in zip(cpu0, [p.cpu_times() for p in procs], strict=True))
                    requests = out["activations"]["count"] + out["check_ins"]["count"]
                    out.update(backend=backend, processes=processes, service_cpu_percent=100 * cpu / wall,
                               service_cpu_ms_per_request=1000 * cpu / requests,
                               client_cpu_percent=100 * (time.process_time() - client0) / wall)
                    results.append(out)
                    print(f"{name}: {json.dumps(out)}", file=sys.stderr, flush=True)
                finally:
                    for s in services:
                        s.stop()
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    load_end = os.getloadavg()

    print(f"- command: `.venv/bin/python benchmarks/cloud.py --installations {args.installations} --seconds "
          f"{args.seconds:g} --concurrency {args.concurrency}`")
    print(f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}; {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, load average at start {tuple(round(x, 2) for x in load_start)}, at end "
          f"{tuple(round(x, 2) for x in load_end)}")
    print()
    print("| database | service processes | activations/s | activation p50 / p99 (ms) | check-ins/s | "
          "check-in p50 / p99 (ms) | headroom over 1.2 check-ins/s | service CPU % (ms per request) | "
          "load generator CPU % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        a, c = r["activations"], r["check_ins"]
        print(f"| {r['backend']} | {r['processes']} | {a['per_second']:.0f} | {a['p50_ms']:.1f} / {a['p99_ms']:.1f} | "
              f"{c['per_second']:.0f} | {c['p50_ms']:.1f} / {c['p99_ms']:.1f} | "
              f"{c['per_second'] / NEEDED_CHECK_INS_PER_SECOND:,.0f}x | {r['service_cpu_percent']:.0f} "
              f"({r['service_cpu_ms_per_request']:.1f}) | {r['client_cpu_percent']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nOne run per configuration; p50/p99 over every request of the phase. 100,000 installations checking "
          f"in daily need {NEEDED_CHECK_INS_PER_SECOND:.2f} check-ins/s on average.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
