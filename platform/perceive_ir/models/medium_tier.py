"""The medium quality tier from K hold-out restorers.

Each sample belongs to fold ``sha256(clean_id) mod K``, where ``clean_id`` is the identity of its
clean image (the loader's ``clean_id``): every degraded version and every tile of one clean image
share a fold. Restorer j was trained on every fold except j, so the medium-tier image of a sample
in fold j is the output of restorer j: a restorer that never saw that ground truth, whose output
is therefore a realistic "partly restored" image rather than a near-copy of it.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from torch import nn

__all__ = ["FOLD_RULE", "fold_of", "MediumTierGenerator"]

# Recorded with every saved medium tier: products whose folds followed another rule (the sample
# key, before clean identities) may have trained on the ground truths they later score.
FOLD_RULE = "sha256(clean_id) mod k"


def fold_of(clean_id: str, k: int) -> int:
    """Stable fold of a clean image's identity (the same on every machine and Python run)."""
    digest = hashlib.sha256(clean_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % k


class MediumTierGenerator(nn.Module):
    """``medium = gen(degraded, clean_ids)``: restorer ``fold_of(clean_id)`` runs on each sample, batched per fold."""

    def __init__(self, restorers: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(restorers) < 2:
            raise ValueError("hold-out needs at least 2 restorers (K >= 2)")
        self.restorers = nn.ModuleList(restorers).requires_grad_(False).eval()

    @property
    def k(self) -> int:
        return len(self.restorers)

    def train(self, mode: bool = True) -> "MediumTierGenerator":
        return super().train(False)  # frozen helpers: always in eval mode

    def folds(self, clean_ids: Sequence[str]) -> list[int]:
        return [fold_of(clean_id, self.k) for clean_id in clean_ids]

    @torch.no_grad()
    def forward(self, degraded: torch.Tensor, clean_ids: Sequence[str]) -> torch.Tensor:
        if len(clean_ids) != degraded.shape[0]:
            raise ValueError(f"{len(clean_ids)} clean identities for a batch of {degraded.shape[0]}")
        folds = torch.tensor(self.folds(clean_ids), device=degraded.device)
        medium = torch.empty_like(degraded)
        for fold, restorer in enumerate(self.restorers):
            index = (folds == fold).nonzero(as_tuple=True)[0]
            if index.numel():
                medium[index] = restorer(degraded[index]).clamp(0, 1).to(medium.dtype)
        return medium
