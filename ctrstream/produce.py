"""`ctrstream produce`: the simulated impression and click streams into Kafka, with the ground
truth (``truth.parquet``) and a manifest of everything sent (``manifest.json``) beside them."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ctrstream.simulator import FAULT_KINDS, EventStream, Faults, StreamSpec, write_manifest
from flows.config import Config
from flows.kafka import DeliveryError, input_partitions, make_producer

# Throughput settings; idempotence so a retried batch never lands twice.
# Bulk tuning on top of flows.kafka.make_producer's settings.
PRODUCER_SETTINGS: dict[str, Any] = {
    "linger.ms": 20,
    "batch.size": 1_000_000,
    "queue.buffering.max.kbytes": 1_048_576,
}
SLICE = 10_000  # messages sent between progress updates and pacing checks
FLUSH_TIMEOUT_S = 120.0


def default_truth_dir(cfg: Config) -> Path:
    return Path(cfg.data_dir) / "truth"


def produce(cfg: Config, spec: StreamSpec, *, truth_dir: str | Path | None = None,
            speed: float | None = None, rate: float | None = None, progress: bool = False,
            **producer_overrides: Any) -> dict[str, Any]:
    """Send the stream of ``spec`` to the input topics; return the manifest (also written to
    ``truth_dir``). ``speed``: event time runs that many times faster than wall time (until the
    last impression); ``rate``: messages per wall second; neither: as fast as possible. Raises
    ``DeliveryError`` if any message was not acknowledged; an interrupted run still flushes
    and writes its manifest, with ``complete`` false."""
    if speed is not None and rate is not None:
        raise ValueError("give speed or rate, not both")
    if (speed is not None and speed <= 0) or (rate is not None and rate <= 0):
        raise ValueError("speed and rate must be > 0")
    input_partitions(cfg)  # topics missing or auto-created with other partition counts: fail now
    truth_dir = Path(truth_dir) if truth_dir is not None else default_truth_dir(cfg)
    stream = EventStream(cfg.generator, spec, truth_dir)
    failures = {"count": 0, "first": None}

    def on_delivery(err, msg) -> None:
        if err is not None:
            failures["count"] += 1
            failures["first"] = failures["first"] or f"{msg.topic()}: {err}"

    producer = make_producer(cfg, **{**PRODUCER_SETTINGS, **producer_overrides,
                                      "on_delivery": on_delivery})
    topics = np.array([cfg.kafka.impressions_topic, cfg.kafka.clicks_topic], dtype=object)
    bar = tqdm(total=_expected_messages(cfg, spec), unit="msg", unit_scale=True,
               file=sys.stderr, disable=not progress, mininterval=0.5)
    send = producer.produce
    sent = 0
    t0 = time.monotonic()
    try:
        for chunk in stream:
            n = len(chunk)
            names = topics[chunk.topic].tolist()
            due = None
            if speed is not None:
                # Clicks after the last impression are not paced: event time has ended, and
                # waiting out the longest click delay would only stall the run.
                due = (np.minimum(chunk.at, stream.end_ms) - stream.start_ms) / (1000 * speed)
            elif rate is not None:
                due = np.arange(sent, sent + n) / rate
            i = 0
            while i < n:
                j = min(n, i + SLICE)
                if due is not None:
                    now = time.monotonic() - t0
                    k = int(np.searchsorted(due, now, side="right"))
                    if k <= i:
                        producer.poll(min(due[i] - now, 0.1))
                        continue
                    j = min(j, k)
                for topic, key, value in zip(names[i:j], chunk.keys[i:j], chunk.values[i:j],
                                             strict=True):
                    while True:
                        try:
                            send(topic, value, key)
                            break
                        except BufferError:  # local queue full: let deliveries drain it
                            producer.poll(0.05)
                producer.poll(0)
                sent += j - i
                bar.update(j - i)
                i = j
    finally:
        left = producer.flush(FLUSH_TIMEOUT_S)
        bar.close()
        elapsed = time.monotonic() - t0
        manifest = stream.manifest() | {
            "kafka": {"bootstrap_servers": cfg.kafka.bootstrap_servers,
                      "impressions_topic": cfg.kafka.impressions_topic,
                      "clicks_topic": cfg.kafka.clicks_topic},
            "delivery": {"sent": sent, "failed": failures["count"], "undelivered": left,
                         "first_error": failures["first"]},
            "elapsed_s": elapsed,
            "messages_per_s": sent / elapsed if elapsed > 0 else None,
        }
        write_manifest(truth_dir, manifest)
    if failures["count"] or left:
        raise DeliveryError(f"{failures['count']} messages failed and {left} were not delivered"
                            f" within {FLUSH_TIMEOUT_S:.0f} s (first error: {failures['first']})")
    return manifest


def _expected_messages(cfg: Config, spec: StreamSpec) -> float | None:
    g = cfg.generator
    n = spec.impressions
    if n is None and spec.bounded and spec.duration_s is not None:
        n = spec.duration_s * g.impressions_per_s
    return None if n is None else round(n * (1 + g.base_ctr))


def summary(m: dict[str, Any]) -> str:
    c = m["counts"]
    faults = " ".join(f"{k}={c[k]}" for k in FAULT_KINDS)
    rate = m["messages_per_s"] or 0
    return (f"produced {c['impressions']} impressions ({c['impression_messages']} messages) and "
            f"{c['clicks']} clicks ({c['click_messages']} messages) in {m['elapsed_s']:.1f} s,"
            f" {rate:,.0f} msg/s; faults: {faults}")


# -- CLI -----------------------------------------------------------------------------------


def _count_or_rate(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count or a rate: {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a rate must be between 0 and 1: {text!r}")
    return value


def _start_ms(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date/time or epoch ms: {text!r}") from None
    return int(when.replace(tzinfo=when.tzinfo or dt.UTC).timestamp() * 1000)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "produce", help="send simulated impressions and clicks to Kafka, with ground truth",
        description="Send a simulated impression and click stream with a known click "
                    "probability per impression to the input topics. Fault counts are exact "
                    "(an integer) or rates (a number between 0 and 1).")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--duration", type=float, metavar="S",
                      help="simulated seconds of event time (default 3600; inf: no end)")
    size.add_argument("--impressions", type=int, metavar="N", help="number of impressions")
    p.add_argument("--seed", type=int, help="default: generator.seed")
    p.add_argument("--start", type=_start_ms, metavar="WHEN",
                   help="event time of the first impression, ISO (UTC) or epoch ms "
                        "(default: generator.start_ms, else yesterday 00:00 UTC)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=float, metavar="X",
                      help="event time runs X times faster than wall time")
    pace.add_argument("--rate", type=float, metavar="N", help="N messages per wall second")
    p.add_argument("--faults", action="store_true",
                   help="every fault on, in small numbers (the flags below override)")
    for kind in ("duplicate_impressions", "duplicate_clicks", "early_clicks", "orphan_clicks"):
        p.add_argument("--" + kind.replace("_", "-"), type=_count_or_rate, metavar="N")
    p.add_argument("--malformed", type=_count_or_rate, metavar="N",
                   help="malformed messages on each topic")
    p.add_argument("--truth-dir", metavar="DIR",
                   help="where truth.parquet and manifest.json go (default: DATA_DIR/truth)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, cfg: Config) -> int:
    duration = args.duration if args.duration is not None or args.impressions else 3600.0
    g = cfg.generator
    expected = args.impressions or (duration * g.impressions_per_s)
    faults = Faults.preset(expected, g.base_ctr) if args.faults else Faults()
    chosen = {k: getattr(args, k) for k in FAULT_KINDS[:4] if getattr(args, k) is not None}
    if args.malformed is not None:
        chosen |= {"malformed_impressions": args.malformed, "malformed_clicks": args.malformed}
    faults = dataclasses.replace(faults, **chosen)
    spec = StreamSpec(seed=g.seed if args.seed is None else args.seed,
                      impressions=args.impressions,
                      duration_s=None if args.impressions else duration,
                      start_ms=args.start, faults=faults)
    truth_dir = args.truth_dir or default_truth_dir(cfg)
    try:
        manifest = produce(cfg, spec, truth_dir=truth_dir, speed=args.speed, rate=args.rate,
                           progress=not args.no_progress)
    except (ValueError, RuntimeError) as e:  # faults the stream cannot hold, topics missing
        print(f"ctrstream produce: {e}", file=sys.stderr)
        return 1
    print(f"{summary(manifest)}; truth: {truth_dir}")
    return 0
