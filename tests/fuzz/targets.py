"""Fuzz targets: every parser lmgrd has for bytes from outside, each checked to let only the project's own
errors escape (issue 9).

One function per surface, ``target(data: bytes) -> None``: it feeds ``data`` to the real parser and returns
normally when the parser accepted it or refused it with the error it documents; anything else (an
``IndexError``, a ``RecursionError``, a ``UnicodeDecodeError``, a ``ValueError`` that is not ours, or two
deliveries of the same bytes disagreeing) escapes as an exception, which is what atheris
(``tests/fuzz/run.py``, ``make fuzz``) and hypothesis (``tests/unit/test_fuzz_targets.py``, ``make test``)
report as a failure. Splits of the stream are derived from the input itself, so a failing input always fails
the same way.

The surfaces: the frame decoder (whole, split anywhere, a byte at a time), the server's and the client's
protocol connection (message validation and the transition table), license, revocation and revocation-list
parsing and verification, FlexNet options files, the daemon's YAML config (read and validated), lmissue's
registration requests, and the activation records file.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import random
import shutil
import tempfile
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import msgpack
import yaml

from lmgrd.config import ConfigInvalid, build_config, parse_config_text
from lmgrd.core.documents import load_yaml
from lmgrd.core.options import parse_options
from lmgrd.storage.activations import ACTIVATIONS_FILE, _read
from lmgrd.vendor.signing import check_request
from protocol import Connection, Hello, MalformedMessage, ProtocolError, Role, parse_reply, parse_request
from protocol.framing import FrameDecoder
from protocol.license import (
    LicenseFileError,
    document_kind,
    load_public_key,
    parse_license,
    parse_revocation,
    split_revocation_list,
    verify_license,
    verify_revocation_list,
)

DEMO_KEYS = Path(__file__).resolve().parents[2] / "lmgrd" / "vendor" / "demo_keys"
_PUBLIC = load_public_key((DEMO_KEYS / "demo_vendor.pub").read_bytes())


def _rng(data: bytes) -> random.Random:
    return random.Random(hashlib.blake2b(data, digest_size=8).digest())


def _cuts(data: bytes) -> list[bytes]:
    """``data`` in pieces whose sizes come from the input itself (1 to 17 bytes, sometimes larger)."""
    rng = _rng(data)
    out, i = [], 0
    while i < len(data):
        n = rng.choice((1, 1, 2, 3, 4, 5, 7, 11, 17, 64, 1000))
        out.append(data[i:i + n])
        i += n
    return out


def _decode_all(pieces: list[bytes], max_frame: int) -> tuple[bytes, str | None, int]:
    """(the messages, packed again so NaN compares equal; the error; the bytes still buffered)."""
    dec = FrameDecoder(max_frame)
    msgs: list[dict[str, Any]] = []
    error: str | None = None
    try:
        for p in pieces:
            msgs += dec.feed(p)
    except MalformedMessage as exc:  # FrameTooLarge is one
        error = f"{type(exc).__name__}: {exc}"
    return msgpack.packb(msgs, use_bin_type=True), error, 0 if error else len(dec._buf or b"")


def frame_decoder(data: bytes) -> None:
    """Whole, split at input-chosen points, and a byte at a time: the same messages and the same error."""
    max_frame = 1024
    whole = _decode_all([data], max_frame)
    for pieces in (_cuts(data), [data[i:i + 1] for i in range(len(data))] if len(data) <= 96 else []):
        if not pieces:
            continue
        split = _decode_all(pieces, max_frame)
        if whole[1] is None:
            assert split == whole, (whole, split)
        else:
            # Fed whole, the messages before the bad frame are lost with the exception; fed in pieces, those
            # in earlier pieces were already returned. The error itself must be the same.
            assert split[1] == whole[1], (whole[1], split[1])
    for msg in msgpack.unpackb(whole[0], raw=False, strict_map_key=False):
        for parse in (parse_request, parse_reply):
            with contextlib.suppress(MalformedMessage):
                parse(msg)


def _connection(role: Role, data: bytes) -> None:
    conn: Connection[Any] = Connection(role)
    if role is Role.CLIENT:
        conn.send(Hello(1, (1,), "fuzz", "fuzz", 1, "fuzz", ""))
    for piece in _cuts(data):
        try:
            conn.receive_data(piece)
        except ProtocolError:
            return


def server_connection(data: bytes) -> None:
    """What a client sends the daemon: frames, validation, the transition table (only ProtocolError)."""
    _connection(Role.SERVER, data)


def client_connection(data: bytes) -> None:
    """What a server sends a client after its hello (only ProtocolError)."""
    _connection(Role.CLIENT, data)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def license_file(data: bytes) -> None:
    """License files: parsed, verified against the demo vendor key, and recognised (only LicenseFileError)."""
    text = _text(data)
    document_kind(text)
    for check in (lambda: parse_license(text, "fuzz.lic"), lambda: verify_license(text, _PUBLIC, "fuzz.lic")):
        with contextlib.suppress(LicenseFileError):
            check()


def revocation_file(data: bytes) -> None:
    """Revocation files and lists (only LicenseFileError)."""
    text = _text(data)
    split_revocation_list(text)
    for check in (lambda: parse_revocation(text, "fuzz.rev"), lambda: verify_revocation_list(text, _PUBLIC, "f.rev")):
        with contextlib.suppress(LicenseFileError):
            check()


def options_file(data: bytes) -> None:
    """FlexNet options files: every line applies or is reported; nothing raises."""
    for text in (_text(data), data.decode("cp932", "replace")):
        result = parse_options(text, "fuzz.opt")
        assert all(isinstance(p, str) for p in result.problems)


def config_file(data: bytes) -> None:
    """The daemon's YAML config, read and validated into a DaemonConfig (only ConfigInvalid)."""
    try:
        values = parse_config_text(data, "fuzz.yaml")
    except ConfigInvalid:
        return
    # The options file and license paths would be read from disk: give them files that cannot be there.
    values.pop("options", None)
    with contextlib.suppress(ConfigInvalid):
        build_config(values, {"licenses": ["/nonexistent/fuzz.lic"], "vendor_key": "/nonexistent/v.pub"}, "fuzz")


def registration_request(data: bytes) -> None:
    """lmissue's registration request: YAML read with nesting bounded, then every field checked."""
    try:
        doc = load_yaml(_text(data), "request.yaml")
    except yaml.YAMLError:
        return
    spec, problems = check_request(doc, date(2026, 1, 1))
    assert (spec is None) == bool(problems)


_STATE = Path(tempfile.mkdtemp(prefix="lmgrd-fuzz-state-"))
atexit.register(shutil.rmtree, _STATE, True)


def activation_records(data: bytes) -> None:
    """The activation records file in the state directory: a damaged one is a problem line, never an error."""
    path = _STATE / ACTIVATIONS_FILE
    path.write_bytes(data)
    records, _raw, problems = _read(path)
    assert all(isinstance(p, str) for p in problems)
    assert all(isinstance(k, str) for k in records)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "frame_decoder": frame_decoder,
    "server_connection": server_connection,
    "client_connection": client_connection,
    "license_file": license_file,
    "revocation_file": revocation_file,
    "options_file": options_file,
    "config_file": config_file,
    "registration_request": registration_request,
    "activation_records": activation_records,
}
CORPUS = Path(__file__).with_name("corpus")
