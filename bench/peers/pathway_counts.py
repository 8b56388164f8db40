"""The Pathway peer of bench/pipeline.py: the join flow's five-entity counts (impressions, and
the clicks joined to their impression) over 5 min, 1 h and 24 h tumbling windows of event
time, written to the same Redis (a hash per entity and count: window start -> count), from
the same topics.

It runs in its own virtualenv (.venv/peers, made by `make bench`: Pathway's dependencies are
not the project's) and reads the config as TOML, without importing the project.

    .venv/peers/bin/python bench/peers/pathway_counts.py CONFIG.toml EVENTS

It stops once it has read EVENTS input messages and written what they changed.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import tomllib

import pathway as pw
import redis

ENTITIES = {"user": ("user_id",), "item": ("item_id",), "category": ("category",),
            "user_category": ("user_id", "category"), "item_position": ("item_id", "position")}
WINDOWS_MS = {"5m": 300_000, "1h": 3_600_000, "24h": 86_400_000}


time_now, time_sleep = time.monotonic, time.sleep  # the callbacks' arguments shadow `time`


class Impression(pw.Schema):
    impression_id: str
    ts: int
    user_id: str
    item_id: str
    features: pw.Json


class Click(pw.Schema):
    impression_id: str
    ts: int


def main(config_path: str, n_events: int) -> None:
    with open(config_path, "rb") as f:
        cfg = tomllib.load(f)
    kafka, prefix = cfg["kafka"], cfg["features"]["store_prefix"]
    settings = {"bootstrap.servers": kafka["bootstrap_servers"], "group.id": "pathway-peer",
                "auto.offset.reset": "earliest", "fetch.wait.max.ms": "20"}
    imps = pw.io.kafka.read(settings, topic=kafka["impressions_topic"], schema=Impression,
                            format="json", autocommit_duration_ms=100)
    clicks = pw.io.kafka.read(settings, topic=kafka["clicks_topic"], schema=Click,
                              format="json", autocommit_duration_ms=100)
    imps = imps.select(*pw.this[["impression_id", "ts", "user_id", "item_id"]],
                       category=pw.this.features["category"].as_str(),
                       position=pw.apply(str, pw.this.features["position"].as_int()))
    joined = clicks.join(imps, pw.left.impression_id == pw.right.impression_id).select(
        pw.left.ts, *pw.right[["user_id", "item_id", "category", "position"]])

    # every (entity, id, kind) event as one row: a windowby per window length, not per entity
    def keyed(table: pw.Table, kind: str, name: str, fields: tuple) -> pw.Table:
        head = f"{name}:{kind}:"
        return table.select(pw.this.ts, key=pw.apply(lambda *v: head + "\x1f".join(v),
                                                      *[pw.this[f] for f in fields]))

    events = pw.Table.concat_reindex(*[
        keyed(table, kind, name, fields)
        for kind, table in (("imp", imps), ("clk", joined)) for name, fields in ENTITIES.items()])

    client = redis.Redis.from_url(cfg["redis"]["url"])
    pending: dict = {}
    lock = threading.Lock()
    state = {"read": 0, "changed": time_now()}

    def count_read(key, row, time, is_addition):
        with lock:
            state["read"] += 1

    def on_change(key, row, time, is_addition):
        if is_addition:  # the newest count of a (key, window) replaces the older
            with lock:
                pending[(row["key"], row["label"], row["start"])] = row["n"]
                state["changed"] = time_now()

    def write() -> None:
        with lock:
            rows = list(pending.items())
            pending.clear()
        if rows:
            pipe = client.pipeline(transaction=False)
            for (key, label, start), n in rows:
                pipe.hset(f"{prefix}:{{{key}}}:{label}", str(start), n)
            pipe.execute()

    for table in (imps, clicks):
        pw.io.subscribe(table, on_change=count_read)
    for label, w in WINDOWS_MS.items():
        counts = events.windowby(pw.this.ts, window=pw.temporal.tumbling(duration=w),
                                 instance=pw.this.key).reduce(
            key=pw.this._pw_instance, start=pw.this._pw_window_start, n=pw.reducers.count())
        pw.io.subscribe(counts.select(*pw.this, label=label), on_change=on_change,
                        on_time_end=lambda time: write())

    def stop_when_done() -> None:
        # A Kafka read never ends: stop once every message is read and no count changed for
        # a second, with what changed written.
        while True:
            time_sleep(0.1)
            with lock:
                done = state["read"] >= n_events and time_now() - state["changed"] > 1.0
            if done:
                write()
                os._exit(0)

    threading.Thread(target=stop_when_done, daemon=True).start()
    pw.run(monitoring_level=pw.MonitoringLevel.NONE)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
