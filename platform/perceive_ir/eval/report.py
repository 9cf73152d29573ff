"""Evaluation results: the table per set x type x level (markdown, CSV), the severity curves (PNG)."""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

from perceive_ir.eval.scoring import Record

__all__ = ["Row", "summarize", "by_type", "headline", "markdown_table", "write_csv", "write_records", "severity_plot"]

METRICS = ("psnr_in", "psnr_out", "ssim_in", "ssim_out")


@dataclass
class Row:
    set: str
    type: str
    level: str  # '' for real degraded images
    severity: float
    images: int
    psnr_in: float
    psnr_out: float
    ssim_in: float
    ssim_out: float


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarize(records: Sequence[Record], order: Sequence[tuple[str, str, str]] = ()) -> list[Row]:
    """Mean metrics per (set, type, level), in ``order`` (then first appearance)."""
    groups: dict[tuple[str, str, str], list[Record]] = {key: [] for key in order}
    for r in records:
        groups.setdefault((r.set, r.type, r.level), []).append(r)
    return [Row(s, t, level, members[0].severity, len(members),
                *(_mean([getattr(r, m) for r in members]) for m in METRICS))
            for (s, t, level), members in groups.items() if members]


def by_type(rows: Sequence[Row]) -> dict[str, dict[str, float]]:
    """Per degradation type, the mean of its rows."""
    types: dict[str, list[Row]] = {}
    for row in rows:
        types.setdefault(row.type, []).append(row)
    return {t: {m: _mean([getattr(r, m) for r in members]) for m in METRICS} for t, members in types.items()}


def headline(rows: Sequence[Row]) -> dict[str, float]:
    """The mean over the table's rows (each set x type x level counts once, like the papers' average)."""
    return {m: _mean([getattr(r, m) for r in rows]) for m in METRICS}


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| set | type | level | images | PSNR in | PSNR out | SSIM in | SSIM out |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.set} | {r.type} | {r.level or '-'} | {r.images} | {r.psnr_in:.2f} | {r.psnr_out:.2f} "
                     f"| {r.ssim_in:.4f} | {r.ssim_out:.4f} |")
    mean = headline(rows)
    lines.append(f"| **average** | | | {sum(r.images for r in rows)} | {mean['psnr_in']:.2f} | "
                 f"{mean['psnr_out']:.2f} | {mean['ssim_in']:.4f} | {mean['ssim_out']:.4f} |")
    return "\n".join(lines) + "\n"


def _write(path: str | Path, items: Sequence, columns: list[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(asdict(item) for item in items)
    return path


def write_csv(rows: Sequence[Row], path: str | Path) -> Path:
    return _write(path, rows, [f.name for f in fields(Row)])


def write_records(records: Sequence[Record], path: str | Path) -> Path:
    return _write(path, records, [f.name for f in fields(Record)])


def severity_plot(rows: Sequence[Row], path: str | Path, title: str = "") -> Path | None:
    """PSNR against severity, one panel per synthetic set that sweeps severities, one colour per type:
    output solid, input dashed. None when no set has a synthetic degradation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, dict[str, list[Row]]] = {}
    for r in rows:
        if not math.isnan(r.severity):
            curves.setdefault(r.set, {}).setdefault(r.type, []).append(r)
    if not curves:
        return None
    # A set with one severity per type has points, not curves: it is left out when another set sweeps.
    sweeps = {name: types for name, types in curves.items() if any(len(m) > 1 for m in types.values())}
    curves = sweeps or curves
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4.2), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, types) in zip(axes[0], curves.items()):
        for k, (kind, members) in enumerate(types.items()):
            members = sorted(members, key=lambda r: r.severity)
            x = [r.severity for r in members]
            colour = colours[k % len(colours)]
            ax.plot(x, [r.psnr_out for r in members], "o-", color=colour, label=f"{kind} (output)")
            ax.plot(x, [r.psnr_in for r in members], "s--", color=colour, alpha=0.6, label=f"{kind} (input)")
        ax.set(title=name, xlabel="severity (0 = none, 1 = strongest)", ylabel="PSNR (dB, RGB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
