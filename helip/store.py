"""Job artifact storage by URL (`file:///path`, `s3://bucket/prefix`) with retries, and signed file:// links.

Keys are relative POSIX paths (`jobs/<id>/checkpoints/helip_step200.pt`). Transient failures are retried
with exponential backoff; a store that stays down, or a missing object, raises StorageError.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import unquote, urlsplit

from core.errors import StorageError

if TYPE_CHECKING:
    from cryptography.fernet import Fernet

log = logging.getLogger(__name__)
T = TypeVar("T")
CHUNK = 1024 * 1024


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


def _clean_key(key: str) -> str:
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
        """Run `fn`, retrying transient errors with backoff 1x, 2x, 4x, ...; StorageError when it stays down."""
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except StorageError:
                raise
            except Exception as exc:  # noqa: BLE001 - transport errors vary by backend; all are retried
                if attempt == self.retries:
                    raise StorageError(f"{what} failed after {attempt + 1} attempts: {exc}") from exc
                delay = self.backoff * (2**attempt)
                log.warning("%s failed (%s); retrying in %.2fs", what, exc, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def put_file(self, key: str, path: Path | str) -> tuple[str, int]:
        """Upload a local file; returns (sha256 hex, size in bytes) of what was uploaded."""
        path = Path(path)
        digest, size = file_sha256(path)
        self._retry(f"upload of {key}", lambda: self._put(_clean_key(key), path))
        return digest, size

    def put_bytes(self, key: str, data: bytes) -> tuple[str, int]:
        self._retry(f"upload of {key}", lambda: self._put_bytes(_clean_key(key), data))
        return hashlib.sha256(data).hexdigest(), len(data)

    def get_file(self, key: str, dest: Path | str) -> Path:
        """Download `key` to `dest` (written to a temporary name first, so a failed download leaves nothing)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")

        def attempt() -> None:
            self._get(_clean_key(key), tmp)
            tmp.replace(dest)

        try:
            self._retry(f"download of {key}", attempt)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def get_bytes(self, key: str) -> bytes:
        return self._retry(f"download of {key}", lambda: self._get_bytes(_clean_key(key)))

    def exists(self, key: str) -> bool:
        return self._retry(f"stat of {key}", lambda: self._exists(_clean_key(key)))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix` (a key prefix ending in '/'); returns how many."""
        return self._retry(f"delete of {prefix}", lambda: self._delete_prefix(_clean_key(prefix.rstrip("/")) + "/"))

    def presigned_get(self, key: str, seconds: int) -> str | None:
        """A URL anyone can GET for `seconds`; None for stores the API serves itself (file://)."""
        return None

    def ping(self) -> None:
        """Raise StorageError unless the store is reachable (for /readyz): one attempt, no retries."""
        try:
            self._ping()
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"store {self.url} unreachable: {exc}") from exc

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


class FileStore(Store):
    """A directory on a local (or shared network) file system."""

    def __init__(self, root: Path | str, **kw: float):
        super().__init__(**kw)
        self.root = Path(root)
        self.url = self.root.as_uri() if self.root.is_absolute() else f"file://{self.root}"

    def local_path(self, key: str) -> Path:
        return self.root / _clean_key(key)

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

    def _ping(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.root.is_dir():
            raise StorageError(f"{self.root} is not a directory")


class S3Store(Store):
    """A bucket (and key prefix) on an S3-compatible server, through the minio client."""

    def __init__(self, bucket: str, prefix: str, *, endpoint: str, access_key: str | None, secret_key: str | None,
                 secure: bool = False, region: str | None = None, timeout: float = 10.0, **kw: float):
        super().__init__(**kw)
        import urllib3
        from minio import Minio

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        # No retries inside urllib3: Store._retry owns the policy, so a down endpoint fails in bounded time.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(timeout, 5.0), read=timeout),
            retries=urllib3.Retry(total=0, connect=0, read=0, redirect=0),
            maxsize=8,
        )
        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure,
                            region=region, http_client=http)

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @staticmethod
    def _missing(exc: Exception) -> bool:
        return getattr(exc, "code", None) in ("NoSuchKey", "NoSuchBucket", "NoSuchObject")

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
            resp.close()
            resp.release_conn()

    def _get_bytes(self, key: str) -> bytes:
        resp = self._open(key)
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def _exists(self, key: str) -> bool:
        from minio.error import S3Error

        try:
            self.client.stat_object(self.bucket, self._name(key))
            return True
        except S3Error as exc:
            if self._missing(exc) or exc.code in ("NotFound", "ResourceNotFound"):
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

    def presigned_get(self, key: str, seconds: int) -> str:
        return self.client.presigned_get_object(self.bucket, self._name(_clean_key(key)), expires=timedelta(seconds=seconds))

    def _ping(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            raise StorageError(f"bucket {self.bucket!r} does not exist")


def open_store(url: str, *, s3_endpoint: str | None = None, s3_access_key: str | None = None,
               s3_secret_key: str | None = None, s3_secure: bool = False, s3_region: str | None = None,
               retries: int = 4, backoff: float = 0.5, timeout: float = 10.0) -> Store:
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
    from helip.settings import split_endpoint

    endpoint, secure = split_endpoint(settings.s3_endpoint_url) if settings.s3_endpoint_url else (None, False)
    return open_store(str(settings.storage_url), s3_endpoint=endpoint, s3_access_key=settings.s3_access_key,
                      s3_secret_key=settings.s3_secret_key, s3_secure=secure, s3_region=settings.s3_region,
                      retries=settings.store_retries, backoff=settings.store_backoff_seconds)


# -- download links for file:// stores (the API streams the file; the link works like a presigned URL) ------
#
# The token is Fernet (AES-CBC + HMAC-SHA256, from the `cryptography` package): authenticated *and*
# encrypted, so a link says nothing about the job or file it names (a signed-only token, e.g. itsdangerous,
# would carry the job id in readable base64). The expiry is inside the encrypted payload.


def _fernet(secret: bytes) -> "Fernet":
    from cryptography.fernet import Fernet
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"helip download links").derive(secret)
    return Fernet(base64.urlsafe_b64encode(key))


def sign_key(secret: bytes, key: str, seconds: int, *, now: float | None = None) -> str:
    """An opaque token naming `key` that expires in `seconds`."""
    payload = json.dumps({"k": _clean_key(key), "e": int((now if now is not None else time.time()) + seconds)},
                         separators=(",", ":")).encode()
    return _fernet(secret).encrypt(payload).decode().rstrip("=")


def verify_token(secret: bytes, token: str, *, now: float | None = None) -> str:
    """The key a token names; StorageError(code="invalid_token"/"expired_token") when forged or expired."""
    from cryptography.fernet import InvalidToken

    if len(token) > 4096:
        raise StorageError("malformed download token", code="invalid_token")
    try:
        payload = _fernet(secret).decrypt(token + "=" * (-len(token) % 4))
        data = json.loads(payload)
        key, expires = str(data["k"]), int(data["e"])
    except (InvalidToken, ValueError, KeyError, TypeError) as exc:
        raise StorageError("invalid download token", code="invalid_token") from exc
    if (now if now is not None else time.time()) > expires:
        raise StorageError("download link expired", code="expired_token")
    return _clean_key(key)
