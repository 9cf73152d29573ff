"""The stage-1 quality perceiver: frozen CLIP towers plus learned tier prompts.

``perceiver.tier_probs(images)`` gives B x 3 probabilities over (low, medium, high) quality for
images in [0, 1] of any size; ``perceiver.quality_score(images)`` a scalar per image. Resizing and
CLIP normalisation happen inside and are differentiable, so a restorer can be trained through
the perceiver (stage 2) while the perceiver itself stays frozen.

A saved perceiver is a directory with ``prompts.safetensors`` (the learned context) and
``perceiver.json`` (the CLIP identity and prompt settings). Loading never executes code and
refuses a CLIP whose identity differs from the saved one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from perceive_ir.models.clip_backend import ClipIdentity, architecture_activation, load_clip, register_arch_config
from perceive_ir.models.precision import full_precision, keep_fp32
from perceive_ir.models.prompt_learner import PromptLearner

__all__ = ["PerceiverConfig", "QualityPerceiver", "PerceiverIdentityError", "TIERS"]

TIERS = ("low", "medium", "high")
FORMAT_VERSION = 1


class PerceiverIdentityError(ValueError):
    """A saved perceiver was loaded over a CLIP other than the one it was trained with."""


@dataclasses.dataclass
class PerceiverConfig:
    architecture: str = "ViT-B-32"
    pretrained: str | None = "openai"  # open_clip hub tag
    clip_weights: str | None = None  # local weight file or folder; takes precedence over `pretrained`
    # CLIP towers' activation: auto = what the weights were trained with (QuickGELU for OpenAI's),
    # or the architecture's own for weights of unknown origin; a contradicting setting is refused
    clip_activation: Literal["auto", "quick_gelu", "gelu"] = "auto"
    arch_config: str | None = None  # open_clip JSON to register first (custom/tiny architectures)
    n_ctx: int = 16
    init_std: float = 0.02
    tier_words: list[str] = dataclasses.field(default_factory=lambda: ["terrible", "mediocre", "excellent"])
    init_last_token_from_word: bool = True  # (verify) CoOp-style init of the last context token
    resize_mode: Literal["shortest_crop", "squash"] = "shortest_crop"
    score: Literal["p_excellent", "expected_tier"] = "p_excellent"

    def __post_init__(self) -> None:
        if len(self.tier_words) != len(TIERS):
            raise ValueError(f"tier_words needs {len(TIERS)} words (low, medium, high)")
        if self.n_ctx < 1:
            raise ValueError("n_ctx must be at least 1")

    def build(self, config_key: str = "perceiver.clip_weights") -> "QualityPerceiver":
        if self.arch_config:
            register_arch_config(self.arch_config)
        clip, identity = load_clip(
            self.architecture, self.pretrained, self.clip_weights, config_key, activation=self.clip_activation
        )
        return QualityPerceiver(clip, identity, self)


class QualityPerceiver(nn.Module):
    def __init__(self, clip: nn.Module, identity: ClipIdentity, cfg: PerceiverConfig) -> None:
        super().__init__()
        import open_clip

        self.cfg = cfg
        self.identity = identity
        # frozen towers in fp32 whatever the trainer's precision (models.precision): features,
        # cosines and tier probabilities are computed in fp32 from inputs of any dtype
        pretrained = identity.pretrained is not None or identity.weights_sha256 is not None
        self.clip = keep_fp32(clip.requires_grad_(False).eval(), from_weights=pretrained)
        self.prompts = PromptLearner(
            clip,
            open_clip.get_tokenizer(identity.architecture),
            n_classes=len(TIERS),
            n_ctx=cfg.n_ctx,
            init_std=cfg.init_std,
            init_words=cfg.tier_words if cfg.init_last_token_from_word else None,
        )
        self.register_buffer("mean", torch.tensor(identity.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(identity.std).view(1, 3, 1, 1), persistent=False)
        # Stage 2's cached text features: a non-persistent buffer, so that it follows ``.to(device)``
        # and dtype casts made after freezing, and stays out of saved state dicts.
        self.register_buffer("frozen_text", None, persistent=False)

    # -- frozen CLIP stays in eval mode whatever the caller does
    def train(self, mode: bool = True) -> "QualityPerceiver":
        super().train(mode)
        self.clip.eval()
        return self

    def freeze_prompts(self) -> "QualityPerceiver":
        """Stage 2: prompts fixed, text features computed once and cached."""
        self.prompts.requires_grad_(False)
        with torch.no_grad():
            self.frozen_text = self.prompts(self.clip)
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images of any size -> CLIP input (differentiable resize + normalisation)."""
        size = self.identity.image_size
        h, w = images.shape[-2:]
        if self.cfg.resize_mode == "shortest_crop":
            scale = size / min(h, w)
            nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
            x = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=scale < 1)
            top, left = (nh - size) // 2, (nw - size) // 2
            x = x[..., top : top + size, left : left + size]
        else:
            x = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """B x D L2-normalised fp32 image embeddings."""
        with full_precision(images.device):
            return F.normalize(self.clip.encode_image(self.preprocess(images.float())), dim=-1)

    def text_features(self) -> torch.Tensor:
        if self.frozen_text is not None and not self.prompts.context.requires_grad:
            return self.frozen_text
        return self.prompts(self.clip)

    def logits(self, images: torch.Tensor, use_logit_scale: bool = True) -> torch.Tensor:
        """B x 3 fp32 tier logits: (CLIP logit scale x) cosine(image, tier prompt)."""
        features = self.image_features(images)
        with full_precision(images.device):
            cos = features @ self.text_features().float().t()
            return cos * self.clip.logit_scale.float().exp() if use_logit_scale else cos

    def tier_probs(self, images: torch.Tensor, use_logit_scale: bool = True) -> torch.Tensor:
        return self.logits(images, use_logit_scale).softmax(dim=-1)

    def quality_score(self, images: torch.Tensor, use_logit_scale: bool = True) -> torch.Tensor:
        """Per-image score in [0, 1]: p(high) or the expected tier / 2 (``cfg.score``)."""
        probs = self.tier_probs(images, use_logit_scale)
        if self.cfg.score == "p_excellent":
            return probs[:, -1]
        tiers = torch.arange(len(TIERS), device=probs.device, dtype=probs.dtype)
        return (probs * tiers).sum(-1) / (len(TIERS) - 1)

    def loss(self, images: torch.Tensor, tiers: torch.Tensor) -> torch.Tensor:
        """Stage-1 cross-entropy over the tiers (labels low=0, medium=1, high=2)."""
        return F.cross_entropy(self.logits(images), tiers)

    # -- persistence: prompts.safetensors + perceiver.json
    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        if self.identity.pretrained is None and self.identity.weights_sha256 is None:
            raise ValueError("cannot save a perceiver over a randomly initialised CLIP: it could not be rebuilt")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"context": self.prompts.context.detach().cpu().contiguous()}, str(directory / "prompts.safetensors"))
        meta = {
            "format_version": FORMAT_VERSION,
            "clip": self.identity.to_dict(),
            "n_ctx": self.cfg.n_ctx,
            "tier_words": list(self.cfg.tier_words),
            "init_last_token_from_word": self.cfg.init_last_token_from_word,
            "resize_mode": self.cfg.resize_mode,
            "score": self.cfg.score,
            "tiers": list(TIERS),
        }
        (directory / "perceiver.json").write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(
        cls,
        directory: str | Path,
        clip_weights: str | None = None,
        arch_config: str | None = None,
        config_key: str = "perceiver.clip_weights",
    ) -> "QualityPerceiver":
        """Rebuild a saved perceiver; ``clip_weights`` must be the very file it was trained with
        when it was saved with a local CLIP file (checked by sha256)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        meta = json.loads((directory / "perceiver.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory}: unsupported perceiver format {meta.get('format_version')}")
        saved = ClipIdentity.from_dict(meta["clip"])
        if saved.weights_sha256 and not clip_weights:
            raise PerceiverIdentityError(
                f"{directory}: this perceiver was trained on a local CLIP file (sha256 {saved.weights_sha256}); "
                f"set '{config_key}' to that file"
            )
        cfg = PerceiverConfig(
            architecture=saved.architecture,
            pretrained=saved.pretrained,
            clip_weights=clip_weights,
            clip_activation=saved.activation or "auto",
            arch_config=arch_config,
            n_ctx=int(meta["n_ctx"]),
            tier_words=list(meta["tier_words"]),
            init_last_token_from_word=bool(meta["init_last_token_from_word"]),
            resize_mode=meta["resize_mode"],
            score=meta["score"],
        )
        if arch_config:
            register_arch_config(arch_config)
        if saved.activation is None:
            # saved before the activation was recorded: open_clip then built the architecture's own
            # activation, whatever the weights (e.g. GELU towers over OpenAI's weights, refused below)
            saved = dataclasses.replace(saved, activation=architecture_activation(saved.architecture))
        clip, identity = load_clip(
            cfg.architecture, cfg.pretrained, cfg.clip_weights, config_key, activation=cfg.clip_activation
        )
        diff = saved.differences(identity)
        if diff:
            raise PerceiverIdentityError(f"{directory}: CLIP differs from the one the prompts were learned on: " + "; ".join(diff))
        perceiver = cls(clip, identity, cfg)
        context = load_file(str(directory / "prompts.safetensors"))["context"]
        if context.shape != perceiver.prompts.context.shape:
            raise PerceiverIdentityError(
                f"{directory}: prompt shape {tuple(context.shape)} does not fit this CLIP "
                f"({tuple(perceiver.prompts.context.shape)})"
            )
        with torch.no_grad():
            perceiver.prompts.context.copy_(context)
        return perceiver
