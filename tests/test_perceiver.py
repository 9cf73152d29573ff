"""The stage-1 quality perceiver: frozen CLIP, learned tier prompts, persistence, offline weights."""

from __future__ import annotations

import pytest
import torch

from _model_fixtures import (
    HELD_OUT_PHOTOS,
    TINY_CLIP_JSON,
    TRAIN_PHOTOS,
    add_noise,
    blur,
    random_crops,
    tiny_clip_file,
    tiny_perceiver,
)
from perceive_ir.models import PerceiverConfig, PerceiverIdentityError, QualityPerceiver
from perceive_ir.weights import MissingWeightsError


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    return tiny_clip_file(root / "clip_a.safetensors", seed=1), tiny_clip_file(root / "clip_b.safetensors", seed=2)


def test_only_prompts_learn_and_images_get_gradient(clip_files):
    perceiver = tiny_perceiver(clip_files[0])
    images = random_crops(TRAIN_PHOTOS, 3, 48, seed=0).requires_grad_(True)
    perceiver.loss(images, torch.tensor([0, 1, 2])).backward()
    assert perceiver.prompts.context.grad is not None and perceiver.prompts.context.grad.abs().sum() > 0
    assert all(p.grad is None for p in perceiver.clip.parameters())
    assert [n for n, p in perceiver.named_parameters() if p.requires_grad] == ["prompts.context"]
    assert images.grad is not None and images.grad.abs().sum() > 0  # stage 2 back-propagates through it


def test_prompt_initialisation_uses_tier_words(clip_files):
    perceiver = tiny_perceiver(clip_files[0])
    context = perceiver.prompts.context.detach()
    assert context.shape == (3, 16, 64)
    tokenizer = __import__("open_clip").get_tokenizer("clip_tiny")
    for k, word in enumerate(["terrible", "mediocre", "excellent"]):
        ids = tokenizer([word])[0]
        ids = ids[ids != 0][1:-1]
        expected = perceiver.clip.token_embedding(ids).mean(0)
        torch.testing.assert_close(context[k, -1], expected)
    assert 0.01 < context[:, :-1].std() < 0.03  # N(0, 0.02)


def test_any_size_gives_probabilities_and_scores(clip_files):
    perceiver = tiny_perceiver(clip_files[0], score="expected_tier")
    for shape in [(2, 3, 40, 90), (1, 3, 128, 64)]:
        probs = perceiver.tier_probs(torch.rand(shape))
        assert probs.shape == (shape[0], 3)
        torch.testing.assert_close(probs.sum(-1), torch.ones(shape[0]))
        score = perceiver.quality_score(torch.rand(shape))
        assert score.shape == (shape[0],) and ((score >= 0) & (score <= 1)).all()


def _tiered_batch(names, n, seed):
    """low = noisy + blurred, medium = mildly noisy, high = clean, on real photo crops."""
    clean = random_crops(names, n, 64, seed)
    low = add_noise(blur(clean, 5), 0.2, seed + 1)
    medium = add_noise(clean, 0.06, seed + 2)
    images = torch.cat([low, medium, clean])
    tiers = torch.arange(3).repeat_interleave(n)
    return images, tiers


def test_stage1_fit_separates_tiers_on_held_out_crops(clip_files):
    torch.manual_seed(0)
    perceiver = tiny_perceiver(clip_files[0])
    images, tiers = _tiered_batch(TRAIN_PHOTOS, 24, seed=10)
    held_images, held_tiers = _tiered_batch(HELD_OUT_PHOTOS, 20, seed=20)
    optimizer = torch.optim.AdamW([perceiver.prompts.context], lr=2e-2)
    losses = []
    for step in range(41):
        loss = perceiver.loss(images, tiers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    with torch.no_grad():
        accuracy = (perceiver.tier_probs(held_images).argmax(-1) == held_tiers).float().mean().item()
    print(f"stage-1 held-out tier accuracy: {accuracy:.3f} (chance 0.333)")
    # the tiny CLIP here is randomly initialised (no pretrained weights offline): its image features
    # carry little quality information, so the bar is "above chance", not the pretrained ViT-B/32's
    assert accuracy > 0.36


def test_saved_perceiver_scores_identically_and_refuses_other_clip(clip_files, tmp_path):
    perceiver = tiny_perceiver(clip_files[0])
    with torch.no_grad():
        perceiver.prompts.context.add_(0.05 * torch.randn_like(perceiver.prompts.context))
    images = random_crops(HELD_OUT_PHOTOS, 4, 40, seed=3)
    saved = perceiver.save(tmp_path / "perceiver")
    assert sorted(p.name for p in saved.iterdir()) == ["perceiver.json", "prompts.safetensors"]

    loaded = QualityPerceiver.load(saved, clip_weights=str(clip_files[0]), arch_config=str(TINY_CLIP_JSON))
    with torch.no_grad():
        torch.testing.assert_close(loaded.tier_probs(images), perceiver.tier_probs(images), rtol=0, atol=0)
        torch.testing.assert_close(loaded.quality_score(images), perceiver.quality_score(images), rtol=0, atol=0)

    with pytest.raises(PerceiverIdentityError, match="weights_sha256"):
        QualityPerceiver.load(saved, clip_weights=str(clip_files[1]), arch_config=str(TINY_CLIP_JSON))
    with pytest.raises(PerceiverIdentityError, match="perceiver.clip_weights"):
        QualityPerceiver.load(saved)


def test_offline_missing_clip_weights_fail_at_once(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(MissingWeightsError) as err:
        PerceiverConfig(architecture="ViT-B-32", pretrained="openai").build()
    message = str(err.value)
    assert "perceiver.clip_weights" in message and "vit_base_patch32_clip_224.openai" in message
    with pytest.raises(MissingWeightsError, match="does not exist"):
        PerceiverConfig(clip_weights=str(tmp_path / "missing.safetensors")).build()
