"""Batch restoration with a registered restorer on Ray Data: a folder or bucket of images in, restored
images in their own formats and a quality report out, resumable (docs/restoration.md).

- :mod:`.config`: the job's settings; :mod:`.codecs`: decoding and encoding with bit depth and channels;
- :mod:`.records`: the input listing, per-image records, what a relaunch skips;
- :mod:`.models`: the restorer and its pair's perceiver, checked before anything loads;
- :mod:`.stages`: the Ray Data stages (read + decode, restoration actors, encode + write);
- :mod:`.report`: the per-image table, histograms, summary; :mod:`.job`: pre-flight and the run.
"""

from perceive_ir.workflows.restoration.config import RestoreConfig, RestoreRaySettings
from perceive_ir.workflows.restoration.job import RestorationResult, format_result, plan_restoration, run_restoration

__all__ = ["RestoreConfig", "RestoreRaySettings", "RestorationResult", "format_result", "plan_restoration",
           "run_restoration"]
