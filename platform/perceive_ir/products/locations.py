"""Where a product comes from: a local folder, or an MLflow URI downloaded into the node's cache.

A product is named by a local path or an MLflow URI (``runs:/<id>/<path>``, ``models:/<name>/<n>``,
``models:/<name>@<alias>``, ``mlflow-artifacts:/...``). A URI is downloaded once per node
(:mod:`perceive_ir.data.node_cache`); an MLflow model folder yields the product folder it holds.
"""

from __future__ import annotations

from pathlib import Path

from perceive_ir.data.node_cache import cached_download
from perceive_ir.data.storage import missing_store
from perceive_ir.products.model_folders import model_product_folder

__all__ = ["URI_SCHEMES", "resolve_product", "download", "registered_version"]

URI_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


def resolve_product(location: str, what: str, config_key: str, tracking_uri: str | None = None) -> Path:
    """A local folder for ``location`` (a path, or an MLflow URI that is downloaded)."""
    if location.startswith(URI_SCHEMES):
        try:
            local = download(location, tracking_uri)
        except Exception as err:  # noqa: BLE001 - MLflow raises several types; name the URI
            raise FileNotFoundError(f"{what}: cannot download '{location}' (from '{config_key}'): {err}") from None
        return model_product_folder(local)
    path = Path(location).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: folder '{path}' (from '{config_key}') does not exist")
    return model_product_folder(path)


def _require_store(tracking_uri: str | None) -> None:
    if missing_store(tracking_uri):
        raise FileNotFoundError(f"the tracking store {tracking_uri} does not exist")


def download(location: str, tracking_uri: str | None) -> Path:
    """The files behind an MLflow URI, in this node's product cache: downloaded once, then shared
    by every worker and trial of the node (see :func:`~perceive_ir.data.node_cache.cached_download`)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    _require_store(tracking_uri)
    # a registered version -> the artifact URI it was registered from (the registry is the tracking store)
    uri = registered_version(location, tracking_uri).source if location.startswith("models:/") else location
    identity = {"uri": uri}
    if uri.startswith("runs:/"):  # a continued run re-logs its products: its end time tells them apart
        run_id, _, path = uri[len("runs:/"):].partition("/")
        client = MlflowClient(tracking_uri=tracking_uri)
        identity.update(end_time=client.get_run(run_id).info.end_time, files=_listing(client, run_id, path))
    return cached_download(identity, lambda folder: Path(mlflow.artifacts.download_artifacts(
        artifact_uri=uri, tracking_uri=tracking_uri, dst_path=str(folder))))


def _listing(client, run_id: str, path: str) -> list[tuple[str, int]]:
    """Every file under an artifact path with its size (folders expanded)."""
    files = []
    for entry in client.list_artifacts(run_id, path):
        files += _listing(client, run_id, entry.path) if entry.is_dir else [(entry.path, entry.file_size)]
    return sorted(files)


def registered_version(location: str, tracking_uri: str | None):
    """The MLflow ``ModelVersion`` of ``models:/<name>/<n>`` or ``models:/<name>@<alias>``."""
    from mlflow.tracking import MlflowClient

    _require_store(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    ref = location[len("models:/"):]
    if "@" in ref:
        return client.get_model_version_by_alias(*ref.split("@", 1))
    name, _, number = ref.partition("/")
    return client.get_model_version(name, number)
