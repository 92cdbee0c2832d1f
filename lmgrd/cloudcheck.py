"""``lmutil cloud-check``: can this machine reach the vendor's activation service? One line per check.

The checks, in the order a connection needs them: ``dns`` (the service's name, or the proxy's when one is
used: the proxy then resolves the service), ``proxy`` (which one applies, from ``cloud_proxy`` or
``HTTPS_PROXY`` / ``NO_PROXY``, and that it accepts a TCP connection), ``tls`` (the certificate chain
verifies, with ``cloud_ca_file`` added to the system's CAs), ``clock`` (this machine's clock against the
service's, within :data:`MAX_SKEW_SECONDS`) and ``reachability`` (``GET /healthz`` answers 200 from lmcloud).
Each prints ``NAME: ok|FAILED|skipped: detail``; the exit code is 0 only if none failed. Runs on its own (no
license server needed), with the same HTTP settings as the daemon (:mod:`lmgrd.daemon.cloudhttp`).
"""

from __future__ import annotations

import json
import socket
import ssl
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

from lmgrd.daemon.cloudhttp import HEALTHZ_PATH, client_settings, describe_error
from protocol.license import parse_timestamp

__all__ = ["MAX_SKEW_SECONDS", "Check", "run_checks"]

#: Clock skew tolerated between this machine and the service.
MAX_SKEW_SECONDS = 300.0


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    result: str  # "ok", "FAILED" or "skipped"
    detail: str

    def line(self) -> str:
        return f"{self.name}: {self.result}: {self.detail}"


def proxy_for(url: str, cloud_proxy: str | None) -> tuple[str | None, str]:
    """The proxy a request to ``url`` goes through (or ``None``) and where that setting comes from."""
    if cloud_proxy:
        return cloud_proxy, "cloud_proxy"
    host = urllib.parse.urlsplit(url).hostname or ""
    proxies = urllib.request.getproxies_environment()
    scheme = urllib.parse.urlsplit(url).scheme
    proxy = proxies.get(scheme) or proxies.get("all")
    if not proxy:
        return None, "no proxy set (HTTPS_PROXY unset)"
    bypass = getattr(urllib.request, "proxy_bypass_environment")  # noqa: B009 - untyped in typeshed
    if bypass(host, proxies):
        return None, f"NO_PROXY exempts {host}"
    return proxy, f"{scheme.upper()}_PROXY"


def run_checks(url: str, ca_file: Path | None, cloud_proxy: str | None) -> list[Check]:
    checks: list[Check] = []
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    proxy, source = proxy_for(url, cloud_proxy)
    # dns
    name = urllib.parse.urlsplit(proxy).hostname or "" if proxy else host
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        addrs = sorted({str(i[4][0]) for i in infos})
        via = " (the proxy's name: the proxy resolves the service's)" if proxy else ""
        checks.append(Check("dns", "ok", f"{name} -> {', '.join(addrs[:4])}{via}"))
    except OSError as exc:
        checks.append(Check("dns", "FAILED", f"cannot resolve {name}: {exc.strerror or exc}; check the DNS server "
                            "or the hosts file"))
    # proxy
    if proxy is None:
        checks.append(Check("proxy", "ok", f"direct connection ({source})"))
    else:
        p = urllib.parse.urlsplit(proxy)
        pport = p.port or (443 if p.scheme == "https" else 3128 if p.scheme == "http" else 1080)
        try:
            with socket.create_connection((p.hostname or "", pport), timeout=10):
                pass
            checks.append(Check("proxy", "ok", f"{proxy} (from {source}) accepts connections"))
        except OSError as exc:
            checks.append(Check("proxy", "FAILED", f"{proxy} (from {source}): cannot connect: "
                                f"{exc.strerror or exc}"))
    # tls, clock, reachability: one GET /healthz
    target = url.rstrip("/") + HEALTHZ_PATH
    try:
        settings = client_settings(ca_file, cloud_proxy)
    except (OSError, ssl.SSLError) as exc:
        checks.append(Check("tls", "FAILED", f"cannot use cloud_ca_file {ca_file}: {exc}"))
        checks.append(Check("clock", "skipped", "the service was not asked"))
        checks.append(Check("reachability", "skipped", "the service was not asked"))
        return checks
    started = time.monotonic()
    try:
        with httpx.Client(**settings) as client:
            resp = client.get(target)
    except (httpx.HTTPError, OSError, ssl.SSLError) as exc:
        why = describe_error(target, exc)
        tls_failed = "TLS failed" in why
        if parts.scheme == "https":
            checks.append(Check("tls", "FAILED" if tls_failed else "skipped",
                                why if tls_failed else "no connection to try TLS on"))
        else:
            checks.append(Check("tls", "ok", "not used: http:// (accepted for loopback only)"))
        checks.append(Check("clock", "skipped", "the service did not answer"))
        checks.append(Check("reachability", "FAILED", why))
        return checks
    elapsed = (time.monotonic() - started) * 1000
    if parts.scheme == "https":
        checks.append(Check("tls", "ok", f"the certificate of {host} verifies"
                            + (f" (with {ca_file} added)" if ca_file else "")))
    else:
        checks.append(Check("tls", "ok", "not used: http:// (accepted for loopback only)"))
    service_time: datetime | None = None
    body: object = None
    try:
        body = json.loads(resp.content)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("time"), str):
        service_time = parse_timestamp(body["time"])
    if service_time is None and resp.headers.get("date"):
        from email.utils import parsedate_to_datetime

        try:
            service_time = parsedate_to_datetime(resp.headers["date"]).astimezone(UTC)
        except (TypeError, ValueError):
            service_time = None
    if service_time is None:
        checks.append(Check("clock", "FAILED", "the answer carries no time (is it the activation service?)"))
    else:
        skew = datetime.now(UTC).timestamp() - service_time.timestamp()
        ok = abs(skew) <= MAX_SKEW_SECONDS
        checks.append(Check("clock", "ok" if ok else "FAILED",
                            f"this machine's clock is {abs(skew):.0f} s {'ahead of' if skew >= 0 else 'behind'} the "
                            f"service's" + ("" if ok else f" (more than {MAX_SKEW_SECONDS:.0f} s: set the clock, "
                                                          "e.g. with NTP)")))
    service_ok = resp.status_code == 200 and isinstance(body, dict) and body.get("service") == "lmcloud"
    if service_ok and isinstance(body, dict):
        checks.append(Check("reachability", "ok", f"GET {target} -> 200 lmcloud API {body.get('api')} in "
                            f"{elapsed:.0f} ms"))
    else:
        checks.append(Check("reachability", "FAILED", f"GET {target} -> HTTP {resp.status_code}: not the activation "
                            "service's answer" + (" (a proxy's page?)" if proxy else "")))
    return checks
