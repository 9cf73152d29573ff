"""Image files in folders, and the rules that pair degraded with clean images.

One set of rules for the shard builder (``dataset_tools``) and the evaluation's paired folders.

Which files count (``list_images``): names ending in an image extension (``IMAGE_EXTENSIONS``, any
case); hidden files (``.DS_Store``, macOS ``._name.png`` resource forks) and ``__MACOSX`` folders are
ignored, as are other files (``Thumbs.db``, ``readme.txt``, ``.mat`` files). ``exclude`` takes glob
patterns over the path relative to the folder (``*`` crosses folders), e.g. ``*/blur_gamma/*``.

Pairing rules (``match``), applied to paths relative to each folder:

- ``same_path``: identical relative paths (``rainy/a/1.png`` <-> ``clean/a/1.png``);
- ``same_stem``: identical relative paths without the extension (``1.jpg`` <-> ``1.png``);
- ``pattern``: ``degraded_pattern`` and ``clean_pattern`` (one pattern or a list), with an ``{id}``
  placeholder (no ``/`` or ``.`` in it), ``*`` wildcards within one name, and a final ``.*`` for any
  extension; a pattern matches the end of the relative path (``sharp/{id}.*`` matches
  ``GOPR0372_07_00/sharp/000047.png``) and the folders before the match belong to the key;
- presets ``rain100`` (``rain-{id}.*`` or ``norain-{id}.*`` in a folder of its own <-> ``norain-{id}.*``:
  Rain100L/H, RainTrainL/H), ``reside`` (``{id}_*_*.*`` <-> ``{id}.*``, across folders: RESIDE's
  ``0001_0.8_0.2.jpg`` <-> ``0001.png``, the hazy images split over ``part1``... folders) and
  ``gopro`` (``<sequence>/blur/{id}.*`` <-> ``<sequence>/sharp/{id}.*``).

Several degraded images may share one clean image. With ``across_folders`` the folders of both sides
are left out of the key. The degraded and clean folders may be the same folder (RainTrainL,
GoPro): a file the clean rule claims is clean, another the degraded rule claims is degraded.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from perceive_ir.data.images import IMAGE_EXTENSIONS
from perceive_ir.data.storage import StorageError, filesystem, storage_error, unstrip

__all__ = ["MATCH_RULES", "FolderNotFound", "PairRule", "Pairing", "describe_extensions", "image_name", "is_image_file",
           "list_images", "pair_images"]

MATCH_RULES = ("same_path", "same_stem", "pattern", "rain100", "reside", "gopro")
# preset -> (degraded patterns, clean patterns, across folders)
_PRESETS: dict[str, tuple[tuple[str, ...], tuple[str, ...], bool]] = {
    "rain100": (("rain-{id}.*", "norain-{id}.*"), ("norain-{id}.*",), False),
    "reside": (("{id}_*_*.*",), ("{id}.*",), True),
    "gopro": (("blur/{id}.*",), ("sharp/{id}.*",), False),
}


class FolderNotFound(StorageError):
    """A folder of images does not exist (or is a file)."""


def image_name(rel: str) -> str:
    """An image's name in records and seeds: its relative path without the extension, ``/`` as ``_``."""
    return rel.rsplit(".", 1)[0].replace("/", "_")


def describe_extensions() -> str:
    return ", ".join(IMAGE_EXTENSIONS)


def is_image_file(rel: str) -> bool:
    """An image by its extension, and no hidden or macOS metadata file."""
    parts = rel.split("/")
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False
    return parts[-1].lower().endswith(IMAGE_EXTENSIONS)


def list_images(url: str, storage_options: Optional[Mapping[str, Any]] = None, recursive: bool = True,
                exclude: Sequence[str] = ()) -> dict[str, str]:
    """Relative path -> full URL of every image file under ``url`` (sorted).

    Raises :class:`FolderNotFound` for a missing folder, :class:`StorageError` when it cannot be listed.
    """
    fs, root = filesystem(url, storage_options)
    try:
        if not fs.isdir(root):
            raise FolderNotFound(f"folder '{url}' does not exist or is not a folder")
        found = fs.find(root) if recursive else fs.ls(root, detail=False)
    except StorageError:
        raise
    except Exception as err:  # an unreachable bucket surfaces as many exception kinds
        raise storage_error(url, err, "list") from err
    root = root.rstrip("/")
    images = {}
    for path in sorted(found):
        path = path.rstrip("/")
        rel = path[len(root) + 1 :] if path.startswith(root + "/") else path.rsplit("/", 1)[-1]
        if is_image_file(rel) and not any(fnmatch.fnmatchcase(rel, p) for p in exclude):
            images[rel] = unstrip(fs, path)
    return images


@dataclass(frozen=True)
class PairRule:
    """How degraded files find their clean file (see the module's documentation)."""

    match: str = "same_stem"
    degraded_patterns: tuple[str, ...] = ()
    clean_patterns: tuple[str, ...] = ()
    across_folders: bool = False

    @classmethod
    def of(cls, match: str, degraded_pattern=None, clean_pattern=None, across_folders: bool = False) -> "PairRule":
        """The rule of a configuration's ``match`` / ``degraded_pattern`` / ``clean_pattern`` fields."""
        if match not in MATCH_RULES:
            raise ValueError(f"unknown pairing rule '{match}' (known: {', '.join(MATCH_RULES)})")
        if match in _PRESETS:
            lq, gt, across = _PRESETS[match]
            return cls(match, lq, gt, across or across_folders)
        as_tuple = (lambda p: (p,) if isinstance(p, str) else tuple(p or ()))
        if match == "pattern":
            lq, gt = as_tuple(degraded_pattern), as_tuple(clean_pattern)
            if not (lq and gt):
                raise ValueError("match 'pattern' needs degraded_pattern and clean_pattern")
            for p in lq + gt:
                if "{id}" not in p:
                    raise ValueError(f"pairing pattern '{p}' has no {{id}} placeholder")
            return cls(match, lq, gt, across_folders)
        return cls(match, across_folders=across_folders)

    def describe(self) -> str:
        if self.match in ("same_path", "same_stem"):
            return self.match
        return f"{self.match} ({' | '.join(self.degraded_patterns)} <-> {' | '.join(self.clean_patterns)})"


@dataclass
class Pairing:
    pairs: list[tuple[str, str, str, str]] = field(default_factory=list)  # (lq rel, lq url, gt rel, gt url)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (rel, reason)
    unused_clean: list[str] = field(default_factory=list)  # clean files no degraded file pairs with


def _pattern_regex(pattern: str) -> re.Pattern:
    body = pattern[:-2] if pattern.endswith(".*") else pattern
    out = ""
    for part in re.split(r"(\{id\}|\*)", body):
        if part == "{id}":
            out += r"(?P<id>[^/.]+?)"
        elif part == "*":
            out += r"[^/]*?"
        else:
            out += re.escape(part)
    if pattern.endswith(".*"):
        out += r"\.[^/.]+"
    return re.compile(r"(?P<folder>(?:.*/)?)" + out)


def _key_function(rule: PairRule, patterns: tuple[str, ...]):
    regexes = [_pattern_regex(p) for p in patterns]

    def key(rel: str) -> Optional[str]:
        if rule.match == "same_path":
            return rel.rsplit("/", 1)[-1] if rule.across_folders else rel
        if rule.match == "same_stem":
            stem = rel.rsplit(".", 1)[0]
            return stem.rsplit("/", 1)[-1] if rule.across_folders else stem
        for regex in regexes:
            m = regex.fullmatch(rel)
            if m:
                return m.group("id") if rule.across_folders else m.group("folder") + m.group("id")
        return None

    return key


def pair_images(degraded: Mapping[str, str], clean: Mapping[str, str], rule: PairRule) -> Pairing:
    """Pair ``degraded`` with ``clean`` files (both ``{relative path: url}``) by ``rule``."""
    lq_key, gt_key = _key_function(rule, rule.degraded_patterns), _key_function(rule, rule.clean_patterns)
    shared = set(degraded.values()) & set(clean.values())
    result = Pairing()
    clean_by_key: dict[str, tuple[str, str]] = {}
    for rel, url in clean.items():
        key = gt_key(rel)
        if key is None:
            if url not in shared:
                result.skipped.append((rel, "clean file does not match the pairing pattern"))
            elif lq_key(rel) is None:
                result.skipped.append((rel, "file matches neither pairing pattern"))
        elif key in clean_by_key:
            result.skipped.append((rel, f"ambiguous: another clean file has id '{key}'"))
        else:
            clean_by_key[key] = (rel, url)
    claimed = {url for _, url in clean_by_key.values()}
    used = set()
    for rel, url in degraded.items():
        if url in shared and (url in claimed or gt_key(rel) is not None):
            continue  # the clean side's file
        key = lq_key(rel)
        if key is None:
            if url not in shared:
                result.skipped.append((rel, "degraded file does not match the pairing pattern"))
            continue  # a shared file matching neither side was listed with the clean files
        if key not in clean_by_key:
            result.skipped.append((rel, "degraded file has no clean counterpart"))
            continue
        gt_rel, gt_url = clean_by_key[key]
        used.add(key)
        result.pairs.append((rel, url, gt_rel, gt_url))
    for key, (rel, _) in clean_by_key.items():
        if key not in used:
            result.unused_clean.append(rel)
            result.skipped.append((rel, "clean file has no degraded counterpart"))
    return result
