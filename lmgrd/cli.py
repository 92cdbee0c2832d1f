"""``lmgrd``: the license server daemon's command line.

Settings come from defaults < ``-c CONFIG.yaml`` < flags. ``--check`` validates the configuration and every
license and lists every problem. Only this module turns errors into exit codes: 0 ok, 1 configuration or
license problems, 2 usage errors (argparse), 3 the state directory is in use by another daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmgrd import LmgrdError, __version__
from lmgrd.config import (
    DEFAULT_IDLE_CONNECTION_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
    DEFAULT_MAX_REQUESTS_PER_SECOND,
    DEFAULT_PORT,
    ConfigInvalid,
    DaemonConfig,
    build_config,
    load_config_file,
)
from lmgrd.core.licensing import Licensing
from lmgrd.core.logtext import printable
from lmgrd.i18n import N_, argparse_in_language, gettext_
from lmgrd.storage.files import load_licensing, state_dir
from lmgrd.storage.host import clock_offset, daemon_wall_clock, raise_nofile
from protocol.activation import auto_activation_at

if TYPE_CHECKING:
    from lmgrd.storage.etcd import EtcdSettings
    from lmgrd.storage.journal import LeaseStore

logger = logging.getLogger("lmgrd")

EPILOG = N_("""\
examples:
  lmgrd --license site.lic --vendor-key vendor.pub
  lmgrd -c /etc/lmgrd/lmgrd.yaml --port 27000
  lmgrd --check -c /etc/lmgrd/lmgrd.yaml      # validate config and licenses, exit 1 on any problem

Clients reach the server as PORT@HOST (for example 27000@licsrv01). Timing is in seconds: clients
heartbeat every --heartbeat-interval; a seat whose client stops heartbeating is reclaimed after
--lease-timeout. Leases survive a restart (they are kept in --state-dir).
""")


def build_parser() -> argparse.ArgumentParser:
    """The parser, its help in the user's language (:mod:`lmgrd.i18n`)."""
    _ = gettext_
    p = argparse.ArgumentParser(
        prog="lmgrd", description=_("lmgrd license server: serves floating seats of the products in signed "
                                    "license files to clients on the LAN."),
        epilog=_(EPILOG), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", metavar="CONFIG.yaml", help=_("YAML configuration file (flags override it)"))
    p.add_argument("--license", dest="licenses", action="append", metavar="FILE.lic",
                   help=_("signed license file to serve; repeat for several"))
    p.add_argument("--vendor-key", metavar="vendor.pub", help=_("the software vendor's public key (PEM)"))
    p.add_argument("--revocations", action="append", metavar="FILE", help=_(
        "signed revocation file from the vendor (lmissue revoke / reissue); repeat for several; added to the "
        "config's 'revocations:'"))
    p.add_argument("--port", type=int, metavar="N", help=_("TCP port for clients (default {port}; 0 picks a free "
                                                           "port and logs it)").format(port=DEFAULT_PORT))
    p.add_argument("--bind", metavar="ADDR", help=_("address to listen on (default: every interface)"))
    p.add_argument("--state-dir", metavar="DIR", help=_("where leases are kept across restarts (default: the "
                                                        "platform's user state directory)"))
    p.add_argument("--heartbeat-interval", type=float, metavar="S", help=_("seconds between client heartbeats "
                                                                           "(default 30, at least 1)"))
    p.add_argument("--lease-timeout", type=float, metavar="S", help=_("seconds without a heartbeat before a seat "
                                                                      "is reclaimed (default 90, at least 3)"))
    p.add_argument("--reconnect-grace", type=float, metavar="S", help=_(
        "seconds a dropped client's seats are kept for it to reconnect (default 2 heartbeats, never more than the "
        "lease timeout)"))
    p.add_argument("--max-connections-per-address", type=int, metavar="N", help=_(
        "connections one client address may hold (default {n}; 0 = no limit)").format(
        n=DEFAULT_MAX_CONNECTIONS_PER_ADDRESS))
    p.add_argument("--handshake-timeout", type=float, metavar="S", help=_("seconds a new connection has to send "
                                                                          "hello (default 10)"))
    p.add_argument("--idle-connection-timeout", type=float, metavar="S", help=_(
        "seconds a connection that holds no seat may send nothing before it is closed (default {default}; "
        "0 = never)").format(default=f"{DEFAULT_IDLE_CONNECTION_TIMEOUT:g}"))
    p.add_argument("--max-requests-per-second", type=float, metavar="N", help=_(
        "requests one connection may send per second, in bursts of two seconds' worth; the rest are answered "
        "RATE_LIMITED (default {default}; 0 = no limit)").format(default=f"{DEFAULT_MAX_REQUESTS_PER_SECOND:g}"))
    p.add_argument("--max-frame-bytes", type=int, metavar="N", help=_("largest message accepted (default 65536)"))
    p.add_argument("--metrics-port", type=_metrics_port, metavar="N", help=_(
        "HTTP port for /metrics (Prometheus), /healthz and the status page (default 27001; 0 = off; 'auto' picks "
        "a free port and logs it)"))
    p.add_argument("--metrics-bind", metavar="ADDR", help=_("address for the metrics port (default: the --bind "
                                                            "address)"))
    p.add_argument("--metrics-max-connections", type=int, metavar="N", help=_("connections the metrics port keeps "
                   "open at once; past it the one idle or slow the longest is dropped (default 512)"))
    p.add_argument("--metrics-header-timeout", type=float, metavar="S", help=_("seconds a metrics request has to "
                   "send its head, from its first byte (default 5)"))
    p.add_argument("--metrics-request-timeout", type=float, metavar="S", help=_("seconds a metrics request has to "
                   "send everything and take its answer (default 10)"))
    p.add_argument("--metrics-keepalive-timeout", type=float, metavar="S", help=_("seconds an idle kept-alive "
                   "metrics connection stays open (default 5; 0 closes after every answer)"))
    p.add_argument("--metrics-max-header-bytes", type=int, metavar="N", help=_("largest metrics request head "
                   "(default 8192)"))
    p.add_argument("--metrics-max-body-bytes", type=int, metavar="N", help=_("largest metrics request body "
                   "(default 65536)"))
    p.add_argument("--cloud-poll-interval", type=float, metavar="S", help=_("seconds between activation requests "
                   "to the vendor's activation service while a license with a cloud_url is pending (default 900, "
                   "with jitter; at least 1)"))
    p.add_argument("--cloud-check-in-interval", type=float, metavar="S", help=_("seconds between check-ins of an "
                   "active cloud license with the activation service (default 86400, with jitter; at least 1)"))
    p.add_argument("--cloud-ca-file", metavar="PEM", help=_("extra CA certificates to trust for the activation "
                   "service (a TLS-inspecting proxy's CA; answers are signed by the vendor either way)"))
    p.add_argument("--cloud-proxy", metavar="URL", help=_("HTTP proxy for the activation service, e.g. "
                   "http://proxy:3128 (default: HTTPS_PROXY / NO_PROXY from the environment)"))
    p.add_argument("--store", choices=("journal", "etcd"), help=_("where seats live: journal (this node's "
                   "--state-dir, the default) or etcd (high availability: several lmgrd nodes share one etcd "
                   "cluster; needs pip install 'lmgrd[ha]')"))
    p.add_argument("--etcd-endpoints", metavar="H:P,...", help=_("the etcd members, e.g. "
                   "10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379"))
    p.add_argument("--etcd-prefix", metavar="KEY", help=_("etcd key prefix of this license service (default /lmgrd)"))
    p.add_argument("--etcd-timeout", type=float, metavar="S", help=_("deadline of each etcd call (default 2)"))
    p.add_argument("--etcd-cacert", metavar="ca.pem", help=_("TLS: CA certificate of the etcd members"))
    p.add_argument("--etcd-cert", metavar="client.pem", help=_("TLS: client certificate for etcd"))
    p.add_argument("--etcd-key", metavar="client-key.pem", help=_("TLS: the client certificate's key"))
    p.add_argument("--etcd-user", metavar="NAME", help=_("etcd user (etcd authentication)"))
    p.add_argument("--etcd-password-file", metavar="PATH", help=_("file whose first line is the etcd user's password"))
    p.add_argument("--node-name", metavar="NAME", help=_("this node's name in the cluster (default: the hostname)"))
    p.add_argument("--usage-log", metavar="PATH", help=_(
        "append a JSON-lines usage log here (checkouts, checkins, expiries, removals, denials) for 'lmutil "
        "report'; rotated by size (usage_log_max_bytes)"))
    p.add_argument("--admin-token-file", metavar="PATH", help=_(
        "where to write the admin token lmutil uses (default: the user's runtime directory, admin-PORT.token, "
        "mode 0600)"))
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help=_("default info"))
    p.add_argument("--check", action="store_true", help=_("validate the configuration and licenses, list every "
                                                          "problem, and exit (1 if there is one)"))
    p.add_argument("--version", action="version", version=f"lmgrd {__version__}")
    return p


def _overrides(ns: argparse.Namespace) -> dict[str, Any]:
    keys = ("licenses", "vendor_key", "port", "bind", "state_dir", "heartbeat_interval", "lease_timeout",
            "reconnect_grace", "max_connections_per_address", "handshake_timeout", "idle_connection_timeout",
            "max_requests_per_second", "max_frame_bytes", "log_level",
            "admin_token_file", "metrics_port", "metrics_bind", "revocations", "usage_log", "metrics_max_connections",
            "metrics_header_timeout", "metrics_request_timeout", "metrics_keepalive_timeout",
            "metrics_max_header_bytes", "metrics_max_body_bytes",
            "cloud_poll_interval", "cloud_check_in_interval", "cloud_ca_file", "cloud_proxy", "store", "etcd_endpoints",
            "etcd_prefix", "etcd_timeout", "etcd_cacert", "etcd_cert", "etcd_key", "etcd_user", "etcd_password_file",
            "node_name")
    return {k: getattr(ns, k) for k in keys}


def _metrics_port(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number (0 = off) or 'auto', got {value!r}") from None


class OneLineFormatter(logging.Formatter):
    """The daemon's log format, with every message escaped onto one line (lmgrd.core.logtext.printable): a
    newline or terminal escape in anything a client sent (its user name, display, product or version) cannot
    forge a log line, whichever log call wrote it. Tracebacks keep their lines (they are ours)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
                                           "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    logging.getLogger("grpc").setLevel(logging.WARNING)  # store: etcd; its debug lines say nothing about seats
    # The activation service's HTTP client logs every request and socket step; the cloud agent logs what
    # matters (lmgrd.daemon.cloud), so these stay at warnings even under --log-level debug.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


_CONFIG_SOURCE: tuple[Path | None, dict[str, Any]] = (None, {})
#: The configuration the last successful reread produced (None: the one the daemon started with).
_RUNNING_CONFIG: DaemonConfig | None = None


def reread_config(cfg: DaemonConfig) -> tuple[DaemonConfig, list[str]]:
    """The config as lmreread sees it: the file (and its options file) read again, the original flags on top.

    A config file that no longer validates is reported (the problems are returned, for lmreread's answer)
    and the running config is kept: the one the last good reread gave, else ``cfg`` (the startup one).
    """
    global _RUNNING_CONFIG
    path, overrides = _CONFIG_SOURCE
    if path is None:
        return cfg, []
    try:
        _RUNNING_CONFIG = build_config(load_config_file(path), overrides, str(path))
        return _RUNNING_CONFIG, []
    except ConfigInvalid as exc:
        logger.error("reread: %s; keeping the running configuration", exc)
        return _RUNNING_CONFIG or cfg, [f"{path}: {p}; the running configuration (policy included) is kept"
                                        for p in exc.problems]


def reload_licensing(cfg: DaemonConfig) -> tuple[Licensing, list[str]]:
    """What lmreread and SIGHUP load: the config file again, then every license, revocation and policy."""
    new_cfg, problems = reread_config(cfg)
    licensing, more = load_licensing(new_cfg)
    for line in new_cfg.options_unsupported:
        logger.warning("reread: options file: %s", line)
    return licensing, problems + more


def run_check(cfg: DaemonConfig) -> int:
    licensing, problems = load_licensing(cfg, create_key=False)
    for path, lic in licensing.served:
        prods = ", ".join(f"{p.name} {p.version} x{p.count}" for p in lic.products)
        exp = lic.expires.isoformat() if lic.expires else "never"
        state = licensing.activation_state(lic.customer_id, datetime.min.replace(tzinfo=UTC))  # reads, never writes
        if state == "pending" and lic.cloud_url is not None:
            state += f" (activated by the vendor's activation service {lic.cloud_url})"
        elif state == "pending":
            state += f" (activates automatically at {auto_activation_at(lic):%Y-%m-%d %H:%M:%S} UTC, or run lmutil " \
                     f"activate {lic.customer_id})"
        print(f"ok: {path}: customer ID {lic.customer_id} ({lic.customer}), {prods}, expires {exp}, "
              f"share {lic.share}, activation {state}")
    for line in cfg.options_unsupported:  # ignored, not errors: FlexNet keywords lmgrd does not implement
        print(f"unsupported: {line}")
    if cfg.options_unsupported:
        print(gettext_("{n} line(s) of the options file {path} are not supported as written (listed above); the "
                       "other lines apply").format(n=len(cfg.options_unsupported), path=cfg.options))
    for prob in problems:
        print(f"problem: {prob}")
    if problems:
        print(gettext_("{n} problem(s) found").format(n=len(problems)))
        return 1
    print(gettext_("configuration and licenses are valid"))
    return 0


def etcd_settings(cfg: DaemonConfig) -> EtcdSettings:
    """The etcd connection of ``store: etcd``; raises LmgrdError when the extra is missing or a file is unreadable."""
    from lmgrd.storage.etcd import EtcdSettings, ha_missing

    missing = ha_missing()
    if missing:
        raise LmgrdError(missing)
    password = None
    if cfg.etcd_password_file is not None:
        try:
            password = cfg.etcd_password_file.read_text(encoding="utf-8").splitlines()[0]
        except (OSError, IndexError, UnicodeDecodeError) as exc:
            raise LmgrdError(f"etcd_password_file: cannot read the password from {cfg.etcd_password_file}: "
                             f"{exc}") from None
    for what, path in (("etcd_cacert", cfg.etcd_cacert), ("etcd_cert", cfg.etcd_cert), ("etcd_key", cfg.etcd_key)):
        if path is not None and not path.is_file():
            raise LmgrdError(f"{what}: no such file: {path}")
    return EtcdSettings(cfg.etcd_endpoints, cfg.etcd_prefix, cfg.etcd_timeout, cfg.etcd_cacert, cfg.etcd_cert,
                        cfg.etcd_key, cfg.etcd_user, password)


async def serve(cfg: DaemonConfig, licensing: Licensing) -> int:
    from lmgrd.daemon.server import Server, install_signal_handlers
    from lmgrd.storage.journal import StoreError, open_store

    cluster = None
    state = state_dir(cfg)
    if cfg.store == "etcd":  # seats in etcd; the state directory keeps only this node's activation record
        from lmgrd.storage.etcd import EtcdSeats, NullStore

        store: LeaseStore = NullStore()
        cluster = EtcdSeats(etcd_settings(cfg), cfg.node_name or socket.gethostname().split(".")[0],
                            cfg.lease_timeout)
    else:
        try:
            state.mkdir(parents=True, exist_ok=True)
            store = open_store(state)
        except OSError as exc:  # read-only, full, or not ours: say where and what, never a traceback
            raise StoreError(f"cannot open the state directory {state}: {exc.strerror or exc}"
                             f"{f' ({exc.filename})' if exc.filename else ''}; make it writable by this user, free "
                             "space in it, or give lmgrd another --state-dir") from None

    def reload() -> tuple[Licensing, list[str]]:
        result = reload_licensing(cfg)
        # Once the server has the reread licenses (this runs inside Server.reload): a license with a cloud_url
        # that is new asks the activation service now, starting the agent if none ran, with the cloud settings
        # of the config as reread (a cloud_proxy or cloud_ca_file added beside the first cloud license).
        server.loop.call_soon(start_cloud_agent, server, state, _RUNNING_CONFIG or cfg)
        return result

    server = Server(cfg, licensing, store, reload=reload, wall=daemon_wall_clock(clock_offset()), cluster=cluster)
    install_signal_handlers(server)
    from lmgrd.admin.commands import enable_admin
    from lmgrd.monitoring.usage import attach_usage_log

    attach_usage_log(server)  # flushed by the server's shutdown (on_shutdown)
    try:
        await server.start()
    except OSError as exc:
        store.close()
        raise LmgrdError(f"cannot listen on port {cfg.port}: {exc.strerror or exc}; is another lmgrd running? "
                         "choose another --port") from None
    enable_admin(server)  # the admin token file, and lmutil's commands
    start_cloud_agent(server, state)
    from lmgrd.monitoring.http import start_monitoring

    monitor = await start_monitoring(server, cfg)
    await server.stopped.wait()
    await monitor.close()
    if server.cloud is not None:
        await server.cloud.close()
    return 0


def _host_for_cloud() -> tuple[str, list[str]]:
    """This machine's hostname and routable addresses, as an activation request reports them."""
    import ipaddress

    from lmgrd.storage.files import this_host

    host = this_host()
    addrs = [a for a in host.addresses if not (ipaddress.ip_address(a).is_loopback
                                               or ipaddress.ip_address(a).is_link_local)]
    return host.hostname, addrs


def start_cloud_agent(server: Any, state: Path, cfg: DaemonConfig | None = None) -> Any:
    """Start talking to the vendor's activation service if a served license has a ``cloud_url``, with the
    cloud settings of ``cfg`` (default: the server's). After a reread: the running agent takes the reread
    settings and wakes, so a newly added license is asked about at once."""
    cfg = cfg or server.cfg
    if server.cloud is not None:
        server.cloud.configure(cfg)
        server.cloud.wake()
        return server.cloud
    acts = server.licensing.activations
    if acts is None or acts.cloud is None or server.closing:
        return None
    from lmgrd.daemon.cloud import CloudAgent
    from lmgrd.daemon.cloudhttp import proxy_text
    from lmgrd.storage.cloud import installation_key

    agent = CloudAgent(server, installation_key(state), _host_for_cloud, cfg=cfg)
    server.cloud = agent
    agent.start()
    urls = sorted({lic.cloud_url for _p, lic in server.licensing.served if lic.cloud_url})
    logger.info("activation service: %s (poll every %g s while pending, check in every %g s; cloud_proxy %s)",
                ", ".join(urls), agent.poll_interval, agent.check_in_interval, proxy_text(cfg.cloud_proxy))
    return agent


def main(argv: list[str] | None = None) -> int:
    with argparse_in_language():
        ns = build_parser().parse_args(argv)
    try:
        file_values = load_config_file(Path(ns.config)) if ns.config else {}
        cfg = build_config(file_values, _overrides(ns), ns.config or "command line")
        global _CONFIG_SOURCE
        _CONFIG_SOURCE = (Path(ns.config) if ns.config else None, _overrides(ns))
    except ConfigInvalid as exc:
        print(f"lmgrd: {exc}", file=sys.stderr)
        return 1
    if ns.check:
        return run_check(cfg)
    configure_logging(cfg.log_level)
    raise_nofile()
    licensing, problems = load_licensing(cfg)
    for prob in problems:
        logger.error("%s", prob)
    for line in cfg.options_unsupported:
        logger.warning("options file: %s", line)
    if not licensing.served:
        logger.error("no license can be served; clients will be refused until this is fixed")
    try:
        runner_factory: Any = None
        if sys.platform != "win32" and os.environ.get("LMGRD_LOOP", "uvloop") == "uvloop":
            try:
                import uvloop

                runner_factory = uvloop.new_event_loop
            except ImportError:
                logger.info("uvloop is not installed; using the standard asyncio loop")
        with asyncio.Runner(loop_factory=runner_factory) as runner:
            return runner.run(serve(cfg, licensing))
    except LmgrdError as exc:
        logger.error("%s", exc)
        from lmgrd.storage.journal import StoreLocked

        return 3 if isinstance(exc, StoreLocked) else 1
    except KeyboardInterrupt:
        return 0
    finally:
        logging.shutdown()
        time.sleep(0)


if __name__ == "__main__":
    sys.exit(main())
