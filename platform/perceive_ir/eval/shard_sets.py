"""Test sets from ``perceive-shards`` output: the samples of one split, whole images only (paired
samples for paired sets, clean-only samples for synthetic sets)."""

from __future__ import annotations

import json

from perceive_ir.data.manifest import read_manifest, shard_urls
from perceive_ir.data.pairing import image_name
from perceive_ir.data.storage import StorageError, is_unreachable
from perceive_ir.data.tar_members import member_index, read_member
from perceive_ir.eval.items import Item, MissingSetError

__all__ = ["clean_shard_members", "shard_items"]


def _image_member(members: dict, key: str, role: str) -> str | None:
    return next((n for n in members if n.startswith(f"{key}.{role}.")), None)


def _samples(location: str, split: str, set_name: str):
    """``(shard url, members, key, metadata)`` of every whole-image sample of ``split``."""
    try:
        manifest = read_manifest(location)
    except StorageError as err:
        if is_unreachable(err):  # a store that does not answer is not a missing set
            raise
        raise MissingSetError(location) from None
    for url in shard_urls(location, manifest):
        members = member_index(url)
        for name in members:
            if not name.endswith(".json"):
                continue
            meta = json.loads(read_member(url, name))
            if meta.get("split") != split:
                continue
            key = name[: -len(".json")]
            if meta.get("tile") is not None:
                raise ValueError(f"set '{set_name}': sample '{key}' of '{url}' is a tile; evaluation scores whole "
                                 "images: build test shards without tile_size")
            yield url, members, key, meta


def clean_shard_members(location: str, split: str, set_name: str) -> list[tuple[str, str, str]]:
    """``(image name, gt member, shard url)`` of the clean-only samples of ``split``, sorted by name.

    The name is the source file's relative path without its extension, as a folder of the same files
    names it, so the seeded degradations are the same from the folder and from its shards.
    """
    found = []
    for url, members, key, meta in _samples(location, split, set_name):
        clean = _image_member(members, key, "gt")
        if clean is None or _image_member(members, key, "lq") is not None:
            continue
        found.append((image_name(meta["source"].split("/", 2)[-1]), clean, url))
    return sorted(found)


def shard_items(s, location: str) -> list:
    """Items of set ``s`` (a :class:`~perceive_ir.eval.suite.SetConfig` with ``shards``)."""
    items = []
    for url, members, key, meta in _samples(location, s.split, s.name):
        clean, degraded = _image_member(members, key, "gt"), _image_member(members, key, "lq")
        if clean is None or degraded is None:
            continue  # a clean-only sample has nothing to restore
        items.append(Item(s.name, key.rsplit("/", 1)[-1], s.type or meta["type"], "", clean, degraded, url))
    if not items:
        raise ValueError(f"set '{s.name}': no paired '{s.split}' samples in '{location}'")
    items.sort(key=lambda i: i.image)
    return items[: s.limit]
