"""lmcloud pieces that need no server: the schema revision it checks, URL handling, the rate limiter."""

from __future__ import annotations

import pytest

from lmgrd.vendor.lmcloud.app import RateLimiter
from lmgrd.vendor.lmcloud.db import SCHEMA_REVISION, DatabaseError, display_url, normalize_url, schema_head


def test_the_revision_serve_checks_is_the_migrations_head() -> None:
    assert schema_head() == SCHEMA_REVISION


@pytest.mark.parametrize(("raw", "driver"), [
    ("postgresql://u@127.0.0.1:5432/db", "postgresql+asyncpg"), ("postgres://u@h/db", "postgresql+asyncpg"),
    ("sqlite:////tmp/x.sqlite3", "sqlite+aiosqlite"), ("/tmp/x.sqlite3", "sqlite+aiosqlite"),
])
def test_database_urls(raw: str, driver: str) -> None:
    assert normalize_url(raw).drivername == driver


@pytest.mark.parametrize(("raw", "words"), [
    ("mysql://u@h/db", "unsupported database 'mysql'"), ("sqlite://", "needs a file"), ("", "empty"),
    ("sqlite:///:memory:", "needs a file"),
])
def test_bad_database_urls_are_named(raw: str, words: str) -> None:
    with pytest.raises(DatabaseError, match=words):
        normalize_url(raw)


def test_passwords_are_hidden_in_messages() -> None:
    assert "secret" not in display_url("postgresql://u:secret@h/db")


def test_rate_limiter_bucket() -> None:
    now = [0.0]
    limiter = RateLimiter(per_minute=3, clock=lambda: now[0])
    assert [limiter.retry_after("a") for _ in range(3)] == [None, None, None]
    wait = limiter.retry_after("a")
    assert wait is not None and wait == pytest.approx(20.0)  # one token a 20 s at 3 a minute
    assert limiter.retry_after("b") is None  # another key has its own bucket
    now[0] += 20.0
    assert limiter.retry_after("a") is None
    assert limiter.retry_after("a") is not None
    assert RateLimiter(per_minute=0).retry_after("a") is None  # 0: off
