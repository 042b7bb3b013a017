"""The short form of the random-crash campaign (``benchmarks/crash_campaign.py`` runs the long
one): a real daemon subprocess killed at seeded random moments over three stages of policy changes
(new dimensions, a changed revision, a rollback), restarted until each stage drains, on SQLite and
PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_trio

from fgsn_daemon.service.reliability import Campaign

pytestmark = pytest.mark.slow
pytest_plugins = ["conftest_registry"]


def test_random_kills_keep_the_invariants(tmp_path: Path, registry_url: str) -> None:
    trio = make_trio(tmp_path / "trio", "llama")
    databases = {}

    def database_url(name: str) -> str:
        # one fresh database per state folder: the reference and each round start empty
        if registry_url.startswith("sqlite"):
            return f"sqlite:///{tmp_path / f'state-{name}' / 'registry.db'}"
        return databases.setdefault(name, _fresh_postgres(registry_url, name))

    campaign = Campaign(tmp_path, trio, database_url=database_url)
    try:
        report = campaign.run(kills=6, seed=7)
    finally:
        for url in databases.values():
            _drop_postgres(registry_url, url)
    assert len(report.kills) == 6
    assert report.failures == 0, (report.problems, [k for k in report.kills if k.problems])
    assert report.runs > len(report.kills)  # every stage drained after its kills


def _admin(url: str, sql: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text(sql))
    finally:
        engine.dispose()


def _fresh_postgres(url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    db = f"{make_url(url).database}_{name.replace('-', '_')}"
    _admin(url, f'CREATE DATABASE "{db}"')
    return make_url(url).set(database=db).render_as_string(hide_password=False)


def _drop_postgres(admin_url: str, url: str) -> None:
    from sqlalchemy.engine import make_url

    _admin(admin_url, f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')
