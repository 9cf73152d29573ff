"""Storage through fsspec: one code path for local paths, file://, s3://, gs:// and memory://.

Credentials never travel in configs: s3fs/gcsfs read them from the environment (or
instance roles). ``storage_options`` carries only non-secret settings such as an
``endpoint_url`` override for S3-compatible stores.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any, Mapping

import fsspec
from fsspec.core import url_to_fs

# Object stores create an object only when its upload completes, so a put is atomic there.
_ATOMIC_PUT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"}
_SECRET_WORDS = ("password", "secret", "token", "credential", "access_key", "secret_key", "api_key", "session")


class StorageError(OSError):
    """A storage URL cannot be read or written; the message names the URL."""


def normalize_options(storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Accept ``endpoint_url`` at the top level as a shorthand for s3fs's client_kwargs."""
    options = dict(storage_options or {})
    endpoint = options.pop("endpoint_url", None)
    if endpoint:
        client_kwargs = dict(options.get("client_kwargs", {}))
        client_kwargs.setdefault("endpoint_url", endpoint)
        options["client_kwargs"] = client_kwargs
    return options


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None):
    """Return ``(fs, path)`` for any fsspec URL or local path."""
    try:
        return url_to_fs(url, **normalize_options(storage_options))
    except (ImportError, ValueError) as err:
        raise StorageError(f"cannot open storage for '{url}': {err}") from err


def is_local(fs) -> bool:
    return "file" in _protocols(fs)


def _protocols(fs) -> set[str]:
    proto = fs.protocol
    return set(proto) if isinstance(proto, (tuple, list)) else {proto}


def join(url: str, *names: str) -> str:
    """Join path components onto a URL or local path."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *names)
    return os.path.join(url, *names)


def parent(url: str) -> str:
    """The folder that holds ``url``."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://" + posixpath.dirname(rest)
    return os.path.dirname(url) or "."


def unstrip(fs, path: str) -> str:
    """Turn an fs-relative path (as ``fs.find`` returns) back into a full URL."""
    if is_local(fs):
        return path
    return fs.unstrip_protocol(path)


def put_atomic(fs, local_file: str, path: str) -> None:
    """Publish a finished local file at ``path`` so that it never appears half written."""
    if is_local(fs):
        fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
        partial = path + ".partial"
        fs.put_file(local_file, partial)
        os.replace(partial, path)
    elif _protocols(fs) & _ATOMIC_PUT_PROTOCOLS:
        fs.put_file(local_file, path)
    else:
        partial = path + ".partial"
        fs.put_file(local_file, partial)
        fs.mv(partial, path)


def write_bytes_atomic(fs, path: str, data: bytes) -> None:
    """Write small files (manifests, state) atomically, like :func:`put_atomic`."""
    if is_local(fs):
        fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
        partial = path + ".partial"
        with open(partial, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    elif _protocols(fs) & _ATOMIC_PUT_PROTOCOLS:
        fs.pipe_file(path, data)
    else:
        fs.pipe_file(path + ".partial", data)
        fs.mv(path + ".partial", path)


def is_secret_name(name: str) -> bool:
    """Whether a setting's (last dotted) name looks like it holds a credential."""
    leaf = name.rsplit(".", 1)[-1].lower()
    return leaf in ("key", "aws_access_key_id") or any(word in leaf for word in _SECRET_WORDS)


def redact(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Storage options without anything that looks like a credential (for logs and manifests)."""
    clean: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if is_secret_name(str(k)):
            continue
        clean[k] = redact(v) if isinstance(v, Mapping) else v
    return clean


def open_url(url: str, mode: str = "rb", storage_options: Mapping[str, Any] | None = None):
    """Open a URL for streaming, with an error that names it."""
    try:
        return fsspec.open(url, mode, **normalize_options(storage_options)).open()
    except FileNotFoundError:
        raise StorageError(f"'{url}' does not exist") from None
    except Exception as err:  # s3fs/gcsfs raise many kinds for an unreachable bucket
        raise StorageError(f"cannot open '{url}': {type(err).__name__}: {err}") from err


def register_webdataset_opener(storage_options: Mapping[str, Any] | None = None,
                               schemes: tuple[str, ...] = ("s3", "gs", "gcs", "memory")) -> None:
    """Let plain WebDataset pipelines (``wds.WebDataset("s3://...")``) open these URL schemes
    through fsspec, with the given (non-secret) storage options.

    webdataset has no fsspec opener of its own. The registration is per process: DataLoader
    workers started by fork inherit it; with spawn, call this again in ``worker_init_fn``.
    """
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # the module; the package exports a function of that name
    options = normalize_options(storage_options)

    def open_with_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any):
        return open_url(url, mode, options)

    for scheme in schemes:
        gopen.gopen_schemes[scheme] = open_with_fsspec
