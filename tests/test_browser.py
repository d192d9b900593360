"""The viewer page and trio-events.js in a real browser: Debian's Chromium, driven by Playwright.

These are plain sync tests (Playwright's sync API owns its thread's event loop): the server is a
``trio-events serve`` subprocess, so that it can be killed and restarted on the same data dir and
port, and events are published with the Python client in a short ``trio.run``. Every wait is
Playwright's condition wait (``expect``), never a sleep.

A missing browser, or a missing ``playwright`` package, is a failure, not a skip: CI must not
go green without running these.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from browser_helpers import ServeProcess, publish, static_site

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("TRIO_EVENTS_CHROMIUM", "/usr/bin/chromium"))
#: What a headless Chromium needs on these machines (no sandbox as root, no calls home).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Long enough for a reconnect with backoff on a slow machine; each wait ends as soon as it can.
WAIT_MS = 20_000
TOKEN = "viewer-token-0123456789abcdef"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: the browser tests need Debian's chromium "
            f"(`apt-get install -y chromium`), or TRIO_EVENTS_CHROMIUM set to a Chromium binary"
        )
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as playwright:
        # Playwright gives each launch a fresh, empty user data dir.
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    with static_site() as base:
        yield base


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()  # fresh storage: no remembered token or stream
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"the page raised: {errors}"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServeProcess]:
    serve = ServeProcess(tmp_path / "data")
    serve.start()
    yield serve
    serve.kill()


def viewer_url(server: ServeProcess, site: str | None = None, **query: str) -> str:
    """The viewer's address: served by `server` itself at ``/``, or, given `site`, by another
    HTTP server, pointed at `server` with ``?server=``."""
    if site is None:
        return f"http://127.0.0.1:{server.port}/?{urlencode(query)}"
    return f"{site}/?{urlencode({'server': f'ws://127.0.0.1:{server.port}', **query})}"


def shown_ids(page: Page) -> list[str]:
    return page.locator("#events .row[data-id] .id").all_inner_texts()


def ids(*numbers: int) -> list[str]:
    return [str(n) for n in numbers]


def chat(
    text: str, *, source: str = "user", type: str = "chat.message", hidden: bool = False
) -> dict[str, Any]:
    return {"type": type, "source": source, "payload": {"content": text}, "hidden": hidden}


def artifact_dir(tmp_path: Path) -> Path:
    path = Path(os.environ.get("TRIO_EVENTS_ARTIFACTS", tmp_path))
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_the_page_shows_replayed_then_live_events(
    page: Page, server: ServeProcess, tmp_path: Path
) -> None:
    attack = "<img src=x onerror=window.pwned=1>"
    publish(server.url("conv-1"), [chat("first"), chat(attack, source="agent"), chat("third")])
    page.goto(viewer_url(server, stream="conv-1"))
    state = page.locator("#state")
    expect(state).to_have_text("connected")
    rows = page.locator("#events .row[data-id] .id")
    expect(rows).to_have_text(ids(2, 1, 0))  # replayed, newest first

    publish(server.url("conv-1"), [chat("live 1"), chat("live 2")])
    expect(rows).to_have_text(ids(4, 3, 2, 1, 0))
    expect(page.locator("#events .row.newest")).to_have_attribute("data-id", "4")
    expect(page.locator("#fig-last")).to_have_text("4")
    expect(page.locator("#fig-total")).to_have_text("5")
    # Event data is text, never markup.
    expect(page.locator('#events .row[data-id="1"] .payload')).to_contain_text(attack)
    assert page.locator("#events img").count() == 0
    assert page.evaluate("window.pwned") is None

    page.locator("#newest-first").uncheck()
    expect(rows).to_have_text(ids(0, 1, 2, 3, 4))
    expect(page.locator("#events .row.newest")).to_have_attribute("data-id", "4")
    page.screenshot(path=artifact_dir(tmp_path) / "viewer.png", full_page=True)


def test_filters_by_type_source_text_and_hidden(page: Page, server: ServeProcess) -> None:
    publish(
        server.url("f"),
        [
            chat("hello there"),  # 0
            chat("ls -la", source="agent", type="tool.call"),  # 1
            chat("done", source="environment", type="tool.output"),  # 2
            chat("internal note", source="agent", hidden=True),  # 3
            chat("Hello again", source="agent"),  # 4
        ],
    )
    page.goto(viewer_url(server, stream="f"))
    rows = page.locator("#events .row[data-id] .id")
    expect(rows).to_have_text(ids(4, 2, 1, 0))  # hidden events are not shown by default

    page.locator("#show-hidden").check()
    expect(rows).to_have_text(ids(4, 3, 2, 1, 0))
    page.locator("#filter-type").fill("tool.")
    expect(rows).to_have_text(ids(2, 1))
    page.locator("#filter-source").select_option("agent")
    expect(rows).to_have_text(ids(1))
    page.locator("#filter-type").fill("")
    expect(rows).to_have_text(ids(4, 3, 1))
    page.locator("#filter-text").fill("HELLO")  # case-insensitive
    expect(rows).to_have_text(ids(4))
    page.locator("#filter-source").select_option("")
    expect(rows).to_have_text(ids(4, 0))
    page.locator("#filter-text").fill("")
    page.locator("#show-hidden").uncheck()
    expect(rows).to_have_text(ids(4, 2, 1, 0))


def test_the_page_resumes_after_a_server_restart_with_every_event_once_in_order(
    page: Page, server: ServeProcess
) -> None:
    publish(server.url("r"), [chat(f"before {i}") for i in range(5)])
    page.goto(viewer_url(server, stream="r"))
    rows = page.locator("#events .row[data-id] .id")
    expect(rows).to_have_text(ids(4, 3, 2, 1, 0))

    server.kill()
    expect(page.locator("#state")).to_have_text(re.compile(r"^reconnecting \(attempt \d+\)$"))
    server.start()  # the same data dir and port
    publish(server.url("r"), [chat(f"after {i}") for i in range(5)])

    expect(page.locator("#state")).to_have_text("connected")
    expect(rows).to_have_text(ids(*range(9, -1, -1)))
    expect(page.locator("#fig-total")).to_have_text("10")
    assert shown_ids(page) == ids(*range(9, -1, -1))  # nothing arrived twice meanwhile


def test_publishing_from_the_page_shows_the_assigned_id(
    page: Page, site: str, server: ServeProcess
) -> None:
    publish(server.url("p"), [chat("already here")])
    # The page served from another origin, pointed at the server with ?server=.
    page.goto(viewer_url(server, site, stream="p"))
    expect(page.locator("#state")).to_have_text("connected")

    page.locator("#publish-panel summary").click()
    page.locator("#pub-type").fill("test.ping")
    page.locator("#pub-source").select_option("agent")
    page.locator("#pub-payload").fill(json.dumps({"n": 42}))
    page.locator("#pub-send").click()
    expect(page.locator("#pub-result")).to_have_text("published as id 1")
    row = page.locator('#events .row[data-id="1"]')
    expect(row.locator(".type")).to_have_text("test.ping")
    expect(row.locator(".source")).to_have_text("agent")

    page.locator("#pub-payload").fill("[1, 2]")
    page.locator("#pub-send").click()
    expect(page.locator("#pub-result")).to_have_text(
        'the payload must be a JSON object, e.g. {"value": 3}'
    )


def test_a_wrong_token_shows_a_clear_message(page: Page, tmp_path: Path) -> None:
    tokens = {
        "tokens": [
            {"name": "viewer", "token": TOKEN, "streams": ["*"], "permissions": ["read"]},
        ]
    }
    serve = ServeProcess(tmp_path / "data", env={"VIEWER_TOKENS": json.dumps(tokens)})
    serve.extra_args = ["--tokens-env", "VIEWER_TOKENS"]
    serve.start()
    try:
        page.goto(viewer_url(serve))
        page.locator("#stream").fill("secure")
        page.locator("#token").fill("not-the-right-token-at-all")
        page.locator("#connect").click()
        message = page.locator("#message")
        expect(message).to_have_text(
            re.compile(
                r"^Token refused: the token is not valid for this server; .*"
                r"Enter a valid token and connect again\.$"
            )
        )
        expect(message).to_have_class("error")
        expect(page.locator("#state")).to_have_text("closed")
        assert "token" not in page.url  # never in the address bar

        page.locator("#token").fill(TOKEN)
        page.locator("#connect").click()
        expect(page.locator("#state")).to_have_text("connected")
        expect(page.locator("#message")).not_to_have_class("error")
    finally:
        serve.kill()
