"""Registry commands of the ``fgsn`` CLI: ``db``, ``config show`` and the read-only queries.

Queries open the database directly and read-only (SQLite ``query_only`` over WAL, PostgreSQL
read-only transactions), so they answer while the daemon writes and while it is stopped.
Call :func:`register` on the main Typer app.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from fgsn_daemon.core.errors import ConfigError, FGSNError
from fgsn_daemon.service.registry import EventInfo, Registry, RegistrySnapshot, RevisionInfo
from fgsn_daemon.service.registry.db import (
    current_revision,
    head_revision,
    make_engine,
    sqlite_path,
    upgrade_to_head,
)
from fgsn_daemon.service.settings import (
    Settings,
    effective_config,
    load_settings,
    mask_database_url,
    render_config_toml,
)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="TOML configuration file (default: $FGSN_CONFIG, ./fgsn.toml)")
]
DatabaseOption = Annotated[
    str | None,
    typer.Option("--database-url", help="registry database URL (default: SQLite in the state dir)"),
]
StateDirOption = Annotated[Path | None, typer.Option("--state-dir", help="daemon state folder")]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
LineageOption = Annotated[
    int | None, typer.Option("--lineage", help="model lineage id (default: the one the daemon used last)")
]


def register(app: typer.Typer) -> None:
    """Add ``db upgrade|current``, ``config show``, ``status``, ``dimensions``, ``neurons``,
    ``history``, ``versions`` and ``verify`` to ``app``."""
    db_app = typer.Typer(no_args_is_help=True, help="Registry database schema.")
    config_app = typer.Typer(no_args_is_help=True, help="Effective configuration.")
    app.add_typer(db_app, name="db")
    app.add_typer(config_app, name="config")
    db_app.command("upgrade")(db_upgrade)
    db_app.command("current")(db_current)
    config_app.command("show")(config_show)
    app.command("status")(status)
    app.command("dimensions")(dimensions)
    app.command("neurons")(neurons)
    app.command("history")(history)
    app.command("versions")(versions)
    app.command("verify")(verify)


# ---------------------------------------------------------------- commands


def db_upgrade(
    config: ConfigOption = None, database_url: DatabaseOption = None, state_dir: StateDirOption = None
) -> None:
    """Create the registry schema or upgrade it to this version's head."""
    with _errors():
        settings = _settings(config, database_url, state_dir)
        url = settings.database_url_value()
        head = upgrade_to_head(url)
        typer.echo(f"{mask_database_url(url)}: at schema revision {head} (head)")


def db_current(
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    state_dir: StateDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show the database's schema revision and this code's head revision."""
    with _errors():
        settings = _settings(config, database_url, state_dir)
        url = settings.database_url_value()
        current = _current_revision_or_none(url)
        head = head_revision()
        state = "empty" if current is None else ("head" if current == head else "not at head")
        if as_json:
            _print_json(
                {
                    "database_url": mask_database_url(url),
                    "current": current,
                    "head": head,
                    "at_head": current == head,
                }
            )
            return
        typer.echo(f"{mask_database_url(url)}: {current or '(no schema)'} ({state}; code head {head})")


def config_show(
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    state_dir: StateDirOption = None,
    base: Annotated[Path | None, typer.Option(help="unaligned base model folder")] = None,
    aligned: Annotated[Path | None, typer.Option(help="safety-aligned model folder")] = None,
    finetuned: Annotated[Path | None, typer.Option(help="fine-tuned model folder")] = None,
    policy_dir: Annotated[Path | None, typer.Option(help="policy folder to watch")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", help="FGSN parameter as KEY=VALUE, e.g. q=3 (repeatable)")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Print the effective configuration (CLI > FGSN_* env > TOML > defaults), secrets masked."""
    with _errors():
        settings = load_settings(
            config,
            {
                "database_url": database_url,
                "state_dir": state_dir,
                "base": base,
                "aligned": aligned,
                "finetuned": finetuned,
                "policy_dir": policy_dir,
                "device": device,
                "params": parse_param_flags(param or []),
            },
        )
        if as_json:
            _print_json(effective_config(settings))
        else:
            typer.echo(render_config_toml(settings), nl=False)


def status(
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    state_dir: StateDirOption = None,
    lineage: LineageOption = None,
    as_json: JsonOption = False,
) -> None:
    """Schema revision, current version, dimensions, frozen neurons, active jobs, daemon heartbeat."""
    with _errors(), _reader(config, database_url, state_dir) as (registry, url):
        info = registry.status(lineage)
        revision = head_revision()  # Registry.open(read_only=True) refuses anything else
        if as_json:
            _print_json(
                {
                    "database_url": mask_database_url(url),
                    "schema_revision": revision,
                    **info.model_dump(mode="json"),
                }
            )
            return
        lines = [f"registry:        {mask_database_url(url)} (schema {revision})"]
        if info.heartbeat is None:
            lines.append("daemon:          never ran")
        else:
            age = (datetime.now(UTC) - info.heartbeat.heartbeat_at).total_seconds()
            lines.append(
                f"daemon:          pid {info.heartbeat.pid} on {info.heartbeat.hostname}, "
                f"last heartbeat {age:.0f}s ago"
            )
        if info.lineage is None:
            lines.append("lineage:         none yet (the daemon has not seen a model trio)")
        else:
            lin = info.lineage
            lines.append(
                f"lineage:         {lin.id} (base {lin.base_fingerprint[:12]}, aligned "
                f"{lin.aligned_fingerprint[:12]}, fine-tuned {lin.finetuned_fingerprint[:12]})"
            )
            current = info.current_version
            lines.append(
                "current version: " + ("none" if current is None else f"v{current.number} {current.path}")
            )
            by_status = ", ".join(f"{n} {s}" for s, n in sorted(info.dimensions_by_status.items())) or "none"
            lines.append(f"dimensions:      {by_status}")
            lines.append(f"frozen neurons:  {info.frozen_neurons}")
            jobs = (
                ", ".join(
                    f"#{j.id} {j.kind.value} {j.dimension or '-'} {j.state.value}" for j in info.active_jobs
                )
                or "none"
            )
            lines.append(f"active jobs:     {jobs}")
            if info.last_event is not None:
                ev = info.last_event
                lines.append(
                    f"last event:      {_time(ev.occurred_at)} {ev.kind} {ev.dimension or ''}".rstrip()
                )
        typer.echo("\n".join(lines))


def dimensions(
    name: Annotated[str | None, typer.Argument(help="show one dimension's revisions")] = None,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    state_dir: StateDirOption = None,
    lineage: LineageOption = None,
    as_json: JsonOption = False,
) -> None:
    """List dimensions with their latest revision, or one dimension's full revision history."""
    with _errors(), _reader(config, database_url, state_dir) as (registry, _url):
        lineage_id = _lineage(registry, lineage)
        if name is None:
            dims = [] if lineage_id is None else registry.dimensions(lineage_id)
            if as_json:
                _print_json([d.model_dump(mode="json") for d in dims])
                return
            rows = [[d.name, *(_revision_cells(d.latest) if d.latest else ["-"] * 7)] for d in dims]
            _print_table(
                ["DIMENSION", "REV", "STATUS", "SELECTED", "SKIPPED", "FROZEN", "UPDATED", "ERROR"], rows
            )
            return
        detail = None if lineage_id is None else registry.dimension(lineage_id, name)
        if detail is None:
            raise FGSNError(f"no dimension named {name!r} in the registry")
        if as_json:
            _print_json(detail.model_dump(mode="json"))
            return
        typer.echo(f"dimension {detail.name} (first seen {_time(detail.created_at)})")
        rows = [
            [
                *_revision_cells(r),
                r.content_fingerprint[:16],
                "-" if r.band is None else f"{r.band[0]}-{r.band[1]}",
            ]
            for r in detail.revisions
        ]
        _print_table(
            ["REV", "STATUS", "SELECTED", "SKIPPED", "FROZEN", "UPDATED", "ERROR", "FINGERPRINT", "BAND"],
            rows,
        )


def neurons(
    dimension: Annotated[str | None, typer.Option(help="only neurons frozen by this dimension")] = None,
    layer: Annotated[int | None, typer.Option(help="only this layer")] = None,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    state_dir: StateDirOption = None,
    lineage: LineageOption = None,
    as_json: JsonOption = False,
) -> None:
    """Frozen neurons (active claims): layer, space, index, owning dimension and, for entry units,
    how many of the neuron's entries the current edit restores (entries are owned one by one, so
    a neuron first claimed by one dimension may hold entries of later ones too)."""
    with _errors(), _reader(config, database_url, state_dir) as (registry, _url):
        lineage_id = _lineage(registry, lineage)
        claims = [] if lineage_id is None else registry.neurons(lineage_id, dimension=dimension, layer=layer)
        entries = (
            {}
            if lineage_id is None
            else _entry_counts(
                registry, claims, _settings(config, database_url, state_dir).state_dir, lineage_id
            )
        )
        if as_json:
            _print_json(
                [
                    {
                        **c.model_dump(mode="json"),
                        "entries": entries.get((c.layer, c.space, c.index)),
                    }
                    for c in claims
                ]
            )
            return
        _print_table(
            ["LAYER", "SPACE", "INDEX", "DIMENSION", "REV", "ENTRIES", "CLAIMED"],
            [
                [
                    str(c.layer),
                    c.space,
                    str(c.index),
                    c.dimension,
                    str(c.revision_number),
                    str(entries.get((c.layer, c.space, c.index), "all")),
                    _time(c.claimed_at),
                ]
                for c in claims
            ],
        )


def _entry_counts(
    registry: RegistrySnapshot, claims: list[Any], state_dir: Path, lineage_id: int
) -> dict[tuple[int, str, int], int]:
    """(layer, space, index) -> entries of that neuron the current edit restores: the union of the
    masks of every applied revision (with entry units: their mask files live in the state folder)."""
    from fgsn_daemon.engine.entry_masks import load_masks_and_units, per_neuron_counts, union
    from fgsn_daemon.service.registry.models import RevisionStatus

    folder = state_dir / f"lineage-{lineage_id}" / "entry-masks"
    parts, units = [], None
    applied = registry.revisions(lineage_id, status=RevisionStatus.APPLIED) if claims else []
    for rev_id in sorted(r.id for r in applied):
        digest = (registry.revision(rev_id).summary or {}).get("entry_masks")
        if digest:
            masks, units = load_masks_and_units(folder, digest)
            parts.append(masks)
    if not parts or units is None:
        return {}
    return {(n.layer, n.space, n.index): c for n, c in per_neuron_counts(union(parts), units).items()}


def history(
    limit: Annotated[int | None, typer.Option(help="only the newest N events")] = None,
    after: Annotated[int, typer.Option(help="only events after this id (for polling)")] = 0,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    state_dir: StateDirOption = None,
    lineage: LineageOption = None,
    as_json: JsonOption = False,
) -> None:
    """The append-only event history, oldest first (read and printed a page at a time, so any
    length of history fits in bounded memory)."""
    with _errors(), _reader(config, database_url, state_dir) as (registry, _url):
        if limit is not None:
            pages: Iterator[list[EventInfo]] = iter(
                [registry.events(lineage_id=lineage, after_id=after, limit=limit)]
            )
        else:
            pages = _event_pages(registry, lineage, after)
        if as_json:  # one JSON array, streamed
            first = True
            typer.echo("[", nl=False)
            for page in pages:
                for e in page:
                    item = json.dumps(e.model_dump(mode="json"), default=_json_default)
                    typer.echo(("\n" if first else ",\n") + "  " + item, nl=False)
                    first = False
            typer.echo("\n]" if not first else "]")
            return
        shown = False
        for page in pages:
            if page:
                _print_table(
                    ["ID", "TIME", "KIND", "DIMENSION", "DETAILS"],
                    [
                        [
                            str(e.id),
                            _time(e.occurred_at),
                            e.kind,
                            e.dimension or "-",
                            "" if e.details is None else json.dumps(e.details, sort_keys=True),
                        ]
                        for e in page
                    ],
                    header=not shown,
                )
                shown = True
        if not shown:
            typer.echo("(none)")


HISTORY_PAGE = 1000


def _event_pages(registry: Any, lineage: int | None, after: int) -> Iterator[list[EventInfo]]:
    while True:
        page = registry.events_page(lineage_id=lineage, after_id=after, size=HISTORY_PAGE)
        if not page:
            return
        yield page
        after = page[-1].id


def versions(
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    state_dir: StateDirOption = None,
    lineage: LineageOption = None,
    as_json: JsonOption = False,
) -> None:
    """Published checkpoint versions (current one marked with *), parents and contents."""
    with _errors(), _reader(config, database_url, state_dir) as (registry, _url):
        lineage_id = _lineage(registry, lineage)
        rows = [] if lineage_id is None else registry.versions(lineage_id)
        if as_json:
            _print_json([v.model_dump(mode="json") for v in rows])
            return
        _print_table(
            ["", "VERSION", "PARENT", "CREATED", "REVISIONS", "PATH"],
            [
                [
                    "*" if v.current else "",
                    f"v{v.number}",
                    "-" if v.parent_number is None else f"v{v.parent_number}",
                    _time(v.created_at),
                    ", ".join(v.revisions) or "-",
                    v.path,
                ]
                for v in rows
            ],
        )


def verify(
    deep: Annotated[
        bool, typer.Option("--deep", help="every version (shared files hashed once) and the registry")
    ] = False,
    write_missing: Annotated[
        bool,
        typer.Option(
            "--write-missing", help="record a manifest for versions that have none (trust on first use)"
        ),
    ] = False,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    state_dir: StateDirOption = None,
    lineage: LineageOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check checkpoint versions against their sha256 manifests and the registry: the current
    version (every file hashed), or with --deep every version. Exits 1 when a problem is found."""
    from fgsn_daemon.service.integrity import verify_lineage

    with _errors():
        settings = _settings(config, database_url, state_dir)
        with _reader(config, database_url, state_dir) as (registry, _url):
            lineage_id = _lineage(registry, lineage)
            rows = [] if lineage_id is None else registry.versions(lineage_id)
        if lineage_id is None:  # the snapshot is closed before hashing: no long read transaction
            raise FGSNError(f"no daemon has run on {settings.state_dir} yet: nothing to verify")
        folder = settings.state_dir / f"lineage-{lineage_id}"
        report = verify_lineage(folder, rows, lineage_id, deep=deep, write_missing=write_missing)
    if as_json:
        _print_json(report.to_json())
    else:
        scope = "every version" if deep else "current version"
        typer.echo(f"lineage {lineage_id}, {scope}:")
        for v in report.versions:
            typer.echo(f"  {v.version}  {v.status:<10}  {v.files} files")
        for name in report.manifests_written:
            typer.echo(f"  {name}: manifest written (trust on first use)")
        for p in report.problems:
            typer.echo(f"  {'PROBLEM' if p.fatal else 'note'}: {p}")
        fatal = sum(p.fatal for p in report.problems)
        typer.echo(f"verify: {'OK' if report.ok else f'{fatal} problem(s) found'}")
    if not report.ok:
        raise typer.Exit(code=1)


# ---------------------------------------------------------------- helpers


def parse_param_flags(items: Sequence[str]) -> dict[str, Any]:
    """``["q=3", "spaces=mlp,attn"]`` -> ``{"q": "3", "spaces": "mlp,attn"}`` (pydantic converts)."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param expects KEY=VALUE, got {item!r}")
        text = value.strip()
        # JSON for lists and null ("band=[10,15]"); everything else stays a string for pydantic.
        params[key.strip()] = json.loads(text) if text.startswith("[") or text == "null" else text
    return params


def _current_revision_or_none(url: str) -> str | None:
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        return None  # report "no schema" without creating the file
    engine = make_engine(url, read_only=True)
    try:
        return current_revision(engine)
    finally:
        engine.dispose()


def _settings(config: Path | None, database_url: str | None, state_dir: Path | None) -> Settings:
    return load_settings(config, {"database_url": database_url, "state_dir": state_dir})


@contextmanager
def _reader(
    config: Path | None, database_url: str | None, state_dir: Path | None
) -> Iterator[tuple[RegistrySnapshot, str]]:
    """A read-only connection, and one consistent snapshot for all of a command's queries."""
    url = _settings(config, database_url, state_dir).database_url_value()
    with Registry.open(url, read_only=True) as registry, registry.snapshot() as view:
        yield view, url


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except FGSNError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None


def _lineage(registry: RegistrySnapshot, lineage: int | None) -> int | None:
    if lineage is None:
        return registry.default_lineage_id()
    if lineage not in {info.id for info in registry.lineages()}:
        raise FGSNError(f"no model lineage with id {lineage}")
    return lineage


def _revision_cells(rev: RevisionInfo) -> list[str]:
    error = "" if rev.error is None else rev.error.splitlines()[0][:60]
    return [
        str(rev.number),
        rev.status.value,
        str(rev.selected),
        str(rev.skipped),
        str(rev.active_claims),
        _time(rev.updated_at),
        error,
    ]


def _time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _print_json(data: object) -> None:
    typer.echo(json.dumps(data, indent=2, default=_json_default))


def _json_default(value: object) -> object:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], header: bool = True) -> None:
    if not rows:
        typer.echo("(none)")
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for line in [list(headers), *rows] if header else rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
