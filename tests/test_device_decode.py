"""JPEG decoding on the device (core.device_decode), run here with the CPU as the device: the same code
a GPU runs, against the workers' PIL path."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from bench.data import write_dataset
from core.data import PairDataset, build_index, collate_pairs
from core.device_decode import assemble, batch_to_device, decode_mode, input_pipeline, plan_device_decode
from core.embed import embed_pairs
from core.io import Access
from core.models import load_model
from tests.test_pipeline import NAME, TINY

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpeg")
    write_dataset(root, 24, size=72, shards=2)
    # a third shard: a PNG, a greyscale JPEG, a JPEG whose header is fine and whose data is not, a CMYK JPEG
    rng = np.random.default_rng(0)

    def enc(im: Image.Image, fmt: str) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        return buf.getvalue()

    rgb = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    good = enc(rgb, "JPEG")
    broken = good[:200] + bytes(len(good) - 200)
    members = [("x0.png", enc(rgb, "PNG")), ("x1.jpg", enc(rgb.convert("L"), "JPEG")), ("x2.jpg", broken),
               ("x3.jpg", enc(rgb.convert("CMYK"), "JPEG"))]
    with tarfile.open(root / "shards" / "00002.tar", "w") as tf:
        for i, (name, data) in enumerate(members):
            for n, payload in ((name, data), (f"x{i}.txt", f"odd image {i}".encode())):
                info = tarfile.TarInfo(n)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return str(root / "shards" / "{00000..00002}.tar")


@pytest.fixture(scope="module")
def model():
    return load_model("ViT-B-32", pretrained=None), load_model(NAME, config=TINY, pretrained=None)


def test_open_clip_transforms_are_planned_and_unknown_steps_are_not(model):
    b32, _ = model
    for tf in (b32.preprocess_train, b32.preprocess_val):
        planned = plan_device_decode(tf)
        assert planned is not None
    from torchvision import transforms as T

    odd = T.Compose([T.ColorJitter(0.1), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    assert plan_device_decode(odd) is None
    assert input_pipeline(odd, CPU, "device")[2] is None  # falls back to the workers
    assert decode_mode("auto", CPU) is False and decode_mode("auto", torch.device("cuda")) is True
    assert decode_mode("device", CPU) is True and decode_mode("cpu", torch.device("cuda")) is False


def test_device_batch_equals_the_workers_batch_in_order_and_bad_rows(model, shards):
    """The same rows through both paths: same order, same bad rows with the same reasons, pixels within
    resampling rounding of PIL's (mean absolute difference under 1.5 of 255)."""
    b32, _ = model
    index = build_index(shards, access=Access())
    rows = list(range(len(index)))[::-1]  # the odd shard first, then the JPEGs backwards
    tf_dev, norm, decoder = input_pipeline(b32.preprocess_val, CPU, "device")
    assert decoder is not None
    dev_ds = PairDataset(index, Access(), tf_dev, b32.tokenizer, jpeg_passthrough=True)
    cpu_ds = PairDataset(index, Access(), b32.preprocess_val, b32.tokenizer)
    got = collate_pairs(dev_ds.__getitems__(rows))
    # the greyscale and the broken JPEG go to the device (the header is fine), the PNG and the CMYK JPEG do not
    assert len(got["jpegs"]) == 24 + 2 and len(got["image_pos"]) == 2
    want = collate_pairs(cpu_ds.__getitems__(rows))
    images, texts, kept, bad = batch_to_device(got, CPU, norm, decoder)
    assert sorted(bad) == sorted(want["bad_rows"]) and bad  # the broken JPEG, with PIL's reason
    assert kept.tolist() == want["rows"].tolist()
    assert torch.equal(texts, want["texts"])
    assert images.shape == want["images"].shape
    std = torch.tensor(norm.std).view(1, 3, 1, 1) if norm else 1
    diff = ((images - want["images"]) * std * 255).abs()
    assert float(diff.mean()) < 1.5, float(diff.mean())


def test_a_batch_of_only_bad_jpegs_and_random_crops_stay_in_shape(model, shards):
    b32, _ = model
    index = build_index(shards, access=Access())
    tf_dev, norm, decoder = input_pipeline(b32.preprocess_train, CPU, "device")
    ds = PairDataset(index, Access(), tf_dev, b32.tokenizer, jpeg_passthrough=True)
    broken = [r for r in range(len(index)) if index.keys[r] == "x2"]
    batch = collate_pairs(ds.__getitems__(broken))
    images, bad, keep = assemble(batch, decoder, CPU)
    assert images.numel() == 0 and bad == [(broken[0], "corrupt image")] and keep.tolist() == [False]
    batch = collate_pairs(ds.__getitems__(list(range(8))))
    torch.manual_seed(0)
    a = batch_to_device(batch, CPU, norm, decoder)[0]
    torch.manual_seed(0)
    b = batch_to_device(batch, CPU, norm, decoder)[0]
    assert a.shape == (8, 3, 224, 224) and torch.equal(a, b)  # seeded crops repeat


def test_embedding_with_device_decode_matches_the_workers(model, shards):
    _, tiny = model
    idx_dev, idx_cpu = build_index(shards, access=Access()), build_index(shards, access=Access())
    dev = embed_pairs(tiny, idx_dev, Access(), device=CPU, batch_size=8, workers=0, decode="device")
    cpu = embed_pairs(tiny, idx_cpu, Access(), device=CPU, batch_size=8, workers=0, decode="cpu")
    assert idx_dev.bad == idx_cpu.bad and any(r == "corrupt image" for r in idx_dev.bad.values())
    np.testing.assert_array_equal(dev.tokens, cpu.tokens)
    np.testing.assert_array_equal(dev.text, cpu.text)
    cos = (dev.image.astype(np.float32) * cpu.image.astype(np.float32)).sum(1)
    ok = idx_cpu.valid_mask()
    assert cos[ok].min() > 0.98, cos[ok].min()


def test_a_job_decodes_on_the_device_when_asked(shards, tmp_path):
    """run_job with data.decode=device (the GPU default), on the CPU: embedding and training read bytes in
    the workers and decode in the main process; the broken JPEG is a bad sample like on the CPU path."""
    from core.pipeline import run_job
    from core.progress import CollectingReporter

    rep = CollectingReporter()
    spec = {"model": {"name": NAME, "config": TINY, "pretrained": None},
            "data": {"train": shards, "workers": 1, "decode": "device", "max_bad_fraction": 0.1},
            "mining": {"top_k": 5}, "helip": {"hard_per_target": 1, "sample_from": 5},
            "train": {"batch_size": 8, "max_steps": 3, "seed": 0}, "eval": {}, "control": False}
    res = run_job(spec, tmp_path, reporter=rep)
    started = [e for e in rep.events if e["message"].startswith("helip: training")]
    assert started and started[0]["data"]["decode"] == "device"
    assert res.summary["data"]["bad"] >= 1 and res.summary["data"].get("corrupt image", 0) >= 1
    assert len([s for s in rep.steps if s["run"] == "helip"]) >= 2


def test_only_plain_jpegs_of_bounded_size_go_to_the_device():
    """The header decides: baseline RGB/greyscale JPEGs up to DEVICE_MAX_PIXELS go to the device; a larger
    one, a CMYK one, a PNG or bytes that only start like a JPEG go to the workers' decoder and its limits."""
    from core.decoding import DEVICE_MAX_PIXELS, jpeg_or_none

    def jpeg(size: tuple[int, int], mode: str = "RGB") -> bytes:
        buf = io.BytesIO()
        Image.new(mode, size).save(buf, format="JPEG", quality=50)
        return buf.getvalue()

    side = int(DEVICE_MAX_PIXELS ** 0.5)
    assert jpeg_or_none(jpeg((64, 48))) is not None and jpeg_or_none(jpeg((64, 48), "L")) is not None
    assert jpeg_or_none(jpeg((side, side))) is not None
    assert jpeg_or_none(jpeg((side + 1, side))) is None
    assert jpeg_or_none(jpeg((64, 48), "CMYK")) is None
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    assert jpeg_or_none(png.getvalue()) is None
    assert jpeg_or_none(b"\xff\xd8\xff" + b"\x00" * 64) is None
