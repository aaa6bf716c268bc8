"""Reading user data safely: location checks (HELIP_ALLOWED_DATA), brace expansion, local and S3 reads."""

from __future__ import annotations

import functools
import io
import os
import posixpath
import re
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar
from urllib.parse import unquote, urlsplit

from core.errors import DataError, HelipError, LocationError, StorageError

if TYPE_CHECKING:
    import minio

T = TypeVar("T")

# Transient S3 failures are retried this many times in all, sleeping S3_BACKOFF * 2**attempt between tries.
S3_ATTEMPTS = 4
S3_BACKOFF = 0.25
# Open local files (tar shards) kept per process, so a sample read is one pread, not open+read+close.
LOCAL_HANDLES = 64

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")
# S3 error codes that say "this object cannot be read by us", as opposed to a transient failure.
_S3_MISSING = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "NotFound", "ResourceNotFound"}
_S3_DENIED = {"AccessDenied", "AllAccessDisabled", "InvalidBucketName", "InvalidObjectName", "InvalidRange"}
_S3_CONFIG = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AuthorizationHeaderMalformed"}


# ----------------------------------------------------------------------------------------------------------
# Configuration and the access check


@dataclass(frozen=True)
class S3Config:
    endpoint: str  # "host:port" or "http(s)://host:port"
    access_key: str | None = None
    secret_key: str | None = None
    secure: bool = False  # derived from the endpoint's scheme when given as a URL
    region: str | None = None

    def __post_init__(self) -> None:
        if "://" in self.endpoint:
            parts = urlsplit(self.endpoint)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/"):
                raise StorageError(f"S3 endpoint must be host:port or http(s)://host:port, not {self.endpoint!r}")
            object.__setattr__(self, "secure", parts.scheme == "https")

    @property
    def host(self) -> str:
        """host:port, the form the minio client wants."""
        return urlsplit(self.endpoint).netloc if "://" in self.endpoint else self.endpoint


def _split_prefix(text: str) -> tuple[str, str]:
    """A location as ("local", path) or ("s3", "bucket/key"); other schemes raise ValueError with a reason."""
    if "\x00" in text:
        raise ValueError("contains a NUL character")
    m = _SCHEME.match(text)
    if not m:
        return "local", text
    scheme = m.group(1).lower()
    if scheme == "s3":
        if not text[3:].startswith("//"):
            raise ValueError("an S3 location is written s3://bucket/key")
        return "s3", text[5:]
    if scheme == "file":
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise ValueError("file:// URLs may not name a host")
        if parts.query or parts.fragment or not parts.path.startswith("/"):
            raise ValueError("a file URL is written file:///absolute/path")
        return "local", unquote(parts.path)
    # pipe:, http(s):, ftp:, gs:, hf-hub: ... are never opened: no shell, no requests to arbitrary hosts.
    raise ValueError(f"the scheme '{scheme}:' is not supported (use a local path, file:/// or s3://)")


def _within(path: str, prefix: str) -> bool:
    """Whole-component prefix test: /srv/data2 is not under /srv/data."""
    prefix = prefix.rstrip("/")
    return path == prefix or path.startswith(prefix + "/") or prefix == ""


@dataclass(frozen=True)
class Access:
    # None: read anything local or s3 (the local CLI); else prefixes like "s3://bucket/", "/srv/datasets/"
    allowed: tuple[str, ...] | None = None
    s3: S3Config | None = None
    _local: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())
    _s3: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        if self.allowed is None:
            return
        local: list[str] = []
        remote: list[str] = []
        for prefix in self.allowed:
            try:
                kind, value = _split_prefix(prefix)
            except ValueError as exc:
                raise LocationError(f"allowed data prefix {prefix!r}: {exc}", param="HELIP_ALLOWED_DATA") from None
            if kind == "s3":
                bucket, _, key = value.partition("/")
                if not bucket or ".." in key.split("/"):
                    raise LocationError(f"allowed data prefix {prefix!r} is not s3://bucket/prefix/",
                                        param="HELIP_ALLOWED_DATA")
                remote.append(bucket + "/" + key.rstrip("/"))
            else:
                # Resolve the allowed directory itself, so that a symlinked data root still matches.
                local.append(os.path.realpath(os.path.expanduser(value)))
        object.__setattr__(self, "allowed", tuple(self.allowed))
        object.__setattr__(self, "_local", tuple(local))
        object.__setattr__(self, "_s3", tuple(remote))

    def check(self, location: str, *, param: str | None) -> str:
        """The normalised location (absolute local path or s3://bucket/key), or LocationError naming `param`.

        A brace pattern is checked item by item and returned as a pattern (local: made absolute, not resolved).
        """
        if not isinstance(location, str) or not location.strip():
            raise LocationError("empty location", param=param)
        try:
            kind, value = _split_prefix(location)
        except ValueError as exc:
            raise LocationError(f"{location!r}: {exc}", param=param) from None
        if "{" in value:
            items = expand_braces(location, param=param)
            if len(items) > 1 or items[0] != location:
                for item in items:
                    self.check(item, param=param)
                return "s3://" + value if kind == "s3" else os.path.abspath(os.path.expanduser(value))
        if kind == "s3":
            return self._check_s3(location, value, param)
        return self._check_local(location, value, param)

    def _check_s3(self, location: str, value: str, param: str | None) -> str:
        bucket, _, key = value.partition("/")
        if not _BUCKET.match(bucket):
            raise LocationError(f"{location!r}: invalid bucket name", param=param)
        if ".." in key.split("/"):
            raise LocationError(f"{location!r}: '..' is not allowed in an S3 key", param=param)
        if self.s3 is None:
            raise LocationError(f"{location!r}: no S3 server is configured (HELIP_S3_ENDPOINT_URL)", param=param)
        if self.allowed is not None and not any(_within(f"{bucket}/{key}", p) for p in self._s3):
            raise LocationError(f"{location!r} is outside the allowed data prefixes", param=param)
        return f"s3://{bucket}/{key}"

    def _check_local(self, location: str, value: str, param: str | None) -> str:
        path = os.path.abspath(os.path.expanduser(value))
        if self.allowed is None:
            return path
        # realpath resolves `..` and every symlink, so a link pointing out of an allowed directory is caught.
        real = os.path.realpath(path)
        if not self.local_allowed(real):
            raise LocationError(f"{location!r} is outside the allowed data prefixes", param=param)
        return real

    def local_allowed(self, real_path: str) -> bool:
        """Whether an already resolved local path lies under an allowed local prefix."""
        return self.allowed is None or any(_within(real_path, p) for p in self._local)


# ----------------------------------------------------------------------------------------------------------
# Location strings


def expand_braces(pattern: str, *, limit: int = 1_000_000, param: str | None = None) -> list[str]:
    """Expand "{00000..00331}" (zero padding kept), "{a,b}", "{0..10..2}" and several (nested) groups, in order.

    A group that is neither a list nor a numeric range stays literal, as in bash. More than `limit`
    results raise LocationError before anything is materialised.
    """
    start = pattern.find("{")
    while start >= 0:
        end, commas = _match_brace(pattern, start)
        if end < 0:
            return [pattern]  # unbalanced: literal
        body = pattern[start + 1:end]
        prefix, suffix = pattern[:start], pattern[end + 1:]
        alts: list[str] | None = None
        if commas:
            alts = []
            for part in _split_top(body, commas):
                alts.extend(expand_braces(part, limit=limit, param=param))
                if len(alts) > limit:
                    break
        else:
            alts = _range(body, limit, param)
        if alts is None:  # literal group: keep its braces, expand what is inside it and after it
            inner = expand_braces(body, limit=limit, param=param)
            alts = ["{" + x + "}" for x in inner]
        tails = expand_braces(suffix, limit=limit, param=param)
        if len(alts) * len(tails) > limit:
            raise LocationError(f"the pattern {pattern!r} expands to more than {limit} locations", param=param)
        return [prefix + a + t for a in alts for t in tails]
    return [pattern]


def _match_brace(text: str, start: int) -> tuple[int, list[int]]:
    """Index of the brace closing text[start], and the positions of its top-level commas."""
    depth, commas = 0, []
    for i in range(start, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i, [p - start - 1 for p in commas]
        elif c == "," and depth == 1:
            commas.append(i)
    return -1, []


def _split_top(body: str, commas: list[int]) -> list[str]:
    bounds = [-1, *commas, len(body)]
    return [body[bounds[i] + 1:bounds[i + 1]] for i in range(len(bounds) - 1)]


def _range(body: str, limit: int, param: str | None) -> list[str] | None:
    m = _RANGE.match(body)
    if not m:
        return None
    a, b, s = m.group(1), m.group(2), m.group(3)
    lo, hi, step = int(a), int(b), abs(int(s)) if s else 1
    step = step or 1
    count = abs(hi - lo) // step + 1
    if count > limit:
        raise LocationError(f"the range {{{body}}} expands to more than {limit} locations", param=param)
    # Zero padding as bash and braceexpand do: when either end is written with a leading zero.
    padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (a, b))
    width = max(len(a), len(b)) if padded else 0
    values = range(lo, hi + 1, step) if hi >= lo else range(lo, hi - 1, -step)
    return [f"{v:0{width}d}" if width else str(v) for v in values]


def is_s3(location: str) -> bool:
    return location[:5].lower() == "s3://"


def split_s3(location: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key)."""
    if not is_s3(location):
        raise LocationError(f"{location!r} is not an s3:// location")
    bucket, _, key = location[5:].partition("/")
    return bucket, key


def join(base: str, rel: str) -> str:
    """Resolve `rel` against a directory `base` (local dir or s3 prefix); absolute paths and URLs win."""
    if _SCHEME.match(rel) or rel.startswith("/"):
        return rel
    if is_s3(base):
        bucket, key = split_s3(base)
        return f"s3://{bucket}/{_norm_key(posixpath.join(key, rel))}"
    if base.lower().startswith("file:"):
        base = _split_prefix(base)[1]
    return os.path.join(base, rel)


def _norm_key(key: str) -> str:
    """Collapse '.' and 'x/..' in an S3 key; a '..' that would climb above the bucket stays (and is refused)."""
    out: list[str] = []
    for part in key.split("/"):
        if part == ".":
            continue
        if part == ".." and out and out[-1] != "..":
            out.pop()
        else:
            out.append(part)
    return "/".join(out)


def dirname(location: str) -> str:
    """The directory (local) or prefix (s3) that holds `location`."""
    if is_s3(location):
        bucket, key = split_s3(location)
        return f"s3://{bucket}/{posixpath.dirname(key)}"
    if location.lower().startswith("file:"):
        location = _split_prefix(location)[1]
    return os.path.dirname(os.path.abspath(os.path.expanduser(location)))


# ----------------------------------------------------------------------------------------------------------
# S3 client and retries


def s3_client(cfg: S3Config) -> minio.Minio:
    """A minio client for `cfg`, cached per config and per process (a forked worker builds its own pool)."""
    return _client(cfg, os.getpid())


@functools.lru_cache(maxsize=16)
def _client(cfg: S3Config, pid: int) -> minio.Minio:
    import certifi
    import minio
    import urllib3

    http = urllib3.PoolManager(
        # minio's default waits 5 minutes to connect; a dead endpoint should fail in seconds and be retried.
        timeout=urllib3.Timeout(connect=10, read=120),
        maxsize=16,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        # Retries are ours (_s3_call); redirects are never followed, so no request goes to another host.
        retries=urllib3.Retry(total=0, redirect=0, raise_on_redirect=False, raise_on_status=False),
    )
    return minio.Minio(cfg.host, access_key=cfg.access_key, secret_key=cfg.secret_key, secure=cfg.secure,
                       region=cfg.region, http_client=http)


def _s3_call(fn: Callable[[], T], location: str, param: str | None) -> T:
    """Run one S3 request; retry transient failures with backoff, map the final error to a domain error."""
    from minio.error import S3Error

    last: BaseException | None = None
    for attempt in range(S3_ATTEMPTS):
        try:
            return fn()
        except S3Error as exc:
            if exc.code in _S3_MISSING:
                raise LocationError(f"{location}: not found", param=param) from None
            if exc.code in _S3_DENIED:
                raise LocationError(f"{location}: cannot be read ({exc.code})", param=param) from None
            if exc.code in _S3_CONFIG:
                raise StorageError(f"{location}: the S3 credentials were refused ({exc.code})") from None
            last = exc
        except HelipError:  # raised on purpose inside `fn` (e.g. over a size limit): not transient
            raise
        except Exception as exc:  # urllib3 / socket / minio ServerError: transient until proven otherwise
            last = exc
        if attempt + 1 < S3_ATTEMPTS:
            time.sleep(S3_BACKOFF * 2 ** attempt)
    raise StorageError(f"{location}: S3 request failed after {S3_ATTEMPTS} attempts: {last}")


class _S3Stream(io.RawIOBase):
    """A streaming GET that resumes from its position (Range request) when the connection drops."""

    def __init__(self, client: Any, location: str, offset: int = 0, length: int | None = None,
                 param: str | None = None):
        self._client, self._location, self._param = client, location, param
        self._bucket, self._key = split_s3(location)
        self._pos, self._end = offset, (offset + length if length is not None else None)
        self._resp: Any = None
        self._open()

    def _open(self) -> None:
        length = 0 if self._end is None else self._end - self._pos
        self._resp = _s3_call(lambda: self._client.get_object(self._bucket, self._key, offset=self._pos,
                                                              length=length),
                              self._location, self._param)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        want = len(buf)
        if self._end is not None:
            want = min(want, self._end - self._pos)
        if want <= 0:
            return 0
        for attempt in range(S3_ATTEMPTS):
            try:
                if self._resp is None:
                    self._open()
                data = self._resp.read(want)
                n = len(data)
                buf[:n] = data
                self._pos += n
                return n
            except HelipError:
                raise
            except Exception as exc:
                self._drop()
                if attempt + 1 == S3_ATTEMPTS:
                    raise StorageError(f"{self._location}: read failed at byte {self._pos}: {exc}") from None
                time.sleep(S3_BACKOFF * 2 ** attempt)
        return 0

    def _drop(self) -> None:
        if self._resp is not None:
            try:
                self._resp.close()
                self._resp.release_conn()
            except Exception:  # the connection is being discarded anyway
                pass
            self._resp = None

    def close(self) -> None:
        self._drop()
        super().close()


# ----------------------------------------------------------------------------------------------------------
# Local files


def _open_local_fd(path: str, access: Access, location: str, param: str | None) -> int:
    """Open a checked local path for reading; refuse non-regular files and re-check where the fd really points."""
    try:
        # O_NONBLOCK: opening a FIFO must not hang; it is refused below as not a regular file.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise LocationError(f"{location}: not found", param=param) from None
    except OSError as exc:
        raise LocationError(f"{location}: cannot be read ({exc.strerror})", param=param) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LocationError(f"{location}: not a regular file", param=param)
        if access.allowed is not None and os.path.exists(f"/proc/self/fd/{fd}"):
            # A path component swapped for a symlink between the check and the open is caught here.
            if not access.local_allowed(os.readlink(f"/proc/self/fd/{fd}")):
                raise LocationError(f"{location!r} is outside the allowed data prefixes", param=param)
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


class _HandleCache:
    """Per-process LRU of open local file descriptors, keyed by checked path; reads use pread (no seek state)."""

    def __init__(self, size: int):
        self._size, self._pid = size, os.getpid()
        self._fds: OrderedDict[tuple[str, Any], tuple[int, tuple[int, ...]]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _signature(st: os.stat_result) -> tuple[int, ...]:
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    def get(self, path: str, access: Access, location: str, param: str | None) -> int:
        # Keyed by the rules too: a descriptor opened without restrictions is never served to a restricted caller.
        key = (path, access.allowed)
        with self._lock:
            if self._pid != os.getpid():  # a forked worker: the parent's descriptors are not ours to track
                self._fds, self._pid = OrderedDict(), os.getpid()
            hit = self._fds.get(key)
            if hit is not None:
                try:
                    fresh = self._signature(os.stat(path)) == hit[1]
                except OSError:
                    fresh = False
                if fresh:
                    self._fds.move_to_end(key)
                    return hit[0]
                # Replaced or rewritten since it was opened (a long-lived worker, a new job): reopen.
                os.close(self._fds.pop(key)[0])
        fd = _open_local_fd(path, access, location, param)
        sig = self._signature(os.fstat(fd))
        with self._lock:
            if key in self._fds:  # another thread opened it meanwhile: keep one descriptor
                os.close(fd)
                return self._fds[key][0]
            self._fds[key] = (fd, sig)
            while len(self._fds) > self._size:
                os.close(self._fds.popitem(last=False)[1][0])
        return fd

    def clear(self) -> None:
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()


_HANDLES = _HandleCache(LOCAL_HANDLES)


def _single(location: str, access: Access, param: str | None) -> str:
    """Check a location that must name one object (a brace pattern that expands is refused)."""
    norm = access.check(location, param=param)
    if "{" in norm and len(expand_braces(norm, param=param)) > 1:
        raise LocationError(f"{location!r} names several objects; one was expected", param=param)
    return norm


# ----------------------------------------------------------------------------------------------------------
# The read functions: every one re-checks `access`.


def open_binary(location: str, access: Access, *, param: str | None = None) -> BinaryIO:
    """A streaming reader (buffered). S3: one GET that resumes on a dropped connection."""
    norm = _single(location, access, param)
    if is_s3(norm):
        return io.BufferedReader(_S3Stream(s3_client(access.s3), norm, param=param), buffer_size=1 << 20)
    return os.fdopen(_open_local_fd(norm, access, location, param), "rb", buffering=1 << 20)


def read_range(location: str, offset: int, length: int, access: Access, *, param: str | None = None) -> bytes:
    """Bytes [offset, offset+length) (fewer at end of file). Local files stay open in a per-process LRU."""
    if offset < 0 or length < 0:
        raise DataError(f"{location}: invalid byte range {offset}+{length}", param=param)
    if length == 0:
        return b""
    norm = _single(location, access, param)
    if is_s3(norm):
        bucket, key = split_s3(norm)
        client = s3_client(access.s3)

        def get() -> bytes:
            resp = client.get_object(bucket, key, offset=offset, length=length)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return _s3_call(get, norm, param)
    fd = _HANDLES.get(norm, access, location, param)
    return os.pread(fd, length, offset)


def read_bytes(location: str, access: Access, *, max_bytes: int | None = None, param: str | None = None) -> bytes:
    """The whole object; DataError when it is larger than `max_bytes` (checked before reading it)."""
    norm = _single(location, access, param)
    if is_s3(norm):
        bucket, key = split_s3(norm)
        client = s3_client(access.s3)

        def get() -> bytes:
            resp = client.get_object(bucket, key)
            try:
                size = int(resp.headers.get("content-length", -1))
                if max_bytes is not None and size > max_bytes:
                    raise DataError(f"{location}: {size} bytes is over the limit of {max_bytes}", param=param)
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        data = _s3_call(get, norm, param)
    else:
        with os.fdopen(_open_local_fd(norm, access, location, param), "rb") as f:
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
        client = s3_client(access.s3)
        return int(_s3_call(lambda: client.stat_object(bucket, key), norm, param).size)
    fd = _open_local_fd(norm, access, location, param)
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
        client = s3_client(access.s3)

        def listing() -> list[str]:
            # The listing is paged lazily: materialise it inside the retried call.
            return [o.object_name[len(prefix):] for o in client.list_objects(bucket, prefix=prefix)]

        names = _s3_call(listing, norm, param)
        return sorted(n for n in names if n and n != "/")
    if not os.path.isdir(norm):
        raise LocationError(f"{location}: not a directory", param=param)
    try:
        with os.scandir(norm) as it:
            return sorted(e.name + "/" if e.is_dir() else e.name for e in it)
    except OSError as exc:
        raise LocationError(f"{location}: cannot be listed ({exc.strerror})", param=param) from None
