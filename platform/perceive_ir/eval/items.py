"""What an evaluation scores: one item per image, and the error of a test set that cannot be found."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

__all__ = ["Item", "MissingSetError"]


class MissingSetError(FileNotFoundError):
    """A test set of the suite cannot be found (raised before any model is loaded)."""


@dataclass(frozen=True)
class Item:
    """One image to score: clean (and degraded, for paired data) file, and the degradation to apply."""

    set: str
    image: str
    type: str
    level: str  # a named level; '' for real degraded images
    clean: str
    degraded: Optional[str] = None  # paired folders
    shard: Optional[str] = None  # shards: the tar holding both
    severity: float = math.nan
