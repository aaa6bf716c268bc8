"""Webhooks on the API: the caller's signing secret and each job's delivery log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from api.deps import OwnerDep, SessionDep, SettingsDep
from api.routes.jobs import ERRORS, INT64_MAX, _owned
from api.schemas import WebhookDeliveriesPage, WebhookDeliveryPublic, WebhookSecret
from helip.tables import WebhookDelivery
from helip.webhooks import owner_secret

router = APIRouter(tags=["webhooks"])


@router.get("/webhook-secret", response_model=WebhookSecret, responses=ERRORS)
def get_webhook_secret(owner: OwnerDep, settings: SettingsDep) -> WebhookSecret:
    """The secret that signs the webhooks of the caller's jobs (derived from the service secret and the key)."""
    return WebhookSecret(secret=owner_secret(settings.signing_secret(), owner))


@router.get("/jobs/{job_id}/webhook-deliveries", response_model=WebhookDeliveriesPage, responses=ERRORS)
def job_webhook_deliveries(job_id: str, session: SessionDep, owner: OwnerDep,
                           after: Annotated[int | None, Query(ge=0, le=INT64_MAX,
                                                              description="id of the last delivery seen")] = None,
                           limit: Annotated[int, Query(ge=1, le=1000, description="deliveries per page")] = 100):
    """Every webhook message of the job: its status, attempts and each attempt's answer."""
    _owned(session, job_id, owner)
    stmt = select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
    if after is not None:
        stmt = stmt.where(WebhookDelivery.id > after)
    rows = list(session.scalars(stmt.order_by(WebhookDelivery.id).limit(limit + 1)))
    return {"data": [WebhookDeliveryPublic.model_validate(r) for r in rows[:limit]], "has_more": len(rows) > limit}
