"""Restorers chosen by name: ``RestorerConfig(backbone=..., conditioning=...).build()``.

Both parts are :class:`~perceive_ir.components.ComponentSpec` (a registered name plus typed
parameters), so a new backbone or conditioning registers itself without touching this file::

    restorer:
      backbone: {name: nafnet, params: {width: 32}}
      conditioning: {name: perceive_ir, params: {code_dim: 128}}
"""

from __future__ import annotations

import dataclasses

from torch import nn

from perceive_ir.components import ComponentSpec, Registry
from perceive_ir.models.conditioning import ConditionedRestorer, ConditioningConfig
from perceive_ir.models.etb import ETBRestorer
from perceive_ir.models.nafnet import NAFNet, NAFNetConfig
from perceive_ir.models.restormer import Restormer, RestormerConfig

__all__ = ["BACKBONES", "CONDITIONING", "RestorerConfig", "build_restorer"]

BACKBONES: Registry[nn.Module] = Registry("backbone")
CONDITIONING: Registry[nn.Module] = Registry("conditioning")


@BACKBONES.register("restormer", RestormerConfig)
def _build_restormer(cfg: RestormerConfig) -> nn.Module:
    return Restormer(cfg)


@BACKBONES.register("nafnet", NAFNetConfig)
def _build_nafnet(cfg: NAFNetConfig) -> nn.Module:
    return NAFNet(cfg)


@CONDITIONING.register("none")
def _no_conditioning(backbone: nn.Module) -> nn.Module:
    return backbone


@CONDITIONING.register("perceive_ir", ConditioningConfig)
def _perceive_ir(cfg: ConditioningConfig, backbone: nn.Module) -> nn.Module:
    return ConditionedRestorer(backbone, cfg)


@CONDITIONING.register("perceive_ir_etb", ConditioningConfig)
def _perceive_ir_etb(cfg: ConditioningConfig, backbone: nn.Module) -> nn.Module:
    return ETBRestorer(backbone, cfg)


def _spec(value: ComponentSpec | dict | str) -> ComponentSpec:
    if isinstance(value, ComponentSpec):
        return value
    if isinstance(value, str):
        return ComponentSpec(value)
    return ComponentSpec(**value)


@dataclasses.dataclass
class RestorerConfig:
    backbone: ComponentSpec = dataclasses.field(default_factory=lambda: ComponentSpec("restormer"))
    conditioning: ComponentSpec = dataclasses.field(default_factory=lambda: ComponentSpec("perceive_ir"))

    def __post_init__(self) -> None:
        self.backbone, self.conditioning = _spec(self.backbone), _spec(self.conditioning)
        # validate names and parameters now, so a bad config fails before anything starts
        BACKBONES.config(self.backbone.name, self.backbone.params, "restorer.backbone.params")
        CONDITIONING.config(self.conditioning.name, self.conditioning.params, "restorer.conditioning.params")

    def build(self) -> nn.Module:
        return build_restorer(self)


def build_restorer(cfg: RestorerConfig) -> nn.Module:
    backbone = BACKBONES.build(cfg.backbone)
    return CONDITIONING.build(cfg.conditioning, backbone=backbone)
