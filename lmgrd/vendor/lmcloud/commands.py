"""``lmcloud``: the vendor's activation service and its admin commands.

  lmcloud db upgrade [--db URL]                       create or upgrade the schema (Alembic)
  lmcloud serve --key vendor.key [--bind ADDR] [--port N] [--tls-cert F --tls-key F] [--valid-for SECONDS]
  lmcloud register FILE.lic [FILE.lic ...]            record issued customer IDs (idempotent)
  lmcloud list [--json]  |  lmcloud show CUSTOMER_ID [--json]
  lmcloud supersede OLD_CID NEW_CID [--reason TEXT]   the old server's next check-in gets a revocation
  lmcloud revoke CUSTOMER_ID --reason TEXT
  lmcloud offline-response REQUEST_FILE --key vendor.key --out RESPONSE_FILE

Every command takes ``--db URL`` (default ``$LMCLOUD_DB``, else a SQLite file in the platform data dir);
``postgresql://USER@HOST:PORT/DB`` for PostgreSQL. Exit codes: 0 success, 1 a problem (explained on stderr),
2 bad usage. The service's clock is the system's plus ``LMCLOUD_CLOCK_OFFSET_SECONDS`` (tests; forward only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Final, TextIO, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lmgrd import LmgrdError
from lmgrd.storage.atomic import write_atomic
from lmgrd.storage.host import clock_offset
from lmgrd.vendor.lmcloud.db import DatabaseError, check_schema, default_db_url, display_url, make_engine, upgrade
from lmgrd.vendor.lmcloud.store import Refusal, Store
from lmgrd.vendor.signing import load_private_key
from protocol.cloud import CloudDocumentError, dumps_document, loads_document, verify_offline_request
from protocol.errors import ProtocolError
from protocol.license import customer_id_problem
from protocol.validation import text_field_problem

__all__ = ["CLOCK_OFFSET_ENV", "DEFAULT_VALID_FOR_SECONDS", "MIN_VALID_FOR_SECONDS", "main", "register_license_text"]

CLOCK_OFFSET_ENV: Final = "LMCLOUD_CLOCK_OFFSET_SECONDS"
DEFAULT_VALID_FOR_SECONDS: Final = 30 * 86_400
MIN_VALID_FOR_SECONDS: Final = 60
DEFAULT_PORT: Final = 8443
_MAX_FILE_BYTES: Final = 1_000_000
_T = TypeVar("_T")


class _Failure(Exception):
    """A problem already worded for the user; main() prints it and exits 1."""


def service_clock() -> Callable[[], float]:
    """The service's clock: epoch seconds, ``LMCLOUD_CLOCK_OFFSET_SECONDS`` ahead (forward only)."""
    try:
        offset = clock_offset(name=CLOCK_OFFSET_ENV)
    except LmgrdError as exc:
        raise _Failure(str(exc)) from None
    if offset:
        logging.getLogger(__name__).warning("%s=%g: the service's clock runs ahead of the system clock (tests only)",
                                            CLOCK_OFFSET_ENV, offset)
    return lambda: time.time() + offset


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise _Failure(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if len(data) > _MAX_FILE_BYTES:
        raise _Failure(f"{path}: too large to be a {what}")
    return data


def _text(path: str, what: str) -> str:
    try:
        return _read(path, what).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Failure(f"{path}: the {what} is not UTF-8 text (bad byte at offset {exc.start})") from None


def _key(path: str) -> Ed25519PrivateKey:
    try:
        return load_private_key(_read(path, "vendor private key"), path)
    except ProtocolError as exc:
        raise _Failure(exc.message + (f"\n  what to do: {exc.hint}" if exc.hint else "")) from None


def _refusal_text(refusal: Refusal) -> str:
    return f"{refusal.code}: {refusal.message}" + (f"\n  what to do: {refusal.hint}" if refusal.hint else "")


async def _with_store(db: str, key: Ed25519PrivateKey | None, valid_for: int,
                      work: Callable[[Store], Awaitable[_T]]) -> _T:
    try:
        engine = make_engine(db)
    except DatabaseError as exc:
        raise _Failure(str(exc)) from None
    try:
        await check_schema(engine, db)
        return await work(Store(engine, key, valid_for))
    except DatabaseError as exc:
        raise _Failure(str(exc)) from None
    except Refusal as refusal:
        raise _Failure(_refusal_text(refusal)) from None
    finally:
        await engine.dispose()


def _run(coro: Awaitable[_T]) -> _T:
    async def main() -> _T:
        return await coro

    return asyncio.run(main())


# --------------------------------------------------------------------------------------------------
# Commands


def _cmd_db_upgrade(args: argparse.Namespace, out: TextIO) -> int:
    try:
        before, after = _run(upgrade(args.db))
    except DatabaseError as exc:
        raise _Failure(str(exc)) from None
    if before == after:
        print(f"{display_url(args.db)}: schema already at revision {after}", file=out)
    else:
        print(f"{display_url(args.db)}: schema upgraded from {before or '(empty)'} to {after}", file=out)
    return 0


def register_license_text(db_url: str, text: str, source: str) -> str:
    """Record an issued license (``lmcloud register``, ``lmissue issue --register``); returns a one-line summary.

    Raises:
        Exception: worded for the user (an unreadable license, a database problem, another license under
            the same customer ID).
    """
    now = int(service_clock()())
    cid, new, lic = _run(_with_store(db_url, None, DEFAULT_VALID_FOR_SECONDS,
                                     lambda store: store.register(text, source, now)))
    where = display_url(db_url)
    line = f"registered {cid} in {where}" if new else f"{cid} was already registered in {where} (unchanged)"
    if lic.cloud_url is None:
        line += ("\n  note: this license has no cloud_url, so its activation is decided on the license server "
                 "(24 hours after issue), not by this service")
    return line


def _cmd_register(args: argparse.Namespace, out: TextIO) -> int:
    texts = [(path, _text(path, "license")) for path in args.files]  # every file readable before any is recorded
    now = int(service_clock()())

    async def work(store: Store) -> list[tuple[str, bool, str | None]]:
        return [(cid, new, lic.cloud_url) for cid, new, lic in
                [await store.register(text, path, now) for path, text in texts]]

    where = display_url(args.db)
    for cid, new, cloud_url in _run(_with_store(args.db, None, DEFAULT_VALID_FOR_SECONDS, work)):
        print(f"registered {cid} in {where}" if new else f"{cid} was already registered in {where} (unchanged)",
              file=out)
        if cloud_url is None:
            print(f"  note: {cid} has no cloud_url, so its activation is decided on the license server (24 hours "
                  "after issue), not by this service", file=out)
    return 0


def _cmd_list(args: argparse.Namespace, out: TextIO) -> int:
    rows = _run(_with_store(args.db, None, DEFAULT_VALID_FOR_SECONDS, lambda store: store.list_customers()))
    if args.json:
        print(json.dumps(rows, indent=2), file=out)
        return 0
    if not rows:
        print(f"no customer IDs registered in {display_url(args.db)}", file=out)
        return 0
    print(f"{'CUSTOMER ID':<24} {'STATE':<11} {'HOST':<20} {'LAST CHECK-IN':<21} CUSTOMER", file=out)
    for r in rows:
        print(f"{r['customer_id']:<24} {r['state']:<11} {r['hostname'] or '-':<20} {r['last_check_in'] or '-':<21} "
              f"{r['customer']}", file=out)
    return 0


def _cmd_show(args: argparse.Namespace, out: TextIO) -> int:
    _check_cid(args.customer_id)
    info = _run(_with_store(args.db, None, DEFAULT_VALID_FOR_SECONDS, lambda store: store.show(args.customer_id)))
    if args.json:
        print(json.dumps(info, indent=2), file=out)
        return 0
    print(f"customer ID:   {info['customer_id']}  ({info['customer']}, {info['license_type']})", file=out)
    print(f"state:         {info['state']}", file=out)
    print(f"issued at:     {info['issued_at']}  (activates by itself at {info['activates_at']})", file=out)
    print(f"expires:       {info['expires_at'] or 'never'}", file=out)
    if info["replaced_by"] or info["revoked_at"]:
        print(f"ended:         {info['revoked_at']}: {info['reason']}"
              + (f" (successor {info['replaced_by']})" if info["replaced_by"] else ""), file=out)
    print(f"activations:   {len(info['activations']) or 'none'}", file=out)
    for a in info["activations"]:
        mark = "current" if a["current"] else f"ended {a['ended_at']}"
        print(f"  {a['hostname']} [{', '.join(a['addresses'])}] {a['how']}, activated {a['activated_at']}, "
              f"last check-in {a['last_check_in'] or '-'}, valid until {a['valid_until'] or 'license expiry'} "
              f"({mark})", file=out)
        print(f"    fingerprint {a['fingerprint']}", file=out)
    print("events:", file=out)
    for e in info["events"]:
        print(f"  {e['at']}  {e['kind']:<16} {e['detail']}", file=out)
    return 0


def _check_cid(cid: str) -> None:
    problem = customer_id_problem(cid)
    if problem:
        raise _Failure(problem)


def _check_reason(reason: str) -> None:
    problem = text_field_problem("reason", reason)
    if problem:
        raise _Failure(f"--reason: {problem}")


def _cmd_supersede(args: argparse.Namespace, out: TextIO) -> int:
    _check_cid(args.old)
    _check_cid(args.new)
    reason = args.reason or f"superseded by {args.new} (license server or license type changed)"
    _check_reason(reason)
    now = int(service_clock()())
    _run(_with_store(args.db, None, DEFAULT_VALID_FOR_SECONDS,
                     lambda store: store.end(args.old, now, reason, args.new)))
    print(f"{args.old} superseded by {args.new}: its license server receives a signed revocation naming "
          f"{args.new} at its next check-in", file=out)
    return 0


def _cmd_revoke(args: argparse.Namespace, out: TextIO) -> int:
    _check_cid(args.customer_id)
    _check_reason(args.reason)
    now = int(service_clock()())
    _run(_with_store(args.db, None, DEFAULT_VALID_FOR_SECONDS,
                     lambda store: store.end(args.customer_id, now, args.reason, None)))
    print(f"{args.customer_id} revoked: its license server receives a signed revocation at its next check-in",
          file=out)
    return 0


def _cmd_offline_response(args: argparse.Namespace, out: TextIO) -> int:
    key = _key(args.key)
    text = _read(args.request, "offline request")
    try:
        req = verify_offline_request(loads_document(text, args.request), args.request)
    except CloudDocumentError as exc:
        raise _Failure(f"{args.request}: {exc.message}") from None
    out_path = Path(args.out)
    if out_path.exists() and not args.force:
        raise _Failure(f"{out_path}: already exists; not overwriting it (use --force to replace it)")
    now = int(service_clock()())
    signed = _run(_with_store(args.db, key, DEFAULT_VALID_FOR_SECONDS, lambda store: store.offline(req, now)))
    try:
        write_atomic(out_path, dumps_document(signed).encode("utf-8"), mode=0o644, replace=args.force)
    except OSError as exc:
        raise _Failure(f"{out_path}: cannot write: {exc.strerror or exc}") from None
    until = signed["document"]["valid_until"] or "never (the license does not expire)"
    print(f"wrote {out_path}: offline activation of {req.customer_id} on {req.hostname}, valid until {until}; "
          "give it to the site (lmutil activate --offline-response FILE)", file=out)
    return 0


def _bind(address: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(2048)
    except OSError as exc:
        raise _Failure(f"cannot listen on {address} port {port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def _cmd_serve(args: argparse.Namespace, out: TextIO) -> int:
    import uvicorn

    from lmgrd.vendor.lmcloud.app import build_app

    if args.valid_for < MIN_VALID_FOR_SECONDS:
        raise _Failure(f"--valid-for {args.valid_for}: a certificate must be valid at least "
                       f"{MIN_VALID_FOR_SECONDS} seconds")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise _Failure("--tls-cert and --tls-key go together: give both (HTTPS) or neither (plain HTTP behind a "
                       "TLS-terminating proxy)")
    if args.tls_cert:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise _Failure(f"--tls-cert {args.tls_cert} / --tls-key {args.tls_key}: cannot load them: {exc}") from None
    for name in ("rate_limit_customer", "rate_limit_address"):
        if getattr(args, name) < 0:
            raise _Failure(f"--{name.replace('_', '-')} must be 0 (off) or more requests per minute")
    key = _key(args.key)
    clock = service_clock()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def serve() -> None:
        try:
            engine = make_engine(args.db)
        except DatabaseError as exc:
            raise _Failure(str(exc)) from None
        try:
            await check_schema(engine, args.db)
        except DatabaseError as exc:
            await engine.dispose()
            raise _Failure(str(exc)) from None
        store = Store(engine, key, args.valid_for)
        app = build_app(store, clock, rate_per_customer=args.rate_limit_customer,
                        rate_per_address=args.rate_limit_address)
        sock = _bind(args.bind, args.port)
        host, port = sock.getsockname()[:2]
        config = uvicorn.Config(app, ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key, log_level="warning",
                                access_log=False, lifespan="on", timeout_graceful_shutdown=5, server_header=False)
        server = uvicorn.Server(config)
        scheme = "https" if args.tls_cert else "http"
        shown = f"[{host}]" if ":" in host else host
        print(f"lmcloud: serving {scheme}://{shown}:{port} (database {display_url(args.db)}, certificates valid "
              f"{args.valid_for} s)", file=out, flush=True)
        if not args.tls_cert and not _loopback(host):
            logging.getLogger(__name__).warning("serving plain HTTP on %s: put a TLS-terminating proxy in front", host)
        try:
            await server.serve(sockets=[sock])
        finally:
            sock.close()
            await engine.dispose()

    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is a base dependency off Windows
        runner = asyncio.Runner()
    with runner:
        runner.run(serve())
    return 0


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------------
# The parser


def _valid_for(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds") from None


def _parser() -> argparse.ArgumentParser:
    text = (__doc__ or "").replace("``", "")
    parser = argparse.ArgumentParser(prog="lmcloud", description=text.split("\n\n")[0],
                                     epilog=text.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    default_db = default_db_url()

    def with_db(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--db", default=default_db, metavar="URL",
                       help=f"sqlite:///FILE, a file path, or postgresql://USER@HOST:PORT/DB (default {default_db})")
        return p

    db = sub.add_parser("db", help="database schema commands")
    db_sub = db.add_subparsers(dest="db_command", metavar="SUBCOMMAND", required=True)
    up = with_db(db_sub.add_parser("upgrade", help="create or upgrade the schema to this version's (Alembic)"))
    up.set_defaults(func=_cmd_db_upgrade)

    serve = with_db(sub.add_parser("serve", help="run the HTTPS activation API"))
    serve.add_argument("--key", required=True, metavar="vendor.key", help="the vendor private key (signs answers)")
    serve.add_argument("--bind", default="127.0.0.1", metavar="ADDR", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, metavar="N",
                       help=f"port (default {DEFAULT_PORT}; 0 picks a free one, printed on the ready line)")
    serve.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain for HTTPS")
    serve.add_argument("--tls-key", metavar="FILE", help="PEM private key for --tls-cert")
    serve.add_argument("--valid-for", type=_valid_for, default=DEFAULT_VALID_FOR_SECONDS, metavar="SECONDS",
                       help=f"how long an activation certificate is valid (default {DEFAULT_VALID_FOR_SECONDS}: "
                       f"30 days; minimum {MIN_VALID_FOR_SECONDS})")
    serve.add_argument("--rate-limit-customer", type=float, default=30.0, metavar="PER_MINUTE",
                       help="requests a minute per customer ID (default 30; 0: off)")
    serve.add_argument("--rate-limit-address", type=float, default=600.0, metavar="PER_MINUTE",
                       help="requests a minute per source address (default 600; 0: off)")
    serve.set_defaults(func=_cmd_serve)

    reg = with_db(sub.add_parser("register", help="record issued licenses' customer IDs (idempotent)"))
    reg.add_argument("files", metavar="FILE.lic", nargs="+")
    reg.set_defaults(func=_cmd_register)

    lst = with_db(sub.add_parser("list", help="every customer ID, its state and host"))
    lst.add_argument("--json", action="store_true", help="print JSON")
    lst.set_defaults(func=_cmd_list)

    show = with_db(sub.add_parser("show", help="one customer ID: state, activations, events"))
    show.add_argument("customer_id", metavar="CUSTOMER_ID")
    show.add_argument("--json", action="store_true", help="print one JSON object (customer_id, state, activations, "
                      "events)")
    show.set_defaults(func=_cmd_show)

    sup = with_db(sub.add_parser("supersede", help="replace OLD_CID by NEW_CID (license server or type change)"))
    sup.add_argument("old", metavar="OLD_CID")
    sup.add_argument("new", metavar="NEW_CID")
    sup.add_argument("--reason", metavar="TEXT", help="shown to the old server's admin")
    sup.set_defaults(func=_cmd_supersede)

    rev = with_db(sub.add_parser("revoke", help="revoke a customer ID (no successor)"))
    rev.add_argument("customer_id", metavar="CUSTOMER_ID")
    rev.add_argument("--reason", required=True, metavar="TEXT", help="shown to the license server's admin")
    rev.set_defaults(func=_cmd_revoke)

    off = with_db(sub.add_parser("offline-response", help="answer an offline activation request file"))
    off.add_argument("request", metavar="REQUEST_FILE")
    off.add_argument("--key", required=True, metavar="vendor.key", help="the vendor private key")
    off.add_argument("--out", required=True, metavar="RESPONSE_FILE", help="where to write the signed response")
    off.add_argument("--force", action="store_true", help="replace --out if it exists")
    off.set_defaults(func=_cmd_offline_response)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run ``lmcloud``; returns the exit code."""
    out = out or sys.stdout
    args = _parser().parse_args(argv)
    func: Callable[[argparse.Namespace, TextIO], int] = args.func
    try:
        return func(args, out)
    except _Failure as exc:
        print(f"lmcloud: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
