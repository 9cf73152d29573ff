"""Restore every image of a folder or bucket with a registered restorer, on Ray Data.

    python jobs/restore.py model=models:/quickstart-restorer@champion input=photos output=restored
    python jobs/restore.py --config configs/restore.yaml model=models:/perceive-ir-restorer@champion \\
        input=s3://bucket/scans output=s3://bucket/scans-restored ray.actors=4 ray.use_gpu=true

Outputs keep their inputs' relative paths, formats and bit depths; a relaunch with the same output
restores only what is not done yet. The report (one row per image: size, time, the perceiver's score
of input and output, a flag where the output scored lower; PSNR/SSIM with target=) is written to
<output>/_restore/ and to an MLflow run tagged with the model version (docs/restoration.md).

Exit codes: 0 done; 1 a store or service did not answer; 2 the configuration or an input is wrong.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for entry in (REPO / "platform", REPO):  # a plain checkout runs unchanged (ray job submit --working-dir .)
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from perceive_ir.config import ConfigError, load_config  # noqa: E402
from perceive_ir.data.storage import StorageError, add_endpoint_argument, is_unreachable, set_default_endpoint  # noqa: E402
from perceive_ir.orchestration.preflight import PreflightError  # noqa: E402
from perceive_ir.workflows.restoration import RestoreConfig, format_result, plan_restoration, run_restoration  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "restore.yaml"),
                        help="YAML settings (default: configs/restore.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.path=value settings: model=, input=, output=, ...")
    add_endpoint_argument(parser)
    args = parser.parse_args(argv)
    set_default_endpoint(args.endpoint_url)
    try:
        cfg = load_config(RestoreConfig, args.config, args.overrides)
    except ConfigError as err:
        print(f"restore: configuration error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        plan = plan_restoration(cfg, working_dir=REPO)  # pre-flight: nothing is loaded before it passes
        result = run_restoration(cfg, working_dir=REPO, plan=plan)
    except PreflightError as err:
        print(f"restore: pre-flight: {err}", file=sys.stderr)
        return err.exit_code
    except ConnectionError as err:
        print(f"restore: {err}", file=sys.stderr)
        return 1
    except StorageError as err:
        print(f"restore: {err}", file=sys.stderr)
        return 1 if is_unreachable(err) else 2
    print(format_result(result))
    print(f"MLFLOW_RUN_ID={result.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
