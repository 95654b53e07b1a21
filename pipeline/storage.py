"""URLs + `StorageOptions` -> filesystems, shard listings and small reads/writes.

Two clients, each where it is strongest:
- fsspec (s3fs, local, gcsfs if installed, any other fsspec protocol) for listing, globbing, image
  reads and small files (`_SUCCESS`, `_summary.json`, shard markers);
- pyarrow (`pyarrow_filesystem`) for Parquet I/O and for handing to Ray Data: native S3/local, or the
  fsspec filesystem wrapped when an option has no native equivalent (profile, extra, gs://, ...).

URL forms: `s3://bucket/key`, `gs://bucket/key`, `file:///abs/path`, plain (relative or absolute)
paths, and globs (`*`, `?`, `[`) in the path part. Local paths are returned absolute; object-store
URLs keep their scheme. Listings are sorted, so shard order is deterministic.

Credentials come from the environment variables NAMED in `StorageOptions` (or the SDK's default
chain); they are read when a filesystem is built and never logged. Messages show URLs through
`redact_url`. Workers that build filesystems (the image stage reading s3:// images) need the same
variables in their environment (Ray `runtime_env={"env_vars": ...}` on a remote cluster).
"""
from __future__ import annotations

import os
import posixpath
from typing import Any, Optional

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from schemas.job import StorageOptions, redact_url

_GLOB_CHARS = "*?["
_SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs"}


class StorageError(RuntimeError):
    """A storage location cannot be used as configured (missing credentials variable, no driver)."""


class TooLargeError(ValueError):
    """An object exceeds the size cap it was read with."""


# ---------------------------------------------------------------------------------------------------
# URLs


def split_url(url: str) -> tuple[str, str]:
    """'s3://b/k' -> ('s3', 'b/k'); 'file:///x' and plain paths -> ('file', absolute path)."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        scheme = _SCHEME_ALIASES.get(scheme.lower(), scheme.lower())
        if scheme != "file":
            return scheme, rest.rstrip("/")
        url = rest
    path = os.path.abspath(os.path.expanduser(url))
    return "file", path


def to_url(scheme: str, path: str) -> str:
    """Inverse of `split_url`: local paths stay plain absolute paths."""
    return path if scheme == "file" else f"{scheme}://{path}"


def normalize_url(url: str) -> str:
    """Canonical spelling (absolute local path, lower-case scheme, no trailing slash)."""
    return to_url(*split_url(url))


def join_url(base: str, *names: str) -> str:
    """Append path components to a URL or path."""
    return "/".join([normalize_url(base).rstrip("/")] + [n.strip("/") for n in names])


def has_glob(url: str) -> bool:
    return any(c in split_url(url)[1] for c in _GLOB_CHARS)


def glob_root(url: str) -> str:
    """The directory part of a glob before its first wildcard: 's3://b/in/*/x.parquet' -> 's3://b/in'."""
    scheme, path = split_url(url)
    cut = min((path.index(c) for c in _GLOB_CHARS if c in path), default=len(path))
    return to_url(scheme, posixpath.dirname(path[:cut]) if cut < len(path) else path)


# ---------------------------------------------------------------------------------------------------
# Filesystems


def _env(name: str, field: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise StorageError(f"environment variable {name} (storage.{field}) is not set or empty")
    return value


def _credentials(storage: StorageOptions) -> dict[str, str]:
    """Secrets read from the NAMED environment variables; {} = the SDK's default chain."""
    if storage.key_env is None:
        return {}
    creds = {"key": _env(storage.key_env, "key_env"), "secret": _env(storage.secret_env, "secret_env")}
    if storage.token_env:
        creds["token"] = _env(storage.token_env, "token_env")
    return creds


def _s3fs_kwargs(storage: StorageOptions) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(storage.extra)
    kwargs.update(_credentials(storage))
    if storage.anonymous:
        kwargs["anon"] = True
    if storage.endpoint_url:
        kwargs["endpoint_url"] = storage.endpoint_url
    if storage.region:
        kwargs["client_kwargs"] = {"region_name": storage.region}
    if storage.profile:
        kwargs["profile"] = storage.profile
    return kwargs


def _gcsfs_kwargs(storage: StorageOptions) -> dict[str, Any]:
    if storage.key_env or storage.profile:
        raise StorageError("storage.key_env/secret_env/profile apply to s3:// only; for gs:// use "
                           "GOOGLE_APPLICATION_CREDENTIALS (or s3:// with the GCS interoperability endpoint)")
    kwargs: dict[str, Any] = dict(storage.extra)
    if storage.anonymous:
        kwargs["token"] = "anon"
    if storage.endpoint_url:
        kwargs["endpoint_url"] = storage.endpoint_url
    return kwargs


def fsspec_filesystem(url: str, storage: Optional[StorageOptions] = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem for `url` and the path within it (instances are cached by fsspec)."""
    storage = storage or StorageOptions()
    scheme, path = split_url(url)
    if scheme == "file":
        kwargs: dict[str, Any] = {}
    elif scheme == "s3":
        kwargs = _s3fs_kwargs(storage)
    elif scheme == "gs":
        kwargs = _gcsfs_kwargs(storage)
    else:
        kwargs = dict(storage.extra)
    try:
        return fsspec.filesystem(scheme, **kwargs), path
    except ImportError as exc:
        package = {"gs": "gcsfs", "s3": "s3fs"}.get(scheme, f"the fsspec driver for {scheme}://")
        raise StorageError(f"{scheme}:// URLs need {package}, which is not installed ({exc})") from None
    except ValueError as exc:
        raise StorageError(f"{scheme}:// is not a known storage protocol ({exc})") from None


def pyarrow_filesystem(url: str, storage: Optional[StorageOptions] = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for `url` and the path within it (what Ray's read/write calls take)."""
    storage = storage or StorageOptions()
    scheme, path = split_url(url)
    if scheme == "file":
        return pafs.LocalFileSystem(), path
    if scheme == "s3" and not storage.profile and not storage.extra:
        return pafs.S3FileSystem(**_pyarrow_s3_kwargs(storage)), path
    fs, path = fsspec_filesystem(url, storage)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _pyarrow_s3_kwargs(storage: StorageOptions) -> dict[str, Any]:
    creds = _credentials(storage)
    kwargs: dict[str, Any] = {"anonymous": storage.anonymous}
    if creds:
        kwargs.update(access_key=creds["key"], secret_key=creds["secret"], session_token=creds.get("token"))
    if storage.region:
        kwargs["region"] = storage.region
    if storage.endpoint_url:
        scheme, _, host = storage.endpoint_url.partition("://")
        kwargs.update(scheme=scheme, endpoint_override=host.rstrip("/"))
    return kwargs


# ---------------------------------------------------------------------------------------------------
# Listing


def _is_hidden(relative: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relative.split("/") if part)


def list_shards(url: str, storage: Optional[StorageOptions] = None, suffix: str = ".parquet") -> list[str]:
    """Input shards under `url`, sorted: a directory/prefix (recursive, `suffix` files only), a single
    file, or a glob. Names starting with '_' or '.' (markers, temp files) are skipped.
    Raises FileNotFoundError when nothing matches."""
    fs, path = fsspec_filesystem(url, storage)
    scheme = split_url(url)[0]
    fs.invalidate_cache()
    if has_glob(url):
        infos = fs.glob(path, detail=True)
        found = [p for p, info in infos.items() if info.get("type") == "file" and not _is_hidden(posixpath.basename(p))]
    elif fs.isdir(path):
        infos = fs.find(path, detail=True)
        found = [
            p for p, info in infos.items()
            if info.get("type") == "file" and p.endswith(suffix) and not _is_hidden(p[len(path):])
        ]
    elif fs.isfile(path):
        found = [path]
    else:
        raise FileNotFoundError(f"{redact_url(url)}: no such file, directory or prefix")
    if not found:
        raise FileNotFoundError(f"{redact_url(url)}: no {suffix} files found")
    return sorted(to_url(scheme, p) for p in found)


def glob(url: str, storage: Optional[StorageOptions] = None) -> list[str]:
    """Files matching a glob URL, sorted (empty list when none)."""
    fs, path = fsspec_filesystem(url, storage)
    fs.invalidate_cache()
    scheme = split_url(url)[0]
    return sorted(to_url(scheme, p) for p, info in fs.glob(path, detail=True).items() if info.get("type") == "file")


def exists(url: str, storage: Optional[StorageOptions] = None) -> bool:
    fs, path = fsspec_filesystem(url, storage)
    fs.invalidate_cache(path)
    return fs.exists(path)


# ---------------------------------------------------------------------------------------------------
# Reads and writes


def read_bytes(url: str, storage: Optional[StorageOptions] = None, max_bytes: Optional[int] = None) -> bytes:
    """The whole object at `url`; FileNotFoundError if absent, TooLargeError above `max_bytes`.

    The size is checked from metadata first, so an oversized object is never downloaded."""
    fs, path = fsspec_filesystem(url, storage)
    info = fs.info(path)
    if info.get("type") == "directory":
        raise IsADirectoryError(f"{redact_url(url)} is a directory")
    size = info.get("size")
    if max_bytes is not None and size is not None and size > max_bytes:
        raise TooLargeError(f"{size} bytes exceeds image.max_image_bytes {max_bytes}")
    data = fs.cat_file(path)
    if max_bytes is not None and len(data) > max_bytes:
        raise TooLargeError(f"{len(data)} bytes exceeds image.max_image_bytes {max_bytes}")
    return data


def _make_parent(url: str) -> None:
    """Local files need their directory; object stores have none (and s3fs mkdir would try to create
    a bucket)."""
    scheme, path = split_url(url)
    if scheme == "file":
        os.makedirs(os.path.dirname(path), exist_ok=True)


def write_bytes(url: str, data: bytes, storage: Optional[StorageOptions] = None) -> None:
    """Create/replace one object."""
    _make_parent(url)
    fs, path = fsspec_filesystem(url, storage)
    fs.pipe_file(path, data)
    fs.invalidate_cache(posixpath.dirname(path))


def write_text(url: str, text: str, storage: Optional[StorageOptions] = None) -> None:
    write_bytes(url, text.encode("utf-8"), storage)


def read_text(url: str, storage: Optional[StorageOptions] = None) -> str:
    return read_bytes(url, storage).decode("utf-8")


def write_parquet(table: pa.Table, url: str, storage: Optional[StorageOptions] = None, **options: Any) -> None:
    """Write one Parquet file with pyarrow (zstd unless `compression` is given)."""
    _make_parent(url)
    fs, path = pyarrow_filesystem(url, storage)
    options.setdefault("compression", "zstd")
    pq.write_table(table, path, filesystem=fs, **options)


def read_parquet(url: str, storage: Optional[StorageOptions] = None) -> pa.Table:
    """Read one Parquet file (or a directory of them) with pyarrow."""
    fs, path = pyarrow_filesystem(url, storage)
    return pq.read_table(path, filesystem=fs)


def remove(url: str, storage: Optional[StorageOptions] = None, recursive: bool = False) -> None:
    """Delete a file (or a directory/prefix with `recursive`); absent is fine."""
    fs, path = fsspec_filesystem(url, storage)
    try:
        fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass
    fs.invalidate_cache(posixpath.dirname(path))
