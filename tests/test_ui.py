"""The dashboard in a real browser (headless Debian chromium + chromedriver, driven by Selenium) against a real
uvicorn API and a real Celery worker on Postgres, Redis and S3: list, job page, hard-pair browser, isolation,
live progress.

HELIP_UI_SCREENSHOTS=DIR saves the three pages' screenshots there (docs/img/ holds the ones from such a run).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from helip import db
from tests.test_service_e2e import FINISHED, ROOT, Service, job_spec, world  # noqa: F401 - world is a fixture

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

KEY, OTHER = "key-e2e", "key-ui-other"  # Service's client sends KEY
MINUS = "\u2212"


def ensure_chromium() -> tuple[str, str]:
    """Debian's chromium and chromedriver, installed with apt-get when missing (as tests/services.py does for
    Postgres and Redis); a skip with the reason when they cannot be."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if all(found):
        return found  # type: ignore[return-value]
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium and chromium-driver are not installed and apt-get cannot run here (not root)")
    for cmd in (["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"],
                ["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if done.returncode == 0 and cmd[1] == "install":
            break
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found):
        pytest.skip(f"apt-get could not install chromium and chromium-driver: {done.stderr[-500:]}")
    return found  # type: ignore[return-value]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    chromium, driver_path = ensure_chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1366,900",
                "--disable-gpu", "--no-first-run", "--disable-extensions", "--disable-background-networking",
                # no host but loopback resolves: every page must work offline, from its own assets
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=DriverService(executable_path=driver_path))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


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
    job_id = service.submit(spec)
    job = service.wait(job_id, lambda j: j["status"] in FINISHED, timeout=600, workers=[service.worker])
    assert job["status"] == "succeeded", json.dumps(job)[:3000]
    return job


def shot(browser, name: str) -> None:
    """The whole page (the window made as tall as the page, up to 2400 px) into HELIP_UI_SCREENSHOTS."""
    where = os.environ.get("HELIP_UI_SCREENSHOTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1366, min(max(int(height) + 120, 900), 2400))
        time.sleep(0.3)
        browser.save_screenshot(str(Path(where) / name))
        browser.set_window_size(1366, 900)


def wait_for(browser, script: str, timeout: float = 60, what: str = "") -> Any:
    """Run `script` (a JS expression) until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = browser.execute_script(f"return ({script});")
        if value:
            return value
        if time.monotonic() > deadline:
            main = browser.execute_script("const m = document.getElementById('main'); "
                                          "return [location.hash, m.dataset.route, m.innerText.slice(0, 1500)];")
            raise AssertionError(f"timed out waiting for {what or script}; page: {main}")
        time.sleep(0.2)


def goto(browser, service: Service, hash_: str) -> None:
    """Open a view and wait until it is the one rendered (a hash change alone does not reload the page)."""
    browser.execute_script("const m = document.getElementById('main'); if (m) m.dataset.route = '';")
    browser.get(f"{service.base}/ui/{hash_}")
    wait_for(browser, f"document.getElementById('main').dataset.route === {json.dumps(hash_)}", what=hash_)


def use_key(browser, service: Service, key: str, hash_: str) -> None:
    """Open the page and enter the key in its form (it stays in sessionStorage for this tab)."""
    from selenium.webdriver.common.by import By

    browser.get(f"{service.base}/ui/{hash_}")
    field = browser.find_element(By.ID, "api-key")
    field.clear()
    field.send_keys(key)
    browser.execute_script("document.getElementById('main').dataset.route = '';")
    browser.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
    # the click's handler runs asynchronously: wait for it (an immediate read raced it on a loaded machine)
    wait_for(browser, f"sessionStorage.getItem('helip.apiKey') === {json.dumps(key)}", what="the key stored")
    wait_for(browser, f"document.getElementById('main').dataset.route === {json.dumps(hash_)}", what=hash_)


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


def metrics_json(service: Service, s3, job_id: str) -> dict[str, Any]:
    obj = s3.client().get_object(service.bucket, f"{service.prefix}/jobs/{job_id}/metrics.json")
    try:
        return json.loads(obj.read())
    finally:
        obj.close()
        obj.release_conn()


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
                 f"/jobs/{job_id}/metrics"):
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
