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
import socket
import threading
import time
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
    # The page served from another origin, pointed at the server with ?server=: a server
    # without auth lets only the origins it is told connect.
    server.kill()
    server.extra_args = ["--allowed-origin", site]
    server.start()
    page.goto(viewer_url(server, site, stream="p"))
    # Another origin than the page's: nothing connects until Connect is pressed.
    expect(page.locator("#message")).to_contain_text(f"another server, 127.0.0.1:{server.port}")
    expect(page.locator("#state")).to_have_text("closed")
    page.locator("#connect").click()
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
    page.locator("#pub-payload").fill("{n: 1}")
    page.locator("#pub-send").click()
    expect(page.locator("#pub-result")).to_contain_text("the payload is not valid JSON (")


def test_a_page_of_another_origin_cannot_use_a_server_without_auth(
    page: Page, site: str, server: ServeProcess
) -> None:
    publish(server.url("secret"), [chat("not for other sites")])
    page.goto(f"{site}/")  # any other site the user visits

    def try_to_read() -> dict[str, object]:
        result: dict[str, object] = page.evaluate(
            """async (url) => new Promise((resolve) => {
              const ws = new WebSocket(url);
              const got = [];
              ws.onmessage = (m) => got.push(JSON.parse(m.data).op);
              ws.onclose = (ev) => resolve({ code: ev.code, got });
              ws.onopen = () => setTimeout(() => ws.close(1000), 200);
            })""",
            server.url("secret"),
        )
        return result

    refused = try_to_read()
    assert refused == {"code": 1006, "got": []}, refused  # refused before the upgrade
    server.kill()
    server.extra_args = ["--allowed-origin", site]
    server.start()
    allowed = try_to_read()
    assert allowed["got"][:2] == ["hello", "events"], allowed  # type: ignore[index]


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


#: A fake WebSocket for the module in the page: it records every socket opened, and the test
#: drives each one's messages and close by hand.
FAKE_SOCKET = """() => {
window.sockets = [];
window.WebSocket = class FakeSocket {
  static CONNECTING = 0; static OPEN = 1; static CLOSING = 2; static CLOSED = 3;
  constructor(url) {
    this.url = url; this.readyState = 0; this.sent = []; window.sockets.push(this);
  }
  send(data) { this.sent.push(JSON.parse(data)); }
  close() { this.readyState = 3; }
};
}"""
HELLO = {"op": "hello", "protocol": 1, "stream": "s", "epoch": "e1", "latest_id": -1, "after": -1}


@pytest.mark.parametrize("callback", ["onState", "onClose"])
def test_disconnect_from_a_callback_after_a_drop_stays_closed(
    page: Page, site: str, callback: str
) -> None:
    page.goto(f"{site}/")  # no ?stream=: the viewer itself connects to nothing
    page.evaluate(FAKE_SOCKET)
    result = page.evaluate(
        """async ([callback, hello]) => {
          const { connect } = await import("/trio-events.js");
          let conn;
          const seen = [];
          conn = connect("ws://127.0.0.1:1/v1/streams/s", {
            reconnect: { baseMs: 5, capMs: 5 },
            onState: (state) => {
              seen.push(state);
              if (callback === "onState" && state === "reconnecting") conn.disconnect();
            },
            onClose: () => { if (callback === "onClose") conn.disconnect(); },
          });
          const ws = window.sockets[0];
          ws.readyState = 1;
          ws.onmessage({ data: JSON.stringify(hello) });
          ws.readyState = 3;
          ws.onclose({ code: 1006, reason: "" });
          // Ten times the reconnect delay: a reconnect would have opened its socket by then.
          await new Promise((resolve) => setTimeout(resolve, 50));
          return { state: conn.state, sockets: window.sockets.length, seen };
        }""",
        [callback, HELLO],
    )
    assert result["state"] == "closed", result
    assert result["sockets"] == 1, result  # no reconnect


@pytest.mark.parametrize(
    ("error", "final"),
    [
        ({"op": "error", "code": "rate_limited", "message": "too many pings"}, "rate_limited"),
        ({"op": "error", "code": "unauthorized", "message": "token expired"}, "token_refused"),
    ],
    ids=["flood", "expired-token"],
)
def test_a_close_1008_is_final_and_says_why(
    page: Page, site: str, error: dict[str, str], final: str
) -> None:
    page.goto(f"{site}/")
    page.evaluate(FAKE_SOCKET)
    result = page.evaluate(
        """async ([hello, error]) => {
          const { connect } = await import("/trio-events.js");
          const errors = [];
          const conn = connect("ws://127.0.0.1:1/v1/streams/s", {
            reconnect: { baseMs: 5, capMs: 5 },
            onError: (err) => errors.push(err.code),
          });
          const ws = window.sockets[0];
          ws.readyState = 1;
          ws.onmessage({ data: JSON.stringify(hello) });
          ws.onmessage({ data: JSON.stringify(error) });
          ws.readyState = 3;
          ws.onclose({ code: 1008, reason: "" });
          // Ten times the reconnect delay: a reconnect would have opened its socket by then.
          await new Promise((resolve) => setTimeout(resolve, 50));
          return { state: conn.state, code: conn.error?.code, sockets: window.sockets.length,
                   errors };
        }""",
        [HELLO, error],
    )
    assert result["state"] == "closed", result
    assert result["code"] == final, result
    assert result["sockets"] == 1, result  # 1008 is not retried
    assert result["errors"][-1] == final, result
    assert result["errors"].count(final) == 1, result  # reported once


@pytest.mark.parametrize("delivers", [False, True], ids=["hello-only", "delivers-events"])
def test_connections_that_deliver_nothing_count_toward_max_attempts(
    page: Page, site: str, delivers: bool
) -> None:
    # A server that says hello and closes with 1011 at once (the stream's stored history is
    # damaged) must not keep the page reconnecting forever; one that delivers events each time
    # is making progress, and is followed however often it drops.
    page.goto(f"{site}/")
    page.evaluate(FAKE_SOCKET)
    result = page.evaluate(
        """async ([hello, delivers]) => {
          const { connect } = await import("/trio-events.js");
          const conn = connect("ws://127.0.0.1:1/v1/streams/s", {
            reconnect: { baseMs: 1, capMs: 1, maxAttempts: 2 },
          });
          for (let i = 0; i < 6 && conn.state !== "closed"; i++) {
            while (window.sockets.length <= i) {
              await new Promise((resolve) => setTimeout(resolve, 1));
            }
            const ws = window.sockets[i];
            ws.readyState = 1;
            ws.onmessage({ data: JSON.stringify({ ...hello, after: i - 1 }) });
            if (delivers) {
              const event = { id: i, timestamp: "2026-11-26T00:00:00Z", source: "user",
                              type: "t", cause: null, hidden: false, payload: {} };
              ws.onmessage({ data: JSON.stringify({ op: "events", events: [event] }) });
            }
            ws.readyState = 3;
            ws.onclose({ code: 1011, reason: "the stream's stored history is damaged" });
          }
          return { state: conn.state, code: conn.error?.code, message: conn.error?.message,
                   sockets: window.sockets.length, lastId: conn.lastId };
        }""",
        [HELLO, delivers],
    )
    if delivers:
        assert result["state"] != "closed", result
        assert result["lastId"] == 5, result
    else:
        assert result["state"] == "closed", result
        assert result["code"] == "reconnect_failed", result
        assert result["sockets"] == 3, result
        assert "3 attempts in a row failed" in result["message"], result
        assert "stored history is damaged" in result["message"], result


@pytest.mark.parametrize("answers", [False, True], ids=["silent", "answers-pings"])
def test_a_silent_connection_is_pinged_then_dropped_and_resumed(
    page: Page, site: str, answers: bool
) -> None:
    page.goto(f"{site}/")
    page.evaluate(FAKE_SOCKET)
    result = page.evaluate(
        """async ([hello, answers]) => {
          const { connect } = await import("/trio-events.js");
          const closes = [];
          const conn = connect("ws://127.0.0.1:1/v1/streams/s", {
            reconnect: { baseMs: 5, capMs: 5 },
            pingIntervalMs: 30, pingTimeoutMs: 30,
            onClose: (info) => closes.push(info),
          });
          const ws = window.sockets[0];
          ws.readyState = 1;
          ws.onmessage({ data: JSON.stringify(hello) });
          const deadline = Date.now() + 300;
          while (Date.now() < deadline) {
            await new Promise((resolve) => setTimeout(resolve, 5));
            const ping = ws.sent.find((m) => m.op === "ping" && !m.answered);
            if (answers && ping) {
              ping.answered = true;
              ws.onmessage({ data: JSON.stringify({ op: "pong", req: ping.req }) });
            }
          }
          return { pings: ws.sent.filter((m) => m.op === "ping").length,
                   sockets: window.sockets.length, closes, second: window.sockets[1]?.url };
        }""",
        [HELLO, answers],
    )
    assert result["pings"] >= 1, result
    if answers:
        assert result["sockets"] == 1, result  # alive: kept
        assert result["closes"] == [], result
    else:
        assert result["sockets"] >= 2, result  # dropped and reconnected
        assert result["closes"][0]["code"] == 1006, result
        assert "no answer to a ping within 30 ms" in result["closes"][0]["reason"], result
        assert result["closes"][0]["willReconnect"] is True, result
        assert "after=-1" in result["second"], result


def test_bad_ping_options_are_type_errors_that_say_what_to_pass(page: Page, site: str) -> None:
    page.goto(f"{site}/")
    messages = page.evaluate(
        """async () => {
          const { connect } = await import("/trio-events.js");
          const out = [];
          for (const options of [{ pingIntervalMs: 0 }, { pingTimeoutMs: "5" },
                                 { pingTimeoutMs: -1 }]) {
            try { connect("ws://127.0.0.1:1/v1/streams/s", options); out.push("no error"); }
            catch (err) { out.push(`${err.name}: ${err.message}`); }
          }
          return out;
        }"""
    )
    assert messages == [
        "TypeError: pingIntervalMs is a number of ms > 0 or null, not 0",
        "TypeError: pingTimeoutMs is a number of ms > 0, not 5",
        "TypeError: pingTimeoutMs is a number of ms > 0, not -1",
    ]


def test_resuming_after_a_long_pause_shows_the_last_events_and_the_skipped_count(
    page: Page, server: ServeProcess
) -> None:
    publish(server.url("k"), [chat(f"before {i}") for i in range(3)])
    page.goto(viewer_url(server, stream="k", keep="50"))  # keep: MAX_KEPT lowered to 50
    rows = page.locator("#events .row[data-id] .id")
    expect(rows).to_have_text(ids(2, 1, 0))

    page.locator("#pause").click()
    publish(server.url("k"), [chat(f"while paused {i}") for i in range(120)])  # ids 3..122
    expect(page.locator("#fig-pending")).to_have_text("120")
    expect(page.locator("#pause")).to_have_text("Resume (120)")
    page.locator("#pause").click()

    # The last 50 (73..122), the marker for the 70 skipped, then what was shown before.
    expect(rows).to_have_text(ids(*range(122, 72, -1), 2, 1, 0))
    expect(page.locator("#events .row.skipped")).to_have_text(
        re.compile(r"^70 events skipped while paused \(ids 3 to 72\); connect with after=2 ")
    )
    expect(page.locator("#message")).to_have_text(
        re.compile(r"^70 events skipped while paused \(ids 3 to 72\): only the last 50 were kept")
    )
    expect(page.locator("#fig-total")).to_have_text("123")
    expect(page.locator("#fig-pending")).to_have_text("0")
    expect(page.locator("#pause")).to_have_text("Pause")


def test_a_link_to_another_server_sends_no_stored_token(page: Page, site: str) -> None:
    received: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.1)
        port = listener.getsockname()[1]
        stop = threading.Event()

        def accept() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(1.0)
                    try:
                        received.append(conn.recv(65536) or b"(connected)")
                    except TimeoutError:
                        received.append(b"(connected)")

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            page.goto(f"{site}/")
            page.evaluate(f"sessionStorage.setItem('trio-events.token', {json.dumps(TOKEN)})")
            page.goto(f"{site}/?{urlencode({'server': f'ws://127.0.0.1:{port}', 'stream': 's'})}")
            expect(page.locator("#message")).to_contain_text(f"another server, 127.0.0.1:{port}")
            expect(page.locator("#state")).to_have_text("closed")
            expect(page.locator("#token")).to_have_value("")
            expect(page.locator("#stream")).to_have_value("s")
            # A connection attempt starts as the page loads; give it a moment to arrive.
            deadline = time.monotonic() + 0.5
            while not received and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            thread.join()
    assert received == [], f"the page connected to the other server: {received!r}"
