"""Job artifact storage by URL (`file:///path`, `s3://bucket/prefix`), with core.s3's retry policy.

(About 380 lines on purpose: the store's contract and its two backends side by side, so that a change to
the contract is made, and reviewed, in one place.)

Keys are relative POSIX paths (`jobs/<id>/checkpoints/helip_step200.pt`). Transient failures are retried
with exponential backoff; a store that stays down, or a missing object, raises StorageError.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from core import s3
from core.errors import StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")
CHUNK = 1024 * 1024
_TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ESTALE, errno.ETIMEDOUT, errno.EINTR})


def job_key(job_id: str, *parts: str) -> str:
    """The store key of a job's file: jobs/<job_id>/<parts...>."""
    return "/".join(("jobs", job_id, *parts))


def file_sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _prefix(prefix: str) -> str:
    """A listing prefix: '' (everything) or a clean key followed by '/'."""
    return clean_key(prefix.rstrip("/")) + "/" if prefix.strip("/") else ""


def clean_key(key: str) -> str:
    """Refuse keys that could escape the store root (`..`, absolute paths)."""
    parts = key.split("/")
    if not key or any(p in ("..", ".", "") for p in parts) or "\\" in key or "\x00" in key:
        raise StorageError(f"invalid store key {key!r}")
    return key


class Store(ABC):
    """The operations every backend offers; subclasses implement the `_`-prefixed single attempts."""

    url: str

    def __init__(self, *, retries: int = 4, backoff: float = 0.5):
        self.retries = retries
        self.backoff = backoff

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        """Run `fn` under the retry policy (core.s3: tenacity, doubling waits). Only this backend's transient
        failures are retried; the last one, or any other S3 answer, is a StorageError; anything else (a bug)
        is raised as it is."""
        try:
            return s3.retrying(self.retries + 1, self.backoff, what=what, transient=self._transient)(fn)
        except StorageError:
            raise
        except Exception as exc:
            if self._transient(exc):
                raise StorageError(f"{what} failed after {self.retries + 1} attempts: {s3.describe(exc)}") from exc
            if s3.error_code(exc) is not None:
                raise StorageError(f"{what} was refused by the store ({s3.describe(exc)})") from exc
            raise

    @staticmethod
    def _transient(exc: BaseException) -> bool:
        return s3.is_transient(exc)

    def put_file(self, key: str, path: Path | str) -> tuple[str, int]:
        """Upload a local file; returns (sha256 hex, size in bytes) of what was uploaded."""
        path = Path(path)
        digest, size = file_sha256(path)
        self._retry(f"upload of {key}", lambda: self._put(clean_key(key), path))
        return digest, size

    def put_bytes(self, key: str, data: bytes) -> tuple[str, int]:
        self._retry(f"upload of {key}", lambda: self._put_bytes(clean_key(key), data))
        return hashlib.sha256(data).hexdigest(), len(data)

    def get_file(self, key: str, dest: Path | str) -> Path:
        """Download `key` to `dest` (written to a temporary name first, so a failed download leaves nothing)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")

        def attempt() -> None:
            self._get(clean_key(key), tmp)
            tmp.replace(dest)

        try:
            self._retry(f"download of {key}", attempt)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def get_bytes(self, key: str) -> bytes:
        return self._retry(f"download of {key}", lambda: self._get_bytes(clean_key(key)))

    def exists(self, key: str) -> bool:
        return self._retry(f"stat of {key}", lambda: self._exists(clean_key(key)))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix` (a key prefix ending in '/'); returns how many."""
        return self._retry(f"delete of {prefix}", lambda: self._delete_prefix(clean_key(prefix.rstrip("/")) + "/"))

    def list_keys(self, prefix: str) -> list[str]:
        """Every object key under `prefix` (a key prefix ending in '/'), sorted; partial uploads left out."""
        return self._retry(f"listing of {prefix}", lambda: sorted(self._list(_prefix(prefix))))

    def delete(self, key: str) -> bool:
        """Delete one object; False when there was none."""
        return self._retry(f"delete of {key}", lambda: self._delete(clean_key(key)))

    def presigned_get(self, key: str, seconds: int) -> str | None:
        """A URL anyone can GET for `seconds`; None for stores the API serves itself (file://)."""
        return None

    def ping(self) -> None:
        """Raise StorageError unless the store is reachable (for /readyz): one attempt, no retries."""
        try:
            self._ping()
        except StorageError:
            raise
        except Exception as exc:
            if self._transient(exc) or s3.error_code(exc) is not None:
                raise StorageError(f"store {self.url} unreachable: {s3.describe(exc)}") from exc
            raise

    def local_path(self, key: str) -> Path | None:
        """The file behind `key` when the store is a local directory, else None."""
        return None

    # single attempts, per backend
    @abstractmethod
    def _put(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def _put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def _get(self, key: str, dest: Path) -> None: ...

    @abstractmethod
    def _get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abstractmethod
    def _delete_prefix(self, prefix: str) -> int: ...

    @abstractmethod
    def _ping(self) -> None: ...

    @abstractmethod
    def _list(self, prefix: str) -> list[str]: ...

    @abstractmethod
    def _delete(self, key: str) -> bool: ...


class FileStore(Store):
    """A directory on a local (or shared network) file system."""

    @staticmethod
    def _transient(exc: BaseException) -> bool:
        # A network file system that hiccups; a missing file or a refused permission is not transient.
        return isinstance(exc, (ConnectionError, TimeoutError)) or (
            isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS)

    def __init__(self, root: Path | str, **kw: Any):
        super().__init__(**kw)
        self.root = Path(root)
        self.url = self.root.as_uri() if self.root.is_absolute() else f"file://{self.root}"

    def local_path(self, key: str) -> Path:
        return self.root / clean_key(key)

    def _put(self, key: str, path: Path) -> None:
        dest = self.local_path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        shutil.copyfile(path, tmp)
        tmp.replace(dest)  # atomic: a reader never sees half a checkpoint

    def _put_bytes(self, key: str, data: bytes) -> None:
        dest = self.local_path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(dest)

    def _existing(self, key: str) -> Path:
        src = self.local_path(key)
        if not src.is_file():
            raise StorageError(f"no object {key!r} in {self.url}")
        return src

    def _get(self, key: str, dest: Path) -> None:
        shutil.copyfile(self._existing(key), dest)

    def _get_bytes(self, key: str) -> bytes:
        return self._existing(key).read_bytes()

    def _exists(self, key: str) -> bool:
        return self.local_path(key).is_file()

    def _delete_prefix(self, prefix: str) -> int:
        root = self.local_path(prefix.rstrip("/"))
        if not root.exists():
            return 0
        n = sum(1 for p in root.rglob("*") if p.is_file())
        shutil.rmtree(root)
        return n

    def _list(self, prefix: str) -> list[str]:
        root = self.root / prefix.rstrip("/") if prefix else self.root
        if not root.is_dir():
            return []
        return [p.relative_to(self.root).as_posix() for p in root.rglob("*")
                if p.is_file() and not p.name.endswith(".part")]

    def _delete(self, key: str) -> bool:
        path = self.local_path(key)
        if not path.is_file():
            return False
        path.unlink()
        return True

    def _ping(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.root.is_dir():
            raise StorageError(f"{self.root} is not a directory")


class S3Store(Store):
    """A bucket (and key prefix) on an S3-compatible server, through the minio client."""

    def __init__(self, bucket: str, prefix: str, *, endpoint: str, access_key: str | None, secret_key: str | None,
                 secure: bool = False, region: str | None = None, timeout: float = 60.0, **kw: Any):
        super().__init__(**kw)
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        # The one client factory (core.s3): no urllib3 retries (ours are above), no redirects, bounded timeouts.
        cfg = s3.S3Config(endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region,
                          attempts=self.retries + 1, backoff=self.backoff, connect_timeout=min(timeout, 5.0),
                          read_timeout=timeout)
        self.client = s3.s3_client(cfg)

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @staticmethod
    def _missing(exc: Exception) -> bool:
        return s3.error_code(exc) in s3.MISSING

    def _put(self, key: str, path: Path) -> None:
        self.client.fput_object(self.bucket, self._name(key), str(path))

    def _put_bytes(self, key: str, data: bytes) -> None:
        import io

        self.client.put_object(self.bucket, self._name(key), io.BytesIO(data), len(data))

    def _open(self, key: str):
        """The object's response (caller closes it); a missing object is a StorageError, not retried."""
        from minio.error import S3Error

        try:
            return self.client.get_object(self.bucket, self._name(key))
        except S3Error as exc:
            if self._missing(exc):
                raise StorageError(f"no object {key!r} in {self.url}") from exc
            raise

    def _get(self, key: str, dest: Path) -> None:
        resp = self._open(key)
        try:
            with open(dest, "wb") as f:
                for chunk in resp.stream(CHUNK):
                    f.write(chunk)
        finally:
            s3.close_response(resp)

    def _get_bytes(self, key: str) -> bytes:
        resp = self._open(key)
        try:
            return resp.read()
        finally:
            s3.close_response(resp)

    def _exists(self, key: str) -> bool:
        from minio.error import S3Error

        try:
            self.client.stat_object(self.bucket, self._name(key))
            return True
        except S3Error as exc:
            if self._missing(exc):
                return False
            raise

    def _delete_prefix(self, prefix: str) -> int:
        from minio.deleteobjects import DeleteObject

        names = [o.object_name for o in self.client.list_objects(self.bucket, prefix=self._name(prefix), recursive=True)]
        if not names:
            return 0
        errors = list(self.client.remove_objects(self.bucket, (DeleteObject(n) for n in names)))
        if errors:
            raise StorageError(f"could not delete {len(errors)} object(s) under {prefix!r}: {errors[0]}")
        return len(names)

    def _list(self, prefix: str) -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        return [o.object_name[len(base):] for o in self.client.list_objects(self.bucket, prefix=base + prefix,
                                                                            recursive=True)]

    def _delete(self, key: str) -> bool:
        if not self._exists(key):
            return False
        self.client.remove_object(self.bucket, self._name(key))
        return True

    def presigned_get(self, key: str, seconds: int) -> str:
        return self.client.presigned_get_object(self.bucket, self._name(clean_key(key)), expires=timedelta(seconds=seconds))

    def _ping(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            raise StorageError(f"bucket {self.bucket!r} does not exist")


def open_store(url: str, *, s3_endpoint: str | None = None, s3_access_key: str | None = None,
               s3_secret_key: str | None = None, s3_secure: bool = False, s3_region: str | None = None,
               retries: int = 4, backoff: float = 0.5, timeout: float = 60.0) -> Store:
    """The store for `url`: `file:///abs/path` or `s3://bucket/prefix` (needs the S3 endpoint)."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"file:// store URL must be local (file:///path), got {url!r}")
        return FileStore(Path(unquote(parts.path)), retries=retries, backoff=backoff)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise StorageError(f"s3:// store URL needs a bucket: {url!r}")
        if not s3_endpoint:
            raise StorageError("an s3:// store needs HELIP_S3_ENDPOINT_URL")
        return S3Store(parts.netloc, parts.path, endpoint=s3_endpoint, access_key=s3_access_key,
                       secret_key=s3_secret_key, secure=s3_secure, region=s3_region, timeout=timeout,
                       retries=retries, backoff=backoff)
    raise StorageError(f"unsupported storage URL {url!r} (file:///path or s3://bucket/prefix)")


def store_from_settings(settings) -> Store:  # noqa: ANN001 - helip.settings.Settings (kept import-light)
    """The store the settings name (HELIP_STORAGE_URL + the S3 endpoint and keys)."""
    cfg = settings.s3_config()
    return open_store(str(settings.storage_url), s3_endpoint=cfg.host if cfg else None,
                      s3_access_key=settings.s3_access_key, s3_secret_key=settings.s3_secret_key,
                      s3_secure=cfg.secure if cfg else False, s3_region=settings.s3_region,
                      retries=settings.store_retries, backoff=settings.store_backoff_seconds,
                      timeout=settings.s3_read_timeout_seconds)
