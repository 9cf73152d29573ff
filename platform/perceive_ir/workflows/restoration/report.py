"""The report of a restoration: one row per image (Parquet and CSV), the score histograms, a summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from perceive_ir.data.storage import filesystem, join, write_bytes_atomic
from perceive_ir.workflows.restoration.config import STATE_FOLDER

__all__ = ["REPORT_FILES", "summarize", "score_histograms", "write_report"]

REPORT_FILES = ("report.parquet", "report.csv", "scores.png", "summary.json")


def _mean(values) -> float:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(finite)) if finite else float("nan")


def summarize(report, launch: Mapping[str, Any]) -> dict[str, Any]:
    """Figures of the whole output (every image so far) and of this launch."""
    restored = report[report["status"] == "restored"]
    scored = restored[np.isfinite(restored["quality_in"].astype(float))] if len(restored) else restored
    summary = {
        "images": int(len(report)), "restored": int(len(restored)),
        "skipped": int((report["status"] == "skipped").sum()),
        "flagged": int(restored["flagged"].sum()) if len(restored) else 0,
        "flagged_share": float(restored["flagged"].mean()) if len(scored) else float("nan"),
        "quality_in_mean": _mean(restored["quality_in"]), "quality_out_mean": _mean(restored["quality_out"]),
        "psnr_in_mean": _mean(restored["psnr_in"]), "psnr_out_mean": _mean(restored["psnr_out"]),
        "ssim_in_mean": _mean(restored["ssim_in"]), "ssim_out_mean": _mean(restored["ssim_out"]),
        "restore_seconds_per_image": _mean(restored["seconds"]),
    }
    return summary | dict(launch)


def score_histograms(report, path: Path, title: str) -> bool:
    """The perceiver's scores of the inputs and of the outputs, as one PNG; False when nothing was scored."""
    restored = report[report["status"] == "restored"]
    before, after = (restored[c].astype(float).to_numpy() for c in ("quality_in", "quality_out"))
    before, after = before[np.isfinite(before)], after[np.isfinite(after)]
    if not len(before):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = np.linspace(0.0, 1.0, 21)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(before, bins=bins, alpha=0.6, label=f"input (mean {before.mean():.3f})")
    ax.hist(after, bins=bins, alpha=0.6, label=f"output (mean {after.mean():.3f})")
    flagged = int(restored["flagged"].sum())
    ax.set(xlabel="perceiver quality score", ylabel="images",
           title=f"{title}\n{flagged} of {len(restored)} outputs scored below their input")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(report, summary: Mapping[str, Any], output: str, options: Mapping[str, Any], local: Path,
                 title: str) -> dict[str, str]:
    """The report files in ``local`` (for MLflow) and, each atomically, in ``<output>/_restore/``; their URLs."""
    local.mkdir(parents=True, exist_ok=True)
    report.to_parquet(local / "report.parquet", index=False)
    report.to_csv(local / "report.csv", index=False)
    (local / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    names = [n for n in REPORT_FILES if n != "scores.png"]
    if score_histograms(report, local / "scores.png", title):
        names.append("scores.png")
    urls = {}
    for name in names:
        url = join(output, STATE_FOLDER, name)
        fs, path = filesystem(url, options)
        write_bytes_atomic(fs, path, (local / name).read_bytes())
        urls[name] = url
    return urls

