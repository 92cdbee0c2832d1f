"""Where the license comes from: parse the server list and find it (argument, environment, config file).

Imports ``protocol``, ``platformdirs``, ``yaml`` and the standard library; never ``lmgrd``. No sockets.

Each entry of a server list is one of

* ``PORT@HOST`` (FlexNet style): ``27000@licsrv``, ``27000@192.0.2.10``, ``27000@[::1]``; ``@HOST`` means
  the default port 27000;
* ``HOST:PORT``: ``licsrv:27000``, ``[::1]:27000``;
* a license file path (an existing file, or any name ending in ``.lic``): single-user (node-locked) mode,
  checked on this PC with no daemon.

Lists are comma-separated and tried in order. The list is taken from the first of these that is set:
the ``server`` argument, the ``LM_LICENSE_SERVER`` environment variable, and the per-user client config
file ``platformdirs.user_config_dir("lmgrd")/client.yaml`` (``XDG_CONFIG_HOME`` moves it on Linux) with a
key ``servers: [..]`` (written by ``lmclient set-server``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from client_stub.errors import LicenseError
from protocol import ErrorCode
from protocol.validation import shown

__all__ = [
    "CONFIG_FILE_NAME",
    "DEFAULT_PORT",
    "ENV_SERVER",
    "Endpoint",
    "LicenseFile",
    "ServerAddress",
    "ServerList",
    "config_path",
    "parse_endpoint",
    "parse_server_list",
    "resolve_servers",
]

DEFAULT_PORT = 27000
ENV_SERVER = "LM_LICENSE_SERVER"
CONFIG_FILE_NAME = "client.yaml"
_CONFIG_MAX_BYTES = 64 * 1024

_HOW_TO_SET = (
    "pass the server to the program (LicenseClient(\"27000@licsrv\")), set the environment variable "
    f"{ENV_SERVER}=27000@licsrv (a comma-separated list, tried in order), or run "
    "'lmclient set-server 27000@licsrv'; for a single-user license give the path of its .lic file instead"
)
# A host name or IPv4 literal: no spaces, no '@', no ':' or brackets (IPv6 literals go in brackets).
_HOST_RE = re.compile(r"[^\s@\[\]:/,]+")
_PORT_RE = re.compile(r"[0-9]{1,5}")


@dataclasses.dataclass(frozen=True, slots=True)
class ServerAddress:
    """A license server (lmgrd) at ``host`` (name, IPv4 or bare IPv6 literal) and ``port``."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.port}@[{self.host}]" if ":" in self.host else f"{self.port}@{self.host}"


@dataclasses.dataclass(frozen=True, slots=True)
class LicenseFile:
    """A single-user (node-locked) license file, checked on this PC."""

    path: Path

    def __str__(self) -> str:
        return str(self.path)


Endpoint = ServerAddress | LicenseFile


@dataclasses.dataclass(frozen=True, slots=True)
class ServerList:
    """The entries to try, in order, and where they were configured (for messages and ``lmclient show``)."""

    entries: tuple[Endpoint, ...]
    source: str

    @property
    def servers(self) -> tuple[ServerAddress, ...]:
        return tuple(e for e in self.entries if isinstance(e, ServerAddress))

    @property
    def license_files(self) -> tuple[LicenseFile, ...]:
        return tuple(e for e in self.entries if isinstance(e, LicenseFile))

    def __str__(self) -> str:
        return ",".join(str(e) for e in self.entries)


def _invalid(message: str) -> LicenseError:
    return LicenseError(ErrorCode.CLIENT_CONFIG_INVALID, message, _HOW_TO_SET)


def _port(text: str, spec: str) -> int:
    if not _PORT_RE.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise _invalid(f"license server {spec!r}: the port {text!r} is not a number from 1 to 65535")
    return int(text)


def _host(text: str, spec: str) -> str:
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1]
        if not inner or not re.fullmatch(r"[0-9A-Fa-f:.]+(%[\w.-]+)?", inner) or ":" not in inner:
            raise _invalid(f"license server {spec!r}: {text!r} is not an IPv6 address in brackets")
        return inner
    if not _HOST_RE.fullmatch(text):
        raise _invalid(
            f"license server {spec!r}: the host {text!r} is not a host name or address "
            "(write IPv6 addresses in brackets, e.g. 27000@[::1])"
        )
    return text


def _looks_like_file(spec: str) -> bool:
    return spec.lower().endswith(".lic") or os.path.isfile(spec)


def parse_endpoint(spec: str) -> Endpoint:
    """Parse one server-list entry.

    Args:
        spec: ``PORT@HOST``, ``@HOST``, ``HOST:PORT``, ``[IPV6]:PORT`` or a license file path.

    Returns:
        A :class:`ServerAddress` or a :class:`LicenseFile`.

    Raises:
        LicenseError: code CLIENT_CONFIG_INVALID, naming the entry and saying how to write it.
    """
    spec = spec.strip()
    if not spec:
        raise _invalid("an entry of the license server list is empty")
    if _looks_like_file(spec):
        return LicenseFile(Path(spec).expanduser())
    if "@" in spec:
        port_text, _, host_text = spec.partition("@")
        port = _port(port_text, spec) if port_text else DEFAULT_PORT
        if host_text and ":" in host_text and not host_text.startswith("["):
            # 27000@::1: the whole rest is the host, unambiguous in PORT@HOST form.
            return ServerAddress(_host(f"[{host_text}]", spec), port)
        return ServerAddress(_host(host_text, spec), port)
    match = re.fullmatch(r"(\[[^\]]*\]|[^:]*):([^:]*)", spec)
    if match:
        return ServerAddress(_host(match.group(1), spec), _port(match.group(2), spec))
    raise _invalid(
        f"{spec!r} is not a license server (write PORT@HOST such as 27000@{spec}, @HOST for port "
        f"{DEFAULT_PORT}, or HOST:PORT) and not an existing license file"
    )


def parse_server_list(value: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> tuple[Endpoint, ...]:
    """Parse a comma-separated list (or a sequence of entries, each possibly comma-separated).

    A path-like object is always one license file.

    Raises:
        LicenseError: CLIENT_CONFIG_INVALID for the first bad entry, or for an empty list.
    """
    if isinstance(value, os.PathLike):
        return (LicenseFile(Path(value).expanduser()),)
    items: Sequence[str | os.PathLike[str]] = [value] if isinstance(value, str) else value
    out: list[Endpoint] = []
    for item in items:
        if isinstance(item, os.PathLike):
            out.append(LicenseFile(Path(item).expanduser()))
            continue
        if not isinstance(item, str):
            raise _invalid(f"a license server entry must be text such as 27000@licsrv, got {item!r:.60}")
        out.extend(parse_endpoint(part) for part in item.split(",") if part.strip())
    if not out:
        raise _invalid("the license server list is empty")
    return tuple(out)


def config_path() -> Path:
    """The per-user client config file (``lmclient set-server`` writes it)."""
    import platformdirs  # lazily: most products pass the server or set the environment

    return Path(platformdirs.user_config_dir("lmgrd", appauthor=False)) / CONFIG_FILE_NAME


def _from_config(path: Path) -> tuple[Endpoint, ...] | None:
    import yaml  # lazily: keeps importing the client light when the file is not needed

    try:
        with open(path, "rb") as f:
            data = f.read(_CONFIG_MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _invalid(f"cannot read the client config file {path}: {exc.strerror or exc}") from None
    if len(data) > _CONFIG_MAX_BYTES:
        raise _invalid(f"the client config file {path} is larger than {_CONFIG_MAX_BYTES} bytes")
    try:
        doc: Any = yaml.safe_load(data)
    # PyYAML composes recursively (5,000 nested "[" recurse) and raises ValueError for a date like 2099-12-62.
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        raise _invalid(f"the client config file {path} is not valid YAML: {exc}") from None
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise _invalid(f"the client config file {path} must be a mapping with a key 'servers', "
                       f"got {type(doc).__name__}")
    servers = doc.get("servers")
    if servers is None:
        return None
    if isinstance(servers, str):
        servers = [servers]
    if not isinstance(servers, list) or not all(isinstance(s, str) for s in servers):
        raise _invalid(f"the client config file {path}: 'servers' must be a list of PORT@HOST strings, "
                       f"got {shown(servers, 80)}")
    try:
        return parse_server_list(servers) if servers else None
    except LicenseError as exc:
        raise _invalid(f"the client config file {path}: {exc.message}") from None


def resolve_servers(
    server: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> ServerList:
    """Find the server list: the argument, else ``LM_LICENSE_SERVER``, else the client config file.

    Args:
        server: what the program passed (``None``: not given).
        environ: the environment to read (default ``os.environ``).
        config_file: the config file to read (default :func:`config_path`).

    Returns:
        The entries and a description of where they came from.

    Raises:
        LicenseError: CLIENT_CONFIG_INVALID if an entry is malformed or nothing is configured anywhere;
            the message says how to set it.
    """
    if server is not None:
        return ServerList(parse_server_list(server), "argument")
    env = os.environ if environ is None else environ
    from_env = env.get(ENV_SERVER, "").strip()
    if from_env:
        try:
            return ServerList(parse_server_list(from_env), f"environment variable {ENV_SERVER}")
        except LicenseError as exc:
            raise _invalid(f"{ENV_SERVER}={from_env!r}: {exc.message}") from None
    path = config_path() if config_file is None else config_file
    entries = _from_config(path)
    if entries:
        return ServerList(entries, f"config file {path}")
    raise _invalid(f"no license server is configured (no argument, {ENV_SERVER} is not set, and {path} "
                   "names no servers)")
