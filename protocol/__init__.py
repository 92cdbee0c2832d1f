"""lmgrd wire protocol, sans-I/O: framing, message schema, validation, error codes, the connection state
machine, license verification and fingerprint matching: what both ends need, and nothing else.

Imports only the standard library, msgpack and cryptography. No sockets, asyncio, threads, file access,
clock reads or logging setup: both the daemon (``lmgrd``) and the client library (``client_stub``) use it.
"""

from protocol.connection import (
    SUPPORTED_VERSIONS,
    BadRequest,
    Connection,
    Role,
    State,
    error_frame,
    negotiate,
)
from protocol.errors import (
    RETRYABLE,
    ErrorCode,
    FrameTooLarge,
    LocalProtocolError,
    MalformedMessage,
    ProtocolError,
)
from protocol.framing import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, encode_frame
from protocol.messages import (
    Admin,
    CheckedIn,
    Checkin,
    Checkout,
    ErrorReply,
    Granted,
    Heartbeat,
    HeartbeatAck,
    Hello,
    LostSeat,
    Reply,
    Request,
    Resume,
    Resumed,
    Status,
    StatusReply,
    Welcome,
    parse_reply,
    parse_request,
)

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES", "RETRYABLE", "SUPPORTED_VERSIONS", "Admin", "BadRequest",
    "CheckedIn", "Checkin", "Checkout", "Connection", "ErrorCode", "ErrorReply",
    "FrameDecoder", "FrameTooLarge", "Granted", "Heartbeat", "HeartbeatAck", "Hello", "LocalProtocolError",
    "LostSeat", "MalformedMessage", "ProtocolError", "Reply", "Request", "Resume", "Resumed", "Role",
    "State", "Status", "StatusReply", "Welcome", "encode_frame", "error_frame", "negotiate",
    "parse_reply", "parse_request",
]
