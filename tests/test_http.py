"""The HTTP side of the server's port: /healthz, /metrics, the static files, and the HTTP errors,
end to end over loopback with raw TCP and h11; plus the pure router and the sync histogram."""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from importlib import resources
from importlib.metadata import version
from pathlib import Path
from typing import Any

import attrs
import h11
import jwt
import orjson
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed, open_websocket_url

import trio_events as te
from helpers import recv, server_runner
from trio_events.store.log import SyncLatency
from trio_events.wire.auth import AnyOf, Authenticator, JwtAuthenticator, StaticTokens
from trio_events.wire.http import Health, HttpRouter, StaticFile
from trio_events.wire.server import ServerConfig

TIMEOUT = 20
READER = "reader-token-0123456789abcdef"
JWT_SECRET = "a-jwt-secret-that-is-at-least-32-bytes-long"
TOKENS = StaticTokens.from_json(
    orjson.dumps(
        {
            "tokens": [
                {"name": "reader", "token": READER, "streams": ["s"], "permissions": ["read"]},
            ]
        }
    ),
    origin="test tokens",
)
AUTH = AnyOf(TOKENS, JwtAuthenticator(JWT_SECRET))


def mint(streams: list[str], permissions: list[str], expires_in: float = 86400) -> str:
    claims = {
        "sub": "bot",
        "streams": streams,
        "permissions": permissions,
        "exp": int(time.time() + expires_in),
    }
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


READ_ALL = mint(["*"], ["read"])
PUBLISH_ALL = mint(["*"], ["publish"])
SECRETS = (READER, JWT_SECRET, READ_ALL, PUBLISH_ALL)
CONFIG = ServerConfig(close_timeout=5)


_running = server_runner(CONFIG)


@asynccontextmanager
async def serving(
    hub: te.EventHub,
    config: ServerConfig = CONFIG,
    auth: Authenticator | None = None,
) -> AsyncIterator[tuple[int, trio.CancelScope]]:
    """Serve `hub` for the body: (the port, the cancel scope that stops the server)."""
    async with _running(hub, config, auth=auth) as server:
        yield server.port, server.scope


@attrs.frozen
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json"
        return orjson.loads(self.body)


async def request(
    port: int, target: str, *, method: str = "GET", headers: list[tuple[str, str]] | None = None
) -> Reply:
    """One request with an h11 client; the response, read until the server closes."""
    client = h11.Connection(h11.CLIENT)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        all_headers = [("Host", f"127.0.0.1:{port}"), *(headers or [])]
        await stream.send_all(
            client.send(h11.Request(method=method, target=target, headers=all_headers))
            + client.send(h11.EndOfMessage())
        )
        response: h11.Response | None = None
        body = b""
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        assert response is not None
        return Reply(
            response.status_code,
            {k.decode(): v.decode() for k, v in response.headers},
            body,
        )


async def raw(port: int, data: bytes) -> tuple[int, bytes]:
    """Send `data` as is; the response's status and everything the server sent until closing."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        received = b""
        while chunk := await stream.receive_some(65536):
            received += chunk
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", received)
    assert match is not None, received
    return int(match.group(1)), received


async def scrape(port: int, headers: list[tuple[str, str]] | None = None) -> dict[str, float]:
    """/metrics, parsed: ``name{label="value",...}`` (labels sorted) → value."""
    reply = await request(port, "/metrics", headers=headers)
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"].startswith("text/plain")
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def url(port: int, target: str = "/v1/streams/s") -> str:
    return f"ws://127.0.0.1:{port}{target}"


def publish_msg(req: int) -> bytes:
    return orjson.dumps(
        {"op": "publish", "req": req, "event": {"type": "t.x", "source": "user", "payload": {}}}
    )


@contextmanager
def server_log(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """The server's log lines; at the end, no secret may appear in any of them."""
    lines: list[str] = []
    with caplog.at_level(logging.DEBUG, logger="trio_events"):
        yield lines
        lines.extend(record.getMessage() for record in caplog.records)
    for line in lines:
        for secret in SECRETS:
            assert secret not in line


def web_file(name: str) -> bytes:
    return resources.files("trio_events").joinpath("web", name).read_bytes()


# --- /healthz ----------------------------------------------------------------------------------


async def test_healthz_reports_status_uptime_streams_and_connections() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub, auth=AUTH) as (port, _):
            reply = await request(port, "/healthz")
            assert reply.status == 200
            health = reply.json()
            assert health["status"] == "ok"
            assert (health["streams"], health["connections"]) == (0, 0)
            assert health["uptime_s"] >= 0
            assert health["version"] == version("trio-events")
            assert reply.headers["cache-control"] == "no-store"
            assert reply.headers["connection"] == "close"
            token = [("Authorization", f"Bearer {READER}")]
            async with open_websocket_url(url(port), extra_headers=token) as ws:
                assert (await recv(ws))["op"] == "hello"
                health = (await request(port, "/healthz")).json()
                assert (health["streams"], health["connections"]) == (1, 1)


# --- /metrics ----------------------------------------------------------------------------------


async def test_metrics_count_what_a_websocket_client_published_and_received(
    tmp_path: Path,
) -> None:
    n = 7
    with trio.fail_after(TIMEOUT):
        async with (
            te.open_event_hub(store=te.LogStore(tmp_path)) as hub,
            serving(hub) as (port, _),
        ):
            async with open_websocket_url(url(port)) as ws:
                assert (await recv(ws))["op"] == "hello"
                assert (await recv(ws))["op"] == "caught_up"
                for req in range(n):
                    await ws.send_message(publish_msg(req).decode())
                acks, events = 0, 0
                while acks < n or events < n:
                    msg = await recv(ws)
                    if msg["op"] == "ack":
                        acks += 1
                    elif msg["op"] == "events":
                        events += len(msg["events"])
                await ws.send_message('{"op": "nonsense"}')
                assert (await recv(ws))["code"] == "bad_request"
                m = await scrape(port)
                s = '{stream="s"}'
                assert m[f"trio_events_events_published_total{s}"] == n
                assert m[f"trio_events_stream_last_id{s}"] == n - 1
                assert m[f"trio_events_deliveries_total{s}"] == n
                assert m[f"trio_events_dropped_total{s}"] == 0
                assert m[f"trio_events_subscribers{s}"] == 1
                assert m[f"trio_events_subscriber_lag_max{s}"] == 0
                assert m[f"trio_events_subscriber_queue_depth_max{s}"] == 0
                assert f"trio_events_catch_up_episodes_total{s}" in m
                assert m["trio_events_streams_open{}"] == 1
                assert m["trio_events_connections_open{}"] == 1
                assert m['trio_events_refused_messages_total{code="bad_request"}'] == 1
                assert m['trio_events_http_requests_total{path="/v1/streams",status="101"}'] == 1
                # fsync durability: every stored batch was synced, and timed.
                syncs = m["trio_events_store_sync_seconds_count{}"]
                assert 1 <= syncs <= n
                assert m['trio_events_store_sync_seconds_bucket{le="+Inf"}'] == syncs
                assert m["trio_events_store_sync_seconds_sum{}"] > 0
            # The connection's end is counted when the server's handler has finished closing.
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            m = await scrape(port)
            assert m['trio_events_connections_closed_total{code="1000"}'] == 1
            assert m["trio_events_connections_open{}"] == 0
            # A scrape counts once answered: this one sees the first.
            assert m['trio_events_http_requests_total{path="/metrics",status="200"}'] == 1


async def test_two_servers_in_one_process_have_their_own_metrics() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as a, te.open_event_hub() as b:
            async with serving(a) as (port_a, _), serving(b) as (port_b, _):
                async with a.stream("only-a") as stream:
                    await stream.publish({}, source="agent", type="t.x")
                    ma, mb = await scrape(port_a), await scrape(port_b)
        assert ma['trio_events_events_published_total{stream="only-a"}'] == 1
        assert not any("only-a" in key for key in mb)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([], 401),
        ([("Authorization", "Bearer not-a-known-token-0123456789")], 401),
        ([("Authorization", "Basic dXNlcjpwYXNz")], 401),
        ([("Authorization", f"Bearer {READER}")], 403),  # read, but only stream "s"
        ([("Authorization", f"Bearer {PUBLISH_ALL}")], 403),  # every stream, but not read
        ([("Authorization", f"Bearer {mint(['*'], ['read'], expires_in=-60)}")], 401),
        ([("Authorization", f"Bearer {READ_ALL}")], 200),
    ],
)
async def test_metrics_with_auth_need_a_token_that_reads_every_stream(
    headers: list[tuple[str, str]], status: int, caplog: pytest.LogCaptureFixture
) -> None:
    with server_log(caplog), trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub, auth=AUTH) as (port, _):
            reply = await request(port, "/metrics", headers=headers)
            assert reply.status == status
            if status == 200:
                assert b"trio_events_connections_open" in reply.body
            else:
                assert reply.json()["code"] == ("unauthorized" if status == 401 else "forbidden")
                assert b"trio_events" not in reply.body
            if status == 401:
                assert reply.headers["www-authenticate"].startswith("Bearer")
            # Public whatever the token: health and the viewer's files.
            assert (await request(port, "/healthz")).status == 200
            assert (await request(port, "/")).status == 200


# --- static files ------------------------------------------------------------------------------


async def test_static_files_are_served_with_their_type_and_no_cache() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub) as (port, _):
            page = await request(port, "/")
            assert page.status == 200
            assert page.body == web_file("index.html")
            assert page.headers["content-type"] == "text/html; charset=utf-8"
            assert page.headers["cache-control"] == "no-cache"
            assert (await request(port, "/index.html")).body == page.body
            client = await request(port, "/trio-events.js")
            assert client.status == 200
            assert client.body == web_file("trio-events.js")
            assert client.headers["content-type"] == "text/javascript; charset=utf-8"
            again = await request(
                port, "/trio-events.js", headers=[("If-None-Match", client.headers["etag"])]
            )
            assert (again.status, again.body) == (304, b"")


@pytest.mark.parametrize(
    "target",
    [
        b"/../pyproject.toml",
        b"/../../pyproject.toml",
        b"/%2e%2e/pyproject.toml",
        b"/%2E%2E%2Fpyproject.toml",
        b"/..%2f..%2fpyproject.toml",
        b"/web/index.html",
        b"/./index.html",
        b"//index.html",
        b"/__init__.py",
        b"/index.html%00",
        b"/%2e%2e%5cpyproject.toml",
    ],
)
async def test_path_traversal_finds_nothing(target: bytes) -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub) as (port, _):
            status, received = await raw(
                port, b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            )
            assert status in (400, 404)
            assert b"[project]" not in received


# --- HTTP errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404),
        (b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"DELETE / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello", 413),
        (b"GET /v1/streams/s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 426),
        (b"GET http://127.0.0.1/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 200),
        (b"GET /healthz?verbose=1 HTTP/1.0\r\n\r\n", 200),
    ],
)
async def test_plain_http_gets_small_correct_responses(data: bytes, status: int) -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub) as (port, _):
            got, received = await raw(port, data)
            assert got == status, received
            head, _, body = received.partition(b"\r\n\r\n")
            assert f"content-length: {len(body)}".encode() in head.lower()
            assert b"connection: close" in head.lower()
            if status == 405:
                assert b"allow: get, head" in head.lower()
            if status >= 400:
                assert orjson.loads(body)["op"] == "error"


async def test_head_has_no_body_but_the_length_of_get() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub) as (port, _):
            for target in ("/", "/trio-events.js", "/nope"):
                get = await request(port, target)
                head = await request(port, target, method="HEAD")
                assert head.status == get.status
                assert head.body == b""
                assert head.headers["content-length"] == str(len(get.body))
            _, received = await raw(port, b"HEAD /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert received.endswith(b"\r\n\r\n")


async def test_websocket_still_works_on_the_same_port_beside_http_clients() -> None:
    config = ServerConfig(close_timeout=5, handshake_timeout=30)
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub, config) as (port, _):
            # A client that never finishes its head, held open all along.
            slow = await trio.open_tcp_stream("127.0.0.1", port)
            async with slow, open_websocket_url(url(port)) as ws:
                await slow.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                assert (await recv(ws))["op"] == "hello"
                assert (await request(port, "/healthz")).json()["connections"] == 1
                await ws.send_message(publish_msg(1).decode())
                ops = {(await recv(ws))["op"] for _ in range(3)}
                assert ops == {"caught_up", "ack", "events"}
                assert (await request(port, "/metrics")).status == 200


async def test_a_slowloris_is_dropped_after_the_handshake_timeout() -> None:
    config = ServerConfig(close_timeout=5, handshake_timeout=0.5)
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub, config) as (port, _):
            slow = await trio.open_tcp_stream("127.0.0.1", port)
            async with slow:
                started = trio.current_time()
                await slow.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                # Other clients are served meanwhile.
                assert (await request(port, "/healthz")).status == 200
                assert await slow.receive_some(1024) == b""  # dropped, no response
                assert trio.current_time() - started >= 0.5 - 0.05


@pytest.mark.parametrize("with_websocket", [False, True])
async def test_shutdown_with_an_http_request_in_flight_ends_promptly(
    with_websocket: bool,
) -> None:
    # Timeouts far longer than the bound: a shutdown that waited either out would fail.
    config = ServerConfig(close_timeout=60, handshake_timeout=60)
    async with te.open_event_hub() as hub:
        with trio.fail_after(5):
            async with serving(hub, config) as (port, scope):
                slow = await trio.open_tcp_stream("127.0.0.1", port)
                async with slow:
                    await slow.send_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                    if with_websocket:
                        async with open_websocket_url(url(port)) as ws:
                            assert (await recv(ws))["op"] == "hello"
                            scope.cancel()
                            with pytest.raises(ConnectionClosed):
                                while True:  # caught_up, then the close (1001)
                                    await recv(ws)
                    else:
                        scope.cancel()
                    assert await slow.receive_some(1024) == b""


# --- the pure router ---------------------------------------------------------------------------


@attrs.define
class FakeState:
    closing: bool = False
    asked: list[str] = attrs.field(factory=list)

    def health(self) -> Health:
        self.asked.append("health")
        return Health(closing=self.closing, uptime_s=1.5, streams=2, connections=3, version="x")

    def metrics(self) -> bytes:
        self.asked.append("metrics")
        return b"# metrics\n"


STATIC = {
    "index.html": StaticFile.of("index.html", b"<!doctype html>"),
    "app.js": StaticFile.of("app.js", b"1;"),
}
ROUTER = HttpRouter(static=STATIC)


def test_router_answers_health_and_asks_only_for_what_it_serves() -> None:
    state = FakeState()
    response = ROUTER.route(b"GET", b"/healthz", [], state, now=0.0)
    assert response.status == 200
    assert orjson.loads(response.body) == {
        "status": "ok",
        "uptime_s": 1.5,
        "streams": 2,
        "connections": 3,
        "version": "x",
    }
    assert state.asked == ["health"]
    closing = ROUTER.route(b"GET", b"/healthz", [], FakeState(closing=True), now=0.0)
    assert (closing.status, orjson.loads(closing.body)["status"]) == (503, "shutting_down")
    state = FakeState()
    assert ROUTER.route(b"GET", b"/app.js", [], state, now=0.0).body == b"1;"
    assert ROUTER.route(b"POST", b"/metrics", [], state, now=0.0).status == 405
    assert state.asked == []  # neither health nor metrics was computed


def test_router_without_index_html_has_no_root() -> None:
    router = HttpRouter(static={"app.js": STATIC["app.js"]})
    assert router.route(b"GET", b"/", [], FakeState(), now=0.0).status == 404


def test_static_file_refuses_a_type_it_cannot_name() -> None:
    with pytest.raises(ValueError, match="cannot serve"):
        StaticFile.of("notes.txt", b"")


_headers = st.lists(
    st.tuples(
        st.sampled_from([b"authorization", b"content-length", b"if-none-match", b"x"]),
        st.one_of(
            st.binary(max_size=40),
            st.text("abcAZ09-._~+/= ", max_size=40).map(lambda t: b"Bearer " + t.encode()),
            st.just(f"Bearer {READ_ALL}".encode()),
        ),
    ),
    max_size=4,
)


@given(
    method=st.one_of(st.sampled_from([b"GET", b"HEAD", b"POST", b"OPTIONS"]), st.binary()),
    target=st.one_of(
        st.sampled_from([b"/", b"/healthz", b"/metrics", b"/app.js", b"/v1/streams/s"]),
        st.binary(),
        st.text().map(lambda t: ("/" + t).encode()),
    ),
    headers=_headers,
    auth=st.booleans(),
)
def test_router_never_raises_and_frames_every_response(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    auth: bool,
) -> None:
    router = attrs.evolve(ROUTER, auth=AUTH if auth else None)
    response = router.route(method, target, headers, FakeState(), now=time.time())
    assert 200 <= response.status < 500
    assert response.route in ("/healthz", "/metrics", "/", "static", "/v1/streams", "other")
    fields = dict(response.headers)
    if response.status != 304:
        length = int(fields["Content-Length"])
        assert len(response.body) == (0 if method == b"HEAD" else length)
    if response.status == 405:
        assert fields["Allow"] == "GET, HEAD"


# --- the sync latency histogram ------------------------------------------------------------


def test_sync_latency_buckets_are_cumulative_and_inclusive() -> None:
    latency = SyncLatency()
    for seconds in (0.0001, 0.0002, 0.003, 10.0):
        latency.observe(seconds)
    snapshot = latency.snapshot()
    buckets = dict(snapshot.buckets)
    assert buckets[0.0001] == 1  # an observation equal to a bound falls in it
    assert buckets[0.00025] == 2
    assert buckets[0.005] == 3
    assert buckets[2.5] == 3
    assert buckets[math.inf] == snapshot.count == 4
    assert snapshot.sum_s == pytest.approx(10.0033)
    counts = [count for _, count in snapshot.buckets]
    assert counts == sorted(counts)
