"""The parameters and buffers of a TorchScript archive, read without running any of its code.

A TorchScript ``.pt`` (e.g. OpenAI's released CLIP ``ViT-B-32.pt``) is a zip holding the module
tree pickled in ``<root>/data.pkl``, the raw tensor storages in ``<root>/data/<key>``, and the
module classes as TorchScript source in ``<root>/code/``. ``torch.jit.load`` compiles and runs
that source; this reader never does:

* ``data.pkl`` is unpickled by an unpickler that resolves only tensor rebuilding, storage types
  and ``OrderedDict``; every ``__torch__.*`` class becomes an inert record of its attributes, and
  any other global is refused;
* which attributes are parameters and buffers (and so belong to the state dict) is read from the
  ``__parameters__``/``__buffers__`` lists of the class sources, parsed with :mod:`ast` (parsing
  only, nothing is evaluated).
"""

from __future__ import annotations

import ast
import collections
import pickle
import zipfile
from pathlib import Path

import torch

__all__ = ["is_torchscript_archive", "read_torchscript_state"]


def is_torchscript_archive(path: str | Path) -> bool:
    """A zip with TorchScript's ``constants.pkl`` and ``code/`` (a ``torch.save`` zip has neither)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


class _ScriptObject:
    """An unpickled TorchScript object: its class name and attributes, no behaviour."""

    qualname = ""

    def __setstate__(self, state: dict) -> None:
        self.attributes = state


def _storage_dtype(storage_name: str) -> torch.dtype:
    from torch.storage import _get_dtype_from_pickle_storage_type

    return _get_dtype_from_pickle_storage_type(storage_name)


class _StorageType:
    def __init__(self, name: str) -> None:
        self.dtype = _storage_dtype(name)


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, requires_grad=False, *_hooks_and_meta):
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _as_list(value, *_type_tag):
    # torch.jit._pickle's list builders and type tags: the value itself is all a state dict needs
    return value


class _RestrictedUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch", "device"): torch.device,
        **{
            ("torch.jit._pickle", name): _as_list
            for name in ("build_intlist", "build_floatlist", "build_boollist", "build_tensorlist",
                         "build_doublelist", "restore_type_tag")
        },
    }

    def __init__(self, handle, archive: zipfile.ZipFile, root: str) -> None:
        super().__init__(handle)
        self._archive = archive
        self._root = root
        self._storages: dict[str, torch.Tensor] = {}
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._classes:
                self._classes[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
            return self._classes[qualname]
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        found = self._ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refusing '{module}.{name}': a weight archive needs only tensors")
        return found

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        if key not in self._storages:
            raw = bytearray(self._archive.read(f"{self._root}/data/{key}"))
            flat = torch.frombuffer(raw, dtype=storage_type.dtype) if raw else torch.empty(0, dtype=storage_type.dtype)
            self._storages[key] = flat[:numel]
        return self._storages[key]


def _state_members(archive: zipfile.ZipFile, root: str) -> dict[str, set[str]]:
    """Class qualname -> its parameter and buffer names, from the class sources under ``code/``."""
    members: dict[str, set[str]] = {}
    prefix = f"{root}/code/"
    for name in archive.namelist():
        if not (name.startswith(prefix) and name.endswith(".py")):
            continue
        module = name[len(prefix) : -len(".py")].replace("/", ".")
        tree = ast.parse(archive.read(name).decode("utf-8"))
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            names: set[str] = set()
            for statement in node.body:
                if (
                    isinstance(statement, ast.Assign)
                    and len(statement.targets) == 1
                    and isinstance(statement.targets[0], ast.Name)
                    and statement.targets[0].id in ("__parameters__", "__buffers__")
                    and isinstance(statement.value, (ast.List, ast.Tuple))
                ):
                    names.update(e.value for e in statement.value.elts if isinstance(e, ast.Constant))
            members[f"{module}.{node.name}"] = names
    return members


def _flatten(obj: _ScriptObject, members: dict[str, set[str]], prefix: str, out: dict[str, torch.Tensor]) -> None:
    declared = members.get(obj.qualname)
    for name, value in getattr(obj, "attributes", {}).items():
        if isinstance(value, _ScriptObject):
            _flatten(value, members, f"{prefix}{name}.", out)
        elif isinstance(value, torch.Tensor) and (declared is None or name in declared):
            out[f"{prefix}{name}"] = value.clone()


def read_torchscript_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict (parameters and buffers by dotted name) of a TorchScript archive, on the CPU.

    Tensor attributes that are neither parameters nor buffers (e.g. an attention mask kept as a
    plain attribute) are left out, as ``ScriptModule.state_dict()`` would; a class whose source
    is missing from the archive contributes all its tensor attributes.
    """
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"'{path}' is not a TorchScript archive (no single <root>/data.pkl)")
        root = pickles[0].split("/", 1)[0]
        byteorder = f"{root}/byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise ValueError(f"'{path}': big-endian TorchScript archives are not supported")
        members = _state_members(archive, root)
        with archive.open(pickles[0]) as handle:
            top = _RestrictedUnpickler(handle, archive, root).load()
    if not isinstance(top, _ScriptObject):
        raise ValueError(f"'{path}': the archive does not hold a scripted module")
    state: dict[str, torch.Tensor] = {}
    _flatten(top, members, "", state)
    return state
