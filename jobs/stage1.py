"""Stage 1: the K hold-out restorers of the medium tier, then the quality perceiver's prompts.

    python jobs/stage1.py --config configs/stage1_tiny.yaml [key.path=value ...]
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/stage1.py --config ...

Products, logged to the job's MLflow run: ``perceiver/`` and ``medium_tier/`` (safetensors + JSON),
which stage 2 takes as ``runs:/<run id>/perceiver`` and ``runs:/<run id>/medium_tier``; with
``tracking.register_as=NAME`` they are also registered as MLflow models (loadable with
``mlflow.pyfunc.load_model``, weights still safetensors) ``models:/NAME-perceiver/<version>`` and
``models:/NAME-medium-tier/<version>``, tagged with their lineage (``perceive-registry show``).
"""

import sys

from _common import main

if __name__ == "__main__":
    sys.exit(main("stage1", __doc__))
