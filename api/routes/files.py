"""Downloads from a file:// store: /files/{token}, where the token is an HMAC-signed, expiring key."""

from __future__ import annotations

from pathlib import PurePosixPath

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api.deps import SettingsDep, StoreDep
from api.errors import ApiError, not_found
from core.errors import StorageError
from helip.links import verify_token

router = APIRouter(tags=["files"])


@router.get("/files/{token}", response_class=FileResponse,
            responses={403: {"description": "invalid or expired link"}, 404: {"description": "no such file"}})
def download(token: str, settings: SettingsDep, store: StoreDep) -> FileResponse:
    """Stream a stored file; the link itself is the credential (like a presigned URL), no API key needed."""
    try:
        key = verify_token(settings.signing_secret(), token)
    except StorageError as exc:
        raise ApiError(403, exc.code, exc.message) from None
    path = store.local_path(key)
    if path is None or not path.is_file():
        raise not_found("file")
    return FileResponse(path, filename=PurePosixPath(key).name, media_type="application/octet-stream")
