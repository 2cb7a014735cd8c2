"""The dashboard in a real browser (Debian's headless Chromium, driven by Playwright) against
a real `tasklease api`, real workers and a real database.

Set TASKLEASE_SCREENSHOTS=docs/dashboard to refresh the screenshots in docs/dashboard.md.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.support.procs import REPO, Procs

CHROMIUM = os.environ.get("TASKLEASE_CHROMIUM", "/usr/bin/chromium")
SHOTS = os.environ.get("TASKLEASE_SCREENSHOTS")
WAIT_MS = 30_000
TOKEN = "s3cret-token-for-the-browser-test"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not shutil.which(CHROMIUM),
        reason=f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium package",
    ),
]


@pytest.fixture
def page(procs: Procs) -> Iterator[Page]:
    """A fresh browser per test. It starts after `procs` (and the test's database): sync
    Playwright runs an event loop of its own, during which async fixtures cannot start."""
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        tab = context.new_page()
        tab.set_default_timeout(WAIT_MS)
        errors: list[str] = []
        tab.on("pageerror", lambda exc: errors.append(str(exc)))
        # a refused login answers 401, which Chromium logs too: that one is expected
        tab.on(
            "console",
            lambda m: (
                errors.append(m.text)
                if m.type == "error" and "status of 401" not in m.text
                else None
            ),
        )
        yield tab
        browser.close()
    assert errors == [], f"the page logged errors: {errors}"


def shot(page: Page, name: str, *, full_page: bool = True) -> None:
    """Save a screenshot for docs/dashboard.md when TASKLEASE_SCREENSHOTS is set."""
    if not SHOTS:
        return
    folder = Path(SHOTS) if Path(SHOTS).is_absolute() else REPO / SHOTS
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=folder / f"{name}.png", full_page=full_page)


def submit(url: str, *tasks: dict[str, Any], token: str | None = None) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.post(f"{url}/tasks/batch", json={"tasks": list(tasks)}, headers=headers)
    assert r.status_code == 201, r.text
    created: list[dict[str, Any]] = r.json()["tasks"]
    return created


def later(hours: float = 1) -> str:
    return (datetime.now(UTC) + timedelta(hours=hours)).isoformat()


def count(page: Page, state: str) -> Any:
    return page.locator(f"#count-{state}")


def test_overview_counts_change_as_tasks_complete(page: Page, procs: Procs) -> None:
    procs.env["TASKLEASE_REPORT_SECONDS"] = "0.5"
    _, url = procs.api()
    submit(
        url,
        *[{"action": "test_sleep", "payload": {"seconds": 0.2}} for _ in range(12)],
        *[{"action": "test_permanent", "payload": {"user_id": 42}} for _ in range(2)],
        {"action": "noop", "payload": {}, "due_at": later(), "queue": "reports"},
    )
    page.goto(f"{url}/ui/")
    expect(page.get_by_role("heading", name="Overview", level=1)).to_be_visible()
    expect(count(page, "PENDING")).to_have_text("15")
    expect(count(page, "COMPLETED")).to_have_text("0")
    page.evaluate("window.notReloaded = true")

    worker = procs.worker("worker")
    expect(count(page, "COMPLETED")).to_have_text("12", timeout=WAIT_MS)
    expect(count(page, "DEAD")).to_have_text("2")
    expect(count(page, "PENDING")).to_have_text("1")
    assert page.evaluate("window.notReloaded") is True, "the page was reloaded"

    workers = page.get_by_role("region", name=re.compile("Workers"))
    expect(workers.get_by_role("row")).to_have_count(2)
    expect(workers).to_contain_text(f".{worker.pid}.".replace(".", ":", 1))
    queues = page.get_by_role("region", name="Queues")
    expect(queues.get_by_role("rowheader", name="reports")).to_be_visible()
    # the chart reads what the worker reports every 0.5 s
    throughput = page.get_by_role("region", name=re.compile("Throughput"))
    expect(throughput).to_contain_text("12 completed", timeout=WAIT_MS)
    expect(throughput).to_contain_text("2 failed")
    dead = page.get_by_role("region", name="Dead letter by action")
    expect(dead.get_by_role("rowheader", name="test_permanent")).to_be_visible()
    shot(page, "overview")
    page.get_by_role("link", name="Tasks", exact=True).click()
    expect(page.locator("#tasks tbody tr")).to_have_count(15)
    shot(page, "tasks")
    page.go_back()

    page.set_viewport_size({"width": 390, "height": 844})
    expect(count(page, "COMPLETED")).to_be_visible()
    shot(page, "overview-phone")


def test_dead_task_history_requeue_and_completion(page: Page, procs: Procs) -> None:
    _, url = procs.api()
    procs.worker("worker")
    task = submit(url, {"action": "test_fail_once", "payload": {"invoice": 7}})[0]

    page.goto(f"{url}/ui/tasks?state=DEAD")
    link = page.get_by_role("link", name=str(task["id"]), exact=True)
    for _ in range(60):  # the list does not refresh itself: look again until it is there
        if link.count():
            break
        page.wait_for_timeout(250)
        page.reload()
    link.click()

    expect(page.locator("#task-state")).to_have_text("DEAD")
    expect(page.locator("#last-error")).to_contain_text("RuntimeError: the first run")
    expect(page.locator("#traceback")).to_contain_text("Traceback (most recent call last)")
    expect(page.locator("#traceback")).to_contain_text("fail_once")
    history = page.locator("#history > li")
    expect(history).to_have_count(3)
    expect(history.nth(0)).to_contain_text("submit")
    expect(history.nth(1)).to_contain_text("PENDING → RUNNING")
    expect(history.nth(2)).to_contain_text("RUNNING → DEAD")
    expect(history.nth(2)).to_contain_text("after the previous step")
    expect(page.locator("#payload")).to_contain_text('"invoice": 7')
    shot(page, "task-dead")

    page.get_by_role("button", name="Requeue", exact=True).click()
    expect(page.locator("#notice")).to_contain_text(f"Task {task['id']} requeued")
    expect(page.get_by_role("heading", name=re.compile(f"Task {task['id']}"))).to_be_visible()
    expect(history.nth(3)).to_contain_text("DEAD → PENDING")
    expect(history.nth(3)).to_contain_text("requeued by an operator")

    state = page.locator("#task-state")
    for _ in range(120):  # watch it run again; the page shows the state when loaded
        if state.text_content() == "COMPLETED":
            break
        page.wait_for_timeout(250)
        page.goto(f"{url}/ui/tasks/{task['id']}")
    expect(state).to_have_text("COMPLETED")
    expect(page.locator("#result")).to_contain_text('"runs": 2')
    expect(history.last).to_contain_text("RUNNING → COMPLETED")
    shot(page, "task-completed")


def test_cancel_a_pending_task(page: Page, procs: Procs) -> None:
    _, url = procs.api()
    task = submit(url, {"action": "noop", "payload": {"note": "tomorrow"}, "due_at": later(24)})[0]
    page.goto(f"{url}/ui/tasks/{task['id']}")
    expect(page.locator("#task-state")).to_have_text("PENDING")
    expect(page.get_by_role("button", name="Requeue")).to_have_count(0)
    page.get_by_role("button", name="Cancel task").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#notice")).to_have_text(f"Task {task['id']} cancelled.")
    expect(page.locator("#task-state")).to_have_text("CANCELLED")
    expect(page.locator("#history > li").last).to_contain_text("PENDING → CANCELLED")
    expect(page.get_by_role("button", name="Cancel task")).to_have_count(0)
    assert httpx.get(f"{url}/tasks/{task['id']}").json()["state"] == "CANCELLED"


def test_requeue_all_dead_tasks_of_an_action_after_confirming(page: Page, procs: Procs) -> None:
    _, url = procs.api()
    procs.worker("worker")
    submit(url, *[{"action": "test_fail_once", "payload": {"n": i}} for i in range(3)])
    submit(url, {"action": "test_permanent", "payload": {}})
    page.goto(f"{url}/ui/")
    dead = page.get_by_role("region", name="Dead letter by action")
    expect(dead.get_by_role("row", name=re.compile("test_fail_once 3"))).to_be_visible()
    expect(count(page, "DEAD")).to_have_text("4")
    dead.get_by_role("link", name="Requeue all 3…").click()

    expect(page.locator("#confirm-text")).to_contain_text("Requeue all 3 DEAD test_fail_once")
    shot(page, "requeue-confirm")
    page.get_by_role("button", name="Yes, requeue 3 task(s)").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#notice")).to_have_text(
        "3 DEAD task(s) of test_fail_once requeued: PENDING, due now."
    )
    page.goto(f"{url}/ui/")
    expect(count(page, "COMPLETED")).to_have_text("3", timeout=WAIT_MS)
    expect(count(page, "DEAD")).to_have_text("1")  # the other action's task stays DEAD


def test_pause_and_resume_a_queue_from_the_overview(page: Page, procs: Procs) -> None:
    _, url = procs.api()
    procs.worker("worker", "--queues", "emails")
    submit(url, {"action": "noop", "payload": {}, "queue": "emails"})
    page.goto(f"{url}/ui/")
    expect(count(page, "COMPLETED")).to_have_text("1", timeout=WAIT_MS)
    row = page.get_by_role("region", name="Queues").get_by_role("row", name=re.compile("^emails"))
    row.get_by_role("button", name="Pause").click()
    expect(page.locator("#notice")).to_contain_text("Queue emails paused")
    expect(row.get_by_text("paused", exact=True)).to_be_visible()
    assert httpx.get(f"{url}/stats").json()["queues"]["emails"]["paused_at"]
    submit(url, {"action": "noop", "payload": {}, "queue": "emails"})
    page.goto(f"{url}/ui/")
    expect(count(page, "PENDING")).to_have_text("1", timeout=WAIT_MS)  # accepted, not run
    expect(count(page, "COMPLETED")).to_have_text("1", timeout=WAIT_MS)
    row.get_by_role("button", name="Resume").click()
    expect(page.locator("#notice")).to_have_text("Queue emails resumed.")
    page.goto(f"{url}/ui/")
    expect(count(page, "COMPLETED")).to_have_text("2", timeout=WAIT_MS)


def test_task_list_filters_search_and_pages(page: Page, procs: Procs) -> None:
    _, url = procs.api()
    tasks = submit(
        url,
        *[
            {"action": "noop", "payload": {"n": i}, "queue": "bulk", "due_at": later()}
            for i in range(5)
        ],
        {"action": "email_user", "payload": {"user_id": 1}, "idempotency_key": "welcome-1"},
        {"action": "email_user", "payload": {"user_id": 2}, "idempotency_key": "welcome-2"},
    )
    ids = sorted((t["id"] for t in tasks), reverse=True)
    page.goto(f"{url}/ui/tasks?limit=3")
    rows = page.locator("#tasks tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.first).to_have_attribute("data-task", str(ids[0]))
    expect(rows.first.locator("time").first).to_have_attribute("datetime", re.compile(r"Z$"))
    page.get_by_role("link", name="Older »").click()
    expect(rows).to_have_count(3)
    expect(rows.first).to_have_attribute("data-task", str(ids[3]))
    page.get_by_role("link", name="Older »").click()
    expect(rows).to_have_count(1)
    expect(page.get_by_role("link", name="Older »")).to_have_count(0)
    page.get_by_role("link", name="« Newest").click()
    expect(rows.first).to_have_attribute("data-task", str(ids[0]))

    page.get_by_label("Action").fill("email_user")
    page.get_by_label("Per page").fill("50")
    page.get_by_role("button", name="Filter").click()
    expect(rows).to_have_count(2)
    page.get_by_label("State").select_option("PENDING")
    page.get_by_label("Action").fill("")
    page.get_by_label("Queue").fill("bulk")
    page.get_by_role("button", name="Filter").click()
    expect(rows).to_have_count(5)

    page.get_by_label("Task id or idempotency key").fill("welcome-2")
    page.keyboard.press("Enter")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("welcome-2")
    rows.first.get_by_role("link").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text(str(ids[0]))
    expect(page.locator("#payload")).to_contain_text('"user_id": 2')

    page.goto(f"{url}/ui/tasks?q={ids[-1]}")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-task", str(ids[-1]))
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"{url}/ui/tasks/{ids[-1]}")
    shot(page, "task-phone")


def test_login_with_the_api_token(page: Page, procs: Procs) -> None:
    _, url = procs.api(env={"TASKLEASE_API_TOKEN": TOKEN})
    page.goto(f"{url}/ui/tasks?state=DEAD")
    expect(page).to_have_url(re.compile(r"/ui/login\?next="))
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    page.get_by_label("API token").fill("wrong")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_have_text("Wrong token.")
    assert page.context.cookies() == []
    shot(page, "login")

    page.get_by_label("API token").fill(TOKEN)
    page.keyboard.press("Enter")
    expect(page).to_have_url(f"{url}/ui/tasks?state=DEAD")
    expect(page.get_by_role("heading", name="Tasks")).to_be_visible()
    (cookie,) = page.context.cookies()
    assert cookie["name"] == "tasklease_session"
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["secure"]) == (True, "Strict", True)
    assert TOKEN not in cookie["value"]
    assert page.evaluate("document.cookie") == "", "scripts must not see the session"
    page.goto(f"{url}/ui/")
    expect(count(page, "PENDING")).to_have_text("0")

    # the JSON API still wants the bearer token; the cookie is for the dashboard only
    jar = {"Cookie": f"tasklease_session={cookie['value']}"}
    assert httpx.get(f"{url}/stats", headers=jar).status_code == 401
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"{url}/stats", headers=bearer).status_code == 200
    assert httpx.get(f"{url}/ui/", headers=jar).status_code == 200
    # a form on another site cannot make the logged-in browser act
    task = submit(url, {"action": "noop", "payload": {}, "due_at": later()}, token=TOKEN)[0]
    forged = httpx.post(
        f"{url}/ui/tasks/{task['id']}/cancel",
        headers={**jar, "Origin": "https://attacker.example", "Sec-Fetch-Site": "cross-site"},
    )
    assert forged.status_code == 403
    assert httpx.get(f"{url}/tasks/{task['id']}", headers=bearer).json()["state"] == "PENDING"

    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    assert page.context.cookies() == []
    page.goto(f"{url}/ui/")
    expect(page).to_have_url(re.compile(r"/ui/login"))

    page.get_by_label("API token").fill(TOKEN)
    page.keyboard.press("Enter")
    expect(count(page, "PENDING")).to_have_text("1")
    page.context.clear_cookies()  # the session ends: the overview's next refresh notices
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
