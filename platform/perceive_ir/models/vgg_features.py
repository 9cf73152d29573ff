"""Frozen VGG-16 features (timm) at chosen layers, for the perceptual loss.

Local weights may be torchvision's ``vgg16-*.pth`` or timm's ``vgg16.tv_in1k`` files (or hub
folder): only the convolutions are loaded, and the classifier (most of VGG-16's 138 M parameters)
is never built.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from perceive_ir.models.layers import frozen
from perceive_ir.models.precision import full_precision, keep_fp32
from perceive_ir.models.semantic_guidance import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    create_timm_backbone,
    resolve_timm_weights,
)
from perceive_ir.models.weight_formats import load_vgg_features

__all__ = ["VGGConfig", "VGGFeatures"]

VGG16_BLOCKS = (2, 2, 3, 3, 3)


@dataclasses.dataclass
class VGGConfig:
    model: str = "vgg16.tv_in1k"
    pretrained: bool = True
    # local torchvision vgg16-*.pth or timm file (or folder); takes precedence over the hub
    weights: str | None = None
    # indices into vgg.features; 3, 8, 15, 22 = relu1_2, relu2_2, relu3_3, relu4_3 (verify)
    layers: list[int] = dataclasses.field(default_factory=lambda: [3, 8, 15, 22])
    # tests only: per-stage widths for a narrow VGG-16 layout built from scratch (needs pretrained=False)
    widths: list[int] | None = None

    def __post_init__(self) -> None:
        if self.widths is not None and (len(self.widths) != 5 or self.pretrained):
            raise ValueError("widths needs 5 stage widths and pretrained=false")
        if sorted(self.layers) != self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError("layers must be increasing")


# the classifier is discarded; a tiny mlp_ratio keeps building it cheap
_CHEAP_CLASSIFIER = {"num_classes": 0, "mlp_ratio": 1 / 512}


def _narrow_vgg16(widths: list[int]) -> nn.Module:
    from timm.models.vgg import VGG

    layout: list = []
    for width, n in zip(widths, VGG16_BLOCKS):
        layout += [width] * n + ["M"]
    return VGG(layout, **_CHEAP_CLASSIFIER)


class VGGFeatures(nn.Module):
    """``forward(images in [0, 1])`` -> list of fp32 feature maps at ``cfg.layers`` (ImageNet-normalised
    input). Frozen and kept in fp32 under a bf16 trainer (``models.precision``)."""

    def __init__(self, cfg: VGGConfig, config_key: str = "loss.perceptual.vgg.weights") -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.widths is not None:
            model, source = _narrow_vgg16(cfg.widths), None
        elif cfg.pretrained and cfg.weights:
            import timm

            source = resolve_timm_weights(cfg.model, cfg.weights, config_key)
            model = timm.create_model(cfg.model, pretrained=False, **_CHEAP_CLASSIFIER)
            load_vgg_features(model.features, source.path, name=cfg.model, config_key=config_key)
        else:
            model, source = create_timm_backbone(cfg.model, cfg.pretrained, None, config_key)
        self.weights_sha256 = source.sha256 if source else None  # identity of a local weight file
        if cfg.layers[-1] >= len(model.features):
            raise ValueError(f"VGG layer {cfg.layers[-1]} beyond the {len(model.features)} feature layers")
        self.features = frozen(model.features[: cfg.layers[-1] + 1])
        del model  # the classifier (most of VGG-16's 138 M parameters) is never used
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        keep_fp32(self, from_weights=source is not None)

    def train(self, mode: bool = True) -> "VGGFeatures":
        super().train(mode)
        self.features.eval()
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        with full_precision(images.device):
            x = (images.float() - self.mean) / self.std
            wanted = set(self.cfg.layers)
            outs = []
            for index, layer in enumerate(self.features):
                x = layer(x)
                if index in wanted:
                    outs.append(x)
        return outs
