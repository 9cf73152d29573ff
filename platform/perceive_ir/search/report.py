"""The record a person reads after a search: one row per trial (CSV and markdown) and one figure,
``search_plot.png``: the objective of each trial against every searched value, and every trial's
validation curve (objective against step; dashed where the scheduler stopped the trial)."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

__all__ = ["TrialRecord", "write_table", "write_plot", "PLOT_FILE"]

PLOT_FILE = "search_plot.png"


@dataclass
class TrialRecord:
    trial_id: str
    run_id: str
    status: str  # completed | early-stopped | failed | running
    values: dict[str, object]
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, objective) at each validation
    launches: int = 1

    @property
    def final(self) -> Optional[float]:
        return self.curve[-1][1] if self.curve else None

    @property
    def last_step(self) -> int:
        return self.curve[-1][0] if self.curve else 0


def _columns(records: list[TrialRecord], keys: list[str]) -> tuple[list[str], list[list[object]]]:
    header = ["trial", *keys, "objective", "last_step", "status", "launches", "run_id"]
    rows = [[r.trial_id, *(r.values.get(k, "") for k in keys), "" if r.final is None else round(r.final, 4),
             r.last_step, r.status, r.launches, r.run_id] for r in records]
    return header, rows


def write_table(records: list[TrialRecord], keys: list[str], folder: Path) -> tuple[Path, Path]:
    """``results.csv`` and ``results.md``, best objective first (rows in the given order)."""
    header, rows = _columns(records, keys)
    csv_path, md_path = folder / "results.csv", folder / "results.md"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def write_plot(records: list[TrialRecord], keys: list[str], log_keys: set[str], metric_label: str,
               folder: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(keys) + 1
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), squeeze=False)
    colours = {"completed": "tab:blue", "early-stopped": "tab:orange", "failed": "tab:red", "running": "tab:gray"}
    for ax, key in zip(axes[0], keys):
        for status, colour in colours.items():
            points = [(r.values[key], r.final) for r in records if r.status == status and r.final is not None
                      and math.isfinite(r.final) and isinstance(r.values.get(key), (int, float))]
            if points:
                ax.scatter(*zip(*points), color=colour, label=status, s=28)
        if key in log_keys:
            ax.set_xscale("log")
        ax.set_xlabel(key, fontsize=8)
        ax.set_ylabel(metric_label, fontsize=8)
        ax.grid(alpha=0.3)
    curves = axes[0][-1]
    for r in records:
        finite = [(step, value) for step, value in r.curve if math.isfinite(value)]  # a diverged trial: -inf
        if finite:
            steps, values = zip(*finite)
            curves.plot(steps, values, "--" if r.status == "early-stopped" else "-", marker="o", markersize=3,
                        label=f"{r.trial_id} ({r.status})")
    curves.set_xlabel("step", fontsize=8)
    curves.set_ylabel(metric_label, fontsize=8)
    curves.set_title("validation curves (dashed: stopped early)", fontsize=9)
    curves.grid(alpha=0.3)
    if curves.get_legend_handles_labels()[0]:
        curves.legend(fontsize=6, ncol=2)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        axes[0][0].legend(handles, labels, fontsize=7)
    fig.tight_layout()
    path = folder / PLOT_FILE
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
