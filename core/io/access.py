"""What a job may read: allowed prefixes (HELIP_ALLOWED_DATA) minus the service's own state, brace patterns
checked by directory without expanding them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from core.braces import BracePattern
from core.errors import LocationError
from core.io.locations import BUCKET, split_prefix, within
from core.s3 import S3Config

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
    # hf-hub: prefixes a job may load a model from; None: any (the local CLI), () none
    models: tuple[str, ...] | None = None
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

    def model_allowed(self, name: str) -> bool:
        """Whether an `hf-hub:` model name is allowed (HELIP_ALLOWED_MODELS)."""
        return self.models is None or any(name.startswith(p) for p in self.models)

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
            kind, value = split_prefix(location)
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
            if not BUCKET.match(bucket) or ".." in keydir.split("/") or self.s3 is None:
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
        if self.allowed is not None and not any(within(probe, p) for p in allowed):
            return False
        # A denied prefix directly inside `parent` could be one of the names: check those item by item.
        for d in denied:
            if within(probe, d) and not any(within(probe, e) for e in exempt):
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
        if not BUCKET.match(bucket):
            raise LocationError(f"{location!r}: invalid bucket name", param=param)
        if ".." in key.split("/"):
            raise LocationError(f"{location!r}: '..' is not allowed in an S3 key", param=param)
        if self.s3 is None:
            raise LocationError(f"{location!r}: no S3 server is configured (HELIP_S3_ENDPOINT_URL)", param=param)
        name = f"{bucket}/{key}"
        if self.allowed is not None and not any(within(name, p) for p in self._s3):
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
        self.check_real(real, location, param)
        return real

    def check_real(self, real: str, location: str, param: str | None) -> None:
        if _denied(real, self._deny_local, self._except_local):
            raise LocationError(f"{location!r} is the service's own state, not job data", param=param)
        if self.allowed is not None and not any(within(real, p) for p in self._local):
            raise LocationError(f"{location!r} is outside the allowed data prefixes", param=param)

    def local_allowed(self, real_path: str) -> bool:
        """Whether an already resolved local path lies under an allowed local prefix and under no denied one."""
        if _denied(real_path, self._deny_local, self._except_local):
            return False
        return self.allowed is None or any(within(real_path, p) for p in self._local)


def _normalise_prefixes(values: tuple[str, ...], param: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Prefixes as (resolved local paths, "bucket/key" S3 names)."""
    local: list[str] = []
    remote: list[str] = []
    for prefix in values:
        try:
            kind, value = split_prefix(prefix)
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
    return any(within(name, d) for d in denied) and not any(within(name, e) for e in exempt)
