"""The dashboard against odd input and replayed or guessed credentials, with a real API."""

from __future__ import annotations

import httpx
import pytest

from tests.support.procs import Procs

TOKEN = "dashboard-edge-token"
pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/ui/tasks?limit=%C2%B2", 400),
        ("/ui/tasks?cursor=%C2%B2", 400),
        ("/ui/tasks?state=NOPE", 400),
        ("/ui/tasks?limit=5&cursor=12", 200),
        ("/ui/tasks?q=%C2%B2", 200),  # a search for that idempotency key: none found
        ("/ui/tasks?q=%D9%A3", 200),
        ("/ui/?notice=cancelled&id=%C2%B2", 200),
        ("/ui/static/ui.js%00.png", 404),
        ("/ui/static/%00", 404),
    ],
)
async def test_odd_parameters_get_a_4xx_or_a_page_never_a_500(
    procs: Procs, path: str, status: int
) -> None:
    _, url = procs.api(env={"TASKLEASE_API_TOKEN": None})
    async with httpx.AsyncClient(base_url=url) as http:
        r = await http.get(path)
    assert r.status_code == status, r.text[:500]


async def login(http: httpx.AsyncClient, token: str) -> httpx.Response:
    return await http.post("/ui/login", data={"token": token, "next": "/ui/"})


async def test_sessions_end_at_logout_and_odd_cookies_ask_to_log_in(procs: Procs) -> None:
    _, url = procs.api(env={"TASKLEASE_API_TOKEN": TOKEN})
    async with httpx.AsyncClient(base_url=url) as http:
        r = await login(http, TOKEN)
        assert r.status_code == 303, r.text
        cookie = r.cookies["tasklease_session"]
        copied = {"Cookie": f"tasklease_session={cookie}"}
        async with httpx.AsyncClient(base_url=url) as other:
            assert (await other.get("/ui/tasks", headers=copied)).status_code == 200
            assert (await http.post("/ui/logout", headers=copied)).status_code == 303
            replayed = await other.get("/ui/tasks", headers=copied)
            assert replayed.status_code in (302, 303), "a logged-out cookie still opens pages"
            for odd in ("%C2%B2.x", "\u00b2" * 32 + ".x", "", "."):
                r = await other.get(
                    "/ui/tasks", headers={"Cookie": f"tasklease_session={odd}".encode()}
                )
                assert r.status_code in (302, 303), (odd, r.status_code, r.text[:300])


async def test_failed_logins_are_throttled(procs: Procs) -> None:
    _, url = procs.api(env={"TASKLEASE_API_TOKEN": TOKEN})
    async with httpx.AsyncClient(base_url=url) as http:
        for _ in range(5):
            assert (await login(http, "guess")).status_code == 401
        throttled = await login(http, "guess")
        assert throttled.status_code == 429
        assert 0 < int(throttled.headers["retry-after"]) <= 60
        # the right token is refused too while throttled: guessing gains nothing
        assert (await login(http, TOKEN)).status_code == 429
