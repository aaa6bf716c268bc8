"""The webhook destination check at submit: a job may only name a host the operator allowed."""

from __future__ import annotations

from api.errors import ApiError
from core.spec import JobSpec
from helip.settings import Settings
from helip.webhooks import destination_problem


def check_webhook(spec: JobSpec, settings: Settings) -> None:
    """A 422 naming webhook.url unless its destination is allowed (HELIP_WEBHOOK_ALLOWED_HOSTS; none by default)."""
    if spec.webhook is None:
        return
    problem = destination_problem(spec.webhook.url, settings)
    if problem is not None:
        raise ApiError(422, "webhook_not_allowed", f"webhook.url: {problem}", param="webhook.url")
