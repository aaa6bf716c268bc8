"""The dashboard in a real browser (headless Debian chromium + chromedriver, driven by Selenium) against a real
uvicorn API and a real Celery worker on Postgres, Redis and S3: list, job page, the forgetting guard's section,
hard-pair browser, isolation, live progress. The browser and the page helpers: tests/ui_browser.py.

HELIP_UI_SCREENSHOTS=DIR saves the three pages' screenshots there (docs/img/ holds the ones from such a run).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from helip import db
from tests.test_service_e2e import FINISHED, ROOT, Service, job_spec, world  # noqa: F401 - world is a fixture
from tests.ui_browser import (  # noqa: F401 - browser is a fixture
    browser,
    goto,
    guard_pixels,
    metrics_json,
    shot,
    use_key,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

KEY, OTHER = "key-e2e", "key-ui-other"  # Service's client sends KEY
MINUS = "\u2212"
GUARDED = "retrieval/image_retrieval_recall@5"  # the finished job's protected metric


@pytest.fixture(scope="module")
def service(make_pg_database, redis_url, s3, world, tmp_path_factory) -> Iterator[Service]:  # noqa: F811
    url = make_pg_database()
    db.upgrade(url)
    bucket = s3.make_bucket("helip-ui")
    run = secrets.token_hex(4)
    logs = tmp_path_factory.mktemp("ui-logs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELIP_")}
    env.update(
        PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
        HELIP_ENVIRONMENT="production", HELIP_DATABASE_URL=url, HELIP_BROKER_URL=redis_url,
        HELIP_STORAGE_URL=f"s3://{bucket}/{run}", HELIP_S3_ENDPOINT_URL=s3.endpoint_url,
        HELIP_S3_ACCESS_KEY=s3.access_key, HELIP_S3_SECRET_KEY=s3.secret_key, HELIP_API_KEYS=f"{KEY},{OTHER}",
        HELIP_SECRET_KEY="ui-secret", HELIP_ALLOWED_DATA=str(world.root), HELIP_DATA_DIR=str(logs / "data"),
        HELIP_QUEUE_NAME=f"ui-{run}", HELIP_HEARTBEAT_SECONDS="1",
    )
    svc = Service(env, logs)
    svc.bucket, svc.prefix = bucket, run
    svc.worker = svc.start_worker("ui", HELIP_STALE_AFTER_SECONDS="120")
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def finished(service: Service, world) -> dict[str, Any]:  # noqa: F811
    spec = job_spec(world, steps=12, checkpoint_every=6)
    spec["control"] = True  # both runs' curves on the same axes, and both lifts
    # the guard's section on the job page (one more interpolation than its ends: three evaluations in all)
    spec["guard"] = {"wise_alphas": [0.5], "objective": "shapes/acc1", "protect": {GUARDED: 0.02}}
    job_id = service.submit(spec)
    job = service.wait(job_id, lambda j: j["status"] in FINISHED, timeout=600, workers=[service.worker])
    assert job["status"] == "succeeded", json.dumps(job)[:3000]
    return job


def test_the_list_shows_the_finished_job(browser, service: Service, finished):
    use_key(browser, service, KEY, "#/jobs")
    row = f"document.querySelector('#jobs-table tr[data-job=\"{finished['id']}\"]')"
    wait_for(browser, row, what="the job's row")
    text = browser.execute_script(f"return {row}.innerText")
    assert "succeeded" in text and "done" in text
    ev = service.http.get(f"/jobs/{finished['id']}/metrics").json()["eval"]  # the metrics of record
    lift = ev["helip"]["shapes"]["acc1"] - ev["baseline"]["shapes"]["acc1"]
    assert abs(finished["result"]["summary"]["lift"]["helip_minus_baseline"]["shapes"]["acc1"] - lift) < 1e-9
    assert f"{'+' if lift >= 0 else MINUS}{abs(lift):.4f}" in text
    # the status filter is the API's: a succeeded job is not among the failed ones
    goto(browser, service, "#/jobs?status=failed")
    assert finished["id"] not in browser.execute_script("return document.getElementById('jobs-table').innerText")
    goto(browser, service, "#/jobs")
    wait_for(browser, row)


def test_docs_render_from_the_apis_own_assets(browser, service: Service):
    browser.get(f"{service.base}/docs")
    wait_for(browser, "document.querySelector('.swagger-ui .info .title')", what="Swagger UI")
    assert "helip" in browser.execute_script("return document.querySelector('.swagger-ui .info .title').innerText")
    wait_for(browser, "document.querySelectorAll('.opblock').length > 10", what="the operations")
    hosts = browser.execute_script(
        "return [...new Set(performance.getEntriesByType('resource').map(e => new URL(e.name).host))]")
    assert hosts == [service.base.removeprefix("http://")], hosts


def test_local_use_needs_no_key(browser, world, tmp_path: Path):  # noqa: F811
    """Embedded defaults without HELIP_API_KEYS (what `make demo` runs): the page works with no key at all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELIP_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HELIP_DATA_DIR=str(tmp_path / "data"),
               HELIP_ALLOWED_DATA=str(world.root))
    (tmp_path / "data").mkdir()
    local = Service(env, tmp_path)
    try:
        browser.get(f"{local.base}/ui/#/jobs")  # another origin: its sessionStorage holds no key
        wait_for(browser, "document.querySelector('#jobs-table')", what="the empty list")
        assert browser.execute_script("return sessionStorage.getItem('helip.apiKey')") is None
        assert "No jobs." in browser.execute_script("return document.getElementById('jobs-table').innerText")
        spec = job_spec(world, steps=2, checkpoint_every=2)
        browser.execute_script("document.getElementById('spec-text').value = arguments[0]", json.dumps(spec))
        browser.execute_script("document.getElementById('spec-submit').click()")
        wait_for(browser, "/^#\\/jobs\\/job-[0-9a-f]{24}$/.test(location.hash) && document.querySelector('#job-head')",
                 what="the new job's page")
        job_id = browser.execute_script("return location.hash.split('/')[2]")
        assert local.http.get(f"/jobs/{job_id}").json()["status"] == "queued"  # no worker here
    finally:
        local.close()


def test_the_job_page_draws_curves_and_the_lift_table_of_metrics_json(browser, service: Service, finished, s3):
    job_id = finished["id"]
    use_key(browser, service, KEY, f"#/jobs/{job_id}")
    wait_for(browser, "document.querySelectorAll('#charts canvas').length >= 3", what="three charts")
    wait_for(browser, "document.querySelector('#eval-table')", what="the eval table")
    # the curves themselves: pixels in the helip and the control stroke colours on the loss chart's canvas
    counts = browser.execute_script("""
        const c = document.querySelector('#charts canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let helip = 0, control = 0, painted = 0;
        for (let i = 0; i < d.length; i += 4) {
          if (d[i + 3] > 0) painted++;
          if (Math.abs(d[i] - 26) < 30 && Math.abs(d[i + 1] - 95) < 30 && Math.abs(d[i + 2] - 180) < 30) helip++;
          if (Math.abs(d[i] - 198) < 30 && Math.abs(d[i + 1] - 70) < 30 && d[i + 2] < 40) control++;
        }
        return {helip, control, painted};""")
    assert counts["helip"] > 50 and counts["control"] > 50, counts
    doc = metrics_json(service, s3, job_id)
    api = service.http.get(f"/jobs/{job_id}/metrics").json()["eval"]
    cells = browser.execute_script("""
        return [...document.querySelectorAll('#eval-table tbody tr')].map(tr => ({
          ds: tr.dataset.dataset, metric: tr.dataset.metric,
          vals: Object.fromEntries([...tr.querySelectorAll('td[data-model]')]
            .map(td => [td.dataset.model, td.innerText])),
          lifts: Object.fromEntries([...tr.querySelectorAll('td[data-lift]')]
            .map(td => [td.dataset.lift, [td.innerText, td.className]])),
        }));""")
    assert len(cells) == sum(len(v) for v in doc["helip"].values()) > 0
    for c in cells:
        for model in ("baseline", "control", "helip"):
            digits = 0 if c["metric"].startswith("n_") else 4  # counts (n_samples, n_bad) as integers
            want = doc[model][c["ds"]][c["metric"]]
            assert c["vals"][model] == f"{want:.{digits}f}" and want == api[model][c["ds"]][c["metric"]]
        for other in ("baseline", "control"):
            d = doc["lift"][f"helip_minus_{other}"][c["ds"]].get(c["metric"])
            text, cls = c["lifts"][other]
            if d is None:  # a count (n_*): no lift in metrics.json, none on the page
                assert text == "\u2013"
                continue
            assert text == f"{'+' if d >= 0 else MINUS}{abs(d):.4f}", (c, d)
            assert ("up" in cls) == (d > 0) and ("down" in cls) == (d < 0)
    stages = browser.execute_script("return [...document.querySelectorAll('#timeline li')].map(li => li.dataset.stage)")
    assert stages == ["queued", "embedding", "mining", "training", "evaluating"]
    links = browser.execute_script("return [...document.querySelectorAll('#checkpoints a')].map(a => a.href)")
    assert len(links) >= 2 and httpx.get(links[0], timeout=30).status_code == 200  # presigned: no key needed


def test_the_job_page_shows_the_guards_curves_and_selection_of_metrics_json(browser, service: Service, finished, s3):
    job_id = finished["id"]
    use_key(browser, service, KEY, f"#/jobs/{job_id}")
    wait_for(browser, "document.querySelectorAll('#guard-charts canvas').length === 2", what="the two guard charts")
    for axis in ("step", "alpha"):
        counts = guard_pixels(browser, axis)
        assert counts["objective"] > 50 and counts["protected"] > 50, (axis, counts)
    doc = metrics_json(service, s3, job_id)
    sel, guard = doc["selected"], doc["guard"]
    api = service.http.get(f"/jobs/{job_id}/guard").json()
    assert api["selected"] == sel and [w["alpha"] for w in api["wise"]] == [0.0, 0.5, 1.0]
    line = browser.execute_script("return document.getElementById('guard-selected').innerText")
    source = browser.execute_script("return document.getElementById('guard-selected').dataset.source")
    assert source == sel["source"] and f"step {sel['step']}" in line
    if sel["source"] == "wise":
        assert f"alpha {sel['alpha']:g}" in line
    shown = browser.execute_script("return Object.fromEntries([...document.querySelectorAll('#guard-selected "
                                   "[data-key]')].map(s => [s.dataset.key, s.innerText]))")
    ds, metric = GUARDED.split("/")
    bound = guard["input"]["metrics"][ds][metric] - 0.02
    assert shown["objective"].startswith("objective shapes/acc1 ") and shown[GUARDED].startswith(f"{GUARDED} ")
    numbers = {k: [float(x) for x in re.findall(r"-?\d+\.\d{4}", v)] for k, v in shown.items()}
    # four decimals of metrics.json's numbers (half a unit of the last digit: JS and Python round ties apart)
    assert numbers["objective"] == pytest.approx([sel["objective"]], abs=5.1e-5)
    assert numbers[GUARDED] == pytest.approx([sel["metrics"][ds][metric], bound, guard["input"]["metrics"][ds][metric]],
                                             abs=5.1e-5)
    assert sel["objective"] == sel["metrics"]["shapes"]["acc1"]
    labels = browser.execute_script("return [...document.querySelectorAll('#guard-charts canvas')]"
                                    ".map(c => c.getAttribute('aria-label'))")
    assert all("objective shapes/acc1" in a and GUARDED in a for a in labels), labels
    shot(browser, "ui-job.png")


def test_the_hard_pair_browser_shows_a_target_and_its_neighbours_images(browser, service: Service, finished):
    job_id = finished["id"]
    use_key(browser, service, KEY, f"#/jobs/{job_id}/hard-pairs?row=17")
    loaded = ("document.querySelectorAll('#neighbors img').length === 8 && [...document.querySelectorAll("
              "'#target img, #neighbors img')].every(i => i.complete && i.naturalWidth > 0)")
    wait_for(browser, loaded, what="the target's and 8 neighbours' thumbnails")
    api = service.http.get(f"/jobs/{job_id}/hard-pairs/17").json()
    shown = browser.execute_script(
        "return [...document.querySelectorAll('#neighbors li')].map(li => Number(li.dataset.row))")
    assert shown == [n["row"] for n in api["neighbors"]]
    text = browser.execute_script("return document.getElementById('pair-view').innerText")
    assert api["caption"] in text and api["neighbors"][0]["caption"] in text
    assert f"{api['neighbors'][0]['text_cosine']:.3f}" in text and f"{api['neighbors'][0]['image_cosine']:.3f}" in text
    assert "dropped as the same caption" in text
    # the highest-scored rows, then a random one, without reloading the page
    target = "document.querySelector('#target h2')"
    browser.execute_script("window.__sameDocument = 1")
    first = browser.execute_script("return document.querySelector('#pick-highest a').getAttribute('href')")
    browser.execute_script("document.querySelector('#pick-highest a').click()")
    row = int(first.rsplit("=", 1)[1])
    wait_for(browser, f"{target} && {target}.innerText === 'Row {row}'")
    wait_for(browser, loaded)
    shot(browser, "ui-hard-pairs.png")
    before = browser.execute_script("return location.hash")
    browser.execute_script("document.getElementById('random-row').click()")
    # a random row (1 in 240 it is the same one: then the hash does not change, and the view stays)
    deadline = time.monotonic() + 10
    while browser.execute_script("return location.hash") == before and time.monotonic() < deadline:
        time.sleep(0.1)
    wait_for(browser, f"document.getElementById('main').dataset.route === location.hash && {target} && "
                      f"{target}.innerText === 'Row ' + location.hash.split('=')[1]")
    assert browser.execute_script("return window.__sameDocument") == 1


def test_another_keys_job_is_not_reachable(browser, service: Service, finished):
    job_id = finished["id"]
    use_key(browser, service, OTHER, f"#/jobs/{job_id}")
    wait_for(browser, "document.getElementById('not-found')", what="the not-found message")
    goto(browser, service, f"#/jobs/{job_id}/hard-pairs?row=0")
    assert browser.execute_script("return document.getElementById('not-found') !== null")
    assert browser.execute_script("return document.querySelectorAll('img').length") == 0
    goto(browser, service, "#/jobs")
    assert job_id not in browser.execute_script("return document.getElementById('jobs-table').innerText")
    other = httpx.Client(base_url=service.base, headers={"Authorization": f"Bearer {OTHER}"}, timeout=30)
    for path in (f"/jobs/{job_id}", f"/jobs/{job_id}/hard-pairs/0", f"/jobs/{job_id}/thumbnails/0",
                 f"/jobs/{job_id}/metrics", f"/jobs/{job_id}/guard"):
        assert other.get(path).status_code == 404, path


def test_a_running_jobs_progress_advances_on_the_page(browser, service: Service, world):  # noqa: F811
    job_id = service.submit(job_spec(world, steps=2000, checkpoint_every=1000))
    service.wait(job_id, lambda j: j["status"] == "running" and (j["progress"] or {}).get("step"), timeout=300,
                 workers=[service.worker])
    use_key(browser, service, KEY, f"#/jobs/{job_id}")
    step_of = "(document.getElementById('progress-text') && " \
              "Number((document.getElementById('progress-text').innerText.match(/step (\\d+)/) || [0, -1])[1]))"
    first = wait_for(browser, f"{step_of} > 0", what="a step in the progress text")
    first = browser.execute_script(f"return {step_of}")
    points = browser.execute_script("return document.querySelectorAll('#charts canvas').length")
    # a spec without a guard: no guard section at all (no heading, no empty chart), and the API says why
    assert browser.execute_script("return document.getElementById('guard') === null")
    assert service.http.get(f"/jobs/{job_id}/guard").json()["error"]["code"] == "no_guard"
    browser.execute_script("window.__sameDocument = 1")
    wait_for(browser, f"{step_of} > {first} + 2", timeout=120, what="the step to advance")
    assert browser.execute_script("return window.__sameDocument") == 1  # advanced without a reload
    assert points >= 1 and browser.execute_script("return document.getElementById('eta').innerText").startswith("ETA")
    browser.execute_script("document.getElementById('cancel').click()")
    job = service.wait(job_id, lambda j: j["status"] in FINISHED, timeout=120, workers=[service.worker])
    assert job["status"] == "cancelled"
    wait_for(browser, "document.querySelector('#job-head .badge').innerText === 'cancelled'", what="cancelled shown")


def test_a_refused_spec_shows_the_apis_error_next_to_its_field(browser, service: Service, world):  # noqa: F811
    from selenium.webdriver.common.by import By

    active = service.submit(job_spec(world, steps=2000, checkpoint_every=1000))  # the list refreshes while it runs
    use_key(browser, service, KEY, "#/jobs")
    spec = job_spec(world, steps=5, checkpoint_every=5)
    spec["train"]["batch_size"] = 31  # not a multiple of (1 + hard_per_target) x accum_steps = 2
    text = json.dumps(spec, indent=1)
    api = service.http.post("/jobs", json=spec)
    assert api.status_code == 422 and api.json()["error"]["param"] == "train.batch_size"
    browser.execute_script("const t = document.getElementById('spec-text'); t.value = arguments[0]; t.focus();", text)
    browser.execute_script("document.getElementById('jobs-table').dataset.seen = '1'")
    # the table is refreshed (every 5 s while a job is active) ...
    wait_for(browser, "!document.getElementById('jobs-table').dataset.seen", timeout=15, what="a refresh of the list")
    # ... and what is being typed, and the focus, stay
    assert browser.execute_script("return document.getElementById('spec-text').value") == text
    assert browser.execute_script("return document.activeElement.id") == "spec-text"
    browser.find_element(By.ID, "spec-submit").click()
    wait_for(browser, "document.getElementById('spec-error').dataset.param", what="the field error")
    error = browser.execute_script(
        "const e = document.getElementById('spec-error'); return [e.dataset.param, e.innerText]")
    message = api.json()["error"]["message"]  # "train.batch_size: train.batch_size (31) must be ..."
    assert error[0] == "train.batch_size" and message.removeprefix("train.batch_size: ") in error[1]
    # the field is selected in the pasted text: the "batch_size" key inside "train", not any other one
    selected = browser.execute_script("const t = document.getElementById('spec-text'); "
                                      "return [t.value.slice(t.selectionStart, t.selectionEnd), t.selectionStart]")
    assert selected[0] == '"batch_size"' and selected[1] > text.index('"train"') and browser.execute_script(
        "return document.getElementById('spec-text').getAttribute('aria-invalid')") == "true"
    browser.execute_script("document.getElementById('spec-text').value = '{\"model\": '")
    browser.find_element(By.ID, "spec-submit").click()
    wait_for(browser, "document.getElementById('spec-error').dataset.param === 'body'", what="the JSON error")
    browser.execute_script("document.getElementById('spec-text').value = arguments[0]", text)
    browser.find_element(By.ID, "spec-submit").click()
    wait_for(browser, "document.getElementById('spec-error').dataset.param === 'train.batch_size'")
    browser.execute_script("window.scrollTo(0, 0)")
    shot(browser, "ui-jobs.png")  # the list (running, cancelled and succeeded jobs) and the refused submission
    assert service.http.post(f"/jobs/{active}/cancel").status_code == 200
    service.wait(active, lambda j: j["status"] in FINISHED, timeout=120, workers=[service.worker])
