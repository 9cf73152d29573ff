"""Ray Tune search over the stage-2 config: loss weights, L_dpl's difficulty tiers, any dotted key.

    python jobs/tune.py --config configs/tune_tiny.yaml stage2.perceiver=runs:/<stage-1 run id>/perceiver
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/tune.py --config configs/tune.yaml ...

Launched again with the same ``name``, a search continues: finished trials are kept, unfinished ones
resume from their last checkpoint. The record (results table, ``search_plot.png``) goes to the
search's MLflow run; the best trial's restorer is registered when ``register_as`` is set.
"""

import argparse
import copy
import logging
import sys

from _common import REPO  # puts platform/ on the path

from perceive_ir.config import ConfigError  # noqa: E402
from perceive_ir.search import plan_search  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/tune_tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key.path=value settings (YAML values), e.g. stage2.loop.max_steps=100")
    args = parser.parse_args(argv)
    try:
        plan = plan_search(args.config, args.overrides)  # every key and distribution checked before Ray starts
    except ConfigError as err:
        print(f"tune: configuration error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from perceive_ir.orchestration.preflight import PreflightError, preflight

    try:
        # On a copy: each trial rebuilds its config from the YAML files, inside the repository.
        preflight("stage2", copy.deepcopy(plan.base), working_dir=REPO, launch_dir=REPO, check_relaunch=False)
    except PreflightError as err:
        print(f"tune: pre-flight of the base stage-2 config: {err}", file=sys.stderr)
        return err.exit_code
    from perceive_ir.search.runner import run_search

    result = run_search(plan, REPO)
    for record in result.records:
        print(f"trial {record.trial_id}: {record.status}, objective {record.final}, values {record.values}")
    print(f"tune: search '{plan.cfg.name}' done; MLflow run {result.parent_run_id}")
    print(f"MLFLOW_RUN_ID={result.parent_run_id}")
    for product, uri in (result.registered or {}).items():
        name, version = uri[len("models:/"):].rsplit("/", 1)
        print(f"best {product}: {uri}")
        print(f"  offered for promotion, never promoted here: python jobs/evaluate.py --config <suite> model={uri}; "
              f"perceive-registry promote {name} {version} --suite <suite>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
