"""A run or model that is not found names the tracking store asked and where that setting came from;
no lookup leaves an empty store behind."""

from __future__ import annotations

import sys

import pytest
import yaml

from conftest import REPO

sys.path.insert(0, str(REPO / "jobs"))

BOGUS_RUN = "0123456789abcdef0123456789abcdef"
DEFAULT = "the default: tracking.default_db 'runs/mlflow.db' in the launch folder"


def stores_in(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.db"))


def small_suite(folder):
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": "one", "data_root": str(folder), "sets": [
        {"name": "photos", "clean": "package:photos", "degradations": {"gaussian_noise": ["sigma25"]}, "limit": 1}]}))
    return path


def existing_store(folder):
    """A store with one experiment and no such run."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{folder / 'elsewhere.db'}"
    MlflowClient(tracking_uri=uri).create_experiment("other", artifact_location=str(folder / "artifacts"))
    return uri


@pytest.fixture
def launch_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_the_evaluation_of_a_run_in_an_absent_default_store_names_it_and_creates_none(launch_folder, capsys):
    import evaluate

    suite = small_suite(launch_folder)
    assert evaluate.main(["--config", str(suite), f"model=runs:/{BOGUS_RUN}/restorer"]) == 2
    err = capsys.readouterr().err
    default_store = f"sqlite:///{launch_folder / 'runs' / 'mlflow.db'}"
    assert default_store in err and DEFAULT in err and "does not exist" in err, err
    assert stores_in(launch_folder) == [] and stores_in(REPO) == []


def test_a_run_not_in_the_store_of_the_environment_names_the_variable(launch_folder, monkeypatch, capsys):
    import evaluate

    uri = existing_store(launch_folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert evaluate.main(["--config", str(small_suite(launch_folder)), f"model=runs:/{BOGUS_RUN}/restorer"]) == 2
    err = capsys.readouterr().err
    assert uri in err and "MLFLOW_TRACKING_URI" in err and BOGUS_RUN in err, err
    assert stores_in(launch_folder) == ["elsewhere.db"]


def test_the_registry_command_names_the_store_and_creates_none(launch_folder, capsys):
    from perceive_ir.workflows.registry_cli import main

    assert main(["list"]) == 2
    err = capsys.readouterr().err
    assert f"sqlite:///{launch_folder / 'runs' / 'mlflow.db'}" in err and DEFAULT in err, err
    uri = existing_store(launch_folder)
    assert main(["--tracking-uri", uri, "show", "nobody-restorer", "1"]) == 2
    err = capsys.readouterr().err
    assert "nobody-restorer" in err and uri in err and "from --tracking-uri" in err, err
    assert stores_in(launch_folder) == ["elsewhere.db"]


def test_a_stage2_job_on_products_of_an_absent_store_names_it_before_ray_starts(launch_folder, package_photos,
                                                                                 capsys):
    import ray

    import _common
    from _train_fixtures import build_tiny_shards

    shards = build_tiny_shards(package_photos, str(launch_folder / "shards"))
    args = ["--config", str(REPO / "configs/stage2_tiny.yaml"), f"perceiver=runs:/{BOGUS_RUN}/perceiver",
            f"data.train.sources=[{{location: {shards}}}]",
            f"engine.deepspeed_config={REPO / 'configs/deepspeed/zero1.json'}"]
    assert _common.main("stage2", "", args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("stage2: pre-flight: ") and DEFAULT in err, err
    assert stores_in(launch_folder) == [] and not ray.is_initialized()
