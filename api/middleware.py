"""Two small ASGI middlewares: a request body size limit (413) and a per-key token-bucket rate limit (429).

The rate limit lives in process memory: each API process (uvicorn worker) keeps its own buckets, so with
N processes a key gets up to N times the configured rate. Good enough to stop a runaway client.
"""

from __future__ import annotations

import hashlib
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


def client_key(scope: Scope) -> str:
    """Who is calling: the bearer token (hashed; never kept in clear) or, without one, the client address."""
    auth = dict(scope["headers"]).get(b"authorization", b"")
    if auth[:7].lower() == b"bearer " and auth[7:].strip():
        return "key:" + hashlib.sha256(auth[7:].strip()).hexdigest()[:32]
    client = scope.get("client")
    return "ip:" + (client[0] if client else "unknown")


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, rate_per_minute: int):
        self.app = app
        self.bucket = TokenBucket(rate_per_minute)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        wait = self.bucket.take(client_key(scope))
        if wait > 0:
            retry = str(max(1, math.ceil(wait)))
            await _send_json(send, 429, error_body("rate_limited", f"too many requests; retry in {retry} s"),
                             {"Retry-After": retry})
            return
        await self.app(scope, receive, send)
