"""Download links for stored job files: presigned S3 URLs, or signed links to the API's own /files route."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi import Request

from helip.links import sign_key
from helip.settings import Settings
from helip.store import Store


def download_url(request: Request, settings: Settings, store: Store, key: str) -> tuple[str, datetime]:
    """(url, expires_at) for `key`; the link works without an API key, like a presigned URL."""
    seconds = settings.presign_seconds
    expires = datetime.now(UTC) + timedelta(seconds=seconds)
    url = store.presigned_get(key, seconds)
    if url is None:  # file:// store: the API streams the file behind an HMAC-signed, expiring token
        base = (settings.public_url or _own_base_url(request)).rstrip("/")
        url = f"{base}/files/{sign_key(settings.signing_secret(), key, seconds)}"
    return url, expires


def _own_base_url(request: Request) -> str:
    """The address this server listens on (HELIP_PUBLIC_URL unset). Never the request's Host header: a client
    could set it to any host, and the link would send the next reader (a browser, a webhook consumer) there."""
    server = request.scope.get("server")
    scheme = request.scope.get("scheme", "http")
    if not server:
        return f"{scheme}://127.0.0.1"
    host, port = server[0], server[1]
    host = f"[{host}]" if ":" in str(host) else host
    default = {"http": 80, "https": 443}.get(scheme)
    root = request.scope.get("root_path", "")
    return f"{scheme}://{host}" + (f":{port}" if port and port != default else "") + root
