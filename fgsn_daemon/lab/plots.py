"""Plots for the experiment harness: the safety/utility trade-off of every main-table row.

Only matplotlib's Agg backend is used, so plots render on a headless machine; matplotlib is an
optional (``lab``) dependency and is imported inside the function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# one colour per row group, so methods of one kind read as a family at a glance
GROUP_COLOURS = {"reference": "#444444", "fgsn": "#1f77b4", "baseline": "#d62728", "random": "#9e9e9e"}


@dataclass(frozen=True)
class PlotPoint:
    label: str
    utility: float  # x: utility accuracy in [0, 1]
    mean_asr: float  # y: mean attack success rate in [0, 1]
    group: str = "fgsn"
    highlight: bool = False  # e.g. the default FGSN configuration


def tradeoff_plot(points: Sequence[PlotPoint], out: str | Path, title: str) -> Path:
    """Scatter of mean ASR against utility, one labelled point per row; lower-right is better."""
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    out_path = Path(out)
    fig, ax = plt.subplots(figsize=(11, 6), dpi=110)
    try:
        for group, colour in GROUP_COLOURS.items():
            members = [p for p in points if p.group == group]
            if members:
                ax.scatter(
                    [100 * p.utility for p in members],
                    [100 * p.mean_asr for p in members],
                    c=colour,
                    label=group,
                    s=[90 if p.highlight else 36 for p in members],
                    edgecolors=["black" if p.highlight else colour for p in members],
                    zorder=3,
                )
        # rows often cluster; a number per point plus a key beside the axes stays legible
        for i, p in enumerate(points, start=1):
            ax.annotate(
                str(i),
                (100 * p.utility, 100 * p.mean_asr),
                textcoords="offset points",
                xytext=(4, 3),
                fontsize=7,
                fontweight="bold" if p.highlight else "normal",
            )
        key = "\n".join(
            f"{i:>2}  {p.label}  ({100 * p.utility:.1f}, {100 * p.mean_asr:.1f})"
            for i, p in enumerate(points, start=1)
        )
        fig.text(
            0.70, 0.95, "row  (utility, ASR) %\n" + key, va="top", ha="left", fontsize=7, family="monospace"
        )
        ax.set_xlabel("utility accuracy (%)  → better")
        ax.set_ylabel("mean attack success rate (%)  ↓ better")
        ax.set_title(title, fontsize=10)
        ax.set_xlim(-3, 103)
        ax.set_ylim(-3, 103)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout(rect=(0, 0, 0.68, 1))
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_path)
    finally:
        plt.close(fig)
    return out_path
