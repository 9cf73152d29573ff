"""What must hold after the steps: a promoted pair in the registry with its files in the artifacts bucket,
stage 2's checkpoints in the runs bucket, its workers on different nodes with a cache each, and the run
resumed after the lost node and finished at its last step."""

from __future__ import annotations

from rehearsal.faults import NodeLoss, product_cache_entries
from rehearsal.storage import count_objects

__all__ = ["check_run"]

ARTIFACTS_BUCKET, ARTIFACTS_PREFIX = "perceive-ir-artifacts", "mlflow/"


def _check(ok: bool, detail) -> dict:
    return {"ok": bool(ok), "detail": detail}


def _registry(client, s3) -> dict:
    checks = {}
    for model in ("perceive-ir-restorer", "perceive-ir-perceiver", "perceive-ir-medium-tier"):
        try:
            version = client.get_model_version_by_alias(model, "champion")
        except Exception as err:  # noqa: BLE001 - a missing alias is the failed check
            checks[f"{model}@champion"] = _check(False, str(err).splitlines()[0])
            continue
        key = ARTIFACTS_PREFIX + version.source.split(":/", 1)[-1].lstrip("/")
        files = count_objects(s3, ARTIFACTS_BUCKET, key)
        checks[f"{model}@champion"] = _check(files > 0, f"v{version.version}, {files} files at s3://{ARTIFACTS_BUCKET}/{key}")
    return checks


def _stage2_run(client, job_name: str) -> dict:
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"attributes.run_name = '{job_name}'")
    if not runs:
        return {"stage-2 run resumed and finished": _check(False, f"no MLflow run named {job_name}")}
    run = runs[0]
    resumed = [m.value for m in client.get_metric_history(run.info.run_id, "resumed_from_step")]
    max_steps = int(run.data.params.get("loop.max_steps", -1))
    last = max((m.step for key in run.data.metrics for m in client.get_metric_history(run.info.run_id, key)),
               default=-1)
    detail = {"status": run.info.status, "resumed_from_step": resumed, "last_logged_step": last, "max_steps": max_steps}
    sizes = [int(m.value) for m in sorted(client.get_metric_history(run.info.run_id, "train/world_size"),
                                          key=lambda m: (m.step, m.timestamp))]
    changes = [size for i, size in enumerate(sizes) if i == 0 or size != sizes[i - 1]]
    return {"stage-2 run resumed and finished": _check(run.info.status == "FINISHED" and any(v > 0 for v in resumed)
                                                        and last == max_steps, detail),
            "stage-2 shrank at the node loss and grew back": _check(changes[:3] == [2, 1, 2], {"world_sizes": sizes})}


def check_run(cluster, s3, mlflow_uri: str, stage2_job: str, runs_bucket: str, loss: NodeLoss) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    checks = _registry(client, s3)
    checkpoints = count_objects(s3, runs_bucket, f"ray/{stage2_job}", "checkpoint_")
    checks["stage-2 checkpoints in the runs bucket"] = _check(checkpoints > 0, f"{checkpoints} files")
    nodes = sorted(set(loss.placement.values()))
    checks["stage-2 workers on different nodes"] = _check(len(nodes) >= 2, loss.placement)
    checks["a worker node lost and replaced"] = _check(bool(loss.lost and loss.replacement),
                                                       {"lost": loss.lost, "replacement": loss.replacement,
                                                        "seconds": round(loss.seconds_to_replace, 1)})
    caches = {f"{pod.name} ({pod.folder.name})": product_cache_entries(pod)
              for pod in cluster.nodes if pod.name in nodes}
    same = len({tuple(entries) for entries in caches.values()}) == 1
    checks["stage-1 products fetched once into each node's own cache"] = _check(
        all(len(e) >= 2 for e in caches.values()) and same, caches)
    checks.update(_stage2_run(client, stage2_job))
    return checks
