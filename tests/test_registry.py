"""The registry of perceiver/restorer pairs: products as MLflow models from code with lineage tags,
loading without unpickling, promotion gates, and ``perceive-registry``; real MLflow on SQLite and an
``mlflow server`` on loopback, real Ray for the evaluations."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from _model_fixtures import TINY_NAFNET, tiny_clip_file, tiny_perceiver
from _train_fixtures import build_tiny_shards
from conftest import REPO, _free_port
from perceive_ir.config import load_config
from perceive_ir.models import RestorerConfig
from perceive_ir.orchestration.config import Stage1Config, Stage2Config
from perceive_ir.tracking import RunTracker, TrackingConfig, find_or_create_run
from perceive_ir.products import UnsafeModelError, load_model
from perceive_ir import products
from test_evaluate import _train_tiny_restorer, photo_sets, small_suite  # noqa: F401 - shared fixture

pytestmark = pytest.mark.slow

RESTORER_CFG = RestorerConfig(backbone={"name": "nafnet", "params": TINY_NAFNET}, conditioning={"name": "none"})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def identity_restorer():
    torch.manual_seed(1)
    return RESTORER_CFG.build().eval()


@pytest.fixture(scope="module")
def made(tmp_path_factory, package_photos, photo_sets):  # noqa: F811
    """Product folders: perceivers over two tiny CLIPs, a medium tier, an identity-start and a trained restorer."""
    root = tmp_path_factory.mktemp("products")
    clips = [tiny_clip_file(root / f"clip_{k}.safetensors", seed=k) for k in (1, 2)]
    folders = {}
    for k, clip in enumerate(clips):
        perceiver = tiny_perceiver(clip)
        folders[f"perceiver{k}"] = products.save_perceiver(perceiver, perceiver.cfg, root / f"perceiver{k}")
    folders["medium_tier"] = products.save_medium_tier([identity_restorer(), identity_restorer()], RESTORER_CFG,
                                                       root / "medium_tier")
    folders["identity"] = products.save_restorer(identity_restorer(), RESTORER_CFG, root / "identity")
    trained, _ = _train_tiny_restorer(photo_sets)
    folders["trained"] = products.save_restorer(trained, RESTORER_CFG, root / "trained")
    shards = build_tiny_shards(package_photos, str(root / "shards"))
    suite = root / "suite.yaml"
    suite.write_text(yaml.safe_dump(small_suite(photo_sets) | {
        "ray": {"num_workers": 1, "resources_per_worker": {"CPU": 1}, "local_cpus": 2},
        "tracking": {"experiment": "reg-eval"}, "output": str(root / "reports"), "progress": False,
        "grid_images": 0}))
    return {"root": root, "folders": folders, "shards": shards, "suite": suite, "clips": clips}


def job_config(cls, uri: str, shards: str, register_as: str, **inputs):
    overrides = [f"data.train.sources=[{{location: {shards}}}]", f"tracking.uri={uri}",
                 f"tracking.register_as={register_as}", "tracking.experiment=reg-train"]
    overrides += [f"{k}={v}" for k, v in inputs.items()]
    name = "stage1_tiny" if cls is Stage1Config else "stage2_tiny"
    return load_config(cls, REPO / "configs" / f"{name}.yaml", overrides)


def log_stage(uri: str, run_name: str, folders: dict[str, Path]) -> RunTracker:
    """A finished training run that holds the given product folders, as the training loop logs them."""
    from perceive_ir.tracking import version_tags

    _, run_id, _ = find_or_create_run(TrackingConfig(uri=uri, experiment="reg-train"), run_name, {},
                                      version_tags(), "stage")
    tracker = RunTracker(uri, run_id)
    for name, folder in folders.items():
        tracker.log_folder(folder, name)
    return tracker


def register_pairs(uri: str, made: dict, base: str) -> dict[str, str]:
    """Stage 1 (perceiver 0 + medium tier), a second stage 1 (perceiver 1), then four stage-2 restorers:
    v1 identity, v2 trained, v3 identity (all against perceiver 0), v4 against perceiver 1."""
    from perceive_ir.orchestration.trainer import register_products

    f, shards = made["folders"], made["shards"]
    s1 = job_config(Stage1Config, uri, shards, base)
    run1 = log_stage(uri, f"{base}-s1", {"perceiver": f["perceiver0"], "medium_tier": f["medium_tier"]})
    stage1 = register_products("stage1", s1, run1)
    run1b = log_stage(uri, f"{base}-s1b", {"perceiver": f["perceiver1"], "medium_tier": f["medium_tier"]})
    register_products("stage1", s1, run1b)
    uris = {"run1": run1.run_id, **stage1}
    for k, (restorer, perceiver_run) in enumerate([("identity", run1), ("trained", run1), ("identity", run1),
                                                   ("identity", run1b)], start=1):
        s2 = job_config(Stage2Config, uri, shards, base, perceiver=f"runs:/{perceiver_run.run_id}/perceiver",
                        medium_tier=f"runs:/{run1.run_id}/medium_tier")
        run = log_stage(uri, f"{base}-s2-{k}", {"restorer": f[restorer]})
        uris[f"v{k}"] = register_products("stage2", s2, run, search_run="search-42" if k == 2 else None)["restorer"]
        uris[f"run2-{k}"] = run.run_id
    return uris


@pytest.fixture(scope="module")
def sqlite_registry(made):
    uri = f"sqlite:///{made['root'] / 'mlflow.db'}"
    return uri, register_pairs(uri, made, "reg")


@pytest.fixture(scope="module")
def ray_session():
    import ray

    yield
    ray.shutdown()


def test_products_are_models_from_code_with_lineage_tags(sqlite_registry, made):
    from mlflow.tracking import MlflowClient

    from perceive_ir.orchestration.trainer import register_products

    uri, uris = sqlite_registry
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert [uris[f"v{k}"] for k in range(1, 5)] == [f"models:/reg-restorer/{k}" for k in range(1, 5)]
    assert uris["perceiver"] == "models:/reg-perceiver/1" and uris["medium_tier"] == "models:/reg-medium-tier/1"
    f = made["folders"]
    perceiver = client.get_model_version("reg-perceiver", "1").tags
    clip = json.loads(perceiver["lineage.perceiver.clip"])
    assert perceiver["lineage.perceiver.prompts_sha256"] == sha256(f["perceiver0"] / "prompts.safetensors")
    assert clip["weights_sha256"] == sha256(made["clips"][0]) and clip["architecture"] == "clip_tiny"
    assert perceiver["lineage.medium_tier"] == "models:/reg-medium-tier/1"

    tags = client.get_model_version("reg-restorer", "2").tags
    run = client.get_run(uris["run2-2"])
    manifest = sha256(Path(made["shards"]) / "manifest.json")
    assert tags["lineage.product"] == "restorer" and tags["lineage.run_id"] == uris["run2-2"]
    assert tags["lineage.perceiver"] == "models:/reg-perceiver/1" and tags["lineage.perceiver.run_id"] == uris["run1"]
    assert tags["lineage.perceiver.prompts_sha256"] == perceiver["lineage.perceiver.prompts_sha256"]
    assert tags["lineage.perceiver.clip"] == perceiver["lineage.perceiver.clip"]
    assert tags["lineage.medium_tier"] == "models:/reg-medium-tier/1"
    assert tags["lineage.medium_tier.weights_sha256"] == client.get_model_version(
        "reg-medium-tier", "1").tags["lineage.weights_sha256"]
    assert list(json.loads(tags["lineage.shard_manifests"]).values()) == [manifest]
    assert len(tags["lineage.config_sha256"]) == 16 and tags["lineage.git_commit"] == run.data.tags["git_commit"]
    assert tags["lineage.search_run"] == "search-42" and "lineage.search_run" not in \
        client.get_model_version("reg-restorer", "1").tags
    assert client.get_model_version("reg-restorer", "4").tags["lineage.perceiver"] == "models:/reg-perceiver/2"
    # the version is an MLflow model from code: signature, safetensors, no pickle; the UI's training view
    local = Path(__import__("mlflow").artifacts.download_artifacts(
        artifact_uri=client.get_model_version("reg-restorer", "2").source, dst_path=str(made["root"] / "dl")))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    assert set(mlmodel["flavors"]) == {"python_function"} and "python_model" not in flavor
    assert Path(flavor["model_code_path"]).name == "pyfunc_models.py" and "signature" in mlmodel
    assert sha256(local / "artifacts" / "restorer" / "model.safetensors") == sha256(f["trained"] / "model.safetensors")
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle")]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # the run's product folders stay what runs:/ names (stage 2 takes runs:/<stage-1 run>/perceiver)
    folder = products.resolve_product(f"runs:/{uris['run1']}/perceiver", "perceiver", "perceiver", uri)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in f["perceiver0"].iterdir())
    assert products.load_perceiver(folder).identity.weights_sha256 == sha256(made["clips"][0])
    # a relaunch of the finished run registers nothing new
    s2 = job_config(Stage2Config, uri, made["shards"], "reg", perceiver=f"runs:/{uris['run1']}/perceiver")
    assert register_products("stage2", s2, RunTracker(uri, uris["run2-2"])) == {"restorer": "models:/reg-restorer/2"}


def plant_pickle(model: Path, target: Path, marker: Path, cloudpickled: bool) -> Path:
    """A copy of a model folder with a pickle whose loading would create ``marker``."""

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    shutil.copytree(model, target)
    if cloudpickled:  # the MLmodel says: a cloudpickle python model
        mlmodel = yaml.safe_load((target / "MLmodel").read_text())
        flavor = mlmodel["flavors"]["python_function"]
        flavor.pop("model_code_path")
        flavor.update(python_model="python_model.pkl", loader_module="mlflow.pyfunc.model")
        (target / "MLmodel").write_text(yaml.safe_dump(mlmodel))
        (target / "python_model.pkl").write_bytes(pickle.dumps(Payload()))
        (target / "pyfunc_models.py").unlink()
    else:
        (target / "artifacts" / "restorer" / "weights.pkl").write_bytes(pickle.dumps(Payload()))
    return target


def test_a_planted_pickle_is_refused_not_executed(sqlite_registry, made, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri, _ = sqlite_registry
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    model = Path(mlflow.artifacts.download_artifacts(artifact_uri=client.get_model_version("reg-restorer", "1").source,
                                                     dst_path=str(tmp_path / "good")))
    marker = tmp_path / "payload-ran"
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")  # MLflow's own guard off: ours must hold
    for k, cloudpickled in enumerate((True, False)):
        bad = plant_pickle(model, tmp_path / f"bad{k}", marker, cloudpickled)
        with pytest.raises(UnsafeModelError, match="refused"):
            load_model(str(bad))
        with pytest.raises(UnsafeModelError, match="refused"):
            products.resolve_product(str(bad), "model", "model")
        # registered, as a stage-2 input or an evaluation would take it
        client.create_registered_model(f"poisoned-{k}")
        client.create_model_version(f"poisoned-{k}", source=str(bad))
        with pytest.raises(UnsafeModelError, match="refused"):
            products.resolve_product(f"models:/poisoned-{k}/1", "perceiver", "perceiver", uri)
    assert not marker.exists()
    # the test's payload is real: unpickling it does create the file
    pickle.loads((tmp_path / "bad0" / "python_model.pkl").read_bytes())
    assert marker.exists()
    assert load_model(str(model)).predict(np.zeros((1, 9, 11, 3), np.uint8)).shape == (1, 9, 11, 3)


def test_promotion_gates_and_the_registry_cli(sqlite_registry, made, ray_session, capsys):
    from mlflow.tracking import MlflowClient

    from perceive_ir.workflows import registry_cli
    from perceive_ir.workflows.promotion import Gates, PromotionRefused, promote

    uri, _ = sqlite_registry
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    suite = made["suite"]

    def aliases(name: str) -> dict[str, str]:  # the promotion's aliases; @candidate is the newest registration's
        return {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items() if alias != "candidate"}

    newest = {name: max(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
              for name in ("reg-restorer", "reg-perceiver", "reg-medium-tier")}
    assert {name: int(client.get_model_version_by_alias(name, "candidate").version) for name in newest} == newest

    def evaluations() -> int:
        experiment = client.get_experiment_by_name("reg-eval")
        return len(client.search_runs([experiment.experiment_id])) if experiment else 0

    first = promote("reg-restorer", "1", suite, uri)  # no champion yet: (a), (b) vacuous, (c) has lineage
    assert first.evaluated and first.champion is None
    assert aliases("reg-restorer") == {"champion": "1"} and aliases("reg-perceiver") == {"champion": "1"}
    assert aliases("reg-medium-tier") == {"champion": "1"}

    with pytest.raises(PromotionRefused, match="another perceiver.*reg-perceiver/2"):
        promote("reg-restorer", "4", suite, uri)
    with pytest.raises(PromotionRefused, match="v3 has no evaluation on suite 'small'"):
        promote("reg-restorer", "3", suite, uri, evaluate=False)
    assert evaluations() == 1 and aliases("reg-restorer") == {"champion": "1"}

    better = promote("reg-restorer", "2", suite, uri, Gates(metric="psnr_out", margin=0.01))
    assert better.champion == "1" and better.candidate_score > better.champion_score + 0.01
    assert aliases("reg-restorer") == {"champion": "2", "previous": "1"}

    with pytest.raises(PromotionRefused, match="does not beat the champion v2"):
        promote("reg-restorer", "3", suite, uri)
    assert evaluations() == 3
    # again through the console script: the evaluation of the same suite hash is reused
    assert registry_cli.main(["--tracking-uri", uri, "promote", "reg-restorer", "3", "--suite", str(suite)]) == 1
    assert "promotion refused" in capsys.readouterr().err and evaluations() == 3
    # a version named by its alias, as the promotion step of a deployment does (@candidate is v4: another perceiver)
    assert registry_cli.main(["--tracking-uri", uri, "promote", "reg-restorer", "@candidate", "--suite", str(suite)]) == 1
    assert "another perceiver" in capsys.readouterr().err
    assert registry_cli.main(["--tracking-uri", uri, "promote", "reg-restorer", "@nowhere", "--suite", str(suite)]) == 2
    assert "nowhere" in capsys.readouterr().err
    # another suite (other seed, other hash): the champion has no evaluation there
    with pytest.raises(PromotionRefused, match="champion reg-restorer v2 has no evaluation"):
        promote("reg-restorer", "3", suite, uri, overrides=["seed=9"])
    assert aliases("reg-restorer") == {"champion": "2", "previous": "1"} and evaluations() == 3

    assert registry_cli.main(["--tracking-uri", uri, "list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    (v2,) = [line for line in listing if line.split()[:2] == ["reg-restorer", "2"]]
    assert "@champion" in v2 and "models:/reg-perceiver/1" in v2 and "small: psnr_out" in v2
    assert "not evaluated" in [line for line in listing if line.split()[:2] == ["reg-restorer", "4"]][0]
    assert registry_cli.main(["--tracking-uri", uri, "show", "reg-restorer", "2"]) == 0
    shown = capsys.readouterr().out
    assert "search_run" in shown and "perceiver.prompts_sha256" in shown and "small: " in shown

    # stage 2 takes the pair's perceiver by alias
    folder = products.resolve_product("models:/reg-perceiver@champion", "perceiver", "perceiver", uri)
    assert sha256(folder / "prompts.safetensors") == sha256(made["folders"]["perceiver0"] / "prompts.safetensors")
    assert products.load_perceiver(folder).identity.weights_sha256 == sha256(made["clips"][0])


@pytest.fixture(scope="module")
def mlflow_server(made):
    """``mlflow server`` on 127.0.0.1 over SQLite, stopped after the module."""
    port = _free_port()
    folder = made["root"] / "server"
    folder.mkdir()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (folder / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts"),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if server.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(folder / 'server.log').read_text()[-2000:]}")
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


PREDICT = """
import sys, numpy as np, mlflow
images = np.load(sys.argv[1])
restorer = mlflow.pyfunc.load_model("models:/srv-restorer@champion")
perceiver = mlflow.pyfunc.load_model("models:/srv-perceiver@champion")
mixed = np.empty(2, dtype=object)
mixed[:] = [images[0], images[1, :20, :13]]
np.savez(sys.argv[2], uint8=restorer.predict(images), float=restorer.predict(images.astype(np.float32) / 255),
         mixed=restorer.predict(mixed)[1], quality=perceiver.predict(images).to_numpy(),
         columns=np.array([str(c) for c in perceiver.predict(images).columns]))
"""


def test_the_champion_pair_loads_in_a_fresh_process_through_an_mlflow_server(mlflow_server, made, ray_session,
                                                                             tmp_path):
    from perceive_ir.eval.inference import FullImageRestorer, InferenceConfig
    from perceive_ir.workflows.promotion import promote

    uris = {}
    from perceive_ir.orchestration.trainer import register_products

    f = made["folders"]
    s1 = job_config(Stage1Config, mlflow_server, made["shards"], "srv")
    run1 = log_stage(mlflow_server, "srv-s1", {"perceiver": f["perceiver0"], "medium_tier": f["medium_tier"]})
    uris.update(register_products("stage1", s1, run1))
    s2 = job_config(Stage2Config, mlflow_server, made["shards"], "srv", perceiver=uris["perceiver"])
    uris.update(register_products("stage2", s2, log_stage(mlflow_server, "srv-s2", {"restorer": f["trained"]})))
    assert uris["restorer"] == "models:/srv-restorer/1"
    promote("srv-restorer", "1", made["suite"], mlflow_server)

    rng = np.random.default_rng(0)
    images = (rng.random((2, 37, 29, 3)) * 255).astype(np.uint8)  # odd sizes: padding to the multiple
    np.save(tmp_path / "images.npy", images)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    done = subprocess.run([sys.executable, "-c", PREDICT, str(tmp_path / "images.npy"), str(tmp_path / "out.npz")],
                          env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = np.load(tmp_path / "out.npz", allow_pickle=False)

    net, _ = products.load_restorer(f["trained"])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    expected = FullImageRestorer(net.eval(), InferenceConfig())(x).permute(0, 2, 3, 1).numpy()
    assert out["uint8"].shape == images.shape and out["uint8"].dtype == np.float32
    np.testing.assert_allclose(out["uint8"], expected, atol=1e-5)
    np.testing.assert_allclose(out["float"], expected, atol=1e-5)
    assert np.abs(expected - x.permute(0, 2, 3, 1).numpy()).max() > 1e-3  # the network did change the images
    np.testing.assert_allclose(out["mixed"], FullImageRestorer(net, InferenceConfig())(x[1:, :, :20, :13])[0]
                               .permute(1, 2, 0).numpy(), atol=1e-5)

    perceiver = products.load_perceiver(f["perceiver0"]).eval()
    with torch.no_grad():
        probs, score = perceiver.tier_probs(x), perceiver.quality_score(x)
    assert list(out["columns"]) == ["p_low", "p_medium", "p_high", "quality"]
    np.testing.assert_allclose(out["quality"], torch.cat([probs, score[:, None]], 1).double().numpy(), atol=1e-5)


def test_downloads_of_products_and_models_leave_no_temporary_folders(tmp_path, monkeypatch):
    """A product downloaded for registration lands in the product cache, once; a model loaded from a URI
    is downloaded to a temporary folder that is gone once it is loaded, and the model still predicts."""
    import tempfile

    from perceive_ir.registry.registration import download_run_product, log_product_model

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("PERCEIVE_IR_CACHE", str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = products.save_restorer(identity_restorer(), RESTORER_CFG, tmp_path / "restorer")
    run = log_stage(uri, "downloads", {"restorer": folder})
    first = download_run_product(uri, run.run_id, "restorer")
    assert download_run_product(uri, run.run_id, "restorer") == first
    assert sha256(first / "model.safetensors") == sha256(folder / "model.safetensors")
    assert (tmp_path / "cache" / "products") in first.parents
    model_id = log_product_model(uri, run.run_id, "restorer-model", first)
    model = load_model(Path(run.client.get_logged_model(model_id).artifact_location).as_uri(), uri)
    assert model.predict(np.zeros((1, 9, 11, 3), np.uint8)).shape == (1, 9, 11, 3)
    assert list(scratch.iterdir()) == []


def test_a_run_a_killed_launch_left_without_params_gets_them_at_the_next_launch(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="relaunch")
    uri, run_id, created = find_or_create_run(cfg, "job", {}, {}, "stage2")  # killed before its params
    assert created and MlflowClient(uri).get_run(run_id).data.params == {}
    _, again, created = find_or_create_run(cfg, "job", {"optimizer.lr": 0.5}, {}, "stage2")
    run = MlflowClient(uri).get_run(run_id)
    assert again == run_id and not created
    assert run.data.params == {"optimizer.lr": "0.5"} and run.data.tags["launches"] == "2"
