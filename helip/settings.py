"""The one settings class of the service (env prefix HELIP_, `.env` file), with embedded defaults for local use."""

from __future__ import annotations

import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:  # core.io is imported lazily: settings must stay importable without the ML stack
    from core.io import Access, S3Config


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
    store_retries: int = Field(default=4, ge=0, description="retries of a failed store call (backoff doubles)")
    store_backoff_seconds: float = Field(default=0.5, ge=0, description="wait before the first store retry")
    max_body_bytes: int = Field(default=1024 * 1024, ge=1)
    rate_limit_per_minute: int = Field(default=600, ge=1)
    presign_seconds: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    queue_name: str = Field(default="celery", description="the Celery queue jobs are sent to")
    max_active_jobs_per_key: int = Field(
        default=20, ge=1, description="queued + running jobs one API key may have at once (more: 429)")
    store_reap_seconds: float = Field(
        default=600.0, gt=0,
        description="how often each worker's reaper lists the store for objects no row accounts for")
    cpu_processes: int = Field(
        default=1, ge=1, le=64, description="DDP processes for a job on a machine without GPUs (train.devices unset)")
    weights_cache: Path | None = Field(
        default=None, description="where open_clip's tagged weights are cached (default: open_clip's own cache)")

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
            self.allowed_data = str(self.data_dir)
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

    def allowed_prefixes(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in str(self.allowed_data).split(",") if p.strip())

    def s3_config(self) -> S3Config | None:
        """core.io.S3Config for the configured endpoint, or None when no S3 endpoint is set."""
        if not self.s3_endpoint_url:
            return None
        from core.io import S3Config

        endpoint, secure = split_endpoint(self.s3_endpoint_url)
        return S3Config(
            endpoint=endpoint, access_key=self.s3_access_key or "", secret_key=self.s3_secret_key or "",
            secure=secure, region=self.s3_region,
        )

    def access(self) -> Access:
        """What submitted jobs may read: the allowed prefixes plus the S3 credentials."""
        from core.io import Access

        return Access(allowed=self.allowed_prefixes(), s3=self.s3_config())

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


def split_endpoint(url: str) -> tuple[str, bool]:
    """`http://h:p` / `https://h:p` / `h:p` -> ("h:p", secure), the form the minio client wants."""
    if "://" not in url:
        return url.rstrip("/"), False
    parts = urlsplit(url)
    return parts.netloc, parts.scheme == "https"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment; tests build Settings(...) instead."""
    return Settings()
