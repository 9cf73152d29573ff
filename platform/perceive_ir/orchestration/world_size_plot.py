"""``elastic/world_size.png``: a run's number of workers over time, drawn from its metrics at the end."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["log_world_size_plot", "ARTIFACT"]

ARTIFACT = "elastic"


def log_world_size_plot(tracker) -> Path | None:
    """Plot ``train/world_size`` (one point per launch of the run) against wall-clock time, with the
    step each launch started at; logged to the run. Only where the run changed size (nothing to
    show otherwise); a tracking error is logged, never raised: the run's training is over."""
    try:
        history = sorted(tracker.client.get_metric_history(tracker.run_id, "train/world_size"),
                         key=lambda m: m.timestamp)
        if len({m.value for m in history}) < 2:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        start = history[0].timestamp
        end = tracker.client.get_run(tracker.run_id).info.end_time or int(time.time() * 1000)  # now, at the end
        minutes = [(m.timestamp - start) / 60_000 for m in history]
        sizes = [m.value for m in history]
        figure, axes = plt.subplots(figsize=(7, 3))
        axes.step(minutes + [max(minutes[-1], (end - start) / 60_000)], sizes + [sizes[-1]], where="post")
        for x, size, point in zip(minutes, sizes, history):
            axes.annotate(f"step {point.step}", (x, size), textcoords="offset points", xytext=(2, 4), fontsize=7)
        axes.set(xlabel="minutes since the run started", ylabel="workers", title="world size over the run",
                 ylim=(0, max(sizes) + 1))
        axes.yaxis.get_major_locator().set_params(integer=True)
        figure.tight_layout()
        with tempfile.TemporaryDirectory(prefix="world-size-") as folder:
            path = Path(folder) / "world_size.png"
            figure.savefig(path, dpi=120)
            plt.close(figure)
            tracker.log_file(path, ARTIFACT)
        return Path(ARTIFACT) / "world_size.png"
    except Exception as err:  # noqa: BLE001 - a plot must not fail a finished run
        log.warning("world-size plot not logged: %s", err)
        return None
