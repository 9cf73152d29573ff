"""The lineage of a registered product version, as ``lineage.*`` tags.

Each version carries: the product, the training run, the sha256 of its weights, the perceiver it
scores with (``lineage.perceiver.*``: registered version, run, prompts sha256, CLIP identity), the
medium tier (``lineage.medium_tier.*``), the sha256 of the training shard manifests, the config
hash, the git commit and, when it came from one, the search run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Optional

from perceive_ir.data.manifest import manifest_url
from perceive_ir.data.storage import filesystem, redact
from perceive_ir.products.locations import registered_version, resolve_product
from perceive_ir.products.model_folders import folder_weights_sha256
from perceive_ir.tracking.mlflow_run import version_tags
from perceive_ir.weights import sha256_file

__all__ = ["LINEAGE", "PERCEIVER_KEYS", "perceiver_identity", "registered_from_run", "upstream_tags",
           "shard_manifest_tags", "config_hash", "product_lineage"]

LINEAGE = "lineage."
# what identifies the perceiver a version was trained against (or is)
PERCEIVER_KEYS = ("lineage.perceiver.prompts_sha256", "lineage.perceiver.clip")


def _clip_identity(perceiver_folder: Path) -> str:
    clip = json.loads((perceiver_folder / "perceiver.json").read_text())["clip"]
    keys = ("architecture", "pretrained", "weights_sha256", "activation")
    return json.dumps({k: clip.get(k) for k in keys}, sort_keys=True)


def perceiver_identity(tags: Mapping[str, str]) -> Optional[tuple[str, str]]:
    """The perceiver a version was trained against (or is): (prompts sha256, CLIP identity)."""
    values = tuple(tags.get(k) for k in PERCEIVER_KEYS)
    return values if all(values) else None  # type: ignore[return-value]


def registered_from_run(tracking_uri: str, run_id: str, product: str):
    """The newest version registered from ``run_id``'s ``product`` (None when there is none)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    found = [v for v in client.search_model_versions(f"run_id = '{run_id}'")
             if v.tags.get(f"{LINEAGE}product") == product]
    return max(found, key=lambda v: int(v.version)) if found else None


def _registered_for(location: str, product: str, tracking_uri: str):
    """The registered version behind a product location: itself for ``models:/``, else the version
    registered from the ``runs:/`` run (None for folders and unregistered runs)."""
    if location.startswith("models:/"):
        return registered_version(location, tracking_uri)
    if not location.startswith("runs:/"):
        return None
    return registered_from_run(tracking_uri, location[len("runs:/"):].split("/", 1)[0], product)


def upstream_tags(key: str, location: str, tracking_uri: str) -> dict[str, str]:
    """Lineage tags of an input product (``key`` = perceiver | medium_tier) given as ``location``."""
    tags = {f"{LINEAGE}{key}.location": location}
    version = _registered_for(location, key, tracking_uri)
    if version is not None:
        tags[f"{LINEAGE}{key}"] = f"models:/{version.name}/{version.version}"
        tags[f"{LINEAGE}{key}.run_id"] = version.run_id or ""
        own = {k: v for k, v in version.tags.items() if k.startswith(f"{LINEAGE}{key}.")}
        if f"{LINEAGE}weights_sha256" in version.tags:
            own[f"{LINEAGE}{key}.weights_sha256"] = version.tags[f"{LINEAGE}weights_sha256"]
        if own:
            return {**tags, **own, f"{LINEAGE}{key}.location": location}
    elif location.startswith("runs:/"):
        tags[f"{LINEAGE}{key}.run_id"] = location[len("runs:/"):].split("/", 1)[0]
    folder = resolve_product(location, key.replace("_", " "), key, tracking_uri)
    tags.update(_own_tags(key, folder))
    return tags


def _own_tags(kind: str, folder: Path) -> dict[str, str]:
    """What identifies a product folder: its weights, and a perceiver's prompts and CLIP."""
    tags = {f"{LINEAGE}{kind}.weights_sha256": folder_weights_sha256(folder)}
    if kind == "perceiver":
        tags[PERCEIVER_KEYS[0]] = sha256_file(folder / "prompts.safetensors")
        tags[PERCEIVER_KEYS[1]] = _clip_identity(folder)
    return tags


def shard_manifest_tags(sources: list[Any], storage_options: Mapping[str, Any]) -> dict[str, str]:
    """sha256 of each training source's manifest, and one over them all."""
    hashes = {}
    for source in sources:
        if "{" in source.location:  # a brace pattern of .tar URLs has no manifest
            hashes[source.name or source.location] = "none"
            continue
        fs, path = filesystem(manifest_url(source.location), storage_options)
        hashes[source.name or source.location] = hashlib.sha256(fs.cat_file(path)).hexdigest()
    combined = hashlib.sha256("".join(f"{k} {v}\n" for k, v in sorted(hashes.items())).encode()).hexdigest()
    tags = {f"{LINEAGE}shard_manifests_sha256": combined}
    listing = json.dumps(hashes, sort_keys=True)
    if len(listing) < 4000:
        tags[f"{LINEAGE}shard_manifests"] = listing
    return tags


def config_hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(redact(dict(config)), sort_keys=True, default=str).encode()).hexdigest()[:16]


def product_lineage(product: str, folder: Path, run_tags: Mapping[str, str], run_id: str, config: Mapping[str, Any],
                    shard_tags: Mapping[str, str], upstream: Mapping[str, str],
                    search_run: Optional[str] = None) -> dict[str, str]:
    """All lineage tags of one product version."""
    tags = {f"{LINEAGE}product": product, f"{LINEAGE}run_id": run_id,
            f"{LINEAGE}weights_sha256": folder_weights_sha256(folder),
            f"{LINEAGE}config_sha256": config_hash(config),
            f"{LINEAGE}git_commit": run_tags.get("git_commit") or version_tags()["git_commit"],
            **shard_tags, **upstream}
    if product == "perceiver":  # a perceiver's identity under the keys its restorers carry too
        tags.update({k: v for k, v in _own_tags(product, folder).items() if k in PERCEIVER_KEYS})
    if search_run:
        tags[f"{LINEAGE}search_run"] = search_run
    return tags
