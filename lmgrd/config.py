"""Daemon configuration: defaults < YAML file < command-line flags, validated into one frozen object.

Every problem is reported at once, each with its key path, the bad value and what is expected (the asyncpg
and uvicorn model). Only ``cli`` turns :class:`ConfigInvalid` into an exit code.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from lmgrd import LmgrdError
from lmgrd.core.documents import load_yaml
from lmgrd.core.options import parse_options
from lmgrd.core.policy import Policy, combine_policies, parse_policy
from protocol.validation import shown

DEFAULT_PORT = 27000
DEFAULT_METRICS_PORT = 27001
#: Connections one client address may hold open at once. Generous enough for a terminal server with a few
#: hundred users each running a product, small enough that one runaway host cannot take every descriptor.
DEFAULT_MAX_CONNECTIONS_PER_ADDRESS = 1000
#: Seconds a connection holding no seat may stay silent. A client between checkouts reconnects on its next
#: request; an idle one cannot hold a descriptor for ever.
DEFAULT_IDLE_CONNECTION_TIMEOUT = 300.0
#: Requests per second one connection may send. An honest license client sends a few (a heartbeat every
#: heartbeat_interval, a checkout and a checkin now and then); this bounds what one flooding connection costs.
DEFAULT_MAX_REQUESTS_PER_SECOND = 1000.0
#: listen() backlog; the kernel caps it at net.core.somaxconn (4096 on current Linux).
DEFAULT_BACKLOG = 8192
#: Activation requests of a pending cloud license: every 15 minutes; check-ins of an active one: daily.
DEFAULT_CLOUD_POLL_INTERVAL = 15 * 60.0
DEFAULT_CLOUD_CHECK_IN_INTERVAL = 24 * 3600.0
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigInvalid(LmgrdError):
    """The configuration has problems; ``problems`` lists every one."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Everything the daemon needs, validated. Durations are float seconds."""

    licenses: tuple[Path, ...] = ()
    vendor_key: Path | None = None
    port: int = DEFAULT_PORT
    bind: str = ""  # "" = every interface, IPv4 and IPv6
    state_dir: Path | None = None  # None = platformdirs user state dir
    heartbeat_interval: float = 30.0
    lease_timeout: float = 90.0
    reconnect_grace: float | None = None  # None = min(lease_timeout, 2 * heartbeat_interval)
    max_connections_per_address: int = DEFAULT_MAX_CONNECTIONS_PER_ADDRESS
    handshake_timeout: float = 10.0
    #: A connection that holds no seat, waits for none and sends nothing this long is closed (0: never).
    idle_connection_timeout: float = DEFAULT_IDLE_CONNECTION_TIMEOUT
    #: Requests one connection may send per second (bursts of two seconds' worth); the rest are answered
    #: RATE_LIMITED. 0: no limit.
    max_requests_per_second: float = DEFAULT_MAX_REQUESTS_PER_SECOND
    max_frame_bytes: int = 64 * 1024
    backlog: int = DEFAULT_BACKLOG
    sync_interval: float = 1.0
    shutdown_timeout: float = 4.0
    log_level: str = "info"
    admin_token_file: Path | None = None  # None = runtime dir / admin-PORT.token
    # Monitoring (lmgrd.monitoring): 0 turns the port off, "auto" picks a free port and logs it.
    metrics_port: int | Literal["auto"] = DEFAULT_METRICS_PORT
    metrics_bind: str | None = None  # None = the same address as ``bind``
    metrics_textfile: Path | None = None  # write the metrics dump here for node_exporter's textfile collector
    metrics_textfile_interval: float = 15.0
    # The monitoring port's limits (lmgrd.monitoring.http.HTTPLimits): connections open at once (at the cap the
    # one idle or slow the longest is evicted), seconds to deliver a request head and a whole request (from its
    # first byte), seconds a kept-alive connection may sit idle (0 = close after every answer), and the largest
    # request head and body in bytes.
    metrics_max_connections: int = 512
    metrics_header_timeout: float = 5.0
    metrics_request_timeout: float = 10.0
    metrics_keepalive_timeout: float = 5.0
    metrics_max_header_bytes: int = 8 * 1024
    metrics_max_body_bytes: int = 64 * 1024
    # Usage log (lmgrd.monitoring.usage): JSON lines for lmutil report, rotated at max_bytes into usage_log.1 .. .N.
    usage_log: Path | None = None
    usage_log_max_bytes: int = 10 * 1024 * 1024
    usage_log_backups: int = 5
    #: A FlexNet options file (``options: FILE.opt``); its rules join the YAML policy (see ``combine_policies``).
    options: Path | None = None
    #: The usage policy (``groups``, ``host_groups``, ``policy``, and the ``options`` file), parsed once here.
    policy: Policy = field(default_factory=Policy)
    #: Lines of the options file that were ignored as malformed (each names the file and line): problems
    #: for ``lmgrd --check`` and the log, which never stop the daemon.
    options_problems: tuple[str, ...] = ()
    #: Lines of the options file that lmgrd does not support (FlexNet keywords it does not implement).
    options_unsupported: tuple[str, ...] = ()
    # The vendor's activation service (licenses whose signed ``cloud_url`` names it; lmgrd.daemon.cloud).
    #: Seconds between activation requests while a cloud license is pending (jittered by up to 10 %).
    cloud_poll_interval: float = DEFAULT_CLOUD_POLL_INTERVAL
    #: Seconds between check-ins of an active cloud license (jittered by up to 10 %).
    cloud_check_in_interval: float = DEFAULT_CLOUD_CHECK_IN_INTERVAL
    #: Extra CA certificates (PEM) to trust for the service, e.g. a TLS-inspecting proxy's; every answer is
    #: Ed25519-signed by the vendor, so trusting a proxy's CA cannot forge an activation.
    cloud_ca_file: Path | None = None
    #: An HTTP(S) proxy for the service (``http://proxy:3128``); without it HTTPS_PROXY / NO_PROXY apply.
    cloud_proxy: str | None = None
    #: Where seats live: ``journal`` (this node's state directory, the default) or ``etcd`` (HA: several nodes
    #: share one etcd cluster; needs the ``lmgrd[ha]`` extra).
    store: Literal["journal", "etcd"] = "journal"
    etcd_endpoints: tuple[str, ...] = ()  # host:port of each etcd member
    etcd_prefix: str = "/lmgrd"
    etcd_timeout: float = 2.0  # the deadline of every etcd call
    etcd_cacert: Path | None = None  # TLS: the CA that signed etcd's certificates (https endpoints)
    etcd_cert: Path | None = None  # TLS client certificate (etcd --client-cert-auth)
    etcd_key: Path | None = None
    etcd_user: str | None = None  # etcd authentication (etcdctl user add)
    etcd_password_file: Path | None = None  # the user's password, on the file's first line
    #: This node's name in the cluster (lmstat's server lines, which node holds each client); default: hostname.
    node_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # the raw sections: policy, revocations, site_networks

    @property
    def grace(self) -> float:
        """Seats of a dropped connection are kept this long for a reconnect; never longer than a lease."""
        g = self.reconnect_grace if self.reconnect_grace is not None else 2 * self.heartbeat_interval
        return min(g, self.lease_timeout)


_KEYS = {f.name for f in fields(DaemonConfig)} - {"extra", "policy", "options_problems", "options_unsupported"} | {
    "license"}
#: The largest config file read (a real one is a few kB; policy for thousands of products stays far below).
MAX_CONFIG_FILE_BYTES = 64 * 1024 * 1024
#: The largest options file read (FlexNet's lines are at most 4000 characters; a real file is a few kB).
MAX_OPTIONS_FILE_BYTES = 4 * 1024 * 1024
#: Sections read by their own parsers (policy, revocations, site); passed through in ``extra``.
_EXTRA_KEYS = {"policy", "revocations", "groups",
               "host_groups", "products", "site_networks"}


def _num(problems: list[str], key: str, value: Any, lo: float, hi: float, integer: bool = False) -> float | None:
    what = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        problems.append(f"{key}: expected {what} from {lo:g} to {hi:g}, got {shown(value)}")
        return None
    if math.isnan(value) or not lo <= value <= hi:
        problems.append(f"{key}: expected {what} from {lo:g} to {hi:g}, got {shown(value)}")
        return None
    return value


def build_config(file_values: dict[str, Any], overrides: dict[str, Any], source: str) -> DaemonConfig:
    """Merge file values and flag overrides (flags win) and validate everything.

    Raises:
        ConfigInvalid: with every problem found.
    """
    problems: list[str] = []
    merged: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in file_values.items():
        if key in _EXTRA_KEYS:
            extra[key] = value
        elif key not in _KEYS:
            near = difflib.get_close_matches(str(key), sorted(_KEYS | _EXTRA_KEYS), n=1)
            problems.append(f"{key}: unknown setting" + (f" (did you mean '{near[0]}'?)" if near else ""))
        else:
            merged[key] = value
    if "license" in merged:
        merged.setdefault("licenses", merged.pop("license"))
    for key, value in overrides.items():
        if value is not None and value != []:
            merged[key] = value

    out: dict[str, Any] = {}
    lic = merged.get("licenses", [])
    if isinstance(lic, str):
        lic = [lic]
    if not isinstance(lic, list) or not all(isinstance(x, str) for x in lic):
        problems.append(f"licenses: expected a path or a list of paths, got {shown(lic)}")
    else:
        out["licenses"] = tuple(Path(x).expanduser() for x in lic)
    for key in ("vendor_key", "state_dir", "admin_token_file", "usage_log", "options", "cloud_ca_file", "etcd_cacert",
                "etcd_cert", "etcd_key", "etcd_password_file"):
        if key in merged:
            if not isinstance(merged[key], str):
                problems.append(f"{key}: expected a path, got {shown(merged[key])}")
            else:
                out[key] = Path(merged[key]).expanduser()
    if "bind" in merged:
        if not isinstance(merged["bind"], str):
            problems.append(f"bind: expected an address such as 0.0.0.0 or 127.0.0.1, got {shown(merged['bind'])}")
        else:
            out["bind"] = merged["bind"]
    ranges: dict[str, tuple[float, float, bool]] = {
        "port": (0, 65535, True),
        "heartbeat_interval": (1, 3600, False),
        "lease_timeout": (3, 86400, False),
        "reconnect_grace": (0, 86400, False),
        "max_connections_per_address": (0, 1_000_000, True),
        "handshake_timeout": (0.1, 600, False),
        "idle_connection_timeout": (0, 86400, False),
        "max_requests_per_second": (0, 1_000_000, False),
        "max_frame_bytes": (1024, 16 * 1024 * 1024, True),
        "backlog": (16, 65535, True),
        "sync_interval": (0.01, 3600, False),
        "shutdown_timeout": (0, 60, False),
        "usage_log_max_bytes": (0, 2**40, True),  # 0 = never rotate
        "usage_log_backups": (0, 1000, True),
        "metrics_max_connections": (1, 1_000_000, True),
        "metrics_header_timeout": (0.1, 600, False),
        "metrics_request_timeout": (0.1, 3600, False),
        "metrics_keepalive_timeout": (0, 3600, False),
        "metrics_max_header_bytes": (1024, 1024 * 1024, True),
        "metrics_max_body_bytes": (0, 16 * 1024 * 1024, True),
        "etcd_timeout": (0.05, 60, False),
        "cloud_poll_interval": (1, 30 * 86400, False),
        "cloud_check_in_interval": (1, 365 * 86400, False),
    }
    for key, (lo, hi, integer) in ranges.items():
        if key in merged:
            v = _num(problems, key, merged[key], lo, hi, integer)
            if v is not None:
                out[key] = int(v) if integer else float(v)
    _metrics_settings(merged, out, problems)
    if "cloud_proxy" in merged:
        v = merged["cloud_proxy"]
        if not isinstance(v, str) or not re.fullmatch(r"(?i)(https?|socks5h?)://[^\s/]+(:[0-9]{1,5})?/?", v):
            problems.append(f"cloud_proxy: expected a proxy URL such as http://proxy.example:3128, got {v!r}")
        else:
            out["cloud_proxy"] = v
    _store_settings(merged, out, problems)
    if "log_level" in merged:
        lvl = merged["log_level"]
        if not isinstance(lvl, str) or lvl.lower() not in LOG_LEVELS:
            problems.append(f"log_level: expected one of {', '.join(LOG_LEVELS)}, got {shown(lvl)}")
        else:
            out["log_level"] = lvl.lower()
    # Revocation files: the config's list plus every --revocations flag (both load); site_networks narrows.
    revs = extra.get("revocations", [])
    revs = [revs] if isinstance(revs, str) else revs
    if not isinstance(revs, list) or not all(isinstance(x, str) for x in revs):
        problems.append(f"revocations: expected a path or a list of paths, got {shown(revs)}")
    elif revs or overrides.get("revocations"):
        extra["revocations"] = [*revs, *(overrides.get("revocations") or [])]
    policy = Policy()
    if extra.keys() & {"policy", "groups", "host_groups"}:
        policy, policy_problems = parse_policy(extra)
        problems.extend(policy_problems)
    if "options" in out:
        policy, opt_problems, opt_unsupported = _read_options(out["options"], policy, problems)
        out["options_problems"], out["options_unsupported"] = opt_problems, opt_unsupported
    if "site_networks" in extra:
        from lmgrd.core.site import site_networks_problems

        problems.extend(site_networks_problems(extra["site_networks"]))
    cfg = replace(DaemonConfig(), **out, extra=extra, policy=policy)
    if cfg.lease_timeout <= cfg.heartbeat_interval:
        problems.append(
            f"lease_timeout: must be longer than heartbeat_interval ({cfg.heartbeat_interval:g} s), got "
            f"{cfg.lease_timeout:g} s; about three heartbeats per lease timeout is recommended"
        )
    if not cfg.licenses:
        problems.append("licenses: no license file given (use --license FILE.lic or 'licenses:' in the config)")
    if cfg.vendor_key is None:
        problems.append("vendor_key: no vendor public key given (use --vendor-key vendor.pub)")
    if problems:
        raise ConfigInvalid(source, problems)
    return cfg


def _store_settings(merged: dict[str, Any], out: dict[str, Any], problems: list[str]) -> None:
    store = merged.get("store", "journal")
    if store not in ("journal", "etcd"):
        problems.append(f"store: expected 'journal' (the default) or 'etcd', got {store!r}")
        return
    out["store"] = store
    eps = merged.get("etcd_endpoints", [])
    if isinstance(eps, str):
        eps = [e for e in (x.strip() for x in eps.split(",")) if e]
    if not isinstance(eps, list) or not all(isinstance(e, str) for e in eps):
        problems.append(f"etcd_endpoints: expected host:port[,host:port...], got {eps!r}")
        eps = []
    clean = []
    for e in eps:
        e = e.removeprefix("http://").removeprefix("https://")
        host, _, port = e.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            problems.append(f"etcd_endpoints: {e!r} is not host:port (for example 127.0.0.1:2379)")
        else:
            clean.append(e)
    out["etcd_endpoints"] = tuple(clean)
    if store == "etcd" and not eps:
        problems.append("etcd_endpoints: store: etcd needs the etcd members (--etcd-endpoints "
                        "10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379)")
    for key in ("etcd_prefix", "etcd_user", "node_name"):
        if key in merged and merged[key] is not None:
            v = merged[key]
            if not isinstance(v, str) or not v or any(c.isspace() for c in v):
                problems.append(f"{key}: expected a non-empty name without spaces, got {v!r}")
            else:
                out[key] = v
    if "etcd_prefix" in out and not out["etcd_prefix"].startswith("/"):
        problems.append(f"etcd_prefix: expected a key prefix starting with '/', got {out['etcd_prefix']!r}")
    if ("etcd_cert" in merged) != ("etcd_key" in merged):
        problems.append("etcd_cert, etcd_key: a TLS client certificate needs both the certificate and its key")
    if "etcd_cert" in merged and "etcd_cacert" not in merged:
        problems.append("etcd_cacert: a TLS client certificate needs the CA of etcd's server certificate too")
    if ("etcd_user" in merged) != ("etcd_password_file" in merged):
        problems.append("etcd_user, etcd_password_file: etcd authentication needs both the user and the file "
                        "holding its password")


def _read_options(path: Path, yaml_policy: Policy, problems: list[str]
                  ) -> tuple[Policy, tuple[str, ...], tuple[str, ...]]:
    """Read the FlexNet options file and join its rules to the YAML policy.

    A file that cannot be read is a configuration problem (appended to ``problems``): on a reread the running
    configuration is then kept, so a moved file never lifts every rule. Its bad lines are not: each is
    ignored and returned (with the unsupported ones) for ``--check`` and the log.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_OPTIONS_FILE_BYTES + 1)
    except OSError as exc:
        problems.append(f"options: cannot read the options file {path}: {exc.strerror or exc}; check the path "
                        "and its permissions")
        return yaml_policy, (), ()
    if len(data) > MAX_OPTIONS_FILE_BYTES:
        problems.append(f"options: {path} is larger than {MAX_OPTIONS_FILE_BYTES} bytes; it is not an options file")
        return yaml_policy, (), ()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        try:  # Notepad on Japanese Windows saved options files (and their comments) as Shift_JIS for years
            text = data.decode("cp932")
        except UnicodeDecodeError as exc:
            problems.append(f"options: {path} is neither UTF-8 nor Shift_JIS text (bad byte at offset "
                            f"{exc.start}); save it as UTF-8")
            return yaml_policy, (), ()
    opts = parse_options(text, str(path))
    bad = list(opts.problems)
    for product, lineno in opts.timeout_lines.items():
        own = yaml_policy.products.get(product)
        if own is not None and own.timeout is not None:
            bad.append(f"{path} line {lineno}: TIMEOUT for {product} clashes with policy.{product}.timeout "
                       f"({own.timeout:g} s) in the YAML config, which is used; set it in one place")
    return combine_policies(yaml_policy, opts.policy), tuple(bad), opts.unsupported


def _metrics_settings(merged: dict[str, Any], out: dict[str, Any], problems: list[str]) -> None:
    """metrics_port (0 = off, "auto" = any free port), metrics_bind, metrics_textfile(_interval)."""
    if "metrics_port" in merged:
        v = merged["metrics_port"]
        if v == "auto":
            out["metrics_port"] = "auto"
        else:
            port = _num([], "metrics_port", v, 0, 65535, True)
            if port is None:
                problems.append(f"metrics_port: expected a port from 0 (off) to 65535, or 'auto', got {shown(v)}")
            else:
                out["metrics_port"] = int(port)
    if "metrics_bind" in merged:
        if not isinstance(merged["metrics_bind"], str):
            problems.append(f"metrics_bind: expected an address such as 0.0.0.0 or 127.0.0.1, got "
                            f"{shown(merged['metrics_bind'])}")
        else:
            out["metrics_bind"] = merged["metrics_bind"]
    if "metrics_textfile" in merged:
        v = merged["metrics_textfile"]
        if not isinstance(v, str) or not v or v.endswith(("/", "\\")):
            problems.append(f"metrics_textfile: expected a file path such as /var/lib/node_exporter/lmgrd.prom, "
                            f"got {shown(v)}")
        else:
            out["metrics_textfile"] = Path(v).expanduser()
    if "metrics_textfile_interval" in merged:
        v = _num(problems, "metrics_textfile_interval", merged["metrics_textfile_interval"], 1, 86400)
        if v is not None:
            out["metrics_textfile_interval"] = float(v)


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML config file into a dict.

    Raises:
        ConfigInvalid: unreadable file, YAML syntax error (with line), nested too deep, or not a mapping.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigInvalid(str(path), [f"cannot read the config file: {exc.strerror}"]) from None
    if len(data) > MAX_CONFIG_FILE_BYTES:
        raise ConfigInvalid(str(path), [f"the config file is larger than {MAX_CONFIG_FILE_BYTES} bytes; it is not "
                                        "an lmgrd configuration"])
    return parse_config_text(data, str(path))


def parse_config_text(data: bytes, source: str) -> dict[str, Any]:
    """The settings in a config file's bytes (``source`` names the file in every problem).

    Raises:
        ConfigInvalid: not UTF-8, YAML syntax error (with line), nested too deep, or not a mapping.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigInvalid(source, ["the config file is not UTF-8 text"]) from None
    try:
        doc = load_yaml(text, source)
    except yaml.YAMLError as exc:
        raise ConfigInvalid(source, [f"not valid YAML: {exc}"]) from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigInvalid(source, [f"expected a mapping of settings, got {type(doc).__name__}"])
    return {str(k): v for k, v in doc.items()}
