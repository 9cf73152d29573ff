"""Stage 2: the restorer trained with the quality-aware losses and the frozen stage-1 perceiver.

    python jobs/stage2.py --config configs/stage2_tiny.yaml perceiver=runs:/<id>/perceiver \
        medium_tier=runs:/<id>/medium_tier
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/stage2.py --config ...

The stage-1 products may also be given as registered models (``models:/NAME-perceiver/1``, or the
promoted pair's ``models:/NAME-perceiver@champion``) or as local folders. The final restorer weights
(``restorer/model.safetensors``) are logged to the job's MLflow run; with ``tracking.register_as=NAME``
the restorer is registered as ``models:/NAME-restorer/<version>`` with its lineage (the perceiver's
version, prompts sha256 and CLIP identity, the medium tier's, the shard manifests, config hash, git
commit), ready for ``perceive-registry promote``.
"""

import sys

from _common import main

if __name__ == "__main__":
    sys.exit(main("stage2", __doc__))
