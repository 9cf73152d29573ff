"""Paired test sets from ``perceive-shards`` output: the samples of one split, whole images only."""

from __future__ import annotations

import json

from perceive_ir.data.manifest import read_manifest, shard_urls
from perceive_ir.data.storage import StorageError, is_unreachable
from perceive_ir.data.tar_members import member_index, read_member
from perceive_ir.eval.items import Item, MissingSetError

__all__ = ["shard_items"]


def _image_member(members: dict, key: str, role: str) -> str | None:
    return next((n for n in members if n.startswith(f"{key}.{role}.")), None)


def shard_items(s, location: str) -> list:
    """Items of set ``s`` (a :class:`~perceive_ir.eval.suite.SetConfig` with ``shards``)."""
    try:
        manifest = read_manifest(location)
    except StorageError as err:
        if is_unreachable(err):  # a store that does not answer is not a missing set
            raise
        raise MissingSetError(location) from None
    items = []
    for url in shard_urls(location, manifest):
        members = member_index(url)
        for name in members:
            if not name.endswith(".json"):
                continue
            meta = json.loads(read_member(url, name))
            if meta.get("split") != s.split:
                continue
            key = name[: -len(".json")]
            if meta.get("tile") is not None:
                raise ValueError(f"set '{s.name}': sample '{key}' of '{url}' is a tile; evaluation scores whole "
                                 "images: build test shards without tile_size")
            clean, degraded = _image_member(members, key, "gt"), _image_member(members, key, "lq")
            if clean is None or degraded is None:
                continue  # a clean-only sample has nothing to restore
            items.append(Item(s.name, key.rsplit("/", 1)[-1], s.type or meta["type"], "", clean, degraded, url))
    if not items:
        raise ValueError(f"set '{s.name}': no paired '{s.split}' samples in '{location}'")
    items.sort(key=lambda i: i.image)
    return items[: s.limit]
