"""The read functions jobs use: every one re-checks the access rules; S3 calls go through core.s3's retries."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

from core import s3
from core.braces import BracePattern
from core.errors import DataError, HelipError, LocationError, StorageError
from core.io.access import Access
from core.io.local import HANDLES, open_local_fd
from core.io.locations import is_s3, split_s3
from core.s3 import S3Config

T = TypeVar("T")


def _cfg(access: Access) -> S3Config:
    """The S3 configuration of an access that already passed its check (which refuses s3:// without one)."""
    if access.s3 is None:
        raise LocationError("no S3 server is configured (HELIP_S3_ENDPOINT_URL)")
    return access.s3


def _s3_call(fn: Callable[[], T], cfg: S3Config, location: str, param: str | None) -> T:
    """One S3 request under the retry policy; its final failure mapped to a domain error."""
    try:
        return s3.call(fn, cfg, what=location)
    except HelipError:  # raised on purpose inside `fn` (e.g. over a size limit)
        raise
    except Exception as exc:
        raise _domain_error(exc, cfg, location, param) from None


def _domain_error(exc: Exception, cfg: S3Config, location: str, param: str | None) -> Exception:
    code = s3.error_code(exc)
    if code in s3.MISSING:
        return LocationError(f"{location}: not found", param=param)
    if code in s3.DENIED:
        return LocationError(f"{location}: cannot be read ({code})", param=param)
    if code in s3.CREDENTIALS:
        return StorageError(f"{location}: the S3 credentials were refused ({code})")
    if s3.is_transient(exc):
        return StorageError(f"{location}: S3 request failed after {cfg.attempts} attempts ({s3.describe(exc)})")
    if code is not None:  # an S3 answer we do not retry
        return StorageError(f"{location}: S3 refused the request ({code})")
    return exc  # not an S3 failure: a bug, raised as it is


class _S3Stream(io.RawIOBase):
    """A streaming GET that resumes from its position (Range request) when the connection drops."""

    def __init__(self, cfg: S3Config, location: str, offset: int = 0, length: int | None = None,
                 param: str | None = None):
        self._cfg, self._client, self._location, self._param = cfg, s3.s3_client(cfg), location, param
        self._bucket, self._key = split_s3(location)
        self._pos, self._end = offset, (offset + length if length is not None else None)
        self._resp: Any = None
        self._resp = _s3_call(self._get, cfg, location, param)

    def _get(self) -> Any:
        length = 0 if self._end is None else self._end - self._pos
        return self._client.get_object(self._bucket, self._key, offset=self._pos, length=length)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        want = len(buf)
        if self._end is not None:
            want = min(want, self._end - self._pos)
        if want <= 0:
            return 0

        def attempt() -> bytes:
            try:
                if self._resp is None:
                    self._resp = self._get()  # resume where the dropped connection broke off
                return self._resp.read(want)
            except Exception:
                s3.close_response(self._resp)
                self._resp = None
                raise

        data = _s3_call(attempt, self._cfg, f"{self._location} (at byte {self._pos})", self._param)
        n = len(data)
        buf[:n] = data
        self._pos += n
        return n

    def close(self) -> None:
        s3.close_response(self._resp)
        self._resp = None
        super().close()


def _single(location: str, access: Access, param: str | None) -> str:
    """Check a location that must name one object (a brace pattern that expands is refused)."""
    norm = access.check(location, param=param)
    if "{" in norm and len(BracePattern(norm, param=param)) > 1:
        raise LocationError(f"{location!r} names several objects; one was expected", param=param)
    return norm


def open_binary(location: str, access: Access, *, param: str | None = None) -> BinaryIO:
    """A streaming reader (buffered). S3: one GET that resumes on a dropped connection."""
    norm = _single(location, access, param)
    if is_s3(norm):
        return io.BufferedReader(_S3Stream(_cfg(access), norm, param=param), buffer_size=1 << 20)
    return os.fdopen(open_local_fd(norm, access, location, param), "rb", buffering=1 << 20)


def read_range(location: str, offset: int, length: int, access: Access, *, param: str | None = None) -> bytes:
    """Bytes [offset, offset+length) (fewer at end of file). Local files stay open in a per-process LRU."""
    if offset < 0 or length < 0:
        raise DataError(f"{location}: invalid byte range {offset}+{length}", param=param)
    if length == 0:
        return b""
    norm = _single(location, access, param)
    if is_s3(norm):
        bucket, key = split_s3(norm)
        client = s3.s3_client(_cfg(access))

        def get() -> bytes:
            resp = client.get_object(bucket, key, offset=offset, length=length)
            try:
                return resp.read()
            finally:
                s3.close_response(resp)

        return _s3_call(get, _cfg(access), norm, param)
    fd = HANDLES.get(norm, access, location, param)
    return os.pread(fd, length, offset)


def read_bytes(location: str, access: Access, *, max_bytes: int | None = None, param: str | None = None) -> bytes:
    """The whole object; DataError when it is larger than `max_bytes` (checked before reading it)."""
    norm = _single(location, access, param)
    if is_s3(norm):
        bucket, key = split_s3(norm)
        client = s3.s3_client(_cfg(access))

        def get() -> bytes:
            resp = client.get_object(bucket, key)
            try:
                size = int(resp.headers.get("content-length", -1))
                if max_bytes is not None and size > max_bytes:
                    raise DataError(f"{location}: {size} bytes is over the limit of {max_bytes}", param=param)
                return resp.read()
            finally:
                s3.close_response(resp)

        data = _s3_call(get, _cfg(access), norm, param)
    else:
        with os.fdopen(open_local_fd(norm, access, location, param), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if max_bytes is not None and size > max_bytes:
                raise DataError(f"{location}: {size} bytes is over the limit of {max_bytes}", param=param)
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise DataError(f"{location}: over the limit of {max_bytes} bytes", param=param)
    return data


def stat_size(location: str, access: Access, *, param: str | None = None) -> int:
    """Size in bytes; LocationError when missing or unreadable."""
    norm = _single(location, access, param)
    if is_s3(norm):
        bucket, key = split_s3(norm)
        client = s3.s3_client(_cfg(access))
        return int(_s3_call(lambda: client.stat_object(bucket, key), _cfg(access), norm, param).size or 0)
    fd = open_local_fd(norm, access, location, param)
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def list_dir(location: str, access: Access, *, param: str | None = None) -> list[str]:
    """Immediate children of a local directory or s3 prefix, sorted; sub-directories end with '/'."""
    norm = _single(location, access, param)
    if is_s3(norm):
        bucket, key = split_s3(norm)
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        client = s3.s3_client(_cfg(access))

        def listing() -> list[str]:
            # The listing is paged lazily: materialise it inside the retried call.
            return [o.object_name[len(prefix):] for o in client.list_objects(bucket, prefix=prefix)]

        names = _s3_call(listing, _cfg(access), norm, param)
        return sorted(n for n in names if n and n != "/")
    if not os.path.isdir(norm):
        raise LocationError(f"{location}: not a directory", param=param)
    try:
        with os.scandir(norm) as it:
            return sorted(e.name + "/" if e.is_dir() else e.name for e in it)
    except OSError as exc:
        raise LocationError(f"{location}: cannot be listed ({exc.strerror})", param=param) from None
