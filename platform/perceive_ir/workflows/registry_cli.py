"""``perceive-registry``: the registered perceiver/restorer pairs.

    perceive-registry list
    perceive-registry show perceive-ir-restorer 3
    perceive-registry promote perceive-ir-restorer 3 --suite configs/eval/paper.yaml [--metric psnr_out --margin 0.05]
    perceive-registry promote perceive-ir-restorer @candidate --suite configs/eval/paper.yaml

A version is a number or an alias: every job registers its products with ``@candidate``
(``tracking.register_alias``), so a deployment's steps name versions without knowing their numbers.

Tracking URI: ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///runs/mlflow.db`` (the
default store of every job, in the folder they are launched from).
``promote`` exits with 1 and the reason when a gate refuses (see ``perceive_ir.workflows.promotion``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from perceive_ir.registry.lineage import LINEAGE
from perceive_ir.workflows.promotion import RESTORER_SUFFIX, Gates, PromotionRefused, promote

HEADLINE = ("psnr_out", "ssim_out")


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _evaluations(tags: dict[str, str]) -> dict[str, dict[str, str]]:
    """suite -> {metric: value} from the version's ``eval.<suite>.<metric>`` tags."""
    found: dict[str, dict[str, str]] = {}
    for key, value in tags.items():
        if key.startswith("eval.") and key.count(".") >= 2:
            suite, metric = key[len("eval."):].rsplit(".", 1)
            found.setdefault(suite, {})[metric] = value
    return found


def _perceiver(tags: dict[str, str]) -> str:
    return tags.get(f"{LINEAGE}perceiver") or (tags.get(f"{LINEAGE}perceiver.prompts_sha256", "")[:12] or "-")


def _restorer_versions(client) -> list:
    models = [m.name for m in client.search_registered_models() if m.name.endswith(RESTORER_SUFFIX)]
    versions = [v for name in models for v in client.search_model_versions(f"name = '{name}'")]
    return sorted(versions, key=lambda v: (v.name, int(v.version)))


def list_versions(uri: str) -> str:
    """One line per restorer version: aliases, perceiver, headline metrics per suite."""
    client = _client(uri)
    lines = [f"{'model':<28} {'version':>7}  {'aliases':<18} {'perceiver':<30} evaluations"]
    for v in _restorer_versions(client):
        aliases = ",".join(f"@{a}" for a in client.get_model_version(v.name, v.version).aliases) or "-"
        evals = "; ".join(f"{suite}: " + " ".join(f"{m} {values[m]}" for m in HEADLINE if m in values)
                          for suite, values in sorted(_evaluations(v.tags).items())) or "not evaluated"
        lines.append(f"{v.name:<28} {v.version:>7}  {aliases:<18} {_perceiver(v.tags):<30} {evals}")
    if len(lines) == 1:
        lines.append("(no restorer versions registered)")
    return "\n".join(lines)


def show_version(uri: str, name: str, version: str) -> str:
    """A version's source, aliases, lineage and evaluations."""
    v = _client(uri).get_model_version(name, version)
    lines = [f"{name} v{version}", f"  aliases:  {', '.join('@' + a for a in v.aliases) or '-'}",
             f"  run:      {v.run_id}", f"  source:   {v.source}", "  lineage:"]
    for key in sorted(k for k in v.tags if k.startswith(LINEAGE)):
        value = v.tags[key]
        if key.endswith(".clip") or key.endswith("shard_manifests"):
            value = ", ".join(f"{k}={val}" for k, val in json.loads(value).items())
        lines.append(f"    {key[len(LINEAGE):]:<34} {value}")
    lines.append("  evaluations:")
    for suite, values in sorted(_evaluations(v.tags).items()):
        lines.append(f"    {suite}: " + ", ".join(f"{k} {val}" for k, val in sorted(values.items())))
    if "promotion" in v.tags:
        lines.append(f"  promotion: {v.tags['promotion']}")
    return "\n".join(lines)


def _version_number(uri: str, name: str, version: str) -> str:
    """``version`` as a number: ``@alias`` is looked up in the registry (a missing alias raises, naming it)."""
    if not version.startswith("@"):
        return version
    from perceive_ir.products.locations import registered_version

    return str(registered_version(f"models:/{name}{version}", uri).version)


def main(argv: Optional[list[str]] = None) -> int:
    from mlflow.exceptions import MlflowException

    from perceive_ir.data.storage import missing_store
    from perceive_ir.tracking import TrackingConfig, resolve_tracking_uri
    from perceive_ir.tracking.mlflow_run import describe_store, tracking_source

    parser = argparse.ArgumentParser(prog="perceive-registry", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", help="MLflow tracking and registry URI")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="restorer versions with their perceiver, evaluations and aliases")
    show = commands.add_parser("show", help="a version's lineage and evaluations")
    promote_cmd = commands.add_parser("promote", help="evaluate a version and move @champion when the gates hold")
    for sub in (show, promote_cmd):
        sub.add_argument("name")
        sub.add_argument("version", help="a version number or @alias (e.g. @candidate)")
    promote_cmd.add_argument("--suite", required=True, help="evaluation suite YAML, e.g. configs/eval/paper.yaml")
    promote_cmd.add_argument("--metric", default=Gates.metric, help="headline metric the gate compares (psnr_out)")
    promote_cmd.add_argument("--margin", type=float, default=Gates.margin, help="required gain over the champion")
    promote_cmd.add_argument("--lower-is-better", action="store_true", help="for error metrics")
    promote_cmd.add_argument("--no-evaluate", action="store_true", help="only reuse an existing evaluation")
    promote_cmd.add_argument("overrides", nargs="*", help="key=value settings of the suite (e.g. ray.num_workers=4)")
    # key=value settings may also follow the options (promote NAME VERSION --suite FILE key=value ...)
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if "=" not in e or e.startswith("-") or args.command != "promote"]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides += extra
    uri = resolve_tracking_uri(TrackingConfig(uri=args.tracking_uri))
    where = describe_store(uri, "--tracking-uri" if args.tracking_uri else tracking_source(TrackingConfig()))
    if missing_store(uri):  # MLflow would create an empty store to look in
        print(f"perceive-registry: no registered models: {where}", file=sys.stderr)
        return 2
    try:
        if args.command == "list":
            print(list_versions(uri))
        elif args.command == "show":
            print(show_version(uri, args.name, _version_number(uri, args.name, args.version)))
        else:
            gates = Gates(args.metric, args.margin, not args.lower_is_better)
            version = _version_number(uri, args.name, args.version)
            done = promote(args.name, version, args.suite, uri, gates, args.overrides, not args.no_evaluate)
            over = f" over v{done.champion} ({done.champion_score:.4f})" if done.champion else " (first champion)"
            print(f"promoted {done.name} v{done.version} to @champion: {done.suite}/{gates.metric} "
                  f"{done.candidate_score:.4f}{over}; {'evaluated' if done.evaluated else 'evaluation reused'}")
            print("@champion now: " + ", ".join(f"{n} v{v}" for n, v in done.moved.items()))
    except PromotionRefused as err:
        print(f"perceive-registry: promotion refused: {err}", file=sys.stderr)
        return 1
    except (MlflowException, FileNotFoundError, ValueError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"perceive-registry: {message} (looked in {where})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
