"""Tests for synthworld.world / synthworld.render: the synthetic world's determinism, captions, layout and caching."""

from __future__ import annotations

import colorsys
import json
import re
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import DataError, SpecError
from core.spec import EvalSpec, parse_spec
from synthworld.render import POSITION_PHRASES, SIZE_WORDS, encode_jpeg, unique_attributes, unique_combinations
from synthworld.world import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Attributes,
    World,
    caption,
    classnames,
    contact_sheet,
    describe,
    generate_world,
    load_world,
    render,
    sample_attributes,
)

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(120)

TINY = dict(n_train=200, n_retrieval=60, zeroshot_per_class=1, probe_per_class=(1, 1), shards=3, seed=7)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return generate_world(tmp_path_factory.mktemp("synth") / "world", **TINY)


def _has(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", text) is not None


def _read_csv(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "filepath\ttitle"
    return [tuple(line.split("\t")) for line in lines[1:]]


# ---------------------------------------------------------------- one sample


def test_sample_attributes_cover_vocab_and_distractors_differ_from_main():
    attrs = sample_attributes(np.random.default_rng(0), 3000)
    for name, vocab in (("shape", SHAPES), ("color", COLORS), ("position", POSITIONS), ("size", SIZES),
                        ("background", BACKGROUNDS)):
        assert {getattr(a, name) for a in attrs} == set(vocab)
    with_d = [a for a in attrs if a.has_distractor]
    assert 0.15 < len(with_d) / len(attrs) < 0.35
    assert all(a.distractor_color is not None for a in with_d)
    assert all((a.distractor_shape, a.distractor_color) != (a.shape, a.color) for a in with_d)
    assert all(a.distractor_color is None for a in attrs if not a.has_distractor)
    fixed = sample_attributes(np.random.default_rng(0), 50, shape="star", color="cyan")
    assert {a.classname for a in fixed} == {"cyan star"}
    with pytest.raises(ValueError):
        sample_attributes(np.random.default_rng(0), 1, shape="blob")


def test_render_is_deterministic_and_sized():
    a = Attributes("star", "red", "top left", "large", "navy", "circle", "green")
    one = encode_jpeg(render(a, np.random.default_rng(3)))
    two = encode_jpeg(render(a, np.random.default_rng(3)))
    other = encode_jpeg(render(a, np.random.default_rng(4)))
    assert one == two and one != other
    img = render(a, np.random.default_rng(3), image_size=48)
    assert img.size == (48, 48) and img.mode == "RGB"


def _object_mask(attrs: Attributes, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels far from the background colour: the object (slow, obvious reference from a flat background)."""
    arr = np.asarray(render(attrs, np.random.default_rng(seed), image_size=32), dtype=np.float32)
    corner = np.concatenate([arr[:3, :3].reshape(-1, 3), arr[-3:, -3:].reshape(-1, 3),
                             arr[:3, -3:].reshape(-1, 3), arr[-3:, :3].reshape(-1, 3)])
    bg = np.median(corner, axis=0)
    mask = np.linalg.norm(arr - bg, axis=-1) > 60
    return mask, arr


def test_render_draws_the_stated_position_size_and_color():
    """Every attribute is visible: centroid in the stated region, area grows with size, hue nearest its colour."""
    from synthworld.render import _COLOR_HSV

    rng = np.random.default_rng(11)
    areas: dict[str, list[int]] = {s: [] for s in SIZES}
    hue_hits = total = 0
    for i in range(300):
        a = sample_attributes(rng, 1)[0]
        a = Attributes(a.shape, a.color, a.position, a.size, a.background)  # no distractor
        mask, arr = _object_mask(a, i)
        if mask.sum() < 6:  # e.g. a dark purple on navy: too little contrast for this reference to see
            continue
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean() / 31, ys.mean() / 31
        if a.position == "center":
            assert abs(cx - 0.5) < 0.15 and abs(cy - 0.5) < 0.15, (a, cx, cy)
        else:
            assert (cy < 0.5) == a.position.startswith("top"), (a, cx, cy)
            assert (cx < 0.5) == a.position.endswith("left"), (a, cx, cy)
        areas[a.size].append(int(mask.sum()))
        r, g, b = (arr[mask].mean(axis=0) / 255).tolist()
        h = colorsys.rgb_to_hsv(r, g, b)[0]
        dist = {c: min(abs(h - hsv[0]), 1 - abs(h - hsv[0])) for c, hsv in _COLOR_HSV.items()}
        hue_hits += min(dist, key=dist.get) == a.color
        total += 1
    assert total > 250
    mean = {s: np.mean(v) for s, v in areas.items()}
    assert mean["small"] < mean["medium"] < mean["large"], mean
    # Mostly right, not always: edge pixels blend with the background, and that ambiguity is intended.
    assert hue_hits / total > 0.8, hue_hits / total


def test_captions_name_only_true_attributes_in_varied_phrasings():
    rng = np.random.default_rng(5)
    attrs = sample_attributes(rng, 800)
    texts = [caption(a, rng) for a in attrs]
    omitted = {"size": 0, "position": 0, "background": 0}
    for a, t in zip(attrs, texts, strict=True):
        assert _has(t, a.color) and _has(t, a.shape), t
        named_colors = {c for c in COLORS if _has(t, c)}
        assert named_colors <= {a.color, a.distractor_color}, t
        assert {s for s in SHAPES if _has(t, s)} <= {a.shape, a.distractor_shape}, t
        sizes = {s for s, words in SIZE_WORDS.items() if any(_has(t, w) for w in words)}
        positions = {p for p, words in POSITION_PHRASES.items() if any(_has(t, w) for w in words)}
        backgrounds = {b for b in BACKGROUNDS if _has(t, b)}
        assert sizes <= {a.size} and positions <= {a.position} and backgrounds <= {a.background}, t
        omitted["size"] += not sizes
        omitted["position"] += not positions
        omitted["background"] += not backgrounds
        assert "\t" not in t and "\n" not in t
    # Real alt-text leaves things out, so identical captions occur; but most captions name each attribute.
    for k, n in omitted.items():
        assert 0.05 * len(texts) < n < 0.5 * len(texts), (k, n)
    assert len(set(texts)) < len(texts)
    assert sum("," in t for t in texts) > 100  # tag-list style present
    assert len({t.split(" ")[0] for t in texts}) >= 5  # several openings
    # Same generator state, same caption.
    assert caption(attrs[0], np.random.default_rng(1)) == caption(attrs[0], np.random.default_rng(1))


def test_describe_names_every_attribute():
    a = Attributes("hexagon", "orange", "bottom right", "small", "beige", "cross", "blue")
    assert describe(a) == "a small orange hexagon in the bottom right on a beige background next to a tiny blue cross"
    b = Attributes("circle", "red", "center", "large", "black")
    assert describe(b) == "a large red circle in the center on a black background"


def test_unique_attributes_never_repeat_a_combination():
    attrs = unique_attributes(np.random.default_rng(0), 2000)
    keys = {(a.shape, a.color, a.position, a.size, a.background) for a in attrs}
    assert len(keys) == 2000
    assert len({describe(a) for a in attrs}) == 2000
    assert len(unique_attributes(np.random.default_rng(0), unique_combinations())) == unique_combinations()
    with pytest.raises(ValueError):
        unique_attributes(np.random.default_rng(0), unique_combinations() + 1)


# ---------------------------------------------------------------- the world on disk


def test_layout_and_counts(world):
    root = world.root
    meta = json.loads((root / "world.json").read_text())
    assert meta["params"]["n_train"] == 200 and meta["params"]["seed"] == 7
    assert meta["vocab"]["shapes"] == list(SHAPES)
    rows = _read_csv(world.train_csv)
    assert len(rows) == 200 and world.counts["train"] == 200
    assert all((world.train_csv.parent / p).is_file() for p, _ in rows)
    assert rows[0][0] == "train/000000000.jpg"
    assert len(list((root / "train").iterdir())) == 200
    assert world.train_shards.endswith("train-shards/{00000..00002}.tar")
    assert sorted(p.name for p in (root / "train-shards").iterdir()) == ["00000.tar", "00001.tar", "00002.tar"]
    folders = sorted(p.name for p in world.zeroshot_root.iterdir())
    assert len(folders) == len(SHAPES) * len(COLORS) == 48
    assert all(len(list((world.zeroshot_root / f).glob("*.jpg"))) == 1 for f in folders)
    assert world.counts["probe_train"] == world.counts["probe_test"] == 48
    for d in (world.probe_train, world.probe_test):
        assert sorted(p.name for p in d.iterdir()) == folders
    assert len(_read_csv(world.retrieval_csv)) == 60
    with Image.open(root / "train" / "000000005.jpg") as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    with Image.open(root / "preview.png") as im:
        assert im.size[0] > 300
    assert not list(root.parent.glob(".world.tmp-*"))  # the temporary dir is gone


def test_classnames_follow_imagefolder_order_and_eval_spec_validates(world):
    folders = sorted(p.name for p in world.zeroshot_root.iterdir())
    assert world.classnames == [f.replace("_", " ") for f in folders] == classnames()
    assert "red circle" in world.classnames
    assert all(_has(t, "{c}") or "{c}" in t for t in world.templates)
    spec = world.eval_spec()
    EvalSpec.model_validate(spec)  # the job spec accepts it as is
    job = parse_spec({"model": {"name": "tiny"}, "data": world.data_spec(), "eval": spec})
    assert job.eval.zeroshot[0].classnames == world.classnames
    assert job.data.train == str(world.train_csv)
    assert world.data_spec(source="shards")["train"] == world.train_shards
    with pytest.raises(SpecError) as err:
        world.data_spec(source="s3")
    assert err.value.param == "source"


def test_csv_rows_and_shard_samples_are_identical_in_order(world):
    rows = _read_csv(world.train_csv)
    seen = []
    for shard in sorted((world.root / "train-shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
            for i in range(0, len(members), 3):
                jpg, txt, meta = members[i: i + 3]
                key = jpg.name[:-4]
                assert (txt.name, meta.name) == (f"{key}.txt", f"{key}.json")
                text = tar.extractfile(txt).read().decode()
                info = json.loads(tar.extractfile(meta).read())
                path, title = rows[len(seen)]
                assert path == f"train/{key}.jpg" and title == text
                assert tar.extractfile(jpg).read() == (world.train_csv.parent / path).read_bytes()
                assert info["key"] == key and info["caption"] == text
                assert _has(text, info["color"]) and _has(text, info["shape"])
                seen.append(key)
    assert seen == [f"{i:09d}" for i in range(200)]


def test_retrieval_captions_unique_and_complete(world):
    rows = _read_csv(world.retrieval_csv)
    titles = [t for _, t in rows]
    assert len(set(titles)) == len(titles) == 60
    for t in titles:
        assert sum(_has(t, b) for b in BACKGROUNDS) == 1 and sum(_has(t, s) for s in SIZES) == 1
    assert all((world.retrieval_csv.parent / p).is_file() for p, _ in rows)


def test_second_call_is_fast_and_equal(world):
    stamp = (world.root / "world.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = generate_world(world.root, **TINY)
    assert time.perf_counter() - t0 < 0.5
    assert again == world == load_world(world.root)
    assert (world.root / "world.json").stat().st_mtime_ns == stamp


def test_same_seed_same_bytes_independent_of_workers_and_other_splits(tmp_path, world):
    small = dict(TINY, n_train=40, shards=2)
    a = generate_world(tmp_path / "a", **small)
    b = generate_world(tmp_path / "b", **dict(small, n_retrieval=10), workers=2)
    c = generate_world(tmp_path / "c", **dict(small, seed=8))
    assert a.train_csv.read_bytes() == b.train_csv.read_bytes()
    for name in ("00000.tar", "00001.tar"):
        assert (a.root / "train-shards" / name).read_bytes() == (b.root / "train-shards" / name).read_bytes()
    for rel in ("zeroshot/red_circle/00000.jpg", "probe/test/blue_star/00000.jpg", "preview.png"):
        assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes()
    # The first 40 training samples are the same whatever n_train is (per-sample generators).
    assert _read_csv(a.train_csv) == _read_csv(world.train_csv)[:40]
    assert a.train_csv.read_bytes() != c.train_csv.read_bytes()


def test_changed_parameters_regenerate_in_place(tmp_path):
    small = dict(TINY, n_train=30, shards=1)
    first = generate_world(tmp_path / "w", **small)
    assert first.train_shards.endswith("train-shards/00000.tar")
    second = generate_world(tmp_path / "w", **dict(small, n_train=50))
    assert len(_read_csv(second.train_csv)) == 50 and second.params["n_train"] == 50
    assert load_world(tmp_path / "w") == second
    assert [p.name for p in tmp_path.iterdir()] == ["w"]  # no tmp or old dir left behind


def test_load_world_refuses_missing_or_incomplete(tmp_path):
    with pytest.raises(DataError, match="world.json is missing"):
        load_world(tmp_path / "nothing")
    w = generate_world(tmp_path / "w", **dict(TINY, n_train=12, shards=2))
    (w.root / "train-shards" / "00001.tar").unlink()
    with pytest.raises(DataError, match="00001.tar"):
        load_world(w.root)
    (w.root / "world.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        load_world(w.root)
    # An incomplete world is regenerated rather than trusted.
    fixed = generate_world(tmp_path / "w", **dict(TINY, n_train=12, shards=2))
    assert (fixed.root / "train-shards" / "00001.tar").exists()


def test_refuses_foreign_directories_and_bad_arguments(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError):
        generate_world(foreign, **TINY)
    assert (foreign / "notes.txt").read_text() == "keep me"
    for bad, param in (({"n_train": 0}, "n_train"), ({"shards": 500}, "shards"),
                       ({"n_retrieval": unique_combinations() + 1}, "n_retrieval"),
                       ({"image_size": 4}, "image_size"), ({"probe_per_class": (1,)}, "probe_per_class")):
        with pytest.raises(SpecError) as err:
            generate_world(tmp_path / "x", **dict(TINY, **bad))
        assert err.value.param == param


def test_progress_reaches_total_and_contact_sheet_grid(tmp_path, world):
    seen: list[tuple[int, int]] = []
    generate_world(tmp_path / "p", **dict(TINY, n_train=20, shards=1), progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1] == 20 + 60 + 48 * 3

    class Reporter:  # the core.progress.Reporter method generate_world calls
        def __init__(self):
            self.calls = []

        def progress(self, stage, done, total, values=None):
            self.calls.append((stage, done, total))

    rep = Reporter()
    generate_world(tmp_path / "q", **dict(TINY, n_train=20, shards=1), progress=rep)
    assert rep.calls[-1] == ("generating", 224, 224)
    sheet = contact_sheet(world, n=16, scale=2)
    assert sheet.size == (4 * (64 + 2) + 2,) * 2
    # The first tile is the first training image, enlarged.
    with Image.open(world.root / "train" / "000000000.jpg") as im:
        first = np.asarray(im.convert("RGB"))
    tile = np.asarray(sheet)[2:66:2, 2:66:2]
    assert np.array_equal(tile, first)
