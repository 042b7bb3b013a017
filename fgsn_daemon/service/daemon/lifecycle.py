"""Lock, start-up and shutdown, the scheduler loop, and riding out registry outages."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import time
from pathlib import Path
from types import FrameType
from typing import Any

from fgsn_daemon.core.durable import write_text_durably
from fgsn_daemon.core.errors import FGSNError
from fgsn_daemon.service.daemon.state import (
    LINEAGE_MARKER,
    LOCK_NAME,
    LOG,
    MAX_BACKOFF_S,
    MIN_BACKOFF_S,
    DaemonLockedError,
    DaemonState,
    StateMismatchError,
    StopRequested,
    now_dt,
)
from fgsn_daemon.service.registry import Registry, is_unavailable
from fgsn_daemon.service.registry.views import LineageInfo
from fgsn_daemon.service.settings import mask_database_url


class Lifecycle(DaemonState):
    """Lock, start-up and shutdown, the scheduler loop, and riding out registry outages."""

    def acquire_lock(self) -> None:
        if self._lock_fd is not None:
            return  # flock is per open file: a second open in this process would block itself
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DaemonLockedError(
                f"another fgsn daemon (pid {holder}) is already running on {self.state_dir}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def open_registry(self) -> Registry:
        if self.registry is None:
            self.registry = Registry.open(self.settings.database_url_value())
        return self.registry

    def check_registry_matches_state_folder(self) -> None:
        """Refuse a registry that is not the one this state folder was written with: one that
        records versions in another state folder, or one whose lineages differ from those the
        state folder's lineage folders were made for (e.g. a new, empty database). Starting on it
        would delete versions it does not know as crash leftovers."""
        reg = self.open_registry()
        here = self.state_dir.resolve()
        url = mask_database_url(self.settings.database_url_value())
        lineages = {lin.id: lin for lin in reg.lineages()}
        for lin in lineages.values():
            for v in reg.versions(lin.id):
                if not Path(v.path).resolve().is_relative_to(here):
                    raise StateMismatchError(
                        f"the registry at {url} records versions in another state folder ({v.path}), "
                        f"not in {self.state_dir}: point state_dir at that folder or use another database"
                    )
        for marker in sorted(self.state_dir.glob(f"lineage-*/{LINEAGE_MARKER}")):
            try:
                recorded = json.loads(marker.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise StateMismatchError(
                    f"{marker} is unreadable ({exc}); restore it from a backup"
                ) from None
            known = lineages.get(recorded.get("lineage_id"))
            if known is None or self._lineage_record(known) != recorded:
                raise StateMismatchError(
                    f"{marker.parent} was written with another registry (lineage "
                    f"{recorded.get('lineage_id')} created {recorded.get('created_at')}); "
                    f"the registry at {url} "
                    + ("has no such lineage" if known is None else "holds a different lineage under that id")
                    + ": point database_url at the registry this state folder was written with, or use a "
                    "new state folder"
                )

    def _lineage_record(self, lineage: LineageInfo) -> dict[str, Any]:
        return {
            "lineage_id": lineage.id,
            "created_at": lineage.created_at.isoformat(),
            "base": lineage.base_fingerprint,
            "aligned": lineage.aligned_fingerprint,
            "finetuned": lineage.finetuned_fingerprint,
        }

    def _write_lineage_marker(self) -> None:
        """Tie ``lineage-N/`` to the registry's lineage N (see ``check_registry_matches_state_folder``)."""
        marker = self.state_dir / f"lineage-{self.lineage_id}" / LINEAGE_MARKER
        if marker.exists():
            return
        lin = next(x for x in self.open_registry().lineages() if x.id == self.lineage_id)
        write_text_durably(marker, json.dumps(self._lineage_record(lin), indent=1) + "\n")

    def _point_top_level_link(self) -> None:
        link, target = self.state_dir / "current", Path(f"lineage-{self.lineage_id}") / "current"
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return
        tmp = self.state_dir / ".current-lineage.tmp"
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, link)

    def close(self) -> None:
        if self.trio is not None:
            self.trio.close()
            self.trio = None
        if self.registry is not None:
            self.registry.close()
            self.registry = None
        self.release_lock()

    def check_stop(self) -> None:
        if self.stop_event.is_set():
            raise StopRequested

    def start(self) -> None:
        """Lock, migrate, open models, recover from any crash, and make sure a first version exists."""
        self.acquire_lock()
        reg = self.open_registry()
        self.get_localiser()  # reads the prompt files, then opens the models
        self.recover()
        self.ensure_band()
        self.check_current()  # never build on a damaged parent
        if reg.current_version(self.lineage_id) is None:
            self.progress("writing the initial version (the fine-tuned model, re-sharded)")
            self._publish([], {}, job_id=None, finish=None)

    def tick(self) -> None:
        """One scan + drain; exceptions are logged and recorded, never fatal to the service. When
        the registry is unreachable (server down, connection lost, SQLite locked) the tick backs
        off; the first tick that reaches it again runs start-up recovery before anything else, so
        a job cut off mid-way is redone and a version built but never recorded is deleted — a
        version is published only after the registry has committed it."""
        if time.monotonic() < self._retry_at:
            return
        try:
            if self._outage_since is not None:
                self._registry_back()
            reg = self.open_registry()
            with reg.transaction() as tx:
                tx.heartbeat(os.getpid(), socket.gethostname())
            self.scan()
            self.retry_after_space()
            self.drain()
        except StopRequested:
            pass
        except Exception as exc:
            if is_unavailable(exc):
                self._registry_lost(exc)
                return
            try:
                if isinstance(exc, FGSNError):
                    self._report_once(f"tick:{exc}", "daemon.error", None, str(exc))
                else:  # a bug must not kill a long-running service; it is recorded
                    LOG.exception("unexpected error in the daemon loop")
                    self._report_once(
                        f"tick:{type(exc).__name__}:{exc}",
                        "daemon.error",
                        None,
                        f"{type(exc).__name__}: {exc}",
                    )
            except Exception as again:
                if not is_unavailable(again):
                    raise
                self._registry_lost(again)

    @property
    def registry_unreachable(self) -> bool:
        return self._outage_since is not None

    def _registry_lost(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since, self._backoff_s = now, 0.0
        self._backoff_s = min(MAX_BACKOFF_S, max(MIN_BACKOFF_S, 2 * self._backoff_s))
        self._retry_at = now + self._backoff_s
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        LOG.error(
            "registry unreachable (%s): nothing is published meanwhile; retrying in %.0f s",
            first_line[:300],
            self._backoff_s,
        )

    def _registry_back(self) -> None:
        assert self._outage_since is not None
        self.recover()
        seconds = time.monotonic() - self._outage_since
        with self.open_registry().transaction() as tx:
            tx.append_event(
                "daemon.registry_reconnected",
                lineage_id=self.lineage_id,
                details={"outage_s": round(seconds, 1)},
            )
        LOG.warning("registry reachable again after %.0f s; recovered as after a restart", seconds)
        self._outage_since, self._backoff_s, self._retry_at = None, 0.0, 0.0

    def run_once(self) -> None:
        self.tick()

    def run_forever(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None}
        )
        scheduler.add_job(
            self.tick, "interval", seconds=self.settings.scan_interval_s, id="tick", next_run_time=now_dt()
        )
        scheduler.start()
        try:
            while not self.stop_event.wait(0.5):
                pass
        finally:
            scheduler.shutdown(wait=True)

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            if self.stop_event.is_set():
                LOG.warning("second signal: exiting now")
                os._exit(130)
            LOG.info("signal %s: stopping at the next safe point", signum)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
