"""Stage products as registered MLflow models: logged from code, registered with their lineage as tags.

A product is logged as an MLflow model from code (:mod:`perceive_ir.registry.pyfunc_models`) with the
product folder as its artifact: weights stay safetensors and nothing is pickled. The tags of each
version are :mod:`perceive_ir.registry.lineage`'s. Models load through
:func:`perceive_ir.products.load_model`, which refuses pickled content before MLflow reads it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Mapping, Optional

from perceive_ir.products.locations import download
from perceive_ir.products.model_folders import PRODUCT_ARTIFACT, product_kind

__all__ = ["MODEL_CODE", "log_product_model", "register_product", "download_run_product"]

MODEL_CODE = Path(__file__).with_name("pyfunc_models.py")
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


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
        from perceive_ir.registry.pyfunc_models import signature

        kind = product_kind(folder)
        model = client.create_logged_model(experiment, name=name, source_run_id=run_id, tags=dict(tags or {}),
                                           model_type=kind)
        info = Model.log(artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id, model_id=model.model_id,
                         python_model=str(MODEL_CODE), artifacts={PRODUCT_ARTIFACT: str(folder)},
                         signature=signature(kind), pip_requirements=_requirements(),
                         metadata={"product": kind, "input": "B x H x W x 3 images, uint8 0..255 or float in [0, 1]"})
    return info.model_id


def register_product(tracking_uri: str, run_id: str, folder: Path, model_name: str, tags: Mapping[str, str],
                     alias: Optional[str] = None) -> str:
    """Log the product folder as a model of the run and register it as a new version of ``model_name``
    with ``tags`` (and ``alias`` moved to it); returns ``models:/<name>/<version>``."""
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
    if alias:
        client.set_registered_model_alias(model_name, alias, version.version)
    return f"models:/{model_name}/{version.version}"


def download_run_product(tracking_uri: str, run_id: str, product: str) -> Path:
    """The run's product folder, in the node's product cache (it stays there for later readers)."""
    return download(f"runs:/{run_id}/{product}", tracking_uri)


