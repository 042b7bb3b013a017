"""A small self-contained HTML report for ``fgsn demo`` (plots embedded as PNG data URIs)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fgsn_daemon.lab.demo import DemoReport


def _png(fig: object) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def continual_plot(report: DemoReport) -> str:
    """ASR of every dimension after each published version (the continual matrix as lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if r.label != "aligned"]
    dims = sorted({d for r in rows for d in r.report.dimensions})
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for d in dims:
        ax.plot(
            range(len(rows)),
            [r.report.dimensions[d].asr if d in r.report.dimensions else None for r in rows],
            marker="o",
            label=d,
        )
    aligned = next((r for r in report.rows if r.label == "aligned"), None)
    if aligned is not None and aligned.report.mean_asr is not None:
        ax.axhline(aligned.report.mean_asr, color="grey", linestyle="--", label="aligned (mean)")
    ax.set_xticks(range(len(rows)), [r.label for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("attack success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Continual projection: ASR per dimension after each version")
    uri = _png(fig)
    plt.close(fig)
    return uri


def tradeoff_plot(report: DemoReport) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in report.rows:
        e = r.report
        if e.utility is None or e.mean_asr is None:
            continue
        ax.scatter(e.utility.rate, e.mean_asr)
        ax.annotate(
            r.label, (e.utility.rate, e.mean_asr), fontsize=7, xytext=(4, 3), textcoords="offset points"
        )
    ax.set_xlabel("utility accuracy (higher is better)")
    ax.set_ylabel("mean attack success rate (lower is better)")
    ax.set_title("Safety / utility trade-off")
    uri = _png(fig)
    plt.close(fig)
    return uri


def write_html_report(report: DemoReport, path: Path) -> None:
    from fgsn_daemon.lab.demo import format_table

    rows = format_table(report).splitlines()
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in rows[2:]]
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    for cells in body:
        table += "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
    table += "</table>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fgsn demo</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}
table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}</style>
</head><body><h1>fgsn demo ({html.escape(report.model)} trio)</h1>
<p>Dimensions, in the order the daemon applied them: {html.escape(", ".join(report.dimensions))}.
ASR = share of held-out harmful prompts not refused (keyword refusal detector); over-refusal = share of
held-out benign prompts refused; utility = exact-answer accuracy on the held-out utility items;
% params changed = entries that differ from the fine-tuned model, over all parameters.
Wall time {report.seconds:.0f} s.</p>
{table}
<p><img src="{continual_plot(report)}" alt="continual ASR">
<img src="{tradeoff_plot(report)}" alt="trade-off"></p>
</body></html>"""
    path.write_text(page, encoding="utf-8")
