"""URLs + `StorageOptions` -> one fsspec filesystem for every reader and writer; retries; small I/O.

The one storage layer of the pipeline (listing, Parquet, images, markers, the lease). Every client is
built by `fsspec_filesystem`: `fsspec.core.url_to_fs` picks the driver from the URL (s3fs for s3://,
with s3a:// and s3n:// as aliases; gcsfs for gs:// and gcs://; fsspec's aiohttp filesystem for http(s)://;
the local filesystem for file:// and plain paths) and gets the options resolved here. Parquet I/O and Ray
Data get that SAME filesystem wrapped for pyarrow (`pyarrow.fs.PyFileSystem(FSSpecHandler(fs))`), so an
option such as the endpoint can never differ between listing and reading (pyarrow's native
`S3FileSystem` ignores `AWS_ENDPOINT_URL`; that divergence is why it is not used). Local paths are the
exception: pyarrow's native `LocalFileSystem` has no options that could diverge, and it is faster.

Options: the job file's `StorageOptions` first, then the SDK's standard variables (`AWS_ENDPOINT_URL_S3`
/ `AWS_ENDPOINT_URL`, `AWS_REGION` / `AWS_DEFAULT_REGION`, `AWS_PROFILE`), resolved once here and passed
explicitly, so they are part of fsspec's instance-cache key. Credentials come from the environment
variables NAMED in `StorageOptions` (or the SDK's default chain); they are read when a filesystem is built
and never logged. Messages show URLs through `redact_url`. Workers that build filesystems (the image stage)
need the same variables in their environment (Ray `runtime_env={"env_vars": ...}` on a remote cluster).

Faults: `is_transient` classifies an exception (throttling, 5xx, resets, timeouts -> transient; not found,
access denied, other 4xx, corrupt data -> permanent). botocore retries a few times itself (standard
mode, `_BOTO_ATTEMPTS`); `with_retries` adds exponential backoff with jitter up to
`StorageOptions.retry_deadline_s` around every call here, and raises `TransientStorageError` when a
transient fault outlasts it. Permanent errors propagate at once, unchanged. Worst-case time of one call is
the deadline plus one attempt.

Writes: object-store PUTs are atomic; local writes go to a hidden temporary file in the same directory,
are fsynced and then `os.replace`d, so a crash never leaves a half-written file. `put_if_absent` is an
atomic create-only write (S3 conditional PUT `If-None-Match: *`; local hard link), used for the lease.

URL forms: `s3://bucket/key`, `gs://bucket/key`, `http(s)://host/path`, `file:///abs/path`, plain
(relative or absolute) paths, and globs (`*`, `?`, `[`) in the path part. Local paths are returned
absolute; other URLs keep their scheme. Listings are sorted, so shard order is deterministic.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import posixpath
import random
import re
import socket
import time
import uuid
from typing import Any, Callable, Optional, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from schemas.job import StorageOptions, redact_url

log = logging.getLogger(__name__)
T = TypeVar("T")

_GLOB_CHARS = "*?["
_SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs", "local": "file"}
_HTTP = ("http", "https")
_BOTO_ATTEMPTS = 3  # botocore's own tries per call (standard mode); with_retries does the rest
# s3fs retries SlowDown and body-read errors around botocore's tries (default 5 x 3 tries: ~25 s on a
# persistent SlowDown). 2 keeps one attempt short, so the deadline governs; the second covers a body cut
# mid-stream for pyarrow reads that do not go through with_retries.
_S3FS_RETRIES = 2
_CONNECT_TIMEOUT_S = 10
_READ_TIMEOUT_S = 60
_BACKOFF_FIRST_S = 0.1
_BACKOFF_MAX_S = 5.0


class StorageError(RuntimeError):
    """A storage location cannot be used as configured (missing credentials variable, no driver)."""


class TooLargeError(ValueError):
    """An object exceeds the size cap it was read with."""


class TransientStorageError(OSError):
    """A transient fault (throttling, 5xx, reset, timeout) that outlasted `retry_deadline_s`.

    An OSError, so code that handles I/O errors still catches it; `__cause__` is the last error.
    A row or shard that fails with it must not be recorded as complete: a re-run retries it."""

    def __init__(self, message: str, attempts: int = 1, elapsed_s: float = 0.0) -> None:
        super().__init__(errno.EAGAIN, message)
        self.attempts = attempts
        self.elapsed_s = elapsed_s

    def __str__(self) -> str:
        return self.strerror


# ---------------------------------------------------------------------------------------------------
# URLs


def _protocol(url: str) -> str:
    scheme = fsspec.core.split_protocol(url)[0]
    scheme = (scheme or "file").lower()
    return _SCHEME_ALIASES.get(scheme, scheme)


def _with_protocol(url: str, scheme: str) -> str:
    """`url` spelled with its canonical scheme (s3a://b/k -> s3://b/k); plain paths unchanged."""
    if "://" not in url:
        return url
    return f"{scheme}://{url.split('://', 1)[1]}"


def split_url(url: str) -> tuple[str, str]:
    """'s3://b/k' -> ('s3', 'b/k'); 'https://h/p' -> ('https', 'h/p'); 'file:///x' and plain paths ->
    ('file', absolute path). Scheme aliases are resolved (s3a, s3n -> s3; gcs -> gs)."""
    scheme = _protocol(url)
    if scheme == "file":
        return "file", os.path.abspath(os.path.expanduser(url.split("://", 1)[1] if "://" in url else url))
    rest = url.split("://", 1)[1] if "://" in url else url
    if scheme in _HTTP:
        return scheme, rest
    try:
        path = fsspec.get_filesystem_class(scheme)._strip_protocol(f"{scheme}://{rest}")
    except (ImportError, ValueError):  # unknown or missing driver: fsspec_filesystem says so
        path = rest
    return scheme, path.rstrip("/")


def to_url(scheme: str, path: str) -> str:
    """Inverse of `split_url`: local paths stay plain absolute paths."""
    return path if scheme == "file" else f"{scheme}://{path}"


def normalize_url(url: str) -> str:
    """Canonical spelling (absolute local path, canonical lower-case scheme, no trailing slash)."""
    return to_url(*split_url(url))


def join_url(base: str, *names: str) -> str:
    """Append path components to a URL or path."""
    return "/".join([normalize_url(base).rstrip("/")] + [n.strip("/") for n in names])


def has_glob(url: str) -> bool:
    scheme, path = split_url(url)
    if scheme in _HTTP:  # '?' starts a query string there
        return False
    return any(c in path for c in _GLOB_CHARS)


def glob_root(url: str) -> str:
    """The directory part of a glob before its first wildcard: 's3://b/in/*/x.parquet' -> 's3://b/in'."""
    scheme, path = split_url(url)
    if not has_glob(url):
        return to_url(scheme, path)
    cut = min(path.index(c) for c in _GLOB_CHARS if c in path)
    return to_url(scheme, posixpath.dirname(path[:cut]))


def canonical_location(url: str) -> str:
    """One spelling per storage location, for comparing locations: scheme aliases resolved (s3a://,
    file://), '~' expanded, '.', '..', repeated and trailing slashes removed; local paths through
    `os.path.realpath` (symlinks resolved, also for a prefix that exists when the rest does not yet)."""
    scheme, path = split_url(url)
    if scheme == "file":
        return os.path.realpath(path)
    if scheme in _HTTP:
        host, _, rest = path.partition("/")
        return f"{scheme}://{host.lower()}{_clean_key('/' + rest.split('?', 1)[0])}".rstrip("/")
    return to_url(scheme, _clean_key(path).strip("/"))


def _clean_key(path: str) -> str:
    cleaned = posixpath.normpath("/" + path.lstrip("/"))
    return "" if cleaned == "/" else cleaned if path.startswith("/") else cleaned.lstrip("/")


def overlaps(a: str, b: str) -> bool:
    """True when two locations are the same or one lies inside the other (globs compared by their
    directory part), after `canonical_location`. Different schemes never overlap."""
    ca, cb = (canonical_location(glob_root(u) if has_glob(u) else u) for u in (a, b))
    if _protocol(ca) != _protocol(cb):
        return False
    return ca == cb or ca.startswith(cb.rstrip("/") + "/") or cb.startswith(ca.rstrip("/") + "/")


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


def _first_env(*names: str) -> Optional[str]:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def s3_endpoint(storage: StorageOptions) -> Optional[str]:
    """The S3 endpoint every client uses: the job file's, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL."""
    return storage.endpoint_url or _first_env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def _s3fs_kwargs(storage: StorageOptions) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(storage.extra)
    kwargs.update(_credentials(storage))
    if storage.anonymous:
        kwargs["anon"] = True
    endpoint = s3_endpoint(storage)
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    region = storage.region or _first_env("AWS_REGION", "AWS_DEFAULT_REGION")
    if region:
        kwargs["client_kwargs"] = {"region_name": region}
    profile = storage.profile or (None if storage.anonymous or storage.key_env else _first_env("AWS_PROFILE"))
    if profile:
        kwargs["profile"] = profile
    kwargs["config_kwargs"] = {
        "retries": {"max_attempts": _BOTO_ATTEMPTS, "mode": "standard"},
        "connect_timeout": _CONNECT_TIMEOUT_S,
        "read_timeout": _READ_TIMEOUT_S,
    }
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


def _http_kwargs() -> dict[str, Any]:
    """Bounded timeouts; `extra` is not passed (it holds object-store options, aiohttp would refuse them)."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=_READ_TIMEOUT_S, connect=_CONNECT_TIMEOUT_S)
    return {"client_kwargs": {"timeout": timeout}}


def _fs_kwargs(scheme: str, storage: StorageOptions) -> dict[str, Any]:
    if scheme == "file":
        return {}
    if scheme == "s3":
        return _s3fs_kwargs(storage)
    if scheme == "gs":
        return _gcsfs_kwargs(storage)
    if scheme in _HTTP:
        return _http_kwargs()
    return dict(storage.extra)


def fsspec_filesystem(url: str, storage: Optional[StorageOptions] = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path within it (instances are cached by fsspec, keyed by
    the resolved options). For http(s):// the path is the full URL, as fsspec's HTTP filesystem wants."""
    storage = storage or StorageOptions()
    scheme = _protocol(url)
    try:
        fs, path = fsspec.core.url_to_fs(_with_protocol(url, scheme), **_fs_kwargs(scheme, storage))
    except ImportError as exc:
        package = {"gs": "gcsfs", "s3": "s3fs", "http": "aiohttp", "https": "aiohttp"}.get(
            scheme, f"the fsspec driver for {scheme}://")
        raise StorageError(f"{scheme}:// URLs need {package}, which is not installed ({exc})") from None
    except ValueError as exc:
        raise StorageError(f"{scheme}:// is not a known storage protocol ({exc})") from None
    if scheme == "s3":
        fs.retries = _S3FS_RETRIES  # an attribute s3fs reads per call; the same on every cached instance
    return fs, path


def pyarrow_filesystem(url: str, storage: Optional[StorageOptions] = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for `url` and the path within it (what Ray's read/write calls take): the
    `fsspec_filesystem` wrapped, or pyarrow's native local filesystem for local paths."""
    fs, path = fsspec_filesystem(url, storage)
    if _protocol(url) == "file":
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


# ---------------------------------------------------------------------------------------------------
# Faults: classification and retries

_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequests", "TooManyRequestsException", "RequestLimitExceeded",
    "ProvisionedThroughputExceededException", "BandwidthLimitExceeded", "TransactionInProgressException",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "InternalFailure", "ServiceUnavailable",
    "ServiceUnavailableException", "PriorRequestNotComplete", "OperationAborted",
})
_TRANSIENT_ERRNOS = frozenset({
    errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE, errno.EAGAIN,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, getattr(errno, "EREMOTEIO", errno.EIO),
})
_PERMANENT_TYPES = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
                    TooLargeError, StorageError, UnicodeDecodeError)
_TRANSIENT_TEXT = re.compile(
    r"slow ?down|reduce your request rate|service unavailable|throttl|too many requests|connection reset|"
    r"connection aborted|timed out|timeout|server disconnected|broken pipe|internal ?error|"
    r"\b(?:500|502|503|504|429)\b", re.IGNORECASE)
_PERMANENT_TEXT = re.compile(r"not found|\b404\b|access denied|forbidden|\b403\b", re.IGNORECASE)


def _http_status_transient(status: Optional[int]) -> Optional[bool]:
    if status is None:
        return None
    return status in (408, 429) or status >= 500


def _one_verdict(exc: BaseException) -> Optional[bool]:
    """True/False when `exc` alone decides it; None when its cause has to."""
    if isinstance(exc, TransientStorageError):
        return True
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, socket.timeout, ConnectionError)):
        return True  # ConnectionError: reset, aborted, refused, broken pipe
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, dict) and "Error" in response:
        code = str(response["Error"].get("Code", ""))
        if code in _TRANSIENT_CODES:
            return True
        return bool(_http_status_transient(response.get("ResponseMetadata", {}).get("HTTPStatusCode")))
    status = getattr(exc, "status", None)  # aiohttp ClientResponseError
    if isinstance(status, int) and type(exc).__module__.startswith("aiohttp"):
        return _http_status_transient(status)
    module = type(exc).__module__
    if module.startswith(("aiohttp", "botocore", "aiobotocore", "urllib3")) or type(exc).__name__ == "FSTimeoutError":
        # transport errors: aiohttp ClientConnectionError/ClientPayloadError/ServerDisconnectedError,
        # botocore EndpointConnectionError/ConnectionClosedError/ReadTimeoutError/IncompleteReadError/...
        name = type(exc).__name__
        if module.startswith(("botocore", "aiobotocore")) and name in ("NoCredentialsError", "PartialCredentialsError",
                                                                        "ProfileNotFound", "ParamValidationError",
                                                                        "NoRegionError", "UnknownServiceError"):
            return False
        return True
    if isinstance(exc, _PERMANENT_TYPES):
        return False
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying later may succeed: throttling (SlowDown, 429, 503), other 5xx, connection resets
    and aborts, timeouts, botocore/aiohttp transport errors -> True; not found, access denied, other 4xx,
    corrupt data, configuration problems -> False.

    The exception and its causes (`__cause__`, then `__context__`) are examined in turn, so an s3fs
    OSError wrapping a botocore ClientError is judged by the ClientError's code and HTTP status. When no
    structured error decides, a pyarrow error's message is matched against known transient wordings."""
    seen: set[int] = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        # A not-found/denied type is permanent unless its cause says otherwise: fsspec's HTTP filesystem
        # turns a 503 during `info` into FileNotFoundError (from the ClientResponseError); s3fs's
        # FileNotFoundError comes from a 404 ClientError, which stays permanent.
        verdict = None if current is exc and isinstance(exc, _PERMANENT_TYPES) else _one_verdict(current)
        if verdict is not None:
            return verdict
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    if isinstance(exc, _PERMANENT_TYPES):
        return False
    if isinstance(exc, (OSError, pa.ArrowException)):
        text = str(exc)
        return bool(_TRANSIENT_TEXT.search(text)) and not _PERMANENT_TEXT.search(text)
    return False


def with_retries(fn: Callable[[], T], deadline_s: float, what: str) -> T:
    """`fn()`, retried on transient errors with exponential backoff and full jitter until `deadline_s`
    seconds have passed since the first attempt; permanent errors propagate at once, unchanged.

    When a transient error outlasts the deadline, raises `TransientStorageError` (naming `what`, the
    attempts and the seconds) from the last error. No sleep runs past the deadline, so the total time is
    at most `deadline_s` plus one attempt."""
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified just below
            if not is_transient(exc):
                raise
            elapsed = time.monotonic() - start
            left = deadline_s - elapsed
            if left <= 0:
                raise TransientStorageError(
                    f"{what}: transient storage error persisted for {elapsed:.1f} s over {attempt} attempt(s) "
                    f"(storage.retry_deadline_s {deadline_s:g}): {_describe(exc)}",
                    attempts=attempt, elapsed_s=elapsed) from exc
            pause = min(left, random.uniform(0, min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2 ** attempt)))
            log.debug("%s: transient %s, retry %d in %.2f s", what, type(exc).__name__, attempt, pause)
            time.sleep(pause)


def _describe(exc: BaseException) -> str:
    """'Type: message', plus its direct cause when that says more (fsspec's HTTP filesystem reports a
    503 as FileNotFoundError from a ClientResponseError)."""
    text = f"{type(exc).__name__}: {_short(exc, 200)}"
    cause = exc.__cause__
    if cause is not None and type(cause) is not type(exc):
        text += f" (from {type(cause).__name__}: {_short(cause, 200)})"
    return text


_URL_QUERY = re.compile(r"((?:https?|s3|gs)://[^\s'\"?]+)\?[^\s'\"]*")
_URL_USERINFO = re.compile(r"((?:https?|s3|gs)://)[^\s'\"/@]+@")


def _short(exc: BaseException, limit: int = 300) -> str:
    """One line of `exc`'s text, URL query strings (presigned signatures) and userinfo removed."""
    try:
        text = " ".join(str(exc).split())
    except Exception:  # noqa: BLE001 - some library exceptions fail in __str__
        text = repr(exc)
    text = _URL_USERINFO.sub(r"\1***@", _URL_QUERY.sub(r"\1?***", text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _deadline(storage: Optional[StorageOptions]) -> float:
    return (storage or StorageOptions()).retry_deadline_s


def _retried(url: str, storage: Optional[StorageOptions], verb: str, fn: Callable[[], T]) -> T:
    return with_retries(fn, _deadline(storage), f"{verb} {redact_url(url)}")


# ---------------------------------------------------------------------------------------------------
# Listing and metadata


def _is_hidden(relative: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relative.split("/") if part)


def list_shards(url: str, storage: Optional[StorageOptions] = None, suffix: str = ".parquet") -> list[str]:
    """Input shards under `url`, sorted: a directory/prefix (recursive, `suffix` files only), a single
    file, or a glob. Names starting with '_' or '.' (markers, temp files) are skipped.
    Raises FileNotFoundError when nothing matches."""
    fs, path = fsspec_filesystem(url, storage)
    scheme = split_url(url)[0]

    def listing() -> list[str]:
        fs.invalidate_cache()
        if has_glob(url):
            infos = fs.glob(path, detail=True)
            return [p for p, info in infos.items()
                    if info.get("type") == "file" and not _is_hidden(posixpath.basename(p))]
        if fs.isdir(path):
            infos = fs.find(path, detail=True)
            return [p for p, info in infos.items()
                    if info.get("type") == "file" and p.endswith(suffix) and not _is_hidden(p[len(path):])]
        if fs.isfile(path):
            return [path]
        raise FileNotFoundError(f"{redact_url(url)}: no such file, directory or prefix")

    found = _retried(url, storage, "list", listing)
    if not found:
        raise FileNotFoundError(f"{redact_url(url)}: no {suffix} files found")
    return sorted(to_url(scheme, p) for p in found)


def list_files(url: str, storage: Optional[StorageOptions] = None) -> list[dict[str, Any]]:
    """Every file under `url` (a directory/prefix, recursively; a single file; or a glob), sorted, with
    `url`, `size` and `version` (etag/generation, or mtime) from the listing itself (one call, no stat
    per file). Names starting with '_' or '.' are skipped. FileNotFoundError when the location does not exist."""
    fs, path = fsspec_filesystem(url, storage)
    scheme = split_url(url)[0]

    def listing() -> dict:
        fs.invalidate_cache()
        if has_glob(url):
            return {p: i for p, i in fs.glob(path, detail=True).items() if i.get("type") == "file"}
        if fs.isdir(path):
            return {p: i for p, i in fs.find(path, detail=True).items()
                    if i.get("type") == "file" and not _is_hidden(p[len(path):])}
        if fs.isfile(path):
            return {path: fs.info(path)}
        raise FileNotFoundError(f"{redact_url(url)}: no such file, directory or prefix")

    found = _retried(url, storage, "list", listing)
    out = []
    for p in sorted(found):
        if _is_hidden(posixpath.basename(p)):
            continue
        raw = found[p]
        etag = raw.get("ETag") or raw.get("etag") or raw.get("md5Hash") or raw.get("generation")
        version = str(etag).strip('"') if etag else (None if _mtime(raw) is None else repr(_mtime(raw)))
        out.append({"url": to_url(scheme, p), "size": raw.get("size"), "version": version})
    return out


def glob(url: str, storage: Optional[StorageOptions] = None) -> list[str]:
    """Files matching a glob URL, sorted (empty list when none)."""
    fs, path = fsspec_filesystem(url, storage)
    scheme = split_url(url)[0]

    def matches() -> list[str]:
        fs.invalidate_cache()
        return [p for p, info in fs.glob(path, detail=True).items() if info.get("type") == "file"]

    return sorted(to_url(scheme, p) for p in _retried(url, storage, "glob", matches))


def exists(url: str, storage: Optional[StorageOptions] = None) -> bool:
    fs, path = fsspec_filesystem(url, storage)

    def check() -> bool:
        fs.invalidate_cache(path)
        return fs.exists(path)

    return _retried(url, storage, "check", check)


def info(url: str, storage: Optional[StorageOptions] = None) -> dict[str, Any]:
    """Metadata of one object: `size` (bytes), `type` ('file'/'directory'), `etag` (object stores, quotes
    stripped; None locally), `mtime` (seconds since the epoch, float, when known) and `version`, a change
    token as a string (etag or generation for object stores, mtime in nanoseconds for local files).
    FileNotFoundError if absent."""
    fs, path = fsspec_filesystem(url, storage)

    def fetch() -> dict[str, Any]:
        fs.invalidate_cache(path)
        return fs.info(path)

    raw = _retried(url, storage, "stat", fetch)
    etag = raw.get("ETag") or raw.get("etag") or raw.get("md5Hash")
    etag = str(etag).strip('"') if etag else None
    mtime = _mtime(raw)
    if _protocol(url) == "file":
        mtime_ns = os.stat(path).st_mtime_ns
        version: Optional[str] = str(mtime_ns)
        mtime = mtime_ns / 1e9
    else:
        version = etag or (str(raw["generation"]) if raw.get("generation") else None) or (
            None if mtime is None else repr(mtime))
    return {"size": raw.get("size"), "type": raw.get("type"), "etag": etag, "mtime": mtime, "version": version}


def _mtime(raw: dict[str, Any]) -> Optional[float]:
    value = raw.get("mtime", raw.get("LastModified", raw.get("updated")))
    if value is None:
        return None
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------
# Reads and writes


def read_bytes(url: str, storage: Optional[StorageOptions] = None, max_bytes: Optional[int] = None) -> bytes:
    """The whole object at `url`; FileNotFoundError if absent, TooLargeError above `max_bytes`,
    TransientStorageError when a transient fault outlasts the retry deadline.

    The size is checked from metadata first, so an oversized object is never downloaded."""
    fs, path = fsspec_filesystem(url, storage)

    def fetch() -> bytes:
        meta = fs.info(path)
        if meta.get("type") == "directory":
            raise IsADirectoryError(f"{redact_url(url)} is a directory")
        size = meta.get("size")
        if max_bytes is not None and size is not None and size > max_bytes:
            raise TooLargeError(f"{size} bytes exceeds image.max_image_bytes {max_bytes}")
        return fs.cat_file(path)

    data = _retried(url, storage, "read", fetch)
    if max_bytes is not None and len(data) > max_bytes:
        raise TooLargeError(f"{len(data)} bytes exceeds image.max_image_bytes {max_bytes}")
    return data


def _local_temp(path: str) -> str:
    """A hidden temporary name next to `path` (listings skip names starting with '.')."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _local_atomic(path: str, write: Callable[[str], None]) -> None:
    """`write(temp)` then fsync and rename over `path`: readers see the old file or the whole new one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temp = _local_temp(path)
    try:
        write(temp)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        _unlink_quietly(temp)
        raise
    _fsync_dir(os.path.dirname(path))


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


def write_bytes(url: str, data: bytes, storage: Optional[StorageOptions] = None) -> None:
    """Create/replace one object atomically (local: temp file + rename)."""
    fs, path = fsspec_filesystem(url, storage)
    if _protocol(url) == "file":
        _local_atomic(path, lambda temp: _write_file(temp, data))
        return

    def put() -> None:
        fs.pipe_file(path, data)
        fs.invalidate_cache(posixpath.dirname(path))

    _retried(url, storage, "write", put)


def put_if_absent(url: str, data: bytes, storage: Optional[StorageOptions] = None) -> bool:
    """Create `url` with `data` only if nothing is there; True if this call created it, False if it
    already existed. Atomic: of two racing callers exactly one gets True. S3: conditional PUT
    (`If-None-Match: *`); local: a complete temp file hard-linked to the name.

    On object stores, a PUT whose response was lost is retried (by botocore or `with_retries`) and then
    finds the object; so an existing object holding exactly `data` counts as created by this call.
    Make `data` unique to the caller (a run id, a timestamp), as a lease body is."""
    fs, path = fsspec_filesystem(url, storage)
    if _protocol(url) == "file":
        return _local_put_if_absent(path, data)

    def put() -> bool:
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            fs.invalidate_cache(path)
            try:
                return fs.cat_file(path) == data  # our own attempt whose response was lost?
            except FileNotFoundError:  # removed in between: the next attempt may create it
                raise TransientStorageError(f"{redact_url(url)} vanished during create") from None
        fs.invalidate_cache(posixpath.dirname(path))
        return True

    return _retried(url, storage, "create", put)


def _local_put_if_absent(path: str, data: bytes) -> bool:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temp = _local_temp(path)
    try:
        _write_file(temp, data)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
        except OSError as exc:  # a filesystem without hard links: exclusive create (content written after)
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        _fsync_dir(os.path.dirname(path))
        return True
    finally:
        _unlink_quietly(temp)


def write_text(url: str, text: str, storage: Optional[StorageOptions] = None) -> None:
    write_bytes(url, text.encode("utf-8"), storage)


def read_text(url: str, storage: Optional[StorageOptions] = None) -> str:
    return read_bytes(url, storage).decode("utf-8")


def write_parquet(table: pa.Table, url: str, storage: Optional[StorageOptions] = None, **options: Any) -> None:
    """Write one Parquet file with pyarrow (zstd unless `compression` is given), atomically: a local file
    is written under a temporary name and renamed; an object-store PUT is atomic (a retried write
    rewrites the whole object)."""
    fs, path = pyarrow_filesystem(url, storage)
    options.setdefault("compression", "zstd")
    if _protocol(url) == "file":
        _local_atomic(path, lambda temp: pq.write_table(table, temp, filesystem=fs, **options))
        return
    fsspec_fs, _ = fsspec_filesystem(url, storage)

    def put() -> None:
        pq.write_table(table, path, filesystem=fs, **options)
        fsspec_fs.invalidate_cache(posixpath.dirname(path))

    _retried(url, storage, "write", put)


def read_parquet(url: str, storage: Optional[StorageOptions] = None, **options: Any) -> pa.Table:
    """Read one Parquet file (or a directory of them) with pyarrow; `options` go to `pq.read_table`
    (e.g. `columns=[...]`)."""
    fs, path = pyarrow_filesystem(url, storage)
    return _retried(url, storage, "read", lambda: pq.read_table(path, filesystem=fs, **options))


def remove(url: str, storage: Optional[StorageOptions] = None, recursive: bool = False) -> None:
    """Delete a file (or a directory/prefix with `recursive`); absent is fine."""
    fs, path = fsspec_filesystem(url, storage)

    def delete() -> None:
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass
        fs.invalidate_cache(posixpath.dirname(path))

    _retried(url, storage, "remove", delete)
