"""Every request a cache makes to its storage: retried when transient, one line when not.

``CacheStore`` wraps the zarr store of a cache (LocalStore for a folder, FsspecStore for any
URL) and is the one place where storage requests are issued:

- **Transient faults** (timeouts, dropped connections, 5xx, throttling) are retried with
  exponential backoff (``RETRY_DELAYS_S``), on top of the retries s3fs/botocore already make,
  for reads and writes alike. A request is a whole chunk object, so a retry is idempotent.
- **Permanent faults** become a ``SasaError`` of one line that names the URL, the cause and the
  fix (``explain``): no credentials, wrong credentials, permission denied, endpoint unreachable,
  bucket missing, throttling that outlasted the retries, a full disk. ``fs_call`` gives direct
  fsspec calls (listing, sizes, removal) the same treatment.
- **Absent chunk objects** of data arrays are reported to ``on_missing`` (set by ``Cache``), which
  raises when the chunk belongs to a committed shard: zarr would otherwise hand out the fill
  value (zeros), and a trainer would train on rows nobody wrote. The check costs nothing: it
  looks at the answer the store already gave (``None``), not at an extra request.
"""

from __future__ import annotations

import asyncio
import errno
import time
from pathlib import Path
from typing import Any, Callable

import fsspec
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from sasa.errors import SasaError

#: Waits between attempts after a transient fault (s3fs and botocore retry underneath too).
#: Four waits over 7.5 s ride out a restarting endpoint or a burst of throttling.
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0)

#: Phrases of throttling answers. A bare "503" is matched on the HTTP status, never in the text:
#: the text holds the URL, and a cache prefix such as ``4160d9be5038`` contains "503".
_THROTTLE = ("slowdown", "slow down", "reduce your request rate", "throttl", "toomanyrequests")
_TRANSIENT_ERRNOS = {errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
                     errno.EAGAIN, errno.EREMOTEIO, errno.EPIPE, errno.EHOSTUNREACH}
_CONNECT_NAMES = ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                  "ServerDisconnectedError", "ConnectionClosedError", "ReadTimeoutError",
                  "ServerTimeoutError", "ClientOSError", "ClientPayloadError", "FSTimeoutError")


def _chain(err: BaseException):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def _names(err: BaseException) -> set[str]:
    return {c.__name__ for e in _chain(err) for c in type(e).__mro__}


def _response(err: BaseException) -> dict:
    """The parsed answer of a botocore error in the chain ({} when there is none)."""
    for e in _chain(err):
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            return resp
    return {}


def _code(err: BaseException, resp: dict | None = None) -> str:
    """The S3 error code (``NoSuchBucket``, ``SlowDown``...) of a botocore error in the chain
    (of ``resp``, its parsed answer, when the caller has it already)."""
    return str((_response(err) if resp is None else resp).get("Error", {}).get("Code", ""))


def is_throttling(err: BaseException) -> bool:
    resp = _response(err)  # one walk of the error chain for the code and the status
    code = _code(err, resp)
    if code == "503" or resp.get("ResponseMetadata", {}).get("HTTPStatusCode") == 503:
        return True
    text = f"{code} {err}".lower()  # the code SlowDown matches "slowdown" here
    return any(t in text for t in _THROTTLE)


def is_transient(err: BaseException) -> bool:
    """Worth retrying: the same request may succeed in a moment."""
    if isinstance(err, SasaError):
        return False
    if is_throttling(err) or _names(err) & set(_CONNECT_NAMES):
        return True
    if isinstance(err, (TimeoutError, asyncio.TimeoutError, ConnectionError)):
        return True
    if isinstance(err, OSError) and not isinstance(err, (PermissionError, FileNotFoundError)):
        if err.errno in _TRANSIENT_ERRNOS:
            return True
        return _code(err).startswith(("5", "Internal", "ServiceUnavailable", "RequestTimeout"))
    return False


def explain(err: BaseException, url: str, op: str) -> SasaError:
    """One line naming ``url``, the cause and the fix, for a storage failure during ``op``
    ("read" or "write"). Unknown failures keep their own message, with the URL."""
    names, code = _names(err), _code(err)
    cause = f"{type(err).__name__}: {err}".replace("\n", " ")
    resume = "; committed work is kept, rerun the same command to resume"
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return SasaError(f"no credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                         f"or pass --storage-options '{{\"key\": ..., \"secret\": ...}}' "
                         f"('{{\"anon\": true}}' for a public bucket)")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken") or \
            "signature we calculated" in str(err) or "access key id" in str(err).lower():
        return SasaError(f"wrong credentials for {url} ({cause}): check the key and secret in "
                         f"--storage-options or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    if isinstance(err, PermissionError) or code in ("AccessDenied", "403", "Forbidden"):
        if op == "write":
            return SasaError(f"permission denied writing {url} ({cause}): the credentials may not "
                             f"write there (s3:PutObject); use credentials that can, or another --out")
        return SasaError(f"access denied reading {url} ({cause}): the credentials are wrong or "
                         f"not allowed to read it; check the key and secret")
    if code == "NoSuchBucket" or "bucket does not exist" in str(err).lower():
        bucket = url.split("://", 1)[-1].split("/", 1)[0]
        return SasaError(f"bucket {bucket!r} of {url} does not exist: create it, or fix the URL")
    if is_throttling(err):
        return SasaError(f"the store kept throttling requests to {url} ({cause}) through "
                         f"{len(RETRY_DELAYS_S)} retries over {sum(RETRY_DELAYS_S):.0f} s: lower "
                         f"read_concurrency or the number of workers, or raise the bucket's "
                         f"request limits{resume}")
    if names & set(_CONNECT_NAMES) or isinstance(err, (ConnectionError, TimeoutError)):
        return SasaError(f"cannot reach the storage of {url} ({cause}) after {len(RETRY_DELAYS_S)} "
                         f"retries: check endpoint_url and the network, or that the server is up{resume}")
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return SasaError(f"no space left writing {url}: free space or choose another --out{resume}")
    if is_transient(err):
        return SasaError(f"storage at {url} kept failing ({cause}) through {len(RETRY_DELAYS_S)} "
                         f"retries{resume}")
    return SasaError(f"storage {op} failed at {url} ({cause})")


def _storage_error(err: BaseException) -> bool:
    """Errors raised by storage (not by zarr's own checks or by the caller's bugs)."""
    if isinstance(err, SasaError):
        return False
    return isinstance(err, OSError) or bool(_names(err) & {"BotoCoreError", "ClientError",
                                                         "HTTPException"})


async def _retry(url: str, op: str, fn, *args):
    for delay in (*RETRY_DELAYS_S, None):
        try:
            return await fn(*args)
        except Exception as err:  # noqa: BLE001 - classified below
            if delay is not None and is_transient(err):
                await asyncio.sleep(delay)
                continue
            if _storage_error(err):
                raise explain(err, url, op) from None
            raise


def fs_call(url: str, op: str, fn: Callable, *args, **kwargs):
    """Call a synchronous fsspec method with the same retries and one-line errors."""
    for delay in (*RETRY_DELAYS_S, None):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            if delay is not None and is_transient(err):
                time.sleep(delay)
                continue
            if _storage_error(err):
                raise explain(err, url, op) from None
            raise


class CacheStore(WrapperStore):
    """A zarr store that retries transient faults, explains permanent ones in one line, and
    reports absent objects to ``on_missing(key)``."""

    def __init__(self, store, url: str = "", on_missing: Callable[[str], None] | None = None):
        super().__init__(store)
        self.url = url
        self.on_missing = on_missing

    def _with_store(self, store):
        return type(self)(store, self.url, self.on_missing)

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None):
        buf = await _retry(self.url, "read", self._store.get, key, prototype, byte_range)
        if buf is None and self.on_missing is not None:
            self.on_missing(key)
        return buf

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        out = await _retry(self.url, "read", self._store.get_partial_values, prototype, key_ranges)
        if self.on_missing is not None:
            for buf, (key, _) in zip(out, key_ranges):
                if buf is None:
                    self.on_missing(key)
        return out

    async def exists(self, key: str) -> bool:
        return await _retry(self.url, "read", self._store.exists, key)

    async def set(self, key: str, value: Buffer) -> None:
        await _retry(self.url, "write", self._store.set, key, value)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        await _retry(self.url, "write", self._store.set_if_not_exists, key, value)

    async def delete(self, key: str) -> None:
        await _retry(self.url, "write", self._store.delete, key)

    async def delete_dir(self, prefix: str) -> None:
        await _retry(self.url, "write", self._store.delete_dir, prefix)

    async def is_empty(self, prefix: str) -> bool:
        return await _retry(self.url, "read", self._store.is_empty, prefix)


def with_defaults(url: str, storage_options: dict | None) -> dict | None:
    """``storage_options`` with sasa's defaults for the URL's filesystem filled in (what the
    caller set wins). On s3fs, ``max_concurrency=1``: s3fs (2026.9 here) otherwise asks for an
    object's size (a HEAD request, a whole round trip) before every whole-object read, to split
    objects over 50 MiB into concurrent ranged reads; a cache's objects are chunks of ~16 MiB
    and the reader already keeps many requests in flight, so the HEAD only doubled the requests
    and put a second latency in front of every read (bench/RESULTS_store.md)."""
    protocol = fsspec.core.split_protocol(str(url))[0]
    if protocol is None or "::" in str(url) or "max_concurrency" in (storage_options or {}):
        return storage_options
    try:
        from s3fs import S3FileSystem
        s3 = issubclass(fsspec.get_filesystem_class(protocol), S3FileSystem)
    except (ImportError, ValueError):
        return storage_options
    return {**(storage_options or {}), "max_concurrency": 1} if s3 else storage_options


def open_store(url: str, read_only: bool, storage_options: dict | None = None) -> CacheStore:
    """The store for ``url``, the same one zarr would pick (a folder: LocalStore; any fsspec
    URL: FsspecStore), wrapped in a ``CacheStore``."""
    url = str(url)
    try:
        if "://" in url or "::" in url:
            options = with_defaults(url, storage_options)
            inner: Any = FsspecStore.from_url(url, storage_options=options, read_only=read_only)
        else:
            if storage_options:
                raise SasaError(f"--storage-options apply to URLs like s3://...; {url!r} is a local "
                                f"folder, drop them")
            inner = LocalStore(Path(url), read_only=read_only)
    except (ImportError, ValueError) as err:
        raise SasaError(f"cannot use {url!r}: {err}; install the filesystem's package (e.g. s3fs) "
                        f"or check the URL") from None
    return CacheStore(inner, url)
