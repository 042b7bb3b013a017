"""The long form of the random-crash campaign (issue 10): a real daemon subprocess over a tiny
random trio, three stages of policy changes (two new dimensions; a third one plus a changed
revision; a rollback), SIGKILLed at seeded random moments and restarted until each stage drains,
with the invariants of ``fgsn_daemon.service.reliability`` checked after every kill and at the end of
every round; then every named fault point once (``tests/test_faults.py``'s plan).

    python benchmarks/crash_campaign.py --kills 200 --seed 0 --out benchmarks/results/crash-campaign

Prints one table (kills by phase, invariant failures) and writes it with the JSON report."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # this checkout's package, the tests' trio builder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--database-url", default=None, help="a PostgreSQL server URL (default: SQLite)")
    ap.add_argument("--out", type=Path, default=None, help="folder for campaign.md / campaign.json")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--skip-points", action="store_true", help="random kills only")
    args = ap.parse_args()

    from helpers import make_trio
    from test_faults import PLAN

    from fgsn_daemon.service.reliability import Campaign

    work = args.work or Path(tempfile.mkdtemp(prefix="fgsn-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    trio = make_trio(work / "trio", "llama")
    database_url = None
    if args.database_url:
        from test_crash_campaign import _fresh_postgres

        database_url = lambda name: _fresh_postgres(args.database_url, name)  # noqa: E731
    t0 = time.monotonic()
    campaign = Campaign(work, trio, database_url=database_url, log=lambda m: print(m, flush=True))
    reference = campaign.reference()
    random_report = campaign.run(args.kills, args.seed, reference)
    points_report = None if args.skip_points else campaign.run_points(PLAN, reference)
    seconds = time.monotonic() - t0

    rows = sorted(random_report.phases().items(), key=lambda kv: -kv[1])
    failed = [k for k in random_report.kills if k.problems]
    lines = [
        f"Command: `python benchmarks/crash_campaign.py --kills {args.kills} --seed {args.seed}"
        + (" --database-url …" if args.database_url else "")
        + "`",
        "",
        f"Registry: {'PostgreSQL' if args.database_url else 'SQLite'}. Random kills: "
        f"{len(random_report.kills)} in {random_report.runs} daemon runs "
        f"({random_report.runs - len(random_report.kills)} ran to the end), "
        f"{len({k.stage for k in random_report.kills})} stages, {random_report.seconds / 60:.1f} min.",
        "",
        "| phase the kill landed in | kills | invariant failures |",
        "|---|---|---|",
    ]
    for phase, n in rows:
        bad = sum(1 for k in failed if k.phase == phase)
        lines.append(f"| {phase} | {n} | {bad} |")
    lines.append(
        f"| **all** | **{len(random_report.kills)}** | **{len(failed)}** "
        f"(+{len(random_report.problems)} end-of-stage / end-state) |"
    )
    if points_report is not None:
        bad_points = [k.phase for k in points_report.kills if k.problems]
        lines += [
            "",
            f"Named fault points: {len(points_report.kills)} kills, one per point, in one state folder; "
            f"invariant failures {len(bad_points)}, end-of-stage / end-state failures "
            f"{len(points_report.problems)}.",
        ]
    lines += ["", f"Total time {seconds / 60:.1f} min."]
    problems = random_report.problems + (points_report.problems if points_report else [])
    problems += [f"{k.stage} +{k.delay_s:.2f} s {k.phase}: {k.problems}" for k in failed]
    if points_report is not None:
        problems += [f"point {k.phase}: {k.problems}" for k in points_report.kills if k.problems]
    if problems:
        lines += ["", "Failures:", *[f"- {p}" for p in problems]]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "campaign.md").write_text(text)
        (args.out / "campaign.json").write_text(
            json.dumps(
                {
                    "kills": [k.__dict__ for k in random_report.kills],
                    "problems": problems,
                    "runs": random_report.runs,
                    "points": [k.__dict__ for k in points_report.kills] if points_report else [],
                    "seconds": seconds,
                },
                indent=1,
            )
            + "\n"
        )
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
