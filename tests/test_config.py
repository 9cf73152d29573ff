"""Typed configuration: YAML plus overrides, and errors that name the key, file and expectation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from perceive_ir.config import ConfigError, flatten, load_config


@dataclass
class Optim:
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Job:
    name: str
    optim: Optim
    steps: int = 10
    precision: Literal["fp32", "bf16"] = "fp32"
    tags: list[str] = field(default_factory=list)
    resume_from: Optional[str] = None


def write(tmp_path, text: str):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_build_typed_values(tmp_path):
    path = write(tmp_path, "name: a\noptim:\n  lr: 1e-3\nsteps: 5\n")
    job = load_config(Job, path, ["optim.lr=0.5", "tags=[x, y]", "precision=bf16", "resume_from=runs/a"])
    assert job == Job("a", Optim(0.5), steps=5, precision="bf16", tags=["x", "y"], resume_from="runs/a")
    assert isinstance(job.optim.betas, tuple)
    assert flatten(job)["optim.lr"] == 0.5


@pytest.mark.parametrize("text, overrides, message", [
    ("name: a\noptim: {lr: 1}\nstepz: 3\n", [], r"job.yaml: unknown key 'stepz' in Job; expected one of: name, optim,"),
    ("name: a\noptim: {lr: 1, momentum: 3}\n", [], r"job.yaml: unknown key 'optim.momentum' in Optim"),
    ("name: a\noptim: {lr: fast}\n", [], r"job.yaml: key 'optim.lr' expects float, got str 'fast'"),
    ("name: a\noptim: {lr: 1}\nsteps: 2.5\n", [], r"key 'steps' expects int, got float 2.5"),
    ("name: a\noptim: {lr: 1}\nprecision: fp16\n", [], r"key 'precision' expects one of 'fp32', 'bf16', got str 'fp16'"),
    ("name: a\n", [], r"job.yaml: missing required key 'optim' \(Optim\)"),
    ("optim: {lr: 1}\n", [], r"missing required key 'name' \(str\)"),
    ("name: a\noptim: {lr: 1}\n", ["optim.lr=slow"], r"command-line override 'optim.lr': key 'optim.lr' expects float"),
    ("name: a\noptim: {lr: 1}\n", ["optim.decay=1"], r"command-line override 'optim.decay': unknown key 'optim.decay'"),
    ("name: a\noptim: {lr: 1}\n", ["steps"], r"'steps' is not of the form key.path=value"),
    ("name: a\noptim: {lr: 1, betas: [0.9]}\n", [], r"key 'optim.betas' expects tuple\[float, float\].*exactly 2"),
])
def test_bad_config_fails_naming_key_and_origin(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Job, write(tmp_path, text), overrides)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Job, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Job, write(tmp_path, "name: [unclosed\n"))


# Every job profile in configs/, with the config class that loads it and the overrides a run supplies.
REPO = Path(__file__).resolve().parents[1]
STAGE2_PRODUCTS = ["perceiver=runs:/x/perceiver", "medium_tier=runs:/x/medium_tier"]


def _profile_loader(name: str):
    from jobs.pipeline import PipelineConfig
    from perceive_ir.orchestration.config import Stage1Config, Stage2Config
    from perceive_ir.search.config import SearchConfig

    if name.startswith("stage1"):
        return Stage1Config, []
    if name.startswith("stage2"):
        return Stage2Config, STAGE2_PRODUCTS
    if name.startswith("pipeline"):
        return PipelineConfig, []
    if name.startswith("tune"):
        return SearchConfig, [f"stage2.{o}" for o in STAGE2_PRODUCTS]
    if name.startswith("restore"):
        from perceive_ir.workflows.restoration.config import RestoreConfig

        return RestoreConfig, ["model=models:/x-restorer@champion", "input=photos", "output=restored"]
    raise AssertionError(f"configs/{name}: a new profile; add its config class to _profile_loader")


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_profile_loads(name):
    cls, overrides = _profile_loader(name)
    assert isinstance(load_config(cls, REPO / "configs" / name, overrides), cls)
    if name.startswith("tune"):  # its base and every value of its search space load as stage-2 configs
        from perceive_ir.search.config import plan_search

        assert plan_search(REPO / "configs" / name, overrides).distributions


def test_five_task_profiles_add_blur_and_low_light_to_the_three_task_ones():
    from perceive_ir.orchestration.config import Stage1Config, Stage2Config

    for stage, cls, overrides in (("stage1", Stage1Config, []), ("stage2", Stage2Config, STAGE2_PRODUCTS)):
        three = load_config(cls, REPO / f"configs/{stage}.yaml", overrides)
        five = load_config(cls, REPO / f"configs/{stage}_five_task.yaml", overrides)
        added = five.data.train.sources[len(three.data.train.sources):]
        assert five.data.train.sources[: len(three.data.train.sources)] == three.data.train.sources
        assert [(s.name, s.weight) for s in added] == [("gopro", 5.0), ("lol_v1", 200.0)]
        assert three.data.train.weighting == five.data.train.weighting == "replicate"
        assert {"motion_blur", "low_light"} <= set(five.data.validation.types)
        assert set(three.data.validation.types) < set(five.data.validation.types)
        if stage == "stage2":
            assert five.loss == three.loss  # the five-task recipe differs in its data only
        else:  # the medium tier on 128 px crops; the prompts on CLIP's 224 px input, the tasks balanced
            for cfg in (three, five):
                restorers, prompts = cfg.loader_phases()
                assert (restorers.loader.patch_size, restorers.loader.weighting) == (128, "replicate")
                assert (prompts.loader.patch_size, prompts.loader.weighting) == (224, "balanced")
        assert five.name != three.name and five.tracking.register_as != three.tracking.register_as


def test_the_paper_profiles_build_the_paper_network_and_the_hook_variant_is_its_own_profile():
    from perceive_ir.orchestration.config import Stage2Config

    def profile(name):
        return load_config(Stage2Config, REPO / "configs" / name, STAGE2_PRODUCTS)

    three, five, hooks = profile("stage2.yaml"), profile("stage2_five_task.yaml"), profile("stage2_hooks.yaml")
    for paper in (three, five):
        assert paper.restorer.conditioning.name == "perceive_ir_etb"
        assert paper.restorer.backbone.params["prompts"] is False
    assert hooks.restorer.conditioning.name == "perceive_ir" and hooks.restorer.backbone.params["prompts"] is True
    assert "film_hidden" not in hooks.restorer.conditioning.params  # the section is replaced, not merged
    assert (hooks.loss, hooks.data, hooks.loop) == (three.loss, three.data, three.loop)  # the rest is the paper's
    assert hooks.tracking.register_as != three.tracking.register_as


def test_a_profile_extends_another_section_by_section(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\nsteps: 5\noptim: {lr: 0.1, betas: [0.5, 0.6]}\ntags: [x]\n")
    (tmp_path / "variant.yaml").write_text("extends: base.yaml\nname: variant\noptim: {lr: 0.2}\n")
    cfg = load_config(Job, tmp_path / "variant.yaml", ["steps=7"])
    assert (cfg.name, cfg.steps, cfg.tags) == ("variant", 7, ["x"])
    assert cfg.optim == Optim(lr=0.2)  # the variant's section replaces the base's: its betas are the defaults
    (tmp_path / "loop_a.yaml").write_text("extends: loop_b.yaml\n")
    (tmp_path / "loop_b.yaml").write_text("extends: loop_a.yaml\n")
    with pytest.raises(ConfigError, match="extend each other in a cycle: .*loop_a.yaml -> .*loop_b.yaml -> .*loop_a.yaml"):
        load_config(Job, tmp_path / "loop_a.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: gone.yaml\n")
    with pytest.raises(ConfigError, match="'.*gone.yaml' does not exist \\(extended by '.*orphan.yaml'\\)"):
        load_config(Job, tmp_path / "orphan.yaml")
