"""Generator throughput into a local broker, beside a bare confluent-kafka loop sending the same
bytes (pre-serialized, same keys, same topics' settings, same producer settings) in the same run.

    python bench/produce.py [--impressions 1000000] [--rounds 3]

Starts a private local stack (ctrstream/stack.py: Tansu broker in memory, and Redis) on free ports
and stops it at the end. Each round sends to fresh topics, bare loop first, then the
generator; the figure is the median over rounds of messages / wall seconds, the generator's
including its world setup, simulation, serialization, truth file and final flush.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

# The project before bench/: bench/features.py would shadow the `features` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctrstream.produce import PRODUCER_SETTINGS, produce  # noqa: E402
from ctrstream.simulator import EventStream, StreamSpec  # noqa: E402
from ctrstream.stack import LocalStack, create_topics, free_port  # noqa: E402
from flows.config import Config  # noqa: E402
from flows.kafka import make_producer  # noqa: E402


def fresh_topics(cfg: Config, label: str) -> Config:
    suffix = f"{label}-{uuid.uuid4().hex[:8]}"
    cfg = cfg.replace(kafka={t: f"{t.removesuffix('_topic')}-{suffix}" for t in (
        "impressions_topic", "clicks_topic", "examples_topic", "dead_letters_topic")})
    create_topics(cfg)
    return cfg


def bare_loop(cfg: Config, messages: list[tuple[int, bytes, bytes]]) -> float:
    failed = []
    producer = make_producer(cfg, **PRODUCER_SETTINGS,
                             on_delivery=lambda err, msg: err and failed.append(err))
    topics = (cfg.kafka.impressions_topic, cfg.kafka.clicks_topic)
    send = producer.produce
    start = time.perf_counter()
    for i, (topic, key, value) in enumerate(messages):
        while True:
            try:
                send(topics[topic], value, key)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10_000 == 0:
            producer.poll(0)
    left = producer.flush(120)
    elapsed = time.perf_counter() - start
    if left or failed:
        raise RuntimeError(f"bare loop: {len(failed)} failed, {left} undelivered")
    return len(messages) / elapsed


def generator(cfg: Config, spec: StreamSpec, truth_dir: str) -> tuple[float, int]:
    start = time.perf_counter()
    sent = produce(cfg, spec, truth_dir=truth_dir)["delivery"]["sent"]
    return sent / (time.perf_counter() - start), sent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impressions", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    spec = StreamSpec(seed=args.seed, impressions=args.impressions)
    gen_rates, bare_rates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        stack = LocalStack(Path(tmp) / "stack", free_port(), free_port())
        stack.up()
        try:
            base = stack.config(Config())
            messages = [m for chunk in EventStream(base.generator, spec)
                        for m in zip(chunk.topic.tolist(), chunk.keys, chunk.values,
                                     strict=True)]
            for _ in range(args.rounds):
                bare_rates.append(bare_loop(fresh_topics(base, "bare"), messages))
                rate, sent = generator(fresh_topics(base, "gen"), spec, tmp)
                if sent != len(messages):
                    raise RuntimeError(f"generator sent {sent}, bare loop {len(messages)}")
                gen_rates.append(rate)
        finally:
            stack.down()
    gen, bare = statistics.median(gen_rates), statistics.median(bare_rates)
    print(f"messages per round: {len(messages):,} ({args.impressions:,} impressions, faults off,"
          f" no pacing), rounds: {args.rounds}, partitions: {base.kafka.partitions}")
    print(f"{'ctrstream produce()':<26}{gen:>12,.0f} msg/s   rounds: "
          + ", ".join(f"{r:,.0f}" for r in gen_rates))
    print(f"{'bare confluent-kafka loop':<26}{bare:>12,.0f} msg/s   rounds: "
          + ", ".join(f"{r:,.0f}" for r in bare_rates))
    print(f"ratio generator / bare: {gen / bare:.2f} (target >= 0.50)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
