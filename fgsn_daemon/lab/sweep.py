"""FGSN settings sweep: one localisation pass, many (scoring, q, band, spaces, operator) rows.

``experiments main`` compares operators and scorings at one setting; choosing the default also
needs the budget (q), the neuron spaces and the band. Statistics for every layer and both spaces
come from one forward pass over the benign and harmful training prompts; each setting then only
filters, selects, writes one checkpoint and evaluates it on the same held-out sets as the main
table. Random neurons at each setting's per-(layer, space) counts give its margin.

    python -m fgsn_daemon.lab.sweep --trio-root DIR|--tiny --out DIR --qs 5,20 --bands auto,all \\
        --spaces-grid mlp,mlp+attn --scorings wanda,contrast --operators restore
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fgsn_daemon.core import defaults
from fgsn_daemon.core.errors import ConfigError, FGSNError
from fgsn_daemon.core.records import Band
from fgsn_daemon.engine.localisation import group_by_layer_space, select_neurons
from fgsn_daemon.engine.pipeline import FGSNParams, resolve_device
from fgsn_daemon.engine.scorings import NeuronScores
from fgsn_daemon.lab import baselines
from fgsn_daemon.lab.experiments import (
    HarnessConfig,
    Row,
    average_rows,
    baseline_edit,
    edited_row,
    environment,
    neuron_edit,
    open_lineage,
    pct,
    reference_row,
    release_model,
    root_spec,
    trio_manifest,
)

LOG = logging.getLogger("fgsn.sweep")
PROG = "python -m fgsn_daemon.lab.sweep"


@dataclass(frozen=True)
class Setting:
    scoring: str
    q: float
    band: str  # "auto", "all" or "START:END"
    spaces: tuple[str, ...]
    operator: str

    @property
    def name(self) -> str:
        return f"fgsn/{self.scoring}/{self.operator}/q{self.q:g}/{'+'.join(self.spaces)}/band-{self.band}"


def resolve_band(text: str, auto: Band, num_layers: int) -> Band:
    if text == "auto":
        return auto
    if text == "all":
        return Band(start=0, end=num_layers - 1, source="override")
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"band {text!r}: expected auto, all or START:END") from None
    if not 0 <= start <= end < num_layers:
        raise ConfigError(f"band {text!r} is outside the model's {num_layers} layers")
    return Band(start=start, end=end, source="override")


def restrict(
    scores: Mapping[tuple[int, str], NeuronScores], band: Band, spaces: Sequence[str]
) -> dict[tuple[int, str], NeuronScores]:
    """The (layer, space) score tables a setting may select from."""
    layers = set(band.layers)
    return {k: v for k, v in scores.items() if k[0] in layers and k[1] in spaces}


def parse_list(text: str, kind: type = str) -> list[Any]:
    return [kind(x) for x in text.split(",") if x]


def run_sweep(
    spec: Any,
    cfg: HarnessConfig,
    settings: Sequence[Setting],
    random_seeds: Sequence[int],
    command: str,
) -> dict[str, Any]:
    t_start = time.perf_counter()
    spaces = tuple(dict.fromkeys(s for st in settings for s in st.spaces))
    # collect every space the grid needs; the band is chosen automatically as in the daemon
    params = replace(cfg.params, spaces=spaces, band=None)
    cfg = replace(cfg, params=params)
    with open_lineage(spec, cfg) as run:  # statistics of every layer ride on the band's pass
        ctx, trio, loc, harmful = run.ctx, run.trio, run.loc, run.harmful
        assert loc.band is not None and loc.curve is not None
        auto = loc.band
        loc.band = Band(start=0, end=trio.num_layers - 1, source="override")
        scoring_names = sorted({st.scoring for st in settings})
        scores = {s: loc.score(harmful, scoring_name=s) for s in scoring_names}
        loc.band = auto
        release_model(loc)
        device = resolve_device(cfg.device)
        rows: list[Row] = [reference_row(ctx, n, getattr(spec, n)) for n in ("aligned", "finetuned")]
        randoms: dict[str, Row] = {}
        for st in settings:
            band = resolve_band(st.band, auto, trio.num_layers)
            sel = select_neurons(restrict(scores[st.scoring], band, st.spaces), st.q, params.p)
            neurons = group_by_layer_space(sel.selected)
            edit_params = replace(params, spaces=st.spaces)
            row = edited_row(
                ctx, st.name, "fgsn", neuron_edit(trio, neurons, st.operator, band, edit_params, device)
            )
            row.details["setting"] = asdict(st)
            row.details["band"] = band.model_dump()
            rows.append(row)
            # random neurons at the same per-(layer, space) counts, band and operator
            counts_key = json.dumps({f"{k[0]}:{k[1]}": len(v) for k, v in sorted(neurons.items())})
            key = f"{counts_key}|{st.operator}"
            if key not in randoms and random_seeds:
                seeds = [
                    edited_row(
                        ctx,
                        f"random/{st.name}/seed{seed}",
                        "baseline",
                        baseline_edit(
                            functools.partial(
                                baselines.random_neurons,
                                trio,
                                selection=neurons,
                                band=band,
                                operator=st.operator,
                                seed=seed,
                                rank=params.rank,
                            )
                        ),
                    )
                    for seed in random_seeds
                ]
                randoms[key] = average_rows(f"random/{st.name}", "baseline", seeds)
                rows.append(randoms[key])
            row.details["random_row"] = randoms[key].name if key in randoms else None
    return {
        "kind": "sweep",
        "command": command,
        "trio": {k: str(v) for k, v in asdict(spec).items()},
        "trio_manifest": trio_manifest(spec),
        "config": {
            **asdict(cfg.params),
            "max_prompts": cfg.max_prompts,
            "max_new_tokens": cfg.max_new_tokens,
        },
        "environment": environment(),
        "auto_band": auto.model_dump(),
        "curve": loc.curve.model_dump(),
        "rows": [asdict(r) for r in rows],
        "seconds": round(time.perf_counter() - t_start, 1),
    }


def sweep_markdown(result: Mapping[str, Any]) -> str:
    rows = {r["name"]: r for r in result["rows"]}
    band = result["auto_band"]
    lines = [
        f"Command: `{result['command']}`",
        "",
        f"Automatic band: layers {band['start']}–{band['end']}. Held-out prompts: "
        f"{result['config']['max_prompts']} per set, {result['config']['max_new_tokens']} new tokens.",
        "",
        "| row | mean ASR % | over-refusal % | utility % | % params modified | random neurons: mean ASR % |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r["group"] == "baseline":
            continue
        m = r["metrics"]
        rnd = rows.get(r["details"].get("random_row") or "")
        lines.append(
            f"| {r['name']} | {pct(m['mean_asr'])} | {pct(m['over_refusal'])} | {pct(m['utility'])} | "
            f"{'–' if r['modified_share'] is None else pct(r['modified_share'], 3)} | "
            f"{pct(rnd['metrics']['mean_asr']) if rnd else '–'} |"
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=(__doc__ or "").split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--trio-root", type=Path, help="lab trio folder (organism or SmolLM2 layout)")
    src.add_argument("--tiny", type=int, nargs="?", const=0, metavar="SEED", help="the cached tiny organism")
    ap.add_argument("--out", type=Path, required=True)
    activation = defaults.preset("activation")  # the activation scorings' per-layer sweep
    ap.add_argument("--scorings", default=activation["scoring"])
    ap.add_argument("--operators", default=activation["operator"])
    ap.add_argument("--qs", default=f"{activation['q']:g}")
    ap.add_argument("--p", type=float, default=activation["p"])
    ap.add_argument("--bands", default="auto", help="comma list of auto | all | START:END")
    ap.add_argument("--spaces-grid", default="mlp", help="comma list of '+'-joined spaces, e.g. mlp,mlp+attn")
    ap.add_argument("--random-seeds", default="0")
    ap.add_argument("--max-prompts", type=int, default=20)
    ap.add_argument("--max-train-prompts", type=int, default=64)
    ap.add_argument("--max-benign-train", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = [
        Setting(scoring=s, q=q, band=b, spaces=tuple(sp.split("+")), operator=o)
        for s, q, b, sp, o in itertools.product(
            parse_list(args.scorings),
            parse_list(args.qs, float),
            parse_list(args.bands),
            parse_list(args.spaces_grid),
            parse_list(args.operators),
        )
    ]
    params = FGSNParams(**{**defaults.preset("activation"), "p": args.p}, batch_size=args.batch_size)
    cfg = HarnessConfig(
        params=params,
        max_prompts=args.max_prompts,
        max_train_prompts=args.max_train_prompts,
        max_benign_train=args.max_benign_train,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        device=args.device,
    )
    try:
        for st in settings:
            replace(params, scoring=st.scoring, operator=st.operator, q=st.q, spaces=st.spaces).validate()
            if st.band not in ("auto", "all"):
                resolve_band(st.band, Band(start=0, end=0, source="auto"), 10**6)
        spec = root_spec(args.tiny, args.trio_root)
        assert spec is not None  # the parser requires --trio-root or --tiny
        result = run_sweep(
            spec, cfg, settings, parse_list(args.random_seeds, int), f"{PROG} {shlex.join(argv)}"
        )
    except FGSNError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    text = sweep_markdown(result)
    (args.out / "sweep.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
