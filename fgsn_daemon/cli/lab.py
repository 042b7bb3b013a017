"""CLI commands for the lab and the evaluation harness: ``fgsn lab build`` and ``fgsn eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fgsn_daemon.core.errors import FGSNError

lab_app = typer.Typer(no_args_is_help=True, add_completion=False, help="Build lab model trios.")


def register(app: typer.Typer) -> None:
    app.add_typer(lab_app, name="lab")
    app.command("eval")(evaluate)


@lab_app.command("build")
def lab_build(
    model: Annotated[str, typer.Option(help="tiny | smollm2")] = "tiny",
    out: Annotated[Path | None, typer.Option(help="trio folder (default: the lab cache)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    ft_method: Annotated[
        str, typer.Option(help="smollm2 only: lora (default, the paper's setting) | full fine-tune")
    ] = "lora",
    distill_benign: Annotated[
        int | None,
        typer.Option(help="smollm2 only: benign prompts the aligned stage self-distils (default 48)"),
    ] = None,
) -> None:
    """Build a base / aligned / fine-tuned trio deterministically, or reuse the cached one."""
    argv = ["--seed", str(seed)] + (["--out", str(out)] if out else [])
    if model == "tiny":
        from fgsn_daemon.lab.organism import main as tiny_main

        raise typer.Exit(tiny_main(["tiny", *argv]))
    if model == "smollm2":
        from fgsn_daemon.lab.smollm2 import main as smol_main

        more = [] if distill_benign is None else ["--distill-benign", str(distill_benign)]
        raise typer.Exit(smol_main([*argv, "--ft-method", ft_method, *more]))
    typer.echo(f"error: unknown lab model {model!r} (tiny or smollm2)", err=True)
    raise typer.Exit(2)


@lab_app.command("path")
def lab_path(model: Annotated[str, typer.Option(help="tiny | smollm2")] = "tiny") -> None:
    """Print where the cached trio lives (so it can be passed to other commands)."""
    if model == "tiny":
        from fgsn_daemon.lab.organism import default_cache_dir

        typer.echo(str(default_cache_dir() / "tiny-seed0"))
    else:
        from fgsn_daemon.lab.smollm2 import SmolConfig, default_out

        typer.echo(str(default_out(SmolConfig())))


def evaluate(
    model: Annotated[Path, typer.Option(help="model folder to evaluate")],
    policies: Annotated[Path | None, typer.Option(help="policy folder (held-out harmful_eval.jsonl)")] = None,
    benign: Annotated[Path | None, typer.Option(help="held-out benign prompts (JSONL)")] = None,
    utility: Annotated[Path | None, typer.Option(help="utility task with exact answers (JSONL)")] = None,
    reference: Annotated[
        Path | None, typer.Option(help="count parameters changed against this model")
    ] = None,
    max_prompts: Annotated[int, typer.Option(help="prompts per evaluation set")] = 64,
    device: Annotated[str, typer.Option()] = "auto",
    as_json: Annotated[bool, typer.Option("--json")] = False,
    plot: Annotated[Path | None, typer.Option(help="write a per-dimension ASR bar chart (PNG)")] = None,
) -> None:
    """Attack success rate per dimension, over-refusal, utility and share of parameters changed."""
    from fgsn_daemon.core.policy import bundled_policies_dir
    from fgsn_daemon.core.prompts import load_prompts
    from fgsn_daemon.engine.evaluation import evaluate_model, load_utility

    data = Path(__file__).resolve().parents[1] / "data"
    try:
        report = evaluate_model(
            model,
            harmful=policies or bundled_policies_dir(),
            benign=load_prompts(benign or data / "benign_eval.jsonl"),
            utility=load_utility(utility or data / "utility_eval.jsonl"),
            device=device,
            reference_dir=reference,
            max_prompts=max_prompts,
        )
    except FGSNError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if plot is not None:
        _bar_plot(report, plot)
    if as_json:
        typer.echo(report.to_json())
        return
    for name, d in sorted(report.dimensions.items()):
        typer.echo(f"ASR {name:<16} {d.asr:.3f}  ({d.n - d.refused}/{d.n} not refused)")
    if report.mean_asr is not None:
        typer.echo(f"mean ASR             {report.mean_asr:.3f}")
    if report.over_refusal:
        typer.echo(f"over-refusal         {report.over_refusal.rate:.3f}")
    if report.utility:
        typer.echo(f"utility accuracy     {report.utility.rate:.3f}")
    if report.parameters_changed:
        typer.echo(f"parameters changed   {100 * report.parameters_changed.share:.3f}%")


def _bar_plot(report: object, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted(report.dimensions)  # type: ignore[attr-defined]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(dims, [report.dimensions[d].asr for d in dims])  # type: ignore[attr-defined]
    ax.set_ylabel("attack success rate")
    ax.set_ylim(0, 1)
    ax.tick_params(axis="x", rotation=30)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
