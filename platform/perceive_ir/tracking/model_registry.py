"""Kept for models registered before the library's layers were set: their copy of the model code
imports ``PRODUCT_ARTIFACT`` from here. Do not add to it; new code imports :mod:`perceive_ir.products`
and :mod:`perceive_ir.registry`. (``tests/test_legacy_models.py`` loads such models.)"""

from perceive_ir.products.model_folders import PRODUCT_ARTIFACT

__all__ = ["PRODUCT_ARTIFACT"]
