"""Building a frozen open_clip model by architecture name, with weights from a local file or the hub.

The *identity* of a CLIP (architecture, pretrained tag or sha256 of the weight file, and the
image preprocessing) is recorded with every saved perceiver, so that a perceiver is never
scored with a CLIP other than the one its prompts were learned against.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from perceive_ir import weights
from perceive_ir.models.layers import frozen

__all__ = ["ClipIdentity", "load_clip", "register_arch_config", "encode_text_embeddings"]

_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclasses.dataclass(frozen=True)
class ClipIdentity:
    architecture: str
    pretrained: str | None  # open_clip tag when loaded from the hub
    weights_sha256: str | None  # sha256 of the local weight file
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ClipIdentity":
        return cls(
            architecture=data["architecture"],
            pretrained=data.get("pretrained"),
            weights_sha256=data.get("weights_sha256"),
            image_size=int(data["image_size"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
        )

    def differences(self, other: "ClipIdentity") -> list[str]:
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k}: {mine[k]!r} != {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]


def register_arch_config(path: str | Path) -> str:
    """Register an open_clip architecture JSON (e.g. a tiny one for tests); returns its name."""
    import open_clip

    path = Path(path)
    json.loads(path.read_text())  # fail early on a malformed file
    open_clip.add_model_config(path)
    return path.stem


def load_clip(
    architecture: str,
    pretrained: str | None = "openai",
    weights_file: str | Path | None = None,
    config_key: str = "perceiver.clip_weights",
) -> tuple[nn.Module, ClipIdentity]:
    """A frozen open_clip model (eval mode, no gradients) and its identity.

    ``weights_file`` (a local state dict or safetensors file) takes precedence over the hub tag
    ``pretrained``; with neither, the model is randomly initialised (tests only).
    """
    import open_clip

    if architecture not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture '{architecture}'; register its JSON first")
    sha = None
    tag = None
    if weights_file or pretrained:
        hub_repo = None
        if not weights_file:
            tag_cfg = open_clip.get_pretrained_cfg(architecture, pretrained)
            if not tag_cfg:
                raise ValueError(
                    f"open_clip has no pretrained tag '{pretrained}' for '{architecture}'; "
                    f"known: {open_clip.list_pretrained_tags_by_model(architecture)}"
                )
            hub_repo = (tag_cfg.get("hf_hub") or "").strip("/") or None
        source = weights.resolve(
            what=f"CLIP {architecture}",
            config_key=config_key,
            local_file=weights_file,
            hub_name=pretrained,
            hub_repo=hub_repo,
            hub_files=_HUB_FILES,
        )
        if source.is_local:
            sha = source.sha256
            model = open_clip.create_model(architecture, pretrained=str(source.path))
        else:
            tag = pretrained
            model = open_clip.create_model(architecture, pretrained=pretrained)
    else:
        model = open_clip.create_model(architecture, pretrained=None)
    pre = open_clip.get_model_preprocess_cfg(model)
    size = pre.get("size", model.visual.image_size)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    identity = ClipIdentity(
        architecture=architecture,
        pretrained=tag,
        weights_sha256=sha,
        image_size=size,
        mean=tuple(float(v) for v in pre["mean"]),
        std=tuple(float(v) for v in pre["std"]),
    )
    return frozen(model), identity


def encode_text_embeddings(clip: nn.Module, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP text features from token *embeddings* (learned prompts) instead of token ids.

    Mirrors open_clip's ``CLIP.encode_text`` after its token-embedding lookup; ``tokens`` are the
    ids the embeddings stand for (used to find the end-of-text position).
    """
    if not hasattr(clip, "token_embedding"):
        raise TypeError(f"{type(clip).__name__} has no built-in text tower; prompt learning needs a CLIP text tower")
    from open_clip.transformer import text_global_pool

    cast = clip.transformer.get_cast_dtype()
    x = embeddings.to(cast) + clip.positional_embedding.to(cast)
    x = clip.transformer(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
    if clip.text_projection is not None:
        x = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection
    return F.normalize(x, dim=-1)
