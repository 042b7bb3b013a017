"""Version integrity: a sha256 manifest in every version folder, and the checks that read it.

``MANIFEST.sha256.json`` lists every file of a version (``{"files": {name: {"sha256", "bytes"}}}``)
and is written inside the staging folder before the rename, so a published version always has one.
A shard hard-linked from the parent takes its hash from the parent's manifest instead of being
read again: publishing costs only the bytes the version wrote. The trade-off: a link records what
the parent's manifest *says* the bytes are, so a shard that rotted in the parent before the link is
not noticed at publishing — but it is still caught, in both versions, by the next check that hashes
it (the parent's manifest and the child's agree on the intended content).

Checks: *quick* (one version) = manifest readable, no file missing, extra or of the wrong size, and
every file hashed. Hashing all of ``current`` rather than only the files the version wrote itself is
deliberate: hard-linked shards hold most of a version's bytes, so skipping them would leave most of
what is served unchecked; the cost is one sequential read of one checkpoint (seconds per GB) at
daemon start-up. *Deep* = the quick check of every version, each inode hashed once (hard links
share content), plus the registry agreeing with the folders.

Versions written before manifests existed are reported as "unverified (no manifest)", never as
corrupted; ``fgsn verify --write-missing`` records one for them (trust on first use).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fgsn_daemon.core.durable import write_text_durably

if TYPE_CHECKING:
    from fgsn_daemon.service.registry.views import VersionInfo

MANIFEST_NAME = "MANIFEST.sha256.json"
MANIFEST_FORMAT = 1
CHUNK = 8 << 20

# Problem kinds that do not fail a check: nothing is known to be wrong.
NOT_FATAL = frozenset({"unverified", "unregistered"})
# Problem kinds a rebuild from the immutable inputs can repair (the file's bytes are known).
REPAIRABLE = frozenset({"missing", "size", "hash"})


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Problem:
    """One finding; ``version`` is a folder name (v0003) or "" for the state folder itself."""

    version: str
    kind: str  # missing|size|hash|extra|manifest|absent|registry (fatal), unverified|unregistered
    message: str
    file: str | None = None
    expected: str | None = None
    actual: str | None = None

    @property
    def fatal(self) -> bool:
        return self.kind not in NOT_FATAL

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "fatal": self.fatal}

    def __str__(self) -> str:
        where = f"{self.version}/{self.file}" if self.file else self.version or "state"
        text = f"{where}: {self.message}"
        if self.expected is not None or self.actual is not None:
            text += f" (expected {self.expected}, actual {self.actual})"
        return text


class HashCache:
    """sha256 per inode: hard-linked shards are hashed once however many versions share them."""

    def __init__(self) -> None:
        self._known: dict[tuple[int, int], str] = {}

    def sha256(self, path: Path) -> str:
        st = path.stat()
        key = (st.st_dev, st.st_ino)
        if key not in self._known:
            self._known[key] = sha256_file(path)
        return self._known[key]


def sha256_file(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
        if fsync:  # the files a version wrote are made durable before its folder is renamed
            os.fsync(f.fileno())
    return h.hexdigest()


def version_files(folder: Path) -> list[str]:
    """Every regular file of a version folder (relative, sorted): hidden files (temporaries) and
    the manifest itself excluded."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and not p.is_symlink() and not p.name.startswith(".") and p.name != MANIFEST_NAME
    )


def read_manifest(folder: Path) -> dict[str, FileEntry] | None:
    """The manifest's entries; None when the folder has none. Raises ValueError when unreadable."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {name: FileEntry(str(e["sha256"]), int(e["bytes"])) for name, e in data["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: unreadable manifest ({exc})") from None


def write_manifest(folder: Path, parent: Path | None = None) -> dict[str, FileEntry]:
    """Hash every file of ``folder`` (fsyncing it) and write the manifest atomically. A file that is
    a hard link of the same file in ``parent`` takes the parent's manifest entry unread."""
    inherited = _parent_entries(parent)
    entries: dict[str, FileEntry] = {}
    for name in version_files(folder):
        path = folder / name
        size = path.stat().st_size
        known = inherited.get(name)
        if (
            known is not None
            and parent is not None
            and known.bytes == size
            and _same_file(path, parent / name)
        ):
            entries[name] = known
        else:
            entries[name] = FileEntry(sha256_file(path, fsync=True), size)
    body = {
        "format": MANIFEST_FORMAT,
        "algorithm": "sha256",
        "files": {k: asdict(v) for k, v in entries.items()},
    }
    write_text_durably(folder / MANIFEST_NAME, json.dumps(body, indent=1, sort_keys=True) + "\n")
    return entries


def _parent_entries(parent: Path | None) -> dict[str, FileEntry]:
    if parent is None:
        return {}
    try:
        return read_manifest(parent) or {}
    except ValueError:
        return {}  # an unreadable parent manifest: hash everything instead


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_version(folder: Path, cache: HashCache | None = None) -> list[Problem]:
    """The quick check of one version folder against its manifest (see the module docstring)."""
    name = folder.name
    if not folder.is_dir():
        return [Problem(name, "absent", f"version folder {folder} does not exist")]
    try:
        manifest = read_manifest(folder)
    except ValueError as exc:
        return [Problem(name, "manifest", str(exc), file=MANIFEST_NAME)]
    if manifest is None:
        return [
            Problem(name, "unverified", "unverified (no manifest; `fgsn verify --write-missing` adds one)")
        ]
    cache = cache or HashCache()
    problems = [
        Problem(name, "extra", "file not in the manifest", file=f)
        for f in version_files(folder)
        if f not in manifest
    ]
    for fname, entry in sorted(manifest.items()):
        problems += _check_file(name, folder / fname, fname, entry, cache)
    return problems


def _check_file(version: str, path: Path, fname: str, entry: FileEntry, cache: HashCache) -> list[Problem]:
    if not path.is_file():
        return [Problem(version, "missing", "file is missing", fname, entry.sha256, None)]
    size = path.stat().st_size
    if size != entry.bytes:
        return [
            Problem(version, "size", "size differs from the manifest", fname, str(entry.bytes), str(size))
        ]
    actual = cache.sha256(path)
    if actual != entry.sha256:
        return [Problem(version, "hash", "sha256 differs from the manifest", fname, entry.sha256, actual)]
    return []


def damaged_files(problems: Iterable[Problem]) -> list[str]:
    return sorted({p.file for p in problems if p.kind in REPAIRABLE and p.file})


# ---------------------------------------------------------------- a lineage against the registry


@dataclass
class VersionResult:
    version: str
    files: int
    status: str  # ok | corrupted | unverified | absent


@dataclass
class VerifyReport:
    lineage: int
    deep: bool
    versions: list[VersionResult] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    manifests_written: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(p.fatal for p in self.problems)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "lineage": self.lineage,
            "deep": self.deep,
            "versions": [asdict(v) for v in self.versions],
            "problems": [p.to_json() for p in self.problems],
            "manifests_written": self.manifests_written,
        }


def verify_lineage(
    lineage_dir: Path,
    rows: Sequence[VersionInfo],
    lineage_id: int,
    deep: bool = False,
    write_missing: bool = False,
) -> VerifyReport:
    """``rows``: the lineage's version rows from the registry. Quick: the current version and the
    ``current`` link. Deep: every version row and every version folder, each inode hashed once."""
    report = VerifyReport(lineage_id, deep)
    current = next((v for v in rows if v.current), None)
    report.problems += _link_problems(lineage_dir, current)
    if deep:
        report.problems += _unregistered(lineage_dir, rows)
    cache = HashCache()
    for row in rows if deep else [r for r in [current] if r is not None]:
        folder = lineage_dir / "versions" / Path(row.path).name
        if not folder.is_dir():
            report.versions.append(VersionResult(folder.name, 0, "absent"))
            report.problems.append(
                Problem(folder.name, "registry", f"registry version {row.number} has no folder {folder}")
            )
            continue
        if write_missing and _has_no_manifest(folder):
            write_manifest(folder)
            report.manifests_written.append(folder.name)
        found = check_version(folder, cache)
        report.problems += found
        status = "ok" if not found else "unverified" if all(not p.fatal for p in found) else "corrupted"
        report.versions.append(VersionResult(folder.name, len(version_files(folder)), status))
    return report


def _link_problems(lineage_dir: Path, current: VersionInfo | None) -> list[Problem]:
    if current is None:
        return []
    link, expected = lineage_dir / "current", Path(current.path).name
    actual = Path(os.readlink(link)).name if link.is_symlink() else None
    if actual == expected:
        return []
    return [
        Problem(
            "",
            "registry",
            f"{link} points at {actual or 'nothing'} but the registry's current version is {expected} "
            "(the daemon re-points it at its next start)",
            expected=expected,
            actual=actual,
        )
    ]


def _unregistered(lineage_dir: Path, rows: Sequence[VersionInfo]) -> list[Problem]:
    known = {Path(r.path).name for r in rows}
    root = lineage_dir / "versions"
    on_disk = (
        sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if root.is_dir()
        else []
    )
    return [
        Problem(
            name,
            "unregistered",
            "folder not in the registry (a crash before its commit; the daemon removes it)",
        )
        for name in on_disk
        if name not in known
    ]


def _has_no_manifest(folder: Path) -> bool:
    return not (folder / MANIFEST_NAME).exists()
