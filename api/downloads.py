"""Download links for stored job files: presigned S3 URLs, or signed links to the API's own /files route."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi import Request

from helip.settings import Settings
from helip.store import Store, sign_key


def download_url(request: Request, settings: Settings, store: Store, key: str) -> tuple[str, datetime]:
    """(url, expires_at) for `key`; the link works without an API key, like a presigned URL."""
    seconds = settings.presign_seconds
    expires = datetime.now(UTC) + timedelta(seconds=seconds)
    url = store.presigned_get(key, seconds)
    if url is None:  # file:// store: the API streams the file behind an HMAC-signed, expiring token
        base = (settings.public_url or str(request.base_url)).rstrip("/")
        url = f"{base}/files/{sign_key(settings.signing_secret(), key, seconds)}"
    return url, expires
