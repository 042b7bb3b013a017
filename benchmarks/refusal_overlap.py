"""Whose refusals does an edit bring back? For each edited row of a ``--responses`` run, the benign
prompts it refuses and the harmful prompts it answers, split by what the aligned model does with the
same prompt.

If an edit's over-refusals are mostly prompts the aligned model refuses too, the edit restores the
aligned model's own refusal decisions rather than inventing new ones; if its harmful misses are
mostly prompts the aligned model refuses, the aligned model still holds the refusal the selection
did not reach.

    python benchmarks/refusal_overlap.py RESPONSES.jsonl[.gz] ... [--out overlap.md]

Rows named ``random/...`` are left out (they refuse almost nothing); the reference rows are the
columns' conditions.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Overlap:
    row: str
    benign: int  # benign prompts judged
    over_refused: int  # of those, refused by the row
    also_aligned: int  # of those, refused by the aligned model too
    harmful: int
    answered: int  # harmful prompts the row answers
    aligned_refuses: int  # of those, refused by the aligned model


def judged_items(paths: list[Path]) -> Iterator[tuple[Path, dict]]:
    """Every judged response (``.gz`` or plain JSON lines) with its file; the utility items carry
    no verdict and are skipped."""
    for path in paths:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                item = json.loads(line)
                if "refused" in item:
                    yield path, item


def read_verdicts(
    paths: list[Path], items: Iterable[tuple[Path, dict]] | None = None
) -> dict[str, dict[tuple[str, str], bool]]:
    """row -> (set, prompt) -> refused, over every file (or over ``items`` already read from them).
    A prompt judged twice for one row must get the same verdict (the generation is greedy)."""
    rows: dict[str, dict[tuple[str, str], bool]] = {}
    for path, item in judged_items(paths) if items is None else items:
        key = (item["set"], item["prompt"])
        verdicts = rows.setdefault(item["row"], {})
        if verdicts.setdefault(key, item["refused"]) != item["refused"]:
            raise SystemExit(f"{path}: {item['row']} judged {key} both ways")
    return rows


def overlaps(rows: dict[str, dict[tuple[str, str], bool]]) -> list[Overlap]:
    if "aligned" not in rows:
        raise SystemExit("no 'aligned' row in the responses: run the harness with --responses")
    aligned = rows["aligned"]
    out = []
    for name, verdicts in rows.items():
        if name == "aligned" or name.startswith("random/"):
            continue
        missing = [k for k in verdicts if k not in aligned]
        if missing:
            raise SystemExit(f"{name}: {missing[0]} has no aligned verdict")
        benign = [k for k in verdicts if k[0].startswith("benign")]
        harmful = [k for k in verdicts if k[0].startswith("harmful")]
        refused = [k for k in benign if verdicts[k]]
        answered = [k for k in harmful if not verdicts[k]]
        out.append(
            Overlap(
                name,
                len(benign),
                len(refused),
                sum(aligned[k] for k in refused),
                len(harmful),
                len(answered),
                sum(aligned[k] for k in answered),
            )
        )
    return out


def table(found: list[Overlap], command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        "| row | benign refused | of which the aligned model refuses too | harmful answered "
        "| of which the aligned model refuses |",
        "|---|---|---|---|---|",
    ]
    for o in found:
        share = lambda part, whole: f"{part} ({100 * part / whole:.0f} %)" if whole else "–"  # noqa: E731
        lines.append(
            f"| {o.row} | {o.over_refused} / {o.benign} | {share(o.also_aligned, o.over_refused)} "
            f"| {o.answered} / {o.harmful} | {share(o.aligned_refuses, o.answered)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "responses", nargs="+", type=Path, help="responses-<split>.jsonl[.gz] of --responses runs"
    )
    ap.add_argument("--out", type=Path, help="write the table here (default: print it)")
    args = ap.parse_args()
    command = "python benchmarks/refusal_overlap.py " + " ".join(str(p) for p in args.responses)
    emit(table(overlaps(read_verdicts(args.responses)), command), args.out)


def emit(text: str, out: Path | None) -> None:
    """Write the table to ``out``, or print it."""
    if out:
        out.write_text(text, encoding="utf-8")
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
