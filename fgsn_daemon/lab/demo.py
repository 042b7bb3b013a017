"""``fgsn demo``: the main job on the bundled default, end to end.

1. build (or reuse from the cache) a lab trio: base / aligned / fine-tuned;
2. evaluate the aligned and the fine-tuned model on the held-out sets;
3. run the daemon once over the policy folder: every dimension is applied continually, one
   published version per dimension;
4. evaluate every published version (so the continual matrix comes for free);
5. print the table and write ``report.html`` (plots embedded) and ``report.json``.

Evaluations are cached by (model folder fingerprint, evaluation settings), so a warm run only
re-checks what changed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fgsn_daemon.core.policy import bundled_policies_dir
from fgsn_daemon.core.prompts import load_prompts
from fgsn_daemon.engine.evaluation import EvalReport, evaluate_model, load_utility
from fgsn_daemon.lab.report import DemoReport, DemoRow, write_html_report
from fgsn_daemon.service.daemon import Daemon, folder_fingerprint
from fgsn_daemon.service.registry import Registry
from fgsn_daemon.service.settings import FGSNParams as SettingsParams
from fgsn_daemon.service.settings import Settings


@dataclass(frozen=True)
class DemoInputs:
    base: Path
    aligned: Path
    finetuned: Path
    policies: Path
    benign: Path | None  # localisation benign prompts (None = bundled)
    benign_eval: Path
    utility_eval: Path


# Per-model overrides of the default setting: the tiny organism's 1.3 M parameters need a larger
# share than a real model for the same repair, and its aligned model never refuses a benign prompt,
# so there is no over-refusal for the refusal contrast to avoid (README "Efficacy", tiny LoRA organism).
DEMO_PARAMS: dict[str, dict[str, Any]] = {"tiny": {"budget": 5.0, "contrast": 0.0}, "smollm2": {}}


def lab_inputs(model: str, progress: Callable[[str], None]) -> DemoInputs:
    data = Path(__file__).resolve().parents[1] / "data"
    if model == "tiny":
        from fgsn_daemon.lab.organism import tiny_trio

        progress("building or reusing the tiny lab trio (LoRA variant)")
        t = tiny_trio(variant="lora")
        return DemoInputs(t.base, t.aligned, t.finetuned, t.policies, t.benign, t.benign_eval, t.utility_eval)
    if model == "smollm2":
        from fgsn_daemon.lab.smollm2 import SmolConfig, build_smollm2_trio, default_out

        progress("building or reusing the SmolLM2-135M lab trio")
        smol = build_smollm2_trio(default_out(SmolConfig()), SmolConfig())
        return DemoInputs(
            smol.base,
            smol.aligned,
            smol.finetuned,
            bundled_policies_dir(),
            None,
            data / "benign_eval.jsonl",
            data / "utility_eval.jsonl",
        )
    raise ValueError(f"unknown demo model {model!r} (tiny or smollm2)")


def cached_eval(
    cache_dir: Path, model_dir: Path, inputs: DemoInputs, max_prompts: int, device: str
) -> EvalReport:
    key_src = json.dumps(
        [
            folder_fingerprint(model_dir),
            str(inputs.policies),
            max_prompts,
            folder_fingerprint(inputs.finetuned),
        ]
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    cached = cache_dir / f"eval-{key}.json"
    if cached.exists():
        return EvalReport.model_validate_json(cached.read_text())
    report = evaluate_model(
        model_dir,
        harmful=inputs.policies,
        benign=load_prompts(inputs.benign_eval),
        utility=load_utility(inputs.utility_eval),
        device=device,
        reference_dir=inputs.finetuned,
        max_prompts=max_prompts,
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached.write_text(report.to_json())
    return report


def run_demo(
    out: Path,
    model: str = "tiny",
    max_prompts: int = 32,
    device: str = "auto",
    progress: Callable[[str], None] = print,
    inputs: DemoInputs | None = None,
    params: SettingsParams | None = None,
) -> DemoReport:
    start = time.perf_counter()
    inputs = inputs or lab_inputs(model, progress)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "eval-cache"
    settings = Settings(
        base=inputs.base,
        aligned=inputs.aligned,
        finetuned=inputs.finetuned,
        policy_dir=inputs.policies,
        state_dir=out / "state",
        benign=inputs.benign,
        device=device,
        settle_s=0.0,
        params=params or SettingsParams(**DEMO_PARAMS.get(model, {})),
    )
    daemon = Daemon(settings, progress=progress)
    try:
        daemon.start()
        progress("running the daemon once over the policy folder (continual)")
        daemon.run_once()
    finally:
        daemon.close()

    rows: list[DemoRow] = []
    for label, path in (("aligned", inputs.aligned), ("fine-tuned", inputs.finetuned)):
        progress(f"evaluating {label}")
        rows.append(
            DemoRow(label=label, path=str(path), report=cached_eval(cache, path, inputs, max_prompts, device))
        )
    with Registry.open(settings.database_url_value(), read_only=True) as reg:
        lineage = reg.default_lineage_id()
        assert lineage is not None
        versions = reg.versions(lineage)
        dims = [d.name for d in reg.dimensions(lineage)]
    for v in versions[1:]:  # v1 is the fine-tuned model re-sharded
        added = v.revisions[-1].split("#")[0] if v.revisions else "-"
        label = f"FGSN v{v.number} (+{added})" if v.revisions else f"FGSN v{v.number}"
        progress(f"evaluating {label}")
        report = cached_eval(cache, Path(v.path), inputs, max_prompts, device)
        change = report.parameters_changed
        rows.append(
            DemoRow(
                label=label,
                path=v.path,
                report=report,
                modified_share=change.share if change else 0.0,
            )
        )
    result = DemoReport(model=model, seconds=time.perf_counter() - start, dimensions=dims, rows=rows)
    (out / "report.json").write_text(result.model_dump_json(indent=2))
    write_html_report(result, out / "report.html")
    return result
