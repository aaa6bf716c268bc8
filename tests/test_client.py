"""helip.client without servers: errors, retries with Retry-After, paging, and a cut download resumed with Range."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from helip.client import Client, HelipAPIError, parse_retry_after

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def job_body(job_id: str = "job-" + "a" * 24, status: str = "queued") -> dict:
    return {"id": job_id, "status": status, "created_at": NOW.isoformat(), "spec": {}, "seed": 1, "attempts": 0,
            "cancel_requested": False}


def fake(handler, **kw) -> tuple[Client, list[float]]:
    slept: list[float] = []
    return Client("http://api.test", "k", transport=httpx.MockTransport(handler), sleep=slept.append, **kw), slept


def test_api_errors_are_one_exception_with_code_message_param():
    def handler(req: httpx.Request) -> httpx.Response:
        assert req.headers["Authorization"] == "Bearer k"
        return httpx.Response(422, json={"error": {"code": "invalid_spec", "message": "train.lr: too small",
                                                   "param": "train.lr"}})

    client, slept = fake(handler)
    with pytest.raises(HelipAPIError) as info:
        client.create({"model": {"name": "x"}})
    err = info.value
    assert (err.status, err.code, err.message, err.param) == (422, "invalid_spec", "train.lr: too small", "train.lr")
    assert slept == []  # a 422 is never retried


def test_429_and_503_are_retried_waiting_what_retry_after_says():
    answers = [httpx.Response(429, headers={"Retry-After": "3"}, json={"error": {"code": "rate_limited",
                                                                                 "message": "slow down"}}),
               httpx.Response(503, json={"error": {"code": "unavailable", "message": "later"}}),
               httpx.Response(200, json=job_body())]

    client, slept = fake(lambda req: answers.pop(0), backoff=0.25)
    assert client.get("job-" + "a" * 24).status == "queued"
    assert slept == [3.0, 0.5]  # Retry-After, then the second backoff step (0.25 * 2)


def test_retries_stop_and_raise_the_last_error():
    calls = []

    def handler(req):
        calls.append(req)
        return httpx.Response(503, headers={"Retry-After": "1"}, text="down")

    client, slept = fake(handler, retries=2)
    with pytest.raises(HelipAPIError) as info:
        client.cancel("job-" + "a" * 24)
    assert info.value.status == 503 and info.value.code == "http_503" and info.value.message == "down"
    assert len(calls) == 3 and slept == [1.0, 1.0]


def test_a_post_without_idempotency_key_is_not_resent_after_a_read_error():
    calls = []

    def handler(req):
        calls.append(req)
        raise httpx.ReadError("connection reset")

    client, _ = fake(handler)
    with pytest.raises(HelipAPIError) as info:
        client.create({})
    assert info.value.code == "connection_error" and len(calls) == 1  # it may have been created: not sent twice
    calls.clear()
    with pytest.raises(HelipAPIError):
        client.create({}, idempotency_key="abc")
    assert len(calls) == 6 and calls[0].headers["Idempotency-Key"] == "abc"


def test_retry_after_as_seconds_or_http_date():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_list_follows_every_page_with_the_filters():
    ids = [f"job-{i:024x}" for i in range(5)]
    seen = []

    def handler(req: httpx.Request) -> httpx.Response:
        q = dict(req.url.params)
        seen.append(q)
        start = ids.index(q["after"]) + 1 if "after" in q else 0
        page = ids[start:start + int(q["limit"])]
        return httpx.Response(200, json={"data": [job_body(i, "running") for i in page],
                                         "has_more": start + len(page) < len(ids)})

    client, _ = fake(handler)
    assert [j.id for j in client.list(status="running", metadata={"team": "a"}, page_size=2)] == ids
    assert [q.get("after") for q in seen] == [None, ids[1], ids[3]]
    assert all(q["status"] == "running" and q["metadata.team"] == "a" for q in seen)


def test_events_follow_the_cursor():
    events = [{"id": i, "created_at": NOW.isoformat(), "level": "info", "message": f"e{i}"} for i in range(1, 6)]

    def handler(req):
        after = int(req.url.params.get("after", 0))
        rest = [e for e in events if e["id"] > after]
        return httpx.Response(200, json={"data": rest[:2], "has_more": len(rest) > 2})

    client, _ = fake(handler)
    assert [e.message for e in client.events("job-" + "a" * 24)] == ["e1", "e2", "e3", "e4", "e5"]
    assert [e.id for e in client.events("job-" + "a" * 24, after=3)] == [4, 5]


class CutStream(httpx.SyncByteStream):
    """A body that stops after `cut` bytes as if the connection dropped."""

    def __init__(self, data: bytes, cut: int):
        self.data, self.cut = data, cut

    def __iter__(self):
        yield self.data[:self.cut]
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


def download_api(blob: bytes, *, sha: str | None = None, cut: int | None = None, ranges: list | None = None):
    ranges = [] if ranges is None else ranges
    ck = {"id": 2, "run": "helip", "step": 9, "final": True, "sha256": sha or hashlib.sha256(blob).hexdigest(),
          "size": len(blob), "created_at": NOW.isoformat(), "url": "http://store.test/blob",
          "expires_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat()}

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.host == "api.test":
            return httpx.Response(200, json={"data": [{**ck, "id": 1, "final": False, "step": 5}, ck],
                                             "has_more": False})
        assert "Authorization" not in req.headers  # the API key never goes to the storage link
        rng = req.headers.get("Range")
        ranges.append(rng)
        if rng is None:
            if cut is not None and len(ranges) == 1:
                return httpx.Response(200, headers={"Content-Length": str(len(blob))}, stream=CutStream(blob, cut))
            return httpx.Response(200, content=blob)
        start = int(rng.split("=")[1].rstrip("-"))
        return httpx.Response(206, headers={"Content-Range": f"bytes {start}-{len(blob) - 1}/{len(blob)}"},
                              content=blob[start:])

    return handler, ranges


def test_a_cut_download_resumes_with_a_range_request_and_is_verified(tmp_path: Path):
    blob = bytes(range(256)) * 1000
    handler, ranges = download_api(blob, cut=100_000)
    client, slept = fake(handler)
    out = client.download("job-" + "a" * 24, dest=tmp_path)
    assert out == tmp_path / "helip_final.pt" and out.read_bytes() == blob
    assert ranges == [None, "bytes=100000-"] and len(slept) == 1
    assert not (tmp_path / "helip_final.pt.part").exists()
    ranges.clear()
    assert client.download("job-" + "a" * 24, dest=out) == out and ranges == []  # already there and verified


def test_a_partial_file_from_an_earlier_call_is_resumed(tmp_path: Path):
    blob = b"x" * 5000 + b"y" * 5000
    handler, ranges = download_api(blob)
    (tmp_path / "m.pt.part").write_bytes(blob[:4096])
    client, _ = fake(handler)
    assert client.download("job-" + "a" * 24, dest=tmp_path / "m.pt").read_bytes() == blob
    assert ranges == ["bytes=4096-"]


def test_a_download_that_does_not_match_its_sha256_is_refused(tmp_path: Path):
    handler, ranges = download_api(b"tampered", sha="0" * 64)
    client, _ = fake(handler)
    with pytest.raises(HelipAPIError) as info:
        client.download("job-" + "a" * 24, dest=tmp_path / "m.pt")
    assert info.value.code == "checksum_mismatch"
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "m.pt.part").exists()
    assert ranges == [None, None]  # started over once from zero, then gave up


def test_no_final_checkpoint_of_that_run_is_a_404(tmp_path: Path):
    handler, _ = download_api(b"abc")
    client, _ = fake(handler)
    with pytest.raises(HelipAPIError) as info:
        client.download("job-" + "a" * 24, run="control", dest=tmp_path)
    assert info.value.status == 404 and info.value.param == "run"


def test_the_files_route_serves_byte_ranges(tmp_path: Path):
    from api.main import create_app
    from helip.links import sign_key
    from helip.settings import Settings

    settings = Settings(_env_file=None, data_dir=tmp_path, secret_key="s")
    path = tmp_path / "store" / "jobs" / "j" / "helip_final.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(range(200)))
    token = sign_key(b"s", "jobs/j/helip_final.pt", 60)
    with TestClient(create_app(settings)) as http:
        r = http.get(f"/files/{token}", headers={"Range": "bytes=150-"})
        assert r.status_code == 206 and r.content == bytes(range(150, 200))
        assert r.headers["content-range"] == "bytes 150-199/200"
        assert http.get(f"/files/{token}", headers={"Range": "bytes=500-"}).status_code == 416


def test_the_client_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, helip.client; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in " \
           "('torch', 'open_clip', 'celery', 'sqlalchemy'))))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert json.loads(out.stdout) == []


def _running(stage, **progress):
    from api.schemas import JobPublic

    return JobPublic.model_validate({**job_body(status="running"), "stage": stage, "progress": progress,
                                     "spec": {"control": progress.pop("control", False)}})


def test_the_eta_covers_the_runs_still_to_come():
    from helip.watch import job_eta, progress_line

    # helip at step 30 of 100 with 70 s left (1 s/step): the control run's 100 steps come after it
    job = _running("training", run="helip", step=30, total_steps=100, eta_seconds=70.0, loss=1.5, control=True)
    assert job_eta(job) == (170.0, True)
    assert progress_line(job) == "running   stage=training   helip step 30/100 loss 1.500 ETA 02:50"
    assert job_eta(_running("training", run="control", step=50, total_steps=100, eta_seconds=25.0,
                            control=True)) == (25.0, True)
    assert job_eta(_running("training", run="helip", step=50, total_steps=100, eta_seconds=25.0)) == (25.0, True)
    # before training only the stage's own ETA is known: a lower bound, shown with '+'
    mining = _running("mining", done=1, total=4, eta_seconds=3725.0, control=True)
    assert job_eta(mining) == (3725.0, False) and progress_line(mining).endswith("1/4 ETA 1:02:05+")


def test_a_job_id_stays_one_path_segment_and_a_bad_answer_is_an_api_error():
    paths = []

    def handler(req: httpx.Request) -> httpx.Response:
        paths.append(req.url.raw_path)
        return httpx.Response(200, text="<html>not json</html>")

    client, _ = fake(handler)
    with pytest.raises(HelipAPIError) as info:
        client.get("../files/x?y=1")
    assert paths == [b"/jobs/..%2Ffiles%2Fx%3Fy%3D1"]
    assert info.value.code == "invalid_response" and info.value.status == 200


def test_events_follow_a_running_job_until_it_has_finished():
    state = {"polls": 0}
    events = []

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/events"):
            after = int(req.url.params.get("after", 0))
            return httpx.Response(200, json={"data": [e for e in events if e["id"] > after], "has_more": False})
        state["polls"] += 1  # each job read: one more event appears; the third read finds the job finished
        events.append({"id": state["polls"], "created_at": NOW.isoformat(), "level": "info",
                       "message": f"e{state['polls']}"})
        return httpx.Response(200, json=job_body(status="succeeded" if state["polls"] >= 3 else "running"))

    client, slept = fake(handler)
    assert [e.message for e in client.events("job-" + "a" * 24, follow=True, poll=0.5)] == ["e1", "e2", "e3"]
    assert slept == [0.5, 0.5]


def test_the_live_line_in_a_log_prints_changes_not_repeats():
    import io

    from helip.watch import LiveLine

    out = io.StringIO()
    live = LiveLine(out, every=0.0)
    step = _running("training", run="helip", step=5, total_steps=10, eta_seconds=5.0, loss=1.0)
    live(_running("mining", done=1, total=2, eta_seconds=1.0))
    live(step)
    live(step)  # nothing moved: not written again
    live(_running("training", run="helip", step=6, total_steps=10, eta_seconds=4.0, loss=0.9))
    lines = out.getvalue().splitlines()
    assert [ln.split("  (")[0] for ln in lines] == [
        "running   stage=mining     1/2 ETA 00:01+", "running   stage=training   helip step 5/10 loss 1.000 ETA 00:05",
        "running   stage=training   helip step 6/10 loss 0.900 ETA 00:04"]
