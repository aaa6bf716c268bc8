"""The job's own fast path (core.loading, the training loop, float16 embeddings, in-memory evaluation):
each piece against the plain way it replaced, with known answers."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import core.embed
from core.data import build_index
from core.embed import embed_pairs
from core.io import Access
from core.loading import DeviceNormalize, default_workers, device_transform, split_normalize
from core.mining import mine_exact
from core.models import load_model
from core.pipeline import run_job
from core.progress import CollectingReporter
from core.train_step import LossWindow, compile_failure
from synthworld.world import generate_world
from tests.test_pipeline import NAME, TINY, tiny_spec


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world") / "w", n_train=240, n_retrieval=48,
                          zeroshot_per_class=1, probe_per_class=(2, 1), seed=5, shards=2)


@pytest.mark.parametrize(("cores", "world_size", "device", "want"), [
    (2, 1, "cpu", 1), (16, 1, "cuda", 15), (16, 2, "cuda", 7), (64, 1, "cuda", 16), (1, 1, "cpu", 1),
    (16, 8, "cuda", 1),
])
def test_default_workers_share_the_cores(cores, world_size, device, want):
    assert default_workers(torch.device(device), world_size, cores=cores) == want


def test_uint8_transfer_normalised_on_the_device_equals_the_float_transform(world):
    """The workers' uint8 image, normalised by DeviceNormalize, is the open_clip transform's float image."""
    from PIL import Image

    loaded = load_model(NAME, config=TINY, pretrained=None)
    split = split_normalize(loaded.preprocess_val)
    assert split is not None
    to_uint8, normalize = split
    index = build_index(str(world.train_csv), access=Access())
    for row in range(5):
        img = Image.open(index.sources[row]).convert("RGB")
        want = loaded.preprocess_val(img)
        got_u8 = to_uint8(img)
        assert got_u8.dtype == torch.uint8 and got_u8.shape == want.shape
        got = normalize(got_u8[None])[0]
        assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    # float batches (the CPU path) pass through unchanged; the GPU default is uint8, the CPU's is not
    x = torch.randn(2, 3, 4, 4)
    assert normalize(x) is x
    assert device_transform(loaded.preprocess_val, torch.device("cpu"))[1] is None
    assert isinstance(device_transform(loaded.preprocess_val, torch.device("cpu"), uint8=True)[1], DeviceNormalize)
    # a transform that does not end in ToTensor + Normalize is left alone
    assert split_normalize(lambda im: im) is None


def test_loss_window_means_equal_the_per_step_values():
    w = LossWindow()
    steps = [{"a": 1.0, "b": 0.5}, {"a": 3.0, "b": 0.25}, {"a": 2.0, "b": 0.0}]
    for s in steps:
        w.add({k: torch.tensor(v) for k, v in s.items()})
    out = w.mean(torch.tensor(4.0))
    assert out["a"] == pytest.approx(2.0) and out["b"] == pytest.approx(0.25)
    assert out["loss"] == pytest.approx(2.25) and out["logit_scale"] == pytest.approx(4.0)
    w.add({"a": torch.tensor(7.0)})
    assert w.mean(torch.tensor(1.0))["a"] == pytest.approx(7.0)  # the window restarts after each read


def test_compile_failure_tells_compiler_errors_from_model_errors():
    import torch._dynamo.exc as dexc

    assert compile_failure(dexc.Unsupported("no"))
    try:
        try:
            raise dexc.Unsupported("inner")
        except Exception as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as exc:
        assert compile_failure(exc)
    assert not compile_failure(RuntimeError("CUDA out of memory"))
    assert not compile_failure(ValueError("bad shape"))


def test_a_failing_compiler_falls_back_to_eager_with_an_event(world, tmp_path, monkeypatch):
    """torch.compile whose backend fails (as a missing C compiler or Triton would): the run goes on
    uncompiled, says so, and trains exactly as an uncompiled run does."""

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    real = torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(real, backend=broken_backend))
    rep = CollectingReporter()
    spec = tiny_spec(world, control=False, train__compile=True)
    res = run_job(spec, tmp_path / "compiled", reporter=rep)
    warned = [e["message"] for e in rep.events if "torch.compile failed" in e["message"]]
    assert len(warned) == 1 and "training goes on uncompiled" in warned[0]
    plain = run_job(tiny_spec(world, control=False, train__compile=False), tmp_path / "plain",
                    reporter=CollectingReporter())
    a = torch.load(res.artifacts["checkpoint:helip"], map_location="cpu")["state_dict"]
    b = torch.load(plain.artifacts["checkpoint:helip"], map_location="cpu")["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_embeddings_are_float16_and_mine_like_float32(world, monkeypatch):
    """The job's embeddings are float16; mined exactly, their top-k is float32's (ties aside): the overlap
    is measured here on the world's real embeddings and must stay near 1."""
    loaded = load_model(NAME, config=TINY, pretrained=None)
    index = build_index(str(world.train_csv), access=Access())
    half = embed_pairs(loaded, index, Access(), device=torch.device("cpu"), batch_size=64, workers=0)
    assert half.text.dtype == np.float16 and half.image.dtype == np.float16 and half.report["dtype"] == "float16"
    monkeypatch.setattr(core.embed, "EMBEDDING_DTYPE", np.float32)
    full = embed_pairs(loaded, index, Access(), device=torch.device("cpu"), batch_size=64, workers=0)
    assert full.text.dtype == np.float32
    assert np.abs(full.text - half.text.astype(np.float32)).max() < 1e-3
    k = 10
    a = mine_exact(torch.as_tensor(half.text), torch.as_tensor(half.image), top_k=k).neighbors
    b = mine_exact(torch.as_tensor(full.text), torch.as_tensor(full.image), top_k=k).neighbors
    overlap = np.mean([len(set(x[x >= 0]) & set(y[y >= 0])) / max(1, len(set(y[y >= 0])))
                       for x, y in zip(a, b, strict=True)])
    assert overlap >= 0.97, overlap


def test_evaluation_stage_reloads_no_model_and_reproduces_a_separate_evaluation(world, tmp_path, monkeypatch):
    """Each run's final weights are evaluated in memory and the baseline before training: run_job loads
    the model once (the input model) plus once per trained run (in its training), never for evaluation;
    the metrics equal an evaluation of the saved checkpoints."""
    import core.pipeline
    from core.evaluate import evaluate

    loads: list[str] = []
    real = core.pipeline.load_model

    def counting(*args, **kw):
        loads.append(str(kw.get("pretrained")))
        return real(*args, **kw)

    monkeypatch.setattr(core.pipeline, "load_model", counting)
    spec = tiny_spec(world, control=True)
    res = run_job(spec, tmp_path, reporter=CollectingReporter())
    assert loads == []  # the evaluation stage loaded nothing (model_from_spec is how the stages load)
    for run in ("helip", "control"):
        m = load_model(NAME, config=TINY, pretrained=str(res.artifacts[f"checkpoint:{run}"]))
        again = evaluate(m.model, m.preprocess_val, m.tokenizer, core.pipeline.resolve_spec(spec).eval,
                         access=Access(), device="cpu", batch_size=64, workers=0)
        for ds, vals in again.items():
            for metric, v in vals.items():
                assert res.metrics[run][ds][metric] == pytest.approx(v, abs=1e-6), (run, ds, metric)


def test_persistent_workers_live_across_passes_and_close_loader_ends_them():
    """A training loader keeps its worker across epochs (the same process serves both passes), and
    close_loader ends it at once instead of when the loader is collected."""
    import os

    from core.loading import close_loader, make_loader

    class Pids(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> int:
            return os.getpid()

    loader = make_loader(Pids(), workers=1, device=torch.device("cpu"), persistent=True, batch_size=2)
    first = {int(x) for b in loader for x in b}
    second = {int(x) for b in loader for x in b}
    assert first == second and os.getpid() not in first  # one worker, alive across both passes
    worker = loader._iterator._workers[0]  # type: ignore[union-attr]
    assert worker.is_alive()
    close_loader(loader)
    worker.join(timeout=10)
    assert not worker.is_alive()
    one_pass = make_loader(Pids(), workers=1, device=torch.device("cpu"), batch_size=2)
    assert not one_pass.persistent_workers  # embedding and evaluation loaders are read once
