"""Kept for models registered before the library's layers were set: their copy of the model code
loads products through ``perceive_ir.train.products``. Do not add to it; new code imports
:mod:`perceive_ir.products`. (``tests/test_legacy_models.py`` loads such models.)"""

from perceive_ir.products.folders import load_medium_tier, load_perceiver, load_restorer

__all__ = ["load_medium_tier", "load_perceiver", "load_restorer"]
