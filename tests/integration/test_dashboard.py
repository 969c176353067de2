"""The web dashboard in a real browser (Debian's chromium driven by Playwright) on a real server.

Each test clicks through the pages as a person would: jobs list, job page, live logs, Cancel; a
finished job's result and a failed one's traceback; on a server with users, the login page (no
data without a token), a wrong token refused, a right one and ``mljobs ui --no-browser``'s link.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest

import mljobs
from mljobs.client.session import Session
from tests.conftest import ServerProc, assert_no_leftovers, wait_status

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' installs playwright")


def _chromium() -> str:
    """Debian's chromium (Playwright's own browser download does not work here), installed with
    apt when missing and we are root."""
    path = shutil.which("chromium")
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, capture_output=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        path = shutil.which("chromium")
    if path is None:
        pytest.fail("the dashboard tests need a chromium: `apt-get install chromium` (as root; the tests do it "
                    "themselves when run as root)")
    return path


def _browser_processes(before: set[int]) -> list[psutil.Process]:
    """This test process's children that were not there before the browser started (a session's
    cluster, started by another module on the same pytest-xdist worker, is not the browser's)."""
    return [p for p in psutil.Process().children(recursive=True)
            if p.pid not in before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless chromium for the module; afterwards no process of it (or of Playwright's driver) is left."""
    executable = _chromium()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    pw = playwright_api.sync_playwright().start()
    b = pw.chromium.launch(executable_path=executable)
    try:
        yield b
    finally:
        procs = _browser_processes(before)
        assert any("chrom" in " ".join(p.cmdline()) for p in procs), "chromium was not a child of this test"
        b.close()
        pw.stop()
        gone, alive = psutil.wait_procs(procs, timeout=15)
        assert not alive, f"browser processes left running: {[(p.pid, p.name()) for p in alive]}"


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    context.set_default_timeout(45_000)
    pg = context.new_page()
    yield pg
    context.close()


def _ticker(session: Session, n: int = 3000, stage: str = "dash_stage") -> mljobs.MLJob:
    @mljobs.remote("DEFAULT_POOL", stage_name=stage, session=session)
    def ticker(n):
        import time as t

        for i in range(n):
            print(f"tick {i}", flush=True)
            t.sleep(0.1)

    return ticker(n)


def _max_tick(text: str) -> int:
    return max((int(m) for m in re.findall(r"tick (\d+)", text)), default=-1)


def test_click_through_live_jobs_logs_and_cancel(sqlite_server: ServerProc, page: Any) -> None:
    s = Session(url=sqlite_server.url)
    page.goto(sqlite_server.url + "/")
    page.evaluate("window.__sameDocument = true")  # gone if the page ever reloads
    job = _ticker(s)  # submitted after the page loaded: the list must show it without a reload
    row = page.locator(f"tr[data-id='{job.id}']")
    row.wait_for()
    assert page.evaluate("window.__sameDocument") is True
    row.locator("a").click()
    page.wait_for_url(f"**/jobs/{job.id}")
    page.locator("#log").filter(has_text="tick 3").wait_for()
    first = _max_tick(page.inner_text("#log"))
    page.locator("#log").filter(has_text=re.compile(rf"tick {first + 10}\b")).wait_for()  # lines keep arriving
    page.locator("#job-status").filter(has_text="RUNNING").wait_for()
    assert page.evaluate("window.__sameDocument = true") is True
    text = page.inner_text("#log")
    ticks = [int(m) for m in re.findall(r"tick (\d+)", text)]
    assert ticks == list(range(ticks[0], ticks[-1] + 1)), "a followed log lost or repeated lines"
    page.click("#cancel-button")
    page.locator("#job-status").filter(has_text="CANCELLED").wait_for()
    assert page.locator("#cancel-button").count() == 0
    assert job.status == mljobs.JOB_STATUS.CANCELLED
    page.locator("#log-state").filter(has_text="end of the log").wait_for()
    # the timeline shows every status the store recorded, with the cancel request in its place
    page.locator("#timeline").filter(has_text="CANCELLED").wait_for()
    timeline = page.inner_text("#timeline")
    assert (timeline.index("submitted") < timeline.index("started") < timeline.index("cancel requested")
            < timeline.index("CANCELLED")), timeline
    events = s.request("GET", f"/jobs/{job.id}/events").json()
    assert [e["status"] for e in events] == ["PENDING", "RUNNING", "CANCELLING", "CANCELLED"]
    s.close()


def test_result_traceback_spec_filters_pools_and_404(sqlite_server: ServerProc, page: Any) -> None:
    s = Session(url=sqlite_server.url)

    @mljobs.remote("DEFAULT_POOL", stage_name="dash_stage", session=s, env_vars={"API_KEY": "hunter2-secret"})
    def answer(n):
        print("computing", n)
        print('<img src=x onerror="window.__xss = 1">', flush=True)  # job output is text, never markup
        return {"answer": n, "items": list(range(1000)), "html": "</pre><script>window.__xss = 2</script>"}

    @mljobs.remote("DEFAULT_POOL", stage_name="dash_stage", session=s)
    def broken():
        def deep_inside():
            raise ValueError("boom from the job")

        deep_inside()

    ok, bad = answer(42), broken()
    ok.wait(120)
    bad.wait(120)
    resp = page.goto(sqlite_server.url + "/")
    csp = resp.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp and resp.headers["x-frame-options"] == "DENY"
    page.click(f"tr[data-id='{ok.id}'] a")
    page.locator("#result").wait_for()
    result = page.inner_text("#result")
    assert result.startswith("{'answer': 42, ") and "'items': [0, 1, 2," in result and "..." in result
    assert len(result) < 4000
    assert "</pre><script>window.__xss = 2</script>" in result  # shown as text
    assert page.inner_text("#job-status") == "DONE"
    assert "API_KEY" in page.inner_text("#env-vars") and "hunter2" not in page.content()  # names, never values
    assert "function" in page.inner_text("#spec") and "DEFAULT_POOL" in page.inner_text("#spec")
    assert page.inner_text("#isolation") == "sandbox (personal)"  # the sandbox it ran in (docs/isolation.md)
    timeline = page.inner_text("#timeline")
    assert timeline.index("submitted") < timeline.index("started") < timeline.index("ended")
    page.locator("#log").filter(has_text="computing 42").wait_for()
    page.locator("#log-state").filter(has_text="end of the log").wait_for()
    assert '<img src=x onerror="window.__xss = 1">' in page.inner_text("#log")
    assert page.evaluate("window.__xss") is None and page.locator("#log img, #result script").count() == 0

    page.goto(sqlite_server.url + f"/jobs/{bad.id}")
    assert page.inner_text("#job-status") == "FAILED"
    assert "ValueError: boom from the job" in page.inner_text("#exception")
    tb = page.inner_text("#traceback")
    assert "Traceback (most recent call last)" in tb and "deep_inside" in tb

    page.goto(sqlite_server.url + "/")  # filter by status in the form
    page.select_option("#filter-status", "FAILED")
    page.click("#filter-apply")
    page.wait_for_url("**/?status=FAILED*")
    ids = page.locator("#jobs-body tr").evaluate_all("rows => rows.map(r => r.dataset.id)")
    assert ids == [bad.id]
    with page.expect_response(lambda r: "/dashboard/jobs.json" in r.url and "status=FAILED" in r.url):
        pass  # the next poll of the live list asks with the filter
    assert page.locator("#jobs-body tr").evaluate_all("rows => rows.map(r => r.dataset.id)") == [bad.id]
    resp = page.goto(sqlite_server.url + "/?status=BOGUS")
    assert resp.status == 400 and "unknown status 'BOGUS'" in page.inner_text("#filter-error")
    page.goto(sqlite_server.url + "/?pool=NO_SUCH_POOL")
    assert page.locator("#jobs-body tr").count() == 0

    page.click("text=Pools")
    row = page.locator("#pools tr[data-name='DEFAULT_POOL']")
    assert "CPU_X64_XS" in row.inner_text() and re.search(r"ACTIVE|IDLE", row.inner_text())
    page.click("text=Environments")
    page.locator("#envs").wait_for()

    missing = "MLJOB_00000000_0000_0000_0000_000000000000"
    resp = page.goto(sqlite_server.url + f"/jobs/{missing}")
    assert resp.status == 404 and "does not exist" in page.inner_text("#error-message")
    resp = page.goto(sqlite_server.url + "/no/such/page")
    assert resp.status == 404 and "no page at /no/such/page" in page.inner_text("#error-message")
    s.close()


def test_long_log_sends_its_tail_then_pages_back(sqlite_server: ServerProc, page: Any) -> None:
    s = Session(url=sqlite_server.url)

    @mljobs.remote("DEFAULT_POOL", stage_name="dash_stage", session=s)
    def chatty(n):
        print("\n".join(f"row {i}" for i in range(n)), flush=True)

    job = chatty(3500)
    job.wait(120)
    page.goto(sqlite_server.url + f"/jobs/{job.id}")
    page.locator("#log").filter(has_text="row 3499").wait_for()
    page.locator("#log-state").filter(has_text="end of the log").wait_for()
    lines = page.inner_text("#log").splitlines()
    assert lines == [f"row {i}" for i in range(2500, 3500)]  # the tail only, at first
    for _ in range(3):
        page.click("#log-earlier")
        page.wait_for_function("n => document.getElementById('log').textContent.split('\\n').length > n",
                               arg=len(lines) + 1)
        lines = page.inner_text("#log").splitlines()
    assert lines == [f"row {i}" for i in range(3500)]  # every line once, in order
    assert page.locator("#log-earlier").is_hidden()
    s.close()


# -- a server with users ----------------------------------------------------------------------
@pytest.fixture
def users(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProc, dict[str, str]]]:
    """A server with an admin and two users; their tokens by name."""
    home = tmp_path_factory.mktemp("mlh")
    srv = ServerProc(home)
    srv.start()
    local = Session(url=srv.url)
    tokens = {"root": local.request("POST", "/users", json={"name": "root", "admin": True}).json()["token"]}
    admin = Session(url=srv.url, token=tokens["root"])
    for name in ("alice", "bob"):
        tokens[name] = admin.request("POST", "/users", json={"name": name}).json()["token"]
    local.close()
    admin.close()
    srv.token = tokens["root"]
    yield srv, tokens
    srv.stop()
    assert_no_leftovers(home)


def test_token_server_login_page_cookie_csrf_and_owners(users: tuple[ServerProc, dict[str, str]],
                                                        browser: Any) -> None:
    srv, tokens = users
    alice, bob = Session(url=srv.url, token=tokens["alice"]), Session(url=srv.url, token=tokens["bob"])
    a_job = _ticker(alice, stage="alice_stage")
    b_job = _ticker(bob, n=1, stage="bob_stage")
    b_job.wait(120)
    context = browser.new_context()
    context.set_default_timeout(45_000)
    page = context.new_page()

    # no token: the login page, never data, for every page and the JSON behind them
    for path in ("/", f"/jobs/{a_job.id}", "/pools", "/environments"):
        resp = page.goto(srv.url + path)
        html = page.content()
        assert resp.status == 401 and page.locator("#token").count() == 1, path
        assert "alice" not in html and "DEFAULT_POOL" not in html and "RUNNING" not in html, path
    for path in ("/dashboard/jobs.json", f"/jobs/{a_job.id}/live", "/api/v1/jobs", f"/api/v1/jobs/{a_job.id}/logs"):
        r = httpx.get(srv.url + path)
        assert r.status_code == 401 and a_job.id not in r.text and "tick" not in r.text, path

    page.goto(srv.url + "/")  # a wrong token is refused
    page.fill("#token", "mlu_not-a-real-token")
    page.click("#login-button")
    assert "refused" in page.inner_text("#login-error") and context.cookies() == []

    page.goto(srv.url + f"/jobs/{a_job.id}")  # logging in on a page returns to it
    page.fill("#token", tokens["alice"])
    page.click("#login-button")
    page.wait_for_url(f"**/jobs/{a_job.id}")
    page.locator("#log").filter(has_text="tick 2").wait_for()
    cookie, = context.cookies()
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["value"] == tokens["alice"]
    assert page.evaluate("document.cookie") == ""  # page scripts cannot read the token

    # alice sees her jobs only; bob's job is not found for her
    page.goto(srv.url + "/")
    assert page.locator("#jobs-body tr").evaluate_all("rows => rows.map(r => r.dataset.id)") == [a_job.id]
    assert "alice" in page.inner_text("header")
    assert page.goto(srv.url + f"/jobs/{b_job.id}").status == 404
    assert page.goto(srv.url + "/?owner=bob").ok and page.locator("#jobs-body tr").count() == 0

    # a cancel that did not come from the page's own form is refused and changes nothing
    page.goto(srv.url + f"/jobs/{a_job.id}")
    csrf = page.get_attribute("#cancel-form input[name=csrf]", "value")
    for form, headers in (({}, {}), ({"csrf": "0" * 64}, {}), ({"csrf": csrf}, {"Origin": "http://evil.example"})):
        r = context.request.post(srv.url + f"/jobs/{a_job.id}/cancel", form=form, headers=headers,
                                 max_redirects=0)
        assert r.status == 403, (form, headers)
    r = httpx.post(srv.url + f"/api/v1/jobs/{a_job.id}/cancel", cookies={"mljobs_token": tokens["alice"]})
    assert r.status_code == 401  # the API never acts on the cookie
    assert a_job.status == mljobs.JOB_STATUS.RUNNING
    page.click("#cancel-button")  # the real button works
    page.locator("#job-status").filter(has_text="CANCELLED").wait_for()
    wait_status(a_job, {"CANCELLED"}, allowed={"RUNNING", "CANCELLING"})

    page.click("text=Log out")
    page.wait_for_url("**/login")
    assert context.cookies() == [] and page.goto(srv.url + "/").status == 401
    context.close()

    # `mljobs ui --no-browser`: a one-time link that logs in without the token in it
    env = dict(os.environ, MLJOBS_URL=srv.url, MLJOBS_TOKEN=tokens["bob"], MLJOBS_HOME=str(srv.home))
    out = subprocess.run([sys.executable, "-m", "mljobs", "ui", "--no-browser"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    url = out.stdout.strip()
    assert url.startswith(srv.url + "/login?code=") and tokens["bob"] not in url
    context = browser.new_context()
    page = context.new_page()
    page.goto(url)
    assert page.url == srv.url + "/" and "bob" in page.inner_text("header")
    assert page.locator("#jobs-body tr").evaluate_all("rows => rows.map(r => r.dataset.id)") == [b_job.id]
    context.close()
    context = browser.new_context()  # the link works once
    page = context.new_page()
    resp = page.goto(url)
    assert resp.status == 400 and "used already" in page.inner_text("#login-error") and context.cookies() == []
    context.close()
    alice.close()
    bob.close()


def _distinct_colors(png: bytes) -> int:
    import io

    from PIL import Image

    return len(set(Image.open(io.BytesIO(png)).convert("RGB").getdata()))


def test_charts_of_a_running_job_and_a_pool_and_the_jobs_list(sqlite_server: ServerProc, page: Any, tmp_path) -> None:
    s = Session(url=sqlite_server.url)

    @mljobs.remote("DEFAULT_POOL", stage_name="dash_stage", name="chart-hog", session=s)
    def hog(seconds: float):
        import time as t

        held, deadline = [], t.monotonic() + seconds
        while t.monotonic() < deadline:  # busy, and holding more memory each second
            held.append(bytearray(8 << 20))
            end = t.monotonic() + 1
            while t.monotonic() < end:
                pass
        return len(held)

    job = hog(120)
    page.goto(f"{sqlite_server.url}/jobs/{job.id}")
    page.locator("#chart-cpu canvas").wait_for()
    page.locator("#chart-memory canvas").wait_for()
    samples = "() => parseInt(document.getElementById('charts').dataset.samples || '0')"
    page.wait_for_function("n => parseInt(document.getElementById('charts').dataset.samples || '0') >= n", arg=3)
    seen = page.evaluate(samples)
    # live: more samples arrive while it runs, without a reload
    page.wait_for_function("n => parseInt(document.getElementById('charts').dataset.samples || '0') > n", arg=seen)
    assert job.status == mljobs.JOB_STATUS.RUNNING
    assert page.locator("#chart-gpu").is_hidden()  # no GPU on this instance: no GPU chart
    assert "instance 0" in page.inner_text("#chart-memory")  # the legend names the instance
    # the screenshot of the job page: the charts are drawn (lines and axes, not an empty box)
    shot = tmp_path / "job-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert _distinct_colors(page.locator("#chart-cpu").screenshot()) > 20
    assert _distinct_colors(page.locator("#chart-memory").screenshot()) > 20

    # the jobs list: the given name once with the id under it, an unnamed job's id once, durations
    plain = _ticker(s, n=1)
    assert plain.wait(timeout=60) == mljobs.JOB_STATUS.DONE
    page.goto(sqlite_server.url + "/")
    row = page.locator(f"tr[data-id='{job.id}']")
    row.wait_for()
    assert row.locator("a").inner_text() == "chart-hog" and row.locator(".id").inner_text() == job.id
    assert re.fullmatch(r"[\d.]+s", row.locator(".queued").inner_text()), row.inner_text()
    assert re.fullmatch(r"[\d.]+s|\d+m \d\ds", row.locator(".ran").inner_text()), row.inner_text()
    other = page.locator(f"tr[data-id='{plain.id}']")
    other.locator(".ran").filter(has_text=re.compile(r"[\d.]+s")).wait_for()  # the live refresh draws it too
    assert other.inner_text().count(plain.id) == (1 if plain.name == plain.id else 0) + (plain.name != plain.id)

    # the pools page: the pool's running instances over the last hour, per user
    page.goto(sqlite_server.url + "/pools")
    fig = page.locator("figure.use-chart[data-pool='DEFAULT_POOL']")
    fig.locator("canvas").wait_for()
    page.wait_for_function("() => parseInt(document.querySelector(\"figure.use-chart[data-pool='DEFAULT_POOL']\")"
                           ".dataset.points || '0') >= 3")
    assert "all users" in fig.inner_text()
    assert _distinct_colors(fig.screenshot()) > 20
    # and who holds it now: the hog's owner, one instance running, all of the recent usage
    users = page.locator("tr.pool-users[data-pool='DEFAULT_POOL'] table.users tbody tr")
    cells = users.evaluate_all("rows => rows.map(r => [...r.cells].map(c => c.innerText.trim()))")
    assert cells == [[job._refresh()["owner"], "1", "0", "100%", ""]], cells

    # the schedules page: a schedule with its clock, state and next tick, and the definition it calls
    adder = mljobs.MLJobDefinition.register(_ticker, "DEFAULT_POOL", "dash_stage", name="nightly_ticks", session=s)
    nightly = mljobs.create_schedule("nightly", adder, every="1h", session=s,
                                     start_at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
    page.click("text=Schedules")
    page.wait_for_url("**/schedules")
    row = page.locator(f"#schedules tr[data-name='{nightly['name']}']")
    cells = row.evaluate("r => [...r.cells].map(c => c.innerText.trim())")
    assert cells[0].split()[0] == nightly["name"] and cells[1] == nightly["definition"] == adder.name, cells
    assert cells[2].startswith("every 3600 s"), cells
    assert cells[3] == "ACTIVE" and cells[4] and cells[5] == "all runs", cells  # a next tick, no run yet
    assert page.locator(f"#definitions tr[data-name='{adder.name}']").count() == 1
    mljobs.drop_schedule(nightly["name"], session=s)
    job.cancel()
    assert job.wait(timeout=60) == mljobs.JOB_STATUS.CANCELLED
