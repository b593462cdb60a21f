"""Prometheus metrics of one rrb process: its registry, and the two counters every part shares.

Every :class:`Metrics` has its own registry, never prometheus-client's global one, so
components running side by side in one interpreter (tests do) never share a counter.
Components take ``metrics=None`` and then record nothing, so a process started without
``--metrics-port`` pays nothing for them.

This module knows no component. Each one defines its own metrics on the registry, in its own
package (``backup/metrics.py``, ``restore/stats.py``, ``ops/timed.py``, ``ops/observe.py``):

- :meth:`Metrics.counter`, :meth:`Metrics.gauge` and :meth:`Metrics.histogram` return the
  metric already registered under a name, so two instances of a component in one process
  (an ``rrb`` process runs a bridge and an uploader; tests run several) share it;
- :meth:`Metrics.part` makes a component's set of metrics once per process;
- :meth:`Metrics.add_collector` exports counters a component already keeps for its logs,
  read at scrape time rather than counted twice.

Names and meanings of every metric: docs/operations.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.registry import Collector

T = TypeVar("T")


class Metrics:
    """Every metric of one process, in :attr:`registry`. Safe for one event loop's tasks."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self._made: dict[str, Any] = {}
        self._parts: dict[object, object] = {}
        self.retries = self.counter(
            "rrb_retries", "Failed attempts that are retried after a backoff.", ["component"]
        )
        self.errors = self.counter(
            "rrb_errors",
            "Errors, by component and kind (an exception class name, or a per-key failure).",
            ["component", "kind"],
        )

    # -- defining -------------------------------------------------------------------------

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        """The counter ``name`` (without ``_total``), registered on first use."""
        return self._once(name, lambda: Counter(name, doc, labels, registry=self.registry))

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        """The gauge ``name``, registered on first use."""
        return self._once(name, lambda: Gauge(name, doc, labels, registry=self.registry))

    def histogram(
        self, name: str, doc: str, labels: Sequence[str] = (), *, buckets: Sequence[float]
    ) -> Histogram:
        """The histogram ``name``, registered on first use with ``buckets``."""
        return self._once(
            name, lambda: Histogram(name, doc, labels, buckets=buckets, registry=self.registry)
        )

    def part(self, make: Callable[[Metrics], T]) -> T:
        """``make(self)``, called once per process: a component's metrics, shared by every
        instance of the component."""
        if make not in self._parts:
            self._parts[make] = make(self)
        return cast(T, self._parts[make])

    def add_collector(self, collector: Collector) -> None:
        """Export what ``collector`` yields at each scrape."""
        self.registry.register(collector)

    def _once(self, name: str, make: Callable[[], T]) -> T:
        if name not in self._made:
            self._made[name] = make()
        return cast(T, self._made[name])

    # -- recording ------------------------------------------------------------------------

    def retried(self, component: str, exc: BaseException) -> None:
        """Count a failed attempt that will be retried, and its error."""
        self.retries.labels(component).inc()
        self.error(component, type(exc).__name__)

    def error(self, component: str, kind: str) -> None:
        """Count an error of ``kind``: an exception class name or a fixed failure name."""
        self.errors.labels(component, kind).inc()

    # -- reading --------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
