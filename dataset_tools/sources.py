"""Input sources of the shard builder and the rules that pair degraded with clean images.

A source is a folder (any fsspec URL) of clean images, optionally with a second folder of
degraded images. Pairing rules (``match``), all applied to paths relative to each folder:

- ``same_path``: identical relative paths (``rainy/a/1.png`` <-> ``clean/a/1.png``);
- ``same_stem``: identical relative paths without the extension (``1.jpg`` <-> ``1.png``);
- ``pattern``: ``degraded_pattern`` and ``clean_pattern`` with an ``{id}`` placeholder and
  ``*`` wildcards, e.g. ``rain-{id}.png`` <-> ``norain-{id}.png``;
- ``rain100``: the preset ``rain-{id}.*`` <-> ``norain-{id}.*`` (Rain100L/H);
- ``reside``: the preset ``{id}_*_*.*`` <-> ``{id}.*`` (RESIDE: ``0001_0.8_0.2.jpg`` <-> ``0001.png``);
  several degraded images may share one clean image.

A degraded file with no clean counterpart, and a clean file with no degraded one, is listed
in the manifest's ``skipped`` section with that reason; nothing is silently dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from perceive_ir.data.images import IMAGE_EXTENSIONS
from perceive_ir.data.storage import StorageError, filesystem, unstrip

MatchRule = Literal["same_path", "same_stem", "pattern", "rain100", "reside"]
_PRESETS = {"rain100": ("rain-{id}.*", "norain-{id}.*"), "reside": ("{id}_*_*.*", "{id}.*")}


@dataclass
class SourceSpec:
    dataset: str
    clean: str
    split: str = "train"
    degraded: Optional[str] = None
    degradation: Optional[str] = None  # the type label of a paired set: rain, haze, blur...
    match: MatchRule = "same_stem"
    degraded_pattern: Optional[str] = None
    clean_pattern: Optional[str] = None
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.degraded and not self.degradation:
            raise ValueError(f"source '{self.dataset}': a paired source needs 'degradation' (e.g. rain)")
        if self.match == "pattern" and not (self.degraded_pattern and self.clean_pattern):
            raise ValueError(
                f"source '{self.dataset}': match 'pattern' needs degraded_pattern and clean_pattern"
            )
        for name in (self.dataset, self.split):
            if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
                raise ValueError(f"dataset and split names use letters, digits, '-' and '_' only: '{name}'")


@dataclass(frozen=True)
class Item:
    """One unit of work: a clean image, and for paired sets its degraded counterpart."""

    dataset: str
    split: str
    type: str  # "clean" or the degradation of a pair
    clean_url: str
    clean_rel: str
    degraded_url: Optional[str] = None
    degraded_rel: Optional[str] = None
    storage_options: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def source(self) -> str:
        rel = self.degraded_rel or self.clean_rel
        return f"{self.dataset}/{self.split}/{rel}"

    @property
    def key(self) -> str:
        """A WebDataset key: unique per item, no dots (WebDataset splits keys at the first dot)."""
        rel = self.degraded_rel or self.clean_rel
        return f"{self.dataset}/{self.split}/" + re.sub(r"[^A-Za-z0-9_\-/]", "_", rel)


def list_images(url: str, storage_options: dict[str, Any]) -> dict[str, str]:
    """Relative path -> full URL for every image file under ``url`` (sorted, recursive)."""
    fs, root = filesystem(url, storage_options)
    try:
        if not fs.isdir(root):
            raise StorageError(f"source folder '{url}' does not exist or is not a folder")
        found = fs.find(root)
    except StorageError:
        raise
    except Exception as err:  # an unreachable bucket surfaces as many exception kinds
        raise StorageError(f"cannot list source folder '{url}': {type(err).__name__}: {err}") from err
    root = root.rstrip("/")
    images = {}
    for path in sorted(found):
        if path.lower().endswith(IMAGE_EXTENSIONS):
            rel = path[len(root) + 1 :] if path.startswith(root + "/") else path.rsplit("/", 1)[-1]
            images[rel] = unstrip(fs, path)
    return images


def _pattern_regex(pattern: str) -> re.Pattern:
    out = ""
    for part in re.split(r"(\{id\}|\*)", pattern):
        if part == "{id}":
            out += r"(?P<id>.+?)"
        elif part == "*":
            out += r"[^/]*?"
        else:
            out += re.escape(part)
    return re.compile(out)


def _match_key(rule: str, rel: str, pattern: Optional[re.Pattern]) -> Optional[str]:
    if rule == "same_path":
        return rel
    if rule == "same_stem":
        return rel.rsplit(".", 1)[0]
    m = pattern.fullmatch(rel.rsplit("/", 1)[-1]) if pattern else None
    if not m:
        return None
    folder = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
    return folder + m.group("id")


def enumerate_source(spec: SourceSpec) -> tuple[list[Item], list[tuple[str, str]]]:
    """All items of a source in a stable order, and the files skipped while pairing."""
    options = spec.storage_options
    clean = list_images(spec.clean, spec.storage_options)
    if not spec.degraded:
        items = [
            Item(spec.dataset, spec.split, "clean", url, rel, storage_options=options)
            for rel, url in clean.items()
        ]
        return items, []

    degraded = list_images(spec.degraded, spec.storage_options)
    if spec.match in _PRESETS:
        lq_pat, gt_pat = _PRESETS[spec.match]
    else:
        lq_pat, gt_pat = spec.degraded_pattern, spec.clean_pattern
    lq_re = _pattern_regex(lq_pat) if lq_pat and spec.match not in ("same_path", "same_stem") else None
    gt_re = _pattern_regex(gt_pat) if gt_pat and spec.match not in ("same_path", "same_stem") else None

    clean_by_key: dict[str, tuple[str, str]] = {}
    skipped: list[tuple[str, str]] = []
    for rel, url in clean.items():
        key = _match_key(spec.match, rel, gt_re)
        if key is None:
            skipped.append((f"{spec.dataset}/{spec.split}/{rel}", "clean file does not match the pairing pattern"))
        elif key in clean_by_key:
            skipped.append((f"{spec.dataset}/{spec.split}/{rel}", f"ambiguous: another clean file has id '{key}'"))
        else:
            clean_by_key[key] = (rel, url)

    items, used = [], set()
    for rel, url in degraded.items():
        key = _match_key(spec.match, rel, lq_re)
        if key is None or key not in clean_by_key:
            skipped.append((f"{spec.dataset}/{spec.split}/{rel}", "degraded file has no clean counterpart"))
            continue
        gt_rel, gt_url = clean_by_key[key]
        used.add(key)
        items.append(
            Item(spec.dataset, spec.split, spec.degradation, gt_url, gt_rel, url, rel, options)
        )
    for key, (rel, _) in clean_by_key.items():
        if key not in used:
            skipped.append((f"{spec.dataset}/{spec.split}/{rel}", "clean file has no degraded counterpart"))
    return items, skipped
