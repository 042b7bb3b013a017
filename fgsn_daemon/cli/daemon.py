"""CLI commands that drive the daemon: ``run`` and ``rollback``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fgsn_daemon.cli.registry import ConfigOption, DatabaseOption, StateDirOption
from fgsn_daemon.core.errors import FGSNError
from fgsn_daemon.service.settings import Settings, load_settings

LOG = logging.getLogger("fgsn")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for journald and log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(json_logs: bool | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    use_json = (not sys.stderr.isatty()) if json_logs is None else json_logs
    handler.setFormatter(
        JsonFormatter() if use_json else logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _settings(
    config: Path | None, database_url: str | None, state_dir: Path | None, **extra: Any
) -> Settings:
    return load_settings(config, {"database_url": database_url, "state_dir": state_dir, **extra})


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("rollback")(rollback)
    app.command("demo")(demo)


def demo(
    model: Annotated[
        str, typer.Option(help="lab trio: tiny (built in minutes) or smollm2 (real 135M model)")
    ] = "tiny",
    out: Annotated[Path, typer.Option(help="output folder: state, report.html, report.json")] = Path(
        "fgsn-demo"
    ),
    max_prompts: Annotated[int, typer.Option(help="held-out prompts per evaluation set")] = 32,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Build (or reuse) a lab trio, run the daemon once over its policies, evaluate before and after."""
    from fgsn_daemon.lab.demo import run_demo
    from fgsn_daemon.lab.report import format_table

    setup_logging(False)
    try:
        report = run_demo(
            out,
            model=model,
            max_prompts=max_prompts,
            device=device,
            progress=lambda m: typer.echo(f"... {m}", err=True),
        )
    except FGSNError as exc:
        _fail(str(exc))
        return
    typer.echo(format_table(report))
    typer.echo(f"\nreport: {out / 'report.html'} ({report.seconds:.0f} s)")


def run(
    once: Annotated[bool, typer.Option("--once", help="scan, process what is pending, then exit")] = False,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    state_dir: StateDirOption = None,
    base: Annotated[Path | None, typer.Option(help="unaligned base model folder")] = None,
    aligned: Annotated[Path | None, typer.Option(help="aligned model folder")] = None,
    finetuned: Annotated[Path | None, typer.Option(help="fine-tuned model or LoRA adapter folder")] = None,
    policy_dir: Annotated[Path | None, typer.Option(help="policy folder to watch")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    settle_s: Annotated[
        float | None, typer.Option(help="seconds a dimension folder must stay unchanged")
    ] = None,
    scan_interval_s: Annotated[float | None, typer.Option(help="seconds between scans")] = None,
    json_logs: Annotated[
        bool | None, typer.Option("--json-logs/--text-logs", help="default: JSON off a TTY")
    ] = None,
) -> None:
    """Run the daemon: watch the policy folder and apply new dimensions continually."""
    from fgsn_daemon.service.daemon import Daemon
    from fgsn_daemon.service.registry import is_unavailable

    setup_logging(json_logs)
    try:
        settings = _settings(
            config,
            database_url,
            state_dir,
            base=base,
            aligned=aligned,
            finetuned=finetuned,
            policy_dir=policy_dir,
            device=device,
            settle_s=settle_s,
            scan_interval_s=scan_interval_s,
        )
        daemon = Daemon(settings)
        daemon.install_signal_handlers()
        try:
            daemon.start()
            LOG.info("daemon ready (pid lock held on %s)", settings.state_dir)
            if once:
                daemon.run_once()
                if daemon.registry_unreachable:
                    _fail("the registry became unreachable; pending jobs resume at the next run")
            else:
                daemon.run_forever()
        finally:
            daemon.close()
    except FGSNError as exc:
        LOG.error(str(exc))
        _fail(str(exc))
    except Exception as exc:
        if not is_unavailable(exc):
            raise
        message = f"the registry is unreachable at start-up: {str(exc).strip().splitlines()[0]}"
        LOG.error(message)
        _fail(message)


def rollback(
    dimension: Annotated[str, typer.Argument(help="dimension name")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="show what would change, change nothing")
    ] = False,
    wait: Annotated[float, typer.Option(help="seconds to wait for a running daemon to finish it")] = 600.0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Roll a dimension back "as if never applied": its neurons return to their fine-tuned values and
    later dimensions take over the neurons they had skipped because it owned them."""
    from fgsn_daemon.service import rollback as rollbacks
    from fgsn_daemon.service.daemon import Daemon, DaemonLockedError

    setup_logging(False)
    try:
        settings = _settings(config, database_url, state_dir)
        daemon = Daemon(settings)
        try:
            rollbacks.attach_default_lineage(daemon)
            if dry_run:
                plan = rollbacks.plan(daemon, dimension)
                typer.echo(
                    plan.model_dump_json(indent=2)
                    if as_json
                    else (
                        f"would roll back {dimension} (revision {plan.revision}): {plan.released} neurons "
                        "return to their fine-tuned values; taken over by later dimensions: "
                        f"{plan.taken_over_by or 'none'}; {plan.frozen_after} neurons frozen afterwards"
                    )
                )
                return
            try:
                daemon.acquire_lock()
            except DaemonLockedError:
                job = rollbacks.queue(daemon, dimension)
                typer.echo(f"rollback of {dimension} queued as job {job}; waiting for the running daemon")
                rollbacks.wait_for(daemon, dimension, job, wait)
                typer.echo(f"rolled back {dimension}")
                return
            done = rollbacks.run_here(daemon, dimension)
            typer.echo(f"rolled back {dimension}; current version {done.current_version or '?'}")
        finally:
            daemon.close()
    except FGSNError as exc:
        _fail(str(exc))
