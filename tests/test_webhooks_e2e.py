"""Webhooks end to end: a real API and Celery worker on Postgres and Redis POST signed job events to loopback
receivers that verify them with the standardwebhooks package."""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator

import pytest
from standardwebhooks import Webhook

from helip import db
from helip.client import Client, HelipAPIError
from tests.test_service_e2e import KEY, ROOT, Service, job_spec, world  # noqa: F401 - world is a fixture
from tests.test_webhooks import Receiver

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def service(make_pg_database, redis_url, world, tmp_path_factory) -> Iterator[Service]:  # noqa: F811
    url = make_pg_database()
    db.upgrade(url)
    logs = tmp_path_factory.mktemp("webhooks-e2e")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELIP_")}
    env.update(
        PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
        HELIP_ENVIRONMENT="production", HELIP_DATABASE_URL=url, HELIP_BROKER_URL=redis_url,
        HELIP_STORAGE_URL=(logs / "store").as_uri(), HELIP_API_KEYS=KEY, HELIP_SECRET_KEY="webhook-secret",
        HELIP_ALLOWED_DATA=str(world.root), HELIP_DATA_DIR=str(logs / "data"),
        HELIP_QUEUE_NAME=f"webhooks-{secrets.token_hex(4)}", HELIP_HEARTBEAT_SECONDS="1",
        HELIP_WEBHOOK_ALLOWED_HOSTS="127.0.0.1", HELIP_WEBHOOK_BACKOFF_SECONDS="0.5",
    )
    svc = Service(env, logs)
    svc.worker = svc.start_worker("hooks", HELIP_STALE_AFTER_SECONDS="120")
    yield svc
    svc.close()


def settle(client: Client, job_id: str, n: int, timeout: float = 120):  # noqa: ANN201
    deadline = time.monotonic() + timeout
    while True:
        rows = client.webhook_deliveries(job_id)
        if len(rows) >= n and all(r.status != "pending" for r in rows):
            return rows
        assert time.monotonic() < deadline, [r.model_dump() for r in rows]
        time.sleep(0.3)


def test_signed_events_reach_their_receivers_and_a_failing_one_is_retried(service: Service, world):
    client = Client(service.base, KEY)
    secret = client.webhook_secret()
    ok, flaky = Receiver(), Receiver([500, 500])
    try:
        spec = job_spec(world, steps=4, checkpoint_every=4)
        job = client.create({**spec, "webhook": {"url": ok.url + "/helip", "events": [
            "job.stage", "job.succeeded", "job.failed", "job.cancelled"]}})
        # queued behind the first (one worker), cancelled before it starts: a job.cancelled to the flaky receiver
        other = client.create({**spec, "webhook": {"url": flaky.url + "/flaky", "events": ["job.cancelled"]}})
        assert client.cancel(other.id).status in ("cancelled", "cancelling")
        with pytest.raises(HelipAPIError) as info:
            client.create({**spec, "webhook": {"url": "http://example.org/hook"}})
        assert info.value.status == 422 and info.value.param == "webhook.url"

        assert client.wait(job.id, poll=0.5, timeout=400).status == "succeeded", service.log_tail("hooks")
        rows = settle(client, job.id, 5)
        assert [(r.event, r.status, r.attempts) for r in rows] == [("job.stage", "delivered", 1)] * 4 + [
            ("job.succeeded", "delivered", 1)]
        payloads = [Webhook(secret).verify(body, headers) for _, headers, body in ok.got]  # raises if forged
        assert [p["data"]["stage"] for p in payloads if p["type"] == "job.stage"] == [
            "embedding", "mining", "training", "evaluating"]
        final = payloads[-1]
        assert final["type"] == "job.succeeded" and final["data"]["id"] == job.id
        assert final["data"]["status"] == "succeeded" and final["data"]["result"]["summary"]["lift"]["helip_minus_baseline"]
        assert [h["webhook-id"] for _, h, _ in ok.got] == [r.message_id for r in rows]

        (cancelled,) = settle(client, other.id, 1)
        assert cancelled.event == "job.cancelled" and cancelled.status == "delivered" and cancelled.attempts == 3
        assert [a.status_code for a in cancelled.attempt_log] == [500, 500, 204]
        assert len(flaky.got) == 3 and len({h["webhook-id"] for _, h, _ in flaky.got}) == 1
        for _, headers, body in flaky.got:
            assert Webhook(secret).verify(body, headers)["data"]["id"] == other.id
        assert json.loads(flaky.got[-1][2])["data"]["status"] == "cancelled"
    finally:
        ok.close()
        flaky.close()
