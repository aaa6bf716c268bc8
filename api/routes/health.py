"""Liveness (/healthz: the process answers) and readiness (/readyz: database, broker and store reachable)."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import ContextDep
from api.errors import error_body
from api.schemas import Health
from helip.queue import check_broker

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"description": "a dependency is unreachable"}})
def readyz(context: ContextDep):
    checks: dict[str, str] = {}

    def probe(name: str, fn) -> None:  # noqa: ANN001 - a no-argument callable
        try:
            fn()
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            # /readyz answers anyone (load balancers send no key): which dependency failed, never hosts,
            # drivers or messages. The reason goes to the server log.
            log.warning("readiness: %s unreachable: %s: %s", name, type(exc).__name__, str(exc)[:500])
            checks[name] = "unreachable"

    def database() -> None:
        with context.sessions() as session:
            session.execute(text("SELECT 1"))

    probe("database", database)
    probe("broker", lambda: check_broker(context.celery))
    probe("store", lambda: context.store.ping())
    if all(v == "ok" for v in checks.values()):
        return Health(status="ok", checks=checks)
    failed = ", ".join(k for k, v in checks.items() if v != "ok")
    return JSONResponse(error_body("not_ready", f"unreachable: {failed}", None, status="unavailable", checks=checks),
                        status_code=503)
