"""Webhooks without a worker: signatures against the standardwebhooks package, destinations, the submit check,
and the outbox delivering to real loopback receivers (one that fails twice, one that redirects) on SQLite."""

from __future__ import annotations

import http.server
import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from api.main import create_app
from helip import crud
from helip.settings import Settings
from helip.tables import WebhookDelivery
from helip.webhooks import destination_problem, dispatch_round, owner_secret, post, sign, signed_headers
from tests.services import free_ports

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the example secret of the Standard Webhooks spec


def test_signatures_match_the_reference_implementation():
    body = b'{"type":"job.succeeded","data":{"id":"job-1"}}'
    ts = 1_700_000_000
    ours = sign(SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", ts, body)
    ref = Webhook(SECRET).sign("msg_p5jXN8AQM9LWM0D4loKWxJek", datetime.fromtimestamp(ts, UTC), body.decode())
    assert ours == ref
    headers = signed_headers(SECRET, "msg_1", body)
    assert Webhook(SECRET).verify(body, headers) == json.loads(body)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace(b"job-1", b"job-2"), headers)
    with pytest.raises(WebhookVerificationError):  # another key's secret does not verify it
        Webhook(owner_secret(b"service", "other")).verify(body, headers)


def test_each_key_has_its_own_secret():
    a, b = owner_secret(b"service", "owner-a"), owner_secret(b"service", "owner-b")
    assert a.startswith("whsec_") and a != b and a == owner_secret(b"service", "owner-a")
    assert owner_secret(b"other-service", "owner-a") != a
    Webhook(a)  # a key the reference implementation accepts


@pytest.mark.parametrize("url, allowed, ok", [
    ("http://127.0.0.1:8080/hook", "127.0.0.1", True),
    ("https://hooks.example.com/x", "hooks.example.com", True),
    ("https://HOOKS.example.com/x", "hooks.example.com", True),
    ("http://hooks.example.com:8080/x", "hooks.example.com:8080", True),
    ("http://hooks.example.com:9090/x", "hooks.example.com:8080", False),
    ("http://hooks.example.com/x", "hooks.example.com:8080", False),  # port 80 is not 8080
    ("http://evil.example.com/x", "hooks.example.com", False),
    ("http://hooks.example.com.evil.io/x", "hooks.example.com", False),
    ("http://127.0.0.1/x", None, False),  # nothing by default
    ("ftp://127.0.0.1/x", "127.0.0.1", False),
    ("file:///etc/passwd", "127.0.0.1", False),
    ("http://user:pw@127.0.0.1/x", "127.0.0.1", False),
])
def test_destinations(url: str, allowed: str | None, ok: bool, tmp_path: Path):
    settings = Settings(_env_file=None, data_dir=tmp_path, webhook_allowed_hosts=allowed)
    assert (destination_problem(url, settings) is None) == ok


class Receiver:
    """A loopback HTTP receiver: answers each POST with the next planned status (then 204), keeps what came."""

    def __init__(self, plan: list[int] | None = None, location: str | None = None):
        self.got: list[tuple[str, dict[str, str], bytes]] = []
        self.plan = list(plan or [])
        rec = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                rec.got.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                code = rec.plan.pop(0) if rec.plan else 204
                self.send_response(code)
                if location and 300 <= code < 400:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_ports(1)[0]), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def app_settings(tmp_path: Path) -> Settings:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text("filepath\ttitle\nimg0.png\ta red square\n")
    return Settings(_env_file=None, data_dir=tmp_path / "state", allowed_data=str(data), api_keys="key-w",
                    webhook_allowed_hosts="127.0.0.1", webhook_backoff_seconds=0.05, webhook_max_attempts=4,
                    rate_limit_per_minute=100_000)


def spec_for(settings: Settings, **webhook) -> dict:
    return {"model": {"name": "RN50"}, "data": {"train": str(Path(settings.allowed_data) / "train.tsv")},
            "train": {"batch_size": 8, "max_steps": 2}, **({"webhook": webhook} if webhook else {})}


def test_a_destination_outside_the_allowed_hosts_is_refused_at_submit(app_settings: Settings):
    with TestClient(create_app(app_settings), headers={"Authorization": "Bearer key-w"}) as api:
        for url in ("http://example.com/hook", "http://10.0.0.1/hook", "http://localhost/hook"):
            r = api.post("/jobs", json=spec_for(app_settings, url=url))
            assert r.status_code == 422, r.text
            assert r.json()["error"]["param"] == "webhook.url" and r.json()["error"]["code"] == "webhook_not_allowed"
        r = api.post("/jobs", json=spec_for(app_settings, url="gopher://127.0.0.1/x"))
        assert r.status_code == 422 and r.json()["error"]["param"] == "webhook.url"
        r = api.post("/jobs", json=spec_for(app_settings, url="http://127.0.0.1:1/x", events=["job.started"]))
        assert r.status_code == 422 and r.json()["error"]["param"] == "webhook.events.0"
        assert api.post("/jobs", json=spec_for(app_settings, url="http://127.0.0.1:1/x")).status_code == 201
        assert api.get("/webhook-secret").json()["secret"].startswith("whsec_")
    closed = Settings(**{**app_settings.model_dump(), "webhook_allowed_hosts": None, "_env_file": None})
    with TestClient(create_app(closed), headers={"Authorization": "Bearer key-w"}) as api:
        r = api.post("/jobs", json=spec_for(app_settings, url="http://127.0.0.1:1/x"))
        assert r.status_code == 422 and "HELIP_WEBHOOK_ALLOWED_HOSTS" in r.json()["error"]["message"]


def drive(api: TestClient, settings: Settings, until, timeout: float = 20.0) -> None:
    """Dispatcher rounds (what the worker's thread runs) until `until()` holds."""
    ctx = api.app.state.context
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out"
        dispatch_round(settings, ctx.sessions)
        time.sleep(0.05)


def test_the_outbox_retries_until_accepted_and_never_follows_a_redirect(app_settings: Settings):
    target = Receiver()
    flaky, moved = Receiver([500, 503]), Receiver([302] * 10, location=target.url + "/elsewhere")
    try:
        with TestClient(create_app(app_settings), headers={"Authorization": "Bearer key-w"}) as api:
            a = api.post("/jobs", json=spec_for(app_settings, url=flaky.url + "/a",
                                               events=["job.stage", "job.succeeded", "job.cancelled"])).json()
            b = api.post("/jobs", json=spec_for(app_settings, url=moved.url + "/b")).json()
            ctx = api.app.state.context
            with ctx.sessions() as s:  # what a worker records while it runs a job
                crud.add_event(s, job_id=a["id"], message="stage: embedding", data={"stage": "embedding"})
                crud.add_event(s, job_id=a["id"], message="embedded 1 pairs", data={})
                s.commit()
            secret = api.get("/webhook-secret").json()["secret"]

            def settled(job_id: str, n: int) -> bool:
                rows = api.get(f"/jobs/{job_id}/webhook-deliveries").json()["data"]
                return len(rows) == n and all(r["status"] != "pending" for r in rows)

            drive(api, app_settings, lambda: settled(a["id"], 1))
            assert api.post(f"/jobs/{a['id']}/cancel").json()["status"] == "cancelled"
            assert api.post(f"/jobs/{b['id']}/cancel").json()["status"] == "cancelled"
            drive(api, app_settings, lambda: settled(a["id"], 2) and settled(b["id"], 1))
            drive(api, app_settings, lambda: True)  # one more round: nothing new is enqueued twice

            rows = api.get(f"/jobs/{a['id']}/webhook-deliveries").json()["data"]
            assert [(r["event"], r["status"], r["attempts"]) for r in rows] == [
                ("job.stage", "delivered", 3), ("job.cancelled", "delivered", 1)]
            assert [x["status_code"] for x in rows[0]["attempt_log"]] == [500, 503, 204]
            assert rows[0]["attempt_log"][0]["error"] == "HTTP 500" and rows[0]["attempt_log"][2]["error"] is None
            stage_ids = {h["webhook-id"] for p, h, body in flaky.got if p == "/a" and b'"job.stage"' in body}
            assert len(stage_ids) == 1 and len(flaky.got) == 4  # 3 tries of one message, then the cancel
            for _, headers, body in flaky.got:
                payload = Webhook(secret).verify(body, headers)
                assert payload["data"]["id"] == a["id"]
            assert [json.loads(body)["type"] for _, _, body in flaky.got] == ["job.stage"] * 3 + ["job.cancelled"]
            assert json.loads(flaky.got[0][2])["data"]["stage"] == "embedding"

            (only,) = api.get(f"/jobs/{b['id']}/webhook-deliveries").json()["data"]
            assert only["event"] == "job.cancelled" and only["status"] == "failed" and only["attempts"] == 4
            assert "redirects are not followed" in only["attempt_log"][0]["error"]
            assert target.got == [] and len(moved.got) == 4
            with ctx.sessions() as s:
                assert s.query(WebhookDelivery).count() == 3
    finally:
        for r in (flaky, moved, target):
            r.close()


def test_a_receiver_that_drips_its_answer_is_cut_off_at_the_timeout():
    """Bytes every 0.3 s never trip a per-read timeout; the whole attempt is still bounded."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    stop = threading.Event()

    def drip() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(65536)
            for ch in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
                if stop.is_set():
                    return
                try:
                    conn.sendall(bytes([ch]))
                except OSError:
                    return
                time.sleep(0.3)

    threading.Thread(target=drip, daemon=True).start()
    t0 = time.monotonic()
    code, error = post(f"http://127.0.0.1:{srv.getsockname()[1]}/x", b"{}", {}, 1.5)
    elapsed = time.monotonic() - t0
    stop.set()
    srv.close()
    assert code is None and error == "no answer within 1.5 s"
    assert elapsed < 5  # not the ~5 minutes the drip would take
