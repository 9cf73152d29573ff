"""Stage-2 losses: InfoNCE value and gradient, perceptual ratio, difficulty weights, CLIP quality."""

from __future__ import annotations

import math

import pytest
import torch

from _model_fixtures import HELD_OUT_PHOTOS, TINY_VGG, add_noise, blur, random_crops, tiny_clip_file, tiny_perceiver
from perceive_ir.config import from_dict
from perceive_ir.losses import (
    ClipQualityLoss,
    ContrastConfig,
    DegradationContrastLoss,
    DifficultyAdaptivePerceptualLoss,
    PerceptualConfig,
    difficulty_weights,
)
from perceive_ir.models.degradation_encoder import CompactDegradationEncoder


def test_infonce_known_value():
    theta = 0.5
    anchor = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    positive = torch.tensor([[math.cos(theta), math.sin(theta)], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    types = torch.tensor([0, 1, 0])  # sample 2 shares sample 0's type: never its negative
    loss, no_negative = DegradationContrastLoss(ContrastConfig(temperature=0.1))(anchor, positive, types)
    t = 0.1
    # sample 0: positive cos(theta); negatives a_1, p_1 (both cosine 0)
    l0 = -math.log(math.exp(math.cos(theta) / t) / (math.exp(math.cos(theta) / t) + 2))
    # sample 1: positive 1; negatives a_0, p_0, a_2, p_2 with cosines 0, sin(theta), 0, 0
    l1 = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 3 + math.exp(math.sin(theta) / t)))
    # sample 2: positive 1; negatives a_1, p_1
    l2 = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2))
    assert loss.item() == pytest.approx((l0 + l1 + l2) / 3, rel=1e-9)
    assert no_negative.item() == 0.0 and not no_negative.requires_grad


def test_infonce_anchors_without_negative_leave_the_mean_and_keep_the_graph():
    """A batch of one type: no anchor has a negative; the loss is 0, not a mean of 0s over
    anchors that had nothing to contrast with, and every CFE parameter still gets a gradient."""
    torch.manual_seed(0)
    cfe = CompactDegradationEncoder([8, 16, 16, 16], code_dim=16)
    degraded = add_noise(random_crops(HELD_OUT_PHOTOS, 3, 48, seed=1), 0.1, 0)
    loss_fn = DegradationContrastLoss()
    loss, no_negative = loss_fn(cfe(degraded[..., :32, :32]), cfe(degraded[..., 16:, 16:]), torch.tensor([2, 2, 2]))
    assert loss.item() == 0.0 and no_negative.item() == 1.0 and not no_negative.requires_grad
    assert loss.requires_grad
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in cfe.parameters())


def test_stage2_loss_logs_the_no_negative_fraction_outside_the_total():
    from perceive_ir.losses import LossConfig

    anchor = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    positive = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    clean = torch.zeros(2, 3, 8, 8)
    loss = from_dict(LossConfig, {"l1": 0.5, "l2": 0.0, "l3": 0.0}).build()
    restored = clean + 0.25
    one_type = loss(restored, clean, restored, codes=(anchor, positive, torch.tensor([1, 1])))
    assert one_type["cl"].item() == 0.0 and one_type["cl_no_negative_frac"].item() == 1.0
    assert one_type["total"].item() == pytest.approx(0.25)  # L_rec only: the fraction is not summed in
    two_types = loss(restored, clean, restored, codes=(anchor, positive, torch.tensor([1, 2])))
    # anchor 0: positive cosine 0.6; negatives a_1 (cosine 0), p_1 (cosine 0.8); anchor 1 symmetric
    expected = -math.log(math.exp(6) / (math.exp(6) + 1 + math.exp(8)))
    assert two_types["cl"].item() == pytest.approx(expected, rel=1e-5)
    assert two_types["cl_no_negative_frac"].item() == 0.0
    assert two_types["total"].item() == pytest.approx(0.25 + 0.5 * expected, rel=1e-5)


def test_infonce_gradient_reaches_the_degradation_encoder():
    torch.manual_seed(0)
    cfe = CompactDegradationEncoder([8, 16, 16, 16], code_dim=16)
    clean = random_crops(HELD_OUT_PHOTOS, 4, 48, seed=1)
    degraded = torch.cat([add_noise(clean[:2], 0.1, 0), blur(clean[2:])])
    types = torch.tensor([0, 0, 1, 1])
    loss, _ = DegradationContrastLoss()(cfe(degraded[..., :32, :32]), cfe(degraded[..., 16:, 16:]), types)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cfe.parameters())


@pytest.fixture(scope="module")
def perceiver(tmp_path_factory):
    return tiny_perceiver(tiny_clip_file(tmp_path_factory.mktemp("clip") / "clip.safetensors", seed=3)).freeze_prompts()


def test_perceptual_ratio_lower_at_ground_truth_than_at_degraded(perceiver):
    torch.manual_seed(0)
    cfg = from_dict(PerceptualConfig, {"vgg": TINY_VGG})
    loss = DifficultyAdaptivePerceptualLoss(cfg, perceiver)
    clean = random_crops(HELD_OUT_PHOTOS, 2, 48, seed=2)
    degraded = add_noise(blur(clean), 0.15, seed=3)
    medium = add_noise(clean, 0.05, seed=4)
    at_truth = loss(clean.clone(), clean, [degraded, medium])
    at_degraded = loss(degraded.clone(), clean, [degraded, medium])
    assert at_truth.item() < at_degraded.item()
    assert at_truth.item() == pytest.approx(0.0, abs=1e-6)
    assert all(p.grad is None for p in loss.vgg.parameters()) and not any(p.requires_grad for p in loss.vgg.parameters())


def test_tier_thresholds_move_difficulty_weights():
    scores = torch.tensor([0.2, 0.5, 0.8])
    default = PerceptualConfig(vgg=from_dict(type(PerceptualConfig().vgg), TINY_VGG))
    assert difficulty_weights(scores, default.tier_thresholds, default.tier_weights).tolist() == [0.75, 1.0, 1.25]
    # raising the thresholds moves negatives down to easier tiers
    assert difficulty_weights(scores, [0.6, 0.9], [0.75, 1.0, 1.25]).tolist() == [0.75, 0.75, 1.0]
    # a score exactly at a threshold belongs to the tier above it
    assert difficulty_weights(torch.tensor([0.6]), [0.6, 0.9], [0.75, 1.0, 1.25]).tolist() == [1.0]
    # relative scores (negative minus current output), threshold 0 -> 0.75 / 1.25
    relative = torch.tensor([-0.1, 0.0, 0.3])
    assert difficulty_weights(relative, [0.0], [0.75, 1.25]).tolist() == [0.75, 1.25, 1.25]


def test_difficulty_weights_follow_the_perceiver(perceiver):
    torch.manual_seed(0)
    cfg = from_dict(PerceptualConfig, {"vgg": TINY_VGG, "difficulty_rule": "perceiver", "tier_thresholds": [0.5],
                                       "tier_weights": [1.0, 2.0]})
    loss = DifficultyAdaptivePerceptualLoss(cfg, perceiver)
    images = random_crops(HELD_OUT_PHOTOS, 3, 48, seed=5)
    scores = perceiver.quality_score(images).detach()
    for threshold in (scores.min().item() - 1e-3, scores.max().item() + 1e-3):
        loss.cfg.tier_thresholds = [threshold]
        weights = loss.negative_weights(images, images, [images])[0]
        assert weights.tolist() == [2.0 if s >= threshold else 1.0 for s in scores.tolist()]


def test_clip_quality_loss_trains_the_image_not_the_perceiver(perceiver):
    restored = random_crops(HELD_OUT_PHOTOS, 2, 48, seed=6).requires_grad_(True)
    loss = ClipQualityLoss(perceiver)(restored)
    assert 0 <= loss.item() <= 1
    loss.backward()
    assert restored.grad.abs().sum() > 0
    assert all(p.grad is None for p in perceiver.parameters())


def test_identity_term_scores_the_restorer_on_clean_inputs_only_when_weighted():
    from perceive_ir.config import ConfigError
    from perceive_ir.losses import LossConfig
    from perceive_ir.train.steps import Stage2Model

    class Shift(torch.nn.Module):  # R(x) = x + 0.1, whatever the input
        def __init__(self) -> None:
            super().__init__()
            self.bias = torch.nn.Parameter(torch.tensor(0.1))

        def forward(self, x, prior=None):
            return x + self.bias

    clean = torch.rand(4, 3, 8, 8) * 0.5
    degraded = clean + 0.3
    ids, types = ["a", "b", "c", "d"], torch.zeros(4, dtype=torch.int64)
    plain = from_dict(LossConfig, {"l1": 0.0, "l2": 0.0, "l3": 0.0}).build()
    terms, _ = Stage2Model(Shift(), plain)(degraded, clean, ids, types)
    assert "id" not in terms and terms["total"].item() == pytest.approx(0.4)
    weighted = from_dict(LossConfig, {"l1": 0.0, "l2": 0.0, "l3": 0.0, "identity": 0.5, "identity_share": 0.5}).build()
    model = Stage2Model(Shift(), weighted)
    terms, _ = model(degraded, clean, ids, types)
    assert terms["id"].item() == pytest.approx(0.1)  # R(clean) - clean, not R(degraded) - clean
    assert terms["total"].item() == pytest.approx(0.4 + 0.5 * 0.1)
    terms["total"].backward()
    assert model.restorer.bias.grad.item() == pytest.approx(1.0 + 0.5)  # both terms reach the restorer
    with pytest.raises((ConfigError, ValueError), match="identity_share"):
        from_dict(LossConfig, {"identity_share": 0.0})
