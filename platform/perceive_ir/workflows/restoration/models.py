"""Which restorer and perceiver a restoration runs, checked before anything is loaded.

``model`` must hold a restorer: a registered version says so in its ``lineage.product`` tag, which is
read without downloading; other locations are resolved (downloaded once per node) and their product
file decides. ``perceiver: ""`` means the pair's perceiver: the version the restorer was trained
against (its ``lineage.perceiver`` tag), else ``models:/<base>-perceiver@champion`` when that exists.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from perceive_ir.orchestration.preflight import PreflightError
from perceive_ir.products import product_kind, registered_version, resolve_product
from perceive_ir.products.locations import URI_SCHEMES

log = logging.getLogger(__name__)

__all__ = ["ResolvedModels", "check_restorer", "pair_perceiver", "resolve_models"]

RESTORER_SUFFIX = "-restorer"


@dataclass
class ResolvedModels:
    restorer: Path  # the product folders, on this node
    perceiver: Optional[Path]
    perceiver_location: str  # "" when no scores are computed
    version_tags: dict[str, str]  # restore.model_* tags of the MLflow run


def _message(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def check_restorer(location: str, tracking_uri: str) -> Optional[object]:
    """Refuse a registered version whose lineage names another product; returns the version (or None)."""
    if not location.startswith("models:/"):
        return None
    try:
        version = registered_version(location, tracking_uri)
    except Exception as err:  # noqa: BLE001 - MLflow raises several types; one line naming the URI
        raise PreflightError("model", f"'{location}' cannot be resolved in the tracking store {tracking_uri}: "
                                      f"{_message(err)}") from None
    product = version.tags.get("lineage.product")
    if product and product != "restorer":
        raise PreflightError("model", f"'{location}' (model {version.name} version {version.version}) is a "
                                      f"{product.replace('_', ' ')}, not a restorer: give a restorer, e.g. "
                                      f"models:/NAME-restorer@champion")
    return version


def _folder(key: str, location: str, tracking_uri: str) -> Path:
    try:
        return resolve_product(location, key, key, tracking_uri)
    except FileNotFoundError as err:
        raise PreflightError(key, _message(err)) from None


def pair_perceiver(location: str, version, tracking_uri: str) -> str:
    """The perceiver of the restorer's pair, or "" when none is known."""
    if version is not None and version.tags.get("lineage.perceiver"):
        return version.tags["lineage.perceiver"]
    name = version.name if version is not None else ""
    if name.endswith(RESTORER_SUFFIX):
        candidate = f"models:/{name[: -len(RESTORER_SUFFIX)]}-perceiver@champion"
        try:
            registered_version(candidate, tracking_uri)
            return candidate
        except Exception:  # noqa: BLE001 - no such alias: no scores
            pass
    return ""


def resolve_models(model: str, perceiver: str, tracking_uri: str) -> ResolvedModels:
    """The restorer and perceiver folders; :class:`PreflightError` naming the setting for a wrong one."""
    if not model:
        raise PreflightError("model", "no restorer given: model=models:/NAME-restorer@champion (or runs:/<id>/restorer, "
                                      "or a folder)")
    version = check_restorer(model, tracking_uri)
    restorer = _folder("model", model, tracking_uri)
    kind = _kind(restorer)
    if kind != "restorer":
        raise PreflightError("model", f"'{model}' is a {kind.replace('_', ' ') if kind else 'folder without a product'}, "
                                      "not a restorer: give a restorer, e.g. models:/NAME-restorer@champion")
    tags = {"restore.model": model}
    if version is not None:
        tags.update({"restore.model_name": version.name, "restore.model_version": str(version.version)})
        if version.run_id:
            tags["restore.model_run_id"] = version.run_id
    elif model.startswith("runs:/"):
        tags["restore.model_run_id"] = model[len("runs:/"):].split("/", 1)[0]
    location = perceiver
    if perceiver == "":
        location = pair_perceiver(model, version, tracking_uri)
        if not location:
            log.warning("no perceiver for '%s' (no lineage.perceiver tag, no <base>-perceiver@champion): "
                        "the report has no quality scores; give perceiver=<URI>", model)
    elif perceiver.lower() == "none":
        location = ""
    folder = None
    if location:
        folder = _folder("perceiver", location, tracking_uri)
        if _kind(folder) != "perceiver":
            raise PreflightError("perceiver", f"'{location}' is not a perceiver")
        tags["restore.perceiver"] = location
    return ResolvedModels(restorer, folder, location, tags)


def _kind(folder: Path) -> str:
    try:
        return product_kind(folder)
    except FileNotFoundError:
        return ""


def is_uri(location: str) -> bool:
    return location.startswith(URI_SCHEMES)
