"""The one settings class of the service (env prefix HELIP_, `.env` file), with embedded defaults for local use."""

from __future__ import annotations

import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:  # core.io is imported lazily: settings must stay importable without the ML stack
    from core.io import Access
    from core.s3 import S3Config


class Settings(BaseSettings):
    """Everything the API, the worker and the CLI read from the environment (README, "Configuration")."""

    model_config = SettingsConfigDict(env_prefix="HELIP_", env_file=".env", extra="ignore")

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Field(default=Path(".helip"), description="local state directory")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default a SQLite file in data_dir")
    broker_url: str | None = Field(default=None, description="Celery broker; default an embedded SQLite broker")
    storage_url: str | None = Field(default=None, description="s3://bucket/prefix or file:///path")
    s3_endpoint_url: str | None = Field(default=None, description="http(s)://host:port or host:port")
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_region: str | None = None
    api_keys: str | None = Field(default=None, description="comma-separated bearer tokens, or a file of them")
    allowed_data: str | None = Field(default=None, description="comma-separated prefixes jobs may read")
    secret_key: str | None = Field(default=None, description="HMAC secret for signed download links")
    public_url: str | None = Field(default=None, description="base URL for download links (default: the request's)")
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    stale_after_seconds: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    requeue_queued_after_seconds: float = Field(
        default=300.0, gt=0,
        description="a queued job nobody claimed for this long is sent to the queue again (a broker that lost "
                    "its messages); the wait doubles after each re-send",
    )
    store_retries: int = Field(default=4, ge=0, le=20,
                               description="retries of a failed S3 or store call, transient failures only "
                                           "(dropped connections, timeouts, 5xx, SlowDown); the wait doubles")
    store_backoff_seconds: float = Field(default=0.5, ge=0, le=60, description="wait before the first retry")
    s3_read_timeout_seconds: float = Field(default=60.0, gt=0, le=3600,
                                           description="longest wait for an S3 server's answer on one request")
    max_body_bytes: int = Field(default=1024 * 1024, ge=1)
    rate_limit_per_minute: int = Field(default=600, ge=1)
    presign_seconds: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    queue_name: str = Field(default="celery", description="the Celery queue jobs are sent to")
    hub_offline: bool = Field(
        default=True,
        description="never contact the Hugging Face hub (open_clip tags and hf-hub: models must be cached); set "
                    "false on a machine with internet access to let workers download weights into weights_cache",
    )
    allowed_models: str | None = Field(
        default=None,
        description="comma-separated hf-hub: prefixes jobs may name as model or pretrained (e.g. "
                    "'hf-hub:timm/,hf-hub:apple/'); none by default",
    )
    location_check_seconds: float = Field(
        default=10.0, gt=0, le=300,
        description="time budget of POST /jobs for checking that a job's locations exist (503 past it)",
    )
    webhook_allowed_hosts: str | None = Field(
        default=None, description="comma-separated hosts (name, or name:port) job webhooks may be sent to; none by default")
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=120, description="connect / read / write bound per delivery")
    webhook_backoff_seconds: float = Field(default=5.0, gt=0, description="wait after the first failed delivery (doubles)")
    webhook_max_attempts: int = Field(default=8, ge=1, le=20, description="attempts before a delivery is marked failed")
    max_active_jobs_per_key: int = Field(
        default=20, ge=1, description="queued + running jobs one API key may have at once (more: 429)")
    store_reap_seconds: float = Field(
        default=600.0, gt=0,
        description="how often each worker's reaper lists the store for objects no row accounts for")
    cache_max_age_days: float = Field(
        default=30.0, gt=0, le=36500,
        description="the store round deletes cached embeddings / hard pairs (cache/) no job used for this long")
    cache_max_bytes: int | None = Field(
        default=None, ge=0,
        description="bound on the cache's size: the least recently used entries are deleted beyond it (none: "
                    "only the age bound)")
    cache_in_use_seconds: float = Field(
        default=3600.0, gt=0,
        description="a cache entry a job looked up or wrote this recently is in use: never deleted by the store round")
    cpu_processes: int = Field(
        default=1, ge=1, le=64, description="DDP processes for a job on a machine without GPUs (train.devices unset)")
    weights_cache: Path | None = Field(
        default=None, description="where open_clip's tagged weights are cached (default: open_clip's own cache)")
    shard_memory_bytes: int = Field(
        default=8 << 30, ge=1 << 20,
        description="memory one worker may spend on one mining shard: with mining.shards null, a large job gets "
                    "enough shards for each to fit (core.mining.shards.auto_shards)")

    @model_validator(mode="after")
    def _defaults_and_safety(self) -> Settings:
        # Production must name every service explicitly: an embedded default there is a misconfiguration.
        if self.environment == "production":
            missing = [
                name for name in ("database_url", "broker_url", "storage_url", "api_keys", "secret_key")
                if not getattr(self, name)
            ]
            if missing:
                raise ValueError(
                    "HELIP_ENVIRONMENT=production refuses embedded defaults and an open API; set "
                    + ", ".join(f"HELIP_{m.upper()}" for m in missing)
                )
            if not self.api_key_list():
                raise ValueError("HELIP_API_KEYS is set but names no key")
        self.data_dir = self.data_dir.expanduser().resolve()
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'helip.sqlite'}"
        if self.broker_url is None:
            self.broker_url = f"sqla+sqlite:///{self.data_dir / 'broker.sqlite'}"
        if self.storage_url is None:
            self.storage_url = (self.data_dir / "store").as_uri()
        if self.allowed_data is None:
            # Not the data directory itself: it holds the database, the store and the secrets.
            self.allowed_data = str(self.datasets_dir)
        if self.public_url is not None:
            parts = urlsplit(self.public_url)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
                raise ValueError("HELIP_PUBLIC_URL must be an http(s)://host[:port][/path] URL")
        return self

    # -- derived values -------------------------------------------------------------------------------

    @property
    def embedded(self) -> bool:
        """True when the database is SQLite: the API and worker create/upgrade the schema themselves."""
        return str(self.database_url).startswith("sqlite")

    def api_key_list(self) -> list[str]:
        """The accepted bearer tokens; empty means the API is open (local use only)."""
        raw = (self.api_keys or "").strip()
        if not raw:
            return []
        path = Path(raw).expanduser()
        if "," not in raw and path.is_file():
            lines = path.read_text().splitlines()
            return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        return [k.strip() for k in raw.split(",") if k.strip()]

    def allowed_model_prefixes(self) -> tuple[str, ...]:
        """hf-hub: prefixes jobs may use; each must start with 'hf-hub:' and name an organisation."""
        out = tuple(p.strip() for p in (self.allowed_models or "").split(",") if p.strip())
        for p in out:
            if not p.startswith("hf-hub:") or len(p) <= len("hf-hub:"):
                raise ValueError(f"HELIP_ALLOWED_MODELS: {p!r} is not an hf-hub: prefix (e.g. hf-hub:timm/)")
        return out

    def allowed_prefixes(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in str(self.allowed_data).split(",") if p.strip())

    @property
    def datasets_dir(self) -> Path:
        """The one folder inside the data directory that jobs may read (the embedded default allowed data)."""
        return self.data_dir / "datasets"

    def service_state(self) -> tuple[str, ...]:
        """Locations of the service's own state: never readable as job data, whatever HELIP_ALLOWED_DATA says.

        The data directory (database, broker, store, secrets, work and kept directories, logs) except its
        datasets/ folder; a database, broker or store configured elsewhere; the API key file; the .env file.
        """
        out = [str(self.data_dir)]
        for url in (self.database_url, self.broker_url):
            path = _sqlite_path(url)
            if path is not None:  # SQLite keeps -wal, -shm and -journal files next to the database
                out += [path, path + "-wal", path + "-shm", path + "-journal"]
        store = urlsplit(str(self.storage_url))
        if store.scheme == "file":
            out.append(unquote(store.path))
        elif store.scheme == "s3" and store.netloc:
            out.append(f"s3://{store.netloc}/{store.path.strip('/')}")
        raw = (self.api_keys or "").strip()
        if raw and "," not in raw and Path(raw).expanduser().is_file():
            out.append(str(Path(raw).expanduser().resolve()))
        out.append(str(Path(".env").resolve()))
        return tuple(out)

    def s3_config(self) -> S3Config | None:
        """core.s3.S3Config for the configured endpoint (one for job reads and the store), or None without one."""
        if not self.s3_endpoint_url:
            return None
        from core.s3 import S3Config

        return S3Config(
            endpoint=self.s3_endpoint_url, access_key=self.s3_access_key or "", secret_key=self.s3_secret_key or "",
            region=self.s3_region, attempts=self.store_retries + 1, backoff=self.store_backoff_seconds,
            read_timeout=self.s3_read_timeout_seconds,
        )

    def access(self) -> Access:
        """What submitted jobs may read: the allowed prefixes plus the S3 credentials."""
        from core.io import Access

        return Access(allowed=self.allowed_prefixes(), s3=self.s3_config(), denied=self.service_state(),
                      denied_except=(str(self.datasets_dir),), models=self.allowed_model_prefixes())

    def signing_secret(self) -> bytes:
        """HMAC key for file:// download links; in development generated once and kept in data_dir."""
        if self.secret_key:
            return self.secret_key.encode()
        path = self.data_dir / "secret_key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{secrets.token_hex(4)}.tmp")
            tmp.write_text(secrets.token_hex(32))
            tmp.chmod(0o600)
            try:  # another process may have won the race: keep its secret, so links agree across processes
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        return path.read_text().strip().encode()


def _sqlite_path(url: str | None) -> str | None:
    """The database file of a sqlite:/// (or sqla+sqlite:///) URL, resolved; None for other URLs."""
    if not url or "sqlite:///" not in url:
        return None
    path = url.split("sqlite:///", 1)[1].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return os.path.realpath(path if path.startswith("/") else os.path.abspath(path))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment; tests build Settings(...) instead."""
    return Settings()
