"""The stage-1 and stage-2 computations in plain PyTorch: degrade on the batch's device, then the losses.

Both models are ``nn.Module``s whose ``forward`` returns the loss terms, so the same code runs
under a DeepSpeed engine, under DDP or alone on the CPU.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from perceive_ir.degrade import Degrader, names
from perceive_ir.models import fold_of

__all__ = ["DegradedBatch", "synthesize", "Stage1Model", "Stage2Model", "type_index", "lift_scalar_parameters"]


def lift_scalar_parameters(module: nn.Module) -> nn.Module:
    """Give 0-dim parameters (CLIP's ``logit_scale``) one dimension: DeepSpeed broadcasts every
    parameter as bytes at start-up, which a 0-dim tensor cannot be viewed as. Values and uses
    (``logit_scale.exp() * cos``) are unchanged."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if param.dim() == 0:
                setattr(sub, name, nn.Parameter(param.data.reshape(1), requires_grad=param.requires_grad))
    return module


@dataclass
class DegradedBatch:
    clean: torch.Tensor
    degraded: torch.Tensor
    types: list[str]
    type_index: torch.Tensor  # a stable integer per type name (the contrast loss's labels)
    keys: list[str]  # per sample (tile, degraded version): seeds its synthetic degradation
    clean_ids: list[str]  # per clean source image: decides the medium tier's fold


def type_index(types: Sequence[str], device: torch.device) -> torch.Tensor:
    """Registry order for synthesised types; a stable hash for other paired labels (``rain100l``...)."""
    known = {name: i for i, name in enumerate(names())}
    values = [known.get(t, len(known) + zlib.crc32(t.encode()) % 100_000) for t in types]
    return torch.tensor(values, dtype=torch.int64, device=device)


def synthesize(degrader: Degrader, batch: dict, epoch: int, device: torch.device, dtype: torch.dtype = torch.float32) -> DegradedBatch:
    """Clean-only samples are degraded here, on ``device``; paired samples keep their real input."""
    clean = batch["gt"].to(device, non_blocking=True)
    keys = list(batch["key"])
    # Batches made by hand, not by the loader, may lack clean identities: each key is its own then.
    clean_ids = list(batch.get("clean_id") or keys)
    synthetic, labels = degrader(clean, keys=keys, epoch=epoch)
    paired = batch["paired"].to(device)
    types = list(labels.types)
    if bool(paired.any()):
        real = batch["lq"].to(device, non_blocking=True)
        synthetic = torch.where(paired[:, None, None, None], real, synthetic)
        types = [batch["type"][i] if bool(paired[i]) else types[i] for i in range(len(types))]
    degraded = synthetic.clamp(0, 1)
    return DegradedBatch(clean.to(dtype), degraded.to(dtype), types, type_index(types, device), keys, clean_ids)


def second_crop(x: torch.Tensor) -> torch.Tensor:
    """Another view of the same degraded image (same noise realisation): an offset 3/4 crop."""
    h, w = x.shape[-2:]
    return x[..., h // 4 :, w // 4 :]


class Stage2Model(nn.Module):
    """Restorer + stage-2 objective (+ frozen medium tier): ``terms, restored = model(degraded, clean, clean_ids, types)``."""

    def __init__(self, restorer: nn.Module, loss: nn.Module, medium_tier: nn.Module | None = None) -> None:
        super().__init__()
        self.restorer = restorer
        self.loss = loss
        self.medium_tier = medium_tier
        lift_scalar_parameters(self)

    @property
    def conditioned(self) -> bool:
        return hasattr(self.restorer, "prior")

    def restore(self, degraded: torch.Tensor) -> torch.Tensor:
        return self.restorer(degraded, None)

    def contrast_codes(self, degraded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L_cl's anchor and positive codes: the CFE code of the image and of an offset crop of it."""
        return self.restorer.encode_degradation(degraded), self.restorer.encode_degradation(second_crop(degraded))

    def forward(self, degraded: torch.Tensor, clean: torch.Tensor, clean_ids: Sequence[str], types: torch.Tensor):
        codes = None
        if self.conditioned and getattr(self.loss, "contrast", None) is not None:
            prior = self.restorer.prior(degraded)
            codes = (prior.code, self.restorer.encode_degradation(second_crop(degraded)), types)
            restored = self.restorer(degraded, prior)
        else:
            restored = self.restorer(degraded, None)
        medium = None
        if self.medium_tier is not None and getattr(self.loss, "perceptual", None) is not None:
            medium = self.medium_tier(degraded, list(clean_ids))
        terms = self.loss(restored, clean, degraded, medium=medium, codes=codes, type_index=types)
        weight = getattr(getattr(self.loss, "cfg", None), "identity", 0.0)
        if weight:
            kept = clean[: max(1, round(self.loss.cfg.identity_share * clean.shape[0]))]
            terms["id"] = F.l1_loss(self.restorer(kept, None).float(), kept.float())
            terms["total"] = terms["total"] + weight * terms["id"]
        return terms, restored


class Stage1Model(nn.Module):
    """K hold-out restorers and the perceiver's prompts, trained one phase after the other.

    ``phase="restorers"``: restorer j learns L1 on the samples outside fold j (folds of clean
    identities: see ``perceive_ir.models.medium_tier``).
    ``phase="prompts"``: triplets (degraded, medium, clean) where medium is the output of the
    restorer that never saw the sample; cross-entropy over the tiers low/medium/high.
    """

    def __init__(self, restorers: Sequence[nn.Module], perceiver: nn.Module) -> None:
        super().__init__()
        if len(restorers) < 2:
            raise ValueError("the medium tier needs K >= 2 hold-out restorers")
        self.restorers = nn.ModuleList(restorers)
        self.perceiver = perceiver
        lift_scalar_parameters(self)

    @property
    def k(self) -> int:
        return len(self.restorers)

    def folds(self, clean_ids: Sequence[str], device: torch.device) -> torch.Tensor:
        return torch.tensor([fold_of(c, self.k) for c in clean_ids], device=device)

    def medium(self, degraded: torch.Tensor, clean_ids: Sequence[str]) -> torch.Tensor:
        """Each sample restored by the restorer of its own fold (which never trained on its clean image)."""
        folds = self.folds(clean_ids, degraded.device)
        out = torch.empty_like(degraded)
        for j, restorer in enumerate(self.restorers):
            index = (folds == j).nonzero(as_tuple=True)[0]
            if index.numel():
                out[index] = restorer(degraded[index], None).clamp(0, 1).to(out.dtype)
        return out

    def forward(self, degraded: torch.Tensor, clean: torch.Tensor, clean_ids: Sequence[str], phase: str):
        if phase == "restorers":
            folds = self.folds(clean_ids, degraded.device)
            losses = []
            for j, restorer in enumerate(self.restorers):
                index = (folds != j).nonzero(as_tuple=True)[0]
                if index.numel():
                    losses.append(F.l1_loss(restorer(degraded[index], None), clean[index]))
                else:  # keep every parameter in the graph (collectives expect all gradients)
                    losses.append(sum(p.sum() for p in restorer.parameters()) * 0.0)
            total = torch.stack(losses).mean()
            return {"total": total, "restorer_l1": total.detach()}
        if phase != "prompts":
            raise ValueError(f"unknown stage-1 phase '{phase}'")
        with torch.no_grad():
            medium = self.medium(degraded, clean_ids)
        images = torch.cat([degraded, medium, clean])
        b = degraded.shape[0]
        tiers = torch.arange(3, device=images.device).repeat_interleave(b)
        logits = self.perceiver.logits(images)
        total = F.cross_entropy(logits, tiers)
        accuracy = (logits.argmax(-1) == tiers).float().mean()
        return {"total": total, "prompt_ce": total.detach(), "tier_accuracy": accuracy}
