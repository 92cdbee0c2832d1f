"""``lmutil``: the license server admin utility (FlexLM's names: lmstat, lmremove, lmreread, lmdown, lmhostid).

Speaks ``protocol`` over a blocking socket. Every command takes ``-c PORT@HOST`` and ``--json``. The admin
credential is found by itself when run on the license server by the daemon's OS user (the token file the
daemon writes in that user's runtime directory, keyed by port); from elsewhere pass ``--token-file``.

Exit codes: 0 ok, 1 the server refused or reported a problem, 2 usage, 3 the server cannot be reached.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from lmgrd import __version__
from lmgrd.admin.token import token_path
from protocol import Admin, Connection, ErrorReply, Hello, ProtocolError, Reply, Role, StatusReply, Welcome

DEFAULT_SERVER = "27000@localhost"


class AdminError(Exception):
    def __init__(self, message: str, exit_code: int = 1, code: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.code = code


def parse_server(spec: str) -> tuple[str, int]:
    """``PORT@HOST`` (FlexLM style), ``@HOST`` (port 27000) or ``HOST:PORT``."""
    spec = spec.strip()
    if "@" in spec:
        port_s, host = spec.split("@", 1)
        port_s = port_s or "27000"
    elif spec.count(":") == 1:
        host, port_s = spec.split(":", 1)
    else:
        raise AdminError(f"cannot read server {spec!r}: use PORT@HOST, for example 27000@licsrv01", 2)
    host = host.strip("[]") or "localhost"
    try:
        port = int(port_s)
    except ValueError:
        raise AdminError(f"cannot read the port in {spec!r}: use PORT@HOST, for example 27000@licsrv01", 2) from None
    return host, port


class AdminClient:
    """One connection to the daemon, with hello done."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.host, self.port = host, port
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise AdminError(f"cannot reach the license server at {port}@{host}: {exc.strerror or exc}; "
                             "is lmgrd running there?", 3) from None
        self.conn = Connection(Role.CLIENT)
        self.replies: list[Reply] = []
        self.next_id = 0
        reply = self.request(Hello(self._id(), (1,), socket.gethostname().split(".")[0] or "localhost",
                                   getpass.getuser(), os.getpid(), f"lmutil {__version__}", "lmutil"))
        if not isinstance(reply, Welcome):
            raise AdminError(f"the server refused the connection: {_describe(reply)}", 1)
        self.welcome = reply

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id

    def request(self, req: Any) -> Reply:
        try:
            self.sock.sendall(self.conn.send(req))
            while not self.replies:
                data = self.sock.recv(65536)
                if not data:
                    raise AdminError("the license server closed the connection", 3)
                self.replies.extend(self.conn.receive_data(data))
        except (OSError, ProtocolError) as exc:
            raise AdminError(f"lost the connection to {self.port}@{self.host}: {exc}", 3) from None
        return self.replies.pop(0)

    def admin(self, command: str, args: dict[str, Any], auth: str) -> dict[str, Any]:
        reply = self.request(Admin(self._id(), command, args, auth))
        if isinstance(reply, ErrorReply):
            raise AdminError(_describe(reply), 1, str(reply.code))
        if not isinstance(reply, StatusReply):
            raise AdminError(f"unexpected reply {reply.OP!r} from the server", 1)
        return reply.data

    def close(self) -> None:
        self.sock.close()


def _describe(reply: Reply) -> str:
    if isinstance(reply, ErrorReply):
        return f"{reply.code}: {reply.message}" + (f" ({reply.hint})" if reply.hint else "")
    return reply.OP


def find_token(port: int, token_file: str | None) -> str:
    path = Path(token_file) if token_file else token_path(port)
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        if token_file:
            raise AdminError(f"cannot read the admin token file {path}", 2) from None
        return ""  # the server answers NOT_AUTHORIZED with a hint


# --------------------------------------------------------------------------- output
def _fmt_time(epoch: float) -> str:
    t = datetime.fromtimestamp(epoch)
    return f"{t:%a} {t.month}/{t.day} {t.hour}:{t.minute:02d}"


def print_lmstat(data: dict[str, Any], host: str, port: int, product: str | None, show_users: bool) -> None:
    """FlexNet's lmstat layout, line for line where it has one; extra facts on lines its parsers skip."""
    up = data.get("uptime_seconds", 0)
    print(f"lmutil - Copyright (c) lmgrd authors. License server status: {port}@{host}")
    print(f"License server status: {port}@{host}")
    print(f"    {host}: license server UP v{data.get('server_version', '?')}")
    print(f"    [lmgrd] uptime {int(up)} s, {data.get('connections', 0)} client connection(s)")
    print()
    print("Feature usage info:")
    print()
    leases = data.get("leases", [])
    for pool in data.get("pools", []):
        if product and pool["product"] != product:
            continue
        print(f"Users of {pool['product']}:  (Total of {pool['count']} licenses issued;  "
              f"Total of {pool['in_use']} licenses in use)")
        print(f"    [lmgrd] customer {pool['customer_id']}, version {pool['version']}, "
              f"reserved {pool.get('reserved', 0)}, queued {pool['queued']}, "
              f"expires {pool['expires'] or 'never'}, state {pool.get('activation', 'active')}")
        print()
        if show_users:
            holders = [x for x in leases if x["product"] == pool["product"] and x["customer_id"] == pool["customer_id"]]
            if holders:
                print(f'  "{pool["product"]}" v{pool["version"]}, vendor: lmgrd')
                print("  floating license")
                print()
            for x in holders:
                display = x.get("display") or x["host"]
                print(f"    {x['user']} {x['host']} {display} (v{x['version']}) ({host}/{port} {x['token'][:8]}), "
                      f"start {_fmt_time(x['checkout_at'])}, 1 licenses")
                print(f"        [lmgrd] pid {x['pid']}, last heartbeat {_fmt_time(x['last_heartbeat_at'])}, "
                      f"{'connected' if x['connected'] else 'disconnected'}, lease expires in {x['expires_in']:.0f} s")
            for w in data.get("queue", []):
                if w["product"] == pool["product"] and w["customer_id"] == pool["customer_id"]:
                    print(f"    [lmgrd] queued #{w['position']}: {w['user']} {w['host']} pid {w['pid']} "
                          f"(v{w['version']}), waiting {w['waiting_s']:.0f} s")
            print()


# --------------------------------------------------------------------------- commands
CommandFn = Callable[[argparse.Namespace, AdminClient, str], int]


def cmd_lmstat(ns: argparse.Namespace, client: AdminClient, auth: str) -> int:
    if getattr(ns, "prometheus", False):  # the same text as GET /metrics
        sys.stdout.write(str(client.admin("metrics", {}, auth).get("text", "")))
        return 0
    args: dict[str, Any] = {"all": bool(ns.a)}
    if ns.f:
        args["product"] = ns.f
    data = client.admin("lmstat", args, auth)
    if ns.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print_lmstat(data, client.host, client.port, ns.f, bool(ns.a or ns.f))
    return 0


def cmd_simple(name: str) -> CommandFn:
    def run(ns: argparse.Namespace, client: AdminClient, auth: str) -> int:
        data = client.admin(name, {}, auth)
        if ns.json:
            print(json.dumps(data, indent=2, sort_keys=True))
        else:
            for k, v in data.items():
                if k == "problems" and isinstance(v, list):
                    for prob in v:
                        print(f"problem: {prob}")
                else:
                    print(f"{k}: {', '.join(map(str, v)) if isinstance(v, list) else v}")
        # lmreread: what was valid is served, but a refused file or config is the operator's to fix.
        return 1 if data.get("problems") else 0

    return run


def cmd_activate(ns: argparse.Namespace, client: AdminClient, auth: str) -> int:
    data = client.admin("activate", {"customer_id": ns.customer_id}, auth)
    if ns.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(f"license {data['customer_id']} is active on this license server"
              + (f" (activated {data['activated_at']}, {data['how']}; machine fingerprint {data['fingerprint']})"
                 if data.get("activated_at") else ""))
    return 0


def cmd_lmremove(ns: argparse.Namespace, client: AdminClient, auth: str) -> int:
    if ns.token is not None:
        if ns.names:
            raise AdminError("give either PRODUCT USER HOST or --token TOKEN, not both", 2)
        args: dict[str, Any] = {"token": ns.token}
    elif len(ns.names) in (3, 4):
        args = dict(zip(("product", "user", "host", "display"), ns.names, strict=False))
    else:
        raise AdminError("usage: lmutil lmremove PRODUCT USER HOST [DISPLAY]  or  lmutil lmremove --token TOKEN "
                         "(lmstat -a shows them)", 2)
    data = client.admin("lmremove", args, auth)
    if ns.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        for x in data.get("removed", []):
            held = int(x.get("held_seconds", 0))
            print(f"removed {x['product']} seat of {x['user']}@{x['host']} (lease {x['token'][:8]}, held "
                  f"{held // 3600} h {held % 3600 // 60} min); its client is told at its next heartbeat")
    return 0


COMMANDS: dict[str, tuple[CommandFn, str]] = {
    "activate": (cmd_activate, "activate a license on this license server now (run on the server itself); "
                 "otherwise it activates by itself 24 hours after it was issued"),
    "lmstat": (cmd_lmstat, "license server status: products, seats and (with -a or -f) who holds them"),
    "lmdown": (cmd_simple("lmdown"), "shut the license server down gracefully (leases are persisted first)"),
    "lmhostid": (cmd_simple("lmhostid"), "this license server's identity as the daemon sees it"),
    "lmreread": (cmd_simple("lmreread"), "reload licenses (and revocations, policy) without dropping a client"),
    "lmremove": (cmd_lmremove, "free a stuck seat now: PRODUCT USER HOST, or --token TOKEN; its client is told "
                 "SEAT_REMOVED at its next heartbeat"),
}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", dest="server", metavar="PORT@HOST", default=os.environ.get("LM_LICENSE_SERVER_ADMIN",
                        DEFAULT_SERVER), help=f"license server (default {DEFAULT_SERVER})")
    common.add_argument("--json", action="store_true", help="print machine-readable JSON")
    common.add_argument("--token-file", metavar="PATH", help="admin token file (needed when not run on the "
                        "license server as the daemon's user)")
    p = argparse.ArgumentParser(prog="lmutil", description="lmgrd license server administration.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  lmutil lmstat -a -c 27000@licsrv01\n"
                                "  lmutil lmstat -f CADPRO --json\n  lmutil lmdown -c 27000@licsrv01\n"
                                "  lmutil lmremove CADPRO alice pc17\n  lmutil lmremove --token 1a2b3c4d\n"
                                "  lmutil report /var/log/lmgrd/usage.log* --since 2024-04-01 --plot usage.png")
    p.add_argument("--version", action="version", version=f"lmutil {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_fn, helptext) in COMMANDS.items():
        sp = sub.add_parser(name, parents=[common], help=helptext, description=helptext)
        if name == "activate":
            sp.add_argument("customer_id", metavar="CUSTOMER_ID", help="the license's customer ID (CID-...)")
        if name == "lmstat":
            sp.add_argument("-a", action="store_true", help="all products, with their holders")
            sp.add_argument("-f", metavar="PRODUCT", help="that product only, with its holders")
            sp.add_argument("--prometheus", action="store_true", help="print the Prometheus metrics (the same "
                            "text as the daemon's /metrics)")
        if name == "lmremove":
            sp.add_argument("names", nargs="*", metavar="PRODUCT USER HOST", help="free every seat of PRODUCT "
                            "held by USER on HOST (an optional 4th DISPLAY narrows it)")
            sp.add_argument("--token", metavar="TOKEN", help="free this one lease (a unique prefix, such as the "
                            "8 characters lmstat -a shows, is enough)")
    from lmgrd.report import add_report_arguments

    rp = sub.add_parser("report", help=REPORT_HELP, description=REPORT_HELP)
    add_report_arguments(rp)
    return p


REPORT_HELP = ("usage report from the daemon's usage log files (no server connection needed): peak and 95th "
               "percentile seats, hours at the limit, denials, top users, how many seats to buy")


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.command == "report":  # reads log files here; needs neither a server nor a token
        from lmgrd.report import run_report

        return run_report(ns)
    fn = COMMANDS[ns.command][0]
    try:
        host, port = parse_server(ns.server)
        auth = find_token(port, ns.token_file)
        client = AdminClient(host, port)
        try:
            return fn(ns, client, auth)
        finally:
            client.close()
    except AdminError as exc:
        if getattr(ns, "json", False):
            print(json.dumps({"error": exc.code or "ERROR", "message": str(exc)}))
        print(f"lmutil {ns.command}: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
