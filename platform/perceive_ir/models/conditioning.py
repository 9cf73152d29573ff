"""The Perceive-IR conditioning, attached to any backbone from the outside.

A backbone only has to list its decoder levels (``decoder_stages()``: submodule names and output
channels) or the configuration names them (``stages`` + ``stage_channels``). Forward hooks on
those submodules replace each decoder output X by

    M = PGM(X, [Z, F_l])      FiLM from the degradation code Z and the DINOv2 feature F_l
    Y = PGCA(Q=M, K=V=X)      prior-guided cross-attention (residual on X)

so the backbone's own code is never edited. Z comes from the CFE on the degraded image; the
deepest decoder level takes the deepest DINOv2 layer, shallower levels shallower layers.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from perceive_ir.models.cross_attention import PriorCrossAttention
from perceive_ir.models.degradation_encoder import CompactDegradationEncoder
from perceive_ir.models.film import PriorFiLM
from perceive_ir.models.semantic_guidance import SemanticConfig, SemanticGuidance

__all__ = ["ConditioningConfig", "Prior", "PerceiveIRConditioning", "ConditionedRestorer"]


@dataclasses.dataclass
class ConditioningConfig:
    code_dim: int = 128
    cfe_widths: list[int] = dataclasses.field(default_factory=lambda: [64, 128, 256, 256])  # (verify)
    use_semantic: bool = True
    semantic: SemanticConfig = dataclasses.field(default_factory=SemanticConfig)
    use_film: bool = True
    film_hidden: int = 512
    use_cross_attention: bool = True
    cross_attention_heads: int = 1
    stages: list[str] | None = None  # decoder submodules to condition; None: backbone.decoder_stages()
    stage_channels: list[int] | None = None  # their output channels, when `stages` is set

    def __post_init__(self) -> None:
        if (self.stages is None) != (self.stage_channels is None):
            raise ValueError("set both stages and stage_channels, or neither")
        if self.stages is not None and len(self.stages) != len(self.stage_channels):
            raise ValueError("stages and stage_channels need the same length")


@dataclasses.dataclass
class Prior:
    """What the conditioning knows about a degraded batch: its code Z and semantic features."""

    code: torch.Tensor  # B x code_dim, L2-normalised
    semantic: list[torch.Tensor]  # one B x D per DINOv2 layer (empty without semantic guidance)

    def vector(self, stage: int, n_stages: int) -> torch.Tensor:
        if not self.semantic:
            return self.code
        # deepest stage (0) <-> deepest layer (last)
        layer = len(self.semantic) - 1 - min(stage * len(self.semantic) // max(n_stages, 1), len(self.semantic) - 1)
        return torch.cat([self.code, self.semantic[layer].to(self.code.dtype)], dim=-1)


class StageConditioner(nn.Module):
    def __init__(self, channels: int, prior_dim: int, cfg: ConditioningConfig) -> None:
        super().__init__()
        self.film = PriorFiLM(prior_dim, channels, cfg.film_hidden) if cfg.use_film else None
        self.cross = PriorCrossAttention(channels, cfg.cross_attention_heads) if cfg.use_cross_attention else None

    def forward(self, x: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        modulated = self.film(x, prior) if self.film is not None else x
        return self.cross(modulated, x) if self.cross is not None else modulated


class PerceiveIRConditioning(nn.Module):
    """CFE + (frozen) semantic guidance + one PGM/PGCA per decoder stage."""

    def __init__(self, cfg: ConditioningConfig, stage_channels: list[int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.cfe = CompactDegradationEncoder(cfg.cfe_widths, cfg.code_dim)
        self.semantic = SemanticGuidance(cfg.semantic) if cfg.use_semantic else None
        prior_dim = cfg.code_dim + (self.semantic.dim if self.semantic is not None else 0)
        self.stages = nn.ModuleList(StageConditioner(c, prior_dim, cfg) for c in stage_channels)

    def prior(self, degraded: torch.Tensor) -> Prior:
        semantic = self.semantic(degraded) if self.semantic is not None else []
        return Prior(self.cfe(degraded), semantic)


class ConditionedRestorer(nn.Module):
    """``restored = net(degraded, cond)`` for a backbone with the Perceive-IR conditioning attached.

    ``cond`` is a :class:`Prior` (computed from ``degraded`` when omitted); pass it explicitly to
    reuse the CFE code in the degradation-contrast loss.
    """

    def __init__(self, backbone: nn.Module, cfg: ConditioningConfig) -> None:
        super().__init__()
        self.backbone = backbone
        if cfg.stages is not None:
            stages = list(zip(cfg.stages, cfg.stage_channels))
        elif hasattr(backbone, "decoder_stages"):
            stages = backbone.decoder_stages()
        else:
            raise TypeError(
                f"{type(backbone).__name__} lists no decoder_stages(); set conditioning stages and stage_channels"
            )
        self.stage_names = [name for name, _ in stages]
        self.conditioning = PerceiveIRConditioning(cfg, [c for _, c in stages])
        self._prior: Prior | None = None
        for index, name in enumerate(self.stage_names):
            backbone.get_submodule(name).register_forward_hook(self._make_hook(index))

    def _make_hook(self, index: int):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if self._prior is None:  # backbone called on its own: leave it untouched
                return output
            prior = self._prior.vector(index, len(self.stage_names))
            return self.conditioning.stages[index](output, prior)

        return hook

    @contextmanager
    def _active(self, prior: Prior) -> Iterator[None]:
        self._prior = prior
        try:
            yield
        finally:
            self._prior = None

    def prior(self, degraded: torch.Tensor) -> Prior:
        return self.conditioning.prior(degraded)

    def encode_degradation(self, degraded: torch.Tensor) -> torch.Tensor:
        """The CFE code Z of a degraded batch (for the degradation-contrast loss)."""
        return self.conditioning.cfe(degraded)

    def forward(self, degraded: torch.Tensor, cond: Prior | None = None) -> torch.Tensor:
        prior = cond if cond is not None else self.prior(degraded)
        with self._active(prior):
            return self.backbone(degraded, prior)
