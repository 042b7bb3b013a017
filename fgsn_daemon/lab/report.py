"""What ``fgsn demo`` produced (``DemoReport``) and how it is shown: a Markdown table and a small
self-contained HTML report (plots embedded as PNG data URIs)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from pydantic import BaseModel

from fgsn_daemon.engine.evaluation import EvalReport


class DemoRow(BaseModel):
    label: str
    path: str
    report: EvalReport
    modified_share: float = 0.0


class DemoReport(BaseModel):
    model: str
    seconds: float
    dimensions: list[str]
    rows: list[DemoRow]


def format_table(report: DemoReport) -> str:
    dims = sorted({d for r in report.rows for d in r.report.dimensions})
    head = ["model", *[f"ASR {d}" for d in dims], "mean ASR", "over-refusal", "utility", "% params changed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report.rows:
        e = r.report
        cells = [r.label]
        cells += [f"{e.dimensions[d].asr:.2f}" if d in e.dimensions else "-" for d in dims]
        cells.append(f"{e.mean_asr:.2f}" if e.mean_asr is not None else "-")
        cells.append(f"{e.over_refusal.rate:.2f}" if e.over_refusal else "-")
        cells.append(f"{e.utility.rate:.2f}" if e.utility else "-")
        cells.append(f"{100 * e.parameters_changed.share:.3f}" if e.parameters_changed else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
        ax.plot(  # nan: no point (a gap in the line)
            range(len(rows)),
            [r.report.dimensions[d].asr if d in r.report.dimensions else float("nan") for r in rows],
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
