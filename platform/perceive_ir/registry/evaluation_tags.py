"""What an evaluation ran on, as MLflow tags, and the headline metrics written back onto a model version."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from perceive_ir.products.locations import registered_version

__all__ = ["ModelReference", "model_reference", "tag_model_version"]


@dataclass
class ModelReference:
    location: str
    run_id: Optional[str] = None  # the training run the weights came from, when known
    model_name: Optional[str] = None  # a registered version
    model_version: Optional[str] = None

    def tags(self) -> dict[str, str]:
        tags = {"eval.model": self.location}
        for key, value in (("eval.run_id", self.run_id), ("eval.model_name", self.model_name),
                           ("eval.model_version", self.model_version)):
            if value:
                tags[key] = value
        return tags


def model_reference(location: str, tracking_uri: str) -> ModelReference:
    """``runs:/<id>/...``, ``models:/<name>/<n>``, ``models:/<name>@<alias>`` or a local folder."""
    if location.startswith("runs:/"):
        return ModelReference(location, run_id=location[len("runs:/"):].split("/", 1)[0])
    if location.startswith("models:/"):
        version = registered_version(location, tracking_uri)
        return ModelReference(location, version.run_id, version.name, str(version.version))
    if re.match(r"^[a-z][a-z0-9+.-]*:/", location):
        return ModelReference(location)
    return ModelReference(str(Path(location).expanduser().resolve()))


def tag_model_version(ref: ModelReference, tracking_uri: str, suite: str, metrics: Mapping[str, float],
                      extra: Mapping[str, str]) -> dict[str, str]:
    """Set ``eval.<suite>.<metric>`` (and ``extra``) tags on a registered version; returns them."""
    if not (ref.model_name and ref.model_version):
        return {}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    tags = {f"eval.{suite}.{name}": f"{value:.4f}" for name, value in metrics.items()}
    tags.update({f"eval.{suite}.{name}": value for name, value in extra.items()})
    for key, value in tags.items():
        client.set_model_version_tag(ref.model_name, ref.model_version, key, value)
    return tags
