"""L_dpl's two difficulty rules on constructed inputs with hand-computed weights.

``reference``: the degraded input weighs 2; a medium-tier negative 1.25 when its PSNR against the
ground truth is at or below the probe PSNR, else 0.75. ``perceiver``: tiers of a quality score.
(The probe PSNR measured at each epoch of a real training, and its resume: tests/test_train.py; the
probe per degradation type, drawn from the training stream: below.)
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from _model_fixtures import TINY_VGG
from perceive_ir.config import ConfigError, from_dict
from perceive_ir.eval.metrics import psnr
from perceive_ir.losses import DifficultyAdaptivePerceptualLoss, PerceptualConfig, reference_weights


class MeanBrightnessPerceiver(nn.Module):
    """A perceiver with known scores: an image's quality score is its mean pixel value."""

    def quality_score(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1).mean(1)


def flat(values: list[float], size: int = 8) -> torch.Tensor:
    """One flat 3 x size x size image per value."""
    return torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 3, size, size).clone()


def loss_with(rule: str, perceiver: nn.Module | None = None, **params) -> DifficultyAdaptivePerceptualLoss:
    torch.manual_seed(0)
    cfg = from_dict(PerceptualConfig, {"vgg": TINY_VGG, "difficulty_rule": rule, **params})
    return DifficultyAdaptivePerceptualLoss(cfg, perceiver)


def test_known_psnrs_around_the_probe_give_hand_computed_weights():
    target = flat([0.5, 0.5])
    degraded = flat([0.9, 0.501])  # 7.96 dB and 60 dB: the degraded input weighs 2 either way
    medium_a = flat([0.6, 0.51])  # 0.1 off: 20 dB; 0.01 off: 40 dB
    medium_b = flat([0.53, 0.8])  # 30.46 dB (the tie below); 10.46 dB
    assert psnr(medium_a, target).tolist() == pytest.approx([20.0, 40.0], abs=1e-4)
    loss = loss_with("reference")
    loss.probe_psnr.fill_(psnr(medium_b, target)[0].item())  # ties at equality count as hard
    assert loss.probe_psnr[-1].item() == pytest.approx(20 * math.log10(1 / 0.03), abs=1e-4)
    weights = loss.negative_weights(target, target, [degraded, medium_a, medium_b])
    assert weights.tolist() == [[2.0, 2.0], [1.25, 0.75], [1.25, 1.25]]

    # the forward uses exactly these weights: the same value as with them given, not with others
    restored = flat([0.55, 0.45]).requires_grad_(True)
    negatives = [degraded, medium_a, medium_b]
    ruled = loss(restored, target, negatives)
    assert ruled.item() == loss(restored, target, negatives, weights=weights).item()
    assert ruled.item() != pytest.approx(loss(restored, target, negatives, weights=torch.ones(3, 2)).item())


def test_the_degraded_input_alone_and_configured_weights():
    target = flat([0.5])
    loss = loss_with("reference", hard_weight=3.0, easy_weight=0.5, degraded_weight=7.0)
    loss.probe_psnr.fill_(25.0)
    assert loss.negative_weights(target, target, [flat([0.6])]).tolist() == [[7.0]]  # no medium tier
    weights = loss.negative_weights(target, target, [flat([0.6]), flat([0.6]), flat([0.51])])
    assert weights.tolist() == [[7.0], [3.0], [0.5]]  # 20 dB <= 25: hard; 40 dB > 25: easy


def test_reference_weights_function_on_given_psnrs():
    medium = torch.tensor([[29.9, 30.0, 30.1], [10.0, 50.0, 30.0]])
    weights = reference_weights(medium, torch.tensor([30.0]))
    assert weights.tolist() == [[2.0] * 3, [1.25, 1.25, 0.75], [1.25, 0.75, 1.25]]
    assert reference_weights(torch.zeros(0, 2), torch.tensor([30.0])).tolist() == [[2.0, 2.0]]


def test_probe_psnr_is_a_buffer_unmeasured_means_every_medium_negative_is_hard():
    loss = loss_with("reference")
    assert "probe_psnr" in loss.state_dict() and bool(loss.probe_psnr.isinf().all())
    target = flat([0.5])
    weights = loss.negative_weights(target, target, [flat([0.9]), flat([0.5001])])  # 80 dB medium
    assert weights.tolist() == [[2.0], [1.25]]
    loss.probe_psnr.fill_(31.5)
    restored = loss_with("reference")
    restored.load_state_dict(loss.state_dict())  # a checkpoint carries the measured value
    assert restored.probe_psnr.tolist() == [31.5] * len(restored.probe_psnr)
    assert restored.to(torch.device("meta")).probe_psnr.device.type == "meta"  # follows the module


def test_reference_rule_ignores_the_perceiver():
    target = flat([0.5])
    bright_medium = flat([0.6])  # 20 dB; its perceiver score (0.6) plays no part
    loss = loss_with("reference", MeanBrightnessPerceiver())
    loss.probe_psnr.fill_(19.0)
    assert loss.negative_weights(target, target, [flat([0.1]), bright_medium]).tolist() == [[2.0], [0.75]]


def test_perceiver_rule_tiers_every_negative_by_its_score():
    target = flat([0.5, 0.5])
    negatives = [flat([0.1, 0.8]), flat([0.5, 0.25]), flat([0.75, 0.3])]  # degraded input first
    loss = loss_with("perceiver", MeanBrightnessPerceiver(), tier_thresholds=[0.25, 0.75],
                     tier_weights=[0.75, 1.0, 1.25])
    assert "probe_psnr" not in loss.state_dict() and not loss.uses_probe
    # absolute: 0.1 -> tier 0, 0.8 -> 2; 0.5 -> 1, 0.25 (at a threshold) -> 1; 0.75 -> 2, 0.3 -> 1
    weights = loss.negative_weights(target, target, negatives)
    assert weights.tolist() == [[0.75, 1.25], [1.0, 1.0], [1.25, 1.0]]
    # relative to the current output's score (0.5 and 0.5), threshold 0: -0.4, 0.3; 0 (tie), -0.25; 0.25, -0.2
    relative = loss_with("perceiver", MeanBrightnessPerceiver(), tier_thresholds=[0.0], tier_weights=[0.75, 1.25],
                         difficulty_reference="relative")
    weights = relative.negative_weights(flat([0.5, 0.5]), target, negatives)
    assert weights.tolist() == [[0.75, 1.25], [1.25, 0.75], [1.25, 0.75]]
    assert loss_with("perceiver").negative_weights(target, target, negatives).tolist() == [[1.0, 1.0]] * 3


def test_bad_rule_settings_name_the_field():
    with pytest.raises(ConfigError, match="difficulty_rule"):
        from_dict(PerceptualConfig, {"vgg": TINY_VGG, "difficulty_rule": "relative"})
    with pytest.raises(ConfigError, match="degraded_weight must be >= 0"):
        from_dict(PerceptualConfig, {"vgg": TINY_VGG, "degraded_weight": -1.0})
    assert from_dict(PerceptualConfig, {"vgg": TINY_VGG}).difficulty_rule == "reference"


def test_the_per_task_probe_compares_each_sample_with_its_own_type():
    """Two samples whose medium negatives score the same 30.46 dB: hard for a noise sample (its type's
    probe PSNR is 32), easy for a haze sample (probe 28); the pooled rule gives both the pooled 30."""
    from perceive_ir.train.steps import type_index

    target = flat([0.5, 0.5])
    medium = flat([0.53, 0.53])
    types = type_index(["gaussian_noise", "haze"], torch.device("cpu"))
    for rule, expected in (("per_task", [[2.0, 2.0], [1.25, 0.75]]), ("pooled", [[2.0, 2.0], [0.75, 0.75]])):
        loss = loss_with("reference", probe=rule)
        loss.probe_psnr.fill_(30.0)
        loss.probe_psnr[loss.slot_of("gaussian_noise")] = 32.0
        loss.probe_psnr[loss.slot_of("haze")] = 28.0
        assert loss.negative_weights(target, target, [flat([0.9, 0.9]), medium], types).tolist() == expected, rule
    # a label no type registers (a paired set's own name) takes the pooled slot
    loss = loss_with("reference")
    assert loss.slot_of("some_dataset") == len(loss.probe_psnr) - 1
    unknown = type_index(["some_dataset"], torch.device("cpu"))
    assert loss.probe_for(unknown).tolist() == [math.inf]


def test_a_checkpoint_of_the_pooled_probe_loads_into_every_slot():
    old = {"probe_psnr": torch.tensor([27.5])}
    loss = loss_with("reference")
    missing, unexpected = loss.load_state_dict(old, strict=False)
    assert "probe_psnr" not in missing and not unexpected
    assert loss.probe_psnr.tolist() == [27.5] * len(loss.probe_psnr)


def test_the_training_probe_is_drawn_from_the_stream_per_type_and_measured_per_type(package_photos, tmp_path):
    """The probe draws the training stream's samples (its degradation mixture), groups them by type and
    measures each type's PSNR: with the identity as the model, each slot is its type's input PSNR."""
    from _train_fixtures import build_tiny_shards
    from perceive_ir.data.pipeline import LoaderConfig, ShardSourceConfig
    from perceive_ir.degrade import DegradationConfig, Degrader
    from perceive_ir.train.loop import ProbeSet, draw_training_probe

    shards = build_tiny_shards(package_photos, str(tmp_path / "shards"))
    loader = LoaderConfig(sources=[ShardSourceConfig(shards)], patch_size=32, batch_size=2, num_workers=0)
    degrader = Degrader(from_dict(DegradationConfig, {"mixture": {"gaussian_noise": 1.0, "haze": 1.0}, "seed": 0}))
    drawn = draw_training_probe(loader, degrader, torch.device("cpu"), images=16)
    assert set(drawn) == {"gaussian_noise", "haze"} and sum(len(d) for d, _ in drawn.values()) == 16
    again = draw_training_probe(loader, degrader, torch.device("cpu"), images=16)
    assert all(torch.equal(drawn[k][0], again[k][0]) for k in drawn)  # seeded: the same at every launch
    loss = loss_with("reference")
    probe = ProbeSet(None, 1, lambda images: draw_training_probe(loader, degrader, torch.device("cpu"), images))
    types = probe.measure(lambda x: x, loss.probe_psnr, loss.slot_of, source="training", images=16, chunk=3)
    assert sorted(types) == ["gaussian_noise", "haze"]
    inputs = {k: psnr(d, c) for k, (d, c) in drawn.items()}
    for kind, values in inputs.items():
        assert loss.probe_psnr[loss.slot_of(kind)].item() == pytest.approx(values.mean().item(), abs=1e-4)
    assert loss.probe_psnr[-1].item() == pytest.approx(torch.cat(list(inputs.values())).mean().item(), abs=1e-4)
    assert loss.probe_psnr[loss.slot_of("rain")].item() == loss.probe_psnr[-1].item()  # not drawn: pooled
