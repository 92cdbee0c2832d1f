"""The service's database: the schema (SQLAlchemy Core tables), the engine, and the Alembic schema check.

SQLite by default (a file in the platform data dir, WAL mode, every transaction ``BEGIN IMMEDIATE`` so two
writers never race on a lock upgrade); PostgreSQL through asyncpg for production and for several service
instances behind a load balancer. Times are stored as integer epoch seconds (UTC) so both databases store
and compare them the same way. The schema is made only by the Alembic migrations in ``migrations/``
(``lmcloud db upgrade``); :func:`check_schema` refuses a database at another revision.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import sqlalchemy as sa
from platformdirs import user_data_dir
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "DB_ENV",
    "MIGRATIONS",
    "SCHEMA_REVISION",
    "DatabaseError",
    "activations",
    "check_schema",
    "customers",
    "default_db_url",
    "display_url",
    "events",
    "make_engine",
    "metadata",
    "nonces",
    "normalize_url",
    "schema_head",
    "upgrade",
]

#: Environment variable naming the database when ``--db`` is not given.
DB_ENV: Final = "LMCLOUD_DB"
MIGRATIONS: Final = Path(__file__).resolve().parent / "migrations"
#: The Alembic revision this version of lmcloud needs: the head of ``migrations/versions`` (a unit test checks
#: they agree). Written here so that every command but ``db upgrade`` checks the schema without loading Alembic.
SCHEMA_REVISION: Final = "0001"


class DatabaseError(Exception):
    """The database URL is unusable, the schema is old, or the database cannot be reached (worded for the user)."""


metadata = sa.MetaData()

#: One row per registered customer ID (``lmcloud register``).
customers = sa.Table(
    "customers", metadata,
    sa.Column("customer_id", sa.String(32), primary_key=True),
    sa.Column("license_text", sa.Text, nullable=False),
    sa.Column("customer", sa.Text, nullable=False),
    sa.Column("license_type", sa.String(8), nullable=False),
    sa.Column("issued_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=True),  # end of the expiry day; NULL: never
    sa.Column("cloud_url", sa.Text, nullable=True),
    sa.Column("registered_at", sa.BigInteger, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # pending | active | superseded | revoked
    sa.Column("active_activation_id", sa.Integer, nullable=True),
    sa.Column("revoked_at", sa.BigInteger, nullable=True),
    sa.Column("revoke_reason", sa.Text, nullable=True),
    sa.Column("replaced_by", sa.String(32), nullable=True),
)

#: Every activation ever made; the current one is ``customers.active_activation_id``.
activations = sa.Table(
    "activations", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("customer_id", sa.String(32), sa.ForeignKey("customers.customer_id"), nullable=False, index=True),
    sa.Column("hostname", sa.Text, nullable=False),
    sa.Column("addresses", sa.Text, nullable=False),  # JSON list
    sa.Column("fp_host", sa.String(64), nullable=False),
    sa.Column("fp_machine", sa.String(64), nullable=False),
    sa.Column("fp_macs", sa.Text, nullable=False),  # JSON list of digests
    sa.Column("fingerprint", sa.String(64), nullable=False),  # the digest shown to admins
    sa.Column("installation_key", sa.String(44), nullable=False),
    sa.Column("how", sa.String(16), nullable=False),  # manual | automatic | offline
    sa.Column("activated_at", sa.BigInteger, nullable=False),
    sa.Column("last_check_in", sa.BigInteger, nullable=True),
    # The current certificate (re-signed identically for a retried check-in).
    sa.Column("cert_issued_at", sa.BigInteger, nullable=False),
    sa.Column("valid_until", sa.BigInteger, nullable=True),
    sa.Column("next_check_in", sa.BigInteger, nullable=True),
    sa.Column("token", sa.String(86), nullable=True),
    sa.Column("sequence", sa.BigInteger, nullable=False),
    sa.Column("request_nonce", sa.String(86), nullable=False),
    sa.Column("prev_token", sa.String(86), nullable=True),
    sa.Column("rotated_at", sa.BigInteger, nullable=True),
    sa.Column("retried", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("retry_streak", sa.Integer, nullable=False, server_default="0"),
    sa.Column("ended_at", sa.BigInteger, nullable=True),
    sa.Column("ended_reason", sa.Text, nullable=True),
)

#: The history ``lmcloud show`` prints: activated, check_in, conflict, suspected_clone, superseded, revoked, ...
events = sa.Table(
    "events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("customer_id", sa.String(32), sa.ForeignKey("customers.customer_id"), nullable=False, index=True),
    sa.Column("at", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("hostname", sa.Text, nullable=True),
    sa.Column("detail", sa.Text, nullable=False),
)

#: Every request nonce seen (replay protection); pruned after the request age limit.
nonces = sa.Table(
    "nonces", metadata,
    sa.Column("nonce", sa.String(86), primary_key=True),
    sa.Column("customer_id", sa.String(32), nullable=False),
    sa.Column("seen_at", sa.BigInteger, nullable=False, index=True),
)


def default_db_url() -> str:
    """``$LMCLOUD_DB``, else the SQLite file ``lmcloud.sqlite3`` in the platform data dir."""
    env = os.environ.get(DB_ENV, "").strip()
    if env:
        return env
    return "sqlite:///" + str(Path(user_data_dir("lmcloud", appauthor=False)) / "lmcloud.sqlite3")


def normalize_url(raw: str) -> URL:
    """The async driver URL for ``raw``: ``postgresql://…`` → asyncpg, ``sqlite:///FILE`` or a plain path → aiosqlite.

    Raises:
        DatabaseError: not a URL or path this service can use (the message says what is accepted).
    """
    text = raw.strip()
    if "://" not in text:
        if not text:
            raise DatabaseError("--db is empty; give a SQLite file path, sqlite:///FILE or postgresql://…")
        return URL.create("sqlite+aiosqlite", database=str(Path(text).expanduser().absolute()))
    try:
        url = make_url(text)
    except ArgumentError:
        raise DatabaseError(f"--db {display_url(text)!r} is not a database URL "
                            "(use sqlite:///FILE or postgresql://USER@HOST:PORT/DB)") from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise DatabaseError("--db sqlite: needs a file (sqlite:///path/to/lmcloud.sqlite3); an in-memory "
                                "database would lose every activation")
        return url.set(drivername="sqlite+aiosqlite")
    if backend in ("postgresql", "postgres"):
        return url.set(drivername="postgresql+asyncpg")
    raise DatabaseError(f"--db {display_url(text)!r}: unsupported database {backend!r}; use SQLite or PostgreSQL")


def display_url(raw: str | URL) -> str:
    """The URL with any password hidden, for messages and logs."""
    try:
        return make_url(raw).render_as_string(hide_password=True) if isinstance(raw, str) else (
            raw.render_as_string(hide_password=True))
    except ArgumentError:
        return str(raw)


def make_engine(raw: str, pool_size: int = 5) -> AsyncEngine:
    """An async engine for ``raw`` (see :func:`normalize_url`). SQLite: WAL, busy timeout, BEGIN IMMEDIATE."""
    url = normalize_url(raw)
    if url.get_backend_name() == "sqlite":
        assert url.database is not None
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @sa.event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # the driver must not BEGIN on its own: _on_begin does
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @sa.event.listens_for(engine.sync_engine, "begin")
        def _on_begin(conn: Any) -> None:
            # IMMEDIATE takes the write lock at BEGIN: a read-then-write transaction never fails on upgrading
            # its lock, so concurrent requests queue instead of erroring.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_async_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=False)


def _alembic_config() -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def schema_head() -> str:
    """The head revision of the migrations (what ``SCHEMA_REVISION`` must say)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def _current_revision(sync_conn: sa.Connection) -> str | None:
    if not sa.inspect(sync_conn).has_table("alembic_version"):
        return None
    rows = sync_conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
    return ",".join(sorted(str(r) for r in rows)) or None


async def check_schema(engine: AsyncEngine, raw_url: str) -> None:
    """Refuse a database whose schema is not this version's.

    Raises:
        DatabaseError: unreachable, never set up, or at another revision; the message names
            ``lmcloud db upgrade --db URL``.
    """
    fix = f"run: lmcloud db upgrade --db {display_url(raw_url)}"
    try:
        async with engine.connect() as conn:
            current = await conn.run_sync(_current_revision)
    except (OSError, sa.exc.SQLAlchemyError) as exc:
        raise DatabaseError(f"cannot open the database {display_url(raw_url)}: {_reason(exc)}") from None
    head = SCHEMA_REVISION
    if current is None:
        raise DatabaseError(f"the database {display_url(raw_url)} has no lmcloud schema yet; {fix}")
    if current != head:
        raise DatabaseError(f"the database {display_url(raw_url)} has schema revision {current}, this lmcloud "
                            f"needs {head}; {fix}")


def _reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig or exc).strip().splitlines()[0] if str(orig or exc).strip() else type(exc).__name__


def _run_upgrade(sync_conn: sa.Connection) -> tuple[str | None, str | None]:
    from alembic import command

    before = _current_revision(sync_conn)
    cfg = _alembic_config()
    cfg.attributes["connection"] = sync_conn
    command.upgrade(cfg, "head")
    return before, _current_revision(sync_conn)


async def upgrade(raw_url: str) -> tuple[str | None, str | None]:
    """Bring the database to this version's schema (``lmcloud db upgrade``). Returns (before, after) revisions.

    Raises:
        DatabaseError: the database cannot be reached or the migration fails.
    """
    engine = make_engine(raw_url)
    try:
        async with engine.connect() as conn:
            result = await conn.run_sync(_run_upgrade)
            await conn.commit()
        return result
    except (OSError, sa.exc.SQLAlchemyError) as exc:
        raise DatabaseError(f"cannot upgrade the database {display_url(raw_url)}: {_reason(exc)}") from None
    finally:
        await engine.dispose()


async def ping(conn: AsyncConnection) -> None:
    """One round trip (``/healthz``)."""
    await conn.execute(sa.text("SELECT 1"))
