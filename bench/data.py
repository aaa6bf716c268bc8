"""Item 3: the data pipeline's images/s (CSV + JPEG files, webdataset tar shards; local and S3) against the
model's own encode rate, so the table shows whether the accelerator would starve.

    python -m bench.data                                         # CPU: tiny model and ViT-B-32
    python -m bench.data --models ViT-B-32 ViT-B-16 --device cuda --workers 0 4 8 16 --images 4096
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import IMG, RESULTS, machine, median, table, timed, write_json

SHARDS = 4


def synthetic_jpeg(i: int, seed: int = 0, size: int = 224, quality: int = 90) -> bytes:
    """Image i: a photo-like JPEG, smooth colour regions (an upsampled 6 x 6 grid) plus sensor-like noise, so
    its size (~15-25 KB at 224 px) and decode cost resemble web images rather than flat colour or pure noise."""
    from PIL import Image

    rng = np.random.default_rng([seed, i])
    grid = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), dtype=np.float32)
    img += rng.normal(0, 6, size=img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _jpegs(n: int, seed: int, size: int, jobs: int) -> Iterator[bytes]:
    if jobs <= 1:
        return (synthetic_jpeg(i, seed, size) for i in range(n))
    pool = ProcessPoolExecutor(jobs)
    try:
        return iter(list(pool.map(partial(synthetic_jpeg, seed=seed, size=size), range(n), chunksize=32)))
    finally:
        pool.shutdown()


def write_dataset(root: Path, n: int, *, size: int = 224, shards: int = SHARDS, seed: int = 0,
                  jobs: int = 1) -> dict[str, Any]:
    """The same n image-caption pairs as a CSV + JPEG folder and as tar shards (img2dataset layout);
    `jobs` processes encode the JPEGs (the bytes do not depend on it)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "shards").mkdir(exist_ok=True)
    per_shard = -(-n // shards)
    tars = [tarfile.open(root / "shards" / f"{i:05d}.tar", "w") for i in range(shards)]
    total_bytes = 0
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["filepath", "title"])
        for i, data in enumerate(_jpegs(n, seed, size, jobs)):
            total_bytes += len(data)
            caption = f"a photo of object {i % 97} on a background {i % 13}"
            (root / "images" / f"{i:07d}.jpg").write_bytes(data)
            w.writerow([f"images/{i:07d}.jpg", caption])
            tar = tars[i // per_shard]
            for ext, payload in (("jpg", data), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{i:07d}.{ext}")
                info.size, info.mtime = len(payload), 0
                tar.addfile(info, io.BytesIO(payload))
    for tar in tars:
        tar.close()
    return {"root": str(root), "csv": str(root / "train.csv"),
            "shards": str(root / "shards" / f"{{00000..{shards - 1:05d}}}.tar"), "images": n,
            "mean_jpeg_kib": total_bytes / n / 1024, "image_px": size}


def upload(server: Any, root: Path, bucket: str = "bench-data") -> str:
    """Copy the CSV, images and shards into a bucket; returns the s3:// prefix."""
    client = server.client()
    server.make_bucket(bucket)
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            client.fput_object(bucket, path.relative_to(root).as_posix(), str(path))
    return f"s3://{bucket}"


def pipeline_rate(location: str, access: Any, transform: Any, tokenizer: Any, *, workers: int, batch: int = 64,
                  draft_size: int | None = None) -> dict[str, Any]:
    """images/s of PairDataset + DataLoader (decode, preprocess, tokenize, collate) over one pass.

    Steady rate: the clock starts when the first round of batches has arrived (one batch per worker,
    all started together), so worker start-up, a one-off, is not charged per image. `images_per_s_total`
    is the whole pass, start-up included.
    """
    from torch.utils.data import DataLoader

    from core.data import PairDataset, build_index, collate_pairs

    t0 = time.perf_counter()
    index = build_index(location, access=access)
    index_s = time.perf_counter() - t0
    ds = PairDataset(index, access, transform, tokenizer, draft_size=draft_size)
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate_pairs,
                        persistent_workers=False, prefetch_factor=4 if workers else None)
    skip = max(1, workers)
    t_start = time.perf_counter()
    t_first, counted, total, bad = None, 0, 0, 0
    for i, b in enumerate(loader):
        bad += len(b["bad_rows"])
        total += len(b["rows"])
        if i < skip:
            t_first = time.perf_counter()
            continue
        counted += len(b["rows"])
    end = time.perf_counter()
    if bad:
        raise RuntimeError(f"{bad} samples failed to load from {location}")
    steady = counted / (end - t_first) if counted and t_first is not None else float("nan")
    return {"images_per_s": steady, "images_per_s_total": total / (end - t_start), "counted": counted,
            "startup_s": (t_first or end) - t_start, "index_s": index_s, "images": len(ds), "workers": workers,
            "batch": batch}


@torch.no_grad()
def encode_rate(model: torch.nn.Module, device: torch.device, *, batch: int, repeats: int = 3,
                precision: str = "fp32", tokenizer: Any = None) -> dict[str, Any]:
    """The model's own encode rate on random preprocessed images (median of `repeats` batches, after a
    warm-up), and on captions when a tokenizer is given."""
    from bench.step import image_size_of, random_captions

    size = image_size_of(model)
    was_training = model.training
    model.eval()
    x = torch.randn(batch, 3, size, size, device=device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def rate(fn: Any) -> float:
        def run() -> torch.Tensor:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                return fn()

        run()  # warm-up
        return batch / median([timed(run, device)[0] for _ in range(repeats)])

    out = {"images_per_s": rate(lambda: model.encode_image(x)), "batch": batch, "image_px": size,
           "precision": precision}
    if tokenizer is not None:
        tokens = tokenizer(random_captions(batch)).to(device)
        out["texts_per_s"] = rate(lambda: model.encode_text(tokens))
    model.train(was_training)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.step import load_bench_model
    from core.io import Access, S3Config

    dev = torch.device(args.device)
    doc: dict[str, Any] = {"benchmark": "data", "machine": machine(args.device), "rows": [], "encode": {}}
    work = Path(args.workdir or tempfile.mkdtemp(prefix="helip-bench-data-"))
    t0 = time.perf_counter()
    doc["dataset"] = write_dataset(work / "data", args.images, size=args.image_px, jobs=args.jobs)
    doc["dataset"]["write_s"] = time.perf_counter() - t0
    sources = {"csv": doc["dataset"]["csv"], "tar": doc["dataset"]["shards"]}
    accesses = {"local": Access()}
    server = None
    if args.s3:
        from tests.services import S3Server

        server = S3Server(work / "s3")
        server.start()
        prefix = upload(server, work / "data")
        accesses["s3"] = Access(s3=S3Config(server.endpoint_url, server.access_key, server.secret_key))
        doc["s3"] = "weed mini on 127.0.0.1 (tests/services.py S3Server), real SigV4 credentials"
    try:
        for name in args.models:
            loaded = load_bench_model(name, dev)
            enc = encode_rate(loaded.model.to(dev), dev, batch=args.encode_batch, precision=args.precision)
            doc["encode"][name] = enc
            print(f"{name}: encode {enc['images_per_s']:.0f} images/s on {dev}", flush=True)
            for where, access in accesses.items():
                for kind, loc in sources.items():
                    if where == "s3":
                        loc = prefix + "/" + Path(loc).relative_to(work / "data").as_posix()
                    for w in args.workers:
                        r = pipeline_rate(loc, access, loaded.preprocess_val, loaded.tokenizer, workers=w,
                                          batch=args.batch)
                        r.update(model=name, source=f"{kind} {where}", ratio_to_encode=r["images_per_s"] /
                                 enc["images_per_s"])
                        doc["rows"].append(r)
                        print(f"  {name} {kind:3s} {where:5s} workers={w:2d}: {r['images_per_s']:7.0f} images/s "
                              f"(x{r['ratio_to_encode']:.2f} of encode)", flush=True)
                        write_json(args.out, doc)
            del loaded
    finally:
        if server is not None:
            server.stop()
        if args.workdir is None:  # a temporary copy of the data set: do not leave it behind
            shutil.rmtree(work, ignore_errors=True)
    return doc


def plot(doc: dict[str, Any], path: Path) -> Path:
    """images/s per source and worker count, one panel per model, the model's encode rate as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in doc["rows"]))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        rows = [r for r in doc["rows"] if r["model"] == model]
        sources = list(dict.fromkeys(r["source"] for r in rows))
        workers = sorted({r["workers"] for r in rows})
        width = 0.8 / len(workers)
        for j, w in enumerate(workers):
            ys = [next((r["images_per_s"] for r in rows if r["source"] == s and r["workers"] == w), 0) for s in sources]
            ax.bar([i + j * width for i in range(len(sources))], ys, width, label=f"{w} workers")
        enc = doc["encode"][model]["images_per_s"]
        ax.axhline(enc, color="black", ls="--", lw=1, label=f"encode {enc:,.0f}/s")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sources))], sources, fontsize=8)
        ax.set_ylabel("images/s")
        ax.set_title(f"{model} ({doc['encode'][model]['image_px']} px)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_report(doc: dict[str, Any]) -> None:
    rows = [{"model": r["model"], "source": r["source"], "workers": r["workers"], "images/s": r["images_per_s"],
             "encode images/s": doc["encode"][r["model"]]["images_per_s"], "pipeline / encode": r["ratio_to_encode"]}
            for r in doc["rows"]]
    print(table(rows, ["model", "source", "workers", "images/s", "encode images/s", "pipeline / encode"]))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "ViT-B-32"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--image-px", type=int, default=224)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch", type=int, default=64, help="DataLoader batch")
    p.add_argument("--encode-batch", type=int, default=16)
    p.add_argument("--jobs", type=int, default=1, help="processes that write the JPEGs")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--no-s3", dest="s3", action="store_false", help="skip the S3 server runs")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=RESULTS / "data_cpu.json")
    p.add_argument("--plot", default=str(IMG / "bench_data.png"), help="PNG path; '' for none")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    doc = run(args)
    print_report(doc)
    write_json(args.out, doc)
    if args.plot:
        plot(doc, Path(args.plot))
    print(f"wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
