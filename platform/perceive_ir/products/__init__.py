"""Products: what a trained network is on disk and where it comes from.

- :mod:`~perceive_ir.products.folders`: save and load the restorer, the medium tier and the perceiver
  (safetensors + JSON; loading never executes code);
- :mod:`~perceive_ir.products.locations`: a folder or an MLflow URI (``runs:/``, ``models:/``) to a
  local folder, downloaded once per node;
- :mod:`~perceive_ir.products.model_folders`: MLflow model folders of products, and the refusal of
  pickled content.
"""

from perceive_ir.products.folders import (
    ensure_clip_weights,
    load_medium_tier,
    load_perceiver,
    load_restorer,
    medium_tier_generator,
    save_medium_tier,
    save_perceiver,
    save_restorer,
)
from perceive_ir.products.locations import download, registered_version, resolve_product
from perceive_ir.products.model_folders import (
    PRODUCT_ARTIFACT,
    UnsafeModelError,
    folder_weights_sha256,
    load_model,
    model_product_folder,
    product_kind,
    refuse_pickled,
)

__all__ = [
    "PRODUCT_ARTIFACT",
    "UnsafeModelError",
    "download",
    "ensure_clip_weights",
    "folder_weights_sha256",
    "load_medium_tier",
    "load_model",
    "load_perceiver",
    "load_restorer",
    "medium_tier_generator",
    "model_product_folder",
    "product_kind",
    "refuse_pickled",
    "registered_version",
    "resolve_product",
    "save_medium_tier",
    "save_perceiver",
    "save_restorer",
]
