"""Single-user licenses with a ``cloud_url``: activation by the vendor's activation service, on this PC.

The service is the only authority for such a license (the local 24-hour rule of
:mod:`client_stub.activation` never applies; the signature covers ``cloud_url``):

* ``lmclient activate LICENSE.lic`` asks it now (``mode: manual``): :func:`activate_online`.
* At product start (:func:`check_cloud_activation`, called by :func:`client_stub.nodelock.check_license_file`):
  with a certificate that verifies, names this PC's installation key and fingerprint and has not passed
  ``valid_until``, the product starts at once; when the certificate is older than the check-in interval a
  check-in runs **in the background** (a daemon thread), never delaying the start. Without a certificate the
  product asks the service (``mode: automatic``: it activates the license once it is 24 hours old by the
  service's clock); an expired one is renewed by a check-in before refusing.
* "Could not reach the service" (refused, timeout, 5xx, 429, bad TLS, an answer whose signature fails) is
  never taken for the service's word: a valid certificate keeps the product running; without one the
  refusal names the service URL and when it was last reached. A signed revocation is stored for good
  (``LICENSE_REVOKED``, naming the successor).

State lives in ``platformdirs.user_data_dir("lmgrd")/cloud/``: ``installation.key`` (this PC's Ed25519
key, mode 0600, made once) and ``CUSTOMER_ID.json`` (the signed certificate and revocation as received,
verified again at every read, and the last contact), each written atomically before it is used.
Settings from the environment: ``HTTPS_PROXY`` / ``NO_PROXY`` (httpx), ``LM_CLOUD_CA_FILE`` (extra CA
certificates, e.g. a TLS-inspecting proxy's), ``LM_CLOUD_CHECK_IN_INTERVAL`` (seconds, default one day).
Imports ``protocol``, ``httpx``, ``cryptography``, ``platformdirs`` and the standard library; never ``lmgrd``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import ssl
import threading
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from client_stub.errors import LicenseError, SeatDenied
from client_stub.files import write_atomic
from client_stub.machine import this_fingerprint, this_machine
from protocol import ErrorCode
from protocol.cloud import (
    ActivationCertificate,
    ActivationRequest,
    Answer,
    CheckInRequest,
    CloudDocumentError,
    CloudRevocation,
    canonical_bytes,
    installation_key_text,
    nonce_text,
    parse_answer,
    signed_json,
    verify_certificate,
    verify_cloud_revocation,
)
from protocol.fingerprint import Fingerprint
from protocol.license import License, format_timestamp, parse_timestamp

__all__ = ["DEFAULT_CHECK_IN_INTERVAL", "ENV_CA_FILE", "ENV_CHECK_IN_INTERVAL", "activate_online",
           "check_cloud_activation", "cloud_dir"]

logger = logging.getLogger(__name__)

ENV_CA_FILE = "LM_CLOUD_CA_FILE"
ENV_CHECK_IN_INTERVAL = "LM_CLOUD_CHECK_IN_INTERVAL"
DEFAULT_CHECK_IN_INTERVAL = 24 * 3600.0
TIMEOUT_SECONDS = 15.0
_MAX_STATE_BYTES = 1024 * 1024
_MAX_REPLY_BYTES = 64 * 1024
_lock = threading.Lock()
_background: dict[str, threading.Thread] = {}


def cloud_dir() -> Path:
    """Where this user's cloud activation state is kept."""
    import platformdirs

    return Path(platformdirs.user_data_dir("lmgrd", appauthor=False)) / "cloud"


def _fmt(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if moment is not None else "never"


def _config_error(message: str, hint: str = "") -> LicenseError:
    return LicenseError(ErrorCode.CLIENT_CONFIG_INVALID, message, hint)


# --------------------------------------------------------------------------- state on disk
def _installation_key(directory: Path) -> Ed25519PrivateKey:
    path = directory / "installation.key"
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        pem = b""
    except OSError as exc:
        raise _config_error(f"cannot read {path}: {exc.strerror or exc}") from None
    if pem:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise _config_error(f"{path} is damaged", f"delete {path}, then run 'lmclient activate LICENSE.lic' "
                                "again") from None
        if isinstance(key, Ed25519PrivateKey):
            return key
        raise _config_error(f"{path} is not an Ed25519 key", f"delete {path}, then activate again")
    key = Ed25519PrivateKey.generate()
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    try:
        write_atomic(path, data)
        os.chmod(path, 0o600)
    except OSError as exc:
        raise _config_error(f"cannot write {path}: {exc.strerror or exc}",
                            "check that this user can write its data directory (XDG_DATA_HOME)") from None
    return key


def _read_state(directory: Path, cid: str) -> dict[str, Any]:
    path = directory / f"{cid}.json"
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(_MAX_STATE_BYTES))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(directory: Path, cid: str, state: Mapping[str, Any]) -> None:
    write_atomic(directory / f"{cid}.json",
                 (json.dumps({**state, "format": 1}, indent=2, sort_keys=True) + "\n").encode("utf-8"))


class _State:
    """One license's state on this PC, verified as it is read."""

    def __init__(self, lic: License, directory: Path, vendor_key: Ed25519PublicKey, key_text: str) -> None:
        self.lic, self.dir, self.key_text = lic, directory, key_text
        self.raw = _read_state(directory, lic.customer_id)
        self.certificate: ActivationCertificate | None = None
        self.revocation: CloudRevocation | None = None
        with contextlib.suppress(CloudDocumentError):
            if self.raw.get("revocation") is not None:
                rev = verify_cloud_revocation(self.raw["revocation"], vendor_key)
                if rev.customer_id == lic.customer_id:
                    self.revocation = rev
        with contextlib.suppress(CloudDocumentError):
            if self.raw.get("certificate") is not None:
                cert = verify_certificate(self.raw["certificate"], vendor_key)
                if cert.customer_id == lic.customer_id and cert.installation_key == key_text:
                    self.certificate = cert

    def when(self, key: str) -> datetime | None:
        v = self.raw.get(key)
        return parse_timestamp(v) if isinstance(v, str) else None

    def save(self, **changes: Any) -> None:
        self.raw.update(changes)
        _write_state(self.dir, self.lic.customer_id, self.raw)


# --------------------------------------------------------------------------- HTTP
def _client_settings() -> dict[str, Any]:
    ctx = ssl.create_default_context()
    ca = os.environ.get(ENV_CA_FILE, "").strip()
    if ca:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise _config_error(f"{ENV_CA_FILE}={ca}: cannot load the CA certificates: {exc}") from None
    return {"verify": ctx, "timeout": TIMEOUT_SECONDS, "trust_env": True, "follow_redirects": False}


def _post(url: str, body: dict[str, Any]) -> tuple[int, bytes] | str:
    """POST ``body``; the HTTP status and body, or why the service could not be reached (one line)."""
    import httpx

    try:
        with httpx.Client(**_client_settings()) as client, client.stream("POST", url, json=body) as resp:
            data = b""
            for chunk in resp.iter_bytes():
                data += chunk
                if len(data) > _MAX_REPLY_BYTES:
                    return f"{url}: the reply is too large to be the activation service's"
            return resp.status_code, data
    except (httpx.HTTPError, OSError, ssl.SSLError) as exc:
        return f"{url}: {exc or type(exc).__name__}"


def _machine() -> tuple[str, tuple[str, ...], Fingerprint]:
    import ipaddress

    hostname, addresses = this_machine()
    addrs = tuple(a for a in addresses if not (ipaddress.ip_address(a).is_loopback
                                               or ipaddress.ip_address(a).is_link_local))[:64]
    return hostname, addrs, this_fingerprint()


def _exchange(st: _State, key: Ed25519PrivateKey, vendor_key: Ed25519PublicKey, mode: str, now: datetime
              ) -> tuple[str, Answer | None]:
    """One request (an activation in ``mode``, or ``check_in``) and its effect on ``st``: ``active``,
    ``pending``, ``revoked``, ``refused`` or ``unreachable``, with the verified answer (None if unreachable)."""
    assert st.lic.cloud_url is not None
    hostname, addrs, fp = _machine()
    now = now.astimezone(UTC).replace(microsecond=0)
    cert = st.certificate
    doc: ActivationRequest | CheckInRequest
    if mode == "check_in" and cert is not None and cert.token is not None:
        doc = CheckInRequest(st.lic.customer_id, hostname, addrs, fp, st.key_text, cert.token, cert.sequence,
                             nonce_text(secrets.token_bytes(16)), now)
        path = "/v1/check-ins"
    else:
        doc = ActivationRequest(st.lic.customer_id, hostname, addrs, fp, st.key_text,
                                nonce_text(secrets.token_bytes(16)), now,
                                "manual" if mode == "manual" else "automatic")
        path = "/v1/activations"
    url = st.lic.cloud_url.rstrip("/") + path
    reply = _post(url, signed_json(doc, key.sign(canonical_bytes(doc))))
    stamp = format_timestamp(now)
    if isinstance(reply, str):
        st.save(last_attempt_at=stamp, last_error=reply)
        return "unreachable", None
    status, body = reply
    try:
        answer = parse_answer(status, body, vendor_key)
        signed = json.loads(body)
    except (CloudDocumentError, ValueError) as exc:
        st.save(last_attempt_at=stamp, last_error=f"{url}: HTTP {status}: the answer cannot be trusted: "
                f"{getattr(exc, 'message', exc)}")
        return "unreachable", None
    if not answer.service_said_no and answer.status != "active":
        st.save(last_attempt_at=stamp, last_error=f"{url}: HTTP {status} {answer.code}: {answer.message}")
        return "unreachable", answer
    if answer.status == "active":
        new = answer.certificate
        assert new is not None
        if new.customer_id != st.lic.customer_id or new.installation_key != st.key_text or \
                not new.fingerprint.matches(fp):
            st.save(last_attempt_at=stamp, last_error=f"{url}: the certificate is not for this PC")
            return "unreachable", None
        # Durable before it is used: the new check-in token must survive a crash.
        st.save(certificate=signed["certificate"], certified_at=stamp, last_reached_at=stamp, last_attempt_at=stamp,
                last_error="", refusal=None)
        st.certificate = new
        return "active", answer
    if answer.status == "revoked":
        rev = answer.revocation
        assert rev is not None
        if rev.customer_id == st.lic.customer_id:
            st.save(revocation=signed["revocation"], last_reached_at=stamp, last_attempt_at=stamp, last_error="")
            st.revocation = rev
            return "revoked", answer
        return "unreachable", None
    st.save(last_reached_at=stamp, last_attempt_at=stamp, last_error="",
            refusal=[str(answer.code), answer.message, answer.hint])
    return ("pending" if answer.status == "pending" else "refused"), answer


# --------------------------------------------------------------------------- the two entry points
def _revoked(source: str, rev: CloudRevocation) -> SeatDenied:
    text = (f"{source}: customer ID {rev.customer_id} was revoked by the vendor's activation service on "
            f"{_fmt(rev.revoked_at)} ({rev.reason})")
    if rev.replaced_by:
        text += f"; it is replaced by customer ID {rev.replaced_by}"
    return SeatDenied(ErrorCode.LICENSE_REVOKED, text,
                      f"install the license of customer ID {rev.replaced_by}" if rev.replaced_by
                      else "ask the software vendor for a new license")


def _refusal(source: str, st: _State, result: str, answer: Answer | None) -> SeatDenied:
    url = st.lic.cloud_url
    cid = st.lic.customer_id
    hint = f"run 'lmclient activate {source}' on this PC (it must be online)"
    if result == "revoked" and st.revocation is not None:
        return _revoked(source, st.revocation)
    if result == "pending" and answer is not None:
        return SeatDenied(ErrorCode.LICENSE_NOT_ACTIVATED,
                          f"{source} (customer ID {cid}) is not activated yet: the vendor's activation service {url} "
                          f"activates it automatically at {_fmt(answer.activates_at)} (24 hours after issue)", hint)
    if result == "refused" and answer is not None and answer.code is not None:
        return SeatDenied(answer.code, f"{source} (customer ID {cid}): the activation service {url} refused it: "
                          f"{answer.message}", answer.hint or hint)
    expired = st.certificate is not None
    return SeatDenied(ErrorCode.LICENSE_NOT_ACTIVATED,
                      f"{source} (customer ID {cid}): " + (
                          f"its activation certificate expired at {_fmt(st.certificate.valid_until)} and "
                          if expired and st.certificate is not None else "it is not activated on this PC, and ")
                      + f"the vendor's activation service {url} could not be reached ({st.raw.get('last_error')}; "
                      f"last reached {_fmt(st.when('last_reached_at'))})",
                      "connect this PC to the internet (check the proxy: HTTPS_PROXY, and LM_CLOUD_CA_FILE for a "
                      "TLS-inspecting proxy), then start the product again")


def activate_online(lic: License, source: str, vendor_key: Ed25519PublicKey, now: datetime | None = None,
                    directory: Path | None = None) -> ActivationCertificate:
    """``lmclient activate LICENSE.lic``: ask the service to activate ``lic`` on this PC now (``manual``).

    Returns:
        The certificate (stored before it is returned).

    Raises:
        SeatDenied: the service said no (ACTIVATION_CONFLICT naming the other PC, LICENSE_REVOKED, ...), or
            could not be reached (LICENSE_NOT_ACTIVATED naming the URL).
        LicenseError: CLIENT_CONFIG_INVALID: the state directory cannot be used.
    """
    directory = directory or cloud_dir()
    key = _installation_key(directory)
    now = now or datetime.now(UTC)
    with _lock:
        st = _State(lic, directory, vendor_key, installation_key_text(key.public_key()))
        if st.revocation is not None:
            raise _revoked(source, st.revocation)
        result, answer = _exchange(st, key, vendor_key, "manual", now)
    if result == "active" and st.certificate is not None:
        return st.certificate
    raise _refusal(source, st, result, answer)


def check_interval(environ: Mapping[str, str] | None = None) -> float:
    raw = (os.environ if environ is None else environ).get(ENV_CHECK_IN_INTERVAL, "").strip()
    try:
        return max(1.0, float(raw)) if raw else DEFAULT_CHECK_IN_INTERVAL
    except ValueError:
        raise _config_error(f"{ENV_CHECK_IN_INTERVAL}={raw!r} is not a number of seconds") from None


def check_cloud_activation(lic: License, source: str, vendor_key: Ed25519PublicKey, now: datetime,
                           directory: Path | None = None, *, background: bool = True) -> ActivationCertificate:
    """At product start: return the certificate that lets ``lic`` run on this PC, asking the service only
    when there is none valid (a due check-in runs in the background).

    Raises:
        SeatDenied: LICENSE_REVOKED, LICENSE_MOVED, ACTIVATION_CONFLICT, LICENSE_NOT_ACTIVATED (pending, or the
            service unreachable without a valid certificate: the message names the URL and the last contact).
    """
    directory = directory or cloud_dir()
    key = _installation_key(directory)
    key_text = installation_key_text(key.public_key())
    interval = check_interval()
    with _lock:
        st = _State(lic, directory, vendor_key, key_text)
        if st.revocation is not None:
            raise _revoked(source, st.revocation)
        cert = st.certificate
        if cert is not None and not cert.fingerprint.matches(this_fingerprint()):
            raise SeatDenied(ErrorCode.LICENSE_MOVED, f"{source} (customer ID {lic.customer_id}) was activated on "
                             f"another machine ({cert.hostname}) and its state was copied here",
                             "a single-user license runs on the PC it was activated on; ask the vendor to reissue it")
        if cert is not None and cert.valid_at(now):
            certified = st.when("certified_at") or cert.issued_at
            if not cert.offline and now - certified >= timedelta(seconds=interval):
                if background:
                    _check_in_later(lic, directory, vendor_key)
                else:
                    _exchange(st, key, vendor_key, "check_in", now)
            return cert
        result, answer = _exchange(st, key, vendor_key, "check_in" if cert is not None else "automatic", now)
        if result == "active" and st.certificate is not None:
            return st.certificate
    raise _refusal(source, st, result, answer)


def _check_in_later(lic: License, directory: Path, vendor_key: Ed25519PublicKey) -> None:
    """Check in on a daemon thread (one per license at a time): the product's start never waits for it."""
    running = _background.get(lic.customer_id)
    if running is not None and running.is_alive():
        return

    def run() -> None:
        try:
            key = _installation_key(directory)
            with _lock:
                st = _State(lic, directory, vendor_key, installation_key_text(key.public_key()))
                result, _answer = _exchange(st, key, vendor_key, "check_in", datetime.now(UTC))
            logger.info("background check-in of %s with %s: %s", lic.customer_id, lic.cloud_url, result)
        except Exception:  # a background failure must never reach the product
            logger.exception("background check-in of %s failed", lic.customer_id)

    t = threading.Thread(target=run, name=f"lmgrd-cloud-check-in-{lic.customer_id}", daemon=True)
    _background[lic.customer_id] = t
    t.start()


def wait_for_background(timeout: float = 30.0) -> None:
    """Wait for background check-ins to finish (a product about to exit; tests)."""
    for t in list(_background.values()):
        t.join(timeout)
