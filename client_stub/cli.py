"""``lmclient``: the client terminal utility (what a client PC's user or admin runs).

Imports ``client_stub``, ``protocol``, the standard library, ``platformdirs`` and ``yaml``; never ``lmgrd``.
What it prints for people is in the user's language (:mod:`client_stub.i18n`: ``LMGRD_LANG``, else the locale;
English or Japanese); ``--json`` output stays English.

Commands::

    lmclient set-server 27000@licsrv[,27000@backup]   # store the server list in the per-user config file
    lmclient show                                      # the effective server list and where it comes from
    lmclient ping                                      # handshake, server version, round trip, this host
    lmclient checkout CADPRO --version 2.1 [--wait S]  # check out, print the grant, check in
    lmclient run CADPRO --version 2.1 [--wait S] -- COMMAND ARGS...
    lmclient status                                    # the server's seat counts per product
    lmclient hostid [--json]                           # what to write into a registration request
    lmclient activate LICENSE.lic [--vendor-key vendor.pub]   # activate a single-user license on this PC

``-c SERVER`` (``PORT@HOST``, a comma-separated list, or a single-user license file) overrides the
environment variable ``LM_LICENSE_SERVER``, which overrides the config file.

``run`` passes SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH and SIGCONT (those the platform
has) on to COMMAND. SIGINT is passed on unless lmclient is the foreground job of its terminal: then the
terminal's Ctrl-C has already reached COMMAND (it runs in lmclient's process group), and passing it on would
deliver it twice. If the seat is lost while COMMAND runs (the server says so, or no heartbeat got through
for a whole lease timeout), lmclient warns on stderr, sends COMMAND SIGTERM (SIGKILL 10 s later if it is
still running) and exits with 77 whatever COMMAND's own exit code was.

Exit codes (``lmclient run`` returns COMMAND's own exit code once COMMAND has started):

====  =====================================================================================
0     success
1     any other error (a bad argument value, an unreadable file)
2     usage error (argparse)
69    no seat: the license server (or the single-user license) refused the checkout; COMMAND not started
75    no license server could be reached; COMMAND not started
77    ``run``: the seat was lost while COMMAND ran (COMMAND was sent SIGTERM, and SIGKILL 10 s later)
78    configuration problem: no or a malformed server list, a bad or tampered license file, a bad key
126   ``run``: COMMAND cannot be executed; 127: COMMAND not found
128+N ``run``: COMMAND was killed by signal N (as shells report it)
====  =====================================================================================
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from client_stub import activation
from client_stub.address import ENV_SERVER, config_path, parse_server_list, resolve_servers
from client_stub.errors import LicenseError, LicenseLost, SeatDenied, ServerUnavailable
from client_stub.files import write_atomic
from client_stub.i18n import gettext_ as _
from client_stub.i18n import language
from client_stub.machine import this_fingerprint, this_machine
from client_stub.nodelock import ENV_VENDOR_KEY, load_vendor_key, verify_for_this_pc
from client_stub.sync import LicenseClient, Seat
from protocol import ErrorCode
from protocol.validation import hostname_problem, short_hostname

__all__ = ["EXIT_CONFIG", "EXIT_DENIED", "EXIT_LOST", "EXIT_UNREACHABLE", "main"]

EXIT_ERROR = 1
EXIT_DENIED = 69  # EX_UNAVAILABLE
EXIT_UNREACHABLE = 75  # EX_TEMPFAIL
EXIT_LOST = 77
EXIT_CONFIG = 78  # EX_CONFIG
#: Seconds between SIGTERM and SIGKILL when a lost seat ends COMMAND.
KILL_GRACE = 10.0
#: Signals ``run`` always passes on to COMMAND. SIGINT is handled apart (:func:`_terminal_delivers_sigint`).
FORWARDED = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH",
                                                "SIGCONT") if hasattr(signal, n))

_CONFIG_CODES = {ErrorCode.CLIENT_CONFIG_INVALID, ErrorCode.LICENSE_INVALID, ErrorCode.INVALID_HOSTNAME,
                 ErrorCode.UNSUPPORTED_PROTOCOL}


def _say_error(exc: LicenseError) -> int:
    print(f"lmclient: {exc.code}: {exc.localized_message}", file=sys.stderr)
    if exc.hint:
        print(_("lmclient: what to do: {hint}").format(hint=exc.localized_hint), file=sys.stderr)
    if isinstance(exc, ServerUnavailable) or exc.code is ErrorCode.SERVER_UNAVAILABLE:
        return EXIT_UNREACHABLE
    if exc.code in _CONFIG_CODES:
        return EXIT_CONFIG
    if isinstance(exc, SeatDenied | LicenseLost):
        return EXIT_DENIED
    return EXIT_DENIED if exc.code not in {ErrorCode.INTERNAL_ERROR, ErrorCode.BAD_REQUEST} else EXIT_ERROR


def _client(ns: argparse.Namespace, **kw: Any) -> LicenseClient:
    return LicenseClient(ns.server, vendor_key=getattr(ns, "vendor_key", None), **kw)


# --------------------------------------------------------------------------- commands
def cmd_set_server(ns: argparse.Namespace) -> int:
    import yaml

    entries = parse_server_list(ns.servers)  # LicenseError (CLIENT_CONFIG_INVALID) names the bad entry
    path = config_path()
    doc: dict[str, Any] = {}
    with contextlib.suppress(FileNotFoundError):
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            doc = loaded  # keep other settings a later version may store there
    doc["servers"] = [str(e) for e in entries]
    text = "# written by lmclient set-server; read by every product using client_stub\n" + yaml.safe_dump(
        doc, sort_keys=True)
    write_atomic(path, text.encode("utf-8"))
    print(_("servers: {servers}").format(servers=", ".join(doc["servers"])))
    print(_("written to {path}").format(path=path))
    if os.environ.get(ENV_SERVER, "").strip():
        print(_("note: the environment variable {env} is set and takes precedence over this file "
                "(lmclient show)").format(env=ENV_SERVER))
    return 0


def cmd_show(ns: argparse.Namespace) -> int:
    servers = resolve_servers(ns.server)
    data = {"servers": [str(e) for e in servers.entries], "source": servers.source,
            "config_file": str(config_path())}
    if ns.json:
        print(json.dumps(data, indent=2))
        return 0
    print(_("servers: {servers}").format(servers=", ".join(data["servers"])))
    print(_("from: {source}").format(source=servers.source))
    print(_("(order: -c argument, then {env}, then {file})").format(env=ENV_SERVER, file=data["config_file"]))
    return 0


def _host_warning() -> str | None:
    import socket

    name = socket.gethostname()
    problem = hostname_problem(name)
    if problem is None:
        return None
    bad = sorted({ch for ch in name if not (ch.isascii() and (ch.isalnum() or ch in "-."))})
    if bad and language() != "en":
        # The rule's English text repeats the rule the sentence already states; name the characters instead.
        problem = _("characters that are not allowed: {chars}").format(chars=", ".join(map(repr, bad[:8])))
    return _("this host's name {name} cannot be licensed: {problem}. Host names must be ASCII letters, "
             "digits and hyphens; a host named with Japanese or other special characters must be renamed "
             "before it can use or serve a license").format(name=repr(name), problem=problem)


def cmd_ping(ns: argparse.Namespace) -> int:
    import socket

    warning = _host_warning()
    if warning:
        print(f"lmclient: {warning}", file=sys.stderr)
    with _client(ns) as lm:
        p = lm.ping()
    print(_("license server {server}: lmgrd {version}, protocol {protocol}").format(
        server=p.server, version=p.server_version, protocol=p.protocol))
    print(_("round trip: {ms} ms").format(ms=f"{p.round_trip * 1000:.2f}"))
    host = short_hostname(socket.gethostname())
    print(_("this host: {host} (cannot be licensed; see above)").format(host=host) if warning
          else _("this host: {host}").format(host=host))
    return 0


def _describe(seat: Seat) -> str:
    where = (_("single-user license {file}") if seat.nodelocked else _("license server {server}")).format(
        file=seat.server, server=seat.server)
    details = [_("customer ID {customer_id}").format(customer_id=seat.customer_id)]
    if not seat.nodelocked:
        details.append(_("lease token {token}..., lease timeout {seconds} s").format(
            token=seat.token[:8], seconds=f"{seat.lease_timeout:g}"))
    if seat.waited:
        details.append(_("waited {seconds} s").format(seconds=f"{seat.waited:.1f}"))
    return _("granted {product} {version} from {where} ({details})").format(
        # TRANSLATORS: the separator between the details of a grant (Japanese uses its own comma).
        product=seat.product, version=seat.version, where=where, details=_(", ").join(details))


def cmd_checkout(ns: argparse.Namespace) -> int:
    with _client(ns) as lm:
        seat = lm.checkout(ns.product, ns.version, ns.wait)
        print(_describe(seat))
        seat.checkin()
        print(_("checked in"))
    return 0


def cmd_status(ns: argparse.Namespace) -> int:
    with _client(ns) as lm:
        data = lm.status()
    if ns.json:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
        return 0
    up = float(str(data.get("uptime_seconds", 0)))
    print(_("license server: lmgrd {version}, up {seconds} s").format(version=data.get("server_version", "?"),
                                                                       seconds=f"{up:.0f}"))
    pools = data.get("pools")
    for pool in pools if isinstance(pools, list) else []:
        if isinstance(pool, dict):
            print("  " + _("{product} {version}: {in_use} of {count} in use, {queued} queued (customer ID "
                           "{customer_id})").format(product=pool.get("product"), version=pool.get("version"),
                                                   in_use=pool.get("in_use"), count=pool.get("count"),
                                                   queued=pool.get("queued", 0), customer_id=pool.get("customer_id")))
    return 0


def cmd_run(ns: argparse.Namespace) -> int:
    command = list(ns.command)
    if not command:
        print(_("lmclient run: give the command to run after '--', e.g. lmclient run CADPRO --version 2.1 -- "
                "cadpro --batch job.dat"), file=sys.stderr)
        return 2
    lost = threading.Event()
    child: list[subprocess.Popen[bytes]] = []
    # Either on_lost sees the started child and stops it, or the main thread sees `lost` and does not start
    # it (or stops it at once): never a COMMAND running on a seat already lost.
    starting = threading.Lock()

    def on_lost(seat: Seat, error: LicenseLost) -> None:
        print(_("lmclient: the seat of {product} was lost: {code}: {message}; stopping {command}").format(
            product=seat.product, code=error.code, message=error.localized_message, command=command[0]),
            file=sys.stderr)
        with starting:
            lost.set()
            if child:
                _stop(child[0])

    with _client(ns, on_lost=on_lost) as lm:
        seat = lm.checkout(ns.product, ns.version, ns.wait)
        if not ns.quiet:
            print(_("lmclient: {grant}; running {command}").format(grant=_describe(seat), command=command[0]),
                  file=sys.stderr)
        previous: dict[int, Any] = {}
        with starting:
            if lost.is_set():
                return EXIT_LOST  # lost between the grant and here: COMMAND is not started
            try:
                proc = subprocess.Popen(command)
            except FileNotFoundError:
                print(_("lmclient run: command not found: {command}").format(command=command[0]), file=sys.stderr)
                seat.checkin()
                return 127
            except PermissionError:
                print(_("lmclient run: cannot execute {command}: permission denied").format(command=command[0]),
                      file=sys.stderr)
                seat.checkin()
                return 126
            child.append(proc)
        forward: Callable[[int, Any], None] = lambda signum, frame: _send(proc, signum)  # noqa: E731
        for sig in FORWARDED:
            with contextlib.suppress(OSError, ValueError):
                previous[sig] = signal.signal(sig, forward)

        def on_sigint(signum: int, frame: Any) -> None:
            if not _terminal_delivers_sigint(proc):
                _send(proc, signum)

        with contextlib.suppress(OSError, ValueError):
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, on_sigint)
        try:
            code = proc.wait()
        finally:
            for sig, handler in previous.items():
                with contextlib.suppress(OSError, ValueError, TypeError):
                    signal.signal(sig, handler)
        if not seat.lost:
            seat.checkin()
    if lost.is_set():
        return EXIT_LOST
    return 128 - code if code < 0 else code


def _send(proc: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signum)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM now, SIGKILL after :data:`KILL_GRACE` seconds if it is still running."""
    if proc.poll() is not None:
        return
    _send(proc, signal.SIGTERM)
    timer = threading.Timer(KILL_GRACE, _kill_if_running, (proc,))
    timer.daemon = True
    timer.start()


def _terminal_delivers_sigint(proc: subprocess.Popen[bytes]) -> bool:
    """Whether a SIGINT lmclient got has reached COMMAND already: lmclient is the foreground job of its
    controlling terminal (so the SIGINT is most likely the terminal's Ctrl-C, sent to the whole process group)
    and COMMAND is still in lmclient's process group. Without a terminal (a service, a batch system,
    ``kill -INT`` from a script run under ``setsid``) the SIGINT was meant for lmclient alone and is passed on."""
    if sys.platform == "win32":  # pragma: no cover - a console's Ctrl-C reaches every attached process
        return True
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False  # no controlling terminal
    try:
        return os.tcgetpgrp(fd) == os.getpgrp() == os.getpgid(proc.pid)
    except OSError:
        return False
    finally:
        os.close(fd)


def _kill_if_running(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


def cmd_hostid(ns: argparse.Namespace) -> int:
    hostname, addresses = this_machine()
    fp = this_fingerprint()
    problem = hostname_problem(hostname)
    data = {"hostname": hostname, "short_hostname": short_hostname(hostname) if problem is None else hostname,
            "addresses": list(addresses), "fingerprint": fp.digest, "licensable": problem is None,
            "problem": problem}
    if ns.json:
        print(json.dumps(data, indent=2))
    else:
        print(f"hostname:    {data['short_hostname']}")
        print(f"addresses:   {', '.join(addresses) or 'none'}")
        print(f"fingerprint: {fp.digest}")
        print(_("For a registration request: host: {{hostname: {hostname}, ip: <the address the license server "
                "or PC is reached at on the LAN>}}").format(hostname=data["short_hostname"]))
    if problem is not None:
        print(_("lmclient: warning: {warning}").format(warning=_host_warning()), file=sys.stderr)
        return EXIT_CONFIG
    return 0


def cmd_activate(ns: argparse.Namespace) -> int:
    import socket

    key = load_vendor_key(ns.vendor_key)
    path = Path(ns.license)
    lic = verify_for_this_pc(path, key)
    now = datetime.now(UTC)
    if lic.cloud_url is not None:
        from client_stub.cloud import activate_online

        cert = activate_online(lic, str(path), key, now)
        print(_("activated single-user license {customer_id} ({customer}) on this PC ({host}) by the vendor's "
                "activation service {url}; certificate valid until {until}").format(
                    customer_id=lic.customer_id, customer=lic.customer, host=short_hostname(socket.gethostname()),
                    url=lic.cloud_url, until=cert.valid_until.strftime("%Y-%m-%d %H:%M:%S UTC")
                    if cert.valid_until else _("the license expires")))
        return 0
    rec = activation.activate(lic, now, hostname=socket.gethostname())
    print(_("activated single-user license {customer_id} ({customer}) on this PC ({host}), fingerprint "
            "{fingerprint}").format(customer_id=lic.customer_id, customer=lic.customer,
                                    host=short_hostname(socket.gethostname()), fingerprint=rec.fingerprint.digest[:16]))
    print(_("recorded in {path}").format(path=activation.activation_path()))
    return 0


# --------------------------------------------------------------------------- parser
EPILOG = f"""\
examples:
  lmclient set-server 27000@licsrv01,27000@licsrv02
  lmclient show
  lmclient ping
  lmclient checkout CADPRO --version 2.1 --wait 30
  lmclient run CADPRO --version 2.1 -- cadpro --batch job.dat
  lmclient hostid
  lmclient activate cadpro-single.lic --vendor-key vendor.pub

The server list comes from -c, else the environment variable {ENV_SERVER}, else the per-user config file
({config_path()}). A single-user license file may stand where a server is expected.

exit codes: 0 ok; 1 error; 2 usage; {EXIT_DENIED} seat refused; {EXIT_UNREACHABLE} no server reachable;
{EXIT_LOST} seat lost while 'run' ran COMMAND; {EXIT_CONFIG} configuration or license file problem; 'run' returns
COMMAND's exit code (128+N if a signal N killed it; 126/127 if it cannot be started).
"""


RUN_EPILOG = f"""\
examples:
  lmclient run CADPRO --version 2.1 -- cadpro --batch job.dat
  lmclient run CADPRO --version 2.1 --wait 600 -c 27000@licsrv01 -- ./solver -n 8

COMMAND starts only once the seat is granted; heartbeats keep the seat while it runs, and the seat is checked
in when COMMAND ends or is killed. SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH and SIGCONT are passed
on to COMMAND, and SIGINT too unless lmclient is the terminal's foreground job (then Ctrl-C reaches COMMAND
directly). If the seat is lost while COMMAND runs, COMMAND gets SIGTERM (SIGKILL {KILL_GRACE:g} s later).

exit codes:
  0..      COMMAND's own exit code once it has started
  128+N    COMMAND was killed by signal N (as shells report it)
  {EXIT_DENIED}       no seat: the checkout was refused; COMMAND not started
  {EXIT_UNREACHABLE}       no license server could be reached; COMMAND not started
  {EXIT_LOST}       the seat was lost while COMMAND ran (COMMAND was stopped)
  {EXIT_CONFIG}       configuration or license file problem; COMMAND not started
  126/127  COMMAND cannot be executed / was not found
  2        usage error
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmclient", description="The lmgrd client utility: point this PC at the "
                                "license server, test it, check seats out, and license-gate any command.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def server_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-c", "--server", metavar="SERVER",
                        help=f"PORT@HOST[,PORT@HOST...] or a single-user license file (default: {ENV_SERVER}, "
                             "then the config file)")
        sp.add_argument("--vendor-key", metavar="vendor.pub",
                        help=f"vendor public key for a single-user license file (default: {ENV_VENDOR_KEY})")

    sp = sub.add_parser("set-server", help="store the server list in the per-user config file")
    sp.add_argument("servers", metavar="PORT@HOST[,PORT@HOST...]")
    sp.set_defaults(fn=cmd_set_server)

    sp = sub.add_parser("show", help="print the effective server list and where it comes from")
    server_opt(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(fn=cmd_show)

    sp = sub.add_parser("ping", help="handshake with the license server: version, round trip, this host's name")
    server_opt(sp)
    sp.set_defaults(fn=cmd_ping)

    for name, fn, text in (("checkout", cmd_checkout, "check out a seat, print the grant, check it in"),
                           ("run", cmd_run, "hold a seat while COMMAND runs; exit with COMMAND's exit code")):
        sp = sub.add_parser(name, help=text, description=text, epilog=RUN_EPILOG if name == "run" else None,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        server_opt(sp)
        sp.add_argument("product", metavar="PRODUCT")
        sp.add_argument("--version", required=True, metavar="V", help="the product's version (dotted, e.g. 2.1)")
        sp.add_argument("--wait", type=float, default=0.0, metavar="S",
                        help="wait up to S seconds in the queue for a seat (default: 0, no wait)")
        if name == "run":
            sp.add_argument("-q", "--quiet", action="store_true", help="print nothing when the seat is granted")
            sp.usage = ("lmclient run PRODUCT --version V [--wait S] [-c SERVER] [--vendor-key vendor.pub] [-q] "
                        "-- COMMAND [ARGS...]")
        sp.set_defaults(fn=fn)

    sp = sub.add_parser("status", help="the license server's seat counts per product")
    server_opt(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(fn=cmd_status)

    sp = sub.add_parser("hostid", help="this PC's hostname, addresses and fingerprint for a registration request")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(fn=cmd_hostid)

    sp = sub.add_parser("activate", help="activate a single-user license on this PC now")
    sp.add_argument("license", metavar="LICENSE.lic")
    sp.add_argument("--vendor-key", metavar="vendor.pub",
                    help=f"the vendor public key (default: the environment variable {ENV_VENDOR_KEY})")
    sp.set_defaults(fn=cmd_activate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in args:  # everything after the first "--" is run's COMMAND, untouched by option parsing
        i = args.index("--")
        args, command = args[:i], args[i + 1:]
    ns = build_parser().parse_args(args)
    ns.command = command
    try:
        code: int = ns.fn(ns)
        return code
    except LicenseError as exc:
        return _say_error(exc)
    except OSError as exc:
        print(f"lmclient: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
