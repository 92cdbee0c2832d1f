"""HTTP to the vendor's activation service (``docs/CLOUD_API.md``): one POST, and what came of it.

Off the hot path: only the cloud agent (:mod:`lmgrd.daemon.cloud`) and ``lmutil cloud-check`` use it. httpx
honours ``HTTPS_PROXY`` / ``NO_PROXY`` from the environment; the config's ``cloud_proxy`` takes their place
when set, and ``cloud_ca_file`` adds CA certificates to the system's (a TLS-inspecting proxy's CA can be
trusted safely: every answer that matters is Ed25519-signed by the vendor and verified by the caller).

The one distinction this module exists to keep: :class:`Reached` (the service answered, with an HTTP status
and a body) versus :class:`Unreachable` (refused, reset, DNS, timeout, TLS): a caller never takes the second
for the service's word.
"""

from __future__ import annotations

import ssl
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

__all__ = ["ACTIVATIONS_PATH", "CHECK_INS_PATH", "HEALTHZ_PATH", "TIMEOUT_SECONDS", "CloudHttp", "Reached",
           "Unreachable", "client_settings", "describe_error", "proxy_text"]

ACTIVATIONS_PATH = "/v1/activations"
CHECK_INS_PATH = "/v1/check-ins"
HEALTHZ_PATH = "/healthz"
#: One request's budget: connect, TLS, send and read together (the service answers in milliseconds).
TIMEOUT_SECONDS = 15.0
#: The largest reply body read (the API's documents are a few kB).
MAX_REPLY_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Reached:
    """The service answered: its HTTP status and body (not yet verified)."""

    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Unreachable:
    """No answer: why, in one line (names the URL)."""

    why: str


def client_settings(ca_file: Path | None, proxy: str | None) -> dict[str, Any]:
    """Keyword arguments for an httpx client: TLS trust (the system's CAs plus ``ca_file``) and the proxy
    (``proxy``, else the environment's HTTPS_PROXY / NO_PROXY).

    Raises:
        OSError, ssl.SSLError: ``ca_file`` cannot be read or holds no certificate.
    """
    ctx = ssl.create_default_context()
    if ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
    settings: dict[str, Any] = {"verify": ctx, "timeout": httpx.Timeout(TIMEOUT_SECONDS), "trust_env": True,
                                "follow_redirects": False}
    if proxy:
        settings["proxy"] = proxy
    return settings


def proxy_text(proxy: str | None) -> str:
    """A proxy URL as logs show it: scheme, host and port, never a user name or password it carries."""
    if not proxy:
        return "none (HTTPS_PROXY / NO_PROXY apply)"
    parts = urllib.parse.urlsplit(proxy)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def describe_error(url: str, exc: BaseException) -> str:
    """One line for a failure to reach ``url``: what kind (timeout, TLS, refused, DNS, proxy) and the OS's words."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        kind = "timed out"
    elif isinstance(exc, httpx.ProxyError):
        kind = "the proxy refused or failed"
    elif "CERTIFICATE_VERIFY_FAILED" in text or "SSL" in text or isinstance(exc, ssl.SSLError):
        kind = "TLS failed (is a proxy inspecting TLS? trust its CA with cloud_ca_file)"
    elif "Name or service not known" in text or "nodename nor servname" in text or "getaddrinfo" in text:
        kind = "DNS lookup failed"
    elif "refused" in text.lower():
        kind = "connection refused"
    else:
        kind = "could not connect"
    return f"{url}: {kind}: {text}"


class CloudHttp:
    """One async httpx client for the daemon's calls to the service (connections reused between calls)."""

    def __init__(self, ca_file: Path | None, proxy: str | None) -> None:
        #: Why no request can be made at all (cloud_ca_file unreadable), or "".
        self.broken = ""
        try:
            self.client = httpx.AsyncClient(**client_settings(ca_file, proxy))
        except (OSError, ssl.SSLError) as exc:
            self.broken = f"cloud_ca_file {ca_file} cannot be used: {getattr(exc, 'strerror', None) or exc}"
            self.client = httpx.AsyncClient(timeout=httpx.Timeout(TIMEOUT_SECONDS))

    async def post(self, base_url: str, path: str, body: dict[str, Any]) -> Reached | Unreachable:
        url = base_url.rstrip("/") + path
        if self.broken:
            return Unreachable(f"{url}: {self.broken}")
        try:
            async with self.client.stream("POST", url, json=body,
                                          headers={"Accept": "application/json"}) as resp:
                data = b""
                async for chunk in resp.aiter_bytes():
                    data += chunk
                    if len(data) > MAX_REPLY_BYTES:
                        return Unreachable(f"{url}: the reply is larger than {MAX_REPLY_BYTES} bytes: not the "
                                           "activation service")
                return Reached(resp.status_code, data)
        except httpx.HTTPError as exc:
            return Unreachable(describe_error(url, exc))
        except (OSError, ssl.SSLError) as exc:
            return Unreachable(describe_error(url, exc))

    async def close(self) -> None:
        await self.client.aclose()
