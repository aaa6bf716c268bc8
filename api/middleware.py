"""Two small ASGI middlewares: a request body size limit (413) and a per-key token-bucket rate limit (429).

The rate limit lives in process memory: each API process (uvicorn worker) keeps its own buckets, so with
N processes a key gets up to N times the configured rate. Good enough to stop a runaway client.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body

EXEMPT_PATHS = ("/healthz", "/readyz")


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw})


class BodyLimitMiddleware:
    """Refuse bodies over `max_bytes`: by Content-Length up front, else by counting while buffering."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        too_large = error_body("request_too_large", f"request body is larger than {self.max_bytes} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_json(send, 413, too_large)
            return
        # Chunked bodies carry no length: buffer (at most max_bytes) and replay them to the app.
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _send_json(send, 413, too_large)
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class TokenBucket:
    """`rate_per_minute` tokens per minute, bursts up to the same number; thread-safe."""

    def __init__(self, rate_per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.capacity = float(rate_per_minute)
        self.rate = rate_per_minute / 60.0
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0.0 when a token was taken, else the seconds until one is available."""
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            if len(self._buckets) > 100_000:  # forget idle clients rather than grow without bound
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 120}
            return (1.0 - tokens) / self.rate


def authorization_headers(scope: Scope) -> list[bytes]:
    return [v for k, v in scope["headers"] if k == b"authorization"]


def client_key(scope: Scope, key_ids: dict[bytes, str]) -> str:
    """Whom a request is counted against: the API key it proves (by the key's id, never the key in clear), else
    the client address. An unknown or malformed token counts against the address, so inventing tokens buys
    no fresh budget."""
    auth = authorization_headers(scope)
    if len(auth) == 1 and auth[0][:7].lower() == b"bearer ":
        key_id = _match_key(auth[0][7:].strip(), key_ids)
        if key_id is not None:
            return "key:" + key_id
    client = scope.get("client")
    return "ip:" + (client[0] if client else "unknown")


def _match_key(token: bytes, key_ids: dict[bytes, str]) -> str | None:
    found = None
    for key, key_id in key_ids.items():  # every key compared: the timing does not say which one matched
        if hmac.compare_digest(key, token):
            found = key_id
    return found


class RateLimitMiddleware:
    """Per-key token bucket (429 + Retry-After). Also refuses a request with several Authorization headers (400):
    two credentials are ambiguous, and the limiter and authentication must never read different ones."""

    def __init__(self, app: ASGIApp, rate_per_minute: int, api_keys: list[str] | tuple[str, ...] = ()):
        self.app = app
        self.bucket = TokenBucket(rate_per_minute)
        self.key_ids = {k.encode(): hashlib.sha256(k.encode()).hexdigest()[:32] for k in api_keys}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        wait = self.bucket.take(client_key(scope, self.key_ids))
        if wait > 0:
            retry = str(max(1, math.ceil(wait)))
            await _send_json(send, 429, error_body("rate_limited", f"too many requests; retry in {retry} s"),
                             {"Retry-After": retry})
            return
        if len(authorization_headers(scope)) > 1:
            await _send_json(send, 400, error_body("duplicate_header", "send one Authorization header, not several",
                                                   "Authorization"))
            return
        await self.app(scope, receive, send)
