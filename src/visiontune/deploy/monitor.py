"""What `visiontune serve` tells its operator: `/metrics` in Prometheus' text format, and a
drift warning in the log when images unlike the training ones arrive more often than on the
validation split.

- `ServeMetrics`: the app's own prometheus_client registry (never the process-global one, so
  two apps in one process count apart): requests by outcome (ok; refused: the client's
  upload, or busy; error: the server's fault), their latency (a histogram), the answers
  flagged unknown, the top probability of each answer (a summary: its _sum / _count is the
  mean confidence) and the share of unknown answers over the last `window` answers (a gauge).
- `DriftWatch`: that share against the validation split's (the run's
  model.uncertainty["ood"]["valid_unknown_share"], else `DEFAULT_UNKNOWN_SHARE`) plus the
  operator's margin; past it, one warning per window of answers, not one per answer.
- `MetricsMiddleware`: times and counts every POST to the prediction endpoint, refusals made
  before the application sees the request (an upload too large) included.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from visiontune.errors import VisiontuneError

log = logging.getLogger(__name__)

DEFAULT_UNKNOWN_SHARE = 0.05  # the validation share assumed when the run stored none
OUTCOMES = ("ok", "refused", "error")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def outcome(status: int) -> str:
    """ok (2xx/3xx), refused (4xx: the client's request; 503: busy, retry) or error (5xx)."""
    if status < 400:
        return "ok"
    return "refused" if status < 500 or status == 503 else "error"


class DriftWatch:
    """The share of unknown answers over the last `window` answers, and one warning each time a
    full window's share exceeds `baseline + margin` (then none until `window` more answers)."""

    def __init__(self, window: int, baseline: float, margin: float) -> None:
        if window < 1:
            raise VisiontuneError(f"--drift-window {window}: give the number of answers the share is taken over "
                                  "(at least 1, e.g. 200)")
        self.window, self.baseline, self.margin = window, baseline, margin
        self.recent: deque[bool] = deque(maxlen=window)
        self.since_warning: int | None = None  # answers since the last warning (None: never warned)
        self.warnings = 0

    @property
    def share(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else 0.0

    def observe(self, unknown: bool) -> float:
        """Count one answer; return the share over the window."""
        self.recent.append(bool(unknown))
        if self.since_warning is not None:
            self.since_warning += 1
        share = self.share
        fresh = self.since_warning is None or self.since_warning >= self.window
        if len(self.recent) == self.window and share > self.baseline + self.margin and fresh:
            self.since_warning, self.warnings = 0, self.warnings + 1
            log.warning("drift: %.0f%% of the last %d answers were unknown (unlike the training images); the "
                        "validation split had %.0f%% (margin %.0f points): the images sent may have changed",
                        100 * share, self.window, 100 * self.baseline, 100 * self.margin)
        return share


class ServeMetrics:
    """The counters, histogram, summary and gauge of one app, in its own registry."""

    def __init__(self, drift: DriftWatch) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary
        except ImportError:
            raise VisiontuneError("serve's /metrics needs prometheus_client: pip install 'visiontune[serve]'") \
                from None
        self.drift = drift
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("visiontune_requests", "prediction requests answered, by outcome (ok; refused: a "
                                "bad or too large upload, or busy; error: the server failed)", ["outcome"],
                                registry=registry)
        for name in OUTCOMES:
            self.requests.labels(name)  # every outcome shows from the start, at 0
        self.latency = Histogram("visiontune_request_seconds", "time from request to answer, in seconds",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.unknown = Counter("visiontune_unknown_answers", "answers flagged unknown: unlike every training image",
                               registry=registry)
        self.confidence = Summary("visiontune_top_probability", "the top probability of each answer (_sum / "
                                  "_count: the mean confidence)", registry=registry)
        self.unknown_share = Gauge("visiontune_unknown_share", f"share of unknown answers over the last "
                                   f"{drift.window} answers", registry=registry)

    def request(self, status: int, seconds: float) -> None:
        self.requests.labels(outcome(status)).inc()
        self.latency.observe(seconds)

    def answer(self, unknown: bool, confidence: float | None) -> None:
        """One answer given: whether it was unknown, and its top probability (None: a number)."""
        if unknown:
            self.unknown.inc()
        if confidence is not None:
            self.confidence.observe(confidence)
        self.unknown_share.set(self.drift.observe(unknown))

    def text(self) -> tuple[bytes, str]:
        """(the exposition, its content type)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """ASGI middleware: each POST to `path` counted by the status it was answered with (500
    when the application raised) and timed."""

    def __init__(self, app: Any, metrics: ServeMetrics, path: str) -> None:
        self.app, self.metrics, self.path = app, metrics, path

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") != self.path:
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def seen(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, seen)
        finally:
            self.metrics.request(status, time.perf_counter() - started)
