"""Edge: Prometheus metrics with prometheus_client (imported only when metrics.enabled).

Owns: the metric names and labels, and the text a scrape of GET /metrics returns. Under
`knocker serve` every worker writes its counts to mmap'ed files in PROMETHEUS_MULTIPROC_DIR
(set by cli.py before this module is first imported: prometheus_client picks its value
class at import), and a scrape sums the files of all workers, dead ones included, so a
restarted worker neither loses nor doubles counts. Without that variable (one process,
tests) the counts live in this process.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"
# Knock results (label `result`); `key` is the configured key name, "-" when unknown.
KNOCK_RESULTS = ("granted", "extended", "refused", "rate_limited", "error")


class _ActiveGrants(Collector):
    """Live whitelist entries, read from the scraping worker's replica at scrape time
    (every worker holds the whole whitelist, so one worker's answer is the service's)."""

    def __init__(self, count: Callable[[], int]) -> None:
        self._count = count

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "knocker_active_grants", "Live whitelist entries", value=self._count()
        )


class Metrics:
    def __init__(self, key_names: tuple[str, ...], active_grants: Callable[[], int]) -> None:
        # A private registry: SIGHUP builds a second Metrics in the same process.
        self._registry = CollectorRegistry(auto_describe=True)
        self._active = _ActiveGrants(active_grants)
        self._knocks = Counter(
            "knocker_knocks",
            "Knocks answered, by result and key name",
            ("result", "key"),
            registry=self._registry,
        )
        for name in (*key_names, "-"):  # every series exists from the start, at 0
            for result in KNOCK_RESULTS:
                self._knocks.labels(result, name)
        verify = Counter(
            "knocker_verify",
            "/verify answers, allow (200) or deny (401)",
            ("decision",),
            registry=self._registry,
        )
        # Bound once: the /verify hot path pays one mmap write, no label lookup.
        self.verify_allowed = verify.labels("allow").inc
        self.verify_denied = verify.labels("deny").inc
        self._evictions = Counter(
            "knocker_evictions", "Entries evicted by a full whitelist", registry=self._registry
        )
        self._ended = Counter(
            "knocker_grants_ended",
            "Grants ended before their expiry, by how (revoke, sign_out)",
            ("how",),
            registry=self._registry,
        )
        # Created on first use, so a scrape shows only what is really measured.
        self._lazy: dict[str, Counter | Histogram] = {}
        self._lazy_lock = threading.Lock()

    def knock(self, result: str, key: str) -> None:
        self._knocks.labels(result, key).inc()

    def evicted(self, count: int) -> None:
        self._evictions.inc(count)

    def grants_ended(self, how: str) -> None:
        """`how`: revoke (an admin) or sign_out (the granting key itself)."""
        self._ended.labels(how).inc()

    def expired(self, count: int) -> None:
        self._counter("knocker_expirations", "Entries purged after their TTL").inc(count)

    def firewall_reapplied(self) -> None:
        self._counter("knocker_firewall_reapplies", "Firewall zone re-applied").inc()

    def dbus_call(self, seconds: float) -> None:
        self._histogram("knocker_dbus_call_seconds", "firewalld D-Bus call latency").observe(
            seconds
        )

    def storage_synced(self, seconds: float) -> None:
        self._histogram("knocker_storage_sync_seconds", "Whitelist journal fsync latency").observe(
            seconds
        )

    def _counter(self, name: str, documentation: str) -> Counter:
        with self._lazy_lock:
            metric = self._lazy.get(name)
            if metric is None:
                metric = self._lazy[name] = Counter(name, documentation, registry=self._registry)
        assert isinstance(metric, Counter)
        return metric

    def _histogram(self, name: str, documentation: str) -> Histogram:
        with self._lazy_lock:
            metric = self._lazy.get(name)
            if metric is None:
                metric = self._lazy[name] = Histogram(name, documentation, registry=self._registry)
        assert isinstance(metric, Histogram)
        return metric

    def exposition(self) -> bytes:
        """The text format of every metric, all workers summed when multiprocess."""
        directory = os.environ.get(ENV_DIR)
        if not directory:
            registry = self._registry
        else:
            # A fresh registry per scrape, as prometheus_client's multiprocess docs do.
            registry = CollectorRegistry()
            MultiProcessCollector(registry, directory)  # type: ignore[no-untyped-call]
        text = generate_latest(registry)
        return text + generate_latest(_Single(self._active))


class _Single(CollectorRegistry):
    def __init__(self, collector: Collector) -> None:
        super().__init__(auto_describe=False)
        self.register(collector)
