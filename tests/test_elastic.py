"""Elastic training: a run resized between launches is the same experiment as an unbroken one.

The tiny stage-2 runs here use real DeepSpeed engines on gloo processes (see ``_elastic_harness``):
ZeRO stage 2 at two ranks, which the engine runs as stage 0 at one fp32 rank, so a resize 2 -> 1 -> 2
carries the optimizer state across sizes and stages in both directions.
"""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import pytest
import torch

from _elastic_harness import launch
from _model_fixtures import tiny_clip_file
from _train_fixtures import build_tiny_shards

STEPS = 6


def _run(inputs: dict, folder: Path, launches: list[tuple[int, int]]) -> Path:
    """Launches ``(world size, stop after step)`` one after another on one run's checkpoints."""
    out = folder / "out"
    out.mkdir(parents=True)
    for world, stop in launches:
        spec = {**inputs, "world": world, "stop_after": stop, "max_steps": STEPS, "zero": 2, "slots": 2,
                "samples_per_epoch": 12, "checkpoints": str(folder / "checkpoints"), "out": str(out)}
        spec_file = folder / f"spec_{world}_{stop}.json"
        spec_file.write_text(json.dumps(spec))
        launch(spec, spec_file)
    return out


@pytest.fixture(scope="module")
def runs(package_photos, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("elastic")
    inputs = {"shards": build_tiny_shards(package_photos, str(root / "shards")),
              "clip": str(tiny_clip_file(root / "clip.safetensors", seed=0))}
    return {"straight": _run(inputs, root / "straight", [(2, STEPS)]),
            "resized": _run(inputs, root / "resized", [(2, 2), (1, 4), (2, STEPS)])}


def _metrics(out: Path) -> tuple[dict[str, dict[int, float]], dict[str, str]]:
    merged: dict[str, dict[int, float]] = collections.defaultdict(dict)
    tags: dict[str, str] = {}
    for launch_file in sorted(out.glob("metrics_launch*.json")):
        logged = json.loads(launch_file.read_text())
        tags.update(logged["tags"])
        for key, points in logged["metrics"].items():
            for step, value in points:
                assert step not in merged[key] or key.startswith(("train/world", "train/global", "train/accum")), \
                    f"{key} logged twice at step {step}"
                merged[key][step] = value
    return merged, tags


def test_a_run_resized_2_1_2_logs_the_losses_and_ends_with_the_weights_of_an_unbroken_run(runs):
    from safetensors.torch import load_file

    straight, _ = _metrics(runs["straight"])
    resized, tags = _metrics(runs["resized"])
    terms = ["train/total", "train/rec", "train/cl", "train/clip", "train/dpl"]
    assert set(terms) <= set(straight)
    for term in terms:
        assert sorted(resized[term]) == list(range(1, STEPS + 1)), term  # every step logged once
        for step, value in straight[term].items():
            assert math.isclose(resized[term][step], value, rel_tol=1e-4, abs_tol=1e-7), (term, step)
    assert resized["lr/restorer"] == pytest.approx(straight["lr/restorer"], rel=1e-6)  # by global step
    assert set(resized["train/global_batch"].values()) == {4.0}  # 2 x 2 at two workers, 1 x 2 x 2 at one
    assert resized["train/world_size"] == {0: 2.0, 2: 1.0, 4: 2.0}
    assert resized["train/accumulation"] == {0: 1.0, 2: 2.0, 4: 1.0}
    assert sorted(tags) == ["elastic.resize.step00000002", "elastic.resize.step00000004"]
    assert "2 -> 1 workers (capacity lost" in tags["elastic.resize.step00000002"]
    assert "1 -> 2 workers (capacity returned" in tags["elastic.resize.step00000004"]
    assert set(resized["elastic/restart_lost_s"]) == {3, 5}
    a = load_file(str(runs["straight"] / "restorer/model.safetensors"))
    b = load_file(str(runs["resized"] / "restorer/model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)


def _consumed(out: Path) -> list[tuple[int, str]]:
    return [(line["step"], key) for path in sorted(out.glob("keys_rank*.jsonl"))
            for line in map(json.loads, path.read_text().splitlines()) for key in line["keys"]]


def test_the_resized_run_trains_on_each_sample_of_each_step_exactly_once(runs):
    straight, resized = _consumed(runs["straight"]), _consumed(runs["resized"])
    assert len(straight) == STEPS * 4  # global batch 4: 2 micro-batches of 2
    assert collections.Counter(resized) == collections.Counter(straight)
