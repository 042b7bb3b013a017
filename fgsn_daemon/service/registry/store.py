"""The registry API the daemon and the CLI call.

``Registry`` answers queries, each in its own short read transaction. Writes go through
``with registry.transaction() as tx:`` which yields a :class:`RegistryWriter` bound to one
transaction (``BEGIN IMMEDIATE`` on SQLite): everything done inside commits together or not at
all, which is how "record the result, claim the neurons, publish the version, finish the job"
becomes one atomic step. The daemon is the only writer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from fgsn_daemon.core.errors import RegistryError
from fgsn_daemon.service.registry.db import make_engine, require_head, upgrade_to_head, write_engine
from fgsn_daemon.service.registry.queries import Queries
from fgsn_daemon.service.registry.views import StatusInfo
from fgsn_daemon.service.registry.writer import RegistryWriter


class Registry(Queries):
    """A connection to the registry database. Use :meth:`open`."""

    def __init__(self, engine: Engine, url: str, *, read_only: bool) -> None:
        self.engine = engine
        self.url = url
        self.read_only = read_only

    @classmethod
    def open(cls, url: str, *, read_only: bool = False, migrate: bool = True) -> Registry:
        """Writers (the daemon) upgrade the schema to head first; readers require it to be at head."""
        engine = make_engine(url, read_only=read_only)
        try:
            if read_only or not migrate:
                require_head(engine, url)
            else:
                upgrade_to_head(url, engine)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, url, read_only=read_only)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def snapshot(self) -> Iterator[RegistrySnapshot]:
        """Several queries answered from one consistent view of the database."""
        engine = self.engine
        if engine.dialect.name == "postgresql":
            # READ COMMITTED would let each statement see newer commits; one snapshot for all.
            engine = engine.execution_options(isolation_level="REPEATABLE READ")
        with Session(engine, expire_on_commit=False) as session, session.begin():
            yield RegistrySnapshot(session)

    def status(self, lineage_id: int | None = None) -> StatusInfo:
        with self.snapshot() as view:
            return view.status(lineage_id)

    @contextmanager
    def transaction(self) -> Iterator[RegistryWriter]:
        """One write transaction: commits when the block ends, rolls back if it raises."""
        if self.read_only:
            raise RegistryError("this registry connection is read-only")
        with Session(write_engine(self.engine), expire_on_commit=False) as session, session.begin():
            yield RegistryWriter(session)


class RegistrySnapshot(Queries):
    """Queries inside one read transaction (see :meth:`Registry.snapshot`)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        yield self.session
