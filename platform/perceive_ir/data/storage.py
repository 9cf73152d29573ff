"""Storage through fsspec: one code path for local paths, file://, s3://, gs:// and memory://.

Credentials never travel in configs: s3fs/gcsfs read them from the environment (or
instance roles). ``storage_options`` carries only non-secret settings such as an
``endpoint_url`` override for S3-compatible stores; without one, ``AWS_ENDPOINT_URL`` applies
(botocore's standard variable, which the command lines' ``--endpoint-url`` sets).
"""

from __future__ import annotations

import atexit
import os
import posixpath
from typing import Any, Mapping

import fsspec
from fsspec.core import url_to_fs

# Object stores create an object only when its upload completes, so a put is atomic there.
_ATOMIC_PUT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"}
_SECRET_WORDS = ("password", "secret", "token", "credential", "access_key", "secret_key", "api_key", "session")


ENDPOINT_VARIABLE = "AWS_ENDPOINT_URL"


class StorageError(OSError):
    """A storage URL cannot be read or written; the message names the URL."""


class StorageUnreachable(StorageError):
    """The store behind a URL does not answer (endpoint down, wrong host, no network)."""


def is_unreachable(err: BaseException) -> bool:
    """Whether an exception (or its cause) means the store did not answer, rather than refused."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, (StorageUnreachable, ConnectionError, TimeoutError)) and not isinstance(err, BrokenPipeError):
            return True
        name = type(err).__name__
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                    "ClientConnectorError", "ServerDisconnectedError"):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def storage_error(url: str, err: BaseException, doing: str = "open") -> StorageError:
    """One-line error naming ``url`` for any exception a store raised."""
    if isinstance(err, StorageError):
        return err
    cls = StorageUnreachable if is_unreachable(err) else StorageError
    endpoint = os.environ.get(ENDPOINT_VARIABLE)
    where = f" (endpoint {endpoint} from {ENDPOINT_VARIABLE})" if endpoint and cls is StorageUnreachable else ""
    return cls(f"cannot {doing} '{url}'{where}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")


def add_endpoint_argument(parser) -> None:
    """``--endpoint-url``: the same option in every job and ``perceive-shards`` subcommand."""
    parser.add_argument("--endpoint-url", metavar="URL",
                        help=f"S3 endpoint of every s3:// URL without its own endpoint_url (default: "
                             f"${ENDPOINT_VARIABLE}, else AWS)")


def set_default_endpoint(url: str | None) -> None:
    """``--endpoint-url``: the S3 endpoint for every URL without its own ``endpoint_url``, in this
    process and the processes it starts."""
    if url:
        os.environ[ENDPOINT_VARIABLE] = url


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
        raise storage_error(url, err) from err


def close_filesystems() -> None:
    """Close the cached async filesystems (s3fs, gcsfs) while fsspec's event loop still runs.

    Left to the garbage collector at interpreter exit, their HTTP sessions are closed from
    another event loop, which prints an asyncio traceback after an otherwise clean run."""
    from fsspec.asyn import AsyncFileSystem, sync

    for cls in _subclasses(AsyncFileSystem):
        for instance in list(getattr(cls, "_cache", {}).values()):
            creator, loop = getattr(instance, "_s3creator", None), getattr(instance, "_loop", None)
            if creator is not None and loop is not None and loop.is_running():
                try:  # what s3fs's own finalizer does, but while the loop can still run it
                    sync(loop, creator.__aexit__, None, None, None, timeout=5)
                except Exception:  # noqa: BLE001 - best effort at exit
                    pass
                instance._s3 = instance._s3creator = None
        if "_cache" in cls.__dict__:
            cls.clear_instance_cache()


def _subclasses(cls) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_subclasses(sub))
    return found


atexit.register(close_filesystems)


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


def missing_store(tracking_uri: str | None) -> str | None:
    """The SQLite file of ``tracking_uri`` when it does not exist: a lookup there would find nothing, and
    MLflow would leave an empty store behind. None for any other store."""
    if not tracking_uri or not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///"):]
    return None if os.path.isfile(path) else path
