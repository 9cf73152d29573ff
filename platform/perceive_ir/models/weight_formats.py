"""Pretrained weights in the forms they are published in, converted on load for the timm backbones.

* DINOv2 (semantic guidance): timm's files (``model.safetensors``/``pytorch_model.bin`` with timm
  key names) or Hugging Face's ``facebook/dinov2-*`` folder (``config.json`` + ``model.safetensors``
  with ``transformers`` key names such as ``encoder.layer.N.attention.attention.query.weight``).
* VGG-16 (perceptual loss): torchvision's ``vgg16-*.pth`` or timm's ``vgg16.tv_in1k`` files; both
  name the convolutions ``features.N.*``, which is all the loss uses.

A path may be a file or the folder the hub downloads. The file's sha256 is its identity.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from perceive_ir import weights

__all__ = ["WEIGHT_FILES", "dinov2_from_hf", "load_timm_file", "load_vgg_features"]

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's and Hugging Face's hub folders

_HF_DINOV2_RENAMES = (
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"encoder\.layer\.(\d+)\.mlp\.fc([12])\.(weight|bias)", r"blocks.\1.mlp.fc\2.\3"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
)
_HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")


def _is_hf_dinov2(state: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in state)


def dinov2_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``transformers``' Dinov2Model state dict -> timm's ``vit_*_dinov2`` names.

    Query, key and value projections are stacked into timm's fused ``qkv`` in that order; the mask
    token (used only for masked pre-training) is dropped; keys it does not know pass through
    unchanged, so that a strict load names them.
    """
    if all(k.startswith("dinov2.") or k.startswith("classifier.") for k in state):  # *ForImageClassification
        state = {k[len("dinov2.") :]: v for k, v in state.items() if k.startswith("dinov2.")}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key == "embeddings.mask_token":
            continue
        match = _HF_QKV.fullmatch(key)
        if match:
            layer, part, kind = match.groups()
            qkv.setdefault((layer, kind), {})[part] = value
            continue
        for pattern, target in _HF_DINOV2_RENAMES:
            if re.fullmatch(pattern, key):
                key = re.sub(pattern, target, key)
                break
        out[key] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise weights.WeightFormatError(f"layer {layer}: {kind} of only {sorted(parts)} among query, key, value")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def _check_hf_config(path: Path, config_key: str) -> None:
    config = path.parent / "config.json"
    if not config.is_file():
        return
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type is not None and model_type != "dinov2":
        raise weights.WeightFormatError(
            f"'{path.parent}' (from '{config_key}') is a Hugging Face '{model_type}' model; expected 'dinov2'"
        )


def load_timm_file(model: nn.Module, path: Path, *, name: str, config_key: str) -> None:
    """Load a local file into a timm ``model``, converting Hugging Face DINOv2 names on the way."""
    state = weights.read_state_dict(path, config_key)
    expected = f"timm '{name}' weights"
    if _is_hf_dinov2(state):
        _check_hf_config(path, config_key)
        state = dinov2_from_hf(state)
        expected = f"a Hugging Face DINOv2 of the size of timm '{name}'"
    elif "dinov2" in name:
        expected += " or a Hugging Face facebook/dinov2-* folder"
    weights.load_exact(model, state, what=f"timm model {name}", path=path, config_key=config_key, expected=expected)


def load_vgg_features(features: nn.Sequential, path: Path, *, name: str, config_key: str) -> None:
    """Load the convolutions ``features.N.*`` of a torchvision or timm VGG file; its classifier is unused."""
    state = weights.read_state_dict(path, config_key)
    holder = nn.Module()
    holder.features = features  # keeps the file's key names in error messages
    architecture = name.split(".", 1)[0]
    weights.load_exact(
        holder,
        {k: v for k, v in state.items() if k.startswith("features.")},
        what=f"VGG {name}",
        path=path,
        config_key=config_key,
        expected=f"the 'features.N' convolutions of {architecture} (torchvision's {architecture}-*.pth or timm's {name})",
    )
