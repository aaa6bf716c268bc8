"""Job `name` and `metadata`: bounded at submit, returned on the job, and GET /jobs filters (Postgres and SQLite)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from helip import db
from helip.settings import Settings

TINY = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


@pytest.fixture(params=["postgres", "sqlite"])
def client(request, tmp_path: Path) -> TestClient:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text("filepath\ttitle\nimg0.png\ta red square\n")
    common = dict(_env_file=None, data_dir=tmp_path / "state", allowed_data=str(data), api_keys="key-m,key-other",
                  rate_limit_per_minute=100_000)
    if request.param == "postgres":
        url = request.getfixturevalue("make_pg_database")()
        db.upgrade(url)
        settings = Settings(**common, database_url=url, broker_url=request.getfixturevalue("redis_url"),
                            queue_name="helip-meta-" + uuid.uuid4().hex[:8])
    else:
        settings = Settings(**common)
    with TestClient(create_app(settings)) as c:
        c.headers["Authorization"] = "Bearer key-m"
        c.spec = {"model": {"name": "tiny-meta", "config": TINY}, "data": {"train": str(data / "train.tsv")},
                  "train": {"batch_size": 8, "max_steps": 2}}
        yield c


def submit(client: TestClient, **extra) -> dict:
    r = client.post("/jobs", json={**client.spec, **extra})
    assert r.status_code == 201, r.text
    return r.json()


def ids(client: TestClient, query: str) -> list[str]:
    r = client.get(f"/jobs?{query}")
    assert r.status_code == 200, r.text
    return [j["id"] for j in r.json()["data"]]


def test_name_and_metadata_come_back_and_filter_the_list(client: TestClient):
    a = submit(client, name="sweep gamma=0.3", metadata={"team": "vision", "sweep": "g1"})
    b = submit(client, metadata={"team": "vision", "sweep": "g2"})
    c = submit(client, metadata={"team": "nlp"})
    plain = submit(client)
    assert a["name"] == "sweep gamma=0.3" and a["metadata"] == {"team": "vision", "sweep": "g1"}
    assert plain["name"] is None and plain["metadata"] == {}
    got = client.get(f"/jobs/{a['id']}").json()
    assert got["name"] == a["name"] and got["metadata"] == a["metadata"] and got["spec"]["metadata"] == a["metadata"]

    assert ids(client, "metadata.team=vision") == [b["id"], a["id"]]
    assert ids(client, "metadata.team=vision&metadata.sweep=g1") == [a["id"]]
    assert ids(client, "metadata.team=vision&metadata.sweep=g3") == []
    assert ids(client, "metadata.team=nlp&status=queued") == [c["id"]]
    assert ids(client, "metadata.team=nlp&status=running") == []
    assert ids(client, "metadata.owner=x") == []
    assert ids(client, "limit=1&metadata.team=vision&after=" + b["id"]) == [a["id"]]
    assert len(ids(client, "status=queued")) == 4
    other = client.get("/jobs?metadata.team=vision", headers={"Authorization": "Bearer key-other"}).json()
    assert other["data"] == []  # another key never sees these jobs


@pytest.mark.parametrize("extra, param", [
    ({"metadata": {"bad key": "x"}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata"),
    ({"metadata": {f"k{i}": "v" for i in range(33)}}, "metadata"),
    ({"metadata": {"k": 1}}, "metadata.k"),
    ({"metadata": ["k"]}, "metadata"),
    ({"name": "n" * 201}, "name"),
    ({"name": ""}, "name"),
])
def test_out_of_bounds_metadata_is_a_422_naming_the_field(client: TestClient, extra: dict, param: str):
    r = client.post("/jobs", json={**client.spec, **extra})
    assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("query, param", [
    ("metadata.bad%20key=x", "metadata.bad key"),
    ("metadata.k=" + "v" * 513, "metadata.k"),
    ("metadata.k=a&metadata.k=b", "metadata.k"),
    ("status=done", "status"),
])
def test_bad_list_filters_are_a_422_naming_the_parameter(client: TestClient, query: str, param: str):
    r = client.get(f"/jobs?{query}")
    assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text
