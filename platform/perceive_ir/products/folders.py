"""What the jobs hand on: folders of safetensors + JSON, loadable without executing code.

- perceiver: ``QualityPerceiver.save`` output, plus ``clip.safetensors`` (and ``arch/<architecture>.json``)
  when it was trained over a local CLIP file, so the folder alone rebuilds it;
- medium tier: ``medium_tier.json`` (restorer config, K) + ``fold_{j}.safetensors``;
- restorer: ``restorer.json`` (restorer config) + ``model.safetensors``.

Where a product comes from (a folder, an MLflow URI) is :mod:`perceive_ir.products.locations`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from perceive_ir.config import from_dict, to_dict
from perceive_ir.models import MediumTierGenerator, PerceiverConfig, QualityPerceiver, RestorerConfig
from perceive_ir import weights
from perceive_ir.models.clip_backend import CLIP_FILES
from perceive_ir.models.medium_tier import FOLD_RULE

log = logging.getLogger(__name__)

__all__ = [
    "save_restorer",
    "load_restorer",
    "save_medium_tier",
    "load_medium_tier",
    "save_perceiver",
    "load_perceiver",
    "medium_tier_generator",
    "ensure_clip_weights",
]


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}


def save_restorer(restorer: nn.Module, cfg: RestorerConfig, directory: str | Path, name: str = "model") -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(_state(restorer), str(directory / f"{name}.safetensors"))
    (directory / "restorer.json").write_text(json.dumps(to_dict(cfg), indent=2))
    return directory


def _load_weights(module: nn.Module, path: Path) -> nn.Module:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"weights file '{path}' does not exist")
    missing, unexpected = module.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise ValueError(f"'{path}' does not fit the configured restorer: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return module


def load_restorer(directory: str | Path, name: str = "model") -> tuple[nn.Module, RestorerConfig]:
    directory = Path(directory)
    cfg = from_dict(RestorerConfig, json.loads((directory / "restorer.json").read_text()), str(directory / "restorer.json"))
    return _load_weights(cfg.build(), directory / f"{name}.safetensors"), cfg


def save_medium_tier(restorers: list[nn.Module], cfg: RestorerConfig, directory: str | Path) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for j, restorer in enumerate(restorers):
        save_file(_state(restorer), str(directory / f"fold_{j}.safetensors"))
    meta = {"k": len(restorers), "fold_rule": FOLD_RULE, "restorer": to_dict(cfg)}
    (directory / "medium_tier.json").write_text(json.dumps(meta, indent=2))
    return directory


def load_medium_tier(directory: str | Path) -> tuple[list[nn.Module], RestorerConfig]:
    directory = Path(directory)
    meta_file = directory / "medium_tier.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"'{directory}' is not a medium-tier folder (no medium_tier.json)")
    meta = json.loads(meta_file.read_text())
    if meta.get("fold_rule") != FOLD_RULE:
        log.warning("%s: fold rule %r, not %r: these hold-out restorers may have trained on ground truths "
                    "they score (several degraded versions or tiles of one clean image in different folds); "
                    "train stage 1 again", meta_file, meta.get("fold_rule", "sample key"), FOLD_RULE)
    cfg = from_dict(RestorerConfig, meta["restorer"], str(meta_file))
    restorers = [_load_weights(cfg.build(), directory / f"fold_{j}.safetensors") for j in range(int(meta["k"]))]
    return restorers, cfg


def medium_tier_generator(directory: str | Path) -> MediumTierGenerator:
    restorers, _ = load_medium_tier(directory)
    return MediumTierGenerator(restorers)


def save_perceiver(perceiver: QualityPerceiver, cfg: PerceiverConfig, directory: str | Path) -> Path:
    directory = Path(perceiver.save(directory))
    if cfg.clip_weights:  # a file or a hub folder: copy the weight file it resolves to (same sha256)
        source = weights.resolve(what=f"CLIP {cfg.architecture}", config_key="perceiver.clip_weights",
                                 local_file=cfg.clip_weights, hub_name=None, folder_files=CLIP_FILES)
        shutil.copyfile(source.path, directory / "clip.safetensors")
    if cfg.arch_config:  # open_clip names an architecture after its JSON file
        (directory / "arch").mkdir(exist_ok=True)
        shutil.copyfile(cfg.arch_config, directory / "arch" / f"{cfg.architecture}.json")
    return directory


def load_perceiver(directory: str | Path) -> QualityPerceiver:
    directory = Path(directory)
    if not (directory / "perceiver.json").is_file():
        raise FileNotFoundError(f"'{directory}' is not a perceiver folder (no perceiver.json)")
    clip = directory / "clip.safetensors"
    arch = sorted((directory / "arch").glob("*.json")) if (directory / "arch").is_dir() else []
    return QualityPerceiver.load(directory, clip_weights=str(clip) if clip.is_file() else None,
                                 arch_config=str(arch[0]) if arch else None)


def ensure_clip_weights(cfg: PerceiverConfig, seed: int | None, cache: str | Path) -> PerceiverConfig:
    """Without pretrained CLIP weights (the tiny offline profile), a seeded random CLIP saved as a file
    gives the perceiver a reproducible identity; every worker builds the very same file."""
    if cfg.clip_weights or cfg.pretrained or seed is None:
        return cfg
    import dataclasses

    import open_clip
    from safetensors.torch import save_file

    from perceive_ir.models.clip_backend import register_arch_config

    if cfg.arch_config:
        register_arch_config(cfg.arch_config)
    path = Path(cache) / f"{cfg.architecture}-seed{seed}.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        model = open_clip.create_model(cfg.architecture, pretrained=None)
        torch.random.set_rng_state(state)
        partial = path.with_suffix(".partial")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(partial))
        partial.replace(path)
    return dataclasses.replace(cfg, clip_weights=str(path))
