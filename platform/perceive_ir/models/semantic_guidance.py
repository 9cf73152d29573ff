"""SGM: semantic guidance from a frozen DINOv2 (timm): the CLS token of several layers."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from perceive_ir import weights
from perceive_ir.models.layers import frozen
from perceive_ir.models.precision import full_precision, keep_fp32
from perceive_ir.models.weight_formats import WEIGHT_FILES, load_timm_file

__all__ = ["SemanticConfig", "SemanticGuidance", "create_timm_backbone", "resolve_timm_weights"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass
class SemanticConfig:
    model: str = "vit_base_patch14_dinov2.lvd142m"
    pretrained: bool = True  # False: random init (tests, parameter counts)
    # local file or folder: timm's model.safetensors/pytorch_model.bin, or Hugging Face's
    # facebook/dinov2-* folder (converted on load); takes precedence over the hub
    weights: str | None = None
    layers: list[int] = dataclasses.field(default_factory=lambda: [2, 5, 8, 11])  # (verify)
    image_size: int = 224
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. a tiny depth/width


def create_timm_backbone(
    name: str, pretrained: bool, weights_file: str | None, config_key: str, **kwargs: Any
) -> tuple[nn.Module, weights.WeightSource | None]:
    """A timm model and where its weights came from (``None``: random init).

    ``weights_file`` (a file or hub folder, read without executing code; timm's own files or, for
    DINOv2, Hugging Face's folder) takes precedence over the hub.
    """
    import timm

    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs), None
    source = resolve_timm_weights(name, weights_file, config_key)
    if source.is_local:
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_timm_file(model, source.path, name=name, config_key=config_key)
        return model, source
    return timm.create_model(name, pretrained=True, **kwargs), source


def resolve_timm_weights(name: str, weights_file: str | None, config_key: str) -> weights.WeightSource:
    import timm

    hub_cfg = timm.models.get_pretrained_cfg(name)
    source = weights.resolve(
        what=f"timm model {name}",
        config_key=config_key,
        local_file=weights_file,
        hub_name=name,
        hub_repo=getattr(hub_cfg, "hf_hub_id", None),
        hub_files=WEIGHT_FILES,
        folder_files=WEIGHT_FILES,
    )
    if source.is_local:
        logger.info("%s: weights from '%s' (sha256 %s)", config_key, source.path, source.sha256)
    return source


class SemanticGuidance(nn.Module):
    """Frozen DINOv2; ``forward(images in [0, 1])`` -> list of B x D fp32 CLS features, one per layer.
    Kept in fp32 under a bf16 trainer (``models.precision``); the conditioning casts its features."""

    def __init__(self, cfg: SemanticConfig, config_key: str = "conditioning.semantic.weights") -> None:
        super().__init__()
        self.cfg = cfg
        kwargs = {"dynamic_img_size": True, **cfg.model_kwargs}
        backbone, source = create_timm_backbone(cfg.model, cfg.pretrained, cfg.weights, config_key, **kwargs)
        self.backbone = frozen(backbone)
        self.weights_sha256 = source.sha256 if source else None  # identity of a local weight file
        depth = len(self.backbone.blocks)
        for layer in cfg.layers:
            if not 0 <= layer < depth:
                raise ValueError(f"semantic layer {layer} outside the {depth} blocks of {cfg.model}")
        self.dim = self.backbone.embed_dim
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        keep_fp32(self, from_weights=source is not None)

    def train(self, mode: bool = True) -> "SemanticGuidance":
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        size = self.cfg.image_size
        with full_precision(images.device):
            x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            outs = self.backbone.forward_intermediates(
                (x - self.mean) / self.std, indices=list(self.cfg.layers), return_prefix_tokens=True,
                intermediates_only=True
            )
        return [prefix[:, 0] for _, prefix in outs]
