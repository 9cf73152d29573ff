"""Typed configuration: YAML plus overrides, and errors that name the key, file and expectation."""

from __future__ import annotations

from dataclasses import dataclass, field
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
