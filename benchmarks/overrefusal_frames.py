"""Over-refusal with a frame-clustered interval, from a harness ``responses-SPLIT.jsonl`` (or ``.gz``).

The bundled benign prompts are built from a few question frames each ("Write a short quiz about
{x}.") and the edits refuse some frames far more than others, so refusals are not independent
across prompts and the harness's Wilson interval is too narrow. This script reads the responses the
harness kept (``--responses``), finds each benign prompt's frame (``lab.synthetic.frame_of``; an
edgy-safe prompt is its own frame) and prints, per row, the rate with its Wilson interval beside a
bootstrap interval that resamples whole frames, plus the most-refused frames.

    python benchmarks/overrefusal_frames.py \
        benchmarks/results/smollm2-lora/report-extension/responses-default-aligned-finetuned.jsonl
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fgsn_daemon.core.stats import cluster_bootstrap_interval, wilson_interval  # noqa: E402
from fgsn_daemon.lab.synthetic import frame_of  # noqa: E402


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("responses", type=Path)
    ap.add_argument("--draws", type=int, default=4000)
    args = ap.parse_args()
    rows: dict[str, list[tuple[str, bool]]] = {}
    raw = args.responses.read_bytes()
    if args.responses.suffix == ".gz":
        raw = gzip.decompress(raw)
    for line in raw.decode("utf-8").splitlines():
        r = json.loads(line)
        if r["set"] == "benign":
            rows.setdefault(r["row"], []).append((r["prompt"], bool(r["refused"])))
    lines = [
        f"Over-refusal from `{args.responses.name}`; frame-clustered interval: {args.draws} bootstrap "
        "draws of whole frames (seed 0).",
        "",
        "| row | prompts | frames | over-refusal % | Wilson 95 % | frame-clustered 95 % "
        "| most-refused frames |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, items in rows.items():
        frames = [frame_of(p) for p, _ in items]
        hits = [h for _, h in items]
        w = wilson_interval(sum(hits), len(hits))
        c = cluster_bootstrap_interval(hits, frames, draws=args.draws)
        top = Counter(f for f, h in zip(frames, hits, strict=True) if h).most_common(3)
        worst = "; ".join(f"{f!r} {k}" for f, k in top)
        wilson = f"[{pct(w['low'])}, {pct(w['high'])}]"
        clustered = f"[{pct(c['low'])}, {pct(c['high'])}]"
        lines.append(
            f"| {name} | {len(hits)} | {c['clusters']} | {pct(w['rate'])} | {wilson} | {clustered} "
            f"| {worst} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
