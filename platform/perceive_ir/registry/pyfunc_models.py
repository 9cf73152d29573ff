"""MLflow models-from-code for the stage products: this file is what a registered model runs.

A product logged as an MLflow model holds this file (``python_model``), the product folder as the
artifact ``product`` (safetensors + JSON, read by :mod:`perceive_ir.products`) and a signature;
nothing is pickled. ``mlflow.pyfunc.load_model(uri).predict(images)`` takes B x H x W x 3 images
(uint8 in 0..255, or float in [0, 1]; an object array or list of H x W x 3 arrays for mixed sizes):

- restorer: the restored images, float32 in [0, 1], through the evaluation's padding and tiling
  (``perceive_ir.eval.inference``; params ``tile_size``, ``tile_overlap``, ``precision``);
- medium tier: the same from one hold-out restorer (param ``fold``);
- perceiver: a table of ``p_low``, ``p_medium``, ``p_high`` and ``quality`` per image.

A copy of this file travels inside every registered model and runs whenever that model loads, so
the names it imports from ``perceive_ir`` must stay where they are; models registered before the
library's layers were set import old names, which ``tracking/model_registry.py`` and
``train/products.py`` keep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

from perceive_ir import products
from perceive_ir.eval.inference import FullImageRestorer, InferenceConfig
from perceive_ir.products import PRODUCT_ARTIFACT, product_kind

QUALITY_COLUMNS = ("p_low", "p_medium", "p_high", "quality")


def image_list(model_input: Any) -> list[np.ndarray]:
    """The images of a predict call as H x W x 3 float32 arrays in [0, 1]."""
    if isinstance(model_input, dict):  # named tensors, as the signature names the input
        model_input = model_input["images"]
    if hasattr(model_input, "to_numpy"):  # a one-column table of images
        model_input = model_input.iloc[:, 0].tolist()
    if isinstance(model_input, np.ndarray) and model_input.dtype != object:
        model_input = [model_input] if model_input.ndim == 3 else list(model_input)
    images = []
    for k, image in enumerate(model_input):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image {k}: expected H x W x 3, got shape {image.shape}")
        if image.dtype == np.uint8:
            image = image.astype(np.float32) / 255
        elif np.issubdtype(image.dtype, np.floating):
            image = image.astype(np.float32)
        else:
            raise ValueError(f"image {k}: expected uint8 or float pixels, got {image.dtype}")
        images.append(image)
    return images


def _same_size_groups(images: list[np.ndarray]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for k, image in enumerate(images):
        groups.setdefault(image.shape[:2], []).append(k)
    return groups


def _stacked(images: list[np.ndarray], indices: list[int]):
    import torch

    return torch.from_numpy(np.stack([images[k] for k in indices])).permute(0, 3, 1, 2)


def _restore_all(restore, images: list[np.ndarray]) -> list[np.ndarray]:
    """``restore`` (B x 3 x H x W -> same) over images grouped by size; outputs in input order."""
    outputs: list[np.ndarray] = [None] * len(images)  # type: ignore[list-item]
    for indices in _same_size_groups(images).values():
        restored = restore(_stacked(images, indices)).permute(0, 2, 3, 1).cpu().numpy()
        for k, out in zip(indices, restored):
            outputs[k] = out.astype(np.float32)
    return outputs


def _as_batch(outputs: list[np.ndarray]) -> np.ndarray:
    """One B x H x W x 3 array when the sizes agree, else an object array of images."""
    if len({o.shape for o in outputs}) <= 1:
        return np.stack(outputs) if outputs else np.zeros((0, 0, 0, 3), np.float32)
    batch = np.empty(len(outputs), dtype=object)
    batch[:] = outputs
    return batch


class ProductModel(PythonModel):
    """One class for the three products; the product folder says which one it is."""

    def load_context(self, context) -> None:
        import torch

        folder = Path(context.artifacts[PRODUCT_ARTIFACT])
        self.kind = product_kind(folder)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.kind == "restorer":
            self.networks = [products.load_restorer(folder)[0]]
        elif self.kind == "medium_tier":
            self.networks = products.load_medium_tier(folder)[0]
        else:
            self.networks = [products.load_perceiver(folder)]
        for network in self.networks:
            network.eval().to(self.device)

    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None):
        import torch

        params = params or {}
        images = image_list(model_input)
        with torch.no_grad():
            if self.kind == "perceiver":
                return self._quality(images)
            return _as_batch(self._restore(images, params))

    def _restore(self, images: list[np.ndarray], params: dict[str, Any]) -> list[np.ndarray]:
        fold = int(params.get("fold", 0))
        if not 0 <= fold < len(self.networks):
            raise ValueError(f"param 'fold': {fold} is not one of the {len(self.networks)} hold-out restorers")
        tile = int(params.get("tile_size", 1024))
        cfg = InferenceConfig(precision=params.get("precision", "fp32"), tile_size=tile if tile > 0 else None,
                              tile_overlap=int(params.get("tile_overlap", 64)))
        restorer = FullImageRestorer(self.networks[fold], cfg)
        return _restore_all(lambda x: restorer(x.to(self.device)), images)

    def _quality(self, images: list[np.ndarray]):
        import pandas as pd
        import torch

        perceiver = self.networks[0]
        rows = np.zeros((len(images), len(QUALITY_COLUMNS)), dtype=np.float64)
        for indices in _same_size_groups(images).values():
            x = _stacked(images, indices).to(self.device)
            probs = perceiver.tier_probs(x)
            score = perceiver.quality_score(x)
            rows[indices] = torch.cat([probs, score[:, None]], dim=1).double().cpu().numpy()
        return pd.DataFrame(rows, columns=list(QUALITY_COLUMNS))


def signature(kind: str):
    """The model signature of a product: images in; images or the quality table out; the params."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    images = Schema([TensorSpec(np.dtype(object), (-1,), name="images")])
    if kind == "perceiver":
        return ModelSignature(inputs=images, outputs=Schema([ColSpec("double", c) for c in QUALITY_COLUMNS]))
    params = [ParamSpec("tile_size", "long", 1024), ParamSpec("tile_overlap", "long", 64),
              ParamSpec("precision", "string", "fp32")]
    if kind == "medium_tier":
        params.append(ParamSpec("fold", "long", 0))
    return ModelSignature(inputs=images, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, 3))]),
                          params=ParamSchema(params))


# Run by MLflow when it loads a model logged from this file (and harmless on a plain import).
mlflow.models.set_model(ProductModel())
