"""Local files: opened only after the access check (and re-checked through /proc once open), never a FIFO or
a device; shard descriptors kept per process so a sample read is one pread, not open+read+close."""

from __future__ import annotations

import os
import stat
import threading
from collections import OrderedDict
from typing import Any

from core.errors import LocationError
from core.io.access import Access

# Open local files (tar shards) kept per process.
LOCAL_HANDLES = 64


def open_local_fd(path: str, access: Access, location: str, param: str | None) -> int:
    """Open a checked local path for reading; refuse non-regular files and re-check where the fd really points."""
    if access.restricted:
        # Resolve before opening: opening (and closing) a file can itself do harm, e.g. closing any descriptor
        # of a SQLite database drops this process's locks on it. A name swapped in later is caught below.
        access.check_real(os.path.realpath(path), location, param)
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


class HandleCache:
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
        fd = open_local_fd(path, access, location, param)
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


HANDLES = HandleCache(LOCAL_HANDLES)
