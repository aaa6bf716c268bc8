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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, TypeVar
from urllib.parse import unquote, urlsplit

from core.braces import BracePattern, expand_braces  # noqa: F401 - expand_braces is part of this API
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
        path = unquote(parts.path)
        if "\x00" in path:  # %00: the decoded path would be cut short by the OS
            raise ValueError("contains a NUL character")
        return "local", path
    # pipe:, http(s):, ftp:, gs:, hf-hub: ... are never opened: no shell, no requests to arbitrary hosts.
    raise ValueError(f"the scheme '{scheme}:' is not supported (use a local path, file:/// or s3://)")


def _within(path: str, prefix: str) -> bool:
    """Whole-component prefix test: /srv/data2 is not under /srv/data."""
    prefix = prefix.rstrip("/")
    return path == prefix or path.startswith(prefix + "/") or prefix == ""


# A brace pattern whose directories cannot be told apart without expanding it (a group holding '/') is
# checked item by item, and so may name at most this many locations.
ITEMWISE_LIMIT = 10_000


@dataclass(frozen=True)
class Access:
    """What a job may read: `allowed` prefixes (None: anything, for the local CLI) minus `denied` ones.

    `denied` names the service's own state (database, broker, store, secrets, work directories): never
    readable as job data, whatever `allowed` says. `denied_except` re-opens sub-trees of a denied prefix
    (the data directory's `datasets/` folder inside the denied data directory).
    """

    allowed: tuple[str, ...] | None = None
    s3: S3Config | None = None
    denied: tuple[str, ...] = ()
    denied_except: tuple[str, ...] = ()
    _local: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())
    _s3: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())
    _deny_local: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())
    _deny_s3: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())
    _except_local: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())
    _except_s3: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        for name, values, param in (("allowed", self.allowed, "HELIP_ALLOWED_DATA"), ("denied", self.denied, None),
                                    ("denied_except", self.denied_except, None)):
            if values is None:
                continue
            local, remote = _normalise_prefixes(values, param)
            object.__setattr__(self, name, tuple(values))
            attr = {"allowed": ("_local", "_s3"), "denied": ("_deny_local", "_deny_s3"),
                    "denied_except": ("_except_local", "_except_s3")}[name]
            object.__setattr__(self, attr[0], local)
            object.__setattr__(self, attr[1], remote)

    @property
    def restricted(self) -> bool:
        return self.allowed is not None or bool(self.denied)

    def check(self, location: str, *, param: str | None) -> str:
        """The normalised location (absolute local path or s3://bucket/key), or LocationError naming `param`.

        A brace pattern is returned as a pattern (local: made absolute, not resolved). It is checked without
        expanding it: each directory it names once, and its last component for names that climb ('..').
        """
        if not isinstance(location, str) or not location.strip():
            raise LocationError("empty location", param=param)
        try:
            kind, value = _split_prefix(location)
        except ValueError as exc:
            raise LocationError(f"{location!r}: {exc}", param=param) from None
        if "{" in value:
            pattern = BracePattern(value, param=param)
            if not (len(pattern) == 1 and pattern.first() == value):
                self._check_pattern(location, kind, pattern, param)
                return "s3://" + value if kind == "s3" else self._absolute(location, value, param)
        if kind == "s3":
            return self._check_s3(location, value, param)
        return self._check_local(location, value, param)

    def _check_pattern(self, location: str, kind: str, pattern: BracePattern, param: str | None) -> None:
        split = pattern.split_dir()
        if split is not None:
            dirs, last = split
            if last.can_be_dot_name():
                raise LocationError(f"{location!r}: a pattern may not name '.' or '..'", param=param)
            if len(dirs) <= ITEMWISE_LIMIT and all(self._dir_ok(kind, d, last) for d in dirs.expand()):
                return
        # A group spans directories, or a directory is not wholly allowed: check every location it names.
        if len(pattern) > ITEMWISE_LIMIT:
            raise LocationError(f"{location!r}: a pattern whose brace groups span directories, or whose "
                                f"directories are not wholly allowed, may name at most {ITEMWISE_LIMIT} "
                                "locations", param=param)
        for item in pattern.expand():
            self.check("s3://" + item if kind == "s3" else item, param=param)

    def _dir_ok(self, kind: str, directory: str, last: BracePattern) -> bool:
        """Whether every name `last` can give is readable inside `directory` (False: check item by item)."""
        if kind == "s3":
            bucket, _, keydir = directory.partition("/")
            if not _BUCKET.match(bucket) or ".." in keydir.split("/") or self.s3 is None:
                return False
            parent = f"{bucket}/{keydir}".rstrip("/")
            probe = parent + "/\x00"  # any name inside `parent`
            rules = (self._s3, self._deny_s3, self._except_s3)
        else:
            if not os.path.isabs(os.path.expanduser(directory or ".")) and self.restricted:
                return False
            parent = os.path.realpath(os.path.expanduser(directory or "."))
            probe = parent.rstrip("/") + "/\x00"
            rules = (self._local, self._deny_local, self._except_local)
        allowed, denied, exempt = rules
        if self.allowed is not None and not any(_within(probe, p) for p in allowed):
            return False
        # A denied prefix directly inside `parent` could be one of the names: check those item by item.
        for d in denied:
            if _within(probe, d) and not any(_within(probe, e) for e in exempt):
                return False
            if d.rstrip("/").rpartition("/")[0] == parent.rstrip("/"):
                return False
        return True

    def _absolute(self, location: str, value: str, param: str | None) -> str:
        path = os.path.expanduser(value)
        if self.restricted and not os.path.isabs(path):
            raise LocationError(f"{location!r}: the service only reads absolute paths (or file:/// or s3:// "
                                "locations)", param=param)
        return os.path.abspath(path)

    def _check_s3(self, location: str, value: str, param: str | None) -> str:
        bucket, _, key = value.partition("/")
        if not _BUCKET.match(bucket):
            raise LocationError(f"{location!r}: invalid bucket name", param=param)
        if ".." in key.split("/"):
            raise LocationError(f"{location!r}: '..' is not allowed in an S3 key", param=param)
        if self.s3 is None:
            raise LocationError(f"{location!r}: no S3 server is configured (HELIP_S3_ENDPOINT_URL)", param=param)
        name = f"{bucket}/{key}"
        if self.allowed is not None and not any(_within(name, p) for p in self._s3):
            raise LocationError(f"{location!r} is outside the allowed data prefixes", param=param)
        if _denied(name, self._deny_s3, self._except_s3):
            raise LocationError(f"{location!r} is the service's own storage, not job data", param=param)
        return f"s3://{bucket}/{key}"

    def _check_local(self, location: str, value: str, param: str | None) -> str:
        path = self._absolute(location, value, param)
        if not self.restricted:
            return path
        # realpath resolves `..` and every symlink, so a link pointing out of an allowed directory is caught.
        real = os.path.realpath(path)
        self._check_real(real, location, param)
        return real

    def _check_real(self, real: str, location: str, param: str | None) -> None:
        if _denied(real, self._deny_local, self._except_local):
            raise LocationError(f"{location!r} is the service's own state, not job data", param=param)
        if self.allowed is not None and not any(_within(real, p) for p in self._local):
            raise LocationError(f"{location!r} is outside the allowed data prefixes", param=param)

    def local_allowed(self, real_path: str) -> bool:
        """Whether an already resolved local path lies under an allowed local prefix and under no denied one."""
        if _denied(real_path, self._deny_local, self._except_local):
            return False
        return self.allowed is None or any(_within(real_path, p) for p in self._local)


def _normalise_prefixes(values: tuple[str, ...], param: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Prefixes as (resolved local paths, "bucket/key" S3 names)."""
    local: list[str] = []
    remote: list[str] = []
    for prefix in values:
        try:
            kind, value = _split_prefix(prefix)
        except ValueError as exc:
            raise LocationError(f"data prefix {prefix!r}: {exc}", param=param) from None
        if kind == "s3":
            bucket, _, key = value.partition("/")
            if not bucket or ".." in key.split("/"):
                raise LocationError(f"data prefix {prefix!r} is not s3://bucket/prefix/", param=param)
            remote.append(bucket + "/" + key.rstrip("/"))
        else:
            # Resolve the directory itself, so that a symlinked data root still matches.
            local.append(os.path.realpath(os.path.expanduser(value)))
    return tuple(local), tuple(remote)


def _denied(name: str, denied: tuple[str, ...], exempt: tuple[str, ...]) -> bool:
    return any(_within(name, d) for d in denied) and not any(_within(name, e) for e in exempt)


# ----------------------------------------------------------------------------------------------------------
# Location strings


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


def s3_client(cfg: S3Config) -> "minio.Minio":
    """A minio client for `cfg`, cached per config and per process (a forked worker builds its own pool)."""
    return _client(cfg, os.getpid())


@functools.lru_cache(maxsize=16)
def _client(cfg: S3Config, pid: int) -> "minio.Minio":
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
    if access.restricted:
        # Resolve before opening: opening (and closing) a file can itself do harm, e.g. closing any descriptor
        # of a SQLite database drops this process's locks on it. A name swapped in later is caught below.
        access._check_real(os.path.realpath(path), location, param)
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
        if access.restricted and os.path.exists(f"/proc/self/fd/{fd}"):
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
    if "{" in norm and len(BracePattern(norm, param=param)) > 1:
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
