"""The medium tier never scores a ground truth its restorer trained on: folds follow the identity of
the clean image, shared by every degraded version (RESIDE: several hazy per clear) and every tile."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from dataset_tools.build import BuildConfig, build_shards
from dataset_tools.sources import SourceSpec
from perceive_ir.config import from_dict
from perceive_ir.data.images import decode_rgb8, pixel_hash
from perceive_ir.data.pipeline import LoaderConfig, ShardSourceConfig, build_loader
from perceive_ir.degrade import DegradationConfig, Degrader
from perceive_ir.models import MediumTierGenerator, PerceiverConfig, RestorerConfig
from perceive_ir.train.config import OptimizerConfig
from perceive_ir.products import ensure_clip_weights
from perceive_ir.train.steps import synthesize
from perceive_ir.train.tasks import Stage1Task
from test_shards import small_photos

REPO = Path(__file__).resolve().parents[1]
HAZY_PER_CLEAR = 3


@pytest.fixture(scope="module")
def sources(package_photos, tmp_path_factory) -> dict[str, Path]:
    """Built shard sets: a RESIDE-style paired set and a clean set of overlapping tiles."""
    root = tmp_path_factory.mktemp("folds")
    photos = sorted(small_photos(package_photos, root / "photos", n=6).iterdir())
    (root / "clear").mkdir()
    (root / "hazy").mkdir()
    for i, photo in enumerate(photos[:4], start=1):
        shutil.copy(photo, root / "clear" / f"{i:04d}.png")
        pixels = np.asarray(Image.open(photo), dtype=np.float64)
        for v in range(HAZY_PER_CLEAR):
            veil = 0.2 + 0.15 * v
            Image.fromarray(np.uint8(pixels * (1 - veil) + 255 * veil)).save(root / "hazy" / f"{i:04d}_0.{v}_0.1.png")
    (root / "whole").mkdir()
    for photo in photos[4:]:
        shutil.copy(photo, root / "whole" / photo.name)
    reside = SourceSpec("reside", str(root / "clear"), degraded=str(root / "hazy"), degradation="haze", match="reside")
    build_shards(BuildConfig(output=str(root / "reside"), sources=[reside], max_samples_per_shard=4, progress=False))
    build_shards(BuildConfig(output=str(root / "tiles"), sources=[SourceSpec("tiles", str(root / "whole"))],
                             tile_size=40, tile_stride=16, max_samples_per_shard=8, progress=False))
    return {"root": root, "reside": root / "reside", "tiles": root / "tiles"}


def _loader(*locations: Path, samples: int = 320) -> LoaderConfig:
    return LoaderConfig(sources=[ShardSourceConfig(str(p)) for p in locations], patch_size=24, batch_size=8,
                        samples_per_epoch=samples, num_workers=0, shuffle_buffer=16, seed=5)


def _source_image(key: str) -> str:
    """The clean file a sample came from, read off its key (test data naming only)."""
    dataset, _, name = key.split("/")
    return f"{dataset}/" + (name[:4] if dataset == "reside" else re.sub(r"_y\d+_x\d+$", "", name))


def test_every_degraded_version_and_tile_carries_its_clean_image_hash(sources):
    root = sources["root"]
    expected = {f"reside/{p.stem}": pixel_hash(decode_rgb8(p.read_bytes())[0]) for p in (root / "clear").iterdir()}
    expected.update({f"tiles/{p.name.replace('.', '_')}": pixel_hash(decode_rgb8(p.read_bytes())[0])
                     for p in (root / "whole").iterdir()})
    seen: dict[str, set[str]] = {}
    for batch in build_loader(_loader(sources["reside"], sources["tiles"])):
        for key, clean_id in zip(batch["key"], batch["clean_id"]):
            seen.setdefault(_source_image(key), set()).add(clean_id)
    assert {image: ids.pop() for image, ids in seen.items() if len(ids) == 1} == expected
    versions = {k for b in build_loader(_loader(sources["reside"])) for k in b["key"]}
    assert len(versions) > len(expected)  # several hazy versions per clear image reached the stream


class RecordingRestorer(nn.Module):
    """Returns its input scaled; records the batch rows it is given. The rows carry their index in
    an extra last channel, which every selection of rows preserves."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor, prior=None) -> torch.Tensor:
        self.rows.extend(x[:, -1, 0, 0].round().long().tolist())
        return x * self.scale


def _with_row_index(x: torch.Tensor) -> torch.Tensor:
    index = torch.arange(x.shape[0], dtype=x.dtype).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:])
    return torch.cat([x, index], dim=1)


def _seen_ids(restorers: list[RecordingRestorer], clean_ids: list[str]) -> list[set[str]]:
    out = [{clean_ids[i] for i in r.rows} for r in restorers]
    for r in restorers:
        r.rows.clear()
    return out


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    perceiver_cfg = ensure_clip_weights(
        from_dict(PerceiverConfig, yaml.safe_load((REPO / "configs/models/perceiver_tiny.yaml").read_text())),
        seed=0, cache=tmp_path_factory.mktemp("clip"))
    restorers = [RecordingRestorer(), RecordingRestorer()]
    task = Stage1Task(RestorerConfig(), restorers, True, perceiver_cfg, OptimizerConfig(), prompt_lr=1e-3,
                      restorer_steps=1_000_000, prompt_steps=1)
    return task, restorers


def _route(stage1, sources, fold_on: str):
    """Per hold-out restorer j: the clean ids it trains on (phase 'restorers', through the task's
    ``compute``) and the clean ids it scores (the medium tier of stage 1 and of stage 2)."""
    task, restorers = stage1
    generator = MediumTierGenerator(restorers)
    trained = [set(), set()]
    scored = [set(), set()]
    degrader = Degrader(DegradationConfig(seed=0))
    for raw in build_loader(_loader(sources["reside"], sources["tiles"])):
        batch = synthesize(degrader, raw, 0, torch.device("cpu"))
        assert batch.clean_ids == raw["clean_id"] and batch.keys == raw["key"]
        ids = batch.clean_ids if fold_on == "clean_id" else batch.keys
        batch = dataclasses.replace(batch, degraded=_with_row_index(batch.degraded),
                                    clean=_with_row_index(batch.clean), clean_ids=ids)
        task.compute(task.model, batch, step=0)
        for j, seen in enumerate(_seen_ids(restorers, raw["clean_id"])):
            trained[j] |= seen
        for medium in (task.model.medium, generator):
            medium(batch.degraded, ids)
            for j, seen in enumerate(_seen_ids(restorers, raw["clean_id"])):
                scored[j] |= seen
    return trained, scored


def test_a_hold_out_restorer_never_scores_a_ground_truth_it_trained_on(stage1, sources):
    trained, scored = _route(stage1, sources, "clean_id")
    for j in range(2):
        assert trained[j] and scored[j]
        assert not trained[j] & scored[j], f"restorer {j} scores clean images it trained on"


def test_folds_of_degraded_keys_would_leak_the_ground_truth(stage1, sources):
    """The rule this replaced: on the same data, a fold per degraded file or tile puts one clean
    image on both sides."""
    trained, scored = _route(stage1, sources, "key")
    assert any(trained[j] & scored[j] for j in range(2))


def _rewrite_metadata(folder: Path, change) -> None:
    for tar_path in folder.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar]
        with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
            for m, data in members:
                if m.name.endswith(".json"):
                    data = json.dumps(change(json.loads(data))).encode()
                    m.size = len(data)
                tar.addfile(m, io.BytesIO(data))


def _as_before_clean_identities(meta: dict, dataset: str) -> dict:
    meta.pop("clean_sha256")
    return {**meta, "dataset": dataset}


def test_shards_built_before_clean_identities_still_load(sources, tmp_path, caplog):
    new_ids = {k: c for b in build_loader(_loader(sources["reside"], sources["tiles"])) for k, c in zip(b["key"], b["clean_id"])}
    for name, dataset in (("reside", "old_reside"), ("tiles", "old_tiles")):
        shutil.copytree(sources[name], tmp_path / name)
        _rewrite_metadata(tmp_path / name, lambda meta, d=dataset: _as_before_clean_identities(meta, d))

    with caplog.at_level(logging.WARNING, logger="perceive_ir.data.pipeline"):
        tiles = [b for b in build_loader(_loader(tmp_path / "tiles"))]
    assert not caplog.records  # a clean-only sample's image hash is its clean identity: nothing lost
    assert all(c == new_ids[k] for b in tiles for k, c in zip(b["key"], b["clean_id"]))

    with caplog.at_level(logging.WARNING, logger="perceive_ir.data.pipeline"):
        hazy = [b for b in build_loader(_loader(tmp_path / "reside"))]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "dataset 'old_reside'" in warnings[0] and "rebuild the shards" in warnings[0]
    by_key = {k: c for b in hazy for k, c in zip(b["key"], b["clean_id"])}
    assert len(set(by_key.values())) == len(by_key)  # each hazy version on its own: weaker, as warned


def test_medium_tier_products_record_their_fold_rule_and_older_ones_are_flagged(tmp_path, caplog):
    from perceive_ir.models.medium_tier import FOLD_RULE
    from perceive_ir.products import load_medium_tier, save_medium_tier

    cfg = from_dict(RestorerConfig, {"backbone": {"name": "nafnet", "params": {
        "width": 8, "encoder_blocks": [1, 1, 1, 1], "middle_blocks": 1, "decoder_blocks": [1, 1, 1, 1]}},
        "conditioning": {"name": "none"}})
    folder = save_medium_tier([cfg.build(), cfg.build()], cfg, tmp_path / "medium_tier")
    meta = json.loads((folder / "medium_tier.json").read_text())
    assert meta["fold_rule"] == FOLD_RULE
    with caplog.at_level(logging.WARNING, logger="perceive_ir.products"):
        load_medium_tier(folder)
    assert not caplog.records
    del meta["fold_rule"]  # a product saved when folds followed the sample key
    (folder / "medium_tier.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="perceive_ir.products"):
        restorers, _ = load_medium_tier(folder)
    assert len(restorers) == 2
    assert any("fold rule 'sample key'" in r.getMessage() and "train stage 1 again" in r.getMessage()
               for r in caplog.records)
