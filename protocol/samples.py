"""One complete, valid example of every message, for the tests and tools that need a message of each kind.

Pure: message objects only. Each sets every field, optional ones to a value other than their default (protocol
2's hello, with its secret), so a test that drops or changes one field sees the difference. Used by the schema
tests (tests/unit/protocol/test_messages_mutants.py), the fuzz seed corpus (tests/fuzz/make_corpus.py) and the
checked-in test vectors (protocol/make_vectors.py, as the ``sample_*`` vectors).
"""

from __future__ import annotations

from protocol.errors import ErrorCode
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
)

__all__ = ["REPLIES", "REQUESTS", "SAMPLES"]

#: Requests, in the order a client sends them (hello first), by name (the op, ``error`` for an error reply).
REQUESTS: dict[str, Request] = {
    "hello": Hello(1, (1, 2), "pc1", "alice", 77, "cv 1", ":0", "s" * 32),
    "checkout": Checkout(2, "CADPRO", "2.1", 5.0),
    "heartbeat": Heartbeat(3, True, 30.0),
    "checkin": Checkin(4, "tok-1"),
    "resume": Resume(5, ("t1", "t2")),
    "status": Status(6),
    "admin": Admin(7, "lmremove", {"token": "t1"}, "secret"),
}
#: Replies, in the order of the requests they answer (welcome first).
REPLIES: dict[str, Reply] = {
    "welcome": Welcome(8, 1, "lmgrd 1.0", 10.0, 30.0, 1 << 20, 42),
    "granted": Granted(9, "tok-9", "C1", "CADPRO", "2.1", 30.0, 10.0, 1.5),
    "heartbeat_ack": HeartbeatAck(10, 3, (LostSeat("t", ErrorCode.LEASE_EXPIRED, "gone"),)),
    "checked_in": CheckedIn(11, True),
    "resumed": Resumed(12, ("t1",), (LostSeat("t2", ErrorCode.LEASE_NOT_FOUND, "no such lease"),)),
    "status_reply": StatusReply(13, {"pools": [1, 2]}),
    "error": ErrorReply(14, ErrorCode.NO_SEATS, "all 3 seats in use", "wait or ask"),
}
SAMPLES: dict[str, Request | Reply] = {**REQUESTS, **REPLIES}
