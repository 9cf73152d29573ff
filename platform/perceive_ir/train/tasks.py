"""Stage tasks: what the loop trains, how it validates, and what it hands on at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from perceive_ir.data.pipeline import BatchPlan
from perceive_ir.eval.validation import HeldOutSet, evaluate
from perceive_ir.losses import LossConfig
from perceive_ir.losses.contrast import gather_with_grad
from perceive_ir.models import MediumTierGenerator, PerceiverConfig, QualityPerceiver, RestorerConfig
from perceive_ir.models.precision import trained_dtype
from perceive_ir.train.config import OptimizerConfig
from perceive_ir.products import save_medium_tier, save_perceiver, save_restorer
from perceive_ir.train.schedule import phase_factor
from perceive_ir.train.steps import DegradedBatch, Stage1Model, Stage2Model

__all__ = ["Stage1Task", "Stage2Task"]


def _dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype the engine gave ``module``'s own parameters (not those of its fp32 frozen networks)."""
    return trained_dtype(module)


class Stage2Task:
    """The restorer under the quality-aware objective, with a frozen stage-1 perceiver."""

    group_names = ["restorer"]

    def __init__(self, restorer_cfg: RestorerConfig, loss_cfg: LossConfig, perceiver: QualityPerceiver,
                 medium_tier: Optional[MediumTierGenerator], optim: OptimizerConfig, max_steps: int) -> None:
        self.restorer_cfg, self.optim, self.max_steps = restorer_cfg, optim, max_steps
        self.perceiver = perceiver.freeze_prompts()
        self.model = Stage2Model(restorer_cfg.build(), loss_cfg.build(self.perceiver), medium_tier)
        self._last_restored: torch.Tensor | None = None
        self._step_keys: list[torch.Tensor] = []
        self._step_rows: list[slice] = []  # of the step's micro-batches still to come

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.model.restorer.parameters() if p.requires_grad]}]

    def schedule_factors(self) -> list[Callable[[int], float]]:
        return [phase_factor(0, self.max_steps, self.optim.warmup_steps, self.optim.floor)]

    def prepare_step(self, engine, batches: list[DegradedBatch], plan: BatchPlan) -> None:
        """Under accumulation: the degradation codes of the step's whole global batch (this rank's
        micro-batches, then every rank's), the negatives of each micro-batch's L_cl."""
        contrast = self._contrast()
        if contrast is None or not contrast.cfg.gather:  # without gathering: each micro-batch on its own
            return
        module = engine.module
        with torch.no_grad():
            anchors, positives = zip(*(module.contrast_codes(b.degraded) for b in batches))
            local = [torch.cat(anchors), torch.cat(positives), torch.cat([b.type_index for b in batches])]
        self._step_keys = [gather_with_grad(x) for x in local]  # every rank's slots, in slot order
        size = len(batches[0].keys)
        self._step_rows = [slice((plan.first_slot + k) * size, (plan.first_slot + k + 1) * size)
                           for k in range(len(batches))]

    def _contrast(self):
        return getattr(self.model.loss, "contrast", None) if self.model.conditioned else None

    def compute(self, engine, batch: DegradedBatch, step: int) -> dict[str, torch.Tensor]:
        contrast = self._contrast()
        if self._step_rows and contrast is not None:
            contrast.use_step_keys(*self._step_keys, rows=self._step_rows.pop(0))
        try:
            terms, restored = engine(batch.degraded, batch.clean, batch.clean_ids, batch.type_index)
        finally:
            if contrast is not None:
                contrast.use_step_keys(None)
        self._last_restored = restored.detach()
        return terms

    def _probed_loss(self) -> Optional[torch.nn.Module]:
        """L_dpl when its difficulty rule needs the probe PSNR (rule ``reference``), else None."""
        perceptual = getattr(self.model.loss, "perceptual", None)
        return perceptual if perceptual is not None and perceptual.uses_probe else None

    def on_epoch_start(self, engine, epoch: int, probe, resumed_mid_epoch: bool) -> None:
        """Measure the current model's probe PSNR for L_dpl (collective: every rank calls it).
        After a resume mid-epoch the value saved with the checkpoint stays, as in an unbroken run."""
        perceptual = self._probed_loss()
        if perceptual is None or resumed_mid_epoch:
            return
        module = engine.module
        dtype = _dtype(module.restorer)
        engine.eval()
        try:
            cfg = perceptual.cfg
            perceptual.probe_types = probe.measure(lambda x: module.restore(x.to(dtype)), into=perceptual.probe_psnr,
                                                   slot_of=perceptual.slot_of, source=cfg.probe_source,
                                                   images=cfg.probe_images)
        finally:
            engine.train()

    @torch.no_grad()
    def live_metrics(self) -> dict[str, float]:
        """The perceiver's no-reference score of the latest training outputs, and the probe PSNR."""
        metrics = {}
        perceptual = self._probed_loss()
        if perceptual is not None:
            metrics["train/probe_psnr"] = float(perceptual.probe_psnr[-1])  # pooled
            for kind in perceptual.probe_types if perceptual.cfg.probe == "per_task" else []:
                metrics[f"train/probe_psnr/{kind}"] = float(perceptual.probe_psnr[perceptual.slot_of(kind)])
        if self._last_restored is not None:
            score = self.perceiver.quality_score(self._last_restored.clamp(0, 1))
            metrics["train/quality_out"] = float(score.float().mean())
        return metrics

    def validate(self, module: Stage2Model, held_out: HeldOutSet):
        dtype = _dtype(module.restorer)
        return evaluate(lambda x: module.restore(x.to(dtype)), held_out,
                        quality=lambda y: self.perceiver.quality_score(y.to(dtype)))

    def save_products(self, module: Stage2Model, folder: Path) -> dict[str, Path]:
        return {"restorer": save_restorer(module.restorer, self.restorer_cfg, folder / "restorer")}


class Stage1Task:
    """Phase 1: K hold-out restorers (unless given); phase 2: the perceiver's prompts on triplets."""

    def __init__(self, restorer_cfg: RestorerConfig, restorers: list[torch.nn.Module], train_restorers: bool,
                 perceiver_cfg: PerceiverConfig, optim: OptimizerConfig, prompt_lr: float,
                 restorer_steps: int, prompt_steps: int) -> None:
        self.restorer_cfg, self.perceiver_cfg = restorer_cfg, perceiver_cfg
        self.optim, self.prompt_lr = optim, prompt_lr
        self.restorer_steps = restorer_steps if train_restorers else 0
        self.prompt_steps = prompt_steps
        if not train_restorers:
            for r in restorers:
                r.requires_grad_(False)
        self.model = Stage1Model(restorers, perceiver_cfg.build())
        self.group_names = (["restorers"] if self.restorer_steps else []) + ["prompts"]

    def phase(self, step: int) -> str:
        return "restorers" if step < self.restorer_steps else "prompts"

    def param_groups(self) -> list[dict]:
        groups = []
        if self.restorer_steps:
            groups.append({"params": [p for p in self.model.restorers.parameters() if p.requires_grad]})
        groups.append({"params": [self.model.perceiver.prompts.context], "lr": self.prompt_lr})
        return groups

    def schedule_factors(self) -> list[Callable[[int], float]]:
        warmup, floor = self.optim.warmup_steps, self.optim.floor
        factors = [phase_factor(0, self.restorer_steps, warmup, floor)] if self.restorer_steps else []
        prompt_floor = min(1.0, self.optim.min_lr / self.prompt_lr)
        return factors + [phase_factor(self.restorer_steps, self.prompt_steps, warmup, prompt_floor)]

    def compute(self, engine, batch: DegradedBatch, step: int) -> dict[str, torch.Tensor]:
        return engine(batch.degraded, batch.clean, batch.clean_ids, self.phase(step))

    def on_epoch_start(self, engine, epoch: int, probe, resumed_mid_epoch: bool) -> None:
        pass

    def live_metrics(self) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def validate(self, module: Stage1Model, held_out: HeldOutSet):
        dtype = _dtype(module.restorers)
        metrics, outputs = evaluate(lambda x: module.medium(x.to(dtype), held_out.keys), held_out,
                                    quality=lambda y: module.perceiver.quality_score(y.to(dtype)))
        correct = total = 0
        for degraded, clean in held_out.items.values():
            medium = module.medium(degraded.to(dtype), held_out.keys)
            images = torch.cat([degraded.to(dtype), medium, clean.to(dtype)])
            tiers = torch.arange(3, device=images.device).repeat_interleave(degraded.shape[0])
            correct += int((module.perceiver.logits(images).argmax(-1) == tiers).sum())
            total += tiers.numel()
        metrics["val/tier_accuracy"] = correct / total
        return metrics, outputs

    def save_products(self, module: Stage1Model, folder: Path) -> dict[str, Path]:
        return {
            "medium_tier": save_medium_tier(list(module.restorers), self.restorer_cfg, folder / "medium_tier"),
            "perceiver": save_perceiver(module.perceiver, self.perceiver_cfg, folder / "perceiver"),
        }
