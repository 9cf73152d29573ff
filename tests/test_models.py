"""Restorer backbones, the Perceive-IR conditioning attached from outside, the medium tier, stage-2 training."""

from __future__ import annotations

import pytest
import torch

from _model_fixtures import (
    HELD_OUT_PHOTOS,
    TINY_CONDITIONING,
    TINY_NAFNET,
    TINY_RESTORMER,
    TINY_VGG,
    TRAIN_PHOTOS,
    add_noise,
    blur,
    random_crops,
    tiny_clip_file,
    tiny_perceiver,
)
from perceive_ir.config import ConfigError, from_dict
from perceive_ir.losses import LossConfig
from perceive_ir.models import ConditionedRestorer, MediumTierGenerator, RestorerConfig, fold_of
from perceive_ir.components import ComponentSpec

BACKBONES = {"restormer": TINY_RESTORMER, "nafnet": TINY_NAFNET}


def randomise_output_layer(backbone) -> None:
    """Restorers start as input + (almost) 0; a random output projection makes the residual visible."""
    last = backbone.ending if hasattr(backbone, "ending") else backbone.output
    torch.nn.init.normal_(last.weight, std=0.05)


def tiny_restorer(backbone: str, conditioned: bool):
    cond = ComponentSpec("perceive_ir", TINY_CONDITIONING) if conditioned else ComponentSpec("none")
    return RestorerConfig(backbone=ComponentSpec(backbone, BACKBONES[backbone]), conditioning=cond).build()


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("conditioned", [False, True])
def test_any_size_and_gradients(backbone, conditioned):
    torch.manual_seed(0)
    net = tiny_restorer(backbone, conditioned)
    x = random_crops(HELD_OUT_PHOTOS, 2, 48, seed=0)[..., :37, :45]
    out = net(x, None)
    assert out.shape == x.shape
    out.mean().backward()
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in trainable), [n for n, p in trainable if p.grad is None]
    if conditioned:
        semantic = net.conditioning.semantic.backbone
        assert all(not p.requires_grad and p.grad is None for p in semantic.parameters())


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_conditioning_attaches_through_decoder_hooks(backbone):
    torch.manual_seed(0)
    net = tiny_restorer(backbone, conditioned=True)
    assert isinstance(net, ConditionedRestorer)
    randomise_output_layer(net.backbone)
    x = random_crops(HELD_OUT_PHOTOS, 2, 32, seed=1)
    with torch.no_grad():
        plain = net.backbone(x)  # the backbone alone, hooks inactive
        prior = net.prior(x)
        conditioned = net(x, prior)
        assert not torch.allclose(plain, conditioned)
        # FiLM starts as the identity; once trained, the prior steers the output
        for stage in net.conditioning.stages:
            torch.nn.init.normal_(stage.film.mlp[-1].weight, std=0.1)
        conditioned = net(x, prior)
        other = type(prior)(torch.roll(prior.code, 1, 0), prior.semantic)
        assert not torch.allclose(net(x, other), conditioned)
    assert len(net.conditioning.stages) == len(net.backbone.decoder_stages())


def test_registry_names_and_typed_params():
    with pytest.raises(ConfigError, match="registered: nafnet, restormer"):
        RestorerConfig(backbone=ComponentSpec("unet"))
    with pytest.raises(ConfigError, match="blocks"):
        RestorerConfig(backbone=ComponentSpec("restormer", {"blocks": "four"}))
    cfg = from_dict(RestorerConfig, {"backbone": {"name": "nafnet", "params": TINY_NAFNET}, "conditioning": {"name": "none"}})
    assert type(cfg.build()).__name__ == "NAFNet"


def test_reference_network_counts_42m_trainable():
    net = RestorerConfig(
        conditioning=ComponentSpec("perceive_ir", {"semantic": {"pretrained": False}})
    ).build()
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert abs(trainable - 42e6) / 42e6 < 0.10, trainable


def test_medium_tier_uses_the_held_out_restorer():
    class AddConstant(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = value

        def forward(self, x):
            return x + self.value

    gen = MediumTierGenerator([AddConstant(0.1), AddConstant(0.2), AddConstant(0.3)])
    keys = [f"bsd400/{i:04d}" for i in range(12)]
    x = torch.full((12, 3, 8, 8), 0.5)
    out = gen(x, keys)
    for i, key in enumerate(keys):
        fold = fold_of(key, 3)
        assert fold == gen.folds([key])[0]
        torch.testing.assert_close(out[i], torch.full((3, 8, 8), 0.5 + 0.1 * (fold + 1)))
    assert fold_of("bsd400/0001", 2) == fold_of("bsd400/0001", 2)
    assert len({fold_of(k, 3) for k in keys}) == 3


def _degraded_pair(clean: torch.Tensor, seed: int):
    """Half noise (type 0), half blur (type 1); two overlapping crops of each degraded image."""
    half = clean.shape[0] // 2
    degraded = torch.cat([add_noise(clean[:half], 0.1, seed), blur(clean[half:], 3)])
    types = torch.tensor([0] * half + [1] * (clean.shape[0] - half))
    return degraded, types


@pytest.fixture(scope="module")
def perceiver(tmp_path_factory):
    return tiny_perceiver(tiny_clip_file(tmp_path_factory.mktemp("clip") / "clip.safetensors", seed=4)).freeze_prompts()


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("conditioned", [False, True])
def test_stage2_training_lowers_held_out_l1(backbone, conditioned, perceiver):
    torch.manual_seed(0)
    net = tiny_restorer(backbone, conditioned)
    randomise_output_layer(net.backbone if conditioned else net)
    loss_fn = from_dict(
        LossConfig, {"perceptual": {"name": "difficulty_adaptive_perceptual", "params": {"vgg": TINY_VGG}}}
    ).build(perceiver)
    medium_tier = MediumTierGenerator([tiny_restorer("nafnet", False) for _ in range(2)])
    clean = random_crops(TRAIN_PHOTOS, 32, 40, seed=7)
    degraded, types = _degraded_pair(clean, seed=8)
    keys = [f"train/{i}" for i in range(len(clean))]
    held_clean = random_crops(HELD_OUT_PHOTOS, 8, 32, seed=9)
    held_degraded, _ = _degraded_pair(held_clean, seed=10)

    def held_out_l1():
        with torch.no_grad():
            return (net(held_degraded, None) - held_clean).abs().mean().item()

    before = held_out_l1()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    for step in range(50):
        index = torch.randperm(len(clean))[:4]
        crop, other = degraded[index, :, :32, :32], degraded[index, :, 8:, 8:]
        target = clean[index, :, :32, :32]
        medium = medium_tier(crop, [keys[i] for i in index])
        if conditioned:
            prior = net.prior(crop)
            codes = (prior.code, net.encode_degradation(other), types[index])
            restored = net(crop, prior)
        else:
            codes, restored = None, net(crop, None)
        terms = loss_fn(restored, target, crop, medium=medium, codes=codes)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
    assert {"rec", "clip", "dpl"} <= set(terms) and (("cl" in terms) == conditioned)
    assert all(p.grad is None for p in perceiver.parameters())
    after = held_out_l1()
    print(f"{backbone} conditioned={conditioned}: held-out L1 {before:.4f} -> {after:.4f}")
    assert after < before
