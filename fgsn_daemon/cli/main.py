"""The ``fgsn`` command line."""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from fgsn_daemon.core import defaults
from fgsn_daemon.core.errors import ConfigError, FGSNError
from fgsn_daemon.core.params import off_as_none
from fgsn_daemon.core.records import parse_band

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Fine-grained safety neuron projection.")
LOG = logging.getLogger("fgsn")


def _register_subcommands() -> None:
    from fgsn_daemon.cli.registry import register as register_registry_commands

    register_registry_commands(app)
    from fgsn_daemon.cli.daemon import register as register_daemon_commands

    register_daemon_commands(app)
    from fgsn_daemon.cli.lab import register as register_lab_commands

    register_lab_commands(app)


@app.callback()
def _root() -> None:
    """fgsn: find, project and track fine-grained safety neurons."""


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


@app.command()
def apply(
    base: Annotated[Path, typer.Option(help="unaligned base model folder")],
    aligned: Annotated[Path, typer.Option(help="safety-aligned model folder")],
    finetuned: Annotated[Path, typer.Option(help="fine-tuned model folder, or a PEFT LoRA adapter folder")],
    harmful: Annotated[Path, typer.Option(help="harmful prompts (JSONL, one {'prompt': ...} per line)")],
    benign: Annotated[Path, typer.Option(help="benign / general-task prompts (JSONL)")],
    out: Annotated[Path, typer.Option(help="output folder (must not exist or be empty)")],
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="benign prompts (JSONL) the over-refusal hard rounds (entry units) look for refusals "
            "in, at most --calibration-max of them, evenly spread (default: --benign; best phrased "
            "unlike them)"
        ),
    ] = None,
    calibration_max: Annotated[
        int | None,
        typer.Option(help="hard rounds: at most this many calibration prompts answered per round (200)"),
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    device_map: Annotated[
        str,
        typer.Option(help="spread models over devices: none | auto | balanced | sequential (accelerate)"),
    ] = "none",
    compute_dtype: Annotated[
        str, typer.Option(help="scoring models' dtype: float32 | bfloat16 | float16")
    ] = "float32",
    offload_dir: Annotated[
        Path | None, typer.Option(help="where a device map offloads weights that fit nowhere")
    ] = None,
    preset: Annotated[
        str, typer.Option(help=f"named setting: {' | '.join(defaults.PRESETS)} (options below override it)")
    ] = defaults.DEFAULT_PRESET,
    scoring: Annotated[
        str | None, typer.Option(help="unit score, by name (fgsn_daemon/engine/scorings/): attribution, ...")
    ] = None,
    positions: Annotated[str, typer.Option(help="token positions for statistics: all | last")] = "all",
    operator: Annotated[
        str | None, typer.Option(help="by name (fgsn_daemon/engine/operators/): restore, safe_lora, ...")
    ] = None,
    q: Annotated[float | None, typer.Option(help="top-q %% by harmful score (per-layer allocation)")] = None,
    p: Annotated[float | None, typer.Option(help="minus top-p %% by benign score")] = None,
    spaces: Annotated[str | None, typer.Option(help="comma-separated neuron spaces: mlp, attn")] = None,
    band: Annotated[str | None, typer.Option(help="override the safety band, e.g. 10:15")] = None,
    score_model: Annotated[
        str, typer.Option(help="whose activations to score: aligned | finetuned")
    ] = "aligned",
    rank: Annotated[int, typer.Option(help="subspace rank for the projector operator")] = 8,
    batch_size: Annotated[int, typer.Option()] = 16,
    max_length: Annotated[int, typer.Option()] = 256,
    max_shard_mb: Annotated[int, typer.Option(help="output shard size limit in MiB")] = 2048,
    allocation: Annotated[
        str | None, typer.Option(help="attribution: per_layer (q %% per band layer) | global (--budget)")
    ] = None,
    budget: Annotated[
        float | None, typer.Option(help="attribution: %% of all parameters (global, entry)")
    ] = None,
    unit: Annotated[str | None, typer.Option(help="attribution: neuron | entry (single weights)")] = None,
    scope: Annotated[str | None, typer.Option(help="attribution: layers that compete: all | band")] = None,
    guard: Annotated[
        float | None,
        typer.Option(help="over-refusal guard: max rise in points of refusal on the --benign prompts"),
    ] = None,
    contrast_kind: Annotated[
        str | None, typer.Option(help="what the contrast penalises: refusal | odds (refusal vs answer)")
    ] = None,
    hard_rounds: Annotated[
        int | None,
        typer.Option(help="entries: over-refusal hard-negative rounds on --calibration (or --benign)"),
    ] = None,
    hard_weight: Annotated[
        float | None,
        typer.Option(help="weight of the hard-negative penalty; with --hard-target, where its search starts"),
    ] = None,
    hard_positive_weight: Annotated[
        float | None,
        typer.Option(help="in the hard-negative rounds: weight of the harmful prompts still answered"),
    ] = None,
    hard_at: Annotated[
        str | None,
        typer.Option(help="hard rounds' gradients: finetuned (as the scores) | edited (the round's edit)"),
    ] = None,
    hard_target: Annotated[
        str | None,
        typer.Option(
            help="search the hard weight per round: at most this many points of calibration refusal "
            "above the fine-tuned model's; 'off' keeps the fixed --hard-weight"
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="attribution entries: iterative selection in this many steps")
    ] = None,
    path_steps: Annotated[
        int | None,
        typer.Option(help="attribution: gradients averaged at this many points along the revert"),
    ] = None,
    contrast: Annotated[
        float | None,
        typer.Option(help="attribution: weight of the benign-refusal effect subtracted from the gain"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the full result record as JSON")] = False,
) -> None:
    """Find one dimension's safety neurons, project them, and write a loadable checkpoint."""
    import torch

    from fgsn_daemon.core.prompts import load_prompts
    from fgsn_daemon.engine.activations import Placement
    from fgsn_daemon.engine.pipeline import FGSNParams, apply_dimension

    try:
        maps = ("none", "auto", "balanced", "balanced_low_0", "sequential")
        if device_map not in maps:
            raise ConfigError(f"--device-map must be one of {', '.join(maps)} (got {device_map!r})")
        if compute_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"--compute-dtype must be float32, bfloat16 or float16 (got {compute_dtype!r})")
        scratch = None
        if device_map != "none" and offload_dir is None:  # offloaded weights: removed when done
            scratch = tempfile.TemporaryDirectory(prefix="fgsn-offload-")
            offload_dir = Path(scratch.name)
        placement = None if device_map == "none" else Placement(device_map, None, offload_dir)
        given: dict[str, Any] = {
            "scoring": scoring,
            "operator": operator,
            "q": q,
            "p": p,
            "spaces": None if spaces is None else tuple(s.strip() for s in spaces.split(",") if s.strip()),
            "allocation": allocation,
            "budget": budget,
            "unit": unit,
            "scope": scope,
            "guard": guard,
            "contrast": contrast,
            "steps": steps,
            "path_steps": path_steps,
            "hard_rounds": hard_rounds,
            "hard_weight": hard_weight,
            "hard_positive_weight": hard_positive_weight,
            "hard_at": hard_at,
            "contrast_kind": contrast_kind,
            "calibration_max": calibration_max,
        }
        chosen = {k: v for k, v in given.items() if v is not None}
        if hard_target is not None:  # "off" is an explicit None: the fixed hard weight
            target = off_as_none(hard_target)
            try:
                chosen["hard_target"] = None if target is None else float(hard_target)
            except ValueError:
                raise ConfigError(
                    f"--hard-target must be a number of points or 'off' (got {hard_target!r})"
                ) from None
        if chosen.get("operator", "restore") != "restore" and "unit" not in chosen:
            chosen["unit"] = "neuron"  # entry units are restored; another operator means neurons
        params = FGSNParams(
            **{**defaults.preset(preset), **chosen},
            positions=positions,
            score_model=score_model,
            rank=rank,
            band=parse_band(band),
            batch_size=batch_size,
            max_length=max_length,
        )
        params.validate()
        hard = params.unit == "entry" and params.hard_rounds >= 1
        for flag, value in (("--calibration", calibration), ("--calibration-max", calibration_max)):
            if value is not None and not hard:
                raise ConfigError(
                    f"{flag} shapes the set the over-refusal hard rounds look for refusals in: it needs "
                    f"entry units and --hard-rounds >= 1 (got unit {params.unit!r}, "
                    f"{params.hard_rounds} rounds)"
                )
        harmful_prompts = load_prompts(harmful)
        benign_prompts = load_prompts(benign)
        calibration_prompts = load_prompts(calibration) if calibration is not None else None
        result = apply_dimension(
            base,
            aligned,
            finetuned,
            harmful_prompts,
            benign_prompts,
            out,
            params=params,
            device=device,
            placement=placement,
            dtype=getattr(torch, compute_dtype),
            max_shard_bytes=max_shard_mb * 1024 * 1024,
            progress=None if as_json else lambda msg: typer.echo(f"... {msg}", err=True),
            calibration_prompts=calibration_prompts,
        )
        if scratch is not None:
            scratch.cleanup()
    except FGSNError as exc:
        _fail(str(exc))
        return
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
        return
    m = result.modification
    typer.echo(f"band: layers {result.band.start}-{result.band.end} ({result.band.source})")
    for c in result.layer_counts:
        typer.echo(
            f"  layer {c.layer:>3} {c.space:<4} candidates {c.candidates:>5} skipped {c.skipped:>5} "
            f"selected {c.selected:>5} of {c.total}"
        )
    typer.echo(
        f"selected {len(result.selected)} neurons; modified {m.modified_parameters} of {m.total_parameters} "
        f"parameters ({100 * m.ratio:.3f}% of {m.denominator}; {100 * m.band_ratio:.2f}% of the band)"
    )
    typer.echo(f"wrote {result.output}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its per-connection chatter is noise here
    try:
        app()
    except FGSNError as exc:  # errors raised outside a command body
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


_register_subcommands()

if __name__ == "__main__":
    main()
