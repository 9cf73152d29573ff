"""Evaluation suites in YAML: which test sets, which degradations, resolved to a list of work items.

A set is one of

- synthetic: ``clean`` (a folder of clean images, a clean shard set built by ``perceive-shards``, or
  ``package:photos``) and ``degradations`` (type -> named levels); every image is degraded by the
  seeded engine with the key ``<set>/<image>``, so the inputs are identical at every evaluation, on
  any worker split;
- paired folders: ``input`` and ``target``, paired by ``match`` (the shard builder's rules,
  :mod:`perceive_ir.data.pairing`: ``same_stem`` by default, ``rain100``, ``reside``, ``pattern``...),
  ``type`` naming the degradation;
- shards: ``shards``, a folder built by ``perceive-shards`` (its ``split`` samples, whole images).

Images are found and read as the shard builder finds and reads them: every extension of
``IMAGE_EXTENSIONS`` (tif/tiff and bmp included), 16-bit and grey converted by
:func:`perceive_ir.data.images.decode_rgb8`'s rule. A set that yields no image, or fewer than its
``expect``, is an error naming the folder and the extensions looked for.

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
from perceive_ir.data.manifest import MANIFEST_NAME
from perceive_ir.data.pairing import (
    FolderNotFound,
    PairRule,
    describe_extensions,
    image_name,
    list_images,
    pair_images,
)
from perceive_ir.data.storage import StorageError, filesystem, is_unreachable, join, storage_error
from perceive_ir.eval.items import Item, MissingSetError
from perceive_ir.eval.shard_sets import clean_shard_members, shard_items

__all__ = ["SetConfig", "SuiteConfig", "Item", "MissingSetError", "EmptySetError", "resolve_suite", "suite_hash",
           "PACKAGE_PHOTOS"]

PACKAGE_PHOTOS = "package:photos"


class EmptySetError(ValueError):
    """A test set was found but yields no image, or fewer than its ``expect``."""


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
    expect: Optional[int] = None  # at least this many images (pairs, samples): fewer is an error
    match: str = "same_stem"  # paired folders: the shard builder's pairing rule
    degraded_pattern: Optional[str | list[str]] = None  # match: pattern
    clean_pattern: Optional[str | list[str]] = None
    exclude: list[str] = field(default_factory=list)  # globs over relative paths, e.g. "*/blur_gamma/*"

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
        if self.expect is not None and self.expect < 1:
            raise ValueError(f"set '{self.name}': expect must be >= 1")
        try:
            self.rule()
        except ValueError as err:
            raise ValueError(f"set '{self.name}': {err}") from None
        from perceive_ir.degrade import get

        for name, levels in self.degradations.items():
            known = get(name).levels
            for level in levels:
                if level not in known:
                    raise ValueError(f"set '{self.name}': '{name}' has no level '{level}'; known: {', '.join(known)}")

    def rule(self) -> PairRule:
        return PairRule.of(self.match, self.degraded_pattern, self.clean_pattern)


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


def _images(folder: str, recursive: bool = False, exclude: list[str] = ()) -> dict[str, str]:
    """``{relative path: url}`` of the image files in ``folder`` (directly in it unless ``recursive``)."""
    try:
        return list_images(folder, recursive=recursive, exclude=exclude)
    except FolderNotFound:
        raise MissingSetError(folder) from None
    except StorageError as err:
        if is_unreachable(err):  # a store that does not answer is no missing set: no fallback replaces it
            raise storage_error(folder, err, "list") from err
        raise MissingSetError(folder) from None


def _none_found(s: SetConfig, what: str, folders: str) -> EmptySetError:
    return EmptySetError(f"set '{s.name}': {what} in {folders} (extensions looked for: {describe_extensions()})")


def _check_count(s: SetConfig, found: int, what: str, folders: str) -> None:
    if not found:
        raise _none_found(s, f"no {what}", folders)
    if s.expect is not None and found < s.expect:
        raise _none_found(s, f"{found} {what}, {s.expect} expected (expect)", folders)


def _is_shard_set(location: str) -> bool:
    try:
        fs, path = filesystem(location)
        return fs.isfile(f"{path.rstrip('/')}/{MANIFEST_NAME}")
    except Exception as err:  # noqa: BLE001 - stores raise many kinds
        if is_unreachable(err):
            raise storage_error(location, err, "list") from err
        return False


def _clean_items(s: SetConfig, location: str) -> list[tuple[str, str, Optional[str]]]:
    """``(image name, clean file or member, shard or None)`` of a synthetic set, sorted by name."""
    if location == PACKAGE_PHOTOS:
        from perceive_ir.data.package_photos import photo_files

        return sorted((name.rsplit(".", 1)[0], str(path), None) for name, path in photo_files().items())
    if _is_shard_set(location):
        found = clean_shard_members(location, s.split, s.name)
        _check_count(s, len(found), f"'{s.split}' samples", f"shard set '{location}'")
        return found
    images = _images(location, exclude=s.exclude)
    _check_count(s, len(images), "image files", f"'{location}'")
    return sorted((image_name(rel), url, None) for rel, url in images.items())


def _paired_items(s: SetConfig, root: str) -> list[Item]:
    input_folder, target_folder = _location(root, s.input), _location(root, s.target)
    # Recursive like the shard builder (GoPro's <sequence>/blur and <sequence>/sharp).
    degraded = _images(input_folder, recursive=True, exclude=s.exclude)
    clean = _images(target_folder, recursive=True, exclude=s.exclude)
    folders = f"'{input_folder}' and '{target_folder}'"
    rule = s.rule()
    pairing = pair_images(degraded, clean, rule)
    unpaired = [rel for rel, _ in pairing.skipped]
    if unpaired:
        raise ValueError(f"set '{s.name}': images without a partner in {folders} by rule {rule.describe()}: "
                         f"{unpaired[:5]}{' ...' if len(unpaired) > 5 else ''} ({len(unpaired)} in all)")
    _check_count(s, len(pairing.pairs), "image pairs", folders)
    pairs = sorted((image_name(lq_rel), lq_url, gt_url) for lq_rel, lq_url, _, gt_url in pairing.pairs)
    return [Item(s.name, n, s.type, "", gt, lq) for n, lq, gt in pairs[: s.limit]]


def _set_items(s: SetConfig, root: str) -> list[Item]:
    from perceive_ir.degrade import get

    if s.clean:
        names = _clean_items(s, _location(root, s.clean))[: s.limit]
        return [Item(s.name, n, t, level, clean, shard=shard, severity=get(t).levels[level])
                for t, levels in s.degradations.items() for level in levels for n, clean, shard in names]
    if s.input:
        return _paired_items(s, root)
    items = shard_items(s, _location(root, s.shards))  # its first `limit` ones
    if s.expect is not None and len(items) < min(s.expect, s.limit or s.expect):
        raise _none_found(s, f"{len(items)} paired '{s.split}' samples, {s.expect} expected (expect)",
                          f"shard set '{_location(root, s.shards)}'")
    return items


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


def _set_identity(s: SetConfig) -> dict:
    """The set's fields that decide its numbers; the pairing fields only where set (older hashes stay)."""
    fields = to_dict(s) | {"if_missing": None}
    fields.pop("expect")
    for name, default in (("match", "same_stem"), ("degraded_pattern", None), ("clean_pattern", None), ("exclude", [])):
        if fields[name] == default:
            fields.pop(name)
    return fields


def suite_hash(suite: SuiteConfig, used: list[SetConfig], items: list[Item], y_channel: bool) -> str:
    """What the numbers depend on: sets used, image names, seed, quantisation, metric channel."""
    identity = {
        "sets": [_set_identity(s) for s in used],
        "images": sorted(f"{i.set}/{i.type}/{i.level}/{i.image}" for i in items),
        "seed": suite.seed,
        "quantize_input": suite.quantize_input,
        "y_channel": y_channel,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
