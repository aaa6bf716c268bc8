"""The dashboard's endpoints over a real Postgres and a mined job: hard-pair rows against a slow reference,
thumbnails (owner only, rows of the job's own index only, never outside its allowed data, never loading torch),
/docs offline."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.main import create_app
from helip import crud, db
from helip.settings import Settings
from helip.store import FileStore, job_key

KEY, OTHER = "key-ui-owner", "key-ui-other"
TINY = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def allowed(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ui-allowed")


@pytest.fixture(scope="module")
def world(allowed: Path):
    from synthworld.world import generate_world

    return generate_world(allowed / "world", n_train=64, n_retrieval=8, zeroshot_per_class=1, probe_per_class=(1, 1),
                          shards=2, seed=5, image_size=64)


@pytest.fixture(scope="module")
def settings(pg_url: str, redis_url: str, allowed: Path, tmp_path_factory) -> Settings:
    db.upgrade(pg_url)
    state = tmp_path_factory.mktemp("ui-state")
    return Settings(_env_file=None, data_dir=state, database_url=pg_url, broker_url=redis_url,
                    storage_url=(state / "store").as_uri(), allowed_data=str(allowed),
                    api_keys=f"{KEY},{OTHER}", secret_key="s", queue_name="helip-ui-" + uuid.uuid4().hex[:8],
                    rate_limit_per_minute=100_000)


@pytest.fixture(scope="module")
def client(settings: Settings):
    with TestClient(create_app(settings)) as c:
        yield c


def spec_for(train: str) -> dict[str, Any]:
    return {"model": {"name": "tiny-ui-test", "config": TINY}, "data": {"train": train, "workers": 0},
            "mining": {"top_k": 6, "batch_size": 32}, "helip": {"hard_per_target": 1, "sample_from": 6},
            "train": {"batch_size": 8, "max_steps": 2, "seed": 1}}


def submit(client: TestClient, spec: dict[str, Any], key: str = KEY) -> str:
    r = client.post("/jobs", json=spec, headers=auth(key))
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.fixture(scope="module")
def mined(client: TestClient, settings: Settings, world, tmp_path_factory) -> dict[str, Any]:
    """A job whose embedding and mining really ran (core.pipeline, mine only), its files stored and recorded
    the way the worker stores them."""
    from core.pipeline import run_job
    from core.progress import CollectingReporter

    job_id = submit(client, spec_for(str(world.train_csv)))
    spec = client.get(f"/jobs/{job_id}", headers=auth(KEY)).json()["spec"]
    workdir = tmp_path_factory.mktemp("ui-work")
    run_job(spec, workdir, access=settings.access(), reporter=CollectingReporter(), mine_only=True)
    store = FileStore(Path(settings.storage_url.removeprefix("file://")))
    sessions = db.session_factory(settings)
    with sessions() as s:
        for name, file in (("hard_pairs", "hard_pairs.parquet"), ("embeddings", "embeddings.npz")):
            key = job_key(job_id, file)
            sha, size = store.put_file(key, workdir / file)
            crud.record_artifact(s, job_id=job_id, name=name, key=key, sha256=sha, size=size)
        s.commit()
    return {"id": job_id, "spec": spec, "workdir": workdir}


def reference_score(ct: float, cv: float, mining: dict[str, Any]) -> float:
    """HELIP's pair score from the two cosines, written out (core.mining.pair_scores_reference's rule)."""
    if ct > mining["duplicate_threshold"]:
        ct = 0.0
    if cv > mining["duplicate_threshold"]:
        cv = 0.0
    if mining["clamp_negative"]:
        ct, cv = max(ct, 0.0), max(cv, 0.0)
    return ct * cv


def test_a_row_shows_its_neighbours_with_scores_that_match_the_embeddings(client: TestClient, mined, world):
    from core.mining import read_hard_pairs

    table, keys = read_hard_pairs(mined["workdir"] / "hard_pairs.parquet")
    with np.load(mined["workdir"] / "embeddings.npz") as z:
        text, image = z["text"].astype(np.float64), z["image"].astype(np.float64)
    captions = [line.split("\t")[1] for line in world.train_csv.read_text().splitlines()[1:]]
    mining = mined["spec"]["mining"]
    for row in (0, 17, 63):
        r = client.get(f"/jobs/{mined['id']}/hard-pairs/{row}", headers=auth(KEY))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["row"] == row and body["key"] == keys[row] and body["num_rows"] == 64 and body["top_k"] == 6
        assert body["scores"] == ["product", "text_cosine", "image_cosine"] and body["notes"] == []
        want = [int(n) for n in table.neighbors[row] if n >= 0]
        assert [n["row"] for n in body["neighbors"]] == want and len(want) == 6
        assert body["caption"] == captions[row] and body["neighbors"][0]["caption"] == captions[want[0]]
        for n in body["neighbors"]:
            ct, cv = float(text[row] @ text[n["row"]]), float(image[row] @ image[n["row"]])
            assert n["text_cosine"] == pytest.approx(ct, abs=1e-6) and n["image_cosine"] == pytest.approx(cv, abs=1e-6)
            # the stored product is the mining rule applied to these very cosines
            assert n["score"] == pytest.approx(reference_score(ct, cv, mining), abs=1e-5)
            assert n["key"] == keys[n["row"]]
        # the row's filter counts against a loop over every other row
        same = dup = 0
        for j in range(64):
            if j == row:
                continue
            ct, cv = float(text[row] @ text[j]), float(image[row] @ image[j])
            if ct > mining["same_caption_threshold"]:
                same += 1
            elif ct > mining["duplicate_threshold"] or cv > mining["duplicate_threshold"]:
                dup += 1
        assert body["filters"]["row"] == {"candidates": 63, "same_caption": same, "duplicate": dup}
        assert body["filters"]["job"]["method"] == "exact"


def test_rows_are_picked_by_best_score_or_at_random(client: TestClient, mined):
    from core.mining import read_hard_pairs

    table, _ = read_hard_pairs(mined["workdir"] / "hard_pairs.parquet")
    best = {r: float(table.scores[r, 0]) for r in range(64)}
    url = f"/jobs/{mined['id']}/hard-pairs/rows"
    high = client.get(url, params={"order": "highest", "limit": 5}, headers=auth(KEY)).json()
    assert high["num_rows"] == 64 and high["mined_rows"] == 64
    want = sorted(best, key=lambda r: (-best[r], r))[:5]
    assert [d["row"] for d in high["data"]] == want
    assert [d["score"] for d in high["data"]] == pytest.approx([best[r] for r in want])
    low = client.get(url, params={"order": "lowest", "limit": 3, "offset": 1}, headers=auth(KEY)).json()
    assert [d["row"] for d in low["data"]] == sorted(best, key=lambda r: (best[r], r))[1:4]
    a = client.get(url, params={"order": "random", "limit": 8, "seed": 3}, headers=auth(KEY)).json()["data"]
    b = client.get(url, params={"order": "random", "limit": 8, "seed": 3}, headers=auth(KEY)).json()["data"]
    assert a == b and len({d["row"] for d in a}) == 8
    bad = client.get(url, params={"order": "sideways"}, headers=auth(KEY))
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "order"


def _decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    assert im.format == "JPEG"
    return im.convert("RGB")


def _diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b.resize(a.size), dtype=np.float64)).mean())


def test_a_thumbnail_is_the_rows_own_image_resized_and_cached(client: TestClient, mined, world, settings):
    rows = [line.split("\t")[0] for line in world.train_csv.read_text().splitlines()[1:]]
    own = Image.open(world.train_csv.parent / rows[5]).convert("RGB")
    other = Image.open(world.train_csv.parent / rows[6]).convert("RGB")
    r = client.get(f"/jobs/{mined['id']}/thumbnails/5", params={"size": 32}, headers=auth(KEY))
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb = _decode(r.content)
    assert own.size == (64, 64) and thumb.size == (32, 32)
    assert _diff(thumb, own) < 0.5 * _diff(thumb, other)
    big = _decode(client.get(f"/jobs/{mined['id']}/thumbnails/5", params={"size": 256}, headers=auth(KEY)).content)
    assert big.size == (64, 64)  # never enlarged
    # served from the cache: the same bytes even once the file is gone
    path = world.train_csv.parent / rows[7]
    first = client.get(f"/jobs/{mined['id']}/thumbnails/7", headers=auth(KEY))
    saved = path.read_bytes()
    path.unlink()
    try:
        again = client.get(f"/jobs/{mined['id']}/thumbnails/7", headers=auth(KEY))
        assert again.status_code == 200 and again.content == first.content
    finally:
        path.write_bytes(saved)


def test_another_keys_job_and_rows_out_of_range_are_refused(client: TestClient, mined):
    job = mined["id"]
    for url in (f"/jobs/{job}/thumbnails/0", f"/jobs/{job}/hard-pairs/0", f"/jobs/{job}/hard-pairs/rows"):
        r = client.get(url, headers=auth(OTHER))
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", url
        assert client.get(url).status_code == 401
    for url in (f"/jobs/{job}/thumbnails/64", f"/jobs/{job}/hard-pairs/64", f"/jobs/{job}/thumbnails/99999"):
        r = client.get(url, headers=auth(KEY))
        assert r.status_code == 404 and r.json()["error"]["code"] == "row_not_found", (url, r.text)
    for row in ("-1", "x", str(2**63), "1.5"):
        r = client.get(f"/jobs/{job}/thumbnails/{row}", headers=auth(KEY))
        assert r.status_code == 422 and r.json()["error"]["param"] == "row", (row, r.text)
    for size in ("0", "8", "4096"):
        r = client.get(f"/jobs/{job}/thumbnails/0", params={"size": size}, headers=auth(KEY))
        assert r.status_code == 422 and r.json()["error"]["param"] == "size"
    assert client.get("/jobs/job-000000000000000000000000/thumbnails/0", headers=auth(KEY)).status_code == 404


def test_thumbnails_never_read_outside_the_jobs_allowed_data(client: TestClient, settings, allowed: Path, world,
                                                              tmp_path: Path):
    secret = tmp_path / "secret.png"  # outside every allowed prefix
    Image.new("RGB", (16, 16), (255, 0, 0)).save(secret)
    data = allowed / "outside-rows"
    data.mkdir()
    shutil.copy(world.train_csv.parent / world.train_csv.read_text().splitlines()[1].split("\t")[0], data / "ok.png")
    (data / "link.png").symlink_to(secret)
    rel = Path(*([".."] * len(data.parts))) / secret.relative_to(secret.anchor)
    (data / "train.tsv").write_text(f"filepath\ttitle\nok.png\ta thing\nlink.png\ta link\n{rel}\tup and out\n")
    # A job whose rows point outside (a symlink, a ../ path): its index is refused as the job's own would be,
    # so no row of it is read at all.
    job = submit(client, spec_for(str(data / "train.tsv")))
    for row in (0, 1, 2):
        r = client.get(f"/jobs/{job}/thumbnails/{row}", headers=auth(KEY))
        assert r.status_code == 409 and r.json()["error"]["param"] == "data.train", r.text
        assert r.headers["content-type"] == "application/json"
    # A row whose file becomes a symlink to the outside after the index was built: the read itself is checked.
    (data / "train.tsv").write_text("filepath\ttitle\nok.png\ta thing\n")
    job = submit(client, spec_for(str(data / "train.tsv")))
    assert client.get(f"/jobs/{job}/thumbnails/0", params={"size": 32}, headers=auth(KEY)).status_code == 200
    (data / "ok.png").rename(data / "was-ok.png")
    (data / "ok.png").symlink_to(secret)
    r = client.get(f"/jobs/{job}/thumbnails/0", params={"size": 48}, headers=auth(KEY))
    assert r.status_code == 404 and r.json()["error"]["code"] == "row_unusable", r.text
    (data / "ok.png").unlink()
    (data / "was-ok.png").rename(data / "ok.png")
    # The allowed prefixes are read per request: data the service no longer allows is not read, even for an
    # index built when it was allowed.
    narrowed = settings.model_copy(update={"allowed_data": str(tmp_path / "elsewhere")})
    with TestClient(create_app(narrowed)) as c:
        r = c.get(f"/jobs/{job}/thumbnails/0", headers=auth(KEY))
        assert r.status_code == 409 and r.json()["error"]["param"] == "data.train", r.text


def test_a_job_whose_data_changed_is_refused_not_shown_with_other_images(client: TestClient, settings, mined, world):
    lines = world.train_csv.read_text().splitlines()
    original = world.train_csv.read_text()
    world.train_csv.write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]) + "\n")  # rows 0 and 1 swapped
    try:
        with TestClient(create_app(settings)) as c:  # a fresh process: no index cached yet
            r = c.get(f"/jobs/{mined['id']}/thumbnails/0", headers=auth(KEY))
            assert r.status_code == 409 and r.json()["error"]["code"] == "data_changed", r.text
    finally:
        world.train_csv.write_text(original)


def test_a_webdataset_jobs_thumbnails_come_from_its_shards(client: TestClient, world):
    job = submit(client, spec_for(world.train_shards))
    csv_rows = [line.split("\t")[0] for line in world.train_csv.read_text().splitlines()[1:]]
    r = client.get(f"/jobs/{job}/thumbnails/3", params={"size": 32}, headers=auth(KEY))
    assert r.status_code == 200, r.text
    assert max(_decode(r.content).size) <= 32
    assert _diff(_decode(r.content), Image.open(world.train_csv.parent / csv_rows[3]).convert("RGB")) < 20
    assert client.get(f"/jobs/{job}/thumbnails/64", headers=auth(KEY)).json()["error"]["code"] == "row_not_found"
    # no mined table yet: the browser's rows say so
    r = client.get(f"/jobs/{job}/hard-pairs/3", headers=auth(KEY))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_available"


def test_jobs_filter_by_status(client: TestClient):
    key = KEY  # the jobs submitted above are queued (no worker here); one of them gets cancelled
    page = client.get("/jobs", params={"status": "queued", "limit": 100}, headers=auth(key)).json()
    assert page["data"] and {j["status"] for j in page["data"]} == {"queued"}
    job = page["data"][0]["id"]
    assert client.post(f"/jobs/{job}/cancel", headers=auth(key)).json()["status"] == "cancelled"
    cancelled = client.get("/jobs", params={"status": "cancelled"}, headers=auth(key)).json()["data"]
    assert [j["id"] for j in cancelled] == [job]
    assert job not in [j["id"] for j in client.get("/jobs", params={"status": "queued", "limit": 100},
                                                    headers=auth(key)).json()["data"]]
    r = client.get("/jobs", params={"status": "done"}, headers=auth(key))
    assert r.status_code == 422 and r.json()["error"]["param"] == "status"


def test_docs_and_the_dashboard_load_with_no_other_host(client: TestClient):
    for page in ("/docs", "/ui/"):
        r = client.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        refs = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']+)["\']', r.text)
        assert refs, page
        assert not [u for u in refs if re.match(r"^[a-z]+:|^//", u, re.I)], refs
        for url in refs:
            if url.startswith("#"):
                continue
            full = url if url.startswith("/") else "/ui/" + url
            asset = client.get(full)
            assert asset.status_code == 200 and len(asset.content) > 100, full
    docs = client.get("/docs").text
    assert '"validatorUrl": null' in docs  # Swagger UI would otherwise send the schema to a public validator
    assert "cdn" not in docs.lower() and "http://" not in docs and "https://" not in docs
    assert client.get("/redoc").status_code == 404
    assert client.get("/ui", follow_redirects=False).headers["location"] == "/ui/"
    csp = client.get("/ui/").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    js = client.get("/ui/static/app.js").text
    assert "http://" not in js and "https://" not in js
    uplot = client.get("/ui/static/vendor/uplot/uPlot.iife.min.js")
    assert uplot.status_code == 200 and "uPlot" in uplot.text


# A fresh API process (no test module has imported torch into it) serves a thumbnail and a hard-pair row (the
# job's index, its captions), then says which torch-bound modules it holds.
SERVE_AND_LIST = """
import sys
from fastapi.testclient import TestClient
from api.main import create_app
from helip.settings import Settings
job, key = sys.argv[1], sys.argv[2]
with TestClient(create_app(Settings(_env_file=None))) as c:
    for url in (f"/jobs/{job}/thumbnails/3?size=32", f"/jobs/{job}/hard-pairs/3"):
        r = c.get(url, headers={"Authorization": "Bearer " + key})
        assert r.status_code == 200, (url, r.status_code, r.text)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "open_clip")))
"""


def test_serving_thumbnails_never_imports_torch(settings: Settings, mined, tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELIP_")}
    env.update(HELIP_DATA_DIR=str(tmp_path), HELIP_DATABASE_URL=settings.database_url or "",
               HELIP_BROKER_URL=settings.broker_url or "", HELIP_STORAGE_URL=settings.storage_url or "",
               HELIP_ALLOWED_DATA=settings.allowed_data or "", HELIP_API_KEYS=f"{KEY},{OTHER}", HELIP_SECRET_KEY="s",
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    done = subprocess.run([sys.executable, "-c", SERVE_AND_LIST, mined["id"], KEY], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
