"""The dashboard's bounded caches: stored files copied from a remote store, and rendered thumbnails."""

from __future__ import annotations

import hashlib
from pathlib import Path


class _RemoteStore:
    """A store that has no local paths (like S3): files are fetched with get_file."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.fetched: list[str] = []

    def local_path(self, key: str) -> None:
        return None

    def get_file(self, key: str, dest: Path) -> Path:
        self.fetched.append(key)
        dest.write_bytes(self.files[key])
        return dest


def test_the_dashboards_caches_are_bounded(tmp_path: Path):
    from api.job_data import LocalCopies
    from api.thumbnails import ThumbnailCache

    files = {f"jobs/j/{n}.bin": bytes([n]) * 400 for n in range(4)}
    store = _RemoteStore({**files, "jobs/j/big.bin": b"x" * 2000})
    copies = LocalCopies(tmp_path / "cache", max_bytes=1000)
    sha = {k: hashlib.sha256(v).hexdigest() for k, v in store.files.items()}
    for key in list(files)[:2]:
        assert copies.path(store, key, sha[key], 400).read_bytes() == files[key]
    assert copies.path(store, "jobs/j/0.bin", sha["jobs/j/0.bin"], 400) is not None
    assert store.fetched == ["jobs/j/0.bin", "jobs/j/1.bin"]  # the second ask for 0 came from the disk copy
    copies.path(store, "jobs/j/2.bin", sha["jobs/j/2.bin"], 400)  # 1200 > 1000: the least recently used goes
    kept = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(kept) == 2 and f"{sha['jobs/j/1.bin']}.bin" not in kept
    assert copies.path(store, "jobs/j/big.bin", sha["jobs/j/big.bin"], 2000) is None  # larger than the cache
    assert "jobs/j/big.bin" not in store.fetched

    thumbs = ThumbnailCache(max_bytes=100)
    for row in range(5):
        thumbs.put(("job", row, 64), bytes(30))
    assert thumbs.size_bytes <= 100 and thumbs.get(("job", 0, 64)) is None and thumbs.get(("job", 4, 64)) is not None
    thumbs.put(("job", 9, 64), bytes(101))  # larger than the whole cache: not kept
    assert thumbs.get(("job", 9, 64)) is None
