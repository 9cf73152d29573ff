"""The MLflow model registry of products: models from code, their lineage tags, evaluation tags.

- :mod:`~perceive_ir.registry.registration`: log a product folder as an MLflow model and register it;
- :mod:`~perceive_ir.registry.lineage`: the ``lineage.*`` tags of a version;
- :mod:`~perceive_ir.registry.pyfunc_models`: the code a registered model runs;
- :mod:`~perceive_ir.registry.evaluation_tags`: what an evaluation ran on, and its metrics on a version.

(The name -> builder tables of backbones and losses are :mod:`perceive_ir.components`.)
"""
