"""Shared entry point of the training jobs: parse ``--config`` and overrides, check the job's inputs
(pre-flight, before Ray starts), then launch on Ray.

Exit codes: 0 done; 1 a store or service did not answer (tracking server, S3 endpoint);
2 the configuration or an input is wrong."""

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
from perceive_ir.data.storage import add_endpoint_argument, set_default_endpoint  # noqa: E402
from perceive_ir.orchestration.config import Stage1Config, Stage2Config  # noqa: E402

CONFIGS = {"stage1": Stage1Config, "stage2": Stage2Config}


def main(stage: str, doc: str, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/%s_tiny.yaml" % stage)
    parser.add_argument("overrides", nargs="*", help="key.path=value settings (YAML values)")
    add_endpoint_argument(parser)
    args = parser.parse_args(argv)
    set_default_endpoint(args.endpoint_url)
    try:
        cfg = load_config(CONFIGS[stage], args.config, args.overrides)
    except ConfigError as err:
        print(f"{stage}: configuration error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from perceive_ir.orchestration.preflight import PreflightError, preflight

    try:
        preflight(stage, cfg, working_dir=REPO)
    except PreflightError as err:
        print(f"{stage}: pre-flight: {err}", file=sys.stderr)
        return err.exit_code
    from perceive_ir.orchestration.trainer import launch

    result = launch(stage, cfg, working_dir=REPO)
    print(f"{stage}: run '{cfg.name}' done; MLflow run {result.run_id}")
    print(f"MLFLOW_RUN_ID={result.run_id}")
    return 0

