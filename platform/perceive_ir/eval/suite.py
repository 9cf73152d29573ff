"""Evaluation suites in YAML: which test sets, which degradations, resolved to a list of work items.

A set is one of

- synthetic: ``clean`` (a folder of clean images, or ``package:photos``) and ``degradations``
  (type -> named levels); every image is degraded by the seeded engine with the key
  ``<set>/<image>``, so the inputs are identical at every evaluation, on any worker split;
- paired folders: ``input`` and ``target`` (files paired by name), ``type`` naming the degradation;
- shards: ``shards``, a folder built by ``perceive-shards`` (its ``split`` samples, whole images).

Relative locations are under ``data_root``. A missing set fails before any model is loaded
(``if_missing: skip`` skips it instead); ``fallback`` sets replace the suite when every set was skipped.
A store that does not answer is no missing set: its error is raised.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from perceive_ir.config import to_dict
from perceive_ir.data.images import SHARD_IMAGE_SUFFIXES
from perceive_ir.data.storage import filesystem, is_unreachable, join, storage_error, unstrip
from perceive_ir.eval.items import Item, MissingSetError
from perceive_ir.eval.shard_sets import shard_items

__all__ = ["SetConfig", "SuiteConfig", "Item", "MissingSetError", "resolve_suite", "suite_hash", "PACKAGE_PHOTOS"]

PACKAGE_PHOTOS = "package:photos"


@dataclass
class SetConfig:
    name: str
    clean: Optional[str] = None
    degradations: dict[str, list[str]] = field(default_factory=dict)
    input: Optional[str] = None
    target: Optional[str] = None
    type: Optional[str] = None
    shards: Optional[str] = None
    split: str = "test"
    limit: Optional[int] = None  # the first N images (sorted by name)
    if_missing: Literal["fail", "skip"] = "fail"

    def __post_init__(self) -> None:
        kinds = [k for k, on in (("clean", self.clean), ("input/target", self.input or self.target),
                                 ("shards", self.shards)) if on]
        if len(kinds) != 1:
            raise ValueError(f"set '{self.name}' needs exactly one of clean, input/target or shards; got {kinds or 'none'}")
        if self.clean and not self.degradations:
            raise ValueError(f"synthetic set '{self.name}' needs degradations (type: [levels])")
        if (self.input or self.target) and not (self.input and self.target and self.type):
            raise ValueError(f"paired set '{self.name}' needs input, target and type")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"set '{self.name}': limit must be >= 1")
        from perceive_ir.degrade import get

        for name, levels in self.degradations.items():
            known = get(name).levels
            for level in levels:
                if level not in known:
                    raise ValueError(f"set '{self.name}': '{name}' has no level '{level}'; known: {', '.join(known)}")


@dataclass
class SuiteConfig:
    name: str
    sets: list[SetConfig]
    fallback: list[SetConfig] = field(default_factory=list)
    data_root: str = "../shared/datasets"
    seed: int = 0
    quantize_input: bool = True  # synthetic inputs rounded to 8 bits, as a saved test image would be

    def __post_init__(self) -> None:
        names = [s.name for s in self.sets] + [s.name for s in self.fallback]
        if not self.sets:
            raise ValueError(f"suite '{self.name}' has no sets")
        if len(set(names)) != len(names):
            raise ValueError(f"suite '{self.name}': set names must be unique, got {names}")


def _location(root: str, location: str) -> str:
    if "://" in location or location.startswith("/") or location == PACKAGE_PHOTOS:
        return location
    # Absolute, so that workers running in another folder (Ray's working_dir) find local files.
    return join(root, location) if "://" in root else str((Path(root) / location).resolve())


def _images(folder: str) -> dict[str, str]:
    """``{stem: url}`` of the image files directly in ``folder``."""
    try:
        fs, path = filesystem(folder)
        present = fs.isdir(path)
    except Exception as err:  # noqa: BLE001 - stores raise many kinds
        if is_unreachable(err):  # a store that does not answer is no missing set: no fallback replaces it
            raise storage_error(folder, err, "list") from err
        present = False
    if not present:
        raise MissingSetError(folder)
    found = {}
    for entry in sorted(fs.ls(path, detail=False)):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if "." in name and name.rsplit(".", 1)[1].lower() in SHARD_IMAGE_SUFFIXES:
            found[name.rsplit(".", 1)[0]] = unstrip(fs, entry)
    return found


def _clean_images(location: str) -> dict[str, str]:
    if location == PACKAGE_PHOTOS:
        from perceive_ir.data.package_photos import photo_files

        return {name.rsplit(".", 1)[0]: str(path) for name, path in photo_files().items()}
    return _images(location)


def _set_items(s: SetConfig, root: str) -> list[Item]:
    from perceive_ir.degrade import get

    if s.clean:
        clean = _clean_images(_location(root, s.clean))
        names = sorted(clean)[: s.limit]
        return [Item(s.name, n, t, level, clean[n], severity=get(t).levels[level])
                for t, levels in s.degradations.items() for level in levels for n in names]
    if s.input:
        degraded, clean = _images(_location(root, s.input)), _images(_location(root, s.target))
        unpaired = sorted(set(degraded) ^ set(clean))
        if unpaired:
            raise ValueError(f"set '{s.name}': images without a partner in input/target: {unpaired[:5]}")
        return [Item(s.name, n, s.type, "", clean[n], degraded[n]) for n in sorted(clean)[: s.limit]]

    return shard_items(s, _location(root, s.shards))


def resolve_suite(suite: SuiteConfig) -> tuple[list[SetConfig], list[Item], list[str]]:
    """``(sets used, items, notes)``; raises :class:`MissingSetError` naming a missing set."""
    used, items, notes = [], [], []
    for s in suite.sets:
        try:
            found = _set_items(s, suite.data_root)
        except MissingSetError as err:
            if s.if_missing == "fail":
                raise MissingSetError(f"suite '{suite.name}': set '{s.name}' not found at '{err}'") from None
            notes.append(f"set '{s.name}' skipped: not found at '{err}'")
            continue
        used.append(s)
        items += found
    if not used and suite.fallback:
        notes.append("no set of the suite found: using its fallback sets")
        for s in suite.fallback:
            try:
                items += _set_items(s, suite.data_root)
            except MissingSetError as err:
                raise MissingSetError(f"suite '{suite.name}': fallback set '{s.name}' not found at '{err}'") from None
            used.append(s)
    if not items:
        raise MissingSetError(f"suite '{suite.name}': none of its sets has any image")
    return used, items, notes


def suite_hash(suite: SuiteConfig, used: list[SetConfig], items: list[Item], y_channel: bool) -> str:
    """What the numbers depend on: sets used, image names, seed, quantisation, metric channel."""
    identity = {
        "sets": [to_dict(s) | {"if_missing": None} for s in used],
        "images": sorted(f"{i.set}/{i.type}/{i.level}/{i.image}" for i in items),
        "seed": suite.seed,
        "quantize_input": suite.quantize_input,
        "y_channel": y_channel,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
