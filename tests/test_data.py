"""core.data: CSV and webdataset indexes, bad samples with stable rows, image loading, datasets, S3 parity."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core import data as dd
from core.data import BadSample, PairDataset, build_index, collate_pairs, load_image
from core.errors import DataError, LocationError
from core.io import Access
from tests import test_io
from tests.test_io import _put

weed_s3 = test_io.weed_s3  # the module-scoped real S3 fixture, shared with tests/test_io.py

torch.set_num_threads(1)

N = 12  # synthetic pairs, 6 per shard


def _pixels(i: int) -> np.ndarray:
    """A 10x12 image unique to pair i: a colour plus a position-dependent pattern (so crops would show)."""
    y, x = np.mgrid[0:10, 0:12]
    return np.stack([(x * 20 + i) % 256, (y * 25 + 7 * i) % 256, np.full_like(x, 17 * i % 256)], -1).astype(np.uint8)


def _png(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "PNG")
    return b.getvalue()


def _key(i: int) -> str:
    return f"{i:09d}"  # img2dataset's shard-prefixed keys


def _caption(i: int) -> str:
    return f"a photo of thing {i}\twith a tab"  # a tab: the CSV writer must quote it


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _write_shard(path: Path, members: list[tuple[str, bytes]]) -> bytes:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            _add(tf, name, data)
    return path.read_bytes()


def _sample(i: int) -> list[tuple[str, bytes]]:
    return [(f"{_key(i)}.png", _png(_pixels(i))), (f"{_key(i)}.txt", _caption(i).encode()),
            (f"{_key(i)}.json", b'{"url": "x"}')]


def _write_csv(path: Path, rows: list[tuple[str, str]], header=("filepath", "title")) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture()
def pairs(tmp_path):
    """The same N pairs as two webdataset shards and as a CSV with relative image paths."""
    wds = tmp_path / "wds"
    wds.mkdir()
    for s in range(2):
        _write_shard(wds / f"{s:05d}.tar", [m for i in range(6 * s, 6 * s + 6) for m in _sample(i)])
    (tmp_path / "csv" / "images").mkdir(parents=True)
    for i in range(N):
        (tmp_path / "csv" / "images" / f"{_key(i)}.png").write_bytes(_png(_pixels(i)))
    _write_csv(tmp_path / "csv" / "train.csv", [(f"images/{_key(i)}.png", _caption(i)) for i in range(N)])
    return tmp_path


def _to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def _tokens(texts: list[str]) -> torch.Tensor:
    """A stand-in tokenizer: [len, first char code, 0...] per text, context length 8."""
    out = torch.zeros(len(texts), 8, dtype=torch.long)
    for j, t in enumerate(texts):
        out[j, 0], out[j, 1] = len(t), ord(t[0]) if t else 0
    return out


# ----------------------------------------------------------------------------------------------------------
# Indexes


def test_csv_and_webdataset_agree_in_a_stable_order(pairs):
    access = Access(allowed=(str(pairs),))
    wds = build_index(f"{pairs}/wds/{{00000..00001}}.tar", access=access)
    csv_ = build_index(str(pairs / "csv" / "train.csv"), access=access)
    assert wds.keys == [_key(i) for i in range(N)]
    assert [Path(k).stem for k in csv_.keys] == wds.keys
    assert csv_.captions == wds.captions == [_caption(i) for i in range(N)]
    assert not wds.bad and not csv_.bad and not wds.shard_errors
    assert wds.sources[:6] == [str(pairs / "wds" / "00000.tar")] * 6
    assert (csv_.offsets == -1).all() and (wds.offsets >= 512).all()
    again = build_index(f"{pairs}/wds/{{00000..00001}}.tar", access=access)
    assert again.keys == wds.keys and (again.offsets == wds.offsets).all() and (again.sizes == wds.sizes).all()


def test_member_offsets_point_at_the_image_bytes(pairs):
    index = build_index(f"{pairs}/wds/00000.tar", access=Access())
    raw = (pairs / "wds" / "00000.tar").read_bytes()
    for row in range(6):
        off, size = int(index.offsets[row]), int(index.sizes[row])
        assert raw[off:off + size] == _png(_pixels(row))


@pytest.mark.parametrize("fmt", ["wds", "csv"])
def test_load_image_returns_the_rows_pixels(pairs, fmt):
    loc = f"{pairs}/wds/{{00000..00001}}.tar" if fmt == "wds" else str(pairs / "csv" / "train.csv")
    access = Access(allowed=(str(pairs),))
    index = build_index(loc, access=access)
    for row in range(N):
        im = load_image(index, row, access)
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), _pixels(row))


def test_jpeg_member_decodes_like_pil(tmp_path):
    b = io.BytesIO()
    Image.fromarray(_pixels(3)).save(b, "JPEG", quality=90)
    _write_shard(tmp_path / "a.tar", [("k.jpg", b.getvalue()), ("k.txt", b"c")])
    index = build_index(str(tmp_path / "a.tar"), access=Access())
    ref = np.asarray(Image.open(io.BytesIO(b.getvalue())).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(load_image(index, 0, Access())), ref)


def test_local_shard_is_opened_once_for_many_reads(pairs, monkeypatch):
    from core.io import local

    local.HANDLES.clear()
    opened = []
    real = local.open_local_fd
    monkeypatch.setattr(local, "open_local_fd", lambda p, *a: opened.append(p) or real(p, *a))
    index = build_index(f"{pairs}/wds/{{00000..00001}}.tar", access=Access())
    opened.clear()
    for _ in range(3):
        for row in range(N):
            load_image(index, row, Access())
    assert sorted(opened) == [str(pairs / "wds" / "00000.tar"), str(pairs / "wds" / "00001.tar")]


# ----------------------------------------------------------------------------------------------------------
# Bad samples keep their rows


def _huge_dims_png() -> bytes:
    """A valid 1x1 PNG whose header claims 50000x50000 pixels: a decompression bomb to refuse."""
    data = bytearray(_png(np.zeros((1, 1, 3), np.uint8)))
    ihdr = bytearray(data[16:29])  # IHDR body: width, height, depth, colour, ...
    ihdr[0:8] = struct.pack(">II", 50000, 50000)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def test_bad_samples_are_counted_with_reasons_and_rows_stay(tmp_path):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    members = [
        *_sample(0),                                                        # row 0 good
        ("000000001.txt", b"no image here"),                                # row 1 missing image
        ("000000002.jpg", b"this is not an image"), ("000000002.txt", b"c2"),  # row 2 bad at load time
        (f"{_key(3)}.png", _png(_pixels(3))), (f"{_key(3)}.txt", b"   "),  # row 3 empty caption
        (f"{_key(4)}.png", _png(_pixels(4))), (f"{_key(4)}.txt", b"x" * 101),  # row 4 caption too long
        (f"{_key(5)}.png", _png(_pixels(5))),                               # row 5 missing caption
        ("000000006.jpg", eps), ("000000006.txt", b"c6"),                   # row 6 EPS: never handed to PIL's EPS
        ("000000007.png", _huge_dims_png()), ("000000007.txt", b"c7"),     # row 7 decompression bomb
        *_sample(8),                                                        # row 8 good
    ]
    _write_shard(tmp_path / "00000.tar", members)
    index = build_index(str(tmp_path / "00000.tar"), access=Access(), max_caption_chars=100)
    assert index.keys == [_key(i) for i in range(9)]
    assert index.bad == {1: "missing image", 3: "empty caption", 4: "caption too long", 5: "missing caption"}
    assert index.report() == {"rows": 9, "bad": 4, "caption too long": 1, "empty caption": 1,
                              "missing caption": 1, "missing image": 1}
    np.testing.assert_array_equal(index.valid_mask(), [i not in (1, 3, 4, 5) for i in range(9)])
    np.testing.assert_array_equal(np.asarray(load_image(index, 8, Access())), _pixels(8))
    expected = {1: "missing image", 2: "not an image", 3: "empty caption", 6: "not an image", 7: "image too large"}
    for row, reason in expected.items():
        with pytest.raises(BadSample) as e:
            load_image(index, row, Access())
        assert (e.value.row, e.value.reason) == (row, reason)
    index.mark_bad(2, "not an image")
    index.mark_bad(2, "something else")  # the first reason stays
    assert index.bad[2] == "not an image" and index.report()["not an image"] == 1


def _three_sample_shard(tmp_path: Path) -> tuple[bytes, list[int]]:
    """A shard of samples 0..2 and the byte offset where each sample's first header starts."""
    raw = _write_shard(tmp_path / "full.tar", [m for i in range(3) for m in _sample(i)])
    starts = []
    with tarfile.open(tmp_path / "full.tar") as tf:
        for m in tf.getmembers():
            if m.name.endswith(".png"):
                starts.append(m.offset)
    return raw, starts


def test_truncated_shards(tmp_path):
    raw, starts = _three_sample_shard(tmp_path)
    _write_shard(tmp_path / "after.tar", _sample(3))
    index_full = build_index(str(tmp_path / "full.tar"), access=Access())
    png_off = int(index_full.offsets[2])
    cases = {
        "mid_image": (png_off + 10, {2: "truncated shard"}, 3),  # cut inside sample 2's image bytes
        "boundary": (starts[2], {}, 2),  # cut exactly between samples: no end-of-archive marker
        "mid_header": (starts[2] + 100, {}, 2),
    }
    for name, (cut, bad, rows) in cases.items():
        (tmp_path / f"{name}.tar").write_bytes(raw[:cut])
        index = build_index(f"{tmp_path}/{{{name},after}}.tar", access=Access())
        assert len(index) == rows + 1, name
        assert index.keys[:rows] == [_key(i) for i in range(rows)]
        assert index.keys[rows] == _key(3)  # the next shard is still read, after the broken one
        assert index.bad == bad, name
        assert list(index.shard_errors) == [str(tmp_path / f"{name}.tar")], name
        assert index.report()["shards_with_errors"] == 1
        np.testing.assert_array_equal(np.asarray(load_image(index, 1, Access())), _pixels(1))
        np.testing.assert_array_equal(np.asarray(load_image(index, rows, Access())), _pixels(3))


def test_garbage_inside_a_shard_is_reported(tmp_path):
    raw, starts = _three_sample_shard(tmp_path)
    broken = raw[:starts[1]] + b"\x7fgarbage" * 64 + raw[starts[1] + 512:]
    (tmp_path / "broken.tar").write_bytes(broken)
    index = build_index(str(tmp_path / "broken.tar"), access=Access())
    assert index.keys == [_key(0)] and not index.bad
    assert "corrupt" in index.shard_errors[str(tmp_path / "broken.tar")]


def test_empty_and_unknown_inputs(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(DataError) as e:
        build_index(str(tmp_path / "empty.tar"), access=Access(), param="data.train")
    assert e.value.param == "data.train"
    _write_csv(tmp_path / "header_only.csv", [])
    with pytest.raises(DataError):
        build_index(str(tmp_path / "header_only.csv"), access=Access())
    with pytest.raises(DataError) as e:
        build_index(str(tmp_path / "data.parquet"), access=Access())
    assert e.value.param == "data.train"
    with pytest.raises(LocationError) as e:
        build_index(str(tmp_path / "missing.tar"), access=Access())
    assert e.value.param == "data.train"


# ----------------------------------------------------------------------------------------------------------
# CSV specifics


def test_csv_missing_columns_name_the_field(pairs):
    access = Access()
    with pytest.raises(DataError) as e:
        build_index(str(pairs / "csv" / "train.csv"), access=access, csv_img_key="image")
    assert e.value.param == "data.csv_img_key"
    with pytest.raises(DataError) as e:
        build_index(str(pairs / "csv" / "train.csv"), access=access, csv_caption_key="caption",
                    param="eval.retrieval.0.data")
    assert e.value.param == "eval.retrieval.0.csv_caption_key"
    with pytest.raises(DataError) as e:
        build_index(str(pairs / "csv" / "train.csv"), access=access, csv_separator=";;")
    assert e.value.param == "data.csv_separator"


def test_csv_rows_bad_and_refused(pairs):
    d = pairs / "csv"
    long_caption = "y" * 200_000  # over csv's default field limit: one bad row, not a failed file
    _write_csv(d / "mixed.csv", [
        ("images/000000000.png", "multi\nline caption"),
        ("images/nope.png", "missing file"),
        ("", "no path"),
        ("images/000000001.png", ""),
        ("images/000000002.png", long_caption),
        (str(d / "images" / "000000003.png"), "absolute path"),
    ])
    access = Access(allowed=(str(pairs),))
    index = build_index(str(d / "mixed.csv"), access=access)
    assert index.captions[0] == "multi\nline caption"
    assert index.bad == {1: "missing image", 2: "missing image", 3: "empty caption", 4: "caption too long"}
    np.testing.assert_array_equal(np.asarray(load_image(index, 5, access)), _pixels(3))
    (pairs / "secret.png").write_bytes(_png(_pixels(9)))
    _write_csv(d / "evil.csv", [("images/000000000.png", "ok"), ("../../secret.png", "escape")])
    with pytest.raises(LocationError) as e:
        build_index(str(d / "evil.csv"), access=Access(allowed=(str(d),)), param="data.train")
    assert e.value.param == "data.train" and "line 3" in e.value.message


def test_csv_image_deleted_after_indexing_is_a_bad_sample(pairs):
    index = build_index(str(pairs / "csv" / "train.csv"), access=Access())
    (pairs / "csv" / "images" / f"{_key(4)}.png").unlink()
    with pytest.raises(BadSample) as e:
        load_image(index, 4, Access())
    assert e.value.reason == "missing image"


# ----------------------------------------------------------------------------------------------------------
# Datasets


def test_dataloader_with_two_workers(pairs):
    _write_shard(pairs / "wds" / "00002.tar", [("000000012.png", b"junk"), ("000000012.txt", b"bad image"),
                                             *_sample(13)])
    access = Access(allowed=(str(pairs),))
    index = build_index(f"{pairs}/wds/{{00000..00002}}.tar", access=access)
    ds = PairDataset(index, access, _to_tensor, _tokens)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_pairs,
                                         shuffle=False)
    seen, bad = [], []
    for batch in loader:
        assert batch["images"].shape[1:] == (3, 10, 12) and batch["texts"].shape[1] == 8
        for img, text, row in zip(batch["images"], batch["texts"], batch["rows"].tolist(), strict=True):
            np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), _pixels(row))
            assert int(text[0]) == len(index.captions[row])
            seen.append(row)
        bad.extend(batch["bad_rows"])
    assert seen == [r for r in range(14) if r != 12]
    assert bad == [(12, "not an image")]


def test_dataset_rows_subset_and_empty_batch(pairs):
    index = build_index(f"{pairs}/wds/00000.tar", access=Access())
    index.mark_bad(1, "not an image")
    ds = PairDataset(index, Access(), _to_tensor, _tokens, rows=np.array([4, 1, 2]))
    items = [ds[i] for i in range(len(ds))]
    assert len(ds) == 3 and items[0]["row"] == 4 and items[1] == {"bad": (1, "not an image")} and items[2]["row"] == 2
    batch = collate_pairs(items)
    assert batch["rows"].tolist() == [4, 2] and batch["bad_rows"] == [(1, "not an image")]
    empty = collate_pairs([ds[1]])
    assert len(empty["rows"]) == 0 and empty["bad_rows"] == [(1, "not an image")]


def test_image_folder_and_image_list_dataset(tmp_path):
    root = tmp_path / "shapes"
    for c, cls in enumerate(["square", "circle"]):
        (root / cls).mkdir(parents=True)
        for j in range(2):
            (root / cls / f"{j}.png").write_bytes(_png(_pixels(10 * c + j)))
    (root / "circle" / "notes.txt").write_text("not an image")
    (root / "square" / "2.jpg").write_bytes(b"broken")
    access = Access(allowed=(str(tmp_path),))
    items, classes = dd.read_image_folder(str(root), access, param="eval.zeroshot.0.root")
    assert classes == ["circle", "square"]
    assert items == [(str(root / "circle" / "0.png"), 0), (str(root / "circle" / "1.png"), 0),
                     (str(root / "square" / "0.png"), 1), (str(root / "square" / "1.png"), 1),
                     (str(root / "square" / "2.jpg"), 1)]
    ds = dd.ImageListDataset([p for p, _ in items], [c for _, c in items], access, _to_tensor)
    np.testing.assert_array_equal(ds[1][0].permute(1, 2, 0).numpy(), _pixels(11))
    assert ds[4] is None
    batch = dd.collate_images([ds[i] for i in range(5)])
    assert batch["labels"].tolist() == [0, 0, 1, 1] and batch["skipped"] == 1
    with pytest.raises(DataError) as e:
        dd.read_image_folder(str(root / "circle"), access, param="eval.zeroshot.0.root")
    assert e.value.param == "eval.zeroshot.0.root"
    with pytest.raises(LocationError):
        dd.read_image_folder("/etc", access, param="eval.zeroshot.0.root")


# ----------------------------------------------------------------------------------------------------------
# The same data through a real S3 server


def test_s3_gives_identical_results(pairs, weed_s3):
    cfg = weed_s3
    for s in range(2):
        _put(cfg, f"s3://helip-data/ok/wds/{s:05d}.tar", (pairs / "wds" / f"{s:05d}.tar").read_bytes())
    for i in range(N):
        _put(cfg, f"s3://helip-data/ok/csv/images/{_key(i)}.png", (pairs / "csv" / "images" / f"{_key(i)}.png").read_bytes())
    _put(cfg, "s3://helip-data/ok/csv/train.csv", (pairs / "csv" / "train.csv").read_bytes())
    access = Access(allowed=("s3://helip-data/ok/",), s3=cfg)
    local = build_index(f"{pairs}/wds/{{00000..00001}}.tar", access=Access())
    remote = build_index("s3://helip-data/ok/wds/{00000..00001}.tar", access=access)
    assert remote.keys == local.keys and remote.captions == local.captions
    assert (remote.offsets == local.offsets).all() and (remote.sizes == local.sizes).all()
    assert remote.sources[0] == "s3://helip-data/ok/wds/00000.tar" and not remote.bad
    remote_csv = build_index("s3://helip-data/ok/csv/train.csv", access=access)
    assert remote_csv.sources[3] == f"s3://helip-data/ok/csv/images/{_key(3)}.png"
    for row in (0, 5, 6, 11):
        np.testing.assert_array_equal(np.asarray(load_image(remote, row, access)), _pixels(row))
        np.testing.assert_array_equal(np.asarray(load_image(remote_csv, row, access)), _pixels(row))
    ds = PairDataset(remote, access, _to_tensor, _tokens, rows=np.arange(4))
    batch = collate_pairs([ds[i] for i in range(4)])
    assert batch["rows"].tolist() == [0, 1, 2, 3]
    grouped = collate_pairs(PairDataset(remote, access, _to_tensor, _tokens).__getitems__([11, 0, 5, 6]))
    singles = collate_pairs([PairDataset(local, Access(), _to_tensor, _tokens)[r] for r in (11, 0, 5, 6)])
    assert torch.equal(grouped["images"], singles["images"]) and grouped["rows"].tolist() == [11, 0, 5, 6]
    with pytest.raises(LocationError):  # a shard outside the allowed prefix
        build_index("s3://other-data/wds/00000.tar", access=access)


def test_grouped_reads_equal_row_reads_with_fewer_requests(pairs, tmp_path, monkeypatch):
    """A batch through __getitems__ reads each shard's nearby members with one range request and gives
    exactly what per-row reads give, bad rows included (a truncated shard's broken member, CSV rows)."""
    from core import decoding

    raw, _starts = _three_sample_shard(tmp_path)
    (tmp_path / "cut.tar").write_bytes(raw[:int(build_index(str(tmp_path / "full.tar"), access=Access()).offsets[2]) + 10])
    index = build_index(f"{pairs}/wds/{{00000..00001}}.tar", access=Access())
    rows = [5, 0, 11, 3, 3, 8, 1]  # shuffled, across both shards, one row twice (a target and a hard pair)
    calls: list[tuple[str, int, int]] = []
    real = decoding.dio.read_range

    def counting(loc, off, size, access, **kw):
        calls.append((loc, off, size))
        return real(loc, off, size, access, **kw)

    monkeypatch.setattr(decoding.dio, "read_range", counting)
    ds = PairDataset(index, Access(), _to_tensor, _tokens)
    grouped = ds.__getitems__(rows)
    n_grouped = len(calls)
    calls.clear()
    single = [ds[r] for r in rows]
    assert len(calls) == len(rows) and n_grouped == 2  # one request per shard instead of one per row
    for g, s in zip(grouped, single, strict=True):
        assert g["row"] == s["row"] and torch.equal(g["image"], s["image"]) and torch.equal(g["text"], s["text"])
    # a truncated shard: the broken member is bad with the same reason as alone, the others are read
    cut = build_index(str(tmp_path / "cut.tar"), access=Access())
    ds_cut = PairDataset(cut, Access(), _to_tensor, _tokens)
    got = ds_cut.__getitems__(list(range(len(cut))))
    assert [("bad" in s) for s in got] == [("bad" in ds_cut[r]) for r in range(len(cut))]
    assert any("bad" in s for s in got) and any("bad" not in s for s in got)
    # CSV rows (one file each) and a row the index already knows is bad
    csv_index = build_index(str(pairs / "csv" / "train.csv"), access=Access())
    csv_index.mark_bad(2, "not an image")
    ds_csv = PairDataset(csv_index, Access(), _to_tensor, _tokens)
    got = ds_csv.__getitems__([0, 2, 4])
    assert got[1] == {"bad": (2, "not an image")} and [s["row"] for s in (got[0], got[2])] == [0, 4]


def test_group_ranges_respect_gap_and_span(monkeypatch):
    from core import decoding

    class Index:
        sources = ["a.tar"] * 5 + ["b.tar"]
        offsets = np.array([0, 100, 10_000, 10_100, 50_000, 0])
        sizes = np.array([50, 50, 50, 50, 50, 50])
        bad: dict[int, str] = {}

    monkeypatch.setattr(decoding, "GROUP_GAP", 1000)
    monkeypatch.setattr(decoding, "GROUP_SPAN", 20_000)
    groups = decoding.group_ranges(Index(), [4, 3, 2, 1, 0, 5])  # type: ignore[arg-type]
    assert sorted(groups) == [[0, 1], [2, 3], [4], [5]]
    monkeypatch.setattr(decoding, "GROUP_GAP", 100_000)
    assert sorted(decoding.group_ranges(Index(), [0, 1, 2, 3, 4])) == [[0, 1, 2, 3], [4]]  # type: ignore[arg-type]
