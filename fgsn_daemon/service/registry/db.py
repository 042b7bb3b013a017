"""Engines and schema migrations.

SQLite: WAL journal (readers never block the writer), ``busy_timeout``, foreign keys on, and the
SQLAlchemy-documented recipe for Python 3.11: the driver's own transaction handling is switched
off and a ``begin`` listener emits ``BEGIN`` itself. Writers get ``BEGIN IMMEDIATE`` so they take
the write lock up front instead of failing with ``SQLITE_BUSY`` on a lock upgrade; readers keep a
deferred ``BEGIN`` and run with ``PRAGMA query_only``. PostgreSQL goes through psycopg 3; readers
open read-only transactions.

Alembic runs from code on a shared connection (no ``alembic.ini``). A database stamped with a
revision this code does not know is newer than the code, and is refused.
"""

from __future__ import annotations

import threading
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import ConnectionPoolEntry

from fgsn_daemon.core.errors import RegistryError
from fgsn_daemon.service.settings import mask_database_url

SQLITE_BUSY_TIMEOUT_MS = 10_000
_BEGIN_OPTION = "fgsn_sqlite_begin"
_MIGRATION_LOCK_KEY = 0x46_47_53_4E_0001  # "FGSN" + 1: the advisory lock taken while migrating
# Alembic's command API keeps global state and is not thread-safe.
_ALEMBIC_LOCK = threading.Lock()


def is_sqlite(url: str | URL) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_path(url: str | URL) -> Path | None:
    """The database file of a SQLite URL (None for in-memory or non-SQLite URLs)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def is_unavailable(exc: BaseException) -> bool:
    """A registry error that waiting cures: the server went away or restarted, a connection was
    dropped, or SQLite stayed locked past its busy timeout."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    return isinstance(exc, (OperationalError, InterfaceError)) or (
        isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)
    )


def make_engine(url: str, *, read_only: bool = False) -> Engine:
    """An engine for the registry; writers must use :func:`write_engine` for their transactions."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, read_only=read_only)
    connect_args: dict[str, Any] = {}
    if read_only and parsed.get_backend_name() == "postgresql":
        connect_args["options"] = "-c default_transaction_read_only=on"
    return create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)


def write_engine(engine: Engine) -> Engine:
    """The same engine and pool, but SQLite transactions start with ``BEGIN IMMEDIATE``."""
    return engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})


def _sqlite_engine(url: URL, *, read_only: bool) -> Engine:
    path = sqlite_path(url)
    if path is not None:
        if read_only and not path.is_file():
            raise RegistryError(
                f"no registry database at {path}: start the daemon or run `fgsn db upgrade` first"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (see _begin)
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            if read_only:
                cursor.execute("PRAGMA query_only=ON")
            else:
                # WAL is persistent in the file; setting it needs write access, so only writers do.
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def migrations_dir() -> Path:
    """The Alembic script directory: the installed ``fgsn_daemon.migrations`` package, or the checkout's."""
    try:
        return Path(str(resources.files("fgsn_daemon.migrations")))
    except ModuleNotFoundError:
        # Running from a source checkout that is not installed: migrations/ sits beside fgsn_daemon/.
        checkout = Path(__file__).resolve().parents[3] / "migrations"
        if (checkout / "env.py").is_file():
            return checkout
        raise RegistryError("the fgsn_daemon.migrations package is missing from this installation") from None


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    # Date-prefixed revision files, like Prefect's, for `alembic revision` run from code.
    cfg.set_main_option(
        "file_template", "%%(year)d_%%(month).2d_%%(day).2d_%%(hour).2d%%(minute).2d_%%(rev)s_%%(slug)s"
    )
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise RegistryError(f"the migration tree has {len(heads)} heads; expected exactly one")
    return heads[0]


def current_revision(engine: Engine) -> str | None:
    """The revision the database is stamped with (None for an empty database)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def _check_known(revision: str | None, url: str) -> None:
    if revision is None:
        return
    script = ScriptDirectory.from_config(alembic_config())
    try:
        known = script.get_revision(revision)
    except CommandError:
        known = None
    if known is None:
        raise RegistryError(
            f"the registry at {mask_database_url(url)} is at schema revision {revision}, which is newer "
            f"than this fgsn-daemon (head {head_revision()}); upgrade fgsn-daemon instead of downgrading it"
        )


def upgrade_to_head(url: str, engine: Engine | None = None) -> str:
    """Create or upgrade the schema to head in one transaction; return the head revision."""
    own = engine is None
    engine = make_engine(url) if engine is None else engine
    try:
        with _ALEMBIC_LOCK, write_engine(engine).begin() as connection:
            if connection.dialect.name == "postgresql":
                # Serialise concurrent upgraders (daemon start-up and `fgsn db upgrade`); SQLite's
                # BEGIN IMMEDIATE already does. Released at commit.
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            elif connection.dialect.name == "sqlite":
                # Batch migrations rebuild tables (copy, drop, rename); check foreign keys at commit,
                # when the references are whole again. foreign_keys itself cannot change mid-transaction.
                connection.exec_driver_sql("PRAGMA defer_foreign_keys=ON")
            _check_known(MigrationContext.configure(connection).get_current_revision(), url)
            command.upgrade(alembic_config(connection), "head")
        return head_revision()
    finally:
        if own:
            engine.dispose()


def require_head(engine: Engine, url: str) -> str:
    """Check a database a reader is about to query: it must be exactly at head."""
    revision = current_revision(engine)
    _check_known(revision, url)
    head = head_revision()
    if revision != head:
        shown = "empty" if revision is None else f"at schema revision {revision}"
        raise RegistryError(
            f"the registry at {mask_database_url(url)} is {shown}, not at head {head}: "
            "run `fgsn db upgrade` (the daemon also upgrades at start-up)"
        )
    return revision
