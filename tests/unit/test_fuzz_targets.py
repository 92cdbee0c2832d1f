"""The short fuzz run of ``make test`` (issue 9): hypothesis feeds every target of tests/fuzz/targets.py raw bytes
and near-valid inputs for a few seconds; only the project's own errors may escape. ``make fuzz`` runs the same
targets coverage-guided (atheris) for more than a million inputs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import encode_frame
from protocol.license import split_revocation_list
from tests.fuzz.targets import CORPUS, TARGETS

SHORT = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NEAR = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
Target = Callable[[bytes], None]

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=40)
           | st.binary(max_size=40))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                      max_leaves=20)
ops = st.sampled_from(["hello", "checkout", "heartbeat", "checkin", "resume", "status", "admin", "welcome", "granted",
                       "heartbeat_ack", "checked_in", "resumed", "error", "bogus"])
fields = st.sampled_from(["id", "proto", "host", "user", "pid", "client_version", "display", "product", "version",
                          "wait", "idle", "idle_for", "token", "tokens", "command", "args", "auth", "server_version",
                          "heartbeat_interval", "lease_timeout", "max_frame", "session", "customer_id", "renewed",
                          "lost", "released", "resumed", "data", "code", "message", "hint", "waited"])
messages = st.builds(lambda op, body: {"op": op, **body}, ops, st.dictionaries(fields, values, max_size=8))


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """A few frames of near-valid messages, sometimes with bytes flipped, cut or inserted."""
    data = bytearray(b"".join(encode_frame(m) for m in draw(st.lists(messages, min_size=1, max_size=4))))
    for _ in range(draw(st.integers(0, 3))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        how = draw(st.sampled_from(["flip", "cut", "insert"]))
        if how == "flip":
            data[i] ^= draw(st.integers(1, 255))
        elif how == "cut":
            del data[i:]
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_the_seed_corpus_passes(name: str) -> None:
    seeds = sorted((CORPUS / name).iterdir())
    assert seeds, f"no seed for {name} in {CORPUS}"
    for seed in seeds:
        TARGETS[name](seed.read_bytes())


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_any_bytes(name: str) -> None:
    target = TARGETS[name]

    @SHORT
    @given(st.binary(max_size=512))
    def run(data: bytes) -> None:
        target(data)

    run()


@pytest.mark.parametrize("name", ["frame_decoder", "server_connection", "client_connection"])
def test_near_valid_frames(name: str) -> None:
    target = TARGETS[name]

    @NEAR
    @given(streams())
    def run(data: bytes) -> None:
        target(data)

    run()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_mutated_seeds(name: str) -> None:
    """Seeds with bytes flipped, cut and spliced: the inputs a parser almost accepts."""
    target = TARGETS[name]
    seeds = [s.read_bytes() for s in sorted((CORPUS / name).iterdir())]

    @SHORT
    @given(st.sampled_from(seeds), st.lists(st.tuples(st.integers(0, 10_000), st.binary(max_size=6)), max_size=4),
           st.integers(0, 10_000))
    def run(seed: bytes, edits: list[tuple[int, bytes]], cut: int) -> None:
        data = bytearray(seed)
        for at, new in edits:
            at %= len(data) + 1
            data[at:at + len(new)] = new
        target(bytes(data[: max(1, cut % (len(data) + 1))] if cut % 3 == 0 else data))

    run()


def test_a_revocation_line_of_other_whitespace_is_not_an_index_error() -> None:
    # Found by the fuzzer: a line of U+000B (or U+3000) is not blank to strip(" \t") but has no first word.
    assert len(split_revocation_list("format 1\n\x0b\nsignature ed25519:AAAA\n")) == 1
    TARGETS["revocation_file"](b"\x0b")
