"""Input sources of the shard builder.

A source is a folder (any fsspec URL) of clean images, optionally with a second folder of
degraded images, paired by a rule (``match``) of :mod:`perceive_ir.data.pairing`: ``same_path``,
``same_stem``, ``pattern`` (``degraded_pattern`` / ``clean_pattern``), or the presets ``rain100``,
``reside`` and ``gopro``. Files matching an ``exclude`` glob (over the path relative to the folder)
are left out; hidden files, ``__MACOSX`` folders and files that are no image are ignored.

A degraded file with no clean counterpart, and a clean file with no degraded one, is listed
in the manifest's ``skipped`` section with that reason; nothing is silently dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from perceive_ir.data.pairing import PairRule, list_images, pair_images

MatchRule = Literal["same_path", "same_stem", "pattern", "rain100", "reside", "gopro"]


@dataclass
class SourceSpec:
    dataset: str
    clean: str
    split: str = "train"
    degraded: Optional[str] = None
    degradation: Optional[str] = None  # the type label of a paired set: rain, haze, blur...
    match: MatchRule = "same_stem"
    degraded_pattern: Optional[Union[str, list[str]]] = None
    clean_pattern: Optional[Union[str, list[str]]] = None
    across_folders: bool = False  # pair by file name whatever the subfolder (on for the reside preset)
    exclude: list[str] = field(default_factory=list)  # globs over relative paths, e.g. "*/blur_gamma/*"
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.degraded and not self.degradation:
            raise ValueError(f"source '{self.dataset}': a paired source needs 'degradation' (e.g. rain)")
        try:
            self.rule()
        except ValueError as err:
            raise ValueError(f"source '{self.dataset}': {err}") from None
        for name in (self.dataset, self.split):
            if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
                raise ValueError(f"dataset and split names use letters, digits, '-' and '_' only: '{name}'")

    def rule(self) -> PairRule:
        return PairRule.of(self.match, self.degraded_pattern, self.clean_pattern, self.across_folders)


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


def enumerate_source(spec: SourceSpec) -> tuple[list[Item], list[tuple[str, str]]]:
    """All items of a source in a stable order, and the files skipped while pairing."""
    options = spec.storage_options
    clean = list_images(spec.clean, options, exclude=spec.exclude)
    if not spec.degraded:
        items = [
            Item(spec.dataset, spec.split, "clean", url, rel, storage_options=options)
            for rel, url in clean.items()
        ]
        return items, []

    degraded = list_images(spec.degraded, options, exclude=spec.exclude)
    pairing = pair_images(degraded, clean, spec.rule())
    items = [Item(spec.dataset, spec.split, spec.degradation, gt_url, gt_rel, lq_url, lq_rel, options)
             for lq_rel, lq_url, gt_rel, gt_url in pairing.pairs]
    skipped = [(f"{spec.dataset}/{spec.split}/{rel}", reason) for rel, reason in pairing.skipped]
    return items, skipped
