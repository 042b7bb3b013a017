"""Alembic environment, run from code (fgsn_daemon.service.registry.db) on a connection it passes in.

No logging set-up here on purpose: ``fileConfig`` would clobber the daemon's logging.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from fgsn_daemon.service.registry.models import Base

target_metadata = Base.metadata


def run_migrations() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        # Plain `alembic` command line: use the URL from the config (sqlalchemy.url).
        url = context.config.get_main_option("sqlalchemy.url")
        if not url:
            raise RuntimeError("run migrations through fgsn_daemon.service.registry.db or set sqlalchemy.url")
        engine = create_engine(url)
        with engine.begin() as own_connection:
            _configure_and_run(own_connection)
        engine.dispose()
        return
    _configure_and_run(connection)


def _configure_and_run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
        render_as_batch=connection.dialect.name == "sqlite",  # type: ignore[attr-defined]
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported")
run_migrations()
