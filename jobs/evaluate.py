"""Score a restorer on an evaluation suite: full test images, on Ray, tracked in MLflow.

    python jobs/evaluate.py --config configs/eval/quickstart.yaml model=runs:/<run id>/restorer
    python jobs/evaluate.py --config configs/eval/paper.yaml model=models:/perceive-ir-restorer@best

``model`` is a run's restorer (``runs:/<id>/restorer``), a registered version or alias
(``models:/<name>/<n>``, ``models:/<name>@<alias>``) or a local restorer folder. Prints the table
per set x type x level (input and output PSNR/SSIM) and where the reports are; they are also
logged to an MLflow evaluation run, and a registered version gets the headline metrics as tags.
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
from perceive_ir.eval.items import MissingSetError  # noqa: E402
from perceive_ir.workflows.evaluation import EvalConfig, format_result, run_evaluation  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="evaluation suite, e.g. configs/eval/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="key.path=value settings (YAML values), model=<uri> first of all")
    add_endpoint_argument(parser)
    args = parser.parse_args(argv)
    set_default_endpoint(args.endpoint_url)
    try:
        cfg = load_config(EvalConfig, args.config, args.overrides)
    except ConfigError as err:
        print(f"evaluate: configuration error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        result = run_evaluation(cfg, working_dir=REPO)
    except (MissingSetError, ValueError, FileNotFoundError) as err:
        print(f"evaluate: {err}", file=sys.stderr)
        return 2
    except ConnectionError as err:  # exit 1: the tracking store did not answer
        print(f"evaluate: {err}", file=sys.stderr)
        return 1
    except StorageError as err:  # exit 1: the store did not answer
        print(f"evaluate: {err}", file=sys.stderr)
        return 1 if is_unreachable(err) else 2
    print(format_result(result))
    print(f"MLFLOW_RUN_ID={result.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
