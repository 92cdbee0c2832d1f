"""``lmutil``: the license server admin utility (FlexLM's names: lmstat, lmremove, lmreread, lmdown, lmhostid).

Speaks ``protocol`` over a blocking socket. Every command takes ``-c PORT@HOST`` and ``--json``. Run as
``lmstat``, ``lmremove``, ``lmreread``, ``lmdown``, ``lmhostid`` or ``lmver`` (a symlink), it is that command,
as FlexNet's lmutil is. ``lmstat`` prints FlexNet 11's text (:mod:`lmgrd.lmstat_text`), FlexNet's error line
on stdout when the server cannot be reached, and lmgrd's own facts only under ``--extended`` or ``--json``. The admin
credential is found by itself when run on the license server by the daemon's OS user (the token file the
daemon writes in that user's runtime directory, keyed by port); from elsewhere pass ``--token-file``.

Exit codes: 0 ok, 1 the server refused or reported a problem, 2 usage, 3 the server cannot be reached.

Its error messages are in the user's language (:mod:`lmgrd.i18n`: ``LMGRD_LANG``, else the locale; English or
Japanese); ``--json``, lmstat's FlexNet layout and ``--prometheus`` stay English. The server's refusals arrive
in English: in Japanese they are shown as a Japanese sentence for their code, then the server's English text.
"""

from __future__ import annotations

import argparse
import errno
import getpass
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from lmgrd import __version__, lmstat_text
from lmgrd.admin.token import token_path
from lmgrd.config import DEFAULT_PORT
from lmgrd.i18n import N_, Text, argparse_in_language, gettext_, language, tr
from protocol import Admin, Connection, ErrorCode, ErrorReply, Hello, ProtocolError, Reply, Role, StatusReply, Welcome
from protocol.license import parse_license

DEFAULT_SERVER = "27000@localhost"


#: What the server's refusal means, for the codes an admin command meets; lmutil says it in the user's language
#: before the server's English message (the wire stays English). Other codes get the generic sentence.
REFUSALS: dict[ErrorCode, str] = {
    ErrorCode.NOT_AUTHORIZED: N_("The license server did not accept the admin credential."),
    ErrorCode.BAD_REQUEST: N_("The license server did not accept the command's arguments."),
    ErrorCode.LEASE_NOT_FOUND: N_("No such seat is held on the license server."),
    ErrorCode.UNKNOWN_PRODUCT: N_("The license server does not serve this product."),
    ErrorCode.LICENSE_MOVED: N_("The license was activated on another machine."),
    ErrorCode.ACTIVATION_CONFLICT: N_("The vendor's activation service says the license is active on another machine."),
    ErrorCode.LICENSE_REVOKED: N_("The vendor revoked the license."),
    ErrorCode.SERVER_UNAVAILABLE: N_("The vendor's activation service could not be reached."),
    ErrorCode.LICENSE_INVALID: N_("The license or the vendor's answer is not valid."),
    ErrorCode.SHUTTING_DOWN: N_("The license server is shutting down."),
    ErrorCode.TOO_MANY_CONNECTIONS: N_("There are too many connections from this computer to the license server."),
    ErrorCode.INTERNAL_ERROR: N_("An internal error occurred in the license server."),
}


class AdminError(Exception):
    """What went wrong, the exit code it means, and (server unreachable) the socket error behind it.

    ``str(error)`` is English (``--json``); ``localized`` is what a person's terminal shows.
    """

    def __init__(self, message: str | Text, exit_code: int = 1, code: str = "", os_error: OSError | None = None
                 ) -> None:
        self.text = message if isinstance(message, Text) else Text("{message}", {"message": message})
        super().__init__(self.text.english())
        self.exit_code = exit_code
        self.code = code
        self.os_error = os_error

    @property
    def localized(self) -> str:
        """The message in the user's language."""
        return self.text.localized()


def parse_server(spec: str) -> tuple[str, int]:
    """``PORT@HOST`` (FlexLM style), ``@HOST`` (port 27000) or ``HOST:PORT``."""
    spec = spec.strip()
    if "@" in spec:
        port_s, host = spec.split("@", 1)
        port_s = port_s or "27000"
    elif spec.count(":") == 1:
        host, port_s = spec.split(":", 1)
    else:
        raise AdminError(tr("cannot read server {spec}: use PORT@HOST, for example 27000@licsrv01", spec=repr(spec)), 2)
    host = host.strip("[]") or "localhost"
    try:
        port = int(port_s)
    except ValueError:
        raise AdminError(tr("cannot read the port in {spec}: use PORT@HOST, for example 27000@licsrv01",
                            spec=repr(spec)), 2) from None
    return host, port


def server_of(spec: str) -> tuple[str, int]:
    """Where ``-c`` points, with FlexNet's meanings: ``PORT@HOST`` (or ``@HOST``, ``HOST:PORT``), or the path of a
    license file, whose registered license server (``hostname``) is dialled on the default port 27000 (an lmgrd
    license names its server but not a port). Of a comma-separated list the first is used."""
    first = spec.split(",")[0].strip()
    path = Path(first)
    if "@" not in first and path.is_file():
        try:
            text = path.read_text("utf-8-sig")
            lic, _sig = parse_license(text, first)  # unverified: it only says where to connect
        except (OSError, UnicodeDecodeError, ProtocolError) as exc:
            raise AdminError(tr("-c {path}: not a license server (PORT@HOST) nor a readable license file: "
                                "{error}", path=first, error=getattr(exc, "message", None) or exc), 2) from None
        return lic.hostname, DEFAULT_PORT
    return parse_server(first)


class AdminClient:
    """One connection to the daemon, with hello done."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.host, self.port = host, port
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise AdminError(tr("cannot reach the license server at {port}@{host}: {error}; is lmgrd running there?",
                                port=port, host=host, error=exc.strerror or exc), 3, os_error=exc) from None
        self.conn = Connection(Role.CLIENT)
        self.replies: list[Reply] = []
        self.next_id = 0
        reply = self.request(Hello(self._id(), (1,), socket.gethostname().split(".")[0] or "localhost",
                                   getpass.getuser(), os.getpid(), f"lmutil {__version__}", "lmutil"))
        if not isinstance(reply, Welcome):
            raise AdminError(tr("the server refused the connection: {reply}", reply=_describe(reply)), 1)
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
                    raise AdminError(tr("the license server closed the connection"), 3,
                                     os_error=ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET)))
                self.replies.extend(self.conn.receive_data(data))
        except TimeoutError as exc:  # the connection's own timeout (lmstat -t): say which, and what to do
            raise AdminError(tr("the license server at {port}@{host} did not answer within {seconds} s; check "
                                "that lmgrd is running there and not overloaded, or allow longer (lmstat -t SECONDS)",
                                port=self.port, host=self.host, seconds=format(self.sock.gettimeout() or 0, "g")), 3,
                             os_error=exc) from None
        except (OSError, ProtocolError) as exc:
            raise AdminError(tr("lost the connection to {port}@{host}: {error}", port=self.port, host=self.host,
                                error=exc), 3,
                             os_error=exc if isinstance(exc, OSError) else None) from None
        return self.replies.pop(0)

    def admin(self, command: str, args: dict[str, Any], auth: str) -> dict[str, Any]:
        reply = self.request(Admin(self._id(), command, args, auth))
        if isinstance(reply, ErrorReply):
            raise AdminError(_refusal(reply), 1, str(reply.code))
        if not isinstance(reply, StatusReply):
            raise AdminError(tr("unexpected reply {op} from the server", op=repr(reply.OP)), 1)
        return reply.data

    def close(self) -> None:
        self.sock.close()


def _describe(reply: Reply) -> str:
    if isinstance(reply, ErrorReply):
        return f"{reply.code}: {reply.message}" + (f" ({reply.hint})" if reply.hint else "")
    return reply.OP


def _refusal(reply: ErrorReply) -> Text:
    """The server's refusal: in English exactly as the server worded it; in another language the code's
    sentence first (:data:`REFUSALS`), then the server's English words."""
    summary = REFUSALS.get(reply.code, N_("The license server refused the command."))
    return _Refusal("{reply}", {"reply": _describe(reply), "summary": summary})


class _Refusal(Text):
    __slots__ = ()

    def localized(self) -> str:
        if language() == "en":
            return self.english()  # the server's words as they are
        return gettext_("{summary} (details: {reply})").format(summary=gettext_(str(self.params["summary"])),
                                                              reply=self.params["reply"])


def find_token(port: int, token_file: str | None) -> str:
    path = Path(token_file) if token_file else token_path(port)
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        if token_file:
            raise AdminError(tr("cannot read the admin token file {path}", path=path), 2) from None
        return ""  # the server answers NOT_AUTHORIZED with a hint


# --------------------------------------------------------------------------- output
def print_lmstat(data: dict[str, Any], host: str, port: int, ns: argparse.Namespace) -> None:
    """FlexNet 11's lmstat layout (:mod:`lmgrd.lmstat_text`), then lmgrd's own facts if ``--extended``."""
    del host  # FlexNet prints the server's own host name (``data["hostname"]``), not the one dialled
    now = datetime.now()
    if ns.i is not None:
        sys.stdout.write(lmstat_text.feature_info(data, now, ns.i or None))
    else:
        one = ns.f or None
        sys.stdout.write(lmstat_text.render_lmstat(
            data, port=port, now=now, features=bool(ns.a or ns.f is not None or ns.S is not None),
            users=bool(ns.a or ns.f is not None or ns.S is not None), product=one, server_block=one is None))
    if ns.extended:
        print()
        sys.stdout.write(lmstat_text.render_extended(data, time.time()))


# --------------------------------------------------------------------------- commands
CommandFn = Callable[[argparse.Namespace, AdminClient, str], int]


def cmd_lmstat(ns: argparse.Namespace, client: AdminClient, auth: str) -> int:
    if getattr(ns, "prometheus", False):  # the same text as GET /metrics
        sys.stdout.write(str(client.admin("metrics", {}, auth).get("text", "")))
        return 0
    if ns.S and ns.S.lower() != lmstat_text.VENDOR:
        raise AdminError(tr("this license server serves only the vendor daemon {vendor}, not {asked}; use -S {name} "
                            "or leave -S out", vendor=repr(lmstat_text.VENDOR), asked=repr(ns.S),
                            name=lmstat_text.VENDOR), 1)
    args: dict[str, Any] = {"all": bool(ns.a or ns.S is not None or ns.f == "" or ns.extended)}
    if ns.f:
        args["product"] = ns.f
    data = client.admin("lmstat", args, auth)
    if ns.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print_lmstat(data, client.host, client.port, ns)
    return 0


def _human_lines(name: str, data: dict[str, Any]) -> list[str]:
    """What ``lmdown``, ``lmreread`` and ``lmhostid`` tell a person, in the user's language (``--json`` gives the
    reply itself, in English). A reply field this does not know is printed as ``key: value``."""
    out: list[str] = []
    rest = dict(data)
    if name == "lmdown" and rest.pop("stopping", False):
        out.append(gettext_("the license server is shutting down; {n} lease(s) were persisted for its restart")
                   .format(n=rest.pop("leases_persisted", 0)))
    elif name == "lmreread" and "reloaded" in rest:
        served = [str(x) for x in rest.pop("serving", [])]
        out.append(gettext_("reread: serving {n} license(s): {names}").format(n=len(served), names=", ".join(served)
                                                                            or gettext_("none"))
                   if rest.pop("reloaded") else gettext_("not reread"))
    elif name == "lmhostid":
        labels = {"hostname": N_("host name: {value}"), "short_hostname": N_("short host name: {value}"),
                  "addresses": N_("addresses: {value}")}
        for key, label in labels.items():
            if key in rest:
                v = rest.pop(key)
                out.append(gettext_(label).format(value=", ".join(map(str, v)) if isinstance(v, list) else v))
    for prob in rest.pop("problems", None) or []:
        out.append(gettext_("problem: {problem}").format(problem=prob))
    out += [f"{k}: {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in rest.items()]
    return out


def cmd_simple(name: str) -> CommandFn:
    def run(ns: argparse.Namespace, client: AdminClient, auth: str) -> int:
        data = client.admin(name, {}, auth)
        if ns.json:
            print(json.dumps(data, indent=2, sort_keys=True))
        else:
            for line in _human_lines(name, data):
                print(line)
        # lmreread: what was valid is served, but a refused file or config is the operator's to fix.
        return 1 if data.get("problems") else 0

    return run


def cmd_activate(ns: argparse.Namespace, client: AdminClient, auth: str) -> int:
    if ns.offline_response:
        try:
            text = Path(ns.offline_response).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise AdminError(tr("cannot read the offline response {path}: {error}", path=ns.offline_response,
                                error=getattr(exc, "strerror", None) or exc), 1) from None
        data = client.admin("activate", {"offline_response": text}, auth)
    elif ns.customer_id is None:
        raise AdminError(tr("usage: lmutil activate CUSTOMER_ID [--offline-request FILE], or lmutil activate "
                            "--offline-response FILE"), 2)
    elif ns.offline_request:
        data = client.admin("activate", {"customer_id": ns.customer_id, "offline_request": True}, auth)
        try:
            Path(ns.offline_request).write_text(str(data["request"]), encoding="utf-8")
        except OSError as exc:
            raise AdminError(tr("cannot write the offline request {path}: {error}", path=ns.offline_request,
                                error=exc.strerror or exc), 1) from None
        if ns.json:
            print(json.dumps({"customer_id": ns.customer_id, "offline_request": ns.offline_request}))
        else:
            print(f"wrote the offline activation request for {ns.customer_id} to {ns.offline_request} "
                  f"({len(str(data['request']))} bytes): send it to the software vendor, then install their answer "
                  f"with: lmutil activate --offline-response FILE")
        return 0
    else:
        data = client.admin("activate", {"customer_id": ns.customer_id}, auth)
    if ns.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        text = (gettext_("license {customer_id} is active on this license server (activated {activated_at}, {how}; "
                         "machine fingerprint {fingerprint})") if data.get("activated_at")
                else gettext_("license {customer_id} is active on this license server")).format(**data)
        print(text + (f"; certified by {data['service']} until {data.get('valid_until') or 'the license expires'}"
                      if data.get("service") else ""))
    return 0


CLOUD_CHECK_HELP = N_("can this machine reach the vendor's activation service? DNS, proxy, TLS, clock skew and "
                      "reachability, one line each; exit 0 only if all pass (no license server needed)")


def run_cloud_check(ns: argparse.Namespace) -> int:
    from lmgrd.cloudcheck import run_checks
    from lmgrd.config import ConfigInvalid, load_config_file
    from protocol.license import parse_license

    file_values: dict[str, Any] = {}
    if ns.config:
        try:
            file_values = load_config_file(Path(ns.config))
        except ConfigInvalid as exc:
            print(f"lmutil cloud-check: {exc}", file=sys.stderr)
            return 2
    url = ns.url
    lic_paths = [ns.license] if ns.license else file_values.get("licenses") or file_values.get("license") or []
    if isinstance(lic_paths, str):
        lic_paths = [lic_paths]
    for path in ([] if url else lic_paths):
        try:
            lic, _sig = parse_license(Path(path).read_text(encoding="utf-8"), str(path))
        except (OSError, UnicodeDecodeError, ProtocolError) as exc:
            print(f"lmutil cloud-check: cannot read the license {path}: {getattr(exc, 'message', exc)}",
                  file=sys.stderr)
            return 2
        if lic.cloud_url:
            url = lic.cloud_url
            break
    if not url:
        print("lmutil cloud-check: no activation service URL: give it (lmutil cloud-check https://...), or a "
              "license with a cloud_url (--license FILE.lic or --config lmgrd.yaml)", file=sys.stderr)
        return 2
    ca = ns.cloud_ca_file or file_values.get("cloud_ca_file")
    proxy = ns.cloud_proxy or file_values.get("cloud_proxy")
    checks = run_checks(str(url), Path(ca) if ca else None, str(proxy) if proxy else None)
    if ns.json:
        print(json.dumps({"url": url, "ok": all(c.result != "FAILED" for c in checks),
                          "checks": [{"name": c.name, "result": c.result, "detail": c.detail} for c in checks]},
                         indent=2))
    else:
        print(f"activation service {url}")
        for c in checks:
            print(c.line())
    return 0 if all(c.result != "FAILED" for c in checks) else 1


def cmd_lmremove(ns: argparse.Namespace, client: AdminClient, auth: str) -> int:
    if ns.by_handle:  # FlexNet's lmremove -h FEATURE SERVER PORT HANDLE
        if ns.token is not None or len(ns.names) != 4:
            raise AdminError(tr("usage: lmutil lmremove -h FEATURE SERVER PORT HANDLE (the server/port and handle that "
                                "lmstat -a prints in parentheses on the user's line)"), 2)
        feature, _server, port_s, handle_s = ns.names
        if not (port_s.isdigit() and handle_s.isdigit()):
            raise AdminError(tr("lmremove -h: PORT and HANDLE must be numbers, got {port} and {handle} (copy them "
                                "from lmstat -a: (server/PORT HANDLE))", port=repr(port_s), handle=repr(handle_s)), 2)
        if int(port_s) != client.port:
            raise AdminError(tr("lmremove -h: the handle is from the server on port {port}, but this is "
                                "{this_port}@{this_host}; give -c {port}@SERVER", port=port_s, this_port=client.port,
                                this_host=client.host), 2)
        args: dict[str, Any] = {"product": feature, "handle": int(handle_s)}
    elif ns.token is not None:
        if ns.names:
            raise AdminError(tr("give either PRODUCT USER HOST or --token TOKEN, not both"), 2)
        args = {"token": ns.token}
    elif len(ns.names) in (3, 4):
        args = dict(zip(("product", "user", "host", "display"), ns.names, strict=False))
    else:
        raise AdminError(tr("usage: lmutil lmremove PRODUCT USER HOST [DISPLAY]  or  lmutil lmremove -h FEATURE "
                            "SERVER PORT HANDLE  or  lmutil lmremove --token TOKEN (lmstat -a shows them)"), 2)
    data = client.admin("lmremove", args, auth)
    if ns.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        for x in data.get("removed", []):
            held = int(x.get("held_seconds", 0))
            print(gettext_("removed {product} seat of {user}@{host} (lease {lease}, held {hours} h {minutes} min); "
                           "its client is told at its next heartbeat").format(
                product=x["product"], user=x["user"], host=x["host"], lease=x["token"][:8], hours=held // 3600,
                minutes=held % 3600 // 60))
    return 0


COMMANDS: dict[str, tuple[CommandFn, str]] = {
    "activate": (cmd_activate, N_("activate a license on this license server now (run on the server itself); "
                                  "otherwise it activates by itself 24 hours after it was issued (one with a "
                                  "cloud_url: by the vendor's activation service); --offline-request / "
                                  "--offline-response for sites without internet")),
    "lmstat": (cmd_lmstat, N_("license server status: products, seats and (with -a or -f) who holds them")),
    "lmdown": (cmd_simple("lmdown"), N_("shut the license server down gracefully (leases are persisted first)")),
    "lmhostid": (cmd_simple("lmhostid"), N_("this license server's identity as the daemon sees it")),
    "lmreread": (cmd_simple("lmreread"), N_("reload licenses (and revocations, policy) without dropping a client")),
    "lmremove": (cmd_lmremove, N_("free a stuck seat now: PRODUCT USER HOST [DISPLAY], -h FEATURE SERVER PORT "
                                  "HANDLE, or --token TOKEN; its client is told SEAT_REMOVED at its next heartbeat")),
}

#: FlexNet's lmutil also runs under these names (symlinks to lmutil; ``make tools`` creates them).
TOOL_NAMES = ("lmstat", "lmremove", "lmreread", "lmdown", "lmhostid", "lmver")
LMVER_HELP = N_("print the version of lmutil (no server connection needed)")


def build_parser() -> argparse.ArgumentParser:
    """The parser, its help in the user's language (:mod:`lmgrd.i18n`; built at each run, so the language is the
    environment's at that moment)."""
    _ = gettext_
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", dest="server", metavar="PORT@HOST", default=os.environ.get("LM_LICENSE_SERVER_ADMIN",
                        DEFAULT_SERVER), help=_("license server, or a license file naming it (default {server})")
                        .format(server=DEFAULT_SERVER))
    common.add_argument("--json", action="store_true", help=_("print machine-readable JSON"))
    common.add_argument("--token-file", metavar="PATH", help=_("admin token file (needed when not run on the "
                                                               "license server as the daemon's user)"))
    p = argparse.ArgumentParser(prog="lmutil", description=_("lmgrd license server administration."),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=_("examples:") + "\n  lmutil lmstat -a -c 27000@licsrv01\n"
                                "  lmutil lmstat -f CADPRO --json\n  lmutil lmdown -c 27000@licsrv01\n"
                                "  lmutil lmremove CADPRO alice pc17\n  lmutil lmremove --token 1a2b3c4d\n"
                                "  lmutil report /var/log/lmgrd/usage.log* --since 2024-04-01 --plot usage.png")
    p.add_argument("--version", action="version", version=f"lmutil {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_fn, helptext) in COMMANDS.items():
        sp = sub.add_parser(name, parents=[common], help=_(helptext), description=_(helptext),
                            add_help=name != "lmremove")  # lmremove -h is FlexNet's handle form
        if name == "activate":
            sp.add_argument("customer_id", metavar="CUSTOMER_ID", nargs="?", help=_("the license's customer ID "
                                                                                     "(CID-...)"))
            sp.add_argument("--offline-request", metavar="FILE", help=_("for a site without internet: write a signed "
                            "activation request for the vendor to answer (lmcloud offline-response)"))
            sp.add_argument("--offline-response", metavar="FILE", help=_("install the vendor's answer to an offline "
                            "request (valid until the license expires; no check-in)"))
        if name == "lmstat":
            sp.add_argument("-a", action="store_true", help=_("all products, with their holders"))
            sp.add_argument("-f", metavar="FEATURE", nargs="?", const="", help=_("that product only, with its "
                            "holders (without FEATURE: every product, as -a)"))
            sp.add_argument("-i", metavar="FEATURE", nargs="?", const="",
                            help=_("the license line of FEATURE (or of every product): version, count, expiry"))
            sp.add_argument("-S", metavar="VENDOR", nargs="?", const="", help=_(
                "every user of VENDOR's licenses (this server's vendor daemon is {vendor}); as -a").format(
                vendor=repr(lmstat_text.VENDOR)))
            sp.add_argument("-v", action="store_true", help=_("print lmstat's version and exit (no server needed)"))
            sp.add_argument("-t", metavar="TIMEOUT", type=float, default=10.0, help=_("connection timeout in "
                            "seconds (default 10)"))
            sp.add_argument("--extended", action="store_true", help=_("after FlexNet's layout, what lmgrd knows "
                            "beyond it: customer IDs, activation, queue, heartbeats, leases"))
            sp.add_argument("--prometheus", action="store_true", help=_("print the Prometheus metrics (the same "
                            "text as the daemon's /metrics)"))
        if name == "lmremove":
            sp.add_argument("--help", action="help", help=_("show this help message and exit"))
            sp.add_argument("-h", dest="by_handle", action="store_true", help=_("FlexNet's form: lmremove -h "
                            "FEATURE SERVER PORT HANDLE, with the (server/port handle) lmstat -a prints"))
            sp.add_argument("names", nargs="*", metavar="PRODUCT USER HOST", help=_("free every seat of PRODUCT "
                            "held by USER on HOST (an optional 4th DISPLAY narrows it)"))
            sp.add_argument("--token", metavar="TOKEN", help=_("free this one lease (a unique prefix, such as the "
                            "8 characters lmstat -a shows, is enough)"))
    from lmgrd.report import add_report_arguments

    rp = sub.add_parser("report", help=_(REPORT_HELP), description=_(REPORT_HELP))
    add_report_arguments(rp)
    sub.add_parser("lmver", help=_(LMVER_HELP), description=_(LMVER_HELP))
    cp = sub.add_parser("cloud-check", help=_(CLOUD_CHECK_HELP), description=_(CLOUD_CHECK_HELP))
    cp.add_argument("url", nargs="?", metavar="URL", help=_("the activation service (default: the cloud_url of "
                    "--license, or of the first license in --config that has one)"))
    cp.add_argument("--license", metavar="FILE.lic", help=_("take the URL from this license's cloud_url"))
    cp.add_argument("--config", metavar="lmgrd.yaml", help=_("the daemon's config: its licenses, cloud_proxy and "
                    "cloud_ca_file"))
    cp.add_argument("--cloud-ca-file", metavar="PEM", help=_("extra CA certificates to trust (as the daemon's)"))
    cp.add_argument("--cloud-proxy", metavar="URL", help=_("the proxy to use (default: HTTPS_PROXY / NO_PROXY)"))
    cp.add_argument("--json", action="store_true", help=_("print machine-readable JSON"))
    return p


def tool_argv(argv0: str, args: list[str]) -> list[str]:
    """The argument list as ``lmutil`` takes it, when run through a FlexNet tool name (``lmstat -a`` is
    ``lmutil lmstat -a``); otherwise ``args`` unchanged."""
    name = Path(argv0).name.lower()
    name = name.removesuffix(".exe")
    return [name, *args] if name in TOOL_NAMES else args


def _lmstat_unreachable(ns: argparse.Namespace, exc: AdminError) -> None:
    """FlexNet prints the failure on stdout, where monitoring checks read it (they report OK on silence)."""
    err = exc.os_error
    code = err.errno if err is not None and err.errno else errno.ETIMEDOUT  # a timeout carries no errno
    strerror = (err.strerror if err is not None and err.strerror else "") or os.strerror(code)
    sys.stdout.write("\n".join(lmstat_text.header(datetime.now())) + "\n")
    print(lmstat_text.connect_error(code, strerror))


REPORT_HELP = N_("usage report from the daemon's usage log files (no server connection needed): peak and 95th "
                 "percentile seats, hours at the limit, denials, top users, how many seats to buy")


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = tool_argv(sys.argv[0], sys.argv[1:])
    with argparse_in_language():
        ns = build_parser().parse_args(argv)
    if ns.command == "report":  # reads log files here; needs neither a server nor a token
        from lmgrd.report import run_report

        return run_report(ns)
    if ns.command == "cloud-check":  # runs here; needs neither a server nor a token
        return run_cloud_check(ns)
    if ns.command == "lmver" or (ns.command == "lmstat" and ns.v):
        print(lmstat_text.header(datetime.now())[0])
        print(lmstat_text.version_text(__version__) if ns.command == "lmstat" else f"lmver v{__version__}")
        return 0
    fn = COMMANDS[ns.command][0]
    try:
        host, port = server_of(ns.server)
        auth = find_token(port, ns.token_file)
        # activate may wait on the vendor's activation service (one HTTPS request, at most 15 s): wait longer.
        client = AdminClient(host, port, timeout=getattr(ns, "t", 30.0 if ns.command == "activate" else 10.0))
        try:
            return fn(ns, client, auth)
        finally:
            client.close()
    except AdminError as exc:
        if getattr(ns, "json", False):
            print(json.dumps({"error": exc.code or "ERROR", "message": str(exc)}))
        elif ns.command == "lmstat" and exc.os_error is not None:
            _lmstat_unreachable(ns, exc)
        print(f"lmutil {ns.command}: {exc.localized}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
