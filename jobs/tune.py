"""Ray Tune search over the stage-2 config: loss weights, L_dpl's difficulty tiers, any dotted key.

    python jobs/tune.py --config configs/tune_tiny.yaml stage2.perceiver=runs:/<stage-1 run id>/perceiver
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/tune.py --config configs/tune.yaml ...

Launched again with the same ``name``, a search continues: finished trials are kept, unfinished ones
resume from their last checkpoint. The record (results table, ``search_plot.png``) goes to the
search's MLflow run; the best trial's restorer is registered when ``register_as`` is set.

Relative paths of the base config and of the ``stage2`` overrides resolve against the folder the search
is launched from, as a stage job's do; the pre-flight checks a trial config at every extreme value of
the space. Exit codes: 0 done (with the best trial registered, when ``register_as`` is set); 1 no trial
completed (each distinct trial error is printed, the search's MLflow run ends FAILED), the best was
not registered, or a store did not answer; 2 the configuration or an input is wrong.
"""

import argparse
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
    from perceive_ir.orchestration.preflight import PreflightError
    from perceive_ir.search.preflight import preflight_search

    try:  # relative paths resolve against the launch folder, as a stage job's do
        preflight_search(plan, working_dir=REPO)
    except PreflightError as err:
        print(f"tune: pre-flight of the base stage-2 config: {err}", file=sys.stderr)
        return err.exit_code
    from perceive_ir.search.runner import run_search

    result = run_search(plan, REPO)
    return report(plan, result)


def report(plan, result) -> int:
    """Print what the search did and return the job's exit code."""
    for record in result.records:
        print(f"trial {record.trial_id}: {record.status}, objective {record.final}, values {record.values}")
    outcome = result.outcome
    if outcome.completed == 0:
        print(f"tune: search '{plan.cfg.name}' failed: no trial completed ({outcome.errored} errored); "
              f"MLflow run {result.parent_run_id} ended FAILED", file=sys.stderr)
        for line in outcome.error_lines():
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"tune: search '{plan.cfg.name}' done: {outcome.completed} trials completed, {outcome.errored} errored; "
          f"MLflow run {result.parent_run_id}")
    for line in outcome.error_lines():
        print(f"  {line}")
    print(f"MLFLOW_RUN_ID={result.parent_run_id}")
    if plan.cfg.register_as and not result.registered:
        print(f"tune: the best trial was not registered as '{plan.cfg.register_as}-restorer' (no completed trial "
              "with a finite objective)", file=sys.stderr)
        return 1
    for product, uri in (result.registered or {}).items():
        name, version = uri[len("models:/"):].rsplit("/", 1)
        print(f"best {product}: {uri}")
        print(f"  offered for promotion, never promoted here: python jobs/evaluate.py --config <suite> model={uri}; "
              f"perceive-registry promote {name} {version} --suite <suite>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
