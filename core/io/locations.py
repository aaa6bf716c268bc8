"""Location strings: the schemes a job may use (a local path, file:///, s3://), joining and splitting them."""

from __future__ import annotations

import os
import posixpath
import re
from urllib.parse import unquote, urlsplit

from core.errors import LocationError

SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def split_prefix(text: str) -> tuple[str, str]:
    """A location as ("local", path) or ("s3", "bucket/key"); other schemes raise ValueError with a reason."""
    if "\x00" in text:
        raise ValueError("contains a NUL character")
    m = SCHEME.match(text)
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


def within(path: str, prefix: str) -> bool:
    """Whole-component prefix test: /srv/data2 is not under /srv/data."""
    prefix = prefix.rstrip("/")
    return path == prefix or path.startswith(prefix + "/") or prefix == ""


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
    if SCHEME.match(rel) or rel.startswith("/"):
        return rel
    if is_s3(base):
        bucket, key = split_s3(base)
        return f"s3://{bucket}/{_norm_key(posixpath.join(key, rel))}"
    if base.lower().startswith("file:"):
        base = split_prefix(base)[1]
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
        location = split_prefix(location)[1]
    return os.path.dirname(os.path.abspath(os.path.expanduser(location)))
