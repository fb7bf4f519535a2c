"""One replica's Prometheus metrics (prometheus_client), served at GET /metrics. No Ray, no HTTP.

Each replica owns a registry (no module globals): a scrape of /metrics through Serve's proxy is answered
by one replica, and every sample carries its `replica` label. With several replicas, scrape each one
(or sum what you scrape over time per `replica`); Ray's own metrics endpoint also has Serve's built-in
per-deployment request counters, aggregated by Ray (docs/serve.md).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Steps of a small CPU model take ~0.5-10 ms; first characters wait behind a prompt and a queue.
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
TTFC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    """The metrics of one replica; also the engine's StepObserver."""

    def __init__(self, replica: str) -> None:
        self.replica = replica
        self.registry = CollectorRegistry()
        r, label = self.registry, ["replica"]
        self.requests = Counter(
            "raylstm_requests",
            "HTTP requests answered, by route and status",
            ["replica", "route", "status"],
            registry=r,
        )
        self.rows_active = Gauge("raylstm_rows_active", "rows (samples) generating now", label, registry=r)
        self.queue_depth = Gauge(
            "raylstm_queue_depth", "requests waiting for a batch slot", label, registry=r
        )
        self.chars = Counter("raylstm_chars_generated", "characters generated", label, registry=r)
        self.step_seconds = Histogram(
            "raylstm_step_seconds", "one engine step: every active row advances one character", label,
            buckets=STEP_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttfc = Histogram(
            "raylstm_time_to_first_char_seconds", "from submit to a request's first character", label,
            buckets=TTFC_BUCKETS, registry=r,
        )  # fmt: skip
        self.checkpoint_step = Gauge(
            "raylstm_checkpoint_step", "training step of the served checkpoint", label, registry=r
        )
        self.checkpoint_bpc = Gauge(
            "raylstm_checkpoint_val_bpc", "validation bits/char of the served checkpoint", label, registry=r
        )
        self.reloads = Counter("raylstm_reloads", "checkpoint switches of this replica", label, registry=r)
        for g in (self.rows_active, self.queue_depth):
            g.labels(replica).set(0)
        self.chars.labels(replica)

    # StepObserver
    def on_step(self, seconds: float, rows: int, active_rows: int, waiting: int) -> None:
        self.step_seconds.labels(self.replica).observe(seconds)
        self.chars.labels(self.replica).inc(rows)
        self.rows_active.labels(self.replica).set(active_rows)
        self.queue_depth.labels(self.replica).set(waiting)

    def on_first_char(self, seconds: float) -> None:
        self.ttfc.labels(self.replica).observe(seconds)

    def request(self, route: str, status: int) -> None:
        self.requests.labels(self.replica, route, str(status)).inc()

    def serving(self, step: int | None, val_bpc: float | None) -> None:
        self.checkpoint_step.labels(self.replica).set(step if step is not None else float("nan"))
        self.checkpoint_bpc.labels(self.replica).set(val_bpc if val_bpc is not None else float("nan"))

    def render(self) -> bytes:
        return generate_latest(self.registry)
