"""The training pairs' row index over a CSV file or webdataset shards: stable row numbers, bad rows recorded."""

from __future__ import annotations

import csv
import io
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Any, cast

import numpy as np

from core import io as dio
from core.errors import DataError, HelipError, LocationError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_TAR_BLOCK = 512
# webdataset's rule: the key is the path up to the first dot of the file name, the rest is the extension.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclass
class PairIndex:
    keys: list[str]  # the sample's own key (webdataset __key__) or the CSV image path
    captions: list[str]
    sources: list[str]  # where the image bytes are: an image file location, or a tar shard location
    offsets: np.ndarray  # int64 [N]: byte offset of the image member in its shard; -1 = whole file
    sizes: np.ndarray  # int64 [N]: byte size of the member (-1 = whole file)
    bad: dict[int, str]  # row -> reason; bad rows KEEP their row number (indices stay stable)
    shard_errors: dict[str, str] = field(default_factory=dict)  # shard -> what went wrong (truncated, unreadable)

    def __len__(self) -> int:
        return len(self.keys)

    def valid_mask(self) -> np.ndarray:
        mask = np.ones(len(self), dtype=bool)
        if self.bad:
            mask[np.fromiter(self.bad.keys(), dtype=np.int64)] = False
        return mask

    def mark_bad(self, row: int, reason: str) -> None:
        self.bad.setdefault(int(row), reason)  # the first reason found is the one reported

    def report(self) -> dict[str, int]:
        out = {"rows": len(self), "bad": len(self.bad)}
        out.update(sorted(Counter(self.bad.values()).items()))
        if self.shard_errors:
            out["shards_with_errors"] = len(self.shard_errors)
        return out


class _Builder:
    """Accumulates rows; bad rows keep a row (with an empty source) so that row numbers never shift."""

    def __init__(self, max_caption_chars: int):
        self.max_chars = max_caption_chars
        self.keys: list[str] = []
        self.captions: list[str] = []
        self.sources: list[str] = []
        self.offsets: list[int] = []
        self.sizes: list[int] = []
        self.bad: dict[int, str] = {}

    def add(self, key: str, caption: str | None, source: str, offset: int, size: int,
            reason: str | None = None) -> int:
        row = len(self.keys)
        if reason is None:
            reason = self._caption_problem(caption)
        self.keys.append(key)
        self.captions.append((caption or "")[: self.max_chars])
        self.sources.append(source)
        self.offsets.append(offset)
        self.sizes.append(size)
        if reason is not None:
            self.bad[row] = reason
        return row

    def _caption_problem(self, caption: str | None) -> str | None:
        if caption is None:
            return "missing caption"
        if not caption.strip():
            return "empty caption"
        if len(caption) > self.max_chars:
            return "caption too long"
        return None

    def build(self, shard_errors: dict[str, str]) -> PairIndex:
        return PairIndex(self.keys, self.captions, self.sources, np.asarray(self.offsets, dtype=np.int64),
                         np.asarray(self.sizes, dtype=np.int64), self.bad, shard_errors)


def build_index(location: str, *, access: dio.Access, csv_img_key: str = "filepath",
                csv_caption_key: str = "title", csv_separator: str = "\t", max_caption_chars: int = 10_000,
                param: str = "data.train") -> PairIndex:
    """Index every sample once, in a stable order (CSV rows; shard order then member order for tars)."""
    norm = access.check(location, param=param)
    base = norm.lower()
    builder = _Builder(max_caption_chars)
    shard_errors: dict[str, str] = {}
    if base.endswith((".csv", ".tsv")):
        _index_csv(norm, access, builder, csv_img_key, csv_caption_key, csv_separator, param)
    elif base.endswith(".tar"):
        for shard in dio.expand_braces(norm, param=param):
            err = _index_shard(shard, access, builder, param)
            if err:
                shard_errors[shard] = err
    else:
        raise DataError(f"{location!r}: the format is chosen by the extension: .csv, .tsv or .tar "
                        "(webdataset shards, brace patterns allowed)", param=param)
    if not builder.keys:
        raise DataError(f"{location!r}: the data set is empty", param=param)
    return builder.build(shard_errors)


def _sibling(param: str, name: str) -> str:
    """data.train -> data.csv_img_key; eval.retrieval.0.data -> eval.retrieval.0.csv_img_key."""
    head, _, _ = param.rpartition(".")
    return f"{head}.{name}" if head else name


def _index_csv(location: str, access: dio.Access, b: _Builder, img_key: str, cap_key: str, sep: str,
               param: str) -> None:
    if len(sep) != 1:
        raise DataError(f"csv_separator must be one character, not {sep!r}", param=_sibling(param, "csv_separator"))
    # csv's default field limit (128 KiB) would abort the whole file on one huge caption; such a caption
    # must become one bad row instead, so the limit is raised (process-wide, it only ever grows).
    csv.field_size_limit(max(csv.field_size_limit(), 64 * 1024 * 1024))
    folder = dio.dirname(location)
    local = not dio.is_s3(location)
    with dio.open_binary(location, access, param=param) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")
        reader = csv.reader(text, delimiter=sep)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{location!r}: the CSV file is empty", param=param)
        header = [h.strip().lstrip("\ufeff") for h in header]
        for key, name in ((img_key, "csv_img_key"), (cap_key, "csv_caption_key")):
            if key not in header:
                raise DataError(f"{location!r} has no column {key!r} (columns: {header[:20]})",
                                param=_sibling(param, name))
        ic, cc = header.index(img_key), header.index(cap_key)
        for line_no, rec in enumerate(reader, start=2):
            if not rec:
                continue  # a blank line is not a sample
            path = rec[ic].strip() if ic < len(rec) else ""
            caption = rec[cc] if cc < len(rec) else None
            if not path:
                b.add("", caption, "", -1, -1, reason="missing image")
                continue
            try:
                src = access.check(dio.join(folder, path), param=param)
            except LocationError as exc:
                raise LocationError(f"{location!r} line {line_no}: {exc.message}", param=param) from None
            reason = None
            if local and not os.path.isfile(src):  # cheap for local files; S3 misses surface at load time
                reason = "missing image"
            b.add(path, caption, src, -1, -1, reason=reason)


class _TailReader:
    """Counts the bytes a streaming tar reader consumed and keeps the most recent ones (to see the end marker)."""

    def __init__(self, raw: Any):
        self.raw, self.pos, self.window, self.window_start = raw, 0, bytearray(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.window += data
        self.pos += len(data)
        if len(self.window) > 8 * tarfile.RECORDSIZE:
            cut = len(self.window) - 4 * tarfile.RECORDSIZE
            del self.window[:cut]
            self.window_start += cut
        return data

    def block_at(self, offset: int) -> bytes:
        i = offset - self.window_start
        return bytes(self.window[i:i + _TAR_BLOCK]) if i >= 0 else b""

    def drain(self) -> int:
        while self.raw.read(1 << 20):
            pass
        return self.pos


def _index_shard(shard: str, access: dio.Access, b: _Builder, param: str) -> str | None:
    """Index one tar shard in a single streaming pass; returns what went wrong with the shard, if anything."""
    pending: dict[str, Any] | None = None
    spans: list[tuple[int, int]] = []  # (row, end byte of the sample's last member) to find truncated data

    def flush() -> None:
        nonlocal pending
        if pending is None:
            return
        if "reason" in pending:
            reason = pending["reason"]
        elif "offset" not in pending:
            reason = "missing image"
        else:
            reason = None
        row = b.add(pending["key"], pending.get("caption"), shard, pending.get("offset", -1),
                    pending.get("size", -1), reason=reason)
        spans.append((row, pending["end"]))
        pending = None

    error: str | None = None
    with dio.open_binary(shard, access, param=param) as raw:
        tail = _TailReader(raw)
        tf = None
        try:
            # tarfile's own 10 KiB buffer: its stream slices the buffer on every read, so bigger is slower.
            tf = tarfile.open(fileobj=cast(IO[bytes], tail), mode="r|")
            for member in tf:
                if not member.isfile():
                    continue
                m = _KEY_EXT.match(member.name)
                if not m:
                    continue
                key, ext = m.group(1), m.group(2).lower()
                if pending is not None and pending["key"] != key:
                    flush()
                if pending is None:
                    pending = {"key": key, "end": 0}
                pending["end"] = max(pending["end"], member.offset_data + member.size)
                if ext in IMAGE_EXTS and "offset" not in pending:
                    pending["offset"], pending["size"] = member.offset_data, member.size
                elif ext == "txt":
                    if member.size > 4 * b.max_chars + 4:  # UTF-8: at most 4 bytes a character
                        pending["reason"] = "caption too long"
                        continue
                    fileobj = tf.extractfile(member)  # a regular member (isfile above): never None
                    data = fileobj.read() if fileobj is not None else b""
                    try:
                        pending["caption"] = data.decode("utf-8")
                    except UnicodeDecodeError:
                        pending["reason"] = "caption not utf-8"
            end_block = tail.block_at(tf.offset)
            if len(end_block) < _TAR_BLOCK:
                error = "truncated (no end-of-archive marker)"
            elif any(end_block):
                error = "corrupt tar header; the rest of the shard is unreadable"
        except tarfile.ReadError as exc:
            error = f"truncated or unreadable ({exc})"
            if tf is None:
                error = f"not a tar file or empty ({exc})"
        except HelipError:
            raise
        except (tarfile.TarError, EOFError, OSError) as exc:
            error = f"unreadable ({exc})"
        if error and pending is not None and ("offset" not in pending or "caption" not in pending):
            pending["reason"] = "truncated shard"  # the sample being read when the shard broke off
        flush()
        total = tail.drain()
    # Any sample whose bytes run past what the shard holds was cut off: it is bad, but keeps its row.
    for row, end in spans:
        if end > total:
            b.bad.setdefault(row, "truncated shard")
            error = error or "truncated"
    return error


# ----------------------------------------------------------------------------------------------------------
