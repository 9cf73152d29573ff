"""Building a frozen open_clip model by architecture name, with weights from a local file or the hub.

The *identity* of a CLIP (architecture, pretrained tag or sha256 of the weight file, the towers'
activation and the image preprocessing) is recorded with every saved perceiver, so that a
perceiver is never scored with a CLIP other than the one its prompts were learned against.

Local weights may be OpenAI's released TorchScript archive (``ViT-B-32.pt``, read without running
its code), a state dict in OpenAI's or open_clip's key layout, an open_clip training checkpoint
(``{"state_dict": ...}``, ``module.`` prefixes) or an open_clip hub folder.

The activation: OpenAI trained its CLIPs with QuickGELU, while open_clip's plain architectures
(``ViT-B-32``) build GELU towers. The towers are built with the activation the weights were
trained with whenever their origin is known (the hub tag's record; for a local file: the sha256
of an OpenAI release, the ``input_resolution``/``context_length``/``vocab_size`` entries that
OpenAI's archives and state dicts carry, or the ``open_clip_config.json`` next to it), and a
contradicting setting is refused. For a state dict of unknown origin (a plain open_clip or OpenAI
state dict without those entries looks the same) the architecture's own activation is built,
unless ``activation`` says otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from perceive_ir import weights
from perceive_ir.models.layers import frozen
from perceive_ir.models.precision import full_precision

__all__ = [
    "ACTIVATIONS",
    "CLIP_FILES",
    "ClipIdentity",
    "architecture_activation",
    "encode_text_embeddings",
    "load_clip",
    "register_arch_config",
]

logger = logging.getLogger(__name__)

CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # in open_clip's hub folders
ACTIVATIONS = ("quick_gelu", "gelu")
# entries of OpenAI's released models that are no parameters of open_clip's CLIP
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


@dataclasses.dataclass(frozen=True)
class ClipIdentity:
    architecture: str
    pretrained: str | None  # open_clip tag when loaded from the hub
    weights_sha256: str | None  # sha256 of the local weight file
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # "quick_gelu" | "gelu", the towers' MLP activation. None only when read from a perceiver saved
    # before it was recorded; QualityPerceiver.load then takes the architecture's own activation,
    # which is what open_clip built at the time.
    activation: str | None = None

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
            activation=data.get("activation"),
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


def architecture_activation(architecture: str) -> str:
    """The activation open_clip builds for ``architecture`` when nothing forces it."""
    import open_clip

    config = open_clip.get_model_config(architecture)
    if config is None:
        raise ValueError(f"unknown open_clip architecture '{architecture}'; register its JSON first")
    return "quick_gelu" if config.get("quick_gelu") else "gelu"


@functools.lru_cache(maxsize=None)
def _openai_release_sha256s() -> frozenset[str]:
    """sha256 of OpenAI's released CLIP files: their download URLs (listed by open_clip) carry it."""
    import open_clip

    found: set[str] = set()
    for architecture, tag in open_clip.list_pretrained():
        if tag == "openai":
            found.update(re.findall(r"/([0-9a-f]{64})/", open_clip.get_pretrained_cfg(architecture, tag).get("url", "")))
    return frozenset(found)


def _local_weights_activation(source: weights.WeightSource, state: dict) -> tuple[str | None, str]:
    """(activation the file's weights were trained with or None when unknown, how that is known)."""
    from perceive_ir.weights.torchscript import is_torchscript_archive

    if source.sha256 in _openai_release_sha256s():
        return "quick_gelu", f"OpenAI's released file '{source.path.name}' (sha256 {source.sha256})"
    if all(k in state for k in _OPENAI_EXTRA_KEYS):
        form = "TorchScript archive" if is_torchscript_archive(source.path) else "state dict"
        return "quick_gelu", f"OpenAI's {form} '{source.path}' (it has {'/'.join(_OPENAI_EXTRA_KEYS)})"
    config = source.path.parent / "open_clip_config.json"
    if config.is_file():
        model_cfg = json.loads(config.read_text()).get("model_cfg", {})
        return ("quick_gelu" if model_cfg.get("quick_gelu") else "gelu"), f"'{config}'"
    return None, f"'{source.path}' (origin unknown)"


def _choose_activation(
    architecture: str, requested: str, trained: str | None, evidence: str, config_key: str
) -> str:
    """The activation to build: the weights' own when known; refuses settings that contradict it."""
    section = config_key.rpartition(".")[0]
    arch_key, activation_key = f"{section}.architecture", f"{section}.clip_activation"
    if requested not in ("auto", *ACTIVATIONS):
        raise ValueError(f"'{activation_key}' is '{requested}'; expected auto, quick_gelu or gelu")
    if trained and requested not in ("auto", trained):
        raise ValueError(
            f"'{activation_key}' asks for {requested} towers but the weights of {evidence} were trained "
            f"with {trained}; set it to '{trained}' or 'auto'"
        )
    built = architecture_activation(architecture)
    chosen = trained or (built if requested == "auto" else requested)
    if built == "quick_gelu" and chosen == "gelu":
        reason = f"the weights of {evidence} were trained with GELU" if trained else f"'{activation_key}' is gelu"
        raise ValueError(
            f"'{arch_key}' is '{architecture}', a QuickGELU architecture, but {reason}; "
            "use the architecture without '-quickgelu'"
        )
    return chosen


def _load_local_clip(model: nn.Module, source: weights.WeightSource, state: dict, architecture: str, config_key: str) -> None:
    state = {k: v for k, v in state.items() if k not in _OPENAI_EXTRA_KEYS}
    weights.load_exact(
        model,
        state,
        what=f"CLIP {architecture}",
        path=source.path,
        config_key=config_key,
        expected=f"open_clip '{architecture}' weights (OpenAI's .pt archive, an OpenAI or open_clip state dict, "
        "or an open_clip checkpoint)",
    )


def load_clip(
    architecture: str,
    pretrained: str | None = "openai",
    weights_file: str | Path | None = None,
    config_key: str = "perceiver.clip_weights",
    activation: str = "auto",
) -> tuple[nn.Module, ClipIdentity]:
    """A frozen open_clip model (eval mode, no gradients) and its identity.

    ``weights_file`` (a local file or open_clip hub folder) takes precedence over the hub tag
    ``pretrained``; with neither, the model is randomly initialised (tests only). ``activation``
    (auto, quick_gelu or gelu) must agree with the weights where their origin is known; errors
    name the settings next to ``config_key`` (``<section>.architecture``, ``<section>.clip_activation``).
    """
    import open_clip

    if architecture not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture '{architecture}'; register its JSON first")
    sha = tag = source = state = None
    trained, evidence = None, "no pretrained weights"
    if weights_file:
        source = weights.resolve(
            what=f"CLIP {architecture}",
            config_key=config_key,
            local_file=weights_file,
            hub_name=None,
            folder_files=CLIP_FILES,
        )
        sha = source.sha256
        state = weights.read_state_dict(source.path, config_key)
        trained, evidence = _local_weights_activation(source, state)
    elif pretrained:
        tag_cfg = open_clip.get_pretrained_cfg(architecture, pretrained)
        if not tag_cfg:
            raise ValueError(
                f"open_clip has no pretrained tag '{pretrained}' for '{architecture}'; "
                f"known: {open_clip.list_pretrained_tags_by_model(architecture)}"
            )
        tag = pretrained
        trained = "quick_gelu" if tag_cfg.get("quick_gelu") else "gelu"
        evidence = f"open_clip tag '{tag}'"
    chosen = _choose_activation(architecture, activation, trained, evidence, config_key)
    quick = chosen == "quick_gelu"
    if tag:  # fails at once, naming the file to fetch, when the hub cannot be reached
        weights.resolve(
            what=f"CLIP {architecture}",
            config_key=config_key,
            local_file=None,
            hub_name=tag,
            hub_repo=(tag_cfg.get("hf_hub") or "").strip("/") or None,
            hub_files=CLIP_FILES,
        )
    if state is not None:
        model = open_clip.create_model(architecture, pretrained=None, force_quick_gelu=quick)
        _load_local_clip(model, source, state, architecture, config_key)
    else:
        model = open_clip.create_model(architecture, pretrained=tag, force_quick_gelu=quick)
    logger.info("CLIP %s with %s towers (weights: %s)", architecture, chosen, evidence)
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
        activation=chosen,
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

    cast = clip.transformer.get_cast_dtype()  # the towers' own dtype (fp32 where kept so), autocast off
    with full_precision(embeddings.device):
        x = embeddings.to(cast) + clip.positional_embedding.to(cast)
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        if clip.text_projection is not None:
            x = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection
        return F.normalize(x, dim=-1)
