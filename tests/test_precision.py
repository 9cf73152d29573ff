"""bf16 training with frozen networks in fp32.

The stage-2 model goes through the training path (``train.engine.build_engine``, DeepSpeed in bf16 on
the CPU, the tiny ETB profile): the trained restorer is bf16, while VGG-16 (L_dpl), the perceiver's
CLIP towers (L_clip) and DINOv2 (semantic guidance) keep their fp32 weights, bit for bit, and L_dpl
and L_clip equal the fp32 model's values. Before, DeepSpeed cast them all to bf16 and L_dpl of a
fresh restorer came out about 14x too small.
"""

from __future__ import annotations

import copy

import pytest
import torch

from _model_fixtures import HELD_OUT_PHOTOS, TINY_VGG, add_noise, blur, random_crops, tiny_clip_file, tiny_perceiver
from conftest import REPO, _free_port
from perceive_ir.config import from_dict, load_config
from perceive_ir.losses import LossConfig
from perceive_ir.models import RestorerConfig
from perceive_ir.models.precision import fp32_modules, keep_fp32
from perceive_ir.train.config import EngineConfig, OptimizerConfig
from perceive_ir.train.engine import build_engine, deepspeed_settings, init_distributed
from perceive_ir.train.steps import DegradedBatch, type_index
from perceive_ir.train.tasks import Stage2Task

CPU = torch.device("cpu")
LOSS = {"l1": 0.1, "l2": 0.05, "l3": 0.1,
        "perceptual": {"name": "difficulty_adaptive_perceptual", "params": {"vgg": TINY_VGG}}}
SIZE = 32  # bf16 convolutions are slow on most CPUs


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    return tiny_clip_file(tmp_path_factory.mktemp("clip") / "clip.safetensors", seed=3)


def build_task(clip_file, seed: int = 0) -> Stage2Task:
    torch.manual_seed(seed)
    restorer = load_config(RestorerConfig, REPO / "configs/models/restormer_etb_tiny.yaml")
    return Stage2Task(restorer, from_dict(LossConfig, LOSS), tiny_perceiver(clip_file), None, OptimizerConfig(),
                      max_steps=10)


def bf16_engine(task: Stage2Task, zero_stage: int):
    settings = deepspeed_settings(EngineConfig(deepspeed_config=str(REPO / "configs/deepspeed/zero1.json"),
                                               precision="bf16", zero_stage=zero_stage), 2, 1, CPU)
    assert settings["bf16"] == {"enabled": True}
    engine, _ = build_engine(task.model.to(CPU), task.param_groups(), task.schedule_factors(), OptimizerConfig(),
                             settings)
    return engine


@pytest.fixture(scope="module")
def distributed():
    import os

    os.environ["MASTER_PORT"] = str(_free_port())
    init_distributed(CPU)


def frozen_networks(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {"vgg": model.loss.perceptual.vgg, "clip": model.loss.quality.perceiver.clip,
            "dinov2": model.restorer.conditioning.semantic}


def images(seed: int) -> dict[str, torch.Tensor]:
    """Photo crops whose values are exact in bf16: both precisions see the same numbers."""
    clean = random_crops(HELD_OUT_PHOTOS, 2, SIZE, seed=seed)
    degraded = add_noise(blur(clean), 0.1, seed=seed + 1)
    out = {"clean": clean, "degraded": degraded, "medium": 0.5 * (clean + degraded),
           "restored": 0.8 * clean + 0.2 * degraded}
    return {k: v.to(torch.bfloat16).float() for k, v in out.items()}


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_after_engine_init_the_frozen_networks_are_fp32_and_the_restorer_bf16(clip_file, distributed, zero_stage):
    reference, task = build_task(clip_file).model, build_task(clip_file)
    engine = bf16_engine(task, zero_stage)
    module = engine.module
    frozen = frozen_networks(module)
    assert {id(m) for m in fp32_modules(module)} == {id(m) for m in frozen.values()}
    expected = frozen_networks(reference)
    for name, net in frozen.items():
        own = dict(net.named_parameters())
        assert own and all(p.dtype == torch.float32 for p in own.values()), name
        for key, value in expected[name].named_parameters():  # bit for bit: never rounded to bf16
            assert torch.equal(own[key], value), f"{name}.{key}"
    trained = [p for p in module.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.bfloat16 for p in trained)
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in reference.parameters())


def test_l_dpl_and_l_clip_on_the_bf16_path_equal_their_fp32_values(clip_file, distributed):
    reference, task = build_task(clip_file).model, build_task(clip_file)
    engine = bf16_engine(task, zero_stage=1)
    module = engine.module

    # the losses on the same images, as fp32 and as bf16 tensors
    x = images(seed=2)
    b = {k: v.to(torch.bfloat16) for k, v in x.items()}
    with torch.no_grad():
        pairs = {
            "dpl": (reference.loss.perceptual(x["restored"], x["clean"], [x["degraded"], x["medium"]]),
                    module.loss.perceptual(b["restored"], b["clean"], [b["degraded"], b["medium"]])),
            "clip": (reference.loss.quality(x["restored"]), module.loss.quality(b["restored"])),
        }
    for name, (fp32, bf16) in pairs.items():  # the same fp32 arithmetic: far inside 1% (before: L_dpl 2.6% off)
        assert bf16.dtype == torch.float32, name
        assert float(bf16) == pytest.approx(float(fp32), rel=1e-4), name

    # a training step of the engine: its terms against the fp32 losses of its own output
    batch = DegradedBatch(clean=b["clean"], degraded=b["degraded"], types=["gaussian_noise", "rain"],
                          type_index=type_index(["gaussian_noise", "rain"], CPU), keys=["a", "b"], clean_ids=["a", "b"])
    terms = task.compute(engine, batch, 0)
    restored = task._last_restored
    assert restored.dtype == torch.bfloat16
    with torch.no_grad():
        fp32 = {"dpl": reference.loss.perceptual(restored.float(), x["clean"], [x["degraded"]]),
                "clip": reference.loss.quality(restored.float())}
    for name in ("dpl", "clip"):
        assert float(terms[name].detach()) == pytest.approx(float(fp32[name]), rel=0.01), name
    assert terms["total"].dtype == torch.float32
    engine.backward(terms["total"])
    engine.step()
    for name, net in frozen_networks(module).items():
        assert all(p.dtype == torch.float32 and p.grad is None for p in net.parameters()), name


def test_checkpoints_leave_out_the_networks_built_from_weight_files_and_load_back(clip_file, distributed, tmp_path):
    source, target = build_task(clip_file, seed=0), build_task(clip_file, seed=1)
    engine = bf16_engine(source, zero_stage=1)
    engine.save_checkpoint(str(tmp_path), tag="ckpt")
    path = tmp_path / "ckpt" / "mp_rank_00_model_states.pt"
    saved = torch.load(path, map_location="cpu", weights_only=False)
    names = dict(engine.module.named_parameters(remove_duplicate=False))
    # the CLIP comes from a weight file: left out, under each name of the shared perceiver
    rebuilt = {n for n in names if ".clip." in n}
    assert {n.split(".clip.")[0] for n in rebuilt} == {"loss.quality.perceiver", "loss.perceptual.perceiver"}
    assert not rebuilt & set(saved["module"])
    # the tiny profile's randomly initialised VGG and DINOv2 stay (in fp32), as the trained parameters
    random_init = {n for n in names if n.startswith(("loss.perceptual.vgg.", "restorer.conditioning.semantic."))}
    assert random_init and all(saved["module"][n].dtype == torch.float32 for n in random_init)
    assert set(names) - rebuilt <= set(saved["module"])

    # an older checkpoint held the CLIP too, in bf16: loading keeps the module's own fp32 values
    old = {**saved["module"], **{n: names[n].detach().to(torch.bfloat16) for n in rebuilt}}
    torch.save({**saved, "module": old}, path)
    other = bf16_engine(target, zero_stage=1)
    own = {n: p.detach().clone() for n, p in other.module.named_parameters(remove_duplicate=False) if n in rebuilt}
    loaded, _ = other.load_checkpoint(str(tmp_path), tag="ckpt", load_module_strict=True)
    assert loaded is not None
    for n, p in other.module.named_parameters(remove_duplicate=False):
        expected = own[n] if n in rebuilt else names[n]
        assert p.dtype == expected.dtype and torch.equal(p, expected), n


def test_casts_leave_the_kept_networks_fp32_and_moves_reach_them(clip_file):
    model = build_task(clip_file).model
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.to(torch.bfloat16)
    kept = {id(p) for m in fp32_modules(model) for p in m.parameters()}
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if id(p) in kept else torch.bfloat16), n
        if id(p) in kept:
            assert torch.equal(p, weights[n]), n
    assert copy.deepcopy(model).loss.perceptual.vgg.half().features[0].weight.dtype == torch.float32
    model.to("meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    with pytest.raises(ValueError, match="trainable"):
        keep_fp32(torch.nn.Linear(2, 2))


def test_stage1_prompts_train_in_bf16_through_fp32_clip_towers(clip_file):
    perceiver = tiny_perceiver(clip_file).to(torch.bfloat16)
    assert perceiver.prompts.context.dtype == torch.bfloat16
    assert {p.dtype for p in perceiver.clip.parameters()} == {torch.float32}
    crops = random_crops(HELD_OUT_PHOTOS, 3, SIZE, seed=4).to(torch.bfloat16)
    loss = perceiver.loss(crops, torch.tensor([0, 1, 2]))
    assert loss.dtype == torch.float32
    loss.backward()
    assert perceiver.prompts.context.grad is not None and perceiver.prompts.context.grad.abs().sum() > 0
