"""Models: the quality perceiver, restorer backbones, the Perceive-IR conditioning, the medium tier."""

from perceive_ir.models.conditioning import ConditionedRestorer, ConditioningConfig, Prior
from perceive_ir.models.etb import ETBRestorer
from perceive_ir.models.medium_tier import MediumTierGenerator, fold_of
from perceive_ir.models.nafnet import NAFNet, NAFNetConfig
from perceive_ir.models.perceiver import TIERS, PerceiverConfig, PerceiverIdentityError, QualityPerceiver
from perceive_ir.models.restorer import BACKBONES, CONDITIONING, RestorerConfig, build_restorer
from perceive_ir.models.restormer import Restormer, RestormerConfig
from perceive_ir.models.semantic_guidance import SemanticConfig, SemanticGuidance
from perceive_ir.models.vgg_features import VGGConfig, VGGFeatures

__all__ = [
    "BACKBONES",
    "CONDITIONING",
    "TIERS",
    "ConditionedRestorer",
    "ConditioningConfig",
    "ETBRestorer",
    "MediumTierGenerator",
    "NAFNet",
    "NAFNetConfig",
    "PerceiverConfig",
    "PerceiverIdentityError",
    "Prior",
    "QualityPerceiver",
    "RestorerConfig",
    "Restormer",
    "RestormerConfig",
    "SemanticConfig",
    "SemanticGuidance",
    "VGGConfig",
    "VGGFeatures",
    "build_restorer",
    "fold_of",
]
