"""Stage products as registered MLflow models, with the lineage of each version as tags.

A product is logged as an MLflow model from code (``tracking/pyfunc_models.py``) with the product
folder as its artifact: weights stay safetensors and nothing is pickled. Each registered version
carries ``lineage.*`` tags: the product, the training run, the sha256 of its weights, the perceiver
it scores with (``lineage.perceiver.*``: registered version, run, prompts sha256, CLIP identity),
the medium tier (``lineage.medium_tier.*``), the sha256 of the training shard manifests, the
config hash, the git commit and, when it came from one, the search run.

Models are loaded through ``load_model``, which refuses a model folder with pickled content
(a cloudpickle python model, another flavor, a ``.pkl`` file) before MLflow reads it.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

__all__ = ["MODEL_CODE", "PICKLE_SUFFIXES", "UnsafeModelError", "refuse_pickled", "model_product_folder",
           "folder_weights_sha256", "log_product_model", "register_product", "registered_from_run", "upstream_tags",
           "product_lineage", "shard_manifest_tags", "perceiver_identity", "load_model"]

MODEL_CODE = Path(__file__).with_name("pyfunc_models.py")
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".pt", ".pth", ".ckpt", ".cloudpickle")
PRODUCT_ARTIFACT = "product"
LINEAGE = "lineage."
# what identifies the perceiver a version was trained against (or is)
PERCEIVER_KEYS = ("lineage.perceiver.prompts_sha256", "lineage.perceiver.clip")
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


class UnsafeModelError(ValueError):
    """A model folder whose loading could run pickled code."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_weights_sha256(folder: Path) -> str:
    """One sha256 over the folder's safetensors files (names and contents, in name order)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        digest.update(f"{path.relative_to(folder).as_posix()} {_sha256(path)}\n".encode())
    return digest.hexdigest()


def refuse_pickled(folder: Path) -> None:
    """Raise ``UnsafeModelError`` unless ``folder`` (a product or an MLflow model folder) is loadable
    without unpickling: the only flavor is a python function from code, and no file is a pickle."""
    import yaml

    pickles = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                     if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeModelError(f"model '{folder}' holds pickled files ({', '.join(pickles)}): refused, not loaded")
    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file():
        return
    flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors") or {}
    others = sorted(set(flavors) - {"python_function"})
    pyfunc = flavors.get("python_function") or {}
    if others or not pyfunc.get("model_code_path") or pyfunc.get("python_model"):
        raise UnsafeModelError(
            f"model '{folder}' is not a python model from code (flavors {sorted(flavors)}, python_model "
            f"{pyfunc.get('python_model')!r}): a cloudpickle-serialised model is refused, not loaded")


def model_product_folder(folder: Path) -> Path:
    """The product files inside an MLflow model folder (its ``product`` artifact); ``folder`` itself
    when it is not a model folder. Refuses a model folder with pickled content."""
    import yaml

    if not (folder / "MLmodel").is_file():
        return folder
    refuse_pickled(folder)
    flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    relative = ((flavor.get("artifacts") or {}).get(PRODUCT_ARTIFACT) or {}).get("path")
    product = (folder / relative).resolve() if relative else None
    if product is None or not product.is_dir() or folder.resolve() not in product.parents:
        raise FileNotFoundError(f"MLflow model '{folder}' has no '{PRODUCT_ARTIFACT}' artifact folder")
    return product


def _requirements() -> list[str]:
    import importlib.metadata as md

    found = []
    for package in ("perceive-ir-platform", "mlflow", "torch", "open_clip_torch", "safetensors"):
        try:
            found.append(f"{package}=={md.version(package).split('+')[0]}")
        except md.PackageNotFoundError:
            found.append(package)
    return found


def log_product_model(tracking_uri: str, run_id: str, name: str, folder: Path,
                      tags: Optional[Mapping[str, str]] = None) -> str:
    """Log a product folder as an MLflow model ``name`` of ``run_id``; returns the model id. The name
    must differ from the run's artifact folders: ``runs:/<run>/<name>`` means the model in MLflow 3,
    and ``runs:/<run>/perceiver`` must stay the product folder."""
    import mlflow
    from mlflow.models import Model
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_run(run_id).info.experiment_id
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment).tags:  # the UI's model-training view
        client.set_experiment_tag(experiment, EXPERIMENT_KIND_TAG, "custom_model_development")
    # Model.log reads the global tracking URI; its advice to give an input example does not apply
    # (the signature is explicit, and an example would be run at logging)
    with _use_tracking_uri(tracking_uri), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example.*", category=UserWarning)
        from perceive_ir.tracking.pyfunc_models import product_kind, signature

        kind = product_kind(folder)
        model = client.create_logged_model(experiment, name=name, source_run_id=run_id, tags=dict(tags or {}),
                                           model_type=kind)
        info = Model.log(artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id, model_id=model.model_id,
                         python_model=str(MODEL_CODE), artifacts={PRODUCT_ARTIFACT: str(folder)},
                         signature=signature(kind), pip_requirements=_requirements(),
                         metadata={"product": kind, "input": "B x H x W x 3 images, uint8 0..255 or float in [0, 1]"})
    return info.model_id


def register_product(tracking_uri: str, run_id: str, folder: Path, model_name: str, tags: Mapping[str, str]) -> str:
    """Log the product folder as a model of the run and register it as a new version of ``model_name``
    with ``tags``; returns ``models:/<name>/<version>``."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    model_id = log_product_model(tracking_uri, run_id, model_name, folder, tags)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        client.create_registered_model(model_name, description="Perceive-IR stage product (pyfunc from code)")
    except MlflowException:
        pass  # already registered: add a version
    # the source is the model's artifact location, so that any reader downloads it without MLflow's globals
    source = client.get_logged_model(model_id).artifact_location
    version = client.create_model_version(model_name, source=source, run_id=run_id, tags=dict(tags), model_id=model_id)
    # the link the UI shows from the logged model to its registered versions
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([{"name": model_name,
                                                                               "version": version.version}])})
    return f"models:/{model_name}/{version.version}"


def _clip_identity(perceiver_folder: Path) -> str:
    clip = json.loads((perceiver_folder / "perceiver.json").read_text())["clip"]
    keys = ("architecture", "pretrained", "weights_sha256", "activation")
    return json.dumps({k: clip.get(k) for k in keys}, sort_keys=True)


def perceiver_identity(tags: Mapping[str, str]) -> Optional[tuple[str, str]]:
    """The perceiver a version was trained against (or is): (prompts sha256, CLIP identity)."""
    values = tuple(tags.get(k) for k in PERCEIVER_KEYS)
    return values if all(values) else None  # type: ignore[return-value]


def registered_from_run(tracking_uri: str, run_id: str, product: str):
    """The newest version registered from ``run_id``'s ``product`` (None when there is none)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    found = [v for v in client.search_model_versions(f"run_id = '{run_id}'")
             if v.tags.get(f"{LINEAGE}product") == product]
    return max(found, key=lambda v: int(v.version)) if found else None


def _registered_for(location: str, product: str, tracking_uri: str):
    """The registered version behind a product location: itself for ``models:/``, else the version
    registered from the ``runs:/`` run (None for folders and unregistered runs)."""
    from perceive_ir.tracking.evaluation import registered_version

    if location.startswith("models:/"):
        return registered_version(location, tracking_uri)
    if not location.startswith("runs:/"):
        return None
    return registered_from_run(tracking_uri, location[len("runs:/"):].split("/", 1)[0], product)


def upstream_tags(key: str, location: str, tracking_uri: str) -> dict[str, str]:
    """Lineage tags of an input product (``key`` = perceiver | medium_tier) given as ``location``."""
    from perceive_ir.train.products import resolve_product

    tags = {f"{LINEAGE}{key}.location": location}
    version = _registered_for(location, key, tracking_uri)
    if version is not None:
        tags[f"{LINEAGE}{key}"] = f"models:/{version.name}/{version.version}"
        tags[f"{LINEAGE}{key}.run_id"] = version.run_id or ""
        own = {k: v for k, v in version.tags.items() if k.startswith(f"{LINEAGE}{key}.")}
        if f"{LINEAGE}weights_sha256" in version.tags:
            own[f"{LINEAGE}{key}.weights_sha256"] = version.tags[f"{LINEAGE}weights_sha256"]
        if own:
            return {**tags, **own, f"{LINEAGE}{key}.location": location}
    elif location.startswith("runs:/"):
        tags[f"{LINEAGE}{key}.run_id"] = location[len("runs:/"):].split("/", 1)[0]
    folder = resolve_product(location, key.replace("_", " "), key, tracking_uri)
    tags.update(_own_tags(key, folder))
    return tags


def _own_tags(kind: str, folder: Path) -> dict[str, str]:
    """What identifies a product folder: its weights, and a perceiver's prompts and CLIP."""
    tags = {f"{LINEAGE}{kind}.weights_sha256": folder_weights_sha256(folder)}
    if kind == "perceiver":
        tags[PERCEIVER_KEYS[0]] = _sha256(folder / "prompts.safetensors")
        tags[PERCEIVER_KEYS[1]] = _clip_identity(folder)
    return tags


def shard_manifest_tags(sources: list[Any], storage_options: Mapping[str, Any]) -> dict[str, str]:
    """sha256 of each training source's manifest, and one over them all."""
    from perceive_ir.data.manifest import manifest_url
    from perceive_ir.data.storage import filesystem

    hashes = {}
    for source in sources:
        if "{" in source.location:  # a brace pattern of .tar URLs has no manifest
            hashes[source.name or source.location] = "none"
            continue
        fs, path = filesystem(manifest_url(source.location), storage_options)
        hashes[source.name or source.location] = hashlib.sha256(fs.cat_file(path)).hexdigest()
    combined = hashlib.sha256("".join(f"{k} {v}\n" for k, v in sorted(hashes.items())).encode()).hexdigest()
    tags = {f"{LINEAGE}shard_manifests_sha256": combined}
    listing = json.dumps(hashes, sort_keys=True)
    if len(listing) < 4000:
        tags[f"{LINEAGE}shard_manifests"] = listing
    return tags


def config_hash(config: Mapping[str, Any]) -> str:
    from perceive_ir.data.storage import redact

    return hashlib.sha256(json.dumps(redact(dict(config)), sort_keys=True, default=str).encode()).hexdigest()[:16]


def product_lineage(product: str, folder: Path, run_tags: Mapping[str, str], run_id: str, config: Mapping[str, Any],
                    shard_tags: Mapping[str, str], upstream: Mapping[str, str],
                    search_run: Optional[str] = None) -> dict[str, str]:
    """All lineage tags of one product version."""
    from perceive_ir.tracking.mlflow_run import version_tags

    tags = {f"{LINEAGE}product": product, f"{LINEAGE}run_id": run_id,
            f"{LINEAGE}weights_sha256": folder_weights_sha256(folder),
            f"{LINEAGE}config_sha256": config_hash(config),
            f"{LINEAGE}git_commit": run_tags.get("git_commit") or version_tags()["git_commit"],
            **shard_tags, **upstream}
    if product == "perceiver":  # a perceiver's identity under the keys its restorers carry too
        tags.update({k: v for k, v in _own_tags(product, folder).items() if k in PERCEIVER_KEYS})
    if search_run:
        tags[f"{LINEAGE}search_run"] = search_run
    return tags


def download_run_product(tracking_uri: str, run_id: str, product: str) -> Path:
    """The run's product folder, in the node's product cache (it stays there for later readers)."""
    from perceive_ir.train.products import _download

    return _download(f"runs:/{run_id}/{product}", tracking_uri)


def load_model(location: str, tracking_uri: Optional[str] = None):
    """``mlflow.pyfunc.load_model`` of a model URI or folder, after refusing pickled content. A URI is
    downloaded to a temporary folder, removed once loaded: the model holds its networks in memory."""
    import mlflow

    if Path(location).expanduser().is_dir():
        return _load_checked(Path(location).expanduser())
    with tempfile.TemporaryDirectory(prefix="model-") as folder:
        return _load_checked(Path(mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=tracking_uri,
                                                                       dst_path=folder)))


def _load_checked(local: Path):
    import mlflow

    refuse_pickled(local)
    return mlflow.pyfunc.load_model(str(local))
