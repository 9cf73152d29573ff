"""Pretrained weights in the forms they are published in: OpenAI's TorchScript CLIP, OpenAI and
open_clip state dicts and checkpoints, torchvision's and timm's VGG-16, timm's and Hugging Face's
DINOv2. Each test writes a tiny random network in the exact key layout of its format and loads it
through the configuration, as a user would; the CLIP towers' activation follows the weights."""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from _model_fixtures import TINY_CLIP_JSON, TINY_SEMANTIC, photo
from perceive_ir.models import PerceiverConfig, PerceiverIdentityError, QualityPerceiver
from perceive_ir.models.semantic_guidance import SemanticConfig, SemanticGuidance
from perceive_ir.models.vgg_features import VGGConfig, VGGFeatures
from perceive_ir.weights import MissingWeightsError, WeightFormatError, sha256_file

OPENAI_EXTRAS = {"input_resolution": 64, "context_length": 77, "vocab_size": 49408}

# the tests script a module to write a TorchScript archive; torch marks torch.jit as deprecated
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")


# -- writers of each format ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def gelu_arch(tmp_path_factory) -> Path:
    """The tiny CLIP with open_clip's default (GELU) towers, like the plain ``ViT-B-32``."""
    config = json.loads(TINY_CLIP_JSON.read_text())
    config.pop("quick_gelu")
    path = tmp_path_factory.mktemp("arch") / "clip_tiny_gelu.json"
    path.write_text(json.dumps(config))
    return path


def clip_state(arch: str, arch_json: Path, seed: int) -> dict[str, torch.Tensor]:
    import open_clip

    open_clip.add_model_config(arch_json)
    torch.manual_seed(seed)
    return open_clip.create_model(arch, pretrained=None).state_dict()


def _module_tree(state: dict[str, torch.Tensor], buffers: set[str]) -> nn.Module:
    root = nn.Module()
    for key, value in state.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        if key in buffers:
            node.register_buffer(leaf, value)
        else:
            node.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
    return root


def write_openai_archive(state: dict[str, torch.Tensor], path: Path) -> Path:
    """A TorchScript archive laid out like OpenAI's ``ViT-B-32.pt``: half-precision weights, the
    extra ``input_resolution``/``context_length``/``vocab_size`` buffers and a causal mask kept as a
    plain attribute of the text blocks. Then every class of the archive gets a method calling an
    undefined function, so that anything compiling the archive's code (``torch.jit.load``) fails."""
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    extras = {k: torch.tensor(v) for k, v in OPENAI_EXTRAS.items()}
    module = _module_tree({**half, **extras}, buffers=set(extras))
    module.transformer.resblocks._modules["0"].attn_mask = torch.full((77, 77), float("-inf")).triu(1)
    scripted = path.with_suffix(".scripted")
    torch.jit.script(module).save(str(scripted))
    with zipfile.ZipFile(scripted) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if "/code/" in info.filename and info.filename.endswith(".py"):
                data += b"  def forward(self, x: Tensor) -> Tensor:\n    return undefined_function_xyz(x)\n"
            target.writestr(info, data)
    scripted.unlink()
    return path


def write_hf_dinov2(model: nn.Module, folder: Path, heads: int) -> Path:
    """``model`` (a timm DINOv2) as Hugging Face's ``facebook/dinov2-*`` folder: config.json and
    model.safetensors with transformers' Dinov2Model key names."""
    from safetensors.torch import save_file

    state, dim = {}, model.embed_dim
    state["embeddings.mask_token"] = torch.zeros(1, dim)
    for key, value in model.state_dict().items():
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)", key)
        if key == "cls_token":
            state["embeddings.cls_token"] = value
        elif key == "pos_embed":
            state["embeddings.position_embeddings"] = value
        elif key.startswith("patch_embed.proj."):
            state["embeddings.patch_embeddings.projection." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("norm."):
            state["layernorm." + key.rsplit(".", 1)[1]] = value
        else:
            layer, part, kind = block.groups()
            prefix = f"encoder.layer.{layer}."
            if part == "attn.qkv":
                for name, chunk in zip(("query", "key", "value"), value.chunk(3)):
                    state[f"{prefix}attention.attention.{name}.{kind}"] = chunk
            elif part == "attn.proj":
                state[f"{prefix}attention.output.dense.{kind}"] = value
            elif part in ("ls1", "ls2"):
                state[f"{prefix}layer_scale{part[-1]}.lambda1"] = value
            else:  # norm1, norm2, mlp.fc1, mlp.fc2 keep their names
                state[f"{prefix}{part}.{kind}"] = value
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    config = {
        "architectures": ["Dinov2Model"],
        "model_type": "dinov2",
        "hidden_size": dim,
        "num_hidden_layers": len(model.blocks),
        "num_attention_heads": heads,
        "patch_size": model.patch_embed.patch_size[0],
        "image_size": model.patch_embed.img_size[0],
        "mlp_ratio": 4,
        "layerscale_value": 1.0,
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
        "use_swiglu_ffn": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# Hugging Face's names for one DINOv2 layer, as listed by facebook/dinov2-base's model.safetensors
HF_DINOV2_LAYER_KEYS = {
    f"encoder.layer.0.{name}"
    for name in (
        "norm1.weight", "norm1.bias",
        "attention.attention.query.weight", "attention.attention.query.bias",
        "attention.attention.key.weight", "attention.attention.key.bias",
        "attention.attention.value.weight", "attention.attention.value.bias",
        "attention.output.dense.weight", "attention.output.dense.bias",
        "layer_scale1.lambda1", "norm2.weight", "norm2.bias",
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "layer_scale2.lambda1",
    )
}  # fmt: skip


def tiny_dinov2(seed: int, **overrides) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(TINY_SEMANTIC["model"], pretrained=False, **{**TINY_SEMANTIC["model_kwargs"], **overrides})
    with torch.no_grad():  # layer scales start at 1e-5: randomise them so that a mix-up shows
        for block in model.blocks:
            block.ls1.gamma.normal_()
            block.ls2.gamma.normal_()
    return model


def semantic_config(weights: Path) -> SemanticConfig:
    return SemanticConfig(**{**TINY_SEMANTIC, "pretrained": True, "weights": str(weights)})


def torchvision_vgg_features(layout: str, seed: int) -> nn.Sequential:
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(seed)
    return make_layers(cfgs[layout])


def assert_same_tensors(loaded: dict[str, torch.Tensor], written: dict[str, torch.Tensor]) -> None:
    assert sorted(loaded) == sorted(written)
    for key, value in written.items():
        torch.testing.assert_close(loaded[key], value.to(loaded[key].dtype), rtol=0, atol=0, msg=key)


def activations(model: nn.Module) -> set[str]:
    from open_clip.transformer import QuickGELU

    return {"quick_gelu" if isinstance(m, QuickGELU) else "gelu" for m in model.modules() if isinstance(m, (QuickGELU, nn.GELU))}


# -- CLIP ---------------------------------------------------------------------------------------


def test_openai_torchscript_archive_loads_without_running_its_code_and_builds_quickgelu(gelu_arch, tmp_path):
    state = clip_state("clip_tiny_gelu", gelu_arch, seed=3)
    archive = write_openai_archive(state, tmp_path / "ViT-tiny.pt")
    with pytest.raises(Exception, match="undefined_function_xyz"):
        torch.jit.load(str(archive))  # the archive's code cannot even be compiled

    cfg = PerceiverConfig(architecture="clip_tiny_gelu", pretrained=None, clip_weights=str(archive), arch_config=str(gelu_arch))
    perceiver = cfg.build()
    assert perceiver.identity.activation == "quick_gelu"
    assert activations(perceiver.clip) == {"quick_gelu"}  # the GELU architecture was built with QuickGELU
    assert perceiver.identity.weights_sha256 == sha256_file(archive)
    # the weights are OpenAI's half-precision values; the causal-mask attribute is no weight
    assert_same_tensors(perceiver.clip.state_dict(), {k: v.half() for k, v in state.items()})


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "created-by-unpickling"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    archive = tmp_path / "evil.pt"
    with zipfile.ZipFile(archive, "w") as target:
        target.writestr("evil/data.pkl", pickle.dumps(Payload(), protocol=2))
        target.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        target.writestr("evil/code/__torch__.py", "")
    with pytest.raises(WeightFormatError, match="refusing 'io.open'") as err:
        PerceiverConfig(architecture="clip_tiny", pretrained=None, clip_weights=str(archive), arch_config=str(TINY_CLIP_JSON)).build()
    assert "perceiver.clip_weights" in str(err.value)
    assert not marker.exists()


def test_openai_state_dict_layout_builds_quickgelu(gelu_arch, tmp_path):
    state = clip_state("clip_tiny_gelu", gelu_arch, seed=4)
    path = tmp_path / "openai_state.pt"
    torch.save({**state, **{k: torch.tensor(v) for k, v in OPENAI_EXTRAS.items()}}, path)
    perceiver = PerceiverConfig(architecture="clip_tiny_gelu", pretrained=None, clip_weights=str(path)).build()
    assert perceiver.identity.activation == "quick_gelu" and activations(perceiver.clip) == {"quick_gelu"}
    assert_same_tensors(perceiver.clip.state_dict(), state)


def test_open_clip_training_checkpoint_loads_with_the_architectures_activation(gelu_arch, tmp_path):
    state = clip_state("clip_tiny_gelu", gelu_arch, seed=5)
    path = tmp_path / "epoch_32.pt"
    torch.save({"epoch": 32, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    perceiver = PerceiverConfig(architecture="clip_tiny_gelu", pretrained=None, clip_weights=str(path)).build()
    assert perceiver.identity.activation == "gelu" and activations(perceiver.clip) == {"gelu"}
    assert perceiver.identity.weights_sha256 == sha256_file(path)
    assert_same_tensors(perceiver.clip.state_dict(), state)

    # weights of unknown origin: the activation may be declared
    declared = PerceiverConfig(
        architecture="clip_tiny_gelu", pretrained=None, clip_weights=str(path), clip_activation="quick_gelu"
    ).build()
    assert declared.identity.activation == "quick_gelu" and activations(declared.clip) == {"quick_gelu"}


def test_open_clip_hub_folder_activation_comes_from_its_config(gelu_arch, tmp_path):
    from safetensors.torch import save_file

    state = clip_state("clip_tiny_gelu", gelu_arch, seed=6)
    folder = tmp_path / "CLIP-tiny-laion"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": json.loads(gelu_arch.read_text())}))

    perceiver = PerceiverConfig(architecture="clip_tiny_gelu", pretrained=None, clip_weights=str(folder)).build()
    assert perceiver.identity.activation == "gelu"
    assert perceiver.identity.weights_sha256 == sha256_file(folder / "open_clip_model.safetensors")
    assert_same_tensors(perceiver.clip.state_dict(), state)

    # a QuickGELU architecture over weights trained with GELU
    with pytest.raises(ValueError, match="'perceiver.architecture' is 'clip_tiny'.*GELU"):
        PerceiverConfig(architecture="clip_tiny", pretrained=None, clip_weights=str(folder), arch_config=str(TINY_CLIP_JSON)).build()
    with pytest.raises(ValueError, match="'perceiver.clip_activation' asks for quick_gelu"):
        PerceiverConfig(architecture="clip_tiny_gelu", pretrained=None, clip_weights=str(folder), clip_activation="quick_gelu").build()


def test_activation_settings_that_contradict_the_weights_are_refused(gelu_arch, tmp_path):
    archive = write_openai_archive(clip_state("clip_tiny_gelu", gelu_arch, seed=7), tmp_path / "openai.pt")
    with pytest.raises(ValueError, match="'perceiver.clip_activation' asks for gelu.*TorchScript archive"):
        PerceiverConfig(architecture="clip_tiny_gelu", pretrained=None, clip_weights=str(archive), clip_activation="gelu").build()
    with pytest.raises(ValueError, match="'perceiver.architecture' is 'clip_tiny'.*'perceiver.clip_activation' is gelu"):
        PerceiverConfig(architecture="clip_tiny", pretrained=None, arch_config=str(TINY_CLIP_JSON), clip_activation="gelu").build()
    # hub tags: open_clip records what each was trained with; refused before any download
    with pytest.raises(ValueError, match="asks for gelu.*open_clip tag 'openai'.*quick_gelu"):
        PerceiverConfig(architecture="ViT-B-32", pretrained="openai", clip_activation="gelu").build()
    with pytest.raises(ValueError, match="asks for quick_gelu.*open_clip tag 'laion2b_s34b_b79k'.*gelu"):
        PerceiverConfig(architecture="ViT-B-32", pretrained="laion2b_s34b_b79k", clip_activation="quick_gelu").build()


def test_saved_perceiver_records_the_activation_and_loading_refuses_another(gelu_arch, tmp_path):
    archive = write_openai_archive(clip_state("clip_tiny_gelu", gelu_arch, seed=8), tmp_path / "openai.pt")
    cfg = PerceiverConfig(architecture="clip_tiny_gelu", pretrained=None, clip_weights=str(archive), arch_config=str(gelu_arch))
    saved = cfg.build().save(tmp_path / "perceiver")
    meta_file = saved / "perceiver.json"
    meta = json.loads(meta_file.read_text())
    assert meta["clip"]["activation"] == "quick_gelu"
    loaded = QualityPerceiver.load(saved, clip_weights=str(archive), arch_config=str(gelu_arch))
    assert loaded.identity.activation == "quick_gelu"

    # a perceiver saved before the activation was recorded was built with the architecture's GELU
    del meta["clip"]["activation"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(PerceiverIdentityError, match="activation: 'gelu' != 'quick_gelu'"):
        QualityPerceiver.load(saved, clip_weights=str(archive), arch_config=str(gelu_arch))
    meta["clip"]["activation"] = "gelu"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="clip_activation"):
        QualityPerceiver.load(saved, clip_weights=str(archive), arch_config=str(gelu_arch))


def test_perceiver_saved_before_the_activation_field_still_loads(tmp_path):
    from _model_fixtures import tiny_clip_file, tiny_perceiver

    clip = tiny_clip_file(tmp_path / "clip.safetensors", seed=1)
    saved = tiny_perceiver(clip).save(tmp_path / "perceiver")
    meta = json.loads((saved / "perceiver.json").read_text())
    del meta["clip"]["activation"]
    (saved / "perceiver.json").write_text(json.dumps(meta))
    loaded = QualityPerceiver.load(saved, clip_weights=str(clip), arch_config=str(TINY_CLIP_JSON))
    assert loaded.identity.activation == "quick_gelu"  # clip_tiny's own activation, as built then


def test_a_file_of_another_network_is_refused_as_clip(gelu_arch, tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "vgg.safetensors"
    save_file({f"features.{k}": v for k, v in torchvision_vgg_features("A", seed=0).state_dict().items()}, str(other))
    with pytest.raises(WeightFormatError, match="'perceiver.clip_weights'.*open_clip 'clip_tiny_gelu' weights.*missing"):
        PerceiverConfig(architecture="clip_tiny_gelu", pretrained=None, clip_weights=str(other), arch_config=str(gelu_arch)).build()
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    with pytest.raises(MissingWeightsError, match="'perceiver.clip_weights'.*open_clip_model.safetensors"):
        PerceiverConfig(architecture="clip_tiny_gelu", pretrained=None, clip_weights=str(empty)).build()


# -- VGG-16 -------------------------------------------------------------------------------------


def test_torchvision_vgg16_pth_loads_into_the_perceptual_features(tmp_path):
    features = torchvision_vgg_features("D", seed=0)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    # torchvision's classifier names; its (huge) shapes do not matter, the loss never uses it
    state.update({f"classifier.{i}.{p}": torch.randn(4, 4) if p == "weight" else torch.randn(4)
                  for i in (0, 3, 6) for p in ("weight", "bias")})
    path = tmp_path / "vgg16-tiny.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)  # torchvision's files predate the zip format

    vgg = VGGFeatures(VGGConfig(weights=str(path)))
    assert vgg.weights_sha256 == sha256_file(path)
    from perceive_ir.weights import weight_identities

    assert weight_identities(torch.nn.ModuleDict({"perceptual": vgg})) == {"perceptual": sha256_file(path)}
    kept = len(vgg.features)
    assert_same_tensors(vgg.features.state_dict(), features[:kept].state_dict())
    image = photo("astronaut")[None, :, :64, :64]
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(vgg(image)[-1], features[:23]((image - mean) / std))


def test_timm_vgg16_folder_loads(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = timm.create_model("vgg16", pretrained=False, num_classes=0, mlp_ratio=1 / 512)
    folder = tmp_path / "vgg16.tv_in1k"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    vgg = VGGFeatures(VGGConfig(weights=str(folder)))
    assert vgg.weights_sha256 == sha256_file(folder / "model.safetensors")
    assert_same_tensors(vgg.features.state_dict(), model.features[: len(vgg.features)].state_dict())


def test_wrong_vgg_files_name_what_was_expected(tmp_path):
    vgg19 = tmp_path / "vgg19.pth"
    torch.save({f"features.{k}": v for k, v in torchvision_vgg_features("E", seed=0).state_dict().items()}, vgg19)
    with pytest.raises(WeightFormatError, match="'loss.perceptual.vgg.weights'.*convolutions of vgg16.*unexpected"):
        VGGFeatures(VGGConfig(weights=str(vgg19)))
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    with pytest.raises(WeightFormatError, match="notes.txt' \\(from 'loss.perceptual.vgg.weights'\\) is not a weight file"):
        VGGFeatures(VGGConfig(weights=str(text)))


# -- DINOv2 -------------------------------------------------------------------------------------


def test_hugging_face_dinov2_folder_loads_into_timm(tmp_path):
    model = tiny_dinov2(seed=2)
    folder = write_hf_dinov2(model, tmp_path / "dinov2-tiny", heads=TINY_SEMANTIC["model_kwargs"]["num_heads"])
    from safetensors.torch import load_file

    written = load_file(str(folder / "model.safetensors"))
    assert {k for k in written if k.startswith("encoder.layer.0.")} == HF_DINOV2_LAYER_KEYS

    guidance = SemanticGuidance(semantic_config(folder))
    assert guidance.weights_sha256 == sha256_file(folder / "model.safetensors")
    assert_same_tensors(guidance.backbone.state_dict(), model.state_dict())  # the same network, value for value


def test_timm_dinov2_files_load(tmp_path):
    from safetensors.torch import save_file

    model = tiny_dinov2(seed=3)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder = tmp_path / "timm-dinov2"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    loaded = SemanticGuidance(semantic_config(folder))
    assert loaded.weights_sha256 == sha256_file(folder / "pytorch_model.bin")
    assert_same_tensors(loaded.backbone.state_dict(), state)
    save_file(state, str(tmp_path / "dinov2.safetensors"))
    assert_same_tensors(SemanticGuidance(semantic_config(tmp_path / "dinov2.safetensors")).backbone.state_dict(), state)


def test_wrong_dinov2_files_name_what_was_expected(tmp_path):
    wider = write_hf_dinov2(tiny_dinov2(seed=4, embed_dim=48), tmp_path / "dinov2-wider", heads=2)
    with pytest.raises(WeightFormatError, match="'conditioning.semantic.weights'.*Hugging Face DINOv2.*wrong shape"):
        SemanticGuidance(semantic_config(wider))
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
    with pytest.raises(WeightFormatError, match="'conditioning.semantic.weights'.*'vit' model; expected 'dinov2'"):
        SemanticGuidance(semantic_config(wider))
    vgg = tmp_path / "vgg.pth"
    torch.save({f"features.{k}": v for k, v in torchvision_vgg_features("A", seed=0).state_dict().items()}, vgg)
    with pytest.raises(WeightFormatError, match="timm 'vit_small_patch14_dinov2' weights or a Hugging Face"):
        SemanticGuidance(semantic_config(vgg))
