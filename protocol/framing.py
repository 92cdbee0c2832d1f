"""Length-prefixed msgpack framing, bounded before parsing.

Pure: imports only msgpack and the standard library (never ``lmgrd`` or ``client_stub``); no sockets, no
asyncio. A frame is a 4-byte big-endian unsigned length N (1 <= N <= max_frame_bytes) followed by N bytes
holding exactly one msgpack map with string keys. The decoder checks the announced length *before*
buffering the body, so a hostile peer cannot make us hold more than one maximum frame, and it may raise
only :class:`protocol.errors.MalformedMessage` (or its subclass FrameTooLarge), whether the bytes arrive
whole or one at a time.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from protocol.errors import FrameTooLarge, MalformedMessage
from protocol.validation import MAX_NESTING_DEPTH, nesting_depth_exceeds, shown

#: Default ceiling for one frame. Big enough for a status reply with hundreds of pools, small enough that
#: a thousand hostile clients cannot make the daemon buffer more than 64 MiB.
DEFAULT_MAX_FRAME_BYTES = 64 * 1024
HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size

_pack = msgpack.Packer(use_bin_type=True).pack
_STR = frozenset({str})
#: What a list of a decoded message may hold and still be two levels deep (hello's proto, resume's tokens).
_SCALARS = frozenset({str, int, float, bool, type(None), bytes, msgpack.ExtType, msgpack.Timestamp})


def encode_frame(message: dict[str, Any]) -> bytes:
    """Encode one message (a dict with string keys) into a complete frame.

    Args:
        message: the map to send; values must be msgpack-serialisable (str, int, float, bool, None,
            bytes, list, dict).

    Returns:
        The length prefix followed by the msgpack body.
    """
    body: bytes = _pack(message)
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """Decode one frame body into a message map.

    Raises:
        MalformedMessage: the body is not exactly one msgpack map with string keys, or it nests lists and
            maps deeper than :data:`protocol.validation.MAX_NESTING_DEPTH` (msgpack itself allows 1,024 levels,
            deep enough for a later ``repr`` or walk to overflow Python's stack).
    """
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except msgpack.ExtraData:
        raise MalformedMessage("frame holds trailing bytes after its msgpack message") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # ValueError covers msgpack's FormatError/StackError/UnicodeDecodeError and non-str map keys.
        raise MalformedMessage(f"frame body is not valid msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise MalformedMessage(f"a message must be a msgpack map, got {type(obj).__name__}")
    if not _STR.issuperset(map(type, obj)):  # strict_map_key still lets binary (bytes) keys through
        key = next(k for k in obj if type(k) is not str)
        raise MalformedMessage(f"frame body is not valid msgpack for this protocol: map key {shown(key, 40)} is "
                               f"{type(key).__name__}, keys must be strings")
    # The checks run in C (map, issuperset) but for the list and map values: a Python loop over every field cost
    # about 1,500 instructions a field (a hello: 29,000 on top of msgpack's 15,000; now 12,000). msgpack
    # (use_list=True) builds lists and maps only; an ExtType (a tuple) holds an int and bytes, nothing deeper.
    nested = False
    values = obj.values()
    if not _SCALARS.issuperset(map(type, values)):
        for value in values:
            t = type(value)
            if t is dict or (t is list and not _SCALARS.issuperset(map(type, value))):
                nested = True
                break
    # A flat map (checkout, checkin, heartbeat: every hot-path request) is one level deep, a map holding only
    # lists of scalars (hello, resume) two: only a message holding deeper lists or maps is walked.
    if nested and nesting_depth_exceeds(obj):
        raise MalformedMessage(f"frame body nests lists and maps more than {MAX_NESTING_DEPTH} levels deep; "
                               "no message of this protocol needs that many")
    return obj


class FrameDecoder:
    """Incremental decoder: feed bytes, get complete messages.

    After it has raised once, the stream is unusable (the frame boundary is lost or the peer is hostile)
    and further calls raise again; the caller answers with an error and closes the connection.
    """

    __slots__ = ("_buf", "_failed", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes < 16:
            raise ValueError(f"max_frame_bytes must be at least 16, got {max_frame_bytes!r}")
        self.max_frame_bytes = max_frame_bytes
        # Bytes of a frame not yet complete: allocated when a read first ends inside a frame (a connection
        # whose reads each hold whole frames, the usual case, never needs one; a server holds thousands).
        self._buf: bytearray | None = None
        self._failed: MalformedMessage | None = None

    def whole(self, data: bytes) -> bytes | None:
        """The body of ``data`` if it is exactly one whole frame within the limit and nothing is buffered or
        failed before it (the commonest read of a request/reply connection), else None. Consumes nothing."""
        if self._buf or self._failed is not None or len(data) <= HEADER_SIZE:
            return None
        (size,) = HEADER.unpack_from(data)
        if size != len(data) - HEADER_SIZE or size > self.max_frame_bytes:
            return None
        return data[HEADER_SIZE:]

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add received bytes; return every message now complete, in order.

        Raises:
            MalformedMessage: a frame is empty, too large (FrameTooLarge) or not a msgpack map.
        """
        if self._failed is not None:
            raise self._failed
        body = self.whole(data)
        if body is not None:
            # The common case on a request/reply connection: the read holds exactly one whole frame. Decode it
            # from ``data`` itself, without copying it into the buffer and out again; the same checks apply.
            try:
                return [decode_body(body)]
            except MalformedMessage as exc:
                self._failed = exc
                raise
        buf = self._buf
        if buf is None:
            buf = self._buf = bytearray()
        buf += data
        out: list[dict[str, Any]] = []
        pos = 0
        end = len(buf)
        try:
            while end - pos >= HEADER_SIZE:
                (size,) = HEADER.unpack_from(buf, pos)
                if size == 0:
                    raise MalformedMessage("empty frame (length prefix 0)")
                if size > self.max_frame_bytes:
                    raise FrameTooLarge(size, self.max_frame_bytes)
                if end - pos - HEADER_SIZE < size:
                    break
                start = pos + HEADER_SIZE
                out.append(decode_body(bytes(buf[start : start + size])))
                pos = start + size
        except MalformedMessage as exc:
            self._failed = exc
            buf.clear()
            raise
        if pos:
            del buf[:pos]
        return out
