"""A job that cannot run fails at submit (422 naming the field), over real HTTP: unknown architectures and tags,
hub models, data formats, CSV columns, the first shard's first sample. And the registry snapshot the API
checks against is the installed open_clip's."""

from __future__ import annotations

import io
import os
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helip import db
from tests.test_service_e2e import KEY, TINY, Service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parent.parent


def _shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def svc(make_pg_database, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    url = make_pg_database()
    db.upgrade(url)
    logs = tmp_path_factory.mktemp("submit-checks")
    data = logs / "data"
    data.mkdir()
    (data / "train.tsv").write_text("filepath\ttitle\nimg.png\ta red square\n")
    (data / "train.csv").write_text("path,caption\nimg.png,a red square\n")
    (data / "no-caption.tsv").write_text("filepath\tcaption\nimg.png\ta red square\n")
    (data / "empty.tsv").write_text("")
    (data / "train.parquet").write_bytes(b"PAR1")
    (data / "shards").mkdir()
    _shard(data / "shards" / "00000.tar", [("a/k1.jpg", b"\xff\xd8jpeg"), ("a/k1.txt", b"a cat"),
                                           ("a/k2.jpg", b"\xff\xd8"), ("a/k2.txt", b"a dog")])
    _shard(data / "shards" / "00001.tar", [("k1.json", b"{}"), ("k1.txt", b"no image")])
    _shard(data / "no-txt-00000.tar", [("k1.png", b"png"), ("k2.png", b"png")])
    big = b"\x00" * (5 * 1024 * 1024)  # a first image past the probe's window: not looked past, not refused
    _shard(data / "big-00000.tar", [("k1.jpg", big), ("k1.txt", b"caption")])
    (data / "not-a-tar.tar").write_bytes(b"this is not a tar archive at all" * 40)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELIP_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HELIP_ENVIRONMENT="production",
               HELIP_DATABASE_URL=url, HELIP_BROKER_URL=redis_url, HELIP_STORAGE_URL=(logs / "store").as_uri(),
               HELIP_API_KEYS=KEY, HELIP_SECRET_KEY="s", HELIP_ALLOWED_DATA=str(data), HELIP_DATA_DIR=str(logs / "s"),
               HELIP_QUEUE_NAME=f"submit-{uuid.uuid4().hex[:8]}", HELIP_ALLOWED_MODELS="hf-hub:timm/")
    s = Service(env, logs)
    s.data = data  # type: ignore[attr-defined]
    yield s
    s.close()


def _spec(data: Path, train: str = "train.tsv", **patch: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": {"name": "ViT-B-32", "pretrained": "openai"},
                            "data": {"train": str(data / train)}, "train": {"batch_size": 8, "max_steps": 2}}
    for dotted, value in patch.items():
        node = spec
        *path, last = dotted.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return spec


def test_what_the_worker_would_refuse_is_refused_at_submit(svc: Service) -> None:
    d: Path = svc.data  # type: ignore[attr-defined]
    cases: list[tuple[dict[str, Any], str, str]] = [
        (_spec(d, **{"model.name": "ViT-B-32x"}), "model.name", "did you mean ViT-B-32"),
        (_spec(d, **{"model.pretrained": "openaix"}), "model.pretrained", "not a pretrained tag of ViT-B-32"),
        (_spec(d, **{"model.name": "hf-hub:apple/DFN5B-CLIP-ViT-H-14"}), "model.name", "HELIP_ALLOWED_MODELS"),
        (_spec(d, **{"model.pretrained": "hf-hub:laion/x"}), "model.pretrained", "given as model.name"),
        (_spec(d, **{"model.name": "ViT-B-32", "model.config": TINY, "model.pretrained": None}), "model.name",
         "built-in"),
        (_spec(d, **{"model.name": "tiny-custom", "model.config": TINY}), "model.pretrained", "no pretrained tags"),
        (_spec(d, **{"mining.encoder": "ViT-L-14x"}), "mining.encoder", "unknown open_clip architecture"),
        (_spec(d, **{"mining.encoder": "ViT-L-14", "mining.encoder_pretrained": "nope"}),
         "mining.encoder_pretrained", "not a pretrained tag of ViT-L-14"),
        (_spec(d, "train.parquet"), "data.train", "a .parquet file"),
        (_spec(d, "shards"), "data.train", "without an extension"),
        (_spec(d, "no-caption.tsv"), "data.csv_caption_key", "no column 'title'"),
        (_spec(d, "train.csv"), "data.csv_img_key", "no column 'filepath'"),
        (_spec(d, "empty.tsv"), "data.train", "empty"),
        (_spec(d, "no-txt-00000.tar"), "data.train", "no caption member"),
        (_spec(d, "not-a-tar.tar"), "data.train", "not a tar file"),
        (_spec(d, "shards/{00001..00001}.tar"), "data.train", "no image member"),
        (_spec(d, **{"eval.retrieval": [{"name": "r", "data": str(d / "no-caption.tsv")}]}),
         "eval.retrieval.0.csv_caption_key", "no column 'title'"),
        (_spec(d, **{"eval.retrieval": [{"name": "r", "data": str(d / "train.parquet")}]}), "eval.retrieval.0.data",
         "parquet"),
    ]
    for spec, param, words in cases:
        r = svc.http.post("/jobs", json=spec)
        assert r.status_code == 422, (param, r.text)
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], (param, err)
    # the controls: each refused thing, done right, is accepted
    for spec in (_spec(d), _spec(d, "shards/{00000..00001}.tar"), _spec(d, "big-00000.tar"),
                 _spec(d, "train.csv", **{"data.csv_separator": ",", "data.csv_img_key": "path",
                                          "data.csv_caption_key": "caption"}),
                 _spec(d, **{"model.name": "hf-hub:timm/ViT-B-16-SigLIP", "model.pretrained": None}),
                 _spec(d, **{"mining.encoder": "ViT-L-14", "mining.encoder_pretrained": "openai"}),
                 _spec(d, **{"model.name": "tiny-custom", "model.config": TINY, "model.pretrained": None})):
        r = svc.http.post("/jobs", json=spec)
        assert r.status_code == 201, r.text


def test_the_registry_snapshot_is_the_installed_open_clip() -> None:
    from helip import registry

    assert registry.snapshot() == registry.generate(), "regenerate it: python -m helip.registry"
    assert registry.is_architecture("ViT-B-32") and "openai" in registry.tags_of("ViT-B-32")


def _hub_cache(cache: Path, repo: str) -> dict:
    """A Hugging Face cache holding `repo` as open_clip publishes models (open_clip_config.json + weights),
    made here: nothing is downloaded. Returns the weights."""
    import json

    import open_clip
    import torch

    from synthworld.pretrain import TINY_CONFIG

    folder = cache / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIG, "preprocess_cfg": {}}))
    cfg = cache / "hubtest-tiny.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(cfg)
    state = open_clip.create_model("hubtest-tiny").state_dict()
    torch.save(state, snap / "open_clip_pytorch_model.bin")
    return state


def test_an_allowed_hub_model_loads_offline_from_the_weights_cache_and_others_fail_clearly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from core.errors import ModelError, SpecError
    from core.io import Access
    from core.models import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    state = _hub_cache(tmp_path / "cache", "helip-test/tiny-clip")
    service = Access(allowed=(str(tmp_path),), models=("hf-hub:helip-test/",))
    loaded = load_model("hf-hub:helip-test/tiny-clip", access=service, weights_cache=tmp_path / "cache")
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ModelError, match="offline") as e:  # allowed, but neither cached nor downloadable
        load_model("hf-hub:helip-test/not-cached", access=service, weights_cache=tmp_path / "cache")
    assert e.value.param == "model.name"
    with pytest.raises(SpecError, match="HELIP_ALLOWED_MODELS"):
        load_model("hf-hub:someone/else", access=service)
