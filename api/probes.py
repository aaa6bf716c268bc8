"""Cheap looks into a job's data at submit time, so that a job that cannot run fails now and not after the queue.

Each probe reads at most a few range requests from the start of one file (through core.io, with the same
access rules as the job): a CSV's header line, the first tar shard's first sample. Nothing here imports
torch; the worker still reads (and checks) everything for real.
"""

from __future__ import annotations

import csv
import io
import re
import tarfile

from core.errors import DataError
from core.io import Access, read_range

PROBE_BYTES = 64 * 1024  # one read: a header line, or the first members of a shard
MAX_PROBE_BYTES = 4 * 1024 * 1024  # a first sample whose image is larger than this is not looked past
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # core.data reads these (same list)
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset: key = path up to the first dot of the name
FORMATS = ".csv, .tsv or .tar (webdataset shards, brace patterns allowed)"


def data_format(location: str) -> str:
    """'csv' or 'tar' from the extension, as the worker decides; a DataError otherwise."""
    low = location.lower()
    if low.endswith((".csv", ".tsv")):
        return "csv"
    if low.endswith(".tar"):
        return "tar"
    ext = low.rsplit("/", 1)[-1].rpartition(".")[2]
    what = f"a .{ext} file" if ext and "." in low.rsplit("/", 1)[-1] else "a location without an extension"
    raise DataError(f"{location!r} is {what}; the data format is chosen by the extension: {FORMATS}")


def csv_header(location: str, access: Access, *, separator: str, param: str) -> list[str]:
    """The column names of a CSV/TSV file (its first line)."""
    if len(separator) != 1:
        raise DataError(f"csv_separator must be one character, not {separator!r}", param=_sibling(param, "csv_separator"))
    head = read_range(location, 0, PROBE_BYTES, access, param=param)
    if not head.strip():
        raise DataError(f"{location!r}: the CSV file is empty", param=param)
    line = head.decode("utf-8", errors="replace").splitlines()[0]
    row = next(csv.reader(io.StringIO(line), delimiter=separator), [])
    return [h.strip().lstrip("\ufeff") for h in row]


def check_csv_columns(location: str, access: Access, *, separator: str, img_key: str, caption_key: str,
                      param: str) -> None:
    header = csv_header(location, access, separator=separator, param=param)
    for key, name in ((img_key, "csv_img_key"), (caption_key, "csv_caption_key")):
        if key not in header:
            shown = ", ".join(repr(h) for h in header[:20])
            raise DataError(f"{location!r} has no column {key!r} (its columns: {shown}; separator "
                            f"{separator!r})", param=_sibling(param, name))


def check_first_sample(shard: str, access: Access, *, param: str) -> None:
    """The first shard holds webdataset samples: its first key has an image member and a .txt caption."""
    window, start, offset, key, exts, complete = b"", 0, 0, None, set(), False
    while True:
        if offset + 512 > start + len(window):
            if offset >= MAX_PROBE_BYTES:
                break  # a huge first member: what was seen has to do
            window, start = read_range(shard, offset, PROBE_BYTES, access, param=param), offset
            if len(window) < 512:
                complete = key is not None
                break
        block = window[offset - start:offset - start + 512]
        if not any(block):
            complete = True  # end-of-archive marker
            break
        try:
            info = tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
        except tarfile.TarError:
            raise DataError(f"{shard!r} is not a tar file (webdataset shards are tar archives)", param=param) from None
        offset += 512 + (info.size + 511) // 512 * 512
        m = _KEY_EXT.match(info.name) if info.isfile() else None
        if not m:
            continue
        if key is not None and m.group(1) != key:
            complete = True  # the first sample ended
            break
        key = m.group(1)
        exts.add(m.group(2).lower())
    if key is None:
        if complete or offset < MAX_PROBE_BYTES:
            raise DataError(f"{shard!r}: the first shard has no samples (expected members like KEY.jpg and "
                            "KEY.txt)", param=param)
        return
    if complete and not exts & set(IMAGE_EXTS):
        raise DataError(f"{shard!r}: the first sample ({key!r}) has no image member ({', '.join(IMAGE_EXTS)}); "
                        f"it has {sorted(exts)}", param=param)
    if complete and "txt" not in exts:
        raise DataError(f"{shard!r}: the first sample ({key!r}) has no caption member (.txt); it has {sorted(exts)}",
                        param=param)


def _sibling(param: str, name: str) -> str:
    """data.train -> data.csv_img_key; eval.retrieval.0.data -> eval.retrieval.0.csv_img_key."""
    head, _, _ = param.rpartition(".")
    return f"{head}.{name}" if head else name
