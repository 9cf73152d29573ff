"""Promotion of a restorer version to ``@champion`` of its registered model, behind three gates.

    promote("perceive-ir-restorer", "4", "configs/eval/paper.yaml", tracking_uri=uri)

The candidate is evaluated on the suite (an evaluation of the same suite hash already on the
version is reused), then ``@champion`` moves to it only when

(a) the champion has an evaluation on the same suite (same hash),
(b) the candidate beats the champion's ``metric`` by more than ``margin``, and
(c) the candidate's perceiver (prompts sha256 + CLIP identity) is the pair's perceiver: the
    champion's, or, while the restorer has no champion, the version at ``<base>-perceiver@champion``.

(c) and (a) are checked before any scoring. Without a champion, (a) and (b) hold vacuously; (c) then needs the candidate's perceiver lineage,
and the perceiver champion's when there is one. Otherwise ``PromotionRefused`` names the reason and
no alias changes. On success the old champion becomes ``@previous``, and the candidate's perceiver
and medium-tier versions (when registered) become ``@champion`` of their models: the pair moves
together, so that stage 2 can take ``perceiver=models:/<base>-perceiver@champion``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from perceive_ir.registry.lineage import LINEAGE, perceiver_identity

log = logging.getLogger(__name__)

__all__ = ["Gates", "PromotionRefused", "Promotion", "promote", "evaluation_of", "CHAMPION", "PREVIOUS"]

CHAMPION, PREVIOUS = "champion", "previous"
RESTORER_SUFFIX = "-restorer"


class PromotionRefused(RuntimeError):
    """A gate did not hold: the message names it; the aliases are unchanged."""


@dataclass
class Gates:
    metric: str = "psnr_out"  # a headline metric of the evaluation (eval.<suite>.<metric> tags)
    margin: float = 0.0  # the candidate must exceed the champion by more than this
    higher_is_better: bool = True


@dataclass
class Promotion:
    name: str
    version: str
    suite: str
    suite_hash: str
    candidate_score: float
    champion: Optional[str] = None  # the version that became @previous
    champion_score: Optional[float] = None
    evaluated: bool = False  # False: an existing evaluation was reused
    moved: dict[str, str] = field(default_factory=dict)  # model name -> version now @champion


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _by_alias(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def evaluation_of(tags: dict[str, str], suite: str, digest: str, metric: str) -> Optional[float]:
    """The version's ``metric`` on ``suite`` when its evaluation has the suite hash ``digest``."""
    if tags.get(f"eval.{suite}.suite_hash") != digest or f"eval.{suite}.{metric}" not in tags:
        return None
    return float(tags[f"eval.{suite}.{metric}"])


def _suite(suite_file: str | Path, overrides: Sequence[str], model: str, tracking_uri: str):
    """The evaluation config of ``model`` on the suite, and the suite's hash (without scoring)."""
    from perceive_ir.config import load_config
    from perceive_ir.workflows.evaluation import EvalConfig
    from perceive_ir.eval.suite import resolve_suite, suite_hash

    cfg = load_config(EvalConfig, suite_file, [*overrides, f"model={model}", f"tracking.uri={tracking_uri}"])
    used, items, _ = resolve_suite(cfg)
    return cfg, suite_hash(cfg, used, items, cfg.metrics.y_channel)


def _check_perceiver(client, name: str, candidate, champion) -> None:
    """Gate (c): the candidate's perceiver is the pair's."""
    mine = perceiver_identity(candidate.tags)
    if mine is None:
        raise PromotionRefused(f"{name} v{candidate.version} has no perceiver lineage "
                               f"({', '.join(k for k in ('lineage.perceiver.prompts_sha256', 'lineage.perceiver.clip'))} "
                               "tags): it cannot be paired")
    if champion is not None:
        reference, source = perceiver_identity(champion.tags), f"the champion v{champion.version}'s perceiver"
    else:
        base = name[: -len(RESTORER_SUFFIX)]
        pair = _by_alias(client, f"{base}-perceiver", CHAMPION)
        reference = perceiver_identity(pair.tags) if pair is not None else None
        source = f"{base}-perceiver@{CHAMPION} (v{pair.version})" if pair is not None else ""
    if reference is not None and reference != mine:
        what = "prompts" if reference[0] != mine[0] else "CLIP"
        raise PromotionRefused(
            f"{name} v{candidate.version} was trained against another perceiver than {source} ({what} differ: "
            f"{candidate.tags.get(f'{LINEAGE}perceiver', mine[0][:12])} vs {reference[0][:12]})")


def _beats(candidate: float, champion: float, gates: Gates) -> bool:
    gain = candidate - champion if gates.higher_is_better else champion - candidate
    return gain > gates.margin


def _move_pair_aliases(client, candidate) -> dict[str, str]:
    """@champion onto the candidate's registered perceiver and medium tier; their old champions @previous."""
    moved = {}
    for key in ("perceiver", "medium_tier"):
        uri = candidate.tags.get(f"{LINEAGE}{key}", "")
        if not uri.startswith("models:/") or "/" not in uri[len("models:/"):]:
            continue
        name, version = uri[len("models:/"):].rsplit("/", 1)
        _set_champion(client, name, version)
        moved[name] = version
    return moved


def _set_champion(client, name: str, version: str) -> Optional[str]:
    old = _by_alias(client, name, CHAMPION)
    if old is not None and str(old.version) != str(version):
        client.set_registered_model_alias(name, PREVIOUS, old.version)
    client.set_registered_model_alias(name, CHAMPION, version)
    return str(old.version) if old is not None and str(old.version) != str(version) else None


def promote(name: str, version: str, suite_file: str | Path, tracking_uri: str, gates: Gates | None = None,
            overrides: Sequence[str] = (), evaluate: bool = True, working_dir: Optional[Path] = None) -> Promotion:
    """Evaluate (or reuse an evaluation of) ``name`` v``version`` on the suite and move ``@champion``
    to it when the gates hold; raises ``PromotionRefused`` (aliases unchanged) otherwise.
    ``evaluate=False`` only reuses an existing evaluation."""
    gates = gates or Gates()
    client = _client(tracking_uri)
    if not name.endswith(RESTORER_SUFFIX):
        raise PromotionRefused(f"'{name}' is not a restorer model (<base>{RESTORER_SUFFIX}): "
                               "perceivers and medium tiers move with the restorer they are paired with")
    candidate = client.get_model_version(name, str(version))
    champion = _by_alias(client, name, CHAMPION)
    if champion is not None and str(champion.version) == str(candidate.version):
        raise PromotionRefused(f"{name} v{version} is already @{CHAMPION}")
    _check_perceiver(client, name, candidate, champion)

    cfg, digest = _suite(suite_file, overrides, f"models:/{name}/{version}", tracking_uri)
    best = None
    if champion is not None:  # gate (a) before any scoring
        best = evaluation_of(champion.tags, cfg.name, digest, gates.metric)
        if best is None:
            raise PromotionRefused(
                f"the champion {name} v{champion.version} has no evaluation on suite '{cfg.name}' (hash {digest}): "
                f"evaluate it first (jobs/evaluate.py --config {suite_file} model=models:/{name}@{CHAMPION})")
    score = evaluation_of(candidate.tags, cfg.name, digest, gates.metric)
    evaluated = False
    if score is None and evaluate:
        from perceive_ir.workflows.evaluation import run_evaluation

        log.info("evaluating %s v%s on suite '%s' (%s)", name, version, cfg.name, digest)
        run_evaluation(cfg, working_dir=working_dir)  # tags the version with eval.<suite>.*
        evaluated = True
        score = evaluation_of(client.get_model_version(name, str(version)).tags, cfg.name, digest, gates.metric)
    if score is None:
        raise PromotionRefused(f"{name} v{version} has no evaluation on suite '{cfg.name}' (hash {digest}) "
                               f"with metric '{gates.metric}'")

    result = Promotion(name, str(version), cfg.name, digest, score, evaluated=evaluated)
    if best is not None:
        if not _beats(score, best, gates):
            raise PromotionRefused(
                f"{name} v{version} does not beat the champion v{champion.version} on {cfg.name}/{gates.metric} by "
                f"more than {gates.margin}: {score:.4f} vs {best:.4f}")
        result.champion, result.champion_score = str(champion.version), best
    _set_champion(client, name, str(version))
    result.moved = {name: str(version), **_move_pair_aliases(client, candidate)}
    over = f" over v{result.champion} {best:.4f}" if best is not None else " (first champion)"
    client.set_model_version_tag(name, str(version), "promotion", f"{cfg.name}/{gates.metric} {score:.4f}{over}")
    return result
