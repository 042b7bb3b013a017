"""Every selection-half point measured on one trio, on one over-refusal set, in one picture.

Reads the harness's ``efficacy-*.json`` files under the given folders, keeps the FGSN rows of the
selection half whose over-refusal was measured on the same number of benign prompts (``--benign``),
labels each row by its scoring and protocol (first order or path-integrated; pooled, balanced or
union of the dimensions; hard negatives / positives), and writes:

- ``selection-frontier.md``: every point, sorted by over-refusal, with its source file, the target
  corner (mean ASR ≤ aligned + 5, over-refusal ≤ fine-tuned + 5) and which points reach it;
- ``selection-frontier.png``: mean ASR against over-refusal, one marker per family.

    python benchmarks/selection_frontier.py benchmarks/results/smollm2-lora --benign 410 \\
        --out benchmarks/results/smollm2-lora/exploration
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Point:
    family: str
    setting: str
    asr: float  # mean ASR, %
    over_refusal: float  # %
    utility: float  # %
    source: str


def option(command: str, name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in a recorded command, else None."""
    found = re.search(rf"--{name}[ =](\S+)", command)
    return found.group(1) if found else None


def family_of(command: str, setting: dict) -> str:
    steps = int(option(command, "path-steps") or 1)
    scoring = "first order" if steps == 1 else "integrated" if steps == 3 else f"integrated K={steps}"
    protocol = (
        "union"
        if "--union-dimensions" in command
        else "balanced"
        if "--balance-dimensions" in command
        else "pooled"
    )
    parts = [scoring, protocol]
    train = option(command, "max-train-prompts")
    if train == "200":
        parts.append("all train prompts")
    elif train is not None and train != "64":
        parts.append(f"{train} train prompts per dimension")
    if option(command, "calibration") is not None:  # the file, wherever the run found it
        parts.append(f"calibration {Path(str(option(command, 'calibration'))).name}")
    if option(command, "contrast-prompts") is not None:  # the refusal contrast's own benign prompts
        parts.append(f"contrast on {Path(str(option(command, 'contrast-prompts'))).name}")
    for name in ("target-tokens", "max-new-tokens"):  # options that change results
        if option(command, name) is not None:
            parts.append(f"{name} {option(command, name)}")
    if setting.get("hard_positive"):
        parts.append("hard positives")
    elif setting.get("hard"):
        parts.append("hard negatives")
    if setting.get("hard") and setting.get("hard_at") == "edited":
        parts[-1] += " at the edit"
    if setting.get("hard") and setting.get("hard_target") is not None:
        parts[-1] += ", calibrated weight"
    if setting.get("energy"):  # lab lever eE: the entries' benign output energy is penalised too
        parts.append("benign output energy")
    # the value the selected entries take (lab levers mX, vX); absent = restored to aligned
    if setting.get("strength", 1.0) != 1.0:
        parts.append("strength along the revert")
    if setting.get("safety"):
        parts.append("plus the safety vector")
    return ", ".join(parts)


def collect(roots: list[Path], benign: int) -> tuple[list[Point], dict[str, float]]:
    """The points, one per (family, setting); a setting re-run must give the same figures (the
    generation is greedy and the selection deterministic), and so must the reference rows."""
    points: dict[tuple[str, str], Point] = {}
    refs: dict[str, float] = {}
    for path in sorted(p for root in roots for p in root.rglob("efficacy-*.json")):
        data = json.loads(path.read_text())
        if data.get("kind") != "efficacy":
            continue
        counts = data.get("prompt_counts", {}).get("selection", {})
        if counts.get("benign_eval") != benign:
            continue
        for row in data["rows"]:
            if row["split"] != "selection":
                continue
            if row["group"] == "reference":
                for key, value in (
                    (f"{row['name']}_asr", 100 * row["mean_asr"]),
                    (f"{row['name']}_or", 100 * row["over_refusal"]["rate"]),
                ):
                    if abs(refs.setdefault(key, value) - value) > 1e-6:
                        raise SystemExit(f"{path}: {key} is {value:.2f}, another file says {refs[key]:.2f}")
                continue
            if row["group"] != "fgsn" or "setting" not in row:
                continue
            point = Point(
                family_of(data["command"], row["setting"]),
                row["name"].removeprefix("attribution/"),
                100 * row["mean_asr"],
                100 * row["over_refusal"]["rate"],
                100 * row["utility"]["rate"],
                str(path),
            )
            kept = points.setdefault((point.family, point.setting), point)
            if (kept.asr, kept.over_refusal, kept.utility) != (point.asr, point.over_refusal, point.utility):
                raise SystemExit(
                    f"{point.family} {point.setting}: {path} and {kept.source} disagree; "
                    "a setting that changed between runs needs its own family"
                )
    return sorted(points.values(), key=lambda p: (p.over_refusal, p.asr)), refs


def write_table(points: list[Point], refs: dict[str, float], out: Path, command: str) -> int:
    asr_limit = refs["aligned_asr"] + 5
    or_limit = refs["finetuned_or"] + 5
    inside = [p for p in points if p.asr <= asr_limit + 1e-9 and p.over_refusal <= or_limit + 1e-9]
    lines = [
        f"Command: `{command}`",
        "",
        f"{len(points)} selection-half points. Target corner: mean ASR ≤ {asr_limit:.1f} % (aligned + 5) "
        f"and over-refusal ≤ {or_limit:.1f} % (fine-tuned + 5); **{len(inside)} inside**.",
        "",
        "| family | setting | mean ASR % | over-refusal % | utility % | source |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {p.family} | {p.setting} | {p.asr:.1f} | {p.over_refusal:.1f} | {p.utility:.0f} | `{p.source}` |"
        for p in points
    ]
    (out / "selection-frontier.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(inside)


def plot(points: list[Point], refs: dict[str, float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    try:
        markers = "osD^v<>ph*"
        for i, family in enumerate(sorted({p.family for p in points})):
            members = [p for p in points if p.family == family]
            ax.scatter(
                [p.over_refusal for p in members],
                [p.asr for p in members],
                marker=markers[i % len(markers)],
                label=f"{family} ({len(members)})",
                alpha=0.8,
            )
        asr_limit, or_limit = refs["aligned_asr"] + 5, refs["finetuned_or"] + 5
        ax.fill_between([0, or_limit], 0, asr_limit, color="#2ca02c", alpha=0.15, label="target corner")
        ax.set_xlabel("over-refusal on the selection half's benign prompts, %")
        ax.set_ylabel("mean ASR over the six dimensions, %")
        ax.set_xlim(left=0, right=min(40, max(p.over_refusal for p in points) + 2))
        ax.set_ylim(bottom=0, top=min(100, max(p.asr for p in points) + 5))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("SmolLM2 LoRA trio, selection half: every setting measured")
        fig.tight_layout()
        fig.savefig(out / "selection-frontier.png")
    finally:
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("roots", nargs="+", type=Path)
    ap.add_argument("--benign", type=int, default=410, help="keep rows measured on this many benign prompts")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    points, refs = collect(args.roots, args.benign)
    if not points or "aligned_asr" not in refs:
        raise SystemExit(f"no selection-half rows on {args.benign} benign prompts under {args.roots}")
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/selection_frontier.py " + " ".join(
        [*map(str, args.roots), "--benign", str(args.benign), "--out", str(args.out)]
    )
    inside = write_table(points, refs, args.out, command)
    plot(points, refs, args.out)
    print(f"{len(points)} points, {inside} inside the target corner -> {args.out}")


if __name__ == "__main__":
    main()
