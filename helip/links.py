"""Download links for files in a file:// store: opaque, expiring tokens that the API's /files route honours.

The token is Fernet (AES-CBC + HMAC-SHA256, from the `cryptography` package): authenticated *and*
encrypted, so a link says nothing about the job or file it names (a signed-only token, e.g. itsdangerous,
would carry the job id in readable base64). The expiry is inside the encrypted payload.
"""

from __future__ import annotations

import base64
import json
import time
from typing import TYPE_CHECKING

from core.errors import StorageError
from helip.store import clean_key

if TYPE_CHECKING:
    from cryptography.fernet import Fernet

MAX_TOKEN_CHARS = 4096


def _fernet(secret: bytes) -> Fernet:
    from cryptography.fernet import Fernet
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"helip download links").derive(secret)
    return Fernet(base64.urlsafe_b64encode(key))


def sign_key(secret: bytes, key: str, seconds: int, *, now: float | None = None) -> str:
    """An opaque token naming `key` that expires in `seconds`."""
    payload = json.dumps({"k": clean_key(key), "e": int((now if now is not None else time.time()) + seconds)},
                         separators=(",", ":")).encode()
    return _fernet(secret).encrypt(payload).decode().rstrip("=")


def verify_token(secret: bytes, token: str, *, now: float | None = None) -> str:
    """The key a token names; StorageError(code="invalid_token"/"expired_token") when forged or expired."""
    from cryptography.fernet import InvalidToken

    if len(token) > MAX_TOKEN_CHARS:
        raise StorageError("malformed download token", code="invalid_token")
    try:
        payload = _fernet(secret).decrypt(token + "=" * (-len(token) % 4))
        data = json.loads(payload)
        key, expires = str(data["k"]), int(data["e"])
    except (InvalidToken, ValueError, KeyError, TypeError) as exc:
        raise StorageError("invalid download token", code="invalid_token") from exc
    if (now if now is not None else time.time()) > expires:
        raise StorageError("download link expired", code="expired_token")
    return clean_key(key)
