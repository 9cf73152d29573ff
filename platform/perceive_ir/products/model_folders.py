"""MLflow model folders of products: the product folder inside one, what kind it is, and the refusal
of any folder whose loading could unpickle code.

A registered product is an MLflow model from code (:mod:`perceive_ir.registry.pyfunc_models`) with
the product folder as its ``product`` artifact: weights stay safetensors and nothing is pickled.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Optional

from perceive_ir.weights import sha256_file

__all__ = ["PRODUCT_ARTIFACT", "PRODUCT_FILES", "PICKLE_SUFFIXES", "UnsafeModelError", "refuse_pickled",
           "model_product_folder", "product_kind", "folder_weights_sha256", "load_model"]

PRODUCT_ARTIFACT = "product"
PRODUCT_FILES = {"restorer": "restorer.json", "perceiver": "perceiver.json", "medium_tier": "medium_tier.json"}
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".pt", ".pth", ".ckpt", ".cloudpickle")


class UnsafeModelError(ValueError):
    """A model folder whose loading could run pickled code."""


def product_kind(folder: Path) -> str:
    """Which product a folder holds, from its JSON file."""
    for kind, name in PRODUCT_FILES.items():
        if (folder / name).is_file():
            return kind
    raise FileNotFoundError(f"'{folder}' holds no product (none of {', '.join(PRODUCT_FILES.values())})")


def folder_weights_sha256(folder: Path) -> str:
    """One sha256 over the folder's safetensors files (names and contents, in name order)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        digest.update(f"{path.relative_to(folder).as_posix()} {sha256_file(path)}\n".encode())
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
