"""Prometheus metrics of the flows, served over HTTP on a port from ``[metrics]``.

The flows already compute their figures every log interval (the join's ``_report``, the learn
flow's ``_log``); the hooks hand those figures here and a collector exposes the latest ones
when Prometheus scrapes. The event counters are the flows' own cumulative counters, restored
from recovery state on resume, so they are exposed as they are instead of being incremented
here: a restart does not reset them, and the dashboard shows the numbers of stats-p<i>.json.

So a scraped figure is as fresh as its flow's last log line (``join.log_interval_s``,
``learn.log_interval_s``, 10 s by default); Redis errors and push durations count as they
happen. Each process serves its own endpoint: process i of a flow on ``<flow>_port + i``
(``[metrics]`` in the config). The same figures go, one JSON line per log interval, to
history files that `ctrstream report` plots.

``LagWatch`` turns the consumer lag into a signal: a log warning and ``ctrstream_input_behind``
when the input outruns a flow (``metrics.lag_warn_messages``, ``metrics.lag_window_s``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path

import orjson
from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from flows.config import Config

log = logging.getLogger(__name__)

MODELS = ("ftrl", "bopr", "emb")
# A history file past this size is renamed to <name>.1 (replacing the previous one), so a
# flow that runs for months keeps a bounded history; the report reads both.
HISTORY_MAX_BYTES = 64 * 2**20

REDIS_ERRORS = Counter("ctrstream_redis_errors", "Failed Redis calls (each retried attempt)",
                       ["flow"])
PUSH_SECONDS = Histogram(
    "ctrstream_learn_push_seconds",
    "Time to write the learn flow's changes into Redis (push: into the current version; "
    "version: a whole new version, published), retries included",
    ["kind"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
for _flow in ("join", "learn"):  # present from the start, at 0, so rate() has a baseline
    REDIS_ERRORS.labels(_flow)
for _kind in ("push", "version"):
    PUSH_SECONDS.labels(_kind)


class LagWatch:
    """Tells when the input outruns a flow, per (flow, topic, partition), from the consumer
    lag handed over at each report. A partition is behind once its lag has been at least
    ``warn_messages`` for a whole ``window_s`` and is no lower than at the window's start (a
    high lag that falls is a backlog being worked off, as after a restart); it has caught up
    once the lag is below half of that, so a lag around the threshold does not flap."""

    REPEAT_S = 300.0  # while behind, the warning again at most this often

    def __init__(self, window_s: float = 60.0, warn_messages: int = 100_000) -> None:
        self.window_s, self.warn_messages = window_s, warn_messages
        self.samples: dict[tuple[str, str, int], deque] = {}  # key -> (time, lag), oldest first
        self.behind: dict[tuple[str, str, int], bool] = {}
        self.growth: dict[tuple[str, str, int], float] = {}  # messages/s over the window
        self.warned: dict[tuple[str, str, int], float] = {}

    def update(self, key: tuple[str, str, int], now: float, lag: int) -> bool:
        """One report's lag (``now``: seconds, monotonic); returns whether ``key`` is behind."""
        s = self.samples.setdefault(key, deque())
        s.append((now, lag))
        # Keep the newest sample at or before the window's start: the window's first value.
        while len(s) > 1 and s[1][0] <= now - self.window_s:
            s.popleft()
        t0, lag0 = s[0]
        growth = self.growth[key] = (lag - lag0) / (now - t0) if now > t0 else float("nan")
        flow, topic, part = key
        if not self.behind.get(key):
            whole = t0 <= now - self.window_s
            high = min(n for _, n in s) >= self.warn_messages
            self.behind[key] = whole and high and lag >= lag0
            if self.behind[key]:
                self.warned[key] = now
                log.warning("%s flow: %s[%d] is behind: consumer lag %s messages, %+.0f "
                            "messages/s over the last %.0f s; %s", flow, topic, part,
                            f"{lag:,}", growth, now - t0, _hint(flow))
        elif lag < self.warn_messages / 2:
            self.behind[key] = False
            log.info("%s flow: %s[%d] caught up: consumer lag %s messages", flow, topic, part,
                     f"{lag:,}")
        elif now - self.warned[key] >= self.REPEAT_S:
            self.warned[key] = now
            log.warning("%s flow: %s[%d] still behind: consumer lag %s messages, %+.0f "
                        "messages/s over the last %.0f s; %s", flow, topic, part, f"{lag:,}",
                        growth, now - t0, _hint(flow))
        return self.behind[key]


def _hint(flow: str) -> str:
    if flow == "learn":  # one worker learns every example: more processes do not help
        return "input outruns the pipeline: the models learn in one process, lower the input rate"
    return "input outruns the pipeline: add processes (-p) or lower the input rate"


class _Latest(Collector):
    """The latest figures each flow reported, turned into metric families at scrape time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.join: dict[int, tuple[dict, dict]] = {}  # partition -> (topic of stream, stats)
        self.lag: dict[tuple[str, str, int], int] = {}  # (flow, topic, partition) -> messages
        self.features: dict[str, float] = {}
        self.learn: dict | None = None
        self.watch = LagWatch()

    def collect(self):
        with self.lock:
            join, lag = dict(self.join), dict(self.lag)
            behind, growth = dict(self.watch.behind), dict(self.watch.growth)
            features, learn = dict(self.features), self.learn
        yield from _join_families(join)
        fam = GaugeMetricFamily(
            "ctrstream_consumer_lag", "Messages in a partition not read yet (high watermark "
            "minus next offset, clamped at 0: a broker may under-report the high watermark)",
            labels=["flow", "topic", "partition"])
        for (flow, topic, part), n in sorted(lag.items()):
            fam.add_metric([flow, topic, str(part)], n)
        yield fam
        fam = GaugeMetricFamily(
            "ctrstream_input_behind", "1 while the input outruns the flow: consumer lag at "
            "least metrics.lag_warn_messages and not falling over metrics.lag_window_s (0 "
            "again once below half of that)", labels=["flow", "topic", "partition"])
        for (flow, topic, part), b in sorted(behind.items()):
            fam.add_metric([flow, topic, str(part)], int(b))
        yield fam
        fam = GaugeMetricFamily(
            "ctrstream_consumer_lag_growth_per_second", "Change of the consumer lag over the "
            "last metrics.lag_window_s, in messages/s (> 0: the input outruns the flow)",
            labels=["flow", "topic", "partition"])
        for (flow, topic, part), g in sorted(growth.items()):
            fam.add_metric([flow, topic, str(part)], g)
        yield fam
        if "entities" in features:
            yield GaugeMetricFamily("ctrstream_features_entities",
                                    "Entities the counters step holds", features["entities"])
        if "writes" in features:
            yield CounterMetricFamily("ctrstream_features_store_writes",
                                      "Entity rows written to the Redis feature store",
                                      features["writes"])
        if "dropped" in features:
            yield CounterMetricFamily("ctrstream_features_examples_dropped",
                                      "Examples the attach step dropped: their example or a "
                                      "part of their counts never came", features["dropped"])
        if learn is not None:
            yield from _learn_families(learn)


def _join_families(join: dict[int, tuple[dict, dict]]):
    events = CounterMetricFamily(
        "ctrstream_join_events", "Join input events by outcome (the conservation counters: "
        "impressions in = emitted + duplicate + dead + pending; clicks in = joined + "
        "duplicate + late + orphan + dead + held)", labels=["topic", "partition", "outcome"])
    gauges = {
        "pending": ("ctrstream_join_pending", "Impressions waiting in the HashQueue"),
        "held": ("ctrstream_join_held_clicks", "Clicks held for an impression not seen yet"),
        "lag": ("ctrstream_join_watermark_lag_seconds",
                "Event time between the newest event read and the join watermark"),
        "watermark": ("ctrstream_join_watermark_seconds", "The join watermark (event time)"),
        "quarantined": ("ctrstream_join_quarantined",
                        "1 while the health monitor quarantines the partition's examples"),
        "rate": ("ctrstream_join_rate", "Clicks joined in their window / clicks resolved "
                 "(joined + late + orphan), since the start"),
        "errors": ("ctrstream_join_conservation_errors",
                   "Conservation equations that do not hold (0 when healthy)"),
    }
    fams = {k: GaugeMetricFamily(n, h, labels=["partition"]) for k, (n, h) in gauges.items()}
    for part, (topics, s) in sorted(join.items()):
        p = str(part)
        for key, value in s.items():
            stream, _, outcome = key.partition("_")
            if stream in topics and outcome and isinstance(value, int):
                events.add_metric([topics[stream], p, outcome], value)
        resolved = s["clicks_joined"] + s["clicks_late"] + s["clicks_orphan"]
        # Before both streams have been read the watermark is -1 and its "lag" is the epoch
        # time of the newest event: no watermark yet, not a figure to plot.
        has_wm = s["watermark"] > 0
        for key, value in (("pending", s["pending"]), ("held", s["held"]),
                           ("lag", s["watermark_lag_ms"] / 1000 if has_wm else float("nan")),
                           ("watermark", s["watermark"] / 1000 if has_wm else float("nan")),
                           ("quarantined", int(s["quarantined"])),
                           ("rate", s["clicks_joined"] / resolved if resolved else float("nan")),
                           ("errors", len(s["reconcile_errors"]))):
            fams[key].add_metric([p], value)
    yield events
    yield from fams.values()


def _learn_families(learn: dict):
    counts = CounterMetricFamily(
        "ctrstream_learn_examples", "Records the learn flow read, by outcome (in = learned + "
        "skipped (quarantined) + duplicates + corrections + dead_letters)", labels=["outcome"])
    for outcome, n in sorted(learn["counts"].items()):
        counts.add_metric([outcome], n)
    yield counts
    for what, help_ in (("ne", "Normalized entropy of the progressive predictions"),
                        ("calibration", "Mean prediction / observed CTR"),
                        ("auc", "Area under the ROC curve")):
        fam = GaugeMetricFamily(f"ctrstream_learn_{what}", help_ + " (window: all = since "
                                "the start, recent = the last learn.metrics_window examples)",
                                labels=["model", "window"])
        for model, s in learn["metrics"].items():
            fam.add_metric([model, "all"], s[what])
            fam.add_metric([model, "recent"], s[f"window_{what}"])
        yield fam
    by = GaugeMetricFamily(
        "ctrstream_learn_calibration_by_slice", "Mean prediction / observed CTR since the "
        "start, in each slice (position, hour); NaN while a slice has no click",
        labels=["model", "slice", "value"])
    for model, s in learn["metrics"].items():
        for name, values in (s.get("calibration_by") or {}).items():
            for k, v in enumerate(values):
                by.add_metric([model, name, str(k)], v)
    yield by
    try:
        yield GaugeMetricFamily("ctrstream_model_version", "The model version the learn flow "
                                "writes into (the Redis pointer's)", int(learn["version"]))
    except (TypeError, ValueError):
        pass


LATEST = _Latest()
REGISTRY.register(LATEST)
_servers: dict[tuple[str, int], object] = {}


def serve(cfg: Config, flow: str, process_id: int = 0) -> int | None:
    """Serve every metric of this process on ``<flow>_port + process_id`` (once per port);
    returns the port, or None when off or the port is taken (the flow runs on without)."""
    m = cfg.metrics
    base = {"join": m.join_port, "learn": m.learn_port}.get(flow, 0)
    if not m.enabled or not base:
        return None
    port = base + process_id
    if (m.host, port) in _servers:
        return port
    try:
        server, _ = start_http_server(port, addr=m.host)
    except OSError as e:
        # A metrics endpoint is not worth stopping a flow for; say so loudly instead.
        log.warning("metrics: cannot serve on %s:%d (%s): %s flow runs without its endpoint",
                    m.host, port, e, flow)
        return None
    _servers[(m.host, port)] = server
    log.info("metrics: %s flow serving on http://%s:%d/metrics", flow, m.host, port)
    return port


def redis_error(flow: str) -> None:
    REDIS_ERRORS.labels(flow).inc()


def join_report(cfg: Config, part: int, topics: dict[str, str], stats: dict,
                lag: dict[str, int], now: float) -> bool | None:
    """A join partition's figures, from its ``_report``. ``topics``: stream -> topic name;
    ``lag``: topic -> messages behind. Whether the partition is behind (see ``lag_report``)."""
    with LATEST.lock:
        LATEST.join[part] = (topics, stats)
    return lag_report(cfg, "join", {(topic, part): n for topic, n in lag.items()}, now)


def lag_report(cfg: Config, flow: str, lag: dict[tuple[str, int], int],
               now: float) -> bool | None:
    """A flow's consumer lag, (topic, partition) -> messages, at ``now`` (monotonic seconds),
    watched by ``LagWatch``: True if any of them is behind, None if there is no lag to
    watch. It logs with metrics off as well (the figures are kept, just not served)."""
    with LATEST.lock:
        w = LATEST.watch
        w.window_s, w.warn_messages = cfg.metrics.lag_window_s, cfg.metrics.lag_warn_messages
        behind = False if lag else None
        for (topic, part), n in lag.items():
            LATEST.lag[(flow, topic, part)] = n
            behind = w.update((flow, topic, part), now, n) or behind
    return behind


def features_report(**figures: int | None) -> None:
    """The join flow's feature figures: ``entities``, ``writes``, ``dropped``."""
    with LATEST.lock:
        LATEST.features.update({k: v for k, v in figures.items() if v is not None})


def learn_report(cfg: Config, counts: dict, summary: dict, version: str | None,
                 offsets: dict[int, int], now: float) -> bool | None:
    """The learn flow's figures, from its ``_log``, and its consumer lag (asked of the broker:
    a call per log interval): whether it is behind (see ``lag_report``), None without a lag."""
    lag = _learn_lag(cfg, offsets)
    with LATEST.lock:
        LATEST.learn = {"counts": dict(counts), "metrics": summary, "version": version}
    topic = cfg.kafka.examples_topic
    return lag_report(cfg, "learn", {(topic, part): n for part, n in lag.items()}, now)


def _learn_lag(cfg: Config, offsets: dict[int, int]) -> dict[int, int]:
    """The learn flow's source gets no high watermarks from its reads: ask the broker, once
    per log interval, giving up on the first partition that does not answer quickly. A
    client of its own each time (~ms): one kept open would retry a gone broker for ever."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    consumer = Consumer(cfg.kafka_client(**{"group.id": "ctrstream-metrics-lag"}))
    out = {}
    try:
        for part, offset in sorted(offsets.items()):
            try:
                _, high = consumer.get_watermark_offsets(
                    TopicPartition(cfg.kafka.examples_topic, part), timeout=1.0)
            except KafkaException as e:
                log.debug("metrics: no high watermark for partition %d: %s", part, e)
                break
            out[part] = max(high - offset, 0)
    finally:
        consumer.close()
    return out


def consumer_lag(consumer, topic: str, part: int, next_offset: int) -> int | None:
    """Lag from the high watermark the consumer's last fetch brought (no broker call);
    None before the first fetch."""
    from confluent_kafka import TopicPartition

    _, high = consumer.get_watermark_offsets(TopicPartition(topic, part), cached=True)
    return max(high - next_offset, 0) if high >= 0 else None


def write_json(path: Path, obj, *, indent: bool = False) -> None:
    """Write ``obj`` as JSON to ``path`` atomically: a reader sees the old file or the new one,
    never half of one (a temporary file beside it, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY
                                 | (orjson.OPT_INDENT_2 if indent else 0)))
    tmp.replace(path)


def append_history(path: Path, record: dict) -> None:
    """Append one JSON line; a file past HISTORY_MAX_BYTES becomes ``<path>.1`` first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if path.stat().st_size > HISTORY_MAX_BYTES:
            path.replace(path.with_name(path.name + ".1"))
    except FileNotFoundError:
        pass
    line = orjson.dumps({"ts": int(time.time() * 1000), **record},
                        option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)
    with open(path, "ab") as f:
        f.write(line)
