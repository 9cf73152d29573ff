"""Where pretrained weights come from: a local file always, a hub name when the network allows.

Every pretrained network (CLIP for the perceiver, DINOv2 for semantic guidance, VGG-16 for
the perceptual loss) is described by a hub name and an optional local file. Resolution:

1. a local file set in the configuration is used as is (it must exist); its sha256 is its
   identity;
2. otherwise the hub name is used if the file is already in the Hugging Face cache or the hub
   can be reached;
3. otherwise (``HF_HUB_OFFLINE=1`` or no network) :class:`MissingWeightsError` is raised at once,
   naming the file that is needed and the configuration key that points to it, instead of
   letting the hub client retry for a minute.

A local path may also be a folder as the hubs lay them out (e.g. Hugging Face's
``facebook/dinov2-base``): the first of the weight files the loader names is taken from it.

Local files are read without executing code: safetensors, ``torch.load(weights_only=True)``, or
a TorchScript archive's tensors read by :mod:`perceive_ir.weights.torchscript` (never
``torch.jit.load``). The format is told from the file's content, not its name.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import socket
from pathlib import Path
from typing import Iterable

import torch

__all__ = [
    "MissingWeightsError",
    "WeightFormatError",
    "WeightSource",
    "load_exact",
    "hub_offline",
    "resolve",
    "sha256_file",
    "read_state_dict",
    "hf_cached_file",
    "weight_identities",
]

_TRUE = {"1", "true", "yes", "on"}
HUB_HOST = "huggingface.co"


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights are needed but cannot be had (no local file, hub unreachable)."""


class WeightFormatError(ValueError):
    """A weight file exists but does not hold the network it was configured for."""


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """A resolved weight location: exactly one of ``path`` (local file) or ``hub`` (hub name)."""

    path: Path | None = None
    hub: str | None = None
    sha256: str | None = None

    @property
    def is_local(self) -> bool:
        return self.path is not None


@functools.lru_cache(maxsize=None)
def _hub_reachable(host: str, timeout_s: float) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def hub_offline(timeout_s: float = 2.0) -> bool:
    """True when ``HF_HUB_OFFLINE`` is set or the hub does not answer within ``timeout_s``."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    endpoint = os.environ.get("HF_ENDPOINT", "")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0] if endpoint else HUB_HOST
    return not _hub_reachable(host, timeout_s)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hf_cached_file(repo_id: str, filenames: Iterable[str]) -> str | None:
    """Path of the first of ``filenames`` of ``repo_id`` already in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with timm and open_clip
        return None
    for name in filenames:
        found = try_to_load_from_cache(repo_id, name)
        if isinstance(found, str):
            return found
    return None


def resolve(
    *,
    what: str,
    config_key: str,
    local_file: str | Path | None,
    hub_name: str | None,
    hub_repo: str | None = None,
    hub_files: Iterable[str] = (),
    folder_files: Iterable[str] = (),
) -> WeightSource:
    """Decide where the weights of ``what`` come from; fail fast when they cannot be had.

    ``hub_repo``/``hub_files`` name the files the hub name downloads, so that the error says which
    file to fetch and an already cached copy counts as available offline. ``folder_files`` are the
    weight files looked for, in order, when ``local_file`` is a folder.
    """
    if local_file:
        path = Path(local_file).expanduser()
        if path.is_dir():
            path = _weight_file_in(path, list(folder_files), what, config_key)
        if not path.is_file():
            raise MissingWeightsError(f"{what}: weight file '{path}' (from '{config_key}') does not exist")
        return WeightSource(path=path, sha256=sha256_file(path))
    if not hub_name:
        raise MissingWeightsError(f"{what}: no weights configured; set '{config_key}' to a local file")
    hub_files = list(hub_files)
    if hub_repo and hf_cached_file(hub_repo, hub_files):
        return WeightSource(hub=hub_name)
    if hub_offline():
        wanted = (
            " or ".join(f"'{f}' from hf://{hub_repo}" for f in hub_files) if hub_repo and hub_files else f"'{hub_name}'"
        )
        raise MissingWeightsError(
            f"{what}: pretrained weights '{hub_name}' are not available offline (HF_HUB_OFFLINE is set or "
            f"the hub is unreachable). Download {wanted} on a machine with network access and set "
            f"'{config_key}' to its local path."
        )
    return WeightSource(hub=hub_name)


def _weight_file_in(folder: Path, names: list[str], what: str, config_key: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    wanted = ", ".join(names) if names else "a weight file (this setting takes a file, not a folder)"
    raise MissingWeightsError(f"{what}: folder '{folder}' (from '{config_key}') holds none of: {wanted}")


def _file_kind(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (100 << 20):
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        from perceive_ir.weights.torchscript import is_torchscript_archive

        return "torchscript" if is_torchscript_archive(path) else "torch"
    return "torch"


def read_state_dict(path: str | Path, config_key: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, a torch file or a TorchScript archive, never executing code.

    Unwraps ``{"state_dict": ...}``/``{"model": ...}`` containers and a DDP ``module.`` prefix.
    Errors name ``config_key``, the setting that points to the file.
    """
    path = Path(path)
    origin = f"'{path}'" + (f" (from '{config_key}')" if config_key else "")
    kind = _file_kind(path)
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        elif kind == "torchscript":
            from perceive_ir.weights.torchscript import read_torchscript_state

            state = read_torchscript_state(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickled objects other than tensors are refused by weights_only
        raise WeightFormatError(
            f"{origin} is not a weight file (safetensors, a state dict loadable with "
            f"torch.load(weights_only=True), or a TorchScript archive): {err}"
        ) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightFormatError(f"{origin} does not hold a state dict of tensors")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_exact(
    module: torch.nn.Module, state: dict[str, torch.Tensor], *, what: str, path: str | Path, config_key: str, expected: str
) -> None:
    """``module.load_state_dict(state, strict=True)``, failing with what was expected and where it was set."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [
        f"{k} {tuple(state[k].shape)} instead of {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
        if keys
    ]
    if problems:
        raise WeightFormatError(
            f"{what}: '{path}' (from '{config_key}') does not hold {expected}; " + "; ".join(problems)
        )
    module.load_state_dict(state, strict=True)


def weight_identities(model: torch.nn.Module) -> dict[str, str]:
    """Submodule name -> sha256 of the local weight file it was loaded from (frozen DINOv2, VGG-16,
    the perceiver's CLIP): what a run was trained against. Modules with hub or random weights are left out."""
    found = {}
    for name, sub in model.named_modules():
        sha = getattr(sub, "weights_sha256", None) or getattr(getattr(sub, "identity", None), "weights_sha256", None)
        if isinstance(sha, str) and sha:
            found[name or "<model>"] = sha
    return found
