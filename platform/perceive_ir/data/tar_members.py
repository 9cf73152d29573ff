"""Random access to the members of a tar shard: the header index once, then one read per member."""

from __future__ import annotations

import tarfile
from functools import lru_cache

from perceive_ir.data.storage import open_url

__all__ = ["member_index", "read_member"]


@lru_cache(maxsize=8)
def member_index(url: str) -> dict[str, tuple[int, int]]:
    """``{member name: (data offset, size)}`` of a tar shard (headers only are read)."""
    with open_url(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}


def read_member(url: str, name: str) -> bytes:
    offset, size = member_index(url)[name]
    with open_url(url, "rb") as f:
        f.seek(offset)
        return f.read(size)
