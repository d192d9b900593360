"""The server's Prometheus metrics: counters it keeps, and a collector read on each scrape.

`ServerCounters` holds what only the server sees (connections by close code, refused messages,
HTTP requests, internal errors); everything else is read from the hub, its streams and the store
when ``/metrics`` is scraped, by `StreamsCollector`, registered in a `CollectorRegistry` owned by
one server (never the process-wide default registry: two servers in one process do not clash).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping

import attrs
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ..hub import HubStats
from ..store.log import SyncLatencySnapshot
from ..stream import StreamStats

__all__ = ["MetricsSource", "ServerCounters", "StreamsCollector", "metrics_registry"]


@attrs.define(kw_only=True)
class ServerCounters:
    """Counts kept by the server as things happen (all start at zero, only ever grow).

    Attributes:
        connections_closed: WebSocket connections ended, by close code (admission refusals
            included); codes outside RFC 6455's 1000-1015 and the server's own as ``"other"``.
        refused_messages: Client messages refused with an ``error``, by error code.
        http_requests: Requests answered, by route (`HttpResponse.route`) and status; a
            WebSocket handshake counts under ``/v1/streams`` with 101 or its refusal status.
        internal_errors: Unexpected errors that closed a connection with 1011.
    """

    connections_closed: Counter[str] = attrs.field(factory=Counter)
    refused_messages: Counter[str] = attrs.field(factory=Counter)
    http_requests: Counter[tuple[str, int]] = attrs.field(factory=Counter)
    internal_errors: int = 0


@attrs.frozen(kw_only=True)
class MetricsSource:
    """Where `StreamsCollector` reads each scrape's values (callables: read when scraped).

    Attributes:
        hub: The hub's `EventHub.statistics`.
        streams: Per open stream id, its `EventStream.statistics`.
        connections_open: Open WebSocket connections now.
        counters: The server's `ServerCounters`.
        sync_latency: The store's sync latency histogram, or None for a store without one.
        uptime: Seconds since the server started.
    """

    hub: Callable[[], HubStats]
    streams: Callable[[], Mapping[str, StreamStats]]
    connections_open: Callable[[], int]
    counters: ServerCounters
    sync_latency: Callable[[], SyncLatencySnapshot | None]
    uptime: Callable[[], float]


class StreamsCollector:
    """A `prometheus_client` collector that builds every metric family from `source` when scraped.

    Per-stream families have one label, ``stream``; there are at most ``hub.max_streams`` of
    them. Subscriber totals (deliveries, drops, catch-ups, missed) count every subscriber the
    open stream has had (`StreamStats.delivered_total` ...), so they only grow while it is open;
    a stream that is closed and opened again starts from zero (a counter reset to Prometheus).
    """

    def __init__(self, source: MetricsSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families (called by `generate_latest` on each scrape)."""
        source = self._source
        yield from self._hub_families(source.hub())
        yield from self._stream_families(source.streams())
        yield from self._server_families()
        snapshot = source.sync_latency()
        if snapshot is not None:
            histogram = HistogramMetricFamily(
                "trio_events_store_sync_seconds",
                "How long the store's data syncs (fdatasync) took, in seconds.",
                buckets=[(_bound(le), count) for le, count in snapshot.buckets],
                sum_value=snapshot.sum_s,
            )
            yield histogram

    def _hub_families(self, hub: HubStats) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "trio_events_streams_open", "Streams open in the hub now.", value=hub.open_streams
        )
        yield GaugeMetricFamily(
            "trio_events_streams_max", "The hub's limit of open streams.", value=hub.max_streams
        )
        yield CounterMetricFamily(
            "trio_events_streams_opened",
            "Streams opened by the hub (each reopening counts).",
            value=hub.opened,
        )
        yield CounterMetricFamily(
            "trio_events_streams_closed", "Streams closed by the hub.", value=hub.closed
        )
        yield CounterMetricFamily(
            "trio_events_stream_open_failures",
            "Stream opens that raised an error.",
            value=hub.failed_opens,
        )

    def _stream_families(self, streams: Mapping[str, StreamStats]) -> Iterator[Metric]:
        label = ["stream"]
        published = CounterMetricFamily(
            "trio_events_events_published",
            "Events stored on the stream since it was last opened.",
            labels=label,
        )
        last_id = GaugeMetricFamily(
            "trio_events_stream_last_id",
            "The id of the stream's last event (-1: none).",
            labels=label,
        )
        first_id = GaugeMetricFamily(
            "trio_events_stream_first_id",
            "The earliest id the store still retains for the stream.",
            labels=label,
        )
        pending = GaugeMetricFamily(
            "trio_events_stream_pending_publishes",
            "Publish requests waiting for the stream's writer.",
            labels=label,
        )
        subscribers = GaugeMetricFamily(
            "trio_events_subscribers", "Subscribers of the stream now.", labels=label
        )
        delivered = CounterMetricFamily(
            "trio_events_deliveries",
            "Events delivered to the stream's subscribers (those that left included).",
            labels=label,
        )
        dropped = CounterMetricFamily(
            "trio_events_dropped",
            "Events dropped by a DROP_* overflow policy (subscribers that left included).",
            labels=label,
        )
        catch_ups = CounterMetricFamily(
            "trio_events_catch_up_episodes",
            "Times a subscriber left live fan-out to catch up from the store.",
            labels=label,
        )
        missed = CounterMetricFamily(
            "trio_events_missed",
            "Events subscribers skipped because retention had removed them.",
            labels=label,
        )
        lag = GaugeMetricFamily(
            "trio_events_subscriber_lag_max",
            "The largest number of events published but not yet delivered to one subscriber.",
            labels=label,
        )
        depth = GaugeMetricFamily(
            "trio_events_subscriber_queue_depth_max",
            "The longest queue of one subscriber, in events.",
            labels=label,
        )
        for stream_id, stats in sorted(streams.items()):
            labels = [stream_id]
            subs = list(stats.subscribers.values())
            published.add_metric(labels, stats.published)
            last_id.add_metric(labels, stats.last_id)
            first_id.add_metric(labels, stats.first_id)
            pending.add_metric(labels, stats.pending_publishes)
            subscribers.add_metric(labels, len(subs))
            delivered.add_metric(labels, stats.delivered_total)
            dropped.add_metric(labels, stats.dropped_total)
            catch_ups.add_metric(labels, stats.catch_ups_total)
            missed.add_metric(labels, stats.missed_total)
            lag.add_metric(labels, max((s.lag for s in subs), default=0))
            depth.add_metric(labels, max((s.queue_depth for s in subs), default=0))
        yield from (published, last_id, first_id, pending, subscribers, delivered, dropped)
        yield from (catch_ups, missed, lag, depth)

    def _server_families(self) -> Iterator[Metric]:
        source = self._source
        counters = source.counters
        yield GaugeMetricFamily(
            "trio_events_uptime_seconds", "Seconds since the server started.", value=source.uptime()
        )
        yield GaugeMetricFamily(
            "trio_events_connections_open",
            "Open WebSocket connections.",
            value=source.connections_open(),
        )
        closed = CounterMetricFamily(
            "trio_events_connections_closed",
            "WebSocket connections ended, by close code.",
            labels=["code"],
        )
        for code, count in sorted(counters.connections_closed.items()):
            closed.add_metric([str(code)], count)
        yield closed
        refused = CounterMetricFamily(
            "trio_events_refused_messages",
            "Client messages refused with an error message, by error code.",
            labels=["code"],
        )
        for error_code, count in sorted(counters.refused_messages.items()):
            refused.add_metric([error_code], count)
        yield refused
        yield CounterMetricFamily(
            "trio_events_internal_errors",
            "Unexpected errors that closed a connection with 1011.",
            value=counters.internal_errors,
        )
        http = CounterMetricFamily(
            "trio_events_http_requests",
            "HTTP requests answered, by route and status.",
            labels=["path", "status"],
        )
        for (route, status), count in sorted(counters.http_requests.items()):
            http.add_metric([route, str(status)], count)
        yield http


def _bound(le: float) -> str:
    """A bucket's ``le`` label as Prometheus writes it (``+Inf`` for the last)."""
    return "+Inf" if math.isinf(le) else repr(le)


def metrics_registry(source: MetricsSource) -> CollectorRegistry:
    """A registry of its own holding a `StreamsCollector` of `source`.

    Render it with ``prometheus_client.generate_latest(registry)``.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StreamsCollector(source))
    return registry
