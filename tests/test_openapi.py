"""/openapi.json: clean operationIds, a description on every field, and a generated client that works against a real server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from api.main import create_app
from helip.settings import Settings
from tests.services import free_ports

ROOT = Path(__file__).resolve().parent.parent
# openapi-python-client caps typer below the version the project pins, so it lives in a tool venv of its own.
GENERATOR = ("openapi-python-client==0.29.1", "python-dateutil==2.9.0.post0")
TOOL_DIR = Path(os.environ.get("HELIP_TOOLS_DIR", Path.home() / ".cache" / "helip" / "tools")) / "openapi-python-client-0.29.1"
EXPECTED_IDS = {
    ("post", "/jobs"): "create_job", ("get", "/jobs"): "list_jobs", ("get", "/jobs/{job_id}"): "get_job",
    ("post", "/jobs/{job_id}/cancel"): "cancel_job", ("get", "/jobs/{job_id}/metrics"): "get_job_metrics",
    ("get", "/jobs/{job_id}/events"): "list_job_events", ("get", "/jobs/{job_id}/checkpoints"): "list_job_checkpoints",
    ("get", "/jobs/{job_id}/hard-pairs"): "get_job_hard_pairs", ("get", "/files/{token}"): "download_file",
    ("get", "/jobs/{job_id}/guard"): "get_job_guard",
    ("get", "/healthz"): "get_health", ("get", "/readyz"): "get_readiness",
}
FASTAPI_OWN = {"HTTPValidationError", "ValidationError"}  # FastAPI's default 422 shapes, not ours


@pytest.fixture(scope="module")
def schema(tmp_path_factory) -> dict:
    return create_app(Settings(_env_file=None, data_dir=tmp_path_factory.mktemp("openapi"))).openapi()


def test_every_operation_has_a_clean_unique_id(schema: dict):
    ids = {(method, path): op["operationId"] for path, ops in schema["paths"].items() for method, op in ops.items()}
    assert len(set(ids.values())) == len(ids)
    for (method, path), op_id in ids.items():
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", op_id), op_id
        assert not op_id.endswith(f"_{method}"), f"{method} {path}: {op_id} is FastAPI's generated name"
    assert {k: v for k, v in ids.items() if k in EXPECTED_IDS} == EXPECTED_IDS


def _undescribed(schema: dict) -> list[str]:
    out = []
    for name, component in schema["components"]["schemas"].items():
        if name in FASTAPI_OWN:
            continue
        for prop, body in component.get("properties", {}).items():
            if not str(body.get("description", "")).strip():
                out.append(f"{name}.{prop}")
    return out


def test_every_field_of_the_spec_and_of_the_job_has_a_description(schema: dict):
    names = set(schema["components"]["schemas"])
    assert {"JobCreate", "JobPublic", "TrainSpec", "DataSpec", "HelipSpec", "EvalSpec", "MiningSpec"} <= names
    assert _undescribed(schema) == []


def test_the_walk_finds_a_missing_description():
    fake = {"components": {"schemas": {"TrainSpec": {"properties": {"lr": {"type": "number"},
                                                                    "seed": {"description": "x"}}}}}}
    assert _undescribed(fake) == ["TrainSpec.lr"]


def _generator() -> Path:
    """The generator's own venv (created on first use from the package registry)."""
    exe = TOOL_DIR / "bin" / "openapi-python-client"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TOOL_DIR)], check=True, timeout=300)
        subprocess.run([str(TOOL_DIR / "bin" / "pip"), "install", "-q", *GENERATOR], check=True, timeout=900)
    return TOOL_DIR


USE_GENERATED = """
import json, sys
from helip_client import AuthenticatedClient
from helip_client.api.jobs import create_job, get_job, list_jobs, list_job_events
from helip_client.models import JobCreate
base, key, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
client = AuthenticatedClient(base_url=base, token=key, raise_on_unexpected_status=True)
made = create_job.sync_detailed(client=client, body=JobCreate.from_dict(spec))
job = made.parsed
read = get_job.sync(job.id, client=client)
page = list_jobs.sync(client=client, limit=10)
bad = create_job.sync_detailed(client=client, body=JobCreate.from_dict({**spec, "train": {"lr": -1}}))
print(json.dumps({"status_code": int(made.status_code), "id": job.id, "status": job.status,
                  "read_id": read.id, "read_seed": read.seed, "listed": [j.id for j in page.data],
                  "bad_status": int(bad.status_code), "bad_param": bad.parsed.error.param,
                  "events_type": type(list_job_events.sync(job.id, client=client)).__name__}))
"""


@pytest.mark.slow
def test_a_generated_client_submits_and_reads_a_job_on_a_real_server(tmp_path: Path):
    tool = _generator()
    data = tmp_path / "data"
    (data / "shapes" / "circle").mkdir(parents=True)
    (data / "shapes" / "circle" / "0.png").write_bytes(b"png")
    (data / "train.tsv").write_text("filepath\ttitle\nimg0.png\ta red square\n")
    port = free_ports(1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELIP_")}
    env.update(PYTHONPATH=str(ROOT), HELIP_DATA_DIR=str(tmp_path / "state"), HELIP_ALLOWED_DATA=str(data),
               HELIP_API_KEYS="gen-key")
    with open(tmp_path / "api.log", "wb") as log:
        api = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host",
                                "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert api.poll() is None and time.monotonic() < deadline, (tmp_path / "api.log").read_text()[-3000:]
            time.sleep(0.2)
        (tmp_path / "openapi.json").write_text(httpx.get(base + "/openapi.json").text)
        gen = subprocess.run([str(tool / "bin" / "openapi-python-client"), "generate", "--path", "openapi.json",
                              "--output-path", "helip_client", "--meta", "none"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
        assert gen.returncode == 0, gen.stdout + gen.stderr
        assert (tmp_path / "helip_client" / "api" / "jobs" / "get_job_metrics.py").is_file()
        spec = {"model": {"name": "RN50"}, "data": {"train": str(data / "train.tsv")},
                "train": {"batch_size": 8, "max_steps": 2}}
        run = subprocess.run([str(tool / "bin" / "python"), "-c", USE_GENERATED, base, "gen-key", json.dumps(spec)],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120,
                             env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(tmp_path)})
        assert run.returncode == 0, run.stdout + run.stderr
        out = json.loads(run.stdout)
    finally:
        api.terminate()
        api.wait(timeout=20)
    assert out["status_code"] == 201 and out["status"] == "queued" and out["id"].startswith("job-")
    assert out["read_id"] == out["id"] and isinstance(out["read_seed"], int) and out["listed"] == [out["id"]]
    assert out["bad_status"] == 422 and out["bad_param"] == "train.lr"
    assert out["events_type"] == "EventsPage"
