"""Test-session setup: one CPU thread, offline hub, and the real Postgres / Redis / S3 fixtures."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

# Before anything imports torch: OpenMP threads starve each other on the 2 shared cores (4-5x slower),
# and an open_clip weight lookup without HF_HUB_OFFLINE stalls 46 s on DNS retries.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `from tests.services import ...` works however pytest was launched
    sys.path.insert(0, str(ROOT))

from tests.services import (  # noqa: E402
    SERVICE_FIXTURES,
    ServiceMissing,
    postgres_from_env_or_start,
    redis_from_env_or_start,
    s3_from_env_or_start,
)

_started: list = []  # servers this session owns, so a test that stopped one cannot break the next test


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # tests that touch a real server get the `services` marker: `-m "not services"` skips them all
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> None:
    # torch is imported lazily: API tests assert that the API never imports it
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _services_back_up() -> Iterator[None]:
    yield
    # a fault test that stopped a server and then failed must not take the rest of the session down
    for server in _started:
        if not server.running:
            server.start()


@pytest.fixture(scope="session")
def services_dir() -> Iterator[Path]:
    # not pytest's tmp_path: that lives under a 0700 dir that the `postgres` user cannot traverse
    path = Path(tempfile.mkdtemp(prefix="helip-services-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _own(server, stop: Callable[[], None]):
    if server.controllable:
        _started.append(server)
        atexit.register(stop)  # also on an interrupted session
    return server


def _start(factory, root: Path):
    try:
        return factory(root)
    except ServiceMissing as exc:
        pytest.fail(str(exc), pytrace=False)


def _shutdown(server) -> None:
    if server.controllable:
        server.kill() if server.name.startswith("s3") else server.stop()


@pytest.fixture(scope="session")
def pg_server(services_dir: Path):
    """The Postgres server (ours, or HELIP_TEST_DATABASE_URL's); `.create_database()` gives a fresh URL."""
    server = _own(_start(postgres_from_env_or_start, services_dir), lambda: _shutdown(server))
    yield server
    server.drop_databases()
    _shutdown(server)


@pytest.fixture(scope="session")
def make_pg_database(pg_server) -> Callable[[], str]:
    """Call it for another fresh, empty database (e.g. to run migrations on); dropped at session end."""
    return pg_server.create_database


@pytest.fixture(scope="session")
def pg_url(pg_server) -> str:
    """SQLAlchemy URL of a database created for this session: postgresql+psycopg://postgres@127.0.0.1:P/DB."""
    return pg_server.create_database()


@pytest.fixture(scope="session")
def redis_server(services_dir: Path):
    """The Redis server (ours, no persistence, or HELIP_TEST_REDIS_URL's); `.url` is db 0."""
    server = _own(_start(redis_from_env_or_start, services_dir), lambda: _shutdown(server))
    yield server
    _shutdown(server)


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def s3_server(services_dir: Path):
    """S3 with real credentials: `weed mini` of ours, or HELIP_TEST_S3_ENDPOINT's."""
    server = _own(_start(s3_from_env_or_start, services_dir), lambda: _shutdown(server))
    yield server
    _shutdown(server)


@pytest.fixture(scope="session")
def s3(s3_server):
    """.endpoint, .endpoint_url, .access_key, .secret_key, .client(), .make_bucket(name), stop/start/restart."""
    return s3_server
