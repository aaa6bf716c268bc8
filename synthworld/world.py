"""The synthetic image-caption world on disk: train CSV + shards, zero-shot, retrieval and probe splits, world.json.

Why over 350 lines: generation, the on-disk layout, caching and the eval spec of one world are read together;
the drawing of shapes and the caption phrasings are already apart, in synthworld/render.py.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import multiprocessing as mp
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.errors import DataError, SpecError
from synthworld.render import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Attributes,
    caption,
    describe,
    encode_jpeg,
    render,
    sample_attributes,
    unique_attributes,
    unique_combinations,
)

__all__ = [
    "SHAPES", "COLORS", "POSITIONS", "SIZES", "BACKGROUNDS", "Attributes", "sample_attributes", "render",
    "caption", "describe", "World", "generate_world", "load_world", "contact_sheet", "GENERATOR_VERSION",
]

# Bump whenever the same parameters would produce different files: cached worlds are then regenerated.
GENERATOR_VERSION = 1
TEMPLATES = ["a photo of a {c}.", "a {c}.", "a picture of a {c}.", "an image of a {c}."]
ZEROSHOT_NAME = "shapes"

# Each split seeds its own generators, so adding samples to one split never changes another.
_SPLIT_CODES = {"train": 0, "retrieval": 1, "zeroshot": 2, "probe_train": 3, "probe_test": 4}
_TAR_MTIME = 0  # fixed tar metadata: same seed, same shard bytes


@dataclass
class World:
    """Paths of everything `generate_world` wrote, plus the zero-shot classnames (ImageFolder order) and templates."""

    root: Path
    train_csv: Path
    train_shards: str
    zeroshot_root: Path
    retrieval_csv: Path
    probe_train: Path
    probe_test: Path
    classnames: list[str]
    templates: list[str]
    params: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def eval_spec(self) -> dict[str, Any]:
        """The `eval` section of a job spec (docs/spec.md) pointing at this world's evaluation splits."""
        return {
            "zeroshot": [{
                "name": ZEROSHOT_NAME,
                "root": str(self.zeroshot_root),
                "classnames": list(self.classnames),
                "templates": list(self.templates),
            }],
            "retrieval": [{"name": "retrieval", "data": str(self.retrieval_csv)}],
            "linear_probe": [{"name": "probe", "train": str(self.probe_train), "test": str(self.probe_test)}],
        }

    def data_spec(self, *, source: str = "csv") -> dict[str, Any]:
        """The `data` section of a job spec: the training pairs as the CSV (`csv`) or as the tar shards (`shards`)."""
        if source not in ("csv", "shards"):
            raise SpecError(f"source must be 'csv' or 'shards', got {source!r}", param="source")
        return {"train": str(self.train_csv) if source == "csv" else self.train_shards}


def _folder(classname: str) -> str:
    return classname.replace(" ", "_")


def classnames() -> list[str]:
    """All "<color> <shape>" classes, in the order ImageFolder sees their folders (sorted folder names)."""
    folders = sorted(_folder(f"{c} {s}") for c in COLORS for s in SHAPES)
    return [f.replace("_", " ") for f in folders]


def _shard_pattern(shards_dir: Path, shards: int) -> str:
    if shards == 1:
        return str(shards_dir / "00000.tar")
    return str(shards_dir / f"{{00000..{shards - 1:05d}}}.tar")


def _shard_paths(shards_dir: Path, shards: int) -> list[Path]:
    return [shards_dir / f"{s:05d}.tar" for s in range(shards)]


# ---------------------------------------------------------------- rendering jobs (picklable, process-pool safe)

def _render_one(job: tuple[Attributes, tuple[int, int, int], str, int]) -> tuple[bytes, str]:
    """Render one sample from its own generator: output depends on (seed, split, index) only, not on workers."""
    attrs, seed_key, mode, image_size = job
    rng = np.random.default_rng(list(seed_key))
    if mode == "free":
        text = caption(attrs, rng)
    elif mode == "canonical":
        text = describe(attrs)
    else:
        text = ""
    return encode_jpeg(render(attrs, rng, image_size=image_size)), text


def _render_all(
    jobs: Sequence[tuple[Attributes, tuple[int, int, int], str, int]],
    pool: cf.Executor | None,
    tick: Callable[[int], None],
) -> Iterator[tuple[bytes, str]]:
    # tick before yield: a consumer that stops at the last item (zip) never resumes the generator.
    outputs = map(_render_one, jobs) if pool is None else pool.map(_render_one, jobs, chunksize=256)
    for out in outputs:
        tick(1)
        yield out


def _jobs(attrs: list[Attributes], seed: int, split: str, mode: str, image_size: int):
    code = _SPLIT_CODES[split]
    return [(a, (seed, code, i), mode, image_size) for i, a in enumerate(attrs)]


def _check_text(text: str) -> str:
    # Captions become one TSV field: a tab or newline would shift columns.
    if "\t" in text or "\n" in text:
        raise DataError(f"caption contains a tab or newline: {text!r}")
    return text


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_train(tmp: Path, attrs: list[Attributes], seed: int, image_size: int, shards: int, pool, tick) -> None:
    (tmp / "train").mkdir()
    shard_dir = tmp / "train-shards"
    shard_dir.mkdir()
    n = len(attrs)
    bounds = [s * n // shards for s in range(shards + 1)]  # contiguous, near-equal shards in CSV order
    rows = ["filepath\ttitle"]
    shard, tar = -1, None
    try:
        for i, (jpg, text) in enumerate(_render_all(_jobs(attrs, seed, "train", "free", image_size), pool, tick)):
            key = f"{i:09d}"
            (tmp / "train" / f"{key}.jpg").write_bytes(jpg)
            rows.append(f"train/{key}.jpg\t{_check_text(text)}")
            while i >= bounds[shard + 1]:
                if tar is not None:
                    tar.close()
                shard += 1
                tar = tarfile.open(shard_dir / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT)
            meta = {"key": key, "caption": text, **asdict(attrs[i])}
            _tar_add(tar, f"{key}.jpg", jpg)
            _tar_add(tar, f"{key}.txt", text.encode("utf-8"))
            _tar_add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
    finally:
        if tar is not None:
            tar.close()
    (tmp / "train.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def _write_retrieval(tmp: Path, attrs: list[Attributes], seed: int, image_size: int, pool, tick) -> None:
    (tmp / "retrieval").mkdir()
    rows = ["filepath\ttitle"]
    for i, (jpg, text) in enumerate(_render_all(_jobs(attrs, seed, "retrieval", "canonical", image_size), pool, tick)):
        (tmp / "retrieval" / f"{i:06d}.jpg").write_bytes(jpg)
        rows.append(f"retrieval/{i:06d}.jpg\t{_check_text(text)}")
    (tmp / "retrieval.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def _class_attributes(seed: int, split: str, per_class: int) -> list[Attributes]:
    rng = np.random.default_rng([seed, _SPLIT_CODES[split]])
    out: list[Attributes] = []
    for name in classnames():
        color, shape = name.split(" ")
        out.extend(sample_attributes(rng, per_class, shape=shape, color=color))
    return out


def _write_folders(out_dir: Path, attrs: list[Attributes], seed: int, split: str, image_size: int, pool, tick) -> None:
    for name in classnames():
        (out_dir / _folder(name)).mkdir(parents=True)
    seen: dict[str, int] = {}
    for a, (jpg, _) in zip(attrs, _render_all(_jobs(attrs, seed, split, "none", image_size), pool, tick), strict=True):
        k = seen.get(a.classname, 0)
        seen[a.classname] = k + 1
        (out_dir / _folder(a.classname) / f"{k:05d}.jpg").write_bytes(jpg)


# ---------------------------------------------------------------- world.json and loading

def _params(n_train, n_retrieval, zeroshot_per_class, probe_per_class, image_size, seed, shards) -> dict[str, Any]:
    return {
        "version": GENERATOR_VERSION, "n_train": int(n_train), "n_retrieval": int(n_retrieval),
        "zeroshot_per_class": int(zeroshot_per_class), "probe_per_class": [int(x) for x in probe_per_class],
        "image_size": int(image_size), "seed": int(seed), "shards": int(shards),
    }


def _world_from_meta(root: Path, meta: dict[str, Any]) -> World:
    p = meta["paths"]
    shards = int(meta["params"]["shards"])
    return World(
        root=root,
        train_csv=root / p["train_csv"],
        train_shards=_shard_pattern(root / p["train_shards_dir"], shards),
        zeroshot_root=root / p["zeroshot"],
        retrieval_csv=root / p["retrieval_csv"],
        probe_train=root / p["probe_train"],
        probe_test=root / p["probe_test"],
        classnames=list(meta["classnames"]),
        templates=list(meta["templates"]),
        params=dict(meta["params"]),
        counts={k: int(v) for k, v in meta["counts"].items()},
    )


def load_world(root: Path) -> World:
    """Read `root/world.json`; raise DataError when it is absent, unreadable, or names files that are missing."""
    root = Path(root).absolute()
    meta_path = root / "world.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if not meta.get("complete"):
            raise DataError(f"synthetic world at {root} is incomplete (world.json not marked complete)")
        world = _world_from_meta(root, meta)
    except FileNotFoundError:
        raise DataError(f"no synthetic world at {root}: world.json is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"synthetic world at {root} has an unreadable world.json: {exc}") from None
    shard_dir = root / meta["paths"]["train_shards_dir"]
    needed = [world.train_csv, world.retrieval_csv, world.zeroshot_root, world.probe_train, world.probe_test,
              *_shard_paths(shard_dir, int(world.params["shards"]))]
    needed += [world.zeroshot_root / _folder(c) for c in world.classnames]
    missing = [str(p.relative_to(root)) for p in needed if not p.exists()]
    if missing:
        raise DataError(f"synthetic world at {root} is incomplete; missing: {', '.join(missing[:5])}")
    return world


def _validate(n_train, n_retrieval, zeroshot_per_class, probe_per_class, image_size, shards, workers) -> None:
    checks = [
        ("n_train", n_train >= 1, "must be at least 1"),
        ("n_retrieval", n_retrieval >= 1, "must be at least 1"),
        ("n_retrieval", n_retrieval <= unique_combinations(),
         f"must be at most {unique_combinations()} (the distinct attribute combinations; its captions are unique)"),
        ("zeroshot_per_class", zeroshot_per_class >= 1, "must be at least 1"),
        ("probe_per_class", len(probe_per_class) == 2 and min(probe_per_class) >= 1,
         "must be (train, test), each at least 1"),
        ("image_size", 16 <= image_size <= 512, "must be between 16 and 512"),
        ("shards", 1 <= shards <= max(n_train, 1), "must be between 1 and n_train"),
        ("workers", workers >= 1, "must be at least 1"),
    ]
    for param, ok, why in checks:
        if not ok:
            raise SpecError(f"{param} {why}", param=param)


def _report(progress: Any, done: int, total: int) -> None:
    if progress is None:
        return
    if hasattr(progress, "progress"):  # a core.progress.Reporter
        progress.progress("generating", done, total)
    else:
        progress(done, total)


def generate_world(
    root: Path,
    *,
    n_train: int = 12_000,
    n_retrieval: int = 1_000,
    zeroshot_per_class: int = 20,
    probe_per_class: tuple[int, int] = (20, 10),
    image_size: int = 32,
    seed: int = 0,
    shards: int = 4,
    workers: int = 1,
    progress: Any = None,
) -> World:
    """Write a synthetic world under `root` (atomically) and return it; reuse one with the same parameters.

    `progress` is a Reporter (gets `progress("generating", done, total)`) or a callable `(done, total)`.
    The files depend only on the parameters and `seed`, never on `workers`.
    """
    root = Path(root).absolute()
    _validate(n_train, n_retrieval, zeroshot_per_class, probe_per_class, image_size, shards, workers)
    params = _params(n_train, n_retrieval, zeroshot_per_class, probe_per_class, image_size, seed, shards)
    existing = _existing_world(root)
    if existing is not None and existing.params == params:
        return existing
    if root.exists() and existing is None and not (root / "world.json").exists() and any(root.iterdir()):
        # Never replace a directory that is not one of ours.
        raise DataError(f"{root} exists, is not empty and holds no world.json: refusing to overwrite it", param="root")

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _generate_into(tmp, params, workers, progress)
        return _publish(tmp, root, params)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _existing_world(root: Path) -> World | None:
    if not (root / "world.json").exists():
        return None
    try:
        return load_world(root)
    except DataError:
        return None


def _generate_into(tmp: Path, params: dict[str, Any], workers: int, progress: Any) -> None:
    seed, size = params["seed"], params["image_size"]
    train_attrs = sample_attributes(np.random.default_rng([seed, _SPLIT_CODES["train"]]), params["n_train"])
    retrieval_attrs = unique_attributes(np.random.default_rng([seed, _SPLIT_CODES["retrieval"]]), params["n_retrieval"])
    zs_attrs = _class_attributes(seed, "zeroshot", params["zeroshot_per_class"])
    pt_attrs = _class_attributes(seed, "probe_train", params["probe_per_class"][0])
    pv_attrs = _class_attributes(seed, "probe_test", params["probe_per_class"][1])
    total = sum(map(len, (train_attrs, retrieval_attrs, zs_attrs, pt_attrs, pv_attrs)))
    done = 0

    def tick(k: int) -> None:
        nonlocal done
        done += k
        if done % 500 == 0 or done == total:
            _report(progress, done, total)

    pool = None
    if workers > 1:
        # spawn, not fork: the caller may hold torch or service threads that fork would copy mid-state.
        pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
    try:
        _write_train(tmp, train_attrs, seed, size, params["shards"], pool, tick)
        _write_retrieval(tmp, retrieval_attrs, seed, size, pool, tick)
        _write_folders(tmp / "zeroshot", zs_attrs, seed, "zeroshot", size, pool, tick)
        _write_folders(tmp / "probe" / "train", pt_attrs, seed, "probe_train", size, pool, tick)
        _write_folders(tmp / "probe" / "test", pv_attrs, seed, "probe_test", size, pool, tick)
    finally:
        if pool is not None:
            pool.shutdown()

    meta = {
        "complete": True,
        "params": params,
        "counts": {
            "train": len(train_attrs), "retrieval": len(retrieval_attrs), "zeroshot": len(zs_attrs),
            "probe_train": len(pt_attrs), "probe_test": len(pv_attrs), "classes": len(classnames()),
        },
        "classnames": classnames(),
        "templates": list(TEMPLATES),
        "vocab": {"shapes": list(SHAPES), "colors": list(COLORS), "positions": list(POSITIONS),
                  "sizes": list(SIZES), "backgrounds": list(BACKGROUNDS)},
        "paths": {"train_csv": "train.csv", "train_shards_dir": "train-shards", "zeroshot": "zeroshot",
                  "retrieval_csv": "retrieval.csv", "probe_train": "probe/train", "probe_test": "probe/test",
                  "preview": "preview.png"},
    }
    contact_sheet(_world_from_meta(tmp, meta)).save(tmp / "preview.png", optimize=False)
    # world.json last: its presence marks the directory as a finished world.
    (tmp / "world.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _publish(tmp: Path, root: Path, params: dict[str, Any]) -> World:
    """Move the finished tmp dir into place; an old world is moved aside first and deleted after."""
    old = None
    if root.exists():
        if any(root.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.rename(root, old / "world")
        else:
            root.rmdir()
    try:
        os.rename(tmp, root)
    except OSError:
        # Another process published the same world meanwhile: use theirs if it matches.
        other = _existing_world(root)
        if other is not None and other.params == params:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            return other
        if old is not None and not root.exists():
            os.rename(old / "world", root)  # put the previous world back rather than lose it
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return load_world(root)


def contact_sheet(world: World, n: int = 64, *, scale: int = 3) -> Image.Image:
    """A grid of the first n training images (ceil(sqrt(n)) per row), each enlarged `scale` times, for a person."""
    lines = world.train_csv.read_text(encoding="utf-8").splitlines()[1:]
    paths = [world.train_csv.parent / line.split("\t", 1)[0] for line in lines[:n]]
    if not paths:
        raise DataError(f"{world.train_csv} has no rows")
    cols = int(np.ceil(np.sqrt(len(paths))))
    rows = int(np.ceil(len(paths) / cols))
    cell = int(world.params.get("image_size", 32)) * scale
    pad = 2
    sheet = Image.new("RGB", (cols * (cell + pad) + pad, rows * (cell + pad) + pad), (255, 255, 255))
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            tile = im.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
        sheet.paste(tile, (pad + (i % cols) * (cell + pad), pad + (i // cols) * (cell + pad)))
    return sheet
