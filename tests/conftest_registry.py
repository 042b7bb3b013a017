"""Registry database fixtures: every test gets a brand-new database on each backend.

``registry_url`` is parametrized over SQLite (a file in ``tmp_path``) and PostgreSQL (a fresh
database created on the server named by ``FGSN_TEST_POSTGRES_URL``, dropped afterwards; the
PostgreSQL case is skipped when that variable is unset, and fails instead when
``FGSN_REQUIRE_POSTGRES=1``; start a server with ``eval "$(.ci/start_postgres.sh)"``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

POSTGRES_ENV = "FGSN_TEST_POSTGRES_URL"
REQUIRE_POSTGRES_ENV = "FGSN_REQUIRE_POSTGRES"  # CI sets it so PostgreSQL tests cannot silently skip


def postgres_admin_url() -> str | None:
    return os.environ.get(POSTGRES_ENV) or None


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state' / 'registry.db'}"
        return
    admin = postgres_admin_url()
    if admin is None:
        if os.environ.get(REQUIRE_POSTGRES_ENV) == "1":
            pytest.fail(f"{REQUIRE_POSTGRES_ENV}=1 but {POSTGRES_ENV} is not set")
        pytest.skip(f'{POSTGRES_ENV} is not set: run `eval "$(.ci/start_postgres.sh)"` to test on PostgreSQL')
    name = f"fgsn_test_{uuid.uuid4().hex[:16]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(admin).set(database=name).render_as_string(hide_password=False)
        with engine.connect() as connection:
            # FORCE: a test that failed may have left a connection open.
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


@pytest.fixture
def sqlite_registry_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state' / 'registry.db'}"
